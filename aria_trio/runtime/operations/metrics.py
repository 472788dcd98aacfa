"""Prometheus metrics on 127.0.0.1:<port>/metrics, served under the daemon's own nursery.

Three kinds of numbers, each kept where it is cheapest:
* per call (RPCs by service, method and code; their latency; calls in flight): counted by the rpc
  Server as calls start and end, through `RpcMetrics` (the optional `metrics=` hook of `Server`);
* per event with no home elsewhere (bundle bytes received): a module-level `Counter` the code that
  sees the event increments;
* live state (tasks by status, containers running, notification subscribers, the Quilt link):
  read at scrape time through the callbacks of `Live`, so the modules that own the state carry no
  metrics code and nothing can drift out of date.

prometheus_client's own HTTP server runs in a thread nobody supervises; this one is a small
HTTP/1.1 server (h11) under Trio: GET /metrics only, bounded request size, a timeout per request,
a cap on connections, and the text rendered in a worker thread so the event loop stays free.
Each `Metrics` has its own registry, so servers (and tests) never share counters by accident.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import h11
import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

log = structlog.get_logger("aria.metrics")

T = TypeVar("T")

# From a cache hit to a long upload; server streams (watches) land in +Inf, as they should.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
UNKNOWN = ("unknown", "unknown")  # the labels of calls to methods that do not exist


# -- per call --------------------------------------------------------------------------------------


def split_path(path: str | None) -> tuple[str, str]:
    """("aria.v1.TaskService", "LaunchTask") from "/aria.v1.TaskService/LaunchTask"."""
    if path is None:
        return UNKNOWN
    parts = path.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return UNKNOWN
    return parts[1], parts[2]


class _PathMetrics:
    """The label children of one method, looked up once: a call costs dict hits, not label work."""

    __slots__ = ("codes", "latency", "method", "open", "service")

    def __init__(self, rpc: RpcMetrics, path: str | None) -> None:
        self.service, self.method = split_path(path)
        self.open = rpc.open_streams.labels(self.service, self.method)
        self.latency = rpc.latency.labels(self.service, self.method)
        self.codes: dict[str, Counter] = {}


class RpcMetrics:
    """The rpc Server's hook (rpc.server.CallMetrics): calls by service, method and code, call
    latency by service and method, and calls in flight (open streams). Only registered methods
    become labels (the server passes None for the rest), so clients cannot grow the label set."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("service", "method")
        self.calls = Counter(
            "aria_rpc_calls", "RPCs finished, by service, method and status code.", (*labels, "code"), registry=registry
        )
        self.latency = Histogram(
            "aria_rpc_call_duration_seconds",
            "RPC duration from the request's headers to its status.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.open_streams = Gauge(
            "aria_rpc_open_streams",
            "RPCs in flight (HTTP/2 streams open), by service and method.",
            labels,
            registry=registry,
        )
        self._paths: dict[str | None, _PathMetrics] = {}

    def _of(self, path: str | None) -> _PathMetrics:
        found = self._paths.get(path)
        if found is None:
            found = self._paths[path] = _PathMetrics(self, path)
        return found

    def call_started(self, path: str | None) -> None:
        self._of(path).open.inc()

    def call_ended(self, path: str | None, code: str, seconds: float) -> None:
        m = self._of(path)
        m.open.dec()
        m.latency.observe(seconds)
        counter = m.codes.get(code)
        if counter is None:
            counter = m.codes[code] = self.calls.labels(m.service, m.method, code)
        counter.inc()


# -- live state, read at scrape time ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Live:
    """Where each live number comes from, asked at every scrape; None: not exported. A callback
    that fails costs its own metric for that scrape (logged), never the rest."""

    tasks_by_status: Callable[[], Awaitable[Mapping[str, int]]] | None = None
    containers_running: Callable[[], Awaitable[int]] | None = None
    notifications_published: Callable[[], int] | None = None
    notification_subscribers: Callable[[], int] | None = None
    quilt_up: Callable[[], bool] | None = None
    quilt_restarts: Callable[[], int] | None = None
    bundle_bytes_received: Callable[[], int] | None = None

    async def families(self) -> list[Metric]:
        out: list[Metric] = []
        if (by_status := await _ask("tasks_by_status", self.tasks_by_status)) is not None:
            tasks = GaugeMetricFamily("aria_tasks", "Tasks in the store, by status.", labels=["status"])
            for status, n in sorted(by_status.items()):
                tasks.add_metric([status], n)
            out.append(tasks)
        gauges = (
            (
                "aria_containers_running",
                "Containers running.",
                await _ask("containers_running", self.containers_running),
            ),
            (
                "aria_notification_subscribers",
                "Notification subscriptions open now.",
                _peek("notification_subscribers", self.notification_subscribers),
            ),
            (
                "aria_quilt_link_up",
                "1 while the link to Quilt is connected, else 0.",
                _peek("quilt_up", self.quilt_up),
            ),
        )
        for name, doc, value in gauges:
            if value is not None:
                out.append(GaugeMetricFamily(name, doc, value=float(value)))
        counters = (
            (
                "aria_notifications_published",
                "Notifications published since the daemon started.",
                _peek("notifications_published", self.notifications_published),
            ),
            (
                "aria_quilt_link_restarts",
                "Times the link to Quilt (or Quilt itself) was restarted.",
                _peek("quilt_restarts", self.quilt_restarts),
            ),
            (
                "aria_bundle_received_bytes",
                "Bundle bytes received from clients (uploads).",
                _peek("bundle_bytes_received", self.bundle_bytes_received),
            ),
        )
        for name, doc, count in counters:
            if count is not None:
                out.append(CounterMetricFamily(name, doc, value=float(count)))
        return out


async def _ask(name: str, source: Callable[[], Awaitable[T]] | None) -> T | None:
    if source is None:
        return None
    try:
        return await source()
    except Exception:
        log.warning("metric source failed; left out of this scrape", source=name, exc_info=True)
        return None


def _peek(name: str, source: Callable[[], T] | None) -> T | None:
    if source is None:
        return None
    try:
        return source()
    except Exception:
        log.warning("metric source failed; left out of this scrape", source=name, exc_info=True)
        return None


_WITH_CREATED = ("counter", "histogram", "summary")


class _Scrape:
    """One scrape's view: the registry's metrics plus the live ones just read (no shared state, so
    concurrent scrapes cannot see each other's numbers)."""

    def __init__(self, registry: CollectorRegistry, live: list[Metric]) -> None:
        self.registry = registry
        self.live = live

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():  # (fresh objects on every collect)
            if family.type in _WITH_CREATED:
                # prometheus_client adds a `_created` timestamp to each series; this format has no
                # place for it but a gauge of its own, which would double the series for nothing.
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
        yield from self.live


class Metrics:
    """A registry of our own with the RPC metrics, bundle bytes and the process's (CPU, memory,
    file descriptors); `render` adds the live ones."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc = RpcMetrics(self.registry)
        ProcessCollector(registry=self.registry)

    async def render(self, live: Live | None = None) -> bytes:
        """The exposition text; live sources on the event loop (the store's in its own thread),
        the formatting (and /proc reads) in a worker thread."""
        families = await live.families() if live is not None else []
        return await trio.to_thread.run_sync(generate_latest, _Scrape(self.registry, families))


# -- the HTTP endpoint -----------------------------------------------------------------------------

RECEIVE_SIZE = 16 * 1024


class MetricsServer:
    """GET /metrics on `host:port` (port 0: any free one; `port` is the real one once started).

    Bounds: a request's head and body at most `max_request_bytes` (431/413 beyond); each request
    must arrive and be answered within `timeout` seconds, idle keep-alive included, or the
    connection is closed; at most `max_connections` at once, further ones are closed at once."""

    def __init__(
        self,
        port: int,
        metrics: Metrics,
        live: Live | None = None,
        *,
        host: str = "127.0.0.1",
        max_connections: int = 8,
        timeout: float = 10.0,
        max_request_bytes: int = 8192,
    ) -> None:
        self.port = port
        self.metrics = metrics
        self.live = live
        self.host = host
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self._slots = trio.Semaphore(max_connections)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; started (with the port) once listening. A port that cannot be
        bound fails here: the operator asked for it."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, self._connection, self.port, host=self.host)
            )
            self.port = listeners[0].socket.getsockname()[1]
            log.info("metrics serving", url=f"http://{self.host}:{self.port}/metrics")
            task_status.started(self.port)

    async def _connection(self, stream: trio.SocketStream) -> None:
        # (serve_tcp closes the stream when this returns)
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            log.debug("metrics: too many connections; closed one")
            return
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request_bytes)
            while True:
                with trio.move_on_after(self.timeout):
                    if await self._exchange(stream, conn):
                        continue
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:  # never let one connection take the server (and the daemon) down
            log.warning("metrics connection failed", exc_info=True)
        finally:
            self._slots.release()

    async def _exchange(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        """One request and its response; whether the connection can take another."""
        reader = _Reader(stream, conn, self.max_request_bytes)
        try:
            request = await reader.next_event()
            if not isinstance(request, h11.Request):
                return False  # closed (between requests: the usual end of a keep-alive connection)
            while not isinstance(event := await reader.next_event(), h11.EndOfMessage):  # (a body: ignored)
                if isinstance(event, h11.ConnectionClosed):
                    return False
        except _TooLarge as exc:
            status, what = (431, b"request head too large\n") if exc.head else (413, b"request too large\n")
            await _respond(stream, conn, status, what, close=True)
            return False
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _respond(stream, conn, exc.error_status_hint, b"bad request\n", close=True)
            return False
        head = request.method == b"HEAD"
        path = request.target.split(b"?", 1)[0]
        if path != b"/metrics":
            await _respond(stream, conn, 404, b"not found; metrics are at /metrics\n", head=head)
        elif request.method not in (b"GET", b"HEAD"):
            await _respond(stream, conn, 405, b"GET or HEAD only\n", extra=[("allow", "GET, HEAD")])
        else:
            text = await self.metrics.render(self.live)
            await _respond(stream, conn, 200, text, content_type=CONTENT_TYPE_PLAIN_0_0_4, head=head)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False


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


async def _respond(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
    close: bool = False,
    extra: Iterable[tuple[str, str]] = (),
) -> None:
    headers = [("content-type", content_type), ("content-length", str(len(body))), *extra]
    if close:
        headers.append(("connection", "close"))
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if not head:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)
