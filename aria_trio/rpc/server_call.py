"""One call on the server, in its own task: the handler's view of it, and how it ends.

A call gets its request messages from the connection's reader (`put`, bounded in bytes by the
stream's flow-control window) and hands them to its handler as they are consumed, giving their
credit back; it sends the handler's responses within the client's window; and, whatever ends it
(the handler's return or error, the client's deadline or RST_STREAM, a message that could not be
read, shutdown), it answers with one status: trailers carrying grpc-status, a bounded message,
google.rpc.Status details (with the request id) and the handler's trailing metadata. Before the
handler runs it is routed to its method, authenticated and admitted (the runtime's quotas).
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import h2.errors
import h2.exceptions
import structlog
import trio
from google.protobuf import message as pb_message
from hpack import NeverIndexedHeaderTuple
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.headers import sanitize_headers

from aria_trio.rpc.context import CallContext
from aria_trio.rpc.methods import Method
from aria_trio.rpc.protocol import ACCEPT_ENCODING, SUPPORTED_ENCODINGS
from aria_trio.rpc.status import RpcError, StatusCode, b64, encode_message, from_exception, status_details
from aria_trio.shared import errors

if TYPE_CHECKING:
    from aria_trio.rpc.server import Connection

log = structlog.get_logger("aria.rpc")

END = object()  # end of the client's messages
MAX_STATUS_MESSAGE = 1024  # bytes of a status message (its details carry a copy): the rest is cut, with "…"


def bounded(text: str, most: int) -> str:
    """`text` cut to at most `most` bytes of UTF-8 (at a character), with "…" when cut."""
    raw = text.encode()
    if len(raw) <= most:
        return text
    return raw[: most - 3].decode("utf-8", "ignore") + "…"


class ServerCall:
    __slots__ = (
        "_aborted",
        "_headers_sent",
        "_inbox",
        "_remote_closed",
        "_reset",
        "_waiter",
        "_window",
        "conn",
        "ctx",
        "event",
        "method",
        "scope",
        "sid",
    )

    def __init__(self, conn: Connection, event: RequestReceived) -> None:
        self.conn = conn
        self.sid = event.stream_id
        self.event = event
        path = f"/{event.service_name}/{event.method_name}"
        self.method = conn.server.methods.get(path)
        deadline = math.inf
        if event.timeout is not None:
            deadline = trio.current_time() + event.timeout.total_seconds()
        self.scope = trio.CancelScope(deadline=deadline)
        self.ctx = CallContext(path, event.custom_metadata, conn.peer, deadline)
        self._inbox: deque[Any] = deque()
        self._waiter: trio.Event | None = None
        self._window: trio.Event | None = None
        self._headers_sent = False
        self._remote_closed = False
        self._reset = False
        self._aborted: tuple[StatusCode, str] | None = None

    # -- events from the reader --------------------------------------------------------------------

    def put(self, item: Any) -> None:
        # Unbounded deque, bounded in bytes by the stream's flow-control window: a client cannot
        # send more until the handler consumes (and we acknowledge) what is here.
        if item is END:
            self._remote_closed = True
        self._inbox.append(item)
        if self._waiter is not None:
            self._waiter.set()

    def window_opened(self) -> None:
        if self._window is not None:
            self._window.set()

    def reset_by_peer(self) -> None:
        self._reset = True
        self._remote_closed = True
        self.scope.cancel()

    def abort(self, code: StatusCode, message: str) -> None:
        if self._aborted is None:
            self._aborted = (code, message)
        self.scope.cancel()

    # -- the handler's side ------------------------------------------------------------------------

    async def receive(self) -> pb_message.Message | None:
        """The next request message, or None after the client's last one."""
        while not self._inbox:
            self._waiter = trio.Event()
            await self._waiter.wait()
            self._waiter = None
        item = self._inbox[0]
        if item is END:
            return None
        self._inbox.popleft()
        self.conn.h2.acknowledge_received_data(item.flow_controlled_length, self.sid)
        if self.conn.h2._data_to_send:  # credit is sent back in batches (half a window)
            self.conn.kick()
        try:
            return self.method.request_type.FromString(item.data)  # type: ignore[union-attr]
        except pb_message.DecodeError:
            name = self.method.request_type.DESCRIPTOR.full_name  # type: ignore[union-attr]
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {name} message",
                reason="MALFORMED_REQUEST",
                fields={"request": f"not a valid {name}"},
            ) from None

    async def requests(self) -> AsyncIterator[pb_message.Message]:
        while (msg := await self.receive()) is not None:
            yield msg

    async def send(self, msg: pb_message.Message, *, last: bool = False) -> None:
        """Queue one response message; waits only for flow-control credit. `last`: the status
        follows at once, so skip the checkpoint that lets the writer send this message alone."""
        data = msg.SerializeToString()
        if len(data) > self.conn.server.max_message_length:
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"the response is larger than the maximum message size ({self.conn.server.max_message_length} bytes)",
            )
        if not self._headers_sent:
            self._send_headers()
        prefix = struct.pack(">?I", False, len(data))
        proto = self.conn.proto
        if proto.flow_control_window(self.sid) >= len(prefix) + len(data):  # one frame: no join
            self.conn.h2.send_data(self.sid, data, prefix=prefix)
            payload = memoryview(b"")
        else:
            payload = memoryview(prefix + data)
        while payload:
            window = proto.flow_control_window(self.sid)
            if window <= 0:
                self.conn.kick()  # what is queued must reach the client before it grants more
                self._window = trio.Event()
                await self._window.wait()
                self._window = None
                continue
            chunk, payload = payload[:window], payload[window:]
            self.conn.h2.send_data(self.sid, chunk)  # (copied once, into what is to send)
        if not last:
            self.conn.kick()
            await trio.lowlevel.checkpoint()

    def _send_headers(self) -> None:
        self._headers_sent = True
        headers = [(":status", "200"), ("content-type", "application/grpc+proto")]
        if self.ctx.initial_metadata:
            headers.extend(sanitize_headers(self.ctx.initial_metadata))
        self.conn.h2.send_headers(self.sid, headers)

    def _send_status(
        self, code: StatusCode, message: str, reason: str, fields: dict[str, str], metadata: dict[str, str]
    ) -> None:
        # A message may quote the caller's input: bounded, so the trailers stay within what any
        # client takes (grpcio: 8 KiB soft, 16 KiB hard, for all of its metadata).
        message = bounded(message, MAX_STATUS_MESSAGE)
        fields = {bounded(k, 256): bounded(v, 256) for k, v in list(fields.items())[:16]}
        metadata = {bounded(k, 128): bounded(v, 512) for k, v in list(metadata.items())[:16]}
        if self._headers_sent:
            headers = []
        else:
            headers = [(":status", "200"), ("content-type", "application/grpc+proto")]
            if self.ctx.initial_metadata:
                headers.extend(sanitize_headers(self.ctx.initial_metadata))
        headers.append(("grpc-status", str(code.value)))
        if message:
            headers.append(NeverIndexedHeaderTuple("grpc-message", encode_message(message)))
        if code is not StatusCode.OK:
            if code is StatusCode.UNIMPLEMENTED:
                headers.append(("grpc-accept-encoding", ACCEPT_ENCODING))
            details = status_details(
                code,
                message,
                domain=self.conn.server.error_domain,
                reason=reason,
                metadata={**metadata, "request_id": self.ctx.request_id},
                fields=fields,
            )
            headers.append(NeverIndexedHeaderTuple("grpc-status-details-bin", b64(details)))
        # Values that differ on every call stay out of the HPACK table, or they would evict the
        # ones that repeat (and make every lookup scan the whole table).
        headers.append(NeverIndexedHeaderTuple("x-request-id", self.ctx.request_id))
        if self.ctx.trailing_metadata:
            headers.extend(sanitize_headers(self.ctx.trailing_metadata))
        h2c = self.conn.h2
        try:
            h2c.send_headers(self.sid, headers, end_stream=True)
            if not self._remote_closed:
                # We are done before the client is (e.g. a failed upload): tell it to stop.
                h2c.reset_stream(self.sid, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.StreamClosedError:
            pass  # the client already reset the stream
        self.conn.flush()

    # -- the call's task ---------------------------------------------------------------------------

    async def run(self) -> None:
        server = self.conn.server
        started = trio.current_time()
        known = self.method.path if self.method is not None else None
        if server.metrics is not None:  # (no checkpoint before the try: call_ended always follows)
            server.metrics.call_started(known)
        code, message, reason = StatusCode.CANCELLED, "", "CANCELLED"  # unless we get further
        fields: dict[str, str] = {}
        metadata: dict[str, str] = {}
        try:
            with self.scope:
                try:
                    await self._invoke()
                    code, reason = StatusCode.OK, "OK"
                except Exception as exc:
                    err = _to_rpc_error(errors.single(exc), self)
                    code, message, reason = err.code, err.message, err.reason
                    fields, metadata = err.fields, err.metadata
            if self.scope.cancelled_caught:
                if self._reset:
                    code, message, reason = StatusCode.CANCELLED, "cancelled by the client", "CANCELLED"
                elif self._aborted is not None:
                    code, message = self._aborted
                    reason = code.name
                else:
                    code, message, reason = StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", "DEADLINE_EXCEEDED"
            if not self._reset:
                self._send_status(code, message, reason, fields, metadata)
        finally:
            self._close()
            server._call_ended()
            duration = trio.current_time() - started
            if server.metrics is not None:
                server.metrics.call_ended(known, code.name, duration)
            identity = self.ctx.identity
            log.info(
                "rpc",
                method=self.ctx.method,
                code=code.name,
                duration_ms=round(duration * 1000, 3),
                request_id=self.ctx.request_id,
                peer_uid=self.conn.peer.uid if self.conn.peer else None,
                user=identity.user if identity else None,
            )

    async def _invoke(self) -> None:
        method = self.method
        if method is None:
            raise RpcError(StatusCode.UNIMPLEMENTED, f"unknown method {self.ctx.method}", reason="UNKNOWN_METHOD")
        if method.handler is None:
            raise RpcError(
                StatusCode.UNIMPLEMENTED,
                f"{self.ctx.method} is part of the API but not implemented by this server yet",
                reason="NOT_IMPLEMENTED_YET",
            )
        if self.event.message_encoding not in SUPPORTED_ENCODINGS:
            raise RpcError(
                StatusCode.UNIMPLEMENTED,
                f"unsupported message encoding {self.event.message_encoding!r}; this server accepts {ACCEPT_ENCODING}",
                reason="UNSUPPORTED_ENCODING",
            )
        server = self.conn.server
        if method.authenticated and server.authenticate is not None:
            await server.authenticate(self.ctx)
        if self.conn.refusal is not None and method.authenticated:
            raise self.conn.refusal
        admitted = (
            server.admission.call(self.ctx, method.client_streaming or method.server_streaming)
            if server.admission is not None and method.authenticated
            else nullcontext()
        )
        with admitted:
            await self._handle(method)

    async def _handle(self, method: Method) -> None:
        assert method.handler is not None
        if method.client_streaming:
            request: Any = self.requests()
        else:
            request = await self.receive()
            if request is None:
                raise RpcError(
                    StatusCode.INVALID_ARGUMENT, "the request message is missing", reason="MALFORMED_REQUEST"
                )
            if await self.receive() is not None:  # like grpc-core: the whole request, then the handler
                raise RpcError(
                    StatusCode.INVALID_ARGUMENT,
                    "more than one request message for a unary method",
                    reason="MALFORMED_REQUEST",
                )
        try:
            if method.server_streaming:
                responses = method.handler(request, self.ctx)
                if isinstance(responses, AbstractAsyncContextManager):
                    # a handler made with @trio.as_safe_channel: its generator runs in a task of
                    # its own, so it may yield from inside a nursery (a turn's concurrent parts)
                    async with responses as channel:
                        async for response in channel:
                            await self.send(response)
                    return
                try:
                    async for response in responses:
                        await self.send(response)
                finally:
                    await responses.aclose()
            else:
                await self.send(await method.handler(request, self.ctx), last=True)
        finally:
            if method.client_streaming:
                await request.aclose()

    def _close(self) -> None:
        """Forget the stream and give back the credit of every message nobody read."""
        conn = self.conn
        conn.calls.pop(self.sid, None)
        conn.proto.message_read_buffers.pop(self.sid, None)
        unread = sum(item.flow_controlled_length for item in self._inbox if item is not END)
        self._inbox.clear()
        if unread:
            conn.h2.acknowledge_received_data(unread, self.sid)
            conn.kick()


def _to_rpc_error(exc: BaseException, call: ServerCall) -> RpcError:
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, errors.AriaError):
        return from_exception(exc)
    if errors.is_disk_full(exc):  # wherever it came from: an answer, not an internal error
        log.warning("disk full", method=call.ctx.method, request_id=call.ctx.request_id, error=str(exc))
        return from_exception(errors.disk_full())
    if isinstance(exc, h2.exceptions.StreamClosedError):
        call._reset = True  # the client is gone; there is nobody to answer
        return RpcError(StatusCode.CANCELLED, "client went away")
    call.conn.server.stats["internal_errors"] += 1
    log.error("handler failed", method=call.ctx.method, request_id=call.ctx.request_id, exc_info=exc)
    return RpcError(StatusCode.INTERNAL, f"internal error (request id {call.ctx.request_id})", reason="INTERNAL")
