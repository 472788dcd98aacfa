"""Restarts: everything the runtime said is there after both daemons restart; a crashed Quilt child
is restarted, with NOT_SERVING while it is down, and tasks it was running end truthfully."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from test_runtime_bundles import TWO_TOOLS

from aria_trio.proto.aria.v1 import aria_pb2

import bundles
from aria_client import AriaClient
from conftest import start_daemon, start_quilt

HEALTH = "/grpc.health.v1.Health/Check"


def health(c: AriaClient, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return c.call(HEALTH, request, health_pb2.HealthCheckResponse).status


def stored_events(c: AriaClient) -> list:
    """Every event of the caller so far: the replay, then the stream stays open (for live ones)
    until its deadline."""
    got = []
    try:
        for n in c.events(timeout=2, after_sequence=0):
            got.append(n)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return got


def quilt_pid(daemon) -> int:
    return [e["pid"] for e in daemon.logs() if e.get("event") == "quilt started"][-1]


def test_both_daemons_restart_and_everything_reads_back(sock_dir):
    first = start_daemon(sock_dir)
    c = AriaClient(first.channel())
    session = c.session(context_data={"k": "v"})
    done = c.wait_task(c.launch(["sh", "-c", "echo out; echo err >&2; echo '::progress 70 nearly'; exit 2"]))
    long = c.launch(["sh", "-c", "echo started; sleep 60"], session_id=session.id)
    box = c.create_container("keeper", persistent=True)
    c.container_call("Start", box.id)
    data = bundles.flat(TWO_TOOLS)
    bundle = c.upload_bytes(data)
    while [o.stdout_line for o in c.output(long)] != ["started"]:
        time.sleep(0.05)
    events_before = stored_events(c)
    assert first.stop() == 0

    second = start_daemon(sock_dir)
    c = AriaClient(second.channel())
    again = c.task(done.id)
    assert (again.status, again.exit_code, again.current_operation) == (aria_pb2.FAILED, 2, "nearly")
    outputs = [(o.WhichOneof("output"), o.stdout_line or o.stderr_line) for o in c.output(done.id)]
    assert sorted(outputs) == sorted([("stdout_line", "out"), ("stderr_line", "err"), ("progress", "")])
    # the task that was running when Quilt shut down ends as failed, and says why
    interrupted = c.wait_task(long)
    assert interrupted.status == aria_pb2.FAILED and "quilt shut down" in interrupted.error_message
    assert [o.stdout_line for o in c.output(long)] == ["started"]
    assert [t.id for t in c.list_tasks(session_id=session.id).tasks] == [long]
    assert c.wait_container(box.id, {aria_pb2.CANCELLED, aria_pb2.FAILED}).name == "keeper"
    assert [a.agent_id for a in c.agents()] == ["default", "Helper"]
    assert c.upload_bytes(data).bundle_id == bundle.bundle_id  # the same bytes: the same bundle
    replayed = stored_events(c)
    assert [n.id for n in replayed[: len(events_before)]] == [n.id for n in events_before]
    assert [n.sequence for n in replayed] == list(range(1, len(replayed) + 1))
    second.stop()


def test_a_crashed_quilt_is_restarted_and_tasks_end_truthfully(daemon):
    c = AriaClient(daemon.channel())
    task_id = c.launch(["sh", "-c", "echo before; sleep 60"])
    while [o.stdout_line for o in c.output(task_id)] != ["before"]:
        time.sleep(0.05)
    old = quilt_pid(daemon)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 5
    statuses = set()
    while time.monotonic() < deadline and quilt_pid(daemon) == old:
        statuses.add(health(c, "aria.v1.TaskService"))
        time.sleep(0.01)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert quilt_pid(daemon) != old
    deadline = time.monotonic() + 10
    while health(c, "aria.v1.TaskService") != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    task = c.wait_task(task_id)
    assert task.status == aria_pb2.FAILED and "quilt restarted" in task.error_message
    assert health(c, "aria.v1.UserPreferenceService") == health_pb2.HealthCheckResponse.SERVING
    assert c.wait_task(c.launch(["true"])).status == aria_pb2.COMPLETED  # and it works again


def test_a_quilt_of_its_own_by_quilt_socket(sock_dir):
    quilt = start_quilt(sock_dir)
    runtime = start_daemon(sock_dir, "--quilt-socket", str(quilt.socket))
    try:
        c = AriaClient(runtime.channel())
        assert c.wait_task(c.launch(["true"])).status == aria_pb2.COMPLETED
        assert not any(e.get("event") == "quilt started" for e in runtime.logs())  # no child of its own
        assert quilt.stop() == 0
        deadline = time.monotonic() + 10
        while health(c, "aria.v1.ContainerService") != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as info:
            c.launch(["true"])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "quilt" in info.value.details()
        quilt = start_quilt(sock_dir)  # back: the link reconnects by itself
        while health(c, "aria.v1.ContainerService") != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline + 30
            time.sleep(0.05)
        assert c.wait_task(c.launch(["true"])).status == aria_pb2.COMPLETED
    finally:
        runtime.stop()
        quilt.stop()
