"""The websocket notification tap, in-process on a real store, with real websocket clients."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from google.protobuf import json_format
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from aria_trio.proto.aria.v1 import notification_pb2 as pb
from aria_trio.runtime.access.pagination import PageTokens
from aria_trio.runtime.operations import tap as tap_module
from aria_trio.runtime.operations.tap import Tap
from aria_trio.runtime.store import open_store
from aria_trio.runtime.store import tasks as table
from aria_trio.runtime.work.notifications import Notifications
from aria_trio.runtime.work.tasks import Tasks, _Running
from aria_trio.shared.lifecycle import StartupError
from aria_trio.shared.sqlite import Store, now_us

KEYS = {"key-ann": "ann", "key-bob": "bob"}


@dataclass
class Env:
    tap: Tap
    hub: Notifications
    tasks: Tasks
    store: Store
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.tap.port}/ws"


async def start(tmp_path: Any, **options: Any) -> Any:
    store = await open_store(tmp_path / "runtime.db")
    hub = Notifications(store)
    tasks = Tasks(store, None, hub, PageTokens(b"k" * 32))  # type: ignore[arg-type]  # (no quilt: nothing runs)
    keys = dict(KEYS)

    async def verify(key: str) -> str | None:
        await trio.sleep(0)
        return keys.get(key)

    options = {"auth_timeout": 0.5, "send_timeout": 1.0, "heartbeat": 60.0, **options}
    return store, Env(Tap(0, hub, tasks, verify, **options), hub, tasks, store, keys)


@asynccontextmanager
async def serving(tmp_path: Any, **options: Any) -> Any:
    store, env = await start(tmp_path, **options)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(env.tap.run)
        assert port == env.tap.port and port > 0
        yield env
        nursery.cancel_scope.cancel()
    await store.close()


@pytest.fixture
async def env(tmp_path: Any) -> Any:
    async with serving(tmp_path) as env:
        yield env


@asynccontextmanager
async def client(env: Env, key: str | None = "key-ann", origin: str | None = None, queue: int = 16, **auth: Any) -> Any:
    """A websocket client, authenticated (the ok answer checked) unless key is None."""
    headers = [(b"Origin", origin.encode())] if origin is not None else []
    async with open_websocket_url(env.url, extra_headers=headers, message_queue_size=queue) as ws:
        if key is not None:
            await ws.send_message(json.dumps({"api_key": key, **auth}))
            assert await receive(ws) == {"ok": True, "user": env.keys[key]}
        yield ws


async def receive(ws: Any, timeout: float = 5) -> Any:
    with trio.fail_after(timeout):
        return json.loads(await ws.get_message())


async def closed(ws: Any, timeout: float = 5) -> Any:
    """The close reason once the server closed the connection (messages before it are skipped)."""
    with trio.fail_after(timeout), pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.get_message()
    return info.value.reason


def event(i: int, status: int = 2, message: str = "running") -> pb.TaskStatusEvent:
    return pb.TaskStatusEvent(task_id=f"t-{i}", new_status=status, status_message=message)


async def add_task(env: Env, user: str, task_id: str, status: int = table.COMPLETED) -> dict[str, Any]:
    row = {
        "id": task_id,
        "user_id": user,
        "session_id": "",
        "container_id": "",
        "parent_task_id": None,
        "type": "container:run",
        "command_json": json.dumps(["echo", "hi"]),
        "environment_json": "{}",
        "timeout_seconds": 0,
        "status": status,
        "created_at": now_us(),
        "progress_percent": 0.0,
        "current_operation": "",
    }
    await env.store.run(table.insert, row, "launched")
    return row


async def add_output(env: Env, task_id: str, items: list[tuple[int, int, str, float | None]]) -> None:
    await env.store.run(table.append_output, task_id, [(*item, now_us()) for item in items], len(items))


# -- the protocol -------------------------------------------------------------------------------------


async def test_events_arrive_as_protobuf_json(env: Env) -> None:
    async with client(env) as ws:
        sent = [
            await env.hub.publish("ann", "task_status", event(1)),
            await env.hub.publish(
                "ann", "bundle_upload", pb.BundleUploadEvent(bundle_name="b.aria", progress_percent=50)
            ),
        ]
        got = [await receive(ws), await receive(ws)]
    assert [g["sequence"] for g in got] == [1, 2]  # numbers, as after_sequence takes them
    assert got[0]["task_status"] == {"task_id": "t-1", "new_status": "RUNNING", "status_message": "running"}
    assert got[1]["bundle_upload"]["progress_percent"] == 50 and got[1]["bundle_upload"]["success"] is False
    assert got[0]["id"].startswith("n-") and got[0]["timestamp"].endswith("Z")
    # each is exactly the notification, in the protobuf JSON mapping
    assert [json_format.ParseDict(g, pb.Notification()) for g in got] == sent


async def test_resume_after_a_sequence_and_filter_by_kind(env: Env) -> None:
    for i in range(5):
        await env.hub.publish("ann", "task_status", event(i))
    await env.hub.publish("ann", "bundle_upload", pb.BundleUploadEvent(bundle_name="b"))
    async with client(env, after_sequence=2, event_types=["task_status"]) as ws:
        assert [(await receive(ws))["sequence"] for _ in range(3)] == [3, 4, 5]
        await env.hub.publish("ann", "bundle_upload", pb.BundleUploadEvent(bundle_name="b"))  # (filtered out)
        await env.hub.publish("ann", "task_status", event(9))
        live = await receive(ws)
        assert (live["sequence"], live["task_status"]["task_id"]) == (8, "t-9")
    async with client(env, after_sequence="7") as ws:  # a uint64 in the JSON mapping is a string
        assert (await receive(ws))["sequence"] == 8


async def test_a_key_of_one_user_never_sees_another_users_events_or_tasks(env: Env) -> None:
    await add_task(env, "bob", "t-bob")
    await add_task(env, "ann", "t-ann")
    async with client(env, "key-ann") as ann, client(env, "key-bob") as bob:
        await env.hub.publish("bob", "task_status", event(1, message="bob's"))
        await env.hub.publish("ann", "task_status", event(2, message="ann's"))
        assert (await receive(ann))["task_status"]["status_message"] == "ann's"
        assert (await receive(bob))["task_status"]["status_message"] == "bob's"
        with trio.move_on_after(0.3):
            pytest.fail(f"ann got more: {await ann.get_message()}")
        for command in ({"get_task": "t-bob"}, {"follow_task": "t-bob"}):
            await ann.send_message(json.dumps(command))
            error = (await receive(ann))["error"]
            assert (error["code"], error["task_id"]) == ("NOT_FOUND", "t-bob")
        await ann.send_message(json.dumps({"list_tasks": {}}))
        assert [t["id"] for t in (await receive(ann))["tasks"]] == ["t-ann"]
        await ann.send_message(json.dumps({"get_task": "t-ann"}))
        task = (await receive(ann))["task"]
        assert (task["id"], task["user_id"], task["status"]) == ("t-ann", "ann", "COMPLETED")


async def test_follow_a_tasks_output_replayed_then_live_then_ended(env: Env) -> None:
    done = await add_task(env, "ann", "t-done")
    await add_output(env, "t-done", [(1, table.STDOUT, "hello", None), (2, table.PROGRESS, "half", 50.0)])
    row = await add_task(env, "ann", "t-live", status=table.RUNNING)
    running = env.tasks.running["t-live"] = _Running(row)
    assert done["id"] == "t-done"
    async with client(env) as ws:
        await ws.send_message(json.dumps({"follow_task": "t-done"}))
        first, second, end = await receive(ws), await receive(ws), await receive(ws)
        assert first["task_output"]["stdout_line"] == "hello" and first["task_output"]["task_id"] == "t-done"
        assert second["task_output"]["progress"] == {"percent_complete": 50.0, "operation_description": "half"}
        assert end == {"follow_ended": {"task_id": "t-done"}}

        await ws.send_message(json.dumps({"follow_task": "t-live"}))
        await add_output(env, "t-live", [(1, table.STDERR, "oops", None)])
        running.notify()
        assert (await receive(ws))["task_output"]["stderr_line"] == "oops"
        await add_output(env, "t-live", [(1, table.STDERR, "oops", None), (2, table.STDOUT, "more", None)])
        running.notify()
        assert (await receive(ws))["task_output"]["stdout_line"] == "more"
        del env.tasks.running["t-live"]  # the watcher's end
        running.notify()
        assert await receive(ws) == {"follow_ended": {"task_id": "t-live"}}


async def test_followed_tasks_are_bounded_and_bad_commands_are_answered(env: Env) -> None:
    rows = [await add_task(env, "ann", f"t-{i}", status=table.RUNNING) for i in range(tap_module.MAX_FOLLOWS + 1)]
    for row in rows:
        env.tasks.running[row["id"]] = _Running(row)  # (running: followed until unfollowed)
    async with client(env) as ws:
        for row in rows:
            await ws.send_message(json.dumps({"follow_task": row["id"]}))
        error = (await receive(ws))["error"]
        assert (error["code"], error["command"], error["task_id"]) == ("RESOURCE_EXHAUSTED", "follow_task", "t-8")
        await ws.send_message(json.dumps({"unfollow_task": "t-0"}))
        await ws.send_message(json.dumps({"follow_task": "t-8"}))  # room again
        for bad in ("not json", "[" * 10000, "[1]", '{"a": 1, "b": 2}', '{"launch_task": "x"}', '{"get_task": 7}'):
            await ws.send_message(bad)
            assert (await receive(ws))["error"]["code"] == "INVALID_ARGUMENT", bad
        await ws.send_message(json.dumps({"list_tasks": {"page_size": 2}}))
        page = await receive(ws)
        assert len(page["tasks"]) == 2 and page["next_page_token"]
        await env.hub.publish("ann", "task_status", event(1))
        assert (await receive(ws))["sequence"] == 1  # the connection is still fine


# -- bad clients ----------------------------------------------------------------------------------------


async def test_a_client_that_never_authenticates_is_closed_after_the_timeout(env: Env) -> None:
    async with client(env, key=None) as ws:
        began = time.monotonic()
        reason = await closed(ws)
    assert reason.code == 1008 and "no authentication within 0.5 s" in reason.reason
    assert time.monotonic() - began >= 0.4
    assert env.tap.clients == 0


async def test_a_bad_key_or_a_bad_first_message_is_closed_1008(env: Env) -> None:
    for first, why in [
        ({"api_key": "key-eve"}, "invalid API key"),
        ({"api_key": ""}, "api_key"),
        ({"apikey": "key-ann"}, "the first message must be"),
        ({"api_key": "key-ann", "after_sequence": -1}, "after_sequence"),
        ({"api_key": "key-ann", "after_sequence": 2**64}, "after_sequence"),
        ({"api_key": "key-ann", "event_types": ["everything"]}, "event_types"),
        ("key-ann", "the first message must be"),
        ("[" * 10000, "the first message must be"),
    ]:
        async with client(env, key=None) as ws:
            await ws.send_message(first if isinstance(first, str) and first[0] == "[" else json.dumps(first))
            reason = await closed(ws)
        assert reason.code == 1008 and why in reason.reason, (first, reason)


async def test_a_page_of_another_origin_is_refused_at_the_handshake(env: Env) -> None:
    # ("null": a page from disk, but also any site's sandboxed iframe or data: page)
    for origin in ("http://evil.example", f"http://127.0.0.1:{env.tap.port + 1}", "https://localhost", "null"):
        with pytest.raises(ConnectionRejected) as info:
            async with client(env, key=None, origin=origin):
                pass
        assert info.value.status_code == 403, origin
    # the tap's own pages and tools (no Origin) are let in
    for origin in (f"http://127.0.0.1:{env.tap.port}", f"http://localhost:{env.tap.port}", None):
        async with client(env, origin=origin):
            pass


@pytest.mark.serial  # timed: a 1 s drop
async def test_a_client_that_stops_reading_slows_nobody_and_is_dropped(env: Env) -> None:
    big = "x" * 64 * 1024  # 200 of these (13 MB) fill any socket buffer of a client that does not read
    total = 200
    async with client(env, queue=1) as stalled, client(env) as reader:
        assert env.tap.clients == 2
        got: list[int] = []

        async def read_all() -> None:
            while len(got) < total:
                got.append((await receive(reader, timeout=10))["sequence"])

        began = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            for i in range(total):
                await env.hub.publish("ann", "task_status", event(i, message=big))
        assert got == list(range(1, total + 1))
        assert time.monotonic() - began < 10
        with trio.fail_after(5):  # send_timeout is 1 s (then the dropped one's connection ends)
            while env.tap.dropped < 1 or env.tap.clients != 1:
                await trio.sleep(0.05)
        # the dropped client gets what it had buffered, then sees its connection gone (no close frame)
        assert (await closed(stalled)).code == 1006
        await env.hub.publish("ann", "task_status", event(0))  # the other one goes on
        assert (await receive(reader))["sequence"] == total + 1


async def test_a_client_that_stops_answering_pings_is_dropped(tmp_path: Any) -> None:
    async with serving(tmp_path, heartbeat=0.2, send_timeout=0.3) as env, client(env, queue=1) as ws:
        for i in range(3):  # small: they fit in the buffers, but its reader is now stuck on a full queue
            await env.hub.publish("ann", "task_status", event(i))
        with trio.fail_after(5):
            while env.tap.dropped < 1:
                await trio.sleep(0.05)
        assert env.tap.clients == 0
        await closed(ws)


async def test_a_revoked_key_ends_the_client_at_the_next_heartbeat(tmp_path: Any) -> None:
    async with serving(tmp_path, heartbeat=0.2) as env, client(env) as ws:
        await trio.sleep(0.5)  # a few heartbeats: still fine
        assert env.tap.clients == 1
        del env.keys["key-ann"]
        reason = await closed(ws)
        assert (reason.code, reason.reason) == (1008, "API key revoked")


async def test_connections_are_bounded(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(tap_module, "MAX_CONNECTIONS", 2)
    async with serving(tmp_path) as env, client(env), client(env):
        with pytest.raises(ConnectionRejected) as info:
            async with client(env):
                pass
        assert info.value.status_code == 503


# -- the page -------------------------------------------------------------------------------------------


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


async def test_the_dashboard_is_served_on_the_same_port(env: Env) -> None:
    port = env.tap.port
    status, headers, body = await http(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert body == tap_module._read_page() and b"<html" in body
    assert int(headers["content-length"]) == len(body)
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert f"ws://127.0.0.1:{port}" in headers["content-security-policy"]
    assert (await http(port, b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 404
    assert (await http(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"))[0] == 405
    assert (await http(port, b"nonsense\r\n\r\n"))[0] == 400
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * tap_module.MAX_REQUEST + b"\r\n\r\n"
    assert (await http(port, big))[0] == 431  # (the one HTTP front end's bound, as for /metrics)
    # a websocket upgrade elsewhere than /ws
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/other"):
            pass
    assert info.value.status_code == 404
    with trio.fail_after(5):  # every connection was closed (the server's side ends just after the client's)
        while env.tap.connections:
            await trio.sleep(0.01)


async def test_a_port_in_use_is_a_startup_error(env: Env, tmp_path: Any) -> None:
    (tmp_path / "other").mkdir()
    store, other = await start(tmp_path / "other")
    with pytest.raises(StartupError, match=f"cannot serve the tap on 127.0.0.1:{env.tap.port}"):
        other.tap.port = env.tap.port
        await other.tap.run()
    await store.close()
