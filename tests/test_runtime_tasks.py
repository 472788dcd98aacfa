"""TaskService end to end: a grpcio client, the runtime on its socket, its Quilt child, real sandboxes."""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any

import grpc
import pytest

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import task_pb2 as tpb

from aria_client import TASKS, AriaClient, as_other_user, bad_fields
from conftest import give_up_midway, typical_seconds

SCRIPT = "echo one; echo '::progress 40 building'; echo two >&2; sleep 0.5; echo three"


def collect_events(client: AriaClient, **kw: Any) -> tuple[queue.Queue[Any], Any]:
    """Notifications, received on a thread into a queue, from a stream that is open on return."""
    stream = client.events(timeout=None, **kw)
    got: queue.Queue[Any] = queue.Queue()

    def pump() -> None:
        try:
            for n in stream:
                got.put(n)
        except grpc.RpcError:
            pass

    threading.Thread(target=pump, daemon=True).start()
    return got, stream


def task_events(got: queue.Queue[Any], task_id: str, count: int, timeout: float = 20) -> list[Any]:
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        n = got.get(timeout=max(0.01, deadline - time.monotonic()))
        if n.WhichOneof("event_payload") == "task_status" and n.task_status.task_id == task_id:
            found.append(n)
    return found


def test_a_task_followed_live_with_its_events_in_order(daemon):
    c = AriaClient(daemon.channel())
    got, stream = collect_events(c, event_types=["task_status"], after_sequence=0)
    task_id = c.launch(["sh", "-c", SCRIPT])

    outputs = []
    for out in c.output(task_id, follow=True):
        kind = out.WhichOneof("output")
        outputs.append((kind, getattr(out, kind)))
        if len(outputs) == 1:
            # live: the first line arrives while the task still runs
            assert c.task(task_id).status == aria_pb2.RUNNING
    # stdout and stderr are two pipes: each in order, not ordered with each other
    stdout = [(k, v) for k, v in outputs if k != "stderr_line"]
    assert stdout[0] == ("stdout_line", "one") and stdout[2] == ("stdout_line", "three")
    assert stdout[1][0] == "progress"
    assert (stdout[1][1].percent_complete, stdout[1][1].operation_description) == (40.0, "building")
    assert [v for k, v in outputs if k == "stderr_line"] == ["two"]
    assert len(outputs) == 4

    task = c.task(task_id)
    assert task.status == aria_pb2.COMPLETED and task.exit_code == 0
    assert task.current_operation == "building" and task.progress_percent == 100.0
    assert task.HasField("started_at") and task.HasField("completed_at")
    assert task.type == "container:run" and json.loads(task.command_json) == ["sh", "-c", SCRIPT]

    events = task_events(got, task_id, 3)
    assert [e.task_status.new_status for e in events] == [aria_pb2.PENDING, aria_pb2.RUNNING, aria_pb2.COMPLETED]
    assert events[-1].task_status.exit_code == 0 and not events[0].task_status.HasField("exit_code")
    assert [e.sequence for e in events] == sorted(e.sequence for e in events)
    time.sleep(0.3)
    assert got.empty(), "exactly one event per transition"
    stream.cancel()

    # the replay without follow ends after what was printed
    assert len(list(c.output(task_id))) == 4


def test_exit_codes_environment_and_failure(daemon):
    c = AriaClient(daemon.channel())
    failed = c.wait_task(c.launch(["sh", "-c", "echo $GREETING; exit 3"], environment={"GREETING": "hej"}))
    assert failed.status == aria_pb2.FAILED and failed.exit_code == 3
    assert "code 3" in failed.error_message
    assert [o.stdout_line for o in c.output(failed.id)] == ["hej"]
    assert dict(failed.environment) == {"GREETING": "hej"}

    missing = c.wait_task(c.launch(["no-such-program-here"]))
    assert missing.status == aria_pb2.FAILED


@pytest.mark.serial  # timed
def test_cancel_a_sleep_within_two_seconds(daemon):
    c = AriaClient(daemon.channel())
    task_id = c.launch(["sleep", "60"])
    deadline = time.monotonic() + 10
    while c.task(task_id).status != aria_pb2.RUNNING and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    assert c.cancel(task_id) is True
    task = c.wait_task(task_id, timeout=5)
    assert task.status == aria_pb2.CANCELLED
    assert time.monotonic() - started < 2.0
    assert c.cancel(task_id) is False  # finished: nothing to cancel

    done = c.wait_task(c.launch(["true"]))
    assert c.cancel(done.id) is False
    with pytest.raises(grpc.RpcError) as info:
        c.cancel("t-nonexistent")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_timeout(daemon):
    c = AriaClient(daemon.channel())
    # (3 s: on two loaded cores a sandbox once took over a second from RUNNING to its first line)
    task = c.wait_task(c.launch(["sh", "-c", "echo started; sleep 30"], timeout_seconds=3), timeout=20)
    assert task.status == aria_pb2.TIMEOUT
    assert "timed out" in task.error_message
    assert [o.stdout_line for o in c.output(task.id)] == ["started"]


def test_exec_in_a_running_container_and_not_in_a_stopped_one(daemon):
    c = AriaClient(daemon.channel())
    box = c.create_container("box", environment={"BOX": "yes"})
    c.container_call("Start", box.id)
    task = c.wait_task(c.launch(["sh", "-c", "echo $BOX; touch /tmp/mark"], type=f"container:exec:{box.id}"))
    assert task.status == aria_pb2.COMPLETED and task.container_id == box.id
    assert [o.stdout_line for o in c.output(task.id)] == ["yes"]
    # the exec shares the container's files
    again = c.wait_task(c.launch(["ls", "/tmp/mark"], type=f"container:exec:{box.id}"))
    assert again.status == aria_pb2.COMPLETED

    c.container_call("Stop", box.id)
    with pytest.raises(grpc.RpcError) as info:
        c.launch(["true"], type=f"container:exec:{box.id}")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    "command,problem",
    [
        ("echo hi", "not JSON"),
        ('{"argv": ["echo"]}', "JSON array"),
        ("[]", "not be empty"),
        ('["echo", 3]', "strings only"),
        ('[""]', "strings only"),
        ("", "not JSON"),
    ],
)
def test_bad_command_json(module_daemon, command, problem):
    c = AriaClient(module_daemon.channel())
    with pytest.raises(grpc.RpcError) as info:
        c.launch(command)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in info.value.details()
    assert bad_fields(info.value) == ["command_json"]


def test_bad_launches(daemon):
    c = AriaClient(daemon.channel())
    for kw, code in [
        ({"type": "docker:run"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"type": "container:exec:c-nonexistent"}, grpc.StatusCode.NOT_FOUND),
        ({"timeout_seconds": -1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"session_id": "s-nonexistent"}, grpc.StatusCode.NOT_FOUND),
        ({"parent_task_id": "t-nonexistent"}, grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            c.launch(["true"], **kw)
        assert info.value.code() == code, kw
    assert c.list_tasks().tasks == []  # nothing was launched


def test_other_users_tasks_and_containers_are_not_found(daemon):
    c = AriaClient(daemon.channel())
    box = c.create_container("mine")
    c.container_call("Start", box.id)
    task_id = c.launch(["sleep", "30"])
    assert as_other_user(daemon, f"c.launch(['true'], type='container:exec:{box.id}')") == "NOT_FOUND"
    assert as_other_user(daemon, f"c.cancel({task_id!r})") == "NOT_FOUND"
    assert as_other_user(daemon, f"c.task({task_id!r})") == "NOT_FOUND"
    assert as_other_user(daemon, f"list(c.output({task_id!r}))") == "NOT_FOUND"
    assert as_other_user(daemon, f"c.container_call('Stop', {box.id!r})") == "NOT_FOUND"
    assert as_other_user(daemon, "assert not c.list_tasks().tasks") == "OK"
    assert c.task(task_id).status in (aria_pb2.PENDING, aria_pb2.RUNNING)  # untouched
    c.cancel(task_id)
    c.container_call("Stop", box.id)


def test_sessions_and_parent_tasks(daemon):
    c = AriaClient(daemon.channel())
    session = c.session(context_data={"project": "demo"})
    assert session.status == "active" and dict(session.context_data) == {"project": "demo"}
    parent = c.launch(["true"], session_id=session.id)
    child = c.launch(["true"], session_id=session.id, parent_task_id=parent)
    c.launch(["true"])
    assert c.task(child).parent_task_id == parent and not c.task(parent).HasField("parent_task_id")
    in_session = c.list_tasks(session_id=session.id).tasks
    assert [t.id for t in in_session] == [child, parent]  # newest first
    with pytest.raises(grpc.RpcError) as info:
        c.session(agent_id="no-such-agent")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_launch_whose_caller_gives_up_is_still_watched_to_its_end(daemon_factory):
    """LaunchTask calls whose deadline passes mid-way: every task that was stored is watched and
    reaches its end (one stored but never watched stayed PENDING until the next restart)."""
    daemon = daemon_factory("--max-running-tasks", "1000")  # (65 launches in quick succession)
    c = AriaClient(daemon.channel())
    typical = typical_seconds(lambda _: c.launch(["true"]))
    request = tpb.LaunchTaskRequest(command_json='["true"]')
    give_up_midway(
        lambda timeout: c.call(TASKS + "LaunchTask", request, tpb.LaunchTaskResponse, timeout=timeout),
        [typical * (0.2 + step / 50) for step in range(60)],
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tasks = c.list_tasks(page_size=100).tasks
        if all(t.status == aria_pb2.COMPLETED for t in tasks):
            break
        time.sleep(0.1)
    unfinished = [(t.id, aria_pb2.TaskStatus.Name(t.status)) for t in tasks if t.status != aria_pb2.COMPLETED]
    assert not unfinished, f"never finished: {unfinished}"
    assert len(tasks) >= 5
