"""gRPC status: domain errors to codes (the one place), and the status trailers on the wire."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Mapping, Sequence

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from purerpc.grpclib.status import StatusCode

from aria_trio.shared import errors

__all__ = ["CODES", "RpcError", "StatusCode", "from_exception", "status_details"]

# Domain error class -> gRPC status code. The only place this mapping is made.
CODES: dict[type[errors.AriaError], StatusCode] = {
    errors.InvalidArgument: StatusCode.INVALID_ARGUMENT,
    errors.NotFound: StatusCode.NOT_FOUND,
    errors.AlreadyExists: StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: StatusCode.UNAVAILABLE,
    errors.Unimplemented: StatusCode.UNIMPLEMENTED,
    errors.DeadlineExceeded: StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: StatusCode.CANCELLED,
}


class RpcError(Exception):
    """A status to end a call with (server side), or the status a call ended with (client side)."""

    def __init__(
        self,
        code: StatusCode,
        message: str = "",
        *,
        reason: str | None = None,
        fields: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
        details_bin: bytes | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or code.name
        self.fields = dict(fields or {})
        self.metadata = dict(metadata or {})
        self.trailing_metadata = tuple(trailing_metadata)
        self.details_bin = details_bin

    def status(self) -> status_pb2.Status | None:
        """The google.rpc.Status the server sent (client side), if any."""
        if self.details_bin is None:
            return None
        return status_pb2.Status.FromString(self.details_bin)

    def bad_fields(self) -> dict[str, str]:
        """The field violations of the google.rpc.BadRequest the server sent (client side)."""
        status = self.status()
        for detail in status.details if status else ():
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                return {v.field: v.description for v in bad.field_violations}
        return {}

    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        status = self.status()
        for detail in status.details if status else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info
        return None


def from_exception(exc: errors.AriaError) -> RpcError:
    for cls in type(exc).__mro__:
        code = CODES.get(cls)
        if code is not None:
            break
    else:
        code = StatusCode.UNKNOWN
    return RpcError(code, exc.message, reason=exc.reason, fields=exc.fields, metadata=exc.metadata)


def status_details(
    code: StatusCode,
    message: str,
    *,
    domain: str,
    reason: str,
    metadata: Mapping[str, str],
    fields: Mapping[str, str],
) -> bytes:
    """google.rpc.Status for `grpc-status-details-bin`: ErrorInfo always, BadRequest when fields
    are named. Code and message must equal grpc-status/grpc-message (grpcio checks)."""
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)]
    if fields:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in fields.items()
                ]
            )
        )
    status = status_pb2.Status(code=code.value, message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    data: bytes = status.SerializeToString()
    return data


# gRPC spec: grpc-message is percent-encoded outside printable ASCII (0x20-0x7E), and '%'.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def encode_message(message: str) -> str:
    return urllib.parse.quote(message, safe=_MESSAGE_SAFE)


def b64(data: bytes) -> str:
    """Unpadded base64, as gRPC sends binary header values."""
    return base64.b64encode(data).rstrip(b"=").decode("ascii")
