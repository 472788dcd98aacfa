"""aria.v1.ContainerService: the caller's containers, kept by Quilt."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aria_trio.proto.aria.v1 import container_grpc
from aria_trio.proto.aria.v1 import container_pb2 as pb
from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.rpc import CallContext
from aria_trio.runtime.access.audit import Audit
from aria_trio.runtime.agents.sessions import Sessions
from aria_trio.runtime.services import convert
from aria_trio.runtime.work.containers import Containers
from aria_trio.runtime.work.tasks import check_environment
from aria_trio.shared import errors

MAX_ENV = 1024


def _limits(limits: pb.ContainerLimits) -> q.Limits:
    """The caller's limits as Quilt takes them (Quilt checks them against the operator's maxima)."""
    return q.Limits(memory_bytes=limits.memory_bytes, cpus=limits.cpus, pids=limits.pids, disk_bytes=limits.disk_bytes)


class ContainerService(container_grpc.ContainerServiceServicer):  # type: ignore[misc]
    def __init__(self, containers: Containers, sessions: Sessions, audit: Audit) -> None:
        self.containers = containers
        self.sessions = sessions
        self.audit = audit

    async def CreateContainer(self, request: pb.CreateContainerRequest, ctx: CallContext) -> pb.Container:
        if len(request.environment) > MAX_ENV:
            raise errors.InvalidArgument(f"at most {MAX_ENV} environment variables", fields={"environment": "too many"})
        check_environment({kv.key: kv.value for kv in request.environment})
        session = request.session_id if request.HasField("session_id") and request.session_id else None
        if session is not None:
            await self.sessions.get(ctx.user, session)
        row = await self.containers.create(
            ctx.user,
            name=request.name,
            image_path=request.image_path,
            environment={kv.key: kv.value for kv in request.environment},
            persistent=request.persistent,
            session_id=session,
            command=list(request.command),
            limits=_limits(request.limits) if request.HasField("limits") else None,
        )
        await self.audit.record(ctx, "container.create", "container", row["id"], name=request.name)
        return convert.container(row)

    async def StartContainer(self, request: pb.StartContainerRequest, ctx: CallContext) -> pb.StartContainerResponse:
        await self.containers.start(ctx.user, request.container_id)
        await self.audit.record(ctx, "container.start", "container", request.container_id)
        return pb.StartContainerResponse()

    async def StopContainer(self, request: pb.StopContainerRequest, ctx: CallContext) -> pb.StopContainerResponse:
        await self.containers.stop(ctx.user, request.container_id)
        await self.audit.record(ctx, "container.stop", "container", request.container_id)
        return pb.StopContainerResponse()

    async def RemoveContainer(self, request: pb.RemoveContainerRequest, ctx: CallContext) -> pb.RemoveContainerResponse:
        await self.containers.remove(ctx.user, request.container_id)
        await self.audit.record(ctx, "container.remove", "container", request.container_id)
        return pb.RemoveContainerResponse()

    async def GetContainer(self, request: pb.GetContainerRequest, ctx: CallContext) -> pb.Container:
        return convert.container(await self.containers.get(ctx.user, request.container_id))

    async def ListContainers(self, request: pb.ListContainersRequest, ctx: CallContext) -> pb.ListContainersResponse:
        session = request.session_id if request.HasField("session_id") else None
        rows = await self.containers.list(ctx.user, session)
        return pb.ListContainersResponse(containers=[convert.container(r) for r in rows])

    async def StreamContainerLogs(
        self, request: pb.StreamContainerLogsRequest, ctx: CallContext
    ) -> AsyncIterator[pb.ContainerLog]:
        since = errors.timestamp_ns(request.since, "since") if request.HasField("since") else None
        async for line in self.containers.logs(ctx.user, request.container_id, request.follow, since):
            yield pb.ContainerLog(
                line=line.text,
                stream=pb.ContainerLog.STDERR if line.stream == q.STDERR else pb.ContainerLog.STDOUT,
                timestamp=line.timestamp,
            )
