"""Limits a user cannot lift: per-user quotas of the runtime, and timeouts that always hold.

A reached quota is RESOURCE_EXHAUSTED with ErrorInfo reason QUOTA_EXCEEDED and metadata.quota
naming its setting; the daemon goes on serving everyone, the same user included.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_runtime_bundles import TWO_TOOLS
from test_turns_direct import turn
from test_turns_model import use_model

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import task_pb2 as tpb

import bundles
from aria_client import TASKS, AriaClient
from fake_llm import FakeLLM


def quota_of(err: grpc.RpcError) -> tuple[str | None, str | None]:
    """(reason, metadata.quota) of a failed call's ErrorInfo."""
    for detail in rpc_status.from_call(err).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason, info.metadata.get("quota")
    return None, None


def refused(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


def test_running_tasks_per_user(daemon_factory):
    d = daemon_factory("--max-running-tasks", "2")
    c = AriaClient(d.channel())
    first, second = (c.launch(["sleep", "30"]) for _ in range(2))
    err = refused(c.launch, ["true"])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_of(err) == ("QUOTA_EXCEEDED", "max_running_tasks")
    assert "max_running_tasks" in err.details()
    c.cancel(first)
    c.wait_task(first)
    third = c.launch(["true"])  # room again
    assert c.wait_task(third).status == aria_pb2.COMPLETED
    c.cancel(second)


def test_running_containers_per_user(daemon_factory):
    d = daemon_factory("--max-running-containers", "1")
    c = AriaClient(d.channel())
    one, two = c.create_container("one"), c.create_container("two")
    c.container_call("Start", one.id)
    err = refused(c.container_call, "Start", two.id)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_of(err) == ("QUOTA_EXCEEDED", "max_running_containers")
    assert c.container_call("Get", two.id).status == aria_pb2.PENDING  # nothing half-done
    c.container_call("Stop", one.id)
    c.container_call("Start", two.id)
    c.container_call("Stop", two.id)


def test_200_follow_streams_from_one_user(daemon_factory):
    d = daemon_factory("--max-streams", "8")
    c = AriaClient(d.channel())
    task_id = c.launch(["sleep", "60"])
    fn = c.channel.unary_stream(
        TASKS + "StreamTaskOutput",
        tpb.StreamTaskOutputRequest.SerializeToString,
        tpb.TaskOutput.FromString,
    )
    follow = tpb.StreamTaskOutputRequest(task_id=task_id, follow=True)
    calls = [fn(follow, timeout=30) for _ in range(200)]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(1 for call in calls if call.done()) < 192:
            time.sleep(0.05)
        ended = [call for call in calls if call.done()]
        assert len(ended) == 192  # 8 stay open, following
        for call in ended:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_of(ended[0]) == ("QUOTA_EXCEEDED", "max_streams")
        # the same user's unary calls go on
        other = c.launch(["true"])
        assert c.wait_task(other).status == aria_pb2.COMPLETED
    finally:
        for call in calls:
            call.cancel()
        c.cancel(task_id)
    # once they are closed, streams can be opened again
    deadline = time.monotonic() + 10
    while True:
        try:
            assert list(c.output(task_id)) == []  # (sleep printed nothing; the point: it is served)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)


def test_connections_per_user(daemon_factory):
    d = daemon_factory("--max-connections-per-user", "3")
    own_pool = {"grpc.use_local_subchannel_pool": 1}  # (else grpcio shares one connection)
    channels = [d.channel(**own_pool) for _ in range(4)]
    try:
        codes = []
        for ch in channels:
            try:
                AriaClient(ch).list_tasks()
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
                assert quota_of(err) == ("QUOTA_EXCEEDED", "max_connections_per_user")
        assert codes == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED"]
    finally:
        for ch in channels[:3]:
            ch.close()
    deadline = time.monotonic() + 10
    while True:  # the three are gone: a new connection is served
        fresh = d.channel(**own_pool)
        try:
            AriaClient(fresh).list_tasks()
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        finally:
            fresh.close()
    channels[3].close()


def test_a_task_without_a_timeout_gets_the_default_and_too_long_is_refused(daemon_factory):
    d = daemon_factory("--task-timeout", "2", "--max-task-timeout", "100")
    c = AriaClient(d.channel())
    task_id = c.launch(["sleep", "30"], timeout_seconds=0)
    assert c.task(task_id).timeout_seconds == 2
    done = c.wait_task(task_id, timeout=20)
    assert done.status == aria_pb2.TIMEOUT
    err = refused(c.launch, ["true"], timeout_seconds=101)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


def test_a_reply_with_200_tool_calls_runs_32_at_most_8_at_once(daemon, llm):
    c = AriaClient(daemon.channel())
    c.upload_bytes(bundles.flat(TWO_TOOLS))
    use_model(c, llm.base_url)
    session = c.session(agent_id="Helper")
    llm.call_tools([("add", {"a": i, "b": 1}) for i in range(200)])
    llm.reply_text("done")
    out = turn(c, session.id, "add them all", timeout=180)
    order = [o.tool_call.call_id for o in out if o.WhichOneof("event") == "tool_call"]
    results = sorted(  # (sent as each call ends: in the calls' order here)
        (o.tool_result for o in out if o.WhichOneof("event") == "tool_result"), key=lambda r: order.index(r.call_id)
    )
    assert len(results) == 200
    ran = [r for r in results if r.success]
    assert len(ran) == 32 and all(json.loads(r.result_json) == i + 1 for i, r in enumerate(ran))
    for r in results[32:]:
        assert not r.success and "max_tool_calls_per_reply" in r.error_message
    assert out[-1].final_response == "done"
    # only 32 ran (the tool execution log), never more than 8 at a time
    db = sqlite3.connect(f"file:{daemon.data_dir / 'runtime.db'}?mode=ro", uri=True)
    spans = db.execute("SELECT started_at, started_at + duration_ms * 1000 FROM tool_executions").fetchall()
    db.close()
    assert len(spans) == 32
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert 2 <= overlap <= 8, overlap
