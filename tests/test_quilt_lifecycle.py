"""Container and task lifecycles that tell the truth, checked against /proc."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from waiting import wait_until

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

from conftest import give_up_midway, start_quilt, typical_seconds
from quilt_client import C, QuiltClient, T, alive, born, error_of


@pytest.fixture
def q(module_quilt):
    """A client of the module's Quilt: for the tests that look only at their own containers and tasks."""
    with module_quilt.channel() as ch:
        yield QuiltClient(ch)


@pytest.fixture
def own_q(quilt):
    """A client of a Quilt of the test's own: for one that lists every task, or stops its Quilt."""
    with quilt.channel() as ch:
        yield QuiltClient(ch)


def tree(pid: int) -> set[int]:
    """pid and all its descendants, from /proc."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def tree_of_at_least(pid_of, n: int, timeout: float = 10) -> set[int]:
    """tree(pid_of()) once it holds n processes (the sandbox's children start after it does)."""
    return wait_until(lambda: found if len(found := tree(pid_of())) >= n else None, timeout, what=f"a tree of {n}")


def wait_gone(pids: set[int], timeout: float = 5) -> set[int]:
    """Those of `pids` still alive after `timeout` (each the process it was when this was called:
    a pid taken again meanwhile by another process is gone)."""
    started = {p: born(p) for p in pids}

    def there(p: int) -> bool:
        return started[p] is not None and born(p) == started[p] and alive(p)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(there(p) for p in pids):
        time.sleep(0.02)
    return {p for p in pids if there(p)}


def test_created_running_exited_with_codes_and_signals(q):
    c = q.create(["/bin/sh", "-c", "exit 3"])
    assert c.state == pb.CONTAINER_CREATED and c.pid == 0
    q.start(c.id)
    end = q.wait_container(c.id)
    assert (end.state, end.exit_code, end.message) == (pb.CONTAINER_EXITED, 3, "exited with code 3")
    assert not end.HasField("signal") and end.HasField("started_at") and end.HasField("finished_at")

    killed = q.run(["/bin/sleep", "100"])  # (pid 1 cannot be killed from inside its namespace)
    time.sleep(0.2)
    os.kill(q.get(killed.id).pid, signal.SIGKILL)
    end = q.wait_container(killed.id)
    assert (end.state, end.signal) == (pb.CONTAINER_EXITED, 9)
    assert "signal 9" in end.message


def test_invalid_transitions_are_failed_precondition(q):
    c = q.run()
    err = error_of(q.start, c.id)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already running" in err.details()
    q.stop(c.id)
    for call in (lambda: q.stop(c.id), lambda: q.exec(c.id, ["/bin/true"])):
        assert error_of(call).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_an_ended_container_starts_again_with_its_workspace_as_it_was(q):
    c = q.run()
    q.exec(c.id, ["sh", "-c", "echo kept > /workspace/note"])
    assert q.stop(c.id).state == pb.CONTAINER_STOPPED
    again = q.start(c.id)
    assert again.state == pb.CONTAINER_RUNNING and not again.HasField("exit_code")
    assert q.exec(c.id, ["cat", "/workspace/note"]).stdout == "kept\n"
    q.stop(c.id)
    once = q.run(["sh", "-c", "echo run $(cat /workspace/n 2>/dev/null || echo 0); echo 1 > /workspace/n"])
    q.wait_container(once.id)
    q.start(once.id)  # (an exited one too)
    q.wait_container(once.id)
    assert [line.text for line in q.logs(once.id)] == ["run 0", "run 1"]  # its output goes on, both runs


def test_missing_ids_are_not_found(q):
    for call in (
        lambda: q.get("c-nope"),
        lambda: q.start("c-nope"),
        lambda: q.stop("c-nope"),
        lambda: q.remove("c-nope"),
        lambda: q.exec("c-nope", ["/bin/true"]),
        lambda: q.task("t-nope"),
        lambda: q.cancel("t-nope"),
        lambda: list(q.output("t-nope")),
    ):
        assert error_of(call).code() == grpc.StatusCode.NOT_FOUND


def test_stop_sends_sigterm_then_sigkill_and_leaves_nothing(q):
    # pid 1 of a namespace ignores SIGTERM unless it handles it: this one has to be killed.
    stubborn = q.run(["/bin/sh", "-c", "sleep 100 & sleep 100 & wait"])
    pids = tree_of_at_least(lambda: q.get(stubborn.id).pid, 3)
    started = time.monotonic()
    end = q.stop(stubborn.id, grace=0.5)
    assert 0.4 < time.monotonic() - started < 3
    assert end.state == pb.CONTAINER_STOPPED and end.signal == 9
    assert end.message == "stopped (killed after the grace period)"
    assert not wait_gone(pids)

    polite = q.run()  # the idle process ends at SIGTERM
    started = time.monotonic()
    end = q.stop(polite.id, grace=10)
    assert time.monotonic() - started < 2
    # (as a process SIGTERM ends: 143, no exit code of its own)
    assert end.state == pb.CONTAINER_STOPPED and end.signal == 15 and end.message == "stopped"


def test_remove_refuses_a_running_container_unless_forced(q, quilt):
    c = q.run(["/bin/sleep", "100"])
    time.sleep(0.2)
    pids = tree(q.get(c.id).pid)
    err = error_of(q.remove, c.id)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "force" in err.details()
    q.remove(c.id, force=True)
    assert error_of(q.get, c.id).code() == grpc.StatusCode.NOT_FOUND
    assert not wait_gone(pids)
    assert not (quilt.data_dir / "containers" / c.id).exists()


def test_task_timeout_kills_the_tree(q):
    c = q.run()
    t = q.exec_async(c.id, ["/bin/sh", "-c", "sleep 100 & sleep 100 & echo started; wait"], timeout_seconds=1)
    pids = tree_of_at_least(lambda: q.task(t.id).pid, 3)
    result = q.result(t.id)
    assert result.task.state == pb.TASK_TIMEOUT and "timed out after 1 s" in result.task.message
    assert result.stdout == "started\n"
    assert not wait_gone(pids)
    q.stop(c.id)


def test_cancel_kills_and_is_idempotent(q):
    c = q.run()
    t = q.exec_async(c.id, ["/bin/sh", "-c", "sleep 100 & wait"])
    pids = tree_of_at_least(lambda: q.task(t.id).pid, 2)  # sh and its sleep
    first = q.cancel(t.id)
    assert first.cancelled and first.task.state == pb.TASK_CANCELLED
    again = q.cancel(t.id)
    assert not again.cancelled and again.task.state == pb.TASK_CANCELLED
    assert not wait_gone(pids)
    done = q.exec(c.id, ["/bin/true"])
    assert not q.cancel(done.task.id).cancelled  # a finished task: nothing to cancel
    q.stop(c.id)


def test_stopping_a_container_cancels_its_tasks(q):
    c = q.run()
    t = q.exec_async(c.id, ["/bin/sleep", "100"])
    q.stop(c.id)
    task = q.task(t.id)
    assert task.state == pb.TASK_CANCELLED and c.id in task.message


def test_a_follower_sees_a_line_before_the_process_ends(q):
    c = q.run()
    t = q.exec_async(c.id, ["/bin/sh", "-c", "echo first; sleep 3; echo second"])
    seen: list[tuple[str, float]] = []
    started = time.monotonic()
    for line in q.output(t.id, follow=True):
        seen.append((line.text, time.monotonic() - started))
    assert [text for text, _ in seen] == ["first", "second"]
    assert seen[0][1] < 1.5 and seen[1][1] > 2.5  # "first" arrived while it slept
    assert q.task(t.id).state == pb.TASK_COMPLETED

    logs_c = q.run(["/bin/sh", "-c", "echo up; sleep 2; echo down"])
    started = time.monotonic()
    first = next(iter(q.logs(logs_c.id, follow=True)))
    assert first.text == "up" and time.monotonic() - started < 1.5
    q.stop(c.id)


def test_output_from_an_offset_with_streams_and_timestamps(q):
    c = q.run()
    r = q.exec(c.id, ["/bin/sh", "-c", "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done"])
    lines = list(q.output(r.task.id))
    assert [(ln.offset, ln.stream) for ln in lines[:2]] == [(0, pb.STDOUT), (1, pb.STDERR)] or len(lines) == 10
    assert sorted(ln.text for ln in lines) == sorted(
        [f"out{i}" for i in range(1, 6)] + [f"err{i}" for i in range(1, 6)]
    )
    tail = list(q.output(r.task.id, offset=7))
    assert [ln.offset for ln in tail] == [7, 8, 9]
    assert all(ln.timestamp.seconds > 0 for ln in lines)
    assert r.stdout == "".join(f"out{i}\n" for i in range(1, 6))
    q.stop(c.id)


def test_output_is_capped_with_a_marker_and_kept_after_exit(sock_dir):
    quilt = start_quilt(sock_dir, "--max-output-bytes", "10000")
    try:
        with quilt.channel() as ch:
            q = QuiltClient(ch)
            c = q.run()
            r = q.exec(
                c.id, ["/usr/bin/python3", "-c", "print('x' * 99, flush=True)\nfor i in range(1000): print('y' * 99)"]
            )
            assert r.task.state == pb.TASK_COMPLETED and r.task.output_truncated
            lines = list(q.output(r.task.id))
            kept = [ln for ln in lines if ln.stream == pb.STDOUT]
            assert sum(len(ln.text) for ln in kept) <= 10000
            markers = [ln.text for ln in lines if ln.stream == pb.SYSTEM]
            assert markers[0].startswith("[quilt] output truncated") and "dropped" in markers[-1]
            q.stop(c.id)
            assert len(list(q.output(r.task.id))) == len(lines)  # still there after the container stopped
    finally:
        quilt.stop()


def test_list_tasks_filters_and_sync_exec_result(own_q):
    c = own_q.run()
    ok = own_q.exec(c.id, ["/bin/echo", "hi"], stdin=b"ignored")
    bad = own_q.exec(c.id, ["/bin/sh", "-c", "cat; exit 4"], stdin=b"from stdin")
    assert (ok.task.state, ok.stdout) == (pb.TASK_COMPLETED, "hi\n")
    assert (bad.task.state, bad.task.exit_code, bad.stdout) == (pb.TASK_FAILED, 4, "from stdin")
    listed = own_q.call(T + "ListTasks", pb.ListTasksRequest(container_id=c.id), pb.ListTasksResponse)
    assert [t.id for t in listed.tasks] == [ok.task.id, bad.task.id]
    failed = own_q.call(T + "ListTasks", pb.ListTasksRequest(states=[pb.TASK_FAILED]), pb.ListTasksResponse)
    assert [t.id for t in failed.tasks] == [bad.task.id]
    running = own_q.exec_async(c.id, ["/bin/sleep", "5"])
    err = error_of(own_q.result, running.id, wait=False)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    own_q.stop(c.id)


def test_restart_marks_lost_work_failed_and_leaves_nothing_running(sock_dir):
    quilt = start_quilt(sock_dir)
    with quilt.channel() as ch:
        q = QuiltClient(ch)
        c = q.run(["/bin/sleep", "100"])
        idle = q.run()
        t = q.exec_async(idle.id, ["/bin/sleep", "100"])
        time.sleep(0.3)
        pids = tree(q.get(c.id).pid) | tree(q.task(t.id).pid)
    quilt.stop(signal.SIGKILL)
    assert not wait_gone(pids)  # --die-with-parent: the sandboxes went with quilt
    again = start_quilt(sock_dir)
    try:
        with again.channel() as ch:
            q = QuiltClient(ch)
            for cid in (c.id, idle.id):
                lost = q.get(cid)
                assert (lost.state, lost.message, lost.pid) == (pb.CONTAINER_FAILED, "quilt restarted", 0)
            task = q.task(t.id)
            assert (task.state, task.message) == (pb.TASK_FAILED, "quilt restarted")
            assert any(e.get("event") == "quilt restarted: marked lost work as failed" for e in again.logs())
    finally:
        assert again.stop() == 0


def test_shutdown_stops_containers_and_exits_zero(sock_dir):
    quilt = start_quilt(sock_dir)
    with quilt.channel() as ch:
        q = QuiltClient(ch)
        c = q.run(["/bin/sleep", "100"])
        time.sleep(0.2)
        pids = tree(q.get(c.id).pid)
    assert quilt.stop() == 0
    assert not wait_gone(pids)
    again = start_quilt(sock_dir)
    try:
        with again.channel() as ch:
            stopped = QuiltClient(ch).get(c.id)
            assert (stopped.state, stopped.message) == (pb.CONTAINER_STOPPED, "quilt shut down")
    finally:
        again.stop()


def test_sync_exec_is_cancelled_when_its_caller_leaves(q):
    c = q.run()
    err = error_of(q.exec, c.id, ["/bin/sleep", "100"], timeout=0.5)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    listing = pb.ListTasksRequest(container_id=c.id)
    tasks = wait_until(
        lambda: [t for t in q.call(T + "ListTasks", listing, pb.ListTasksResponse).tasks if t.state != pb.TASK_RUNNING],
        timeout=5,
        what="the task ended",
    )
    assert tasks[0].state == pb.TASK_CANCELLED and "the caller went away" in tasks[0].message
    q.stop(c.id)


def test_the_daemon_keeps_serving_many_at_once(q):
    c = q.run()
    results = []

    def run(i):
        results.append(q.exec(c.id, ["/bin/sh", "-c", f"echo {i}"]).stdout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == sorted(f"{i}\n" for i in range(8))
    q.stop(c.id)


def test_container_logs_since_a_time(q):
    c = q.run(["/bin/sh", "-c", "echo early; sleep 1; echo late"])
    q.wait_container(c.id)
    lines = list(q.logs(c.id))
    assert [ln.text for ln in lines] == ["early", "late"]
    since = lines[1].timestamp
    later = q.stream("/quilt.v1.Containers/ContainerLogs", pb.ContainerLogsRequest(id=c.id, since=since), pb.OutputLine)
    assert [ln.text for ln in later] == ["late"]


def test_a_start_whose_caller_gives_up_still_ends_under_supervision(quilt, own_q):
    """StartContainer calls whose deadline passes while the sandbox starts: each container either
    never started or runs to its end, watched; none is left running unwatched, and Quilt stops at
    once. (A start cancelled half-way used to leave a running container nobody supervised, and a
    shutdown that waited for it until it was killed.)"""
    ids: list[str] = []

    def new_container() -> str:
        ids.append(own_q.create(["/bin/true"]).id)
        return ids[-1]

    typical = typical_seconds(own_q.start, new_container)  # how long a start takes here
    # deadlines from well before the end of a start to just after it
    give_up_midway(
        lambda timeout: own_q.call(
            C + "StartContainer", pb.ContainerRef(id=new_container()), pb.Container, timeout=timeout
        ),
        [typical * (0.4 + step / 75) for step in range(60)],
    )
    states = {}
    for cid in ids:
        deadline = time.monotonic() + 10
        while (state := own_q.get(cid).state) == pb.CONTAINER_RUNNING and time.monotonic() < deadline:
            time.sleep(0.02)
        states[cid] = state
    unwatched = [cid for cid, state in states.items() if state == pb.CONTAINER_RUNNING]
    assert not unwatched, f"left running, never to end: {unwatched}"
    assert set(states.values()) <= {pb.CONTAINER_CREATED, pb.CONTAINER_EXITED}, states
    assert list(states.values()).count(pb.CONTAINER_EXITED) >= 5  # the five timed starts, at least
    started = time.monotonic()
    assert quilt.stop() == 0
    assert time.monotonic() - started < 5


def test_an_exec_whose_caller_gives_up_still_ends_under_supervision(quilt, own_q):
    """The same for ExecAsync: every task that began runs to its end, and Quilt stops at once."""
    box = own_q.run()  # an idle container
    typical = typical_seconds(lambda _: own_q.exec_async(box.id, ["/bin/true"]))
    request = pb.ExecRequest(container_id=box.id, command=["/bin/true"])
    give_up_midway(
        lambda timeout: own_q.call(T + "ExecAsync", request, pb.Task, timeout=timeout),
        [typical * (0.4 + step / 75) for step in range(60)],
    )
    listing = pb.ListTasksRequest(container_id=box.id)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tasks = own_q.call(T + "ListTasks", listing, pb.ListTasksResponse).tasks
        if all(t.state == pb.TASK_COMPLETED for t in tasks):
            break
        time.sleep(0.05)
    unfinished = [(t.id, t.state) for t in tasks if t.state != pb.TASK_COMPLETED]
    assert not unfinished, f"left unfinished: {unfinished}"
    assert len(tasks) >= 5
    started = time.monotonic()
    assert quilt.stop() == 0
    assert time.monotonic() - started < 5
