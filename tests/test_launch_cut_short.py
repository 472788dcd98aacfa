"""A runtime stopped in the middle of a launch: the task it stored runs once, at the next start.

Three places a launch can be cut: after the task is stored but before Quilt hears of it (it is
launched then), after Quilt made its container or exec but before the runtime wrote down which
(found by its label and adopted: never a second one), and for real: a runtime killed while its
Quilt, frozen with SIGSTOP, holds the launch unanswered.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import sqlite_utils
from test_survival import quilts_of, stop_quilt

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.quilt.v1 import quilt_pb2 as pb
from aria_trio.runtime.store import tasks as tasks_table
from aria_trio.shared.sqlite import now_us

from aria_client import AriaClient
from conftest import Daemon, start_daemon
from quilt_client import QuiltClient

GRACE = ("--quilt-orphan-grace", "120")  # the Quilt outlives the runtime killed in each test


def stored_row(d: Daemon, task_id: str) -> dict[str, Any]:
    with sqlite_utils.Database(d.data_dir / "runtime.db") as db:
        return next(db.query("SELECT * FROM tasks WHERE id = ?", [task_id]))


def store_pending(d: Daemon, like: dict[str, Any], task_id: str, argv: list[str], **fields: Any) -> None:
    """What a launch stores first, written while no runtime runs (the one killed was in between)."""
    row = {
        "id": task_id,
        "user_id": like["user_id"],
        "session_id": like["session_id"],
        "container_id": "",
        "parent_task_id": None,
        "type": "container:run",
        "command_json": json.dumps(argv),
        "environment_json": "{}",
        "timeout_seconds": 600,
        "status": tasks_table.PENDING,
        "created_at": now_us(),
        "progress_percent": 0.0,
        "current_operation": "",
        **fields,
    }
    with sqlite_utils.Database(d.data_dir / "runtime.db") as db:
        tasks_table.insert(db, row, "launched")


def quilt_client(d: Daemon) -> QuiltClient:
    import grpc

    return QuiltClient(grpc.insecure_channel(f"unix:{d.data_dir / 'quilt.sock'}"))


def containers_of(q: QuiltClient, task_id: str) -> list[pb.Container]:
    request = pb.ListContainersRequest(labels={"aria.task": task_id})
    return list(q.call("/quilt.v1.Containers/ListContainers", request, pb.ListContainersResponse).containers)


def wait_gone(q: QuiltClient, task_id: str) -> None:
    """The task's throw-away container is removed (just after the task is recorded as ended)."""
    deadline = time.monotonic() + 10
    while containers_of(q, task_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert containers_of(q, task_id) == []


def said(d: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in d.logs() if e.get("event") == event]


def test_a_task_stored_but_never_launched_runs_once_at_the_next_start(sock_dir):
    d = start_daemon(sock_dir, *GRACE)
    try:
        c = AriaClient(d.channel())
        like = stored_row(d, c.wait_task(c.launch(["true"])).id)
        d.stop(signal.SIGKILL)
        store_pending(d, like, "t-00000000000000a1", ["sh", "-c", "echo ran once"])
        d = start_daemon(sock_dir, *GRACE)
        c = AriaClient(d.channel())
        done = c.wait_task("t-00000000000000a1")
        assert (done.status, done.exit_code) == (aria_pb2.COMPLETED, 0), done
        assert [o.stdout_line for o in c.output(done.id)] == ["ran once"]
        assert [
            e["task"] for e in said(d, "launching a task stored by a runtime that stopped before launching it")
        ] == [done.id]
        wait_gone(quilt_client(d), done.id)  # (its throw-away container goes)
    finally:
        d.stop()
        stop_quilt(quilts_of(d.data_dir))


def test_a_container_made_but_not_written_down_is_adopted_not_made_again(sock_dir):
    d = start_daemon(sock_dir, *GRACE)
    try:
        c = AriaClient(d.channel())
        like = stored_row(d, c.wait_task(c.launch(["true"])).id)
        box = c.create_container("keeper", persistent=True)
        c.container_call("Start", box.id)
        box_quilt = AriaClient(d.channel()).container_call("Get", box.id)
        d.stop(signal.SIGKILL)
        q = quilt_client(d)
        # a run: Quilt made (not started) the container, the runtime died before recording it
        run_id = "t-00000000000000b1"
        labels = {"aria.user": like["user_id"], "aria.task": run_id}
        q.create(["sh", "-c", "echo adopted"], name=run_id, labels=labels)
        store_pending(d, like, run_id, ["sh", "-c", "echo adopted"])
        # an exec: Quilt started it, the runtime died before recording its id
        exec_id = "t-00000000000000b2"
        quilt_box = stored_box(d, box.id)
        request = pb.ExecRequest(
            container_id=quilt_box, command=["sh", "-c", "echo exec adopted"], labels={**labels, "aria.task": exec_id}
        )
        q.call("/quilt.v1.Tasks/ExecAsync", request, pb.Task)
        store_pending(
            d, like, exec_id, ["sh", "-c", "echo exec adopted"], type=f"container:exec:{box.id}", container_id=quilt_box
        )
        d = start_daemon(sock_dir, *GRACE)
        c = AriaClient(d.channel())
        for task_id, line in ((run_id, "adopted"), (exec_id, "exec adopted")):
            done = c.wait_task(task_id)
            assert (done.status, done.exit_code) == (aria_pb2.COMPLETED, 0), done
            assert [o.stdout_line for o in c.output(task_id)] == [line]  # the one Quilt had: once
        assert [e["task"] for e in said(d, "adopted the container of a task whose launch was cut short")] == [run_id]
        assert [e["task"] for e in said(d, "adopted the exec of a task whose launch was cut short")] == [exec_id]
        assert not said(d, "launching a task stored by a runtime that stopped before launching it")
        execs = q.call("/quilt.v1.Tasks/ListTasks", pb.ListTasksRequest(container_id=quilt_box), pb.ListTasksResponse)
        assert [t.labels["aria.task"] for t in execs.tasks if "aria.task" in t.labels] == [exec_id]
        assert box_quilt.status == aria_pb2.RUNNING
        c.container_call("Stop", box.id)
    finally:
        d.stop()
        stop_quilt(quilts_of(d.data_dir))


def stored_box(d: Daemon, container_id: str) -> str:
    with sqlite_utils.Database(d.data_dir / "runtime.db") as db:
        return str(
            next(db.query("SELECT quilt_container_id FROM containers WHERE id = ?", [container_id]))[
                "quilt_container_id"
            ]
        )


def created_in_quilt(d: Daemon, marker: str) -> int:
    """How many containers Quilt made to run a command holding `marker` (from its logs: at first it
    logs with its runtime, once that one is gone to its data folder's quilt.log)."""
    logs: list[Path] = [d.log_path, *d.data_dir.glob("quilt/quilt.log")]
    logs += sorted(Path(d.log_path).parent.glob("runtime-*.log"))
    seen = set()
    for path in set(logs):
        for line in path.read_text(errors="replace").splitlines():
            if '"container created"' in line and marker in line:
                seen.add(json.loads(line)["container"])
    return len(seen)


def test_a_runtime_killed_while_quilt_holds_its_launch(sock_dir):
    """For real: Quilt frozen (SIGSTOP) while a launch waits on it, the runtime killed, Quilt let
    go. Whether or not Quilt then made the container, the task runs once and completes."""
    d = start_daemon(sock_dir, *GRACE)
    try:
        c = AriaClient(d.channel())
        c.wait_task(c.launch(["true"]))
        (quilt,) = quilts_of(d.data_dir)
        os.kill(quilt, signal.SIGSTOP)
        try:
            task_id = c.launch(["sh", "-c", "echo cut-short-launch"])
            time.sleep(0.5)
            d.stop(signal.SIGKILL)
        finally:
            os.kill(quilt, signal.SIGCONT)
        d = start_daemon(sock_dir, *GRACE)
        c = AriaClient(d.channel())
        done = c.wait_task(task_id)
        assert (done.status, done.exit_code) == (aria_pb2.COMPLETED, 0), done
        assert [o.stdout_line for o in c.output(task_id)] == ["cut-short-launch"]
        assert created_in_quilt(d, "cut-short-launch") == 1
        assert quilts_of(d.data_dir) == [quilt]
        wait_gone(quilt_client(d), task_id)
    finally:
        d.stop()
        stop_quilt(quilts_of(d.data_dir))
