"""The one HTTP/1.1 front end of the operations endpoints (metrics, tap): h11 under Trio.

It routes GET and HEAD by path to handlers, and hands a websocket upgrade on one of its
`upgrades` paths over to the code that speaks websocket (the tap), with the request head
replayed. Written once so that both endpoints have the same bounds, and the same answers to
what breaks them.

Bounds, and what happens when one is hit:
- connections: at most `max_connections` at once (websocket clients included). One more is
  answered `busy_status` (503 for the tap, so a browser says why) or, with None, closed at once.
- a request's head and body: `max_request_bytes` read at most; beyond, 431 (the head alone is
  too large) or 413 (head and body), and the connection is closed. A head h11 cannot parse: its
  status hint (400), closed.
- time: each request must arrive and be answered within `timeout` seconds, the idle wait of a
  kept-alive connection included; else the connection is closed without an answer. A websocket
  client, once handed over, is bounded by its own handler instead.
- keep-alive: with `keep_alive`, a connection takes request after request (scrapers reuse it);
  without, every answer says `connection: close` and the connection ends after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus

import h11
import structlog
import trio

from aria_trio.shared.lifecycle import StartupError

log = structlog.get_logger("aria.http")

RECEIVE_SIZE = 16 * 1024
BUSY_TIMEOUT = 2.0  # seconds to tell a connection over the cap that we are busy; then it is closed


@dataclasses.dataclass(frozen=True)
class Response:
    """What a handler answers; the front end adds the length and the common headers, and leaves
    the body out for HEAD."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: Iterable[tuple[str, str]] = ()


Handler = Callable[[], Awaitable[Response]]


class Replay(trio.abc.Stream):
    """The connection handed to an upgrade: its first bytes are the request head again (a
    websocket library reads the handshake itself), then the socket's. `socket` is the socket
    stream, for its options."""

    def __init__(self, socket: trio.SocketStream, head: bytes) -> None:
        self.socket = socket
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            await trio.lowlevel.checkpoint()
            n = max_bytes or len(self._head)
            data, self._head = self._head[:n], self._head[n:]
            return data
        return await self.socket.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.socket.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.socket.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.socket.aclose()


Upgrade = Callable[[Replay], Awaitable[None]]


class HttpServer:
    """GET and HEAD of `routes` (paths, the query ignored) on `host:port` until cancelled; port 0:
    any free one, `port` is the real one once started. The bounds are the module's."""

    def __init__(
        self,
        name: str,
        port: int,
        routes: Mapping[str, Handler],
        *,
        upgrades: Mapping[str, Upgrade] | None = None,
        not_found: str = "not found\n",
        host: str = "127.0.0.1",
        max_connections: int,
        timeout: float = 10.0,
        max_request_bytes: int = 8192,
        keep_alive: bool = True,
        busy_status: int | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.host = host
        self.routes = {path.encode(): handler for path, handler in routes.items()}
        self.upgrades = {path.encode(): upgrade for path, upgrade in (upgrades or {}).items()}
        self.not_found = not_found.encode()
        self.max_connections = max_connections
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self.keep_alive = keep_alive
        self.busy_status = busy_status
        self.connections = 0  # open now (served, or handed over to an upgrade)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the port with task_status.started(port), serve until cancelled. A port
        that cannot be bound is a StartupError: the operator asked for that one."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise StartupError(f"cannot serve the {self.name} on {self.host}:{self.port}: {exc.strerror}") from None
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            paths = sorted(p.decode() for p in (*self.routes, *self.upgrades))
            log.info(f"{self.name} serving", url=f"http://{self.host}:{self.port}/", paths=paths)
            task_status.started(self.port)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One TCP connection. Never raises: whatever goes wrong ends this connection only (an
        exception here would end the whole server). trio closes the stream when this returns."""
        try:
            if self.connections >= self.max_connections:
                log.debug(f"{self.name}: too many connections; refused one")
                if self.busy_status is not None:
                    with trio.move_on_after(BUSY_TIMEOUT):
                        await stream.send_all(_busy(self.busy_status, self.name))
                return
            self.connections += 1
            try:
                await self._serve(stream)
            finally:
                self.connections -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.warning(f"{self.name} connection failed", exc_info=True)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request_bytes)
        while True:
            after: bool | Callable[[], Awaitable[None]] = False  # (the timeout: closed)
            with trio.move_on_after(self.timeout):
                after = await self._exchange(stream, conn)
            if after is True:
                conn.start_next_cycle()
            elif after is False:
                return
            else:
                await after()  # the upgrade's, outside the request's timeout: it has bounds of its own
                return

    async def _exchange(self, stream: trio.SocketStream, conn: h11.Connection) -> bool | Callable[[], Awaitable[None]]:
        """One request and its answer: whether the connection can take another, or the upgrade
        to run on it."""
        reader = _Reader(stream, conn, self.max_request_bytes)
        try:
            request = await reader.next_event()
            if not isinstance(request, h11.Request):
                return False  # closed (between requests: the usual end of a keep-alive connection)
            path = request.target.split(b"?", 1)[0]
            upgrade = _is_upgrade(request) and bool(self.upgrades)
            if upgrade and path in self.upgrades:
                head = _head(request) + conn.trailing_data[0]
                return functools.partial(self.upgrades[path], Replay(stream, head))
            while not isinstance(event := await reader.next_event(), h11.EndOfMessage):  # (a body: ignored)
                if isinstance(event, h11.ConnectionClosed):
                    return False
        except _TooLarge as exc:
            status, what = (431, b"request head too large\n") if exc.head else (413, b"request too large\n")
            await self._respond(stream, conn, Response(status, what), close=True)
            return False
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._respond(stream, conn, Response(exc.error_status_hint, b"bad request\n"), close=True)
            return False
        head_only = request.method == b"HEAD"
        handler = None if upgrade else self.routes.get(path)
        if handler is None:
            await self._respond(stream, conn, Response(404, self.not_found), head_only=head_only)
        elif request.method not in (b"GET", b"HEAD"):
            await self._respond(stream, conn, Response(405, b"GET or HEAD only\n", headers=[("allow", "GET, HEAD")]))
        else:
            await self._respond(stream, conn, await handler(), head_only=head_only)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _respond(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        r: Response,
        *,
        head_only: bool = False,
        close: bool = False,
    ) -> None:
        headers = [
            ("content-type", r.content_type),
            ("content-length", str(len(r.body))),
            ("cache-control", "no-store"),  # live numbers and a page that takes a key: never cached
            ("x-content-type-options", "nosniff"),
            *r.headers,
        ]
        if close or not self.keep_alive:
            headers.append(("connection", "close"))
        reason = HTTPStatus(r.status).phrase.encode()
        out = conn.send(h11.Response(status_code=r.status, headers=headers, reason=reason)) or b""
        if not head_only:
            out += conn.send(h11.Data(data=r.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)


class _TooLarge(Exception):
    def __init__(self, *, head: bool) -> None:
        self.head = head  # the head itself is too large (431), else the body (413)


class _Reader:
    """h11's events for one request, from at most `limit` bytes read (h11's own limit only
    applies to a head that arrives in pieces)."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, limit: int) -> None:
        self.stream = stream
        self.conn = conn
        self.room = limit

    async def next_event(self) -> object:
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            data = await self.stream.receive_some(RECEIVE_SIZE)  # b"": the client closed
            self.room -= len(data)
            self.conn.receive_data(data)
            if self.room < 0:
                raise _TooLarge(head=self._head_too_large())
        return event

    def _head_too_large(self) -> bool:
        """Over the limit: whether the head alone is (431) or only head and body together (413)."""
        if self.conn.their_state is not h11.IDLE:
            return False  # the head was taken within the limit already
        with contextlib.suppress(h11.RemoteProtocolError):
            self.conn.next_event()
        state: object = self.conn.their_state  # (moved on by next_event, which mypy cannot see)
        if state is not h11.SEND_BODY:
            return True  # still no complete head (or a broken one)
        unread, _ = self.conn.trailing_data  # (what follows the head)
        return self.room + len(unread) < 0


def _is_upgrade(request: h11.Request) -> bool:
    return any(name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers)


def _head(request: h11.Request) -> bytes:
    """The request head as the client sent it (h11 keeps the names' case), for the upgrade."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    lines += [name + b": " + value for name, value in request.headers.raw_items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _busy(status: int, name: str) -> bytes:
    """A whole answer to a connection over the cap, sent before (and without) reading its request."""
    body = f"too many connections to the {name}\n".encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode()),
        b"content-type: text/plain; charset=utf-8",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body
