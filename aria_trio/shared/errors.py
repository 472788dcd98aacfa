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


DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT


def is_disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space: an OSError ENOSPC/EDQUOT, or SQLite's SQLITE_FULL
    (or an I/O error of SQLite's whose cause was such an OSError)."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == 13 or (code & 0xFF == 10 and _disk_full_cause(exc))  # SQLITE_FULL, SQLITE_IOERR
    return False


def _disk_full_cause(exc: BaseException) -> bool:
    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS


def disk_full() -> ResourceExhausted:
    return ResourceExhausted(
        "disk full: the daemon cannot write its data; nothing was changed (free some space and try again)",
        reason="DISK_FULL",
    )


def timestamp_ns(ts: object, field: str) -> int:
    """A google.protobuf.Timestamp from a caller, in nanoseconds; one outside the range the type
    allows (years 1 to 9999, nanos 0..999,999,999) is INVALID_ARGUMENT naming `field`."""
    seconds, nanos = getattr(ts, "seconds", 0), getattr(ts, "nanos", 0)
    if not (-62135596800 <= seconds <= 253402300799 and 0 <= nanos <= 999_999_999):
        raise InvalidArgument(f"{field} is not a valid timestamp", fields={field: "out of range"})
    return int(seconds) * 1_000_000_000 + int(nanos)


def seconds(value: float, field: str, most: float) -> float:
    """A duration in seconds from a caller: a number from 0 to `most` (NaN and infinity are not)."""
    if not 0 <= value <= most:  # (NaN compares false: refused too)
        raise InvalidArgument(f"{field} must be between 0 and {most:g}", fields={field: "out of range"})
    return value
