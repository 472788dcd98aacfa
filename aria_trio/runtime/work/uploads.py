"""Bundle uploads: the client's stream forwarded to Quilt as it arrives, with progress events.

The client's chunks go through a bounded memory channel to a task that sends them on to Quilt;
each send waits for HTTP/2 flow-control credit from Quilt, so when Quilt is slow the channel fills,
the handler stops reading, and the client's own window closes: memory stays at a few chunks
whatever the bundle's size, and the slowest party sets the pace end to end. Quilt hashes, checks
and stores; the runtime then registers the bundle's agents and tools for the caller. Progress goes
out as BundleUploadEvent notifications, at most one per 5% or per 250 ms, then one final success
or failure event. Every failure (bad input, Quilt's refusal, a client gone mid-upload) leaves
nothing registered, and Quilt removes its temporary file when its call is cancelled.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import structlog
import trio

from aria_trio.proto.aria.v1 import bundle_pb2 as pb
from aria_trio.proto.aria.v1 import notification_pb2 as npb
from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.runtime.agents.registry import Registry
from aria_trio.runtime.quilt_client import QuiltLink
from aria_trio.runtime.work.notifications import Notifications
from aria_trio.shared import errors

log = structlog.get_logger("aria.uploads")

FORWARD_AHEAD = 4  # chunks between the client and Quilt; when full, the client waits
PROGRESS_STEP = 5.0  # percent between progress events ...
PROGRESS_EVERY = 0.25  # ... or seconds, whichever comes first
MAX_NAME = 255
SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_metadata(m: pb.BundleMetadata) -> None:
    if not m.name or len(m.name) > MAX_NAME or "/" in m.name or "\0" in m.name:
        raise errors.InvalidArgument(
            f"metadata.name must be a file name of 1 to {MAX_NAME} characters, without '/'",
            fields={"metadata.name": "invalid"},
        )
    if m.total_size_bytes == 0:
        raise errors.InvalidArgument(
            "metadata.total_size_bytes must be the bundle's size in bytes", fields={"metadata.total_size_bytes": "0"}
        )
    if m.sha256_checksum and not SHA256.fullmatch(m.sha256_checksum):
        raise errors.InvalidArgument(
            "metadata.sha256_checksum must be 64 hex digits", fields={"metadata.sha256_checksum": "not a sha256"}
        )


class _Progress:
    """Throttled BundleUploadEvents for one upload."""

    def __init__(self, notifications: Notifications, user: str, name: str, total: int) -> None:
        self.notifications = notifications
        self.user = user
        self.name = name
        self.total = total
        self.sent = 0
        self.last_percent = 0.0
        self.last_at = trio.current_time()

    async def advanced(self, nbytes: int) -> None:
        self.sent += nbytes
        percent = 100.0 * self.sent / self.total
        now = trio.current_time()
        if percent - self.last_percent >= PROGRESS_STEP or now - self.last_at >= PROGRESS_EVERY:
            self.last_percent, self.last_at = percent, now
            await self.event(percent, f"uploading: {self.sent} of {self.total} bytes")

    async def event(self, percent: float, message: str, *, success: bool = False, error: str | None = None) -> None:
        event = npb.BundleUploadEvent(
            bundle_name=self.name, progress_percent=percent, status_message=message, success=success
        )
        if error is not None:
            event.error_message = error
        await self.notifications.publish(
            self.user,
            "bundle_upload",
            event,
            title=f"Bundle {self.name}",
            message=error or message,
            metadata={"bundle_name": self.name, "percent": round(percent, 1), "success": success},
        )


class Uploads:
    def __init__(self, quilt: QuiltLink, registry: Registry, notifications: Notifications) -> None:
        self.quilt = quilt
        self.registry = registry
        self.notifications = notifications
        self.bytes_received = 0  # bundle bytes read from clients since start (a metric)

    async def upload(self, user: str, requests: AsyncIterator[pb.UploadBundleRequest]) -> str:
        """Take one upload stream to its end; the registered bundle's id."""
        first = await anext(requests, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise errors.InvalidArgument(
                "the first message of an upload must be its metadata", fields={"metadata": "missing"}
            )
        meta = first.metadata
        check_metadata(meta)
        progress = _Progress(self.notifications, user, meta.name, meta.total_size_bytes)
        try:
            await progress.event(0.0, "upload started")
            bundle = await self._forward(user, meta, requests, progress)
            bundle_id = await self._register(user, bundle)
        except BaseException as exc:
            with trio.CancelScope(shield=True):  # the client may be gone: say what happened anyway
                inner = errors.single(exc)
                reason = inner.message if isinstance(inner, errors.AriaError) else "the upload was interrupted"
                await progress.event(100.0 * progress.sent / progress.total, "upload failed", error=reason)
            log.info("bundle upload failed", user=user, bundle=meta.name, reason=reason)
            raise
        await progress.event(
            100.0, f"stored as {bundle_id}: {len(bundle.agents)} agents, {len(bundle.tools)} tools", success=True
        )
        log.info("bundle uploaded", user=user, bundle=meta.name, id=bundle_id, bytes=bundle.size_bytes)
        return bundle_id

    async def _forward(
        self, user: str, meta: pb.BundleMetadata, requests: AsyncIterator[pb.UploadBundleRequest], progress: _Progress
    ) -> q.Bundle:
        """Two tasks: the client's chunks into the channel, and the channel to Quilt, whose
        answer may come early (a refusal: then the reading stops at once) or at the end."""
        head = q.BundleMetadata(
            filename=meta.name, size_bytes=meta.total_size_bytes, sha256=meta.sha256_checksum.lower()
        )
        head.labels["aria.user"] = user
        answer: list[q.Bundle] = []
        refused: list[errors.AriaError] = []  # how Quilt's side failed (its refusal, or no Quilt)
        send, receive = trio.open_memory_channel[bytes](FORWARD_AHEAD)

        async def to_quilt() -> None:
            try:
                async with receive:
                    answer.append(await self.quilt.upload_bundle(head, receive, progress.advanced))
            except errors.AriaError as exc:
                refused.append(exc)
                raise

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(to_quilt)
                await self._read_chunks(requests, send, meta.total_size_bytes)
        except BaseExceptionGroup as exc:
            raise (refused[0] if refused else _first_reason(exc)) from None
        if not answer:  # (Quilt's side ended with neither answer nor error: its link went down under it)
            log.warning("quilt ended an upload without an answer", user=user, bundle=meta.name)
            raise errors.Unavailable("the container service (quilt) went away during the upload; try again")
        return answer[0]

    async def _read_chunks(
        self, requests: AsyncIterator[pb.UploadBundleRequest], send: trio.MemorySendChannel[bytes], total: int
    ) -> None:
        """The client's chunks, checked against what its metadata declared, into the channel."""
        async with send:
            received = 0
            async for r in requests:
                kind = r.WhichOneof("payload")
                if kind != "chunk":
                    raise errors.InvalidArgument(
                        "only the first message of an upload may be metadata; the rest are chunks"
                        if kind == "metadata"
                        else "an upload message carries nothing",
                        fields={"payload": "metadata again" if kind == "metadata" else "empty"},
                    )
                received += len(r.chunk)
                self.bytes_received += len(r.chunk)
                if received > total:
                    raise _size_error(f"more bytes than the {total} declared in metadata")
                try:
                    await send.send(r.chunk)  # waits while the channel is full: backpressure to the client
                except trio.BrokenResourceError:
                    return  # Quilt's side has ended: its answer, or its error, says how the upload went
            if received < total:
                raise _size_error(f"the upload ended after {received} of the {total} bytes declared")

    async def _register(self, user: str, bundle: q.Bundle) -> str:
        """Shielded (a local write): once Quilt has stored the bundle, it is registered or removed,
        whatever becomes of the client. (A runtime killed here leaves Quilt a bundle nobody
        registered: the next start removes it, leftovers.py.)"""
        with trio.CancelScope(shield=True):
            bundle_id = await self._register_or_remove(user, bundle)
        return bundle_id

    async def _register_or_remove(self, user: str, bundle: q.Bundle) -> str:
        try:
            return await self.registry.register(user, bundle)
        except errors.AriaError:
            if not await self.registry.in_use(bundle.blake3):
                await self.quilt.delete_bundle(q.BundleRef(id=bundle.id))
            raise


def _first_reason(exc: BaseException) -> BaseException:
    """What to tell the client when the tasks failed and Quilt refused nothing: our own
    finding, else whatever it was."""
    inner = errors.single(exc)
    if isinstance(inner, BaseExceptionGroup):
        found = inner.subgroup(errors.AriaError)
        if found is not None:
            return errors.single(found.exceptions[0])
    return inner


def _size_error(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, reason="SIZE_MISMATCH", fields={"metadata.total_size_bytes": "mismatch"})
