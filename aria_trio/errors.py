"""Domain errors: what went wrong, in words a client can act on.

The domain raises these; the RPC layer maps each class to a gRPC status code in one table
(`aria_trio.rpc.status.CODES`). Messages are shown to clients as they are, so they must never
carry paths, SQL or other internals: log those instead.
"""

from __future__ import annotations

from collections.abc import Mapping


class AriaError(Exception):
    """Base of every error a client may see. `reason` is UPPER_SNAKE for google.rpc.ErrorInfo."""

    reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        fields: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        # field path -> what is wrong with it (google.rpc.BadRequest for INVALID_ARGUMENT)
        self.fields = dict(fields or {})
        self.metadata = dict(metadata or {})


class InvalidArgument(AriaError):
    reason = "INVALID_ARGUMENT"


class NotFound(AriaError):
    """The resource does not exist, or belongs to someone else (never say which)."""

    reason = "NOT_FOUND"


class AlreadyExists(AriaError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(AriaError):
    reason = "FAILED_PRECONDITION"


class PermissionDenied(AriaError):
    reason = "PERMISSION_DENIED"


class ResourceExhausted(AriaError):
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(AriaError):
    reason = "UNAVAILABLE"


class Unimplemented(AriaError):
    reason = "UNIMPLEMENTED"


class DeadlineExceeded(AriaError):
    reason = "DEADLINE_EXCEEDED"


class Cancelled(AriaError):
    reason = "CANCELLED"


def single(exc: BaseException) -> BaseException:
    """The one error inside (nested) single-member exception groups, else the group: what a
    nursery raised when one of its tasks failed and the others were cancelled because of it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
