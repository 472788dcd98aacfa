"""A gRPC client on a Unix socket: purerpc's protocol engine driven by Trio (the CLI, the Quilt link).

    async with Channel.connect(path) as channel:
        reply = await channel.unary("/pkg.Svc/M", request, Reply, timeout=5)
        async with channel.call("/pkg.Svc/Stream", Reply, timeout=60) as call:
            await call.send(request, end=True)
            async for reply in call: ...

Every call sends `grpc-timeout` and enforces it locally too (DEADLINE_EXCEEDED); a call left early
(an error, a cancel) sends RST_STREAM so the server's handler stops at once; a lost connection
fails every waiting call with UNAVAILABLE instead of hanging; the status details and trailing
metadata of a failed call are kept on the RpcError.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import h2.errors
import h2.exceptions
import trio
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, ResponseEnded, ResponseReceived, WindowUpdated
from purerpc.grpclib.exceptions import ProtocolError as PurerpcProtocolError

from aria_trio.rpc.protocol import ClientConnection, GoAway, StreamFailed, StreamReset
from aria_trio.rpc.status import RpcError, StatusCode

MiB = 1024 * 1024
RECEIVE_SIZE = 256 * 1024
# The socket's send buffer. On a Unix socket it is all the kernel holds between us and the
# server: at Linux's default (208 KiB) a 1 MiB message of an upload took five round trips of
# "write, wait for the server to read, wake up", each a scheduling delay of both processes. The
# kernel caps it at net.core.wmem_max (then it is what that allows); it is the kernel's memory,
# charged to the socket, and sending still waits for flow-control credit as before.
SEND_BUFFER = 4 * MiB
# Calls that may wait at once for one of the server's streams (past its
# SETTINGS_MAX_CONCURRENT_STREAMS): each waits under its own deadline; one more than this fails
# at once with RESOURCE_EXHAUSTED rather than queue without bound.
MAX_WAITING_CALLS = 10_000

R = TypeVar("R")
_END = object()


class Channel:
    def __init__(self, stream: trio.SocketStream, *, max_message_length: int, authority: str) -> None:
        self.stream = stream
        self.authority = authority
        self.max_message_length = max_message_length
        config = GRPCConfiguration(client_side=True, max_message_length=max_message_length)
        self.proto = ClientConnection(config, max_concurrent_streams=1024, connection_window=64 * MiB)
        self.h2 = self.proto.h2_connection
        self._calls: dict[int, ClientCall[Any]] = {}
        self._wake = trio.Event()
        self._lost: str | None = None  # why no new call can start
        self.closed = trio.Event()  # set once the connection is gone
        self._goaway_last: int | None = None
        self._stream_freed = trio.Event()  # set (and replaced) whenever a call lets go of its stream
        self._settings = trio.Event()  # the server's first SETTINGS came (its stream cap with it)
        self.waiting_calls = 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, path: str, *, max_message_length: int = 4 * MiB, authority: str = "localhost"
    ) -> AsyncIterator[Channel]:
        try:
            stream = await trio.open_unix_socket(path)
        except FileNotFoundError:
            raise RpcError(StatusCode.UNAVAILABLE, f"no server at {path} (is it running?)") from None
        except ConnectionRefusedError:
            raise RpcError(StatusCode.UNAVAILABLE, f"nothing is listening on {path} (a stale socket?)") from None
        except PermissionError:
            raise RpcError(StatusCode.PERMISSION_DENIED, f"not allowed to connect to {path}") from None
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        channel = cls(stream, max_message_length=max_message_length, authority=authority)
        channel.proto.initiate_connection()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel._read_loop)
                nursery.start_soon(channel._write_loop)
                try:
                    yield channel
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The loops never raise, so a group holds the caller's own error: give it back as is.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            channel._connection_lost("the channel was closed")  # calls still waiting (shielded ones) fail now
            with trio.CancelScope(shield=True):
                await stream.aclose()

    # -- I/O loops --------------------------------------------------------------------------------

    def kick(self) -> None:
        self._wake.set()

    async def _write_loop(self) -> None:
        try:
            while True:
                self._wake = trio.Event()
                data = self.proto.data_to_send()
                if data:
                    await self.stream.send_all(data)
                else:
                    await self._wake.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._connection_lost("connection to the server lost")

    async def _read_loop(self) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                for event in self.proto.receive_data(data):
                    self._dispatch(event)
                if self.proto.settings_seen and not self._settings.is_set():
                    self._settings.set()
                self.kick()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "connection to the server lost"
        except (h2.exceptions.ProtocolError, PurerpcProtocolError) as exc:
            reason = f"HTTP/2 protocol error from the server: {exc}"
            self.kick()
        self._connection_lost(reason)

    def _connection_lost(self, reason: str) -> None:
        self._lost = self._lost or reason
        self.closed.set()
        self._settings.set()  # (nobody waits for them any more)
        for call in list(self._calls.values()):
            call._fail(RpcError(StatusCode.UNAVAILABLE, reason))
        self._free_stream()

    async def ready(self) -> None:
        """Once the server's first SETTINGS came (or the connection is gone)."""
        await self._settings.wait()

    @property
    def usable(self) -> bool:
        return self._lost is None

    def free_streams(self) -> int:
        """Calls the server lets us start now: its SETTINGS_MAX_CONCURRENT_STREAMS less ours open."""
        return int(self.h2.remote_settings.max_concurrent_streams) - int(self.h2.open_outbound_streams)

    def _free_stream(self) -> None:
        self._stream_freed.set()
        self._stream_freed = trio.Event()

    async def _stream_slot(self) -> None:
        """Wait for a stream the server lets us open: a call past its cap queues here (under its
        deadline) instead of failing with h2's TooManyStreamsError."""
        while self._lost is None and self.free_streams() <= 0:
            if self.waiting_calls >= MAX_WAITING_CALLS:
                raise RpcError(StatusCode.RESOURCE_EXHAUSTED, "too many calls waiting for the server; try again")
            self.waiting_calls += 1
            try:
                with trio.move_on_after(1.0):  # (also sees a SETTINGS frame that raised the cap)
                    await self._stream_freed.wait()
            finally:
                self.waiting_calls -= 1

    def _dispatch(self, event: Any) -> None:
        kind = type(event)
        call = self._calls.get(getattr(event, "stream_id", 0))
        if kind is MessageReceived:
            if call is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                call._put(event)
        elif call is None:
            if kind is WindowUpdated and event.stream_id == 0:
                for c in self._calls.values():
                    c._window_opened()
            elif kind is GoAway:
                self._goaway(event)
        elif kind is ResponseReceived:
            call.initial_metadata = tuple(event.custom_metadata)
        elif kind is ResponseEnded:
            call.trailing_metadata = tuple(event.custom_metadata)
            code = StatusCode(event.status.int_value)
            if code is not StatusCode.OK:
                call._error = RpcError(
                    code,
                    event.status.status_message,
                    trailing_metadata=call.trailing_metadata,
                    details_bin=getattr(event, "status_details_bin", None),
                )
            call._put(_END)
        elif kind is WindowUpdated:
            call._window_opened()
        elif kind is StreamReset:
            if not call._ended:
                refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                call._fail(
                    RpcError(StatusCode.UNAVAILABLE, "the server refused the call (shutting down)")
                    if refused
                    else RpcError(StatusCode.INTERNAL, f"the server reset the stream (HTTP/2 error {event.error_code})")
                )
        elif kind is StreamFailed:
            call._fail(RpcError(event.code, event.message))

    def _goaway(self, event: GoAway) -> None:
        self._goaway_last = event.last_stream_id
        self._lost = self._lost or "the server is shutting down"
        for sid, call in list(self._calls.items()):
            if sid > event.last_stream_id:
                call._fail(RpcError(StatusCode.UNAVAILABLE, "the server is shutting down"))

    # -- calls ------------------------------------------------------------------------------------

    @asynccontextmanager
    async def call(
        self,
        path: str,
        response_type: type[R],
        *,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,
    ) -> AsyncIterator[ClientCall[R]]:
        """Open a call of any kind; leaving the block before the response ended cancels it. Past the
        server's stream cap the call waits for a stream, its deadline running."""
        deadline = trio.current_time() + timeout if timeout is not None else math.inf
        if not self._settings.is_set():
            # Until the server's SETTINGS come, its stream cap is unknown (and h2 assumes none):
            # calls wait for them, so that a burst of calls never opens more than it allows.
            with trio.move_on_at(deadline) as waited:
                await self._settings.wait()
            if waited.cancelled_caught:
                raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded (waiting for the server's settings)")
        if self._lost is None and self.free_streams() <= 0:
            with trio.move_on_at(deadline) as waited:
                await self._stream_slot()
            if waited.cancelled_caught:
                raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded (waiting for a free stream)")
        if self._lost is not None:
            raise RpcError(StatusCode.UNAVAILABLE, self._lost)
        service, method = path.strip("/").split("/")
        sid = self.h2.get_next_available_stream_id()
        call: ClientCall[R] = ClientCall(self, sid, response_type)
        self._calls[sid] = call
        td = datetime.timedelta(seconds=max(0.0, deadline - trio.current_time())) if timeout is not None else None
        try:
            self.proto.start_request(sid, "http", service, method, None, self.authority, td, "+proto", tuple(metadata))
            self.kick()
            with trio.fail_at(deadline):
                yield call
        except trio.TooSlowError:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        finally:
            self._calls.pop(sid, None)
            self.proto.message_read_buffers.pop(sid, None)
            stream = self.h2.streams.get(sid)
            if not call._ended or (stream is not None and not stream.closed):
                # Tell the server to stop working on it (purerpc's own client never does); and a
                # call the server ended before we finished sending must not keep its stream open
                # (half-closed), or it counts against the server's stream cap for ever.
                try:
                    self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
                self.kick()
            call._release_credit()
            self._free_stream()

    async def unary(
        self,
        path: str,
        request: Any,
        response_type: type[R],
        *,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,
    ) -> R:
        async with self.call(path, response_type, metadata=metadata, timeout=timeout) as call:
            await call.send(request, end=True)
            return await call.single()

    async def stream_unary(
        self,
        path: str,
        requests: AsyncIterator[Any],
        response_type: type[R],
        *,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,
    ) -> R:
        async with self.call(path, response_type, metadata=metadata, timeout=timeout) as call:
            async for request in requests:
                await call.send(request)
            await call.done_writing()
            return await call.single()


class ClientCall(Generic[R]):
    def __init__(self, channel: Channel, sid: int, response_type: type[R]) -> None:
        self.channel = channel
        self.sid = sid
        self.response_type = response_type
        self.initial_metadata: tuple[tuple[str, Any], ...] = ()
        self.trailing_metadata: tuple[tuple[str, Any], ...] = ()
        self._inbox: deque[Any] = deque()
        self._waiter: trio.Event | None = None
        self._window: trio.Event | None = None
        self._error: RpcError | None = None
        self._ended = False
        self._half_closed = False

    # -- from the reader --------------------------------------------------------------------------

    def _put(self, item: Any) -> None:
        # Bounded in bytes by the stream's flow-control window, like the server's inbox.
        if item is _END:
            self._ended = True
        self._inbox.append(item)
        if self._waiter is not None:
            self._waiter.set()

    def _fail(self, error: RpcError) -> None:
        if not self._ended:
            self._error = self._error or error
            self._put(_END)
        self._window_opened()

    def _window_opened(self) -> None:
        if self._window is not None:
            self._window.set()

    def _release_credit(self) -> None:
        unread = sum(e.flow_controlled_length for e in self._inbox if e is not _END)
        self._inbox.clear()
        if unread:
            try:
                self.channel.h2.acknowledge_received_data(unread, self.sid)
            except h2.exceptions.ProtocolError:
                pass
            self.channel.kick()

    # -- the caller's side ------------------------------------------------------------------------

    async def send(self, message: Any, *, end: bool = False) -> None:
        """Send one request message (and half-close after it when `end`)."""
        if self._error is not None:
            raise self._error
        data = message.SerializeToString()
        if len(data) > self.channel.max_message_length:
            raise RpcError(StatusCode.RESOURCE_EXHAUSTED, "request larger than the maximum message size")
        prefix = struct.pack(">?I", False, len(data))
        proto = self.channel.proto
        payload = memoryview(b"")
        if proto.flow_control_window(self.sid) >= len(prefix) + len(data):  # one frame: no join
            try:
                proto.h2_connection.send_data(self.sid, data, end_stream=end, prefix=prefix)
            except h2.exceptions.ProtocolError:  # the stream closed, or the connection (its peer gone)
                raise self._error or RpcError(StatusCode.UNAVAILABLE, "the server closed the call") from None
            self.channel.kick()
        else:
            payload = memoryview(prefix + data)
        while payload:
            window = proto.flow_control_window(self.sid)
            if window <= 0:
                self._window = trio.Event()
                await self._window.wait()
                self._window = None
                if self._error is not None:
                    raise self._error
                continue
            chunk, payload = payload[:window], payload[window:]
            try:
                proto.send_data(self.sid, chunk, end_stream=end and not payload)  # (copied once, into what is to send)
            except h2.exceptions.ProtocolError:  # the stream closed, or the connection (its peer gone)
                raise self._error or RpcError(StatusCode.UNAVAILABLE, "the server closed the call") from None
            self.channel.kick()
        self._half_closed = self._half_closed or end
        await trio.lowlevel.checkpoint()

    async def done_writing(self) -> None:
        if not self._half_closed:
            self._half_closed = True
            try:
                self.channel.proto.end_request(self.sid)
            except Exception:
                pass  # the server already ended the call; receive() reports how
            self.channel.kick()
        await trio.lowlevel.checkpoint()

    @property
    def waiting(self) -> bool:
        """Has a message (or the end) already arrived, so receive() would not wait?"""
        return bool(self._inbox)

    async def receive(self) -> R | None:
        """The next response, or None once the server ended the call with OK."""
        while not self._inbox:
            self._waiter = trio.Event()
            await self._waiter.wait()
            self._waiter = None
        item = self._inbox[0]
        if item is _END:
            if self._error is not None:
                raise self._error
            return None
        self._inbox.popleft()
        self.channel.h2.acknowledge_received_data(item.flow_controlled_length, self.sid)
        self.channel.kick()
        return self.response_type.FromString(item.data)  # type: ignore[attr-defined, no-any-return]

    async def single(self) -> R:
        response = await self.receive()
        if response is None:
            raise RpcError(StatusCode.INTERNAL, "the server sent no response message")
        if await self.receive() is not None:
            raise RpcError(StatusCode.INTERNAL, "the server sent more than one response message")
        return response

    def __aiter__(self) -> ClientCall[R]:
        return self

    async def __anext__(self) -> R:
        response = await self.receive()
        if response is None:
            raise StopAsyncIteration
        return response
