"""Prometheus metrics: the rpc Server's per-call hook, live state read at scrape time, and the
/metrics endpoint's HTTP behaviour and bounds, against real servers, a real store, and the daemon."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from aria_trio.proto.aria.v1 import notification_pb2 as npb
from aria_trio.rpc import Channel, Health, RpcError, Server, StatusCode
from aria_trio.runtime.agents.registry import Registry
from aria_trio.runtime.daemon import live_metrics
from aria_trio.runtime.operations.metrics import Live, Metrics, MetricsServer, split_path
from aria_trio.runtime.quilt_client import QuiltLink
from aria_trio.runtime.store import containers as container_table
from aria_trio.runtime.store import open_store
from aria_trio.runtime.store import tasks as task_table
from aria_trio.runtime.work.notifications import Notifications
from aria_trio.runtime.work.uploads import Uploads
from aria_trio.shared.lifecycle import StartupError
from aria_trio.shared.sqlite import Store

import bundles
from aria_client import AriaClient
from conftest import start_daemon
from probe import Probe, Req, Resp, make_server

PROBE = "probe.v1.Probe"


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return values(text).get((name, tuple(sorted(labels.items()))))


async def scrape(port: int, path: str = "/metrics") -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}{path}", timeout=5)


@dataclasses.dataclass
class Observed:
    metrics: Metrics
    server: Server
    path: str
    http: MetricsServer


@pytest.fixture
async def observed(nursery: Any, sock_dir: Path) -> Observed:
    """The probe service on a Server with the metrics hook, and /metrics on a free port."""
    metrics = Metrics()
    server = make_server(Probe(), metrics=metrics.rpc)
    path = str(sock_dir / "observed.sock")
    await nursery.start(server.serve, path)
    http = MetricsServer(0, metrics)
    await nursery.start(http.run)
    return Observed(metrics, server, path, http)


# -- per call --------------------------------------------------------------------------------------


def test_split_path():
    assert split_path("/aria.v1.TaskService/LaunchTask") == ("aria.v1.TaskService", "LaunchTask")
    assert split_path(None) == ("unknown", "unknown")
    assert split_path("nonsense") == ("unknown", "unknown")
    assert split_path("/a/b/c") == ("unknown", "unknown")


async def test_calls_by_service_method_and_code_with_latency(observed):
    async with Channel.connect(observed.path) as channel:
        for _ in range(2):
            await channel.unary(f"/{PROBE}/Unary", Req(mode="hi"), Resp, timeout=5)
        await channel.unary(f"/{PROBE}/Unary", Req(mode="sleep", seconds=0.3), Resp, timeout=5)
        for mode in ("not_found", "invalid", "invalid"):
            with pytest.raises(RpcError):
                await channel.unary(f"/{PROBE}/Unary", Req(mode=mode), Resp, timeout=5)
        # Methods that do not exist: the client picks their names, so they never become labels.
        for path in (f"/{PROBE}/NoSuchMethod", "/no.such.v1.Service/Anything"):
            with pytest.raises(RpcError) as info:
                await channel.unary(path, Req(), Resp, timeout=5)
            assert info.value.code is StatusCode.UNIMPLEMENTED

    reply = await scrape(observed.http.port)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.text
    unary = {"service": PROBE, "method": "Unary"}
    assert value(text, "aria_rpc_calls_total", **unary, code="OK") == 3
    assert value(text, "aria_rpc_calls_total", **unary, code="NOT_FOUND") == 1
    assert value(text, "aria_rpc_calls_total", **unary, code="INVALID_ARGUMENT") == 2
    assert value(text, "aria_rpc_calls_total", service="unknown", method="unknown", code="UNIMPLEMENTED") == 2
    assert "NoSuchMethod" not in text and "no.such" not in text

    # A histogram per method: every call under +Inf, the 0.3 s one above 0.25 s but within 0.5 s.
    assert f'aria_rpc_call_duration_seconds_bucket{{le="+Inf",method="Unary",service="{PROBE}"}} 6.0' in text
    assert value(text, "aria_rpc_call_duration_seconds_count", **unary) == 6
    assert value(text, "aria_rpc_call_duration_seconds_bucket", **unary, le="0.5") == 6
    assert value(text, "aria_rpc_call_duration_seconds_bucket", **unary, le="0.25") == 5
    assert value(text, "aria_rpc_call_duration_seconds_sum", **unary) >= 0.3
    assert value(text, "aria_rpc_open_streams", **unary) == 0
    assert value(text, "process_open_fds") is not None  # the process collector is registered too
    assert "_created" not in text  # (a gauge per series in this format: noise, so left out)


async def test_open_streams_rise_while_a_stream_is_open(observed):
    labels = {"service": PROBE, "method": "ServerStream"}
    async with Channel.connect(observed.path) as channel:
        async with channel.call(f"/{PROBE}/ServerStream", Resp, timeout=30) as first:
            await first.send(Req(n=10**6, seconds=5), end=True)
            assert (await first.receive()).text == "0"
            assert value((await scrape(observed.http.port)).text, "aria_rpc_open_streams", **labels) == 1
            async with channel.call(f"/{PROBE}/ServerStream", Resp, timeout=30) as second:
                await second.send(Req(n=10**6, seconds=5), end=True)
                await second.receive()
                assert value((await scrape(observed.http.port)).text, "aria_rpc_open_streams", **labels) == 2
    # Leaving the calls resets them; the server notices at once, but asynchronously.
    with trio.fail_after(5):
        while value(text := (await scrape(observed.http.port)).text, "aria_rpc_open_streams", **labels) != 0:
            await trio.sleep(0.01)
    assert value(text, "aria_rpc_calls_total", **labels, code="CANCELLED") == 2


async def test_servers_without_metrics_work_as_before(probe_server):
    """Quilt's Server has no metrics hook: nothing is counted, nothing breaks."""
    assert probe_server.server.metrics is None
    async with Channel.connect(probe_server.path) as channel:
        assert (await channel.unary(f"/{PROBE}/Unary", Req(mode="hi"), Resp, timeout=5)).text == "echo:hi"
        with pytest.raises(RpcError):
            await channel.unary(f"/{PROBE}/Nope", Req(), Resp, timeout=5)
        async with channel.call(f"/{PROBE}/ServerStream", Resp, timeout=5) as call:
            await call.send(Req(n=3), end=True)
            assert [r.text async for r in call] == ["0", "1", "2"]


# -- live state ------------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(tmp_path / "runtime.db")
    yield s
    await s.close()


def _task(n: int, status: int) -> dict[str, Any]:
    return {"id": f"t-{n}", "user_id": "u", "type": "command", "command_json": "[]", "status": status, "created_at": n}


def _container(n: int, status: int) -> dict[str, Any]:
    return {
        "id": f"c-{n}",
        "user_id": "u",
        "name": f"box{n}",
        "image_path": "/img",
        "status": status,
        "created_at": n,
        "updated_at": n,
    }


async def test_live_state_from_a_real_store_notifications_and_quilt_link(nursery, sock_dir, store):
    statuses = [task_table.PENDING, task_table.RUNNING, task_table.RUNNING, task_table.COMPLETED, task_table.FAILED]
    for n, status in enumerate(statuses):
        await store.run(task_table.insert, _task(n, status), "made")
    for n, status in enumerate([task_table.RUNNING, task_table.RUNNING, task_table.PENDING, task_table.COMPLETED]):
        await store.run(container_table.insert, _container(n, status))

    notifications = Notifications(store)
    for _ in range(3):
        await notifications.publish("u", "task_status", npb.TaskStatusEvent(task_id="t-0"))

    # A Quilt stand-in: any server on a socket will do for the link.
    quilt_server = make_server(Probe())
    quilt_path = sock_dir / "quilt.sock"
    await nursery.start(quilt_server.serve, str(quilt_path))
    link = QuiltLink(quilt_path, spawn=None, health=Health(), services=[])
    await nursery.start(link.run)

    metrics = Metrics()
    http = MetricsServer(
        0, metrics, live_metrics(store, notifications, link, Uploads(link, Registry(store), notifications))
    )
    await nursery.start(http.run)

    async with notifications.subscription("u", [], None), notifications.subscription("v", [], None):
        text = (await scrape(http.port)).text
    assert {s: value(text, "aria_tasks", status=s) for s in ("PENDING", "RUNNING", "COMPLETED", "FAILED")} == {
        "PENDING": 1,
        "RUNNING": 2,
        "COMPLETED": 1,
        "FAILED": 1,
    }
    assert value(text, "aria_tasks", status="CANCELLED") == 0  # every status, zeros too
    assert value(text, "aria_containers_running") == 2
    assert value(text, "aria_notifications_published_total") == 3
    assert value(text, "aria_notification_subscribers") == 2
    assert value(text, "aria_quilt_link_up") == 1
    assert value(text, "aria_quilt_link_restarts_total") == 0

    assert value((await scrape(http.port)).text, "aria_notification_subscribers") == 0
    await quilt_server.shutdown(grace=0)
    with trio.fail_after(5):
        while value((await scrape(http.port)).text, "aria_quilt_link_up") != 0:
            await trio.sleep(0.01)


async def test_a_failing_source_costs_only_its_own_metric(nursery):
    async def broken() -> dict[str, int]:
        raise RuntimeError("database is locked")

    http = MetricsServer(0, Metrics(), Live(tasks_by_status=broken, quilt_up=lambda: False))
    await nursery.start(http.run)
    reply = await scrape(http.port)
    assert reply.status_code == 200
    assert "aria_tasks" not in reply.text
    assert value(reply.text, "aria_quilt_link_up") == 0


async def test_bundle_bytes_received(nursery):
    received = [5]
    http = MetricsServer(0, Metrics(), Live(bundle_bytes_received=lambda: received[0]))
    await nursery.start(http.run)
    assert value((await scrape(http.port)).text, "aria_bundle_received_bytes_total") == 5
    received[0] += 1000
    assert value((await scrape(http.port)).text, "aria_bundle_received_bytes_total") == 1005


# -- the HTTP endpoint -----------------------------------------------------------------------------


async def _exchange(stream: trio.SocketStream, conn: h11.Connection, method: str, target: str, **headers: str):
    """One request on a kept-alive connection; (status, headers, body)."""
    if conn.our_state is h11.DONE:
        conn.start_next_cycle()
    hs = [("host", "localhost"), *headers.items()]
    await stream.send_all(
        conn.send(h11.Request(method=method, target=target, headers=hs)) + conn.send(h11.EndOfMessage())
    )
    response, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response.status_code, dict(response.headers), body
        else:
            raise AssertionError(event)


async def test_http_paths_methods_and_keep_alive(nursery):
    http = MetricsServer(0, Metrics())
    await nursery.start(http.run)
    assert (await scrape(http.port, "/other")).status_code == 404
    assert (await scrape(http.port, "/metrics?x=1")).status_code == 200
    stream = await trio.open_tcp_stream("127.0.0.1", http.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        status, _, body = await _exchange(stream, conn, "GET", "/metrics")
        assert status == 200 and b"aria_rpc_calls" in body
        status, headers, body = await _exchange(stream, conn, "HEAD", "/metrics")  # the same connection
        assert status == 200 and body == b"" and int(headers[b"content-length"]) > 0
        status, headers, _ = await _exchange(stream, conn, "POST", "/metrics", **{"content-length": "0"})
        assert status == 405 and headers[b"allow"] == b"GET, HEAD"
        assert (await _exchange(stream, conn, "GET", "/"))[0] == 404


async def test_http_request_size_is_bounded(nursery):
    http = MetricsServer(0, Metrics(), max_request_bytes=1024)
    await nursery.start(http.run)
    stream = await trio.open_tcp_stream("127.0.0.1", http.port)
    async with stream:
        status, headers, _ = await _exchange(stream, h11.Connection(h11.CLIENT), "GET", "/metrics", x="y" * 4096)
        assert status == 431 and headers[b"connection"] == b"close"
    stream = await trio.open_tcp_stream("127.0.0.1", http.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="POST", target="/metrics", headers=[("host", "x"), ("content-length", "5000")])
        await stream.send_all(conn.send(request) + conn.send(h11.Data(data=b"z" * 5000)))
        with trio.fail_after(5):
            reply = await stream.receive_some(65536)
        assert reply.startswith(b"HTTP/1.1 413 ")


async def test_http_idle_connections_time_out_and_connections_are_capped(nursery):
    http = MetricsServer(0, Metrics(), max_connections=2, timeout=0.5)
    await nursery.start(http.run)
    idle = [await trio.open_tcp_stream("127.0.0.1", http.port) for _ in range(2)]
    with trio.fail_after(5):
        while http.connections < 2:  # both accepted and being served
            await trio.sleep(0.01)
        extra = await trio.open_tcp_stream("127.0.0.1", http.port)
        assert await extra.receive_some(100) == b""  # over the cap: closed at once
        await extra.aclose()
        started = trio.current_time()
        for stream in idle:  # silent clients: closed after the timeout
            assert await stream.receive_some(100) == b""
            await stream.aclose()
        assert trio.current_time() - started < 2
    assert (await scrape(http.port)).status_code == 200


async def test_a_port_in_use_is_a_startup_error(nursery):
    http = MetricsServer(0, Metrics())
    await nursery.start(http.run)
    with pytest.raises(StartupError, match=f"cannot serve the metrics on 127.0.0.1:{http.port}"):
        await MetricsServer(http.port, Metrics()).run()


# -- the daemon, end to end ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_daemon_serves_metrics(sock_dir):
    port = _free_port()
    daemon = start_daemon(sock_dir, "--metrics-port", str(port))
    try:
        c = AriaClient(daemon.channel())
        task = c.wait_task(c.launch(["true"]))
        data = bundles.flat(bundles.manifest())
        c.upload_bytes(data, chunk=1000)

        reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert reply.status_code == 200
        text = reply.text
        launched = value(text, "aria_rpc_calls_total", service="aria.v1.TaskService", method="LaunchTask", code="OK")
        assert launched == 1
        assert value(text, "aria_rpc_call_duration_seconds_count", service="aria.v1.TaskService", method="GetTask")
        assert value(text, "aria_tasks", status="COMPLETED") == 1, task
        assert value(text, "aria_quilt_link_up") == 1
        assert value(text, "aria_bundle_received_bytes_total") == len(data)
        assert value(text, "aria_notifications_published_total") >= 2  # the task's events, the upload's
        assert value(text, "aria_containers_running") == 0
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=10).status_code == 404
    finally:
        assert daemon.stop() == 0
