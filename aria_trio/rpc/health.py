"""grpc.health.v1.Health: Check, Watch and List, so supervisors and stock tools can ask."""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio
from grpc_health.v1 import health_pb2  # descriptors only: this import does not load grpcio

from aria_trio.rpc.context import CallContext
from aria_trio.shared import errors

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
DESCRIPTOR = health_pb2.DESCRIPTOR.services_by_name["Health"]


class Health:
    """Serving status per service name; "" is the server as a whole."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = trio.Event()

    def set(self, service: str, status: int) -> None:
        if self._status.get(service) != status:
            self._status[service] = status
            self._changed.set()
            self._changed = trio.Event()

    def set_all(self, status: int) -> None:
        for service in list(self._status):
            self.set(service, status)

    def status(self, service: str = "") -> int | None:
        return self._status.get(service)

    async def Check(self, request: health_pb2.HealthCheckRequest, ctx: CallContext) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            raise errors.NotFound(f"unknown service {request.service!r}", reason="UNKNOWN_SERVICE")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, ctx: CallContext) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service, status in self._status.items():
            response.statuses[service].status = status
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, ctx: CallContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await changed.wait()
