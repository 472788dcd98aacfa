"""A gRPC server on a Unix socket: purerpc's protocol engine driven by Trio.

One task reads the socket and feeds the protocol engine, one task writes whatever the engine has
to send, and every call runs in its own task inside the connection's nursery, under its own
cancel scope. That scope is how a call ends early: the client's deadline (DEADLINE_EXCEEDED), the
client's RST_STREAM or disconnect (nothing to send), a message that could not be read (its own
status), or shutdown (UNAVAILABLE). Whatever ends a call, its unread messages are acknowledged so
the connection's flow-control credit comes back.

Bounds, and what happens at each:
* message size (`max_message_length`, 4 MiB): a larger request fails that call with
  RESOURCE_EXHAUSTED; a larger response fails it with RESOURCE_EXHAUSTED too.
* concurrent streams per connection (`max_concurrent_streams`): advertised in SETTINGS; clients
  queue further calls (a peer that ignores the setting gets a connection error from h2).
* connections (`max_connections`): further clients wait in the listen backlog until one closes.
* buffered request bytes: per stream, the HTTP/2 window (2x the largest message); per connection,
  `connection_window`. A client sending faster than its handler reads simply waits for credit.

Here: the listener and shutdown (`Server`), and each client's connection, its reader and writer
(`Connection`). A call is server_call.py's, the methods it routes to methods.py's, and the
protocol engine each connection drives protocol.py's.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import h2.connection
import h2.errors
import h2.exceptions
import structlog
import trio
from google.protobuf.descriptor import ServiceDescriptor
from hyperframe.frame import GoAwayFrame
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived, WindowUpdated
from purerpc.grpclib.exceptions import ProtocolError as PurerpcProtocolError

from aria_trio.rpc.context import CallContext, PeerCred
from aria_trio.rpc.methods import Method, methods_of
from aria_trio.rpc.protocol import BadRequestHeaders, ServerConnection, StreamFailed, StreamReset
from aria_trio.rpc.server_call import END, ServerCall
from aria_trio.rpc.status import StatusCode
from aria_trio.shared import errors

log = structlog.get_logger("aria.rpc")

RECEIVE_SIZE = 256 * 1024
MiB = 1024 * 1024

Authenticate = Callable[[CallContext], Awaitable[None]]


class CallMetrics(Protocol):
    """Told about every call, if the server has one (aria_trio.runtime.operations.metrics.RpcMetrics does). `path` is
    the registered method's, or None for a method that does not exist (its name is the client's
    to choose, so it must not become a label)."""

    def call_started(self, path: str | None) -> None: ...

    def call_ended(self, path: str | None, code: str, seconds: float) -> None: ...


class Admission(Protocol):
    """What the server asks before serving a connection or a call (the runtime's quotas)."""

    def connection(self, peer: PeerCred | None) -> AbstractContextManager[errors.AriaError | None]:
        """Held while the connection lives; yields the error every call on it gets, or None."""
        ...

    def call(self, ctx: CallContext, streaming: bool) -> AbstractContextManager[None]:
        """Held while an authenticated call runs; raises a domain error to refuse it."""
        ...


def peer_credentials(sock: trio.socket.SocketType) -> PeerCred | None:
    try:
        if sock.family != socket.AF_UNIX:
            return None
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return PeerCred(*struct.unpack("3i", raw))
    except OSError:
        return None


class Server:
    def __init__(
        self,
        *,
        max_message_length: int = 4 * MiB,
        max_concurrent_streams: int = 128,
        max_connections: int = 256,
        connection_window: int = 64 * MiB,
        error_domain: str = "aria.v1",
        authenticate: Authenticate | None = None,
        metrics: CallMetrics | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.max_message_length = max_message_length
        self.max_concurrent_streams = max_concurrent_streams
        self.max_connections = max_connections
        self.connection_window = max(connection_window, 2 * max_message_length + 5)
        self.error_domain = error_domain
        self.authenticate = authenticate
        self.metrics = metrics
        self.admission = admission
        self.methods: dict[str, Method] = {}
        self.path: str | None = None
        self._connections: set[Connection] = set()
        self._listener: trio.SocketListener | None = None
        self._accept_scope = trio.CancelScope()
        self._shutting_down = False
        self._active_calls = 0
        self._idle = trio.Event()
        self.stats = {"connections": 0, "calls": 0, "internal_errors": 0}

    # -- registration -----------------------------------------------------------------------------

    def add_methods(self, methods: Iterable[Method]) -> None:
        for m in methods:
            if m.path in self.methods:
                raise ValueError(f"{m.path} registered twice")
            self.methods[m.path] = m

    def add_service(
        self, descriptor: ServiceDescriptor, impl: object, *, aliases: Iterable[str] = (), authenticated: bool = True
    ) -> None:
        """Serve `impl` as `descriptor.full_name` and under each alias (e.g. a legacy package)."""
        for name in (descriptor.full_name, *aliases):
            self.add_methods(methods_of(descriptor, impl, service_name=name, authenticated=authenticated))

    @property
    def service_names(self) -> list[str]:
        return sorted({path.split("/")[1] for path in self.methods})

    # -- listening --------------------------------------------------------------------------------

    async def serve(
        self, path: str, *, mode: int = 0o600, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on `path` until shutdown() (or cancellation); the socket file goes with us."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _unlink_socket(path)  # the caller made sure no live server owns it
            await sock.bind(path)
            os.chmod(path, mode)
            sock.listen(min(socket.SOMAXCONN, 1024))
        except BaseException:
            sock.close()
            raise
        identity = os.stat(path)
        self.path = path
        self._listener = trio.SocketListener(sock)
        slots = trio.Semaphore(self.max_connections)
        try:
            async with trio.open_nursery() as nursery:
                with self._accept_scope:
                    task_status.started()
                    while True:
                        await slots.acquire()  # at the cap, new clients wait in the backlog
                        try:
                            stream = await self._listener.accept()
                        except trio.ClosedResourceError:
                            slots.release()
                            break
                        except OSError as exc:  # EMFILE and friends: back off, keep serving
                            slots.release()
                            log.warning("accept failed", error=os.strerror(exc.errno or 0))
                            await trio.sleep(0.1)
                            continue
                        nursery.start_soon(self._serve_connection, stream, slots)
                await self._close_listener(identity)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_listener(identity)

    async def _close_listener(self, identity: os.stat_result | None = None) -> None:
        if self._listener is not None:
            await self._listener.aclose()
        if self.path is not None and identity is not None:
            try:
                st = os.stat(self.path)
                if (st.st_ino, st.st_dev) == (identity.st_ino, identity.st_dev):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _serve_connection(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        self.stats["connections"] += 1
        conn = Connection(self, stream)
        self._connections.add(conn)
        try:
            admitted = self.admission.connection(conn.peer) if self.admission is not None else nullcontext(None)
            with admitted as refusal:
                conn.refusal = refusal
                await conn.run()
        finally:
            self._connections.discard(conn)
            slots.release()

    # -- shutdown ---------------------------------------------------------------------------------

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, let unary and client-streaming calls finish within `grace` seconds,
        end server streams at once, then everything left, with UNAVAILABLE; close connections."""
        self._shutting_down = True
        self._accept_scope.cancel()
        if self._listener is not None:
            await self._listener.aclose()  # new clients: connection refused from now on
        for conn in list(self._connections):
            conn.goaway()
            conn.abort_calls(StatusCode.UNAVAILABLE, "server shutting down", streams_only=True)
        with trio.move_on_after(grace):
            await self._wait_idle()
        for conn in list(self._connections):
            conn.abort_calls(StatusCode.UNAVAILABLE, "server shutting down")
        with trio.move_on_after(1.0):
            await self._wait_idle()
        for conn in list(self._connections):
            conn.close()

    async def _wait_idle(self) -> None:
        if self._active_calls:
            await self._idle.wait()

    def _call_started(self) -> None:
        self._active_calls += 1
        self.stats["calls"] += 1

    def _call_ended(self) -> None:
        self._active_calls -= 1
        if self._active_calls == 0 and self._shutting_down:
            self._idle.set()


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        else:
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    except FileNotFoundError:
        pass


HANDSHAKE_TIMEOUT = 10.0  # seconds a new connection has for its preface and first SETTINGS
CLOSE_FLUSH = 1.0  # seconds the writer gets to send a GOAWAY before a broken connection closes
OVER_QUOTA_GRACE = 5.0  # seconds a connection over its user's quota is answered before it closes


class Connection:
    """One client's connection: the socket's reader and writer around its protocol engine, the
    calls it carries (each in its own task, in this connection's nursery), its GOAWAY."""

    def __init__(self, server: Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer_credentials(stream.socket)
        config = GRPCConfiguration(client_side=False, max_message_length=server.max_message_length)
        self.proto = ServerConnection(
            config,
            max_concurrent_streams=server.max_concurrent_streams,
            connection_window=server.connection_window,
        )
        self.h2 = self.proto.h2_connection
        self.calls: dict[int, ServerCall] = {}
        self._fd = stream.socket.fileno()
        self._backlog = b""  # bytes the socket did not take yet; only the writer sends them
        self._writer_busy = False
        self._wake = trio.Event()
        self._closing = False
        self._goaway_last: int | None = None
        self._nursery: trio.Nursery | None = None
        self.refusal: errors.AriaError | None = None  # set: every call on this connection gets it

    def kick(self) -> None:
        """Wake the writer: the protocol engine has bytes to send."""
        self._wake.set()

    def flush(self) -> None:
        """Send what the protocol engine has now, from this task, if the socket takes it.

        Saves the writer task a wake-up per call (a scheduler round on the critical path). Bytes
        the socket does not take at once, or any while the writer is busy, go through the writer,
        so the order on the wire is kept."""
        if self._writer_busy or self._backlog or self._closing:
            self.kick()
            return
        data = self.proto.data_to_send()
        if not data:
            return
        try:
            sent = os.write(self._fd, data)  # the socket is non-blocking (trio made it so)
        except OSError:  # full (EAGAIN) or broken: the writer waits, or finds out and closes
            sent = 0
        if sent < len(data):
            self._backlog = data[sent:]
            self.kick()

    async def run(self) -> None:
        self.proto.initiate_connection()
        if self.server._shutting_down:
            self.goaway()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._deadlines)
                await self._read_loop()
                if self._closing:  # a protocol error: the writer sends its GOAWAY, then ends it all
                    with trio.move_on_after(CLOSE_FLUSH):
                        await trio.sleep_forever()
                # The peer is gone (or broke the protocol): no call can answer any more.
                nursery.cancel_scope.cancel()
        except Exception:
            log.warning("connection ended with an error", exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _deadlines(self) -> None:
        """A peer that has not sent its preface and SETTINGS within HANDSHAKE_TIMEOUT is not a
        client: it would hold a connection slot for ever. One over its user's connection quota is
        answered (every call gets the quota's error) for OVER_QUOTA_GRACE seconds, then closed."""
        await trio.sleep(HANDSHAKE_TIMEOUT if self.refusal is None else min(HANDSHAKE_TIMEOUT, OVER_QUOTA_GRACE))
        if not self.proto.settings_seen:
            log.info("closed a connection that never finished its handshake", timeout_s=HANDSHAKE_TIMEOUT)
            self.close_now()
            return
        if self.refusal is not None:
            self.goaway()
            self.close()

    def close_now(self) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        # Reads the non-blocking socket directly and waits for readability only when it is empty:
        # the same as SocketStream.receive_some, without its layers, on the path of every call.
        fd = self._fd
        busy = 0  # batches read without waiting: a peer that never pauses must not starve the rest
        while True:
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                busy = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError:  # ECONNRESET and friends: the peer is gone
                return
            if not data:
                return
            try:
                events = self.proto.receive_data(data)
            except (h2.exceptions.ProtocolError, PurerpcProtocolError) as exc:
                # h2 has queued a GOAWAY (not for a bad preface: then we do); the writer sends
                # it, then the connection closes.
                log.info("connection closed: HTTP/2 protocol error from peer", error=repr(exc)[:500])
                if self.h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                    frame = GoAwayFrame(
                        stream_id=0,
                        last_stream_id=self.h2.highest_inbound_stream_id,
                        error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR,
                    )
                    self.h2._data_to_send += frame.serialize()
                self.close()
                return
            for event in events:
                self._dispatch(event)
            self.flush()
            if len(data) < RECEIVE_SIZE:
                # A short read emptied the socket: wait for more rather than make a read that
                # would only say EAGAIN (if more came meanwhile, the wait returns at once).
                busy = 0
                await trio.lowlevel.wait_readable(fd)
                continue
            busy += 1
            if busy >= 4:
                busy = 0
                await trio.lowlevel.checkpoint()

    async def _write_loop(self) -> None:
        try:
            while True:
                self._wake = trio.Event()
                data = self.proto.data_to_send()
                if self._backlog:  # (before what came since: the order on the wire is kept)
                    data = self._backlog + data
                self._backlog = b""
                if data:
                    self._writer_busy = True
                    await self.stream.send_all(data)
                    self._writer_busy = False
                elif self._closing:
                    break
                else:
                    await self._wake.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    def _dispatch(self, event: Any) -> None:
        kind = type(event)
        if kind is MessageReceived or kind is RequestEnded:
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.put(event if kind is MessageReceived else END)
            elif kind is MessageReceived:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif kind is RequestReceived:
            self._start_call(event)
        elif kind is WindowUpdated:
            if event.stream_id == 0:
                for call in self.calls.values():
                    call.window_opened()
            elif (call := self.calls.get(event.stream_id)) is not None:
                call.window_opened()
        elif kind is StreamReset:
            if (call := self.calls.get(event.stream_id)) is not None:
                call.reset_by_peer()
        elif kind is StreamFailed:
            if (call := self.calls.get(event.stream_id)) is not None:
                call.abort(event.code, event.message)
        elif kind is BadRequestHeaders:
            log.info("refused a malformed request", stream_id=event.stream_id, reason=event.reason)
            self._reset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass
        self.proto.message_read_buffers.pop(stream_id, None)

    def _start_call(self, event: RequestReceived) -> None:
        if self._goaway_last is not None and event.stream_id > self._goaway_last:
            self._reset(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)  # clients retry these
            return
        assert self._nursery is not None
        call = ServerCall(self, event)
        self.calls[event.stream_id] = call
        self.server._call_started()
        self._nursery.start_soon(call.run)

    def goaway(self) -> None:
        """Tell the client no new calls will be taken; calls already started go on.

        h2 3.x's close_connection() moves its state machine to CLOSED, after which every frame of
        the in-flight calls is a protocol error, so the frame is queued directly instead."""
        if self._goaway_last is not None:
            return
        self._goaway_last = self.h2.highest_inbound_stream_id
        frame = GoAwayFrame(stream_id=0, last_stream_id=self._goaway_last, error_code=0)
        self.h2._data_to_send += frame.serialize()
        self.kick()

    def abort_calls(self, code: StatusCode, message: str, *, streams_only: bool = False) -> None:
        for call in list(self.calls.values()):
            if not streams_only or (call.method is not None and call.method.server_streaming):
                call.abort(code, message)

    def close(self) -> None:
        """Send what is queued, then close the connection."""
        self._closing = True
        self.kick()
