"""The websocket notification tap and its dashboard page, on 127.0.0.1:<port>.

One TCP port serves both, through the operations' HTTP front end (operations/http.py): a plain
`GET /` answers the dashboard (operations/dashboard.html), and a websocket upgrade on `/ws` is a
client of the tap. trio-websocket cannot answer a request that is not an upgrade (wsproto refuses
it before any handler sees it), so the front end reads the request head with h11 and, for an
upgrade, hands the connection over with the head replayed into trio-websocket's handshake.

The protocol (one JSON object per websocket text message; protobuf messages in the protobuf JSON
mapping with proto field names, default values included, 64-bit integers as numbers):

- client, first message, within `auth_timeout`: `{"api_key": "...", "after_sequence": 12,
  "event_types": ["task_status"]}` (the last two optional: resume after that sequence number; only
  those kinds). Answered `{"ok": true, "user": "..."}` once subscribed, else closed with 1008 and a
  reason. The key is never in the URL (nor in a log line).
- server: each notification of that user, as the aria.v1.Notification object itself (it has "id"
  and "sequence"), in sequence order, each once, resumable like the gRPC stream.
- client commands, each an object with one key; answers are objects with one key:
  `{"follow_task": id}` -> `{"task_output": TaskOutput}`... then `{"follow_ended": {"task_id"}}`;
  `{"unfollow_task": id}`; `{"get_task": id}` -> `{"task": Task}`;
  `{"list_tasks": {"page_size": n}}` -> `{"tasks": [Task...], "next_page_token": ""}`;
  anything wrong -> `{"error": {"code", "reason", "message", "command", "task_id"?}}` (the
  connection stays open; another user's task is NOT_FOUND, as over gRPC).

Origins: a browser page may connect only when served by the tap itself (http://127.0.0.1:<port>,
http://localhost:<port>); a client that sends no Origin is a tool, not a page, and is let in (it
still needs an API key). Anything else is 403 at the handshake, "null" included: it is what a
page opened from disk sends, but also what any site's sandboxed iframe or data: page sends.

Bounds, and what happens when one is hit:
- connections: MAX_CONNECTIONS at once (pages and clients); more are answered 503 and closed.
- a request: MAX_REQUEST bytes within HEAD_TIMEOUT seconds (the front end's bounds: else 431, 413
  or 400, or closed); one request per connection (`connection: close`). The websocket handshake
  that follows: within HEAD_TIMEOUT, its answer within `send_timeout`; else closed.
- authentication: the first message within `auth_timeout`; else closed with 1008.
- client messages: MAX_CLIENT_MESSAGE bytes (else trio-websocket closes with 1009), INBOX of them
  queued, handled one at a time (while one is handled, the client's further messages wait).
- outgoing: OUTBOX messages per client. When it is full, that client's producers wait: its
  notification subscription then overflows into a catch-up from the store (the broadcaster's own
  rule, as for the gRPC stream), and task output is read from the store only as fast as it is sent.
  Nothing a client does makes a publisher or another client wait.
- a send, or a ping's answer, that takes longer than `send_timeout`: the client is dropped (its
  socket closed at once; it may reconnect and resume with after_sequence). The kernel's send
  buffer per client is SEND_BUFFER bytes.
- followed tasks: MAX_FOLLOWS per client; more get an error message.
- every `heartbeat` seconds a client is pinged and its key checked again: a revoked key ends it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from importlib import resources
from typing import cast

import structlog
import trio
from google.protobuf import json_format
from google.protobuf.message import Message
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream

from aria_trio.proto.aria.v1 import notification_pb2
from aria_trio.runtime.operations.http import HttpServer, Replay, Response
from aria_trio.runtime.services import convert
from aria_trio.runtime.work.notifications import KINDS, Notifications
from aria_trio.runtime.work.tasks import OutputItem, Tasks
from aria_trio.shared import errors, json_input
from aria_trio.shared.json_input import JSON

log = structlog.get_logger("aria.tap")

MAX_CONNECTIONS = 64
MAX_REQUEST = 8 * 1024  # bytes of an HTTP request (a browser's handshake is well under 1 KiB)
HEAD_TIMEOUT = 10.0  # seconds to send the request head (and again to finish the websocket handshake)
MAX_CLIENT_MESSAGE = 16 * 1024  # bytes; commands are small
INBOX = 4  # client messages trio-websocket queues before it stops reading that client's socket
OUTBOX = 32  # messages waiting to be sent to one client
SEND_BUFFER = 256 * 1024  # SO_SNDBUF of each connection: what the kernel holds for a slow client
MAX_FOLLOWS = 8  # tasks one client follows at once
MAX_KEY = 512  # characters of an API key
MAX_PAGE = 200  # tasks in one list_tasks answer
MAX_ID = 128  # characters of a task id
MAX_SEQUENCE = 2**63 - 1  # (SQLite's integers)
SEND_TIMEOUT = 10.0
HEARTBEAT = 20.0
CLOSE_TIMEOUT = 2.0  # seconds for the closing handshake; then the socket is closed anyway
WS_PATH = "/ws"
NORMAL, POLICY, INTERNAL = 1000, 1008, 1011  # websocket close codes
CLOSE_REASON_BYTES = 123  # the most a close frame carries

VerifyKey = Callable[[str], Awaitable[str | None]]


class _Refused(Exception):
    """End a client: close with `code` and `reason` (code None: the client is gone, just hang up)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason.encode()[:CLOSE_REASON_BYTES].decode(errors="ignore")


class Tap:
    """The tap's server: serves until cancelled. `port` 0 picks a free port (tests); the daemon
    starts the tap only for a port it was given."""

    def __init__(
        self,
        port: int,
        notifications: Notifications,
        tasks: Tasks,
        verify_key: VerifyKey,
        *,
        host: str = "127.0.0.1",
        auth_timeout: float = 10.0,
        send_timeout: float = SEND_TIMEOUT,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.notifications = notifications
        self.tasks = tasks
        self.verify_key = verify_key
        self.auth_timeout = auth_timeout
        self.send_timeout = send_timeout
        self.heartbeat = heartbeat
        self.clients = 0  # authenticated websocket clients
        self.dropped = 0  # clients dropped for not reading (a counter, for tests and metrics)
        self._page = b""
        self._http = HttpServer(
            "tap",
            port,
            dict.fromkeys(("/", "/index.html", "/dashboard.html"), self._dashboard),
            upgrades={WS_PATH: self._websocket},
            not_found="not found: the dashboard is at /, the websocket at /ws\n",
            host=host,
            max_connections=MAX_CONNECTIONS,
            timeout=HEAD_TIMEOUT,
            max_request_bytes=MAX_REQUEST,
            keep_alive=False,  # (a page is one request; a websocket client keeps its connection anyway)
            busy_status=503,
        )

    @property
    def port(self) -> int:
        """The real one once run() has started."""
        return self._http.port

    @port.setter
    def port(self, port: int) -> None:
        self._http.port = port

    @property
    def host(self) -> str:
        return self._http.host

    @property
    def connections(self) -> int:
        """TCP connections open (page requests and websocket clients)."""
        return self._http.connections

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the port with task_status.started(port), serve until cancelled; a port
        that cannot be bound is a StartupError."""
        self._page = await trio.to_thread.run_sync(_read_page)
        await self._http.run(task_status=task_status)

    # -- the page -----------------------------------------------------------------------------------

    async def _dashboard(self) -> Response:
        port = str(self.port)
        csp = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
            f"connect-src 'self' ws://127.0.0.1:{port} ws://localhost:{port}; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        headers = [
            ("content-security-policy", csp),
            ("x-frame-options", "DENY"),  # the page takes an API key: never inside another page
            ("referrer-policy", "no-referrer"),
        ]
        return Response(200, self._page, content_type="text/html; charset=utf-8", headers=headers)

    # -- a websocket client ---------------------------------------------------------------------------

    async def _websocket(self, stream: Replay) -> None:
        """A connection the front end handed over: an upgrade on /ws, its head to be read again."""
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        async with trio.open_nursery() as nursery:  # trio-websocket's reader task for this client
            request: WebSocketRequest | None = None
            with trio.move_on_after(HEAD_TIMEOUT):
                request = await wrap_server_stream(
                    nursery, stream, message_queue_size=INBOX, max_message_size=MAX_CLIENT_MESSAGE
                )
            try:
                if request is not None:  # (None: wsproto refused the handshake itself)
                    ws = await self._handshake(request)
                    if ws is not None:
                        await self._client(ws)
            finally:
                nursery.cancel_scope.cancel()

    async def _handshake(self, request: WebSocketRequest) -> WebSocketConnection | None:
        """Accept, or answer 403 (a page of another origin). (Another path than /ws: the front end's 404.)"""
        origin = _header(request.headers, b"origin")
        origins = {f"http://{h}:{self.port}" for h in (self.host, "127.0.0.1", "localhost")}
        with trio.move_on_after(self.send_timeout):
            if origin is not None and origin not in origins:
                log.warning("tap refused a page of another origin", origin=origin[:200])
                await request.reject(
                    403, extra_headers=[(b"content-type", b"text/plain; charset=utf-8")], body=b"origin not allowed\n"
                )
                return None
            return await request.accept()
        return None  # it did not even read our answer

    async def _client(self, ws: WebSocketConnection) -> None:
        close: tuple[int | None, str] = (NORMAL, "")
        try:
            key, kinds, after = await self._authentication(ws)
            try:
                user = await self.verify_key(key)
            except Exception:
                log.exception("tap: checking an API key failed")
                raise _Refused(INTERNAL, "cannot check the API key now; try again") from None
            if user is None:
                log.info("tap refused an invalid API key")
                raise _Refused(POLICY, "invalid API key")
            session = _Session(self, ws, user, key)
            self.clients += 1
            try:
                await session.run(kinds, after)
            finally:
                self.clients -= 1
            close = session.close
        except _Refused as exc:
            close = (exc.code, exc.reason)
        except Exception:
            log.exception("tap client failed")
            close = (INTERNAL, "internal error")
        code, reason = close
        if code is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await ws.aclose(code, reason)

    async def _authentication(self, ws: WebSocketConnection) -> tuple[str, list[str], int | None]:
        with trio.move_on_after(self.auth_timeout):
            try:
                return _auth_request(await ws.get_message())
            except ConnectionClosed:
                raise _Refused(None) from None
        log.info("tap client sent no authentication in time", timeout_s=self.auth_timeout)
        raise _Refused(POLICY, f"no authentication within {self.auth_timeout:g} s")


class _Session:
    """One authenticated client: its subscription, outbox, commands, followed tasks, heartbeat.
    Every task of it runs in its nursery; ending the client cancels them all."""

    def __init__(self, tap: Tap, ws: WebSocketConnection, user: str, key: str) -> None:
        self.tap = tap
        self.ws = ws
        self.user = user
        self._key = key  # to check it again at each heartbeat (a revoked key ends the client)
        self.outbox, self._outbox = trio.open_memory_channel[str](OUTBOX)
        self.follows: dict[str, trio.CancelScope] = {}
        self.close: tuple[int | None, str] = (NORMAL, "")  # None: hang up without a closing handshake
        self._nursery: trio.Nursery | None = None

    async def run(self, kinds: list[str], after: int | None) -> None:
        async with self.tap.notifications.subscription(self.user, kinds, after) as events:
            self.outbox.send_nowait(_dumps({"ok": True, "user": self.user}))  # (subscribed: nothing missed)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._events, events)
                nursery.start_soon(self._commands)
                nursery.start_soon(self._heartbeat)

    def end(self, code: int | None, reason: str = "") -> None:
        assert self._nursery is not None
        if not self._nursery.cancel_scope.cancel_called:
            self.close = (code, reason)
        self._nursery.cancel_scope.cancel()

    def _drop(self, why: str) -> None:
        self.tap.dropped += 1
        log.warning("tap dropped a client that does not read", user=self.user, why=why)
        self.end(None)  # a send may have stopped halfway: the socket can only be closed

    async def _writer(self) -> None:
        async for text in self._outbox:
            with trio.move_on_after(self.tap.send_timeout) as scope:
                try:
                    await self.ws.send_message(text)
                except ConnectionClosed:
                    self.end(None)
                    return
            if scope.cancelled_caught:
                self._drop(f"a send took longer than {self.tap.send_timeout:g} s")
                return

    async def _events(self, events: AsyncIterator[notification_pb2.Notification]) -> None:
        async with aclosing(cast("AsyncGenerator[notification_pb2.Notification, None]", events)) as stream:
            async for n in stream:
                await self.outbox.send(_dumps(_as_json(n)))  # full: the subscription falls behind, catches up

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.tap.heartbeat)
            with trio.move_on_after(self.tap.send_timeout) as scope:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    self.end(None)
                    return
            if scope.cancelled_caught:
                self._drop(f"no answer to a ping within {self.tap.send_timeout:g} s")
                return
            try:
                user = await self.tap.verify_key(self._key)
            except Exception:
                log.exception("tap: checking an API key again failed; keeping the client")
                continue
            if user != self.user:
                self.end(POLICY, "API key revoked")
                return

    # -- commands ---------------------------------------------------------------------------------

    async def _commands(self) -> None:
        while True:
            try:
                raw = await self.ws.get_message()
            except ConnectionClosed:
                self.end(None)  # the client closed (or trio-websocket closed it: 1009)
                return
            await self._command(raw)

    async def _command(self, raw: str | bytes) -> None:
        name, argument = "", None
        try:
            try:
                message = json_input.loads(raw)
            except ValueError:  # (16 KiB of "[[[[..." is too deep: a ValueError too)
                raise errors.InvalidArgument("a command must be a JSON object") from None
            if not isinstance(message, dict) or len(message) != 1:
                raise errors.InvalidArgument(
                    "a command is an object with one key: follow_task, unfollow_task, get_task or list_tasks"
                )
            ((name, argument),) = message.items()
            if name == "follow_task":
                self._follow(_task_id(argument))
            elif name == "unfollow_task":
                scope = self.follows.pop(_task_id(argument), None)
                if scope is not None:
                    scope.cancel()
            elif name == "get_task":
                row = await self.tap.tasks.get(self.user, _task_id(argument))
                await self.outbox.send(_dumps({"task": _as_json(convert.task(row))}))
            elif name == "list_tasks":
                await self._list_tasks(argument)
            else:
                raise errors.InvalidArgument(f"unknown command {str(name)[:40]!r}")
        except errors.AriaError as exc:
            await self._error(name, exc, argument if name in ("follow_task", "get_task") else None)

    async def _list_tasks(self, argument: object) -> None:
        argument = argument or {}
        size = argument.get("page_size", 50) if isinstance(argument, dict) else None
        token = argument.get("page_token", "") if isinstance(argument, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_PAGE:
            raise errors.InvalidArgument(f"list_tasks takes {{'page_size': 1..{MAX_PAGE}, 'page_token': ...}}")
        if not isinstance(token, str):
            raise errors.InvalidArgument("page_token must be a string")
        rows, next_token = await self.tap.tasks.page(self.user, None, [], size, token)
        tasks = [_as_json(convert.task(r)) for r in rows]
        await self.outbox.send(_dumps({"tasks": tasks, "next_page_token": next_token}))

    def _follow(self, task_id: str) -> None:
        if task_id in self.follows:
            return  # already followed: its output keeps coming
        if len(self.follows) >= MAX_FOLLOWS:
            raise errors.ResourceExhausted(f"at most {MAX_FOLLOWS} followed tasks: unfollow one first")
        assert self._nursery is not None
        scope = self.follows[task_id] = trio.CancelScope()
        self._nursery.start_soon(self._following, task_id, scope)

    async def _following(self, task_id: str, scope: trio.CancelScope) -> None:
        """The task's output from its start until it ends, then follow_ended; NOT_FOUND (not
        this user's task) is an error message."""
        try:
            with scope:
                items = cast("AsyncGenerator[OutputItem, None]", self.tap.tasks.output(self.user, task_id, True))
                async with aclosing(items):
                    async for item in items:
                        await self.outbox.send(_dumps({"task_output": _as_json(convert.task_output(task_id, item))}))
                await self.outbox.send(_dumps({"follow_ended": {"task_id": task_id}}))
        except errors.AriaError as exc:
            await self._error("follow_task", exc, task_id)
        finally:
            if self.follows.get(task_id) is scope:
                del self.follows[task_id]

    async def _error(self, command: str, exc: errors.AriaError, task_id: object = None) -> None:
        error = {"code": type(exc).reason, "reason": exc.reason, "message": exc.message, "command": command}
        if isinstance(task_id, str):
            error["task_id"] = task_id
        await self.outbox.send(_dumps({"error": error}))


# -- helpers ------------------------------------------------------------------------------------------


def _read_page() -> bytes:
    return (resources.files("aria_trio.runtime.operations") / "dashboard.html").read_bytes()


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = [v for n, v in headers if n.lower() == name]
    return values[-1].decode("latin-1").strip().lower() if values else None


def _auth_request(raw: str | bytes) -> tuple[str, list[str], int | None]:
    """The first message: the API key, event types and where to resume; else 1008."""
    usage = 'the first message must be {"api_key": "...", "after_sequence": n, "event_types": [...]}'
    try:
        message = json_input.loads(raw)
    except ValueError:
        raise _Refused(POLICY, usage) from None
    if not isinstance(message, dict) or not set(message) <= {"api_key", "after_sequence", "event_types"}:
        raise _Refused(POLICY, usage)
    key = message.get("api_key")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise _Refused(POLICY, "api_key must be a non-empty string")
    after = message.get("after_sequence")
    if isinstance(after, str) and after.isdigit():  # (the JSON mapping of a uint64 is a string)
        after = int(after)
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= MAX_SEQUENCE):
        raise _Refused(POLICY, "after_sequence must be a sequence number (0 or more)")
    kinds = message.get("event_types") or []
    if not isinstance(kinds, list) or not all(isinstance(k, str) and k in KINDS for k in kinds):
        raise _Refused(POLICY, f"event_types must be a list of: {', '.join(KINDS)}")
    return key, kinds, after


def _task_id(argument: object) -> str:
    if not isinstance(argument, str) or not argument or len(argument) > MAX_ID:
        raise errors.InvalidArgument("a task id must be a non-empty string")
    return argument


def _as_json(message: Message) -> dict[str, JSON]:
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
