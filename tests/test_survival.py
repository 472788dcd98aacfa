"""The runtime restarts; the work goes on: its Quilt outlives it, and the next runtime adopts it.

Real daemons, real signals: a kill -9 and a SIGTERM of the runtime while a task prints, a
persistent container through a restart, a Quilt that belongs to someone else refused, and a Quilt
left without a runtime stopping its work after its orphan grace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from aria_trio.proto.aria.v1 import aria_pb2

from aria_client import AriaClient
from conftest import start_daemon, start_quilt
from quilt_client import alive, quilt_daemons, sandbox_processes


def quilts_of(data_dir: Path) -> list[int]:
    """Every Quilt process serving this runtime data folder's Quilt (there must be one at most)."""
    return quilt_daemons(str(data_dir / "quilt").encode() + b"\0")


def stop_quilt(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def task_events(c: AriaClient, task_id: str) -> list[tuple[int, str]]:
    """(sequence, status) of the task's events, from the start, until none comes for 2 s."""
    got = []
    try:
        for n in c.events(timeout=2, after_sequence=0, event_types=["task_status"]):
            if n.task_status.task_id == task_id:
                got.append((n.sequence, aria_pb2.TaskStatus.Name(n.task_status.new_status)))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return got


def container_events(c: AriaClient, container_id: str) -> list[tuple[int, str]]:
    """(status, message) of the container's events, from the start, until none comes for 2 s."""
    got = []
    try:
        for n in c.events(timeout=2, after_sequence=0, event_types=["container_status"]):
            if n.container_status.container_id == container_id:
                got.append((n.container_status.new_status, n.container_status.status_message))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return got


def test_a_printing_task_survives_a_kill_9_and_a_sigterm_of_the_runtime(sock_dir):
    grace = ("--quilt-orphan-grace", "120")
    d = start_daemon(sock_dir, *grace)
    quilt = quilts_of(d.data_dir)
    try:
        c = AriaClient(d.channel())
        task_id = c.launch(["sh", "-c", "for i in $(seq 1 200); do echo line $i; sleep 0.1; done"])
        time.sleep(5)
        d.stop(signal.SIGKILL)  # the runtime dies; its Quilt and the task go on
        assert quilts_of(d.data_dir) == quilt
        d = start_daemon(sock_dir, *grace)  # adopts it: never a second Quilt
        assert quilts_of(d.data_dir) == quilt
        assert any(e.get("event") == "adopted the quilt already running, with its work" for e in d.logs())
        time.sleep(5)
        d.stop(signal.SIGTERM)  # a clean stop leaves the work too
        assert quilts_of(d.data_dir) == quilt
        d = start_daemon(sock_dir, *grace)
        c = AriaClient(d.channel())
        done = c.wait_task(task_id, timeout=60)
        assert (aria_pb2.TaskStatus.Name(done.status), done.exit_code) == ("COMPLETED", 0), done
        lines = [o.stdout_line for o in c.output(task_id)]
        assert lines == [f"line {i}" for i in range(1, 201)]  # all of them, in order, once each
        events = task_events(c, task_id)
        assert [s for _, s in events] == ["PENDING", "RUNNING", "COMPLETED"]  # each transition once
        assert quilts_of(d.data_dir) == quilt
    finally:
        d.stop()
        stop_quilt(quilts_of(d.data_dir))


def test_a_task_that_ends_while_no_runtime_runs_is_recorded_with_its_true_end(sock_dir):
    """Its exit code and its times are Quilt's, not those of the runtime that saw it later."""
    grace = ("--quilt-orphan-grace", "120")
    d = start_daemon(sock_dir, *grace)
    try:
        c = AriaClient(d.channel())
        task_id = c.launch(["sh", "-c", "sleep 0.5; exit 3"])
        deadline = time.monotonic() + 20
        while c.task(task_id).status != aria_pb2.RUNNING and time.monotonic() < deadline:
            time.sleep(0.02)
        d.stop(signal.SIGKILL)
        time.sleep(3)  # it ends meanwhile
        d = start_daemon(sock_dir, *grace)
        done = AriaClient(d.channel()).wait_task(task_id)
        assert (aria_pb2.TaskStatus.Name(done.status), done.exit_code) == ("FAILED", 3), done
        ran = done.completed_at.ToMicroseconds() - done.started_at.ToMicroseconds()
        assert 400_000 <= ran < 2_500_000, ran  # (the 3 s without a runtime are not in it)
    finally:
        d.stop()
        stop_quilt(quilts_of(d.data_dir))


def test_a_persistent_container_keeps_running_through_a_restart_and_takes_an_exec(sock_dir):
    grace = ("--quilt-orphan-grace", "120")
    d = start_daemon(sock_dir, *grace)
    try:
        c = AriaClient(d.channel())
        box = c.create_container("keeper", persistent=True)
        c.container_call("Start", box.id)
        first = c.launch(["sh", "-c", "echo kept > /workspace/note"], type=f"container:exec:{box.id}")
        assert c.wait_task(first).status == aria_pb2.COMPLETED
        d.stop(signal.SIGKILL)
        d = start_daemon(sock_dir, *grace)
        c = AriaClient(d.channel())
        assert c.container_call("Get", box.id).status == aria_pb2.RUNNING
        again = c.launch(["cat", "/workspace/note"], type=f"container:exec:{box.id}")
        assert c.wait_task(again).status == aria_pb2.COMPLETED
        assert [o.stdout_line for o in c.output(again)] == ["kept"]
        c.container_call("Stop", box.id)
        assert c.container_call("Get", box.id).status == aria_pb2.CANCELLED
    finally:
        d.stop()
        stop_quilt(quilts_of(d.data_dir))


def test_a_quilt_that_belongs_to_another_data_dir_is_refused_clearly(sock_dir):
    """Something that speaks quilt.v1 on our Quilt's socket, keeping its data elsewhere: the
    runtime neither uses it nor starts a second one; it says why and exits 1."""
    (sock_dir / "elsewhere").mkdir()
    (sock_dir / "data").mkdir(mode=0o700)
    theirs = sock_dir / "data" / "quilt.sock"
    stranger = start_quilt(sock_dir / "elsewhere", "--socket", str(theirs), wait=False)
    deadline = time.monotonic() + 20
    while not any(e.get("event") == "serving" for e in stranger.logs()):
        assert time.monotonic() < deadline and stranger.proc.poll() is None, stranger.log_path.read_text()
        time.sleep(0.05)
    try:
        log = sock_dir / "refused.log"
        argv = [sys.executable, "-m", "aria_trio", "serve", "--socket", str(sock_dir / "run" / "rt.sock")]
        argv += ["--data-dir", str(sock_dir / "data"), "--log-format", "json"]
        with open(log, "wb") as err:
            done = subprocess.run(argv, stderr=err, env={**os.environ, "HOME": str(sock_dir)}, timeout=60)
        assert done.returncode == 1
        text = log.read_text()
        assert "belongs to another runtime" in text and str(stranger.data_dir) in text
        assert stranger.proc.poll() is None  # left alone
    finally:
        stranger.stop()


def test_a_quilt_without_a_runtime_stops_its_work_after_its_grace(sock_dir):
    d = start_daemon(sock_dir, "--quilt-orphan-grace", "2")
    quilt = quilts_of(d.data_dir)
    c = AriaClient(d.channel())
    box = c.create_container("orphan", command=["sleep", "600"])
    c.container_call("Start", box.id)
    assert sandbox_processes(str(d.data_dir / "quilt"))
    d.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in quilt) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in quilt), "the orphaned Quilt is still running after its grace"
    assert not sandbox_processes(str(d.data_dir / "quilt"))  # and its work went with it
    # the next runtime starts a Quilt of its own and records how the container ended
    d = start_daemon(sock_dir)
    try:
        c = AriaClient(d.channel())
        got = c.wait_container(box.id, {aria_pb2.CANCELLED, aria_pb2.FAILED}, timeout=20)
        assert got.status == aria_pb2.CANCELLED  # stopped by its Quilt, at the end of the grace
        said = [m for status, m in container_events(c, box.id) if status == aria_pb2.CANCELLED]
        assert said == ["quilt shut down"], said
    finally:
        d.stop()
