"""Prometheus metrics on 127.0.0.1:<port>/metrics, served under the daemon's own nursery.

Three kinds of numbers, each kept where it is cheapest:
* per call (RPCs by service, method and code; their latency; calls in flight): counted by the rpc
  Server as calls start and end, through `RpcMetrics` (the optional `metrics=` hook of `Server`);
* per event with no home elsewhere (bundle bytes received): a module-level `Counter` the code that
  sees the event increments;
* live state (tasks by status, containers running, notification subscribers, the Quilt link):
  read at scrape time through the callbacks of `Live`, so the modules that own the state carry no
  metrics code and nothing can drift out of date.

prometheus_client's own HTTP server runs in a thread nobody supervises; this one is the
operations' HTTP front end (operations/http.py: h11 under Trio, bounded) serving GET /metrics
only, the text rendered in a worker thread so the event loop stays free.
Each `Metrics` has its own registry, so servers (and tests) never share counters by accident.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from aria_trio.runtime.operations.http import HttpServer, Response

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


class MetricsServer(HttpServer):
    """GET /metrics on `host:port` (port 0: any free one; `port` is the real one once started),
    through the operations' one HTTP front end (operations/http.py, whose bounds these are):
    `max_connections` at once (more are closed at once), each request within `timeout` seconds,
    keep-alive, at most `max_request_bytes` a request. Every scrape renders afresh."""

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
        self.metrics = metrics
        self.live = live
        super().__init__(
            "metrics",
            port,
            {"/metrics": self._scrape},
            not_found="not found; metrics are at /metrics\n",
            host=host,
            max_connections=max_connections,
            timeout=timeout,
            max_request_bytes=max_request_bytes,
        )

    async def _scrape(self) -> Response:
        return Response(200, await self.metrics.render(self.live), content_type=CONTENT_TYPE_PLAIN_0_0_4)
