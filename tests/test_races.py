"""Races, looped until they are gone: cancel against start, cancel against completion, stop with
execs in flight, two first uses of one bundle, and a followed task cancelled as it ends.

Each test repeats its race at least 100 times against one daemon (several repetitions at once),
then checks that every record is final and true (the runtime's and Quilt's agree; exit codes are
what really happened) and that no process of any sandbox is left (races.leftovers). A failure
lists each kind of problem once, with how often it was seen and an example or two.

The truth the records are held to: a task that exited by itself (exit 0) before the cancel
reached it is COMPLETED with exit 0, and CancelTask said it was not cancelled; a task the cancel
ended was killed (a signal, no exit code 0) and is CANCELLED, and CancelTask said so.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
import races
from test_quilt_bundles import messages, upload

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import container_pb2 as cpb
from aria_trio.proto.aria.v1 import session_pb2 as spb
from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

import conftest
from aria_client import FINISHED as ARIA_FINISHED
from aria_client import SESSIONS, AriaClient
from quilt_client import B, C, QuiltClient, T

QUILT_FINISHED = {pb.TASK_COMPLETED, pb.TASK_FAILED, pb.TASK_CANCELLED, pb.TASK_TIMEOUT}
BUSY = ("--max-running-tasks", "1000", "--max-running-containers", "1000", "--max-turns", "64")
QUILT_TO_ARIA = {
    pb.TASK_COMPLETED: aria_pb2.COMPLETED,
    pb.TASK_FAILED: aria_pb2.FAILED,
    pb.TASK_CANCELLED: aria_pb2.CANCELLED,
    pb.TASK_TIMEOUT: aria_pb2.TIMEOUT,
}


def qstate(t: pb.Task) -> str:
    return pb.TaskState.Name(t.state)


def cstate(c: pb.Container) -> str:
    return pb.ContainerState.Name(c.state)


def astate(status: int) -> str:
    return aria_pb2.TaskStatus.Name(status)


def exit_of(msg: Any) -> int | None:
    return msg.exit_code if msg.HasField("exit_code") else None


def quilt_task_final(t: pb.Task) -> list[str]:
    """What is wrong with a task record of Quilt's that should be final ([] if nothing)."""
    bad = []
    if t.state not in QUILT_FINISHED:
        bad.append(f"Quilt's task is still {qstate(t)}")
    if t.pid != 0:
        bad.append("Quilt's finished task still has a pid")
    if not t.HasField("finished_at"):
        bad.append("Quilt's task has no finished_at")
    if t.state == pb.TASK_COMPLETED and (exit_of(t) != 0 or t.HasField("signal")):
        bad.append("Quilt: COMPLETED without exit 0")
    never_started = not t.HasField("started_at") and not t.HasField("exit_code")
    if t.state == pb.TASK_CANCELLED and not t.HasField("signal") and not never_started:
        bad.append(f"Quilt: CANCELLED, but the process was not killed: it exited by itself with {exit_of(t)}")
    if t.state == pb.TASK_FAILED and not t.message:
        bad.append("Quilt: FAILED without a reason")
    return bad


LOGS = Path("/tmp/aria-races-logs")


@pytest.fixture
def sock_dir() -> Any:
    """conftest's sock_dir, under a prefix of these tests' own: other sessions on the machine that
    clear /tmp/aria-t-* then leave these daemons (which run for a while) alone."""
    path = Path(tempfile.mkdtemp(prefix="aria-races-", dir="/tmp"))
    yield path
    for d in conftest._STARTED:
        if d.proc.poll() is None and path in d.socket.parents:
            d.stop(signal.SIGKILL)
    conftest._STARTED[:] = [d for d in conftest._STARTED if d.proc.poll() is None]
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def keep_logs(request, sock_dir):
    """The daemons' logs of each test, kept in /tmp/aria-races-logs/<test>/ (for the report)."""
    yield
    target = LOGS / request.node.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for log in sock_dir.glob("*.log"):
        shutil.copy(log, target / log.name)


@pytest.fixture
def q(quilt):
    with quilt.channel() as ch:
        yield QuiltClient(ch)


def quilt_leftovers(quilt: Any, mark: str, problems: races.Problems) -> None:
    left = races.wait_no_leftovers(quilt.proc.pid, quilt.data_dir, mark)
    if left:
        problems.add("processes", ["sandbox processes left alive"], "; ".join(left[:6]))


def cancel(q: QuiltClient, tid: str, timeout: float = 10) -> tuple[str, Any, float]:
    """CancelTask: (code, reply or details, seconds it took)."""
    began = time.monotonic()
    got = races.outcome(q.call, T + "CancelTask", pb.TaskRef(id=tid), pb.CancelTaskResponse, timeout=timeout)
    return got[0], got[1], time.monotonic() - began


def finish(problems: races.Problems, total: int, summary: str) -> None:
    print(summary)
    assert not problems, summary + "\n" + problems.report(total)


# -- 1. cancel against start (Quilt) ----------------------------------------------------------------


def test_quilt_cancel_right_after_exec_async(quilt, q):
    """CancelTask at once (and 1 to 50 ms) after ExecAsync returned: each `sleep 30` ends
    CANCELLED (killed) within moments, CancelTask answers cancelled=True, nothing is left."""
    mark = races.new_mark()
    env = {races.MARK_KEY: mark}
    box = q.run(env=env)
    delays = [0, 0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05]

    def one(i: int) -> tuple[str, tuple[str, Any, float]]:
        t = q.exec_async(box.id, ["sleep", "30"], env=env)
        races.at(time.monotonic(), delays[i % len(delays)])
        return t.id, cancel(q, t.id)

    began = time.monotonic()
    results = races.Pool(8).map(one, range(200))
    took = time.monotonic() - began
    problems = races.Problems()
    for tid, (code, reply, secs) in results:
        if code != "ok":
            problems.add(tid, [f"CancelTask failed {code}"], f"{reply} after {secs:.1f} s")
            continue
        final = q.task(tid)
        bad = quilt_task_final(final)
        if not reply.cancelled:
            bad.append("CancelTask answered cancelled=False for a sleep 30")
        if final.state != pb.TASK_CANCELLED:
            bad.append(f"a sleep 30 ended {qstate(final)}")
        if secs > 5:
            bad.append("CancelTask took more than 5 s")
        problems.add(tid, bad, races.short(final))
    q.stop(box.id)
    quilt_leftovers(quilt, mark, problems)
    finish(problems, len(results), f"{len(results)} repetitions in {took:.1f} s")


# A cancel of a pending exec answers once the exec's sandbox, started meanwhile, is killed: on two
# loaded cores (20 execs at once, beside the other workers) that has taken more than 3 s.
CANCEL_ANSWER = 15


def test_quilt_cancel_of_an_exec_still_pending(quilt, q):
    """CancelTask of a task still PENDING (ExecAsync in flight, its sandbox being made), found by
    polling ListTasks: CancelTask must answer within moments, the task end CANCELLED and killed,
    not run on to its end (nor past its timeout)."""
    mark = races.new_mark()
    env = {races.MARK_KEY: mark}
    box = q.run(env=env)
    execs = races.Pool(20)
    listing = pb.ListTasksRequest(container_id=box.id, states=[pb.TASK_PENDING])

    def one(i: int) -> tuple[str, bool, tuple[str, Any, float]]:
        label = f"pending-{i}"
        started = execs.submit(races.outcome, q.exec_async, box.id, ["sleep", "30"], env=env, labels={"race": label})
        while not started.done():
            tasks = q.call(T + "ListTasks", listing, pb.ListTasksResponse).tasks
            found = [t for t in tasks if t.labels.get("race") == label]
            if found:
                return found[0].id, True, cancel(q, found[0].id, timeout=CANCEL_ANSWER)
        code, t = started.result()
        assert code == "ok", t
        return t.id, False, cancel(q, t.id, timeout=CANCEL_ANSWER)

    began = time.monotonic()
    results = races.Pool(20).map(one, range(100))
    took = time.monotonic() - began
    caught = sum(1 for _, pending, _ in results if pending)
    problems = races.Problems()
    for tid, pending, (code, reply, _) in results:
        when = "PENDING" if pending else "RUNNING"
        if code != "ok":
            now = q.task(tid)
            then = f"the task then {qstate(now)}" + (", its process running on" if now.pid else "")
            problems.add(
                tid, [f"CancelTask of a {when} task: {code} (no answer in {CANCEL_ANSWER} s); {then}"], races.short(now)
            )
            continue
        final = q.task(tid)
        bad = quilt_task_final(final)
        if not reply.cancelled or final.state != pb.TASK_CANCELLED:
            bad.append(f"{when}: cancelled={reply.cancelled}, ended {qstate(final)}")
        problems.add(tid, bad, races.short(final))
    stopped = races.outcome(q.stop, box.id)
    if stopped[0] != "ok":
        problems.add(box.id, [f"StopContainer afterwards: {stopped[0]}"], str(stopped[1]))
    quilt_leftovers(quilt, mark, problems)
    if caught < 20:
        problems.add("", [f"only {caught} of the cancels caught a PENDING task"])
    finish(problems, len(results), f"{len(results)} repetitions ({caught} caught PENDING) in {took:.1f} s")


# -- 1. stop against start --------------------------------------------------------------------------

STOP_DELAYS = [0, 0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12]
# A stop this long after its start is surely after it, even on a loaded machine: below, Quilt may
# read both from one batch of frames, and trio runs the two calls' tasks in either order (then a
# stop that comes first is rightly refused: the container is not running yet).
SURELY_AFTER = 0.05


def stop_against_start(start: Any, stop: Any, delay: float) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """Start (sent first, as a future), then after `delay` Stop; both outcomes."""
    future = start()
    time.sleep(delay)
    stopped = races.outcome(stop)
    try:
        started: tuple[str, Any] = ("ok", future.result(timeout=30))
    except grpc.RpcError as err:
        started = (err.code().name, err.details())
    return started, stopped


def test_quilt_stop_against_start(quilt, q):
    """StopContainer sent 0 to 120 ms after StartContainer (one connection, the start first), while
    the start runs. A stop SURELY_AFTER or more after the start must stop the container:
    not be refused "created, not running" while the start it raced then succeeds and the container
    runs on. Every container ends STOPPED and final; nothing is left."""
    mark = races.new_mark()
    env = {races.MARK_KEY: mark}
    start_call = q.channel.unary_unary(C + "StartContainer", pb.ContainerRef.SerializeToString, pb.Container.FromString)

    def one(i: int) -> tuple[str, float, Any, Any]:
        c = q.create(None, env=env)
        delay = STOP_DELAYS[i % len(STOP_DELAYS)]
        started, stopped = stop_against_start(
            lambda: start_call.future(pb.ContainerRef(id=c.id), timeout=30), lambda: q.stop(c.id, grace=5), delay
        )
        return c.id, delay, started, stopped

    began = time.monotonic()
    results = races.Pool(8).map(one, range(150))
    took = time.monotonic() - began
    problems, refused = races.Problems(), Counter()
    for cid, delay, (scode, sval), (tcode, tval) in results:
        bad = []
        now = q.get(cid)
        if scode != "ok":
            bad.append(f"StartContainer failed {scode}: {sval}")
        if tcode == "ok":
            if tval.state != pb.CONTAINER_STOPPED or now.state != pb.CONTAINER_STOPPED:
                bad.append(f"StopContainer answered {cstate(tval)}, the container is {cstate(now)}")
        else:
            refused[f"{delay * 1000:.0f} ms"] += 1
            if now.state == pb.CONTAINER_RUNNING and delay >= SURELY_AFTER:
                bad.append(
                    f"StopContainer {delay * 1000:.0f} ms after StartContainer refused ({tcode}: {tval}); "
                    "the container runs on"
                )
            if now.state == pb.CONTAINER_RUNNING:
                q.stop(cid)
        final = q.get(cid)
        if final.state != pb.CONTAINER_STOPPED or final.pid != 0 or not final.HasField("finished_at"):
            bad.append(f"the container ends {cstate(final)}")
        problems.add(f"{cid} (stop at {delay * 1000:.0f} ms)", bad)
    quilt_leftovers(quilt, mark, problems)
    finish(
        problems, len(results), f"{len(results)} repetitions in {took:.1f} s; stops refused, by delay: {dict(refused)}"
    )


# -- the runtime ----------------------------------------------------------------------------------------


class Runtime:
    """A runtime (with its Quilt child) and clients of both."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.c = AriaClient(daemon.channel())
        self.quilt_channel = grpc.insecure_channel("unix:" + str(daemon.data_dir / "quilt.sock"))
        self.q = QuiltClient(self.quilt_channel)
        quilt_pid = races.quilt_pid_of_runtime(daemon.proc.pid)
        assert quilt_pid is not None
        self.quilt_pid = quilt_pid
        self.mark = races.new_mark()
        self.env = {races.MARK_KEY: self.mark}

    def row(self, tid: str) -> dict[str, Any]:
        return races.runtime_task_rows(self.daemon.data_dir, [tid])[tid]

    def leftovers(self, problems: races.Problems) -> None:
        left = races.wait_no_leftovers(
            self.quilt_pid, self.daemon.data_dir / "quilt", self.mark, daemons=[self.daemon.proc.pid]
        )
        if left:
            problems.add("processes", ["sandbox processes left alive"], "; ".join(left[:6]))

    def task_containers_left(self, problems: races.Problems) -> None:
        """Quilt containers made for container:run tasks are removed when the task ends."""
        listing = self.q.call(C + "ListContainers", pb.ListContainersRequest(), pb.ListContainersResponse)
        for c in listing.containers:
            if "aria.task" in c.spec.labels:
                task = self.c.task(c.spec.labels["aria.task"])
                problems.add(
                    c.spec.labels["aria.task"],
                    [f"the Quilt container of a finished container:run task was never removed ({cstate(c)})"],
                    f"task {astate(task.status)} {task.error_message!r}; container {c.id} {c.message!r}",
                )

    def box(self) -> Any:
        box = self.c.create_container("box", environment=self.env)
        self.c.container_call("Start", box.id)
        return box

    def stop(self, container_id: str, timeout: float = 10) -> tuple[str, Any]:
        request = cpb.StopContainerRequest(container_id=container_id)
        return races.outcome(
            self.c.call, "/aria.v1.ContainerService/StopContainer", request, cpb.StopContainerResponse, timeout=timeout
        )


@pytest.fixture
def rt(daemon_factory):
    r = Runtime(daemon_factory(*BUSY))
    yield r
    r.quilt_channel.close()


def runtime_task_problems(rt: Runtime, tid: str, answered: bool | None, wait: float = 20) -> tuple[list[str], Any]:
    """What is wrong with a runtime task's final record: it is final, its history holds one final
    status (the last), CancelTask's answer agrees with it, its exit code is what happened, and (an
    exec) Quilt's record of it agrees."""
    try:
        t = rt.c.wait_task(tid, timeout=wait)
    except AssertionError:
        t = rt.c.task(tid)
        return [f"still {astate(t.status)} {wait:.0f} s later"], t
    bad: list[str] = []
    history = races.runtime_history(rt.daemon.data_dir, [tid])[tid]
    if history[-1:] != [t.status] or sum(h in ARIA_FINISHED for h in history) != 1:
        bad.append(f"history {[astate(h) for h in history]}")
    code = exit_of(t)
    if answered is True and t.status != aria_pb2.CANCELLED:
        bad.append(f"CancelTask answered cancellation_initiated=True, the task ended {astate(t.status)}")
    if answered is False and t.status == aria_pb2.CANCELLED:
        bad.append("CancelTask answered cancellation_initiated=False, the task ended CANCELLED")
    if t.status == aria_pb2.COMPLETED and code != 0:
        bad.append(f"COMPLETED with exit code {code}")
    if t.status == aria_pb2.CANCELLED and code == 0:
        bad.append("CANCELLED with exit code 0: the process exited by itself, the cancel did not end it")
    if t.status == aria_pb2.FAILED and not t.error_message:
        bad.append("FAILED without a reason")
    if t.type.startswith("container:exec:"):
        qtid = rt.row(tid).get("quilt_task_id")
        if qtid:
            qt = rt.q.task(qtid)
            if QUILT_TO_ARIA.get(qt.state) != t.status:
                bad.append(f"the runtime says {astate(t.status)}, Quilt's record {qstate(qt)} ({qt.message})")
            if exit_of(qt) != code:
                bad.append(f"exit code {code}, Quilt's {exit_of(qt)}")
            bad += quilt_task_final(qt)
    return bad, t


def check_runtime_tasks(rt: Runtime, results: list[tuple[str, Any]], problems: races.Problems) -> Counter[Any]:
    """results: (task id, CancelTask's answer or None); how they ended, counted. (Waits for each.)"""
    ends: Counter[Any] = Counter()
    for tid, answered in results:
        bad, t = runtime_task_problems(rt, tid, answered)
        kind = "run" if t.type == "container:run" else "exec"
        ends[f"{kind} cancel={answered} {astate(t.status)} exit={exit_of(t)}"] += 1
        problems.add(f"{tid} ({kind}, cancel answered {answered})", [f"{kind}: {b}" for b in bad], races.short(t))
    return ends


def stop_box_and_check_leftovers(rt: Runtime, box_id: str, problems: races.Problems) -> None:
    """Once every task is final: stop the container the execs ran in (in moments), then nothing
    may be left, neither processes nor Quilt containers of run tasks."""
    began = time.monotonic()
    code, value = rt.stop(box_id, timeout=30)
    if code != "ok" or time.monotonic() - began > 2:
        problems.add(box_id, [f"StopContainer of the exec tasks' container: {code} after more than 2 s"], str(value))
    rt.task_containers_left(problems)
    rt.leftovers(problems)


# -- 1. cancel against start (runtime) ---------------------------------------------------------------

TASK_DELAYS = [0, 0, 0.001, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]


def test_runtime_cancel_against_launch(rt):
    """CancelTask sent at once (and 1 to 200 ms) after LaunchTask, for container:run and
    container:exec tasks of `sleep 30`: each ends CANCELLED, CancelTask answers True, the records
    agree, Quilt's containers of run tasks are removed, nothing is left."""
    box = rt.box()

    def one(i: int) -> tuple[str, Any]:
        kind = "container:run" if i % 2 else f"container:exec:{box.id}"
        tid = rt.c.launch(["sleep", "30"], type=kind, environment=rt.env)
        races.at(time.monotonic(), TASK_DELAYS[(i // 2) % len(TASK_DELAYS)])
        return tid, rt.c.cancel(tid)

    sweep_runtime_tasks(rt, box.id, one, 150, pool=16)


def sweep_runtime_tasks(rt: Any, box_id: str, one: Any, times: int, pool: int) -> None:
    """`one(i)` -> (task id, CancelTask's answer), `times` times, `pool` at once; then every task's
    record checked, the container stopped, and nothing left."""
    began = time.monotonic()
    results = races.Pool(pool).map(one, range(times))
    took = time.monotonic() - began
    problems = races.Problems()
    ends = check_runtime_tasks(rt, results, problems)
    stop_box_and_check_leftovers(rt, box_id, problems)
    finish(problems, len(results), f"{len(results)} repetitions in {took:.1f} s; ends: {dict(ends)}")


def test_runtime_stop_against_start(rt):
    """StopContainer sent 0 to 120 ms after StartContainer, at the runtime: the runtime's record
    and Quilt's agree, a stop sent 120 ms after the start is not refused while the container then
    runs on, every container ends CANCELLED (stopped), nothing is left."""
    start_call = rt.c.channel.unary_unary(
        "/aria.v1.ContainerService/StartContainer",
        cpb.StartContainerRequest.SerializeToString,
        cpb.StartContainerResponse.FromString,
    )

    def one(i: int) -> tuple[str, float, Any, Any]:
        box = rt.c.create_container(f"box{i}", environment=rt.env)
        delay = STOP_DELAYS[i % len(STOP_DELAYS)]
        started, stopped = stop_against_start(
            lambda: start_call.future(cpb.StartContainerRequest(container_id=box.id), timeout=30),
            lambda: rt.c.container_call("Stop", box.id),
            delay,
        )
        return box.id, delay, started, stopped

    began = time.monotonic()
    results = races.Pool(8).map(one, range(150))
    took = time.monotonic() - began
    problems, refused = races.Problems(), Counter()
    for cid, delay, (scode, sval), (tcode, _) in results:
        bad = []
        if scode != "ok":
            bad.append(f"StartContainer failed {scode}: {sval}")
        now = rt.c.container_call("Get", cid)
        if tcode == "ok" and now.status != aria_pb2.CANCELLED:
            bad.append(f"StopContainer answered, the container is {astate(now.status)}")
        if tcode != "ok":
            refused[f"{delay * 1000:.0f} ms"] += 1
            # (the runtime serialises a start and a stop of one container: a stop that comes first
            # is refused, truly; only one sent long after the start may not be)
            if now.status == aria_pb2.RUNNING and delay >= 0.1:
                bad.append(f"StopContainer 120 ms after StartContainer refused ({tcode}); the container runs on")
            if now.status == aria_pb2.RUNNING:
                rt.c.container_call("Stop", cid)
        final = rt.c.container_call("Get", cid)
        quilt_view = rt.q.get(cid)
        if final.status != aria_pb2.CANCELLED or quilt_view.state != pb.CONTAINER_STOPPED:
            bad.append(f"the container ends {astate(final.status)}, Quilt's {cstate(quilt_view)}")
        stored = races.db_rows(rt.daemon.data_dir / "runtime.db", "SELECT status FROM containers WHERE id = ?", [cid])
        if stored[0]["status"] != final.status:
            bad.append(f"stored status {astate(stored[0]['status'])}, answered {astate(final.status)}")
        problems.add(f"{cid} (stop at {delay * 1000:.0f} ms)", bad)
    rt.leftovers(problems)
    finish(
        problems, len(results), f"{len(results)} repetitions in {took:.1f} s; stops refused, by delay: {dict(refused)}"
    )


# -- 2. cancel against completion -----------------------------------------------------------------------

SHORT = 0.05  # seconds the short task sleeps
END_DELAYS = [d / 1000 for d in range(0, 130, 5)]  # cancels 0 to 125 ms after the task runs


def test_quilt_cancel_against_completion(quilt, q):
    """`sh -c 'sleep 0.05'` cancelled 0 to 125 ms after ExecAsync returned (it runs): it ends
    COMPLETED (exit 0) if it ended first, CANCELLED (killed) if the cancel won, and CancelTask's
    answer (cancelled, and the task it returns) says the same as the final record."""
    mark = races.new_mark()
    env = {races.MARK_KEY: mark}
    box = q.run(env=env)

    def one(i: int) -> tuple[str, float, tuple[str, Any, float]]:
        t = q.exec_async(box.id, ["sh", "-c", f"sleep {SHORT}"], env=env)
        delay = END_DELAYS[i % len(END_DELAYS)]
        races.at(time.monotonic(), delay)
        return t.id, delay, cancel(q, t.id)

    began = time.monotonic()
    results = races.Pool(6).map(one, range(300))
    took = time.monotonic() - began
    problems, ends = races.Problems(), Counter()
    for tid, delay, (code, reply, _) in results:
        if code != "ok":
            problems.add(tid, [f"CancelTask {code}"], str(reply))
            continue
        final = q.task(tid)
        ends[f"cancelled={reply.cancelled} {qstate(final)} exit={exit_of(final)}"] += 1
        bad = quilt_task_final(final)
        if reply.cancelled != (final.state == pb.TASK_CANCELLED):
            bad.append(f"CancelTask answered cancelled={reply.cancelled}, the task ended {qstate(final)}")
        if reply.task.state != final.state:
            bad.append(f"CancelTask's task says {qstate(reply.task)}, the final record {qstate(final)}")
        if final.state not in (pb.TASK_COMPLETED, pb.TASK_CANCELLED):
            bad.append(f"ended {qstate(final)}")
        problems.add(f"{tid} (cancel at {delay * 1000:.0f} ms)", bad, races.short(final))
    q.stop(box.id)
    quilt_leftovers(quilt, mark, problems)
    finish(problems, len(results), f"{len(results)} repetitions in {took:.1f} s; ends: {dict(ends)}")


def wait_running(rt: Runtime, tid: str) -> float:
    """When (monotonic) the runtime first said the task is no longer PENDING."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if rt.c.task(tid).status != aria_pb2.PENDING:
            return time.monotonic()
        time.sleep(0.003)
    raise AssertionError(f"task {tid} still PENDING")


def test_runtime_cancel_against_completion(rt):
    """The same at the runtime, for container:run and container:exec tasks of `sh -c 'sleep 0.05'`
    (and 0.01), cancelled 0 to 125 ms after the runtime says RUNNING, or 0 to 40 ms after the
    launch (before it runs): COMPLETED with exit 0 if the task ended first, CANCELLED if the
    cancel won, cancellation_initiated agreeing; Quilt's record agrees (exec)."""
    box = rt.box()

    def one(i: int) -> tuple[str, Any]:
        kind = "container:run" if i % 2 else f"container:exec:{box.id}"
        sleep = (SHORT, SHORT, 0.01)[(i // 2) % 3]
        tid = rt.c.launch(["sh", "-c", f"sleep {sleep}"], type=kind, environment=rt.env)
        if (i // 6) % 3 == 2:  # at once: before it runs (the container or exec still starting)
            races.at(time.monotonic(), (i // 18) % 5 / 100)
        else:
            races.at(wait_running(rt, tid), END_DELAYS[(i // 6) % len(END_DELAYS)])
        return tid, rt.c.cancel(tid)

    sweep_runtime_tasks(rt, box.id, one, 144, pool=6)


# -- 3. stop with execs in flight -------------------------------------------------------------------------

# What the execs run: `sleep 10`, so that each repetition is bounded when the stop does not end
# them (that is a failure: "a sleep 10 COMPLETED"; a stop ends its container's tasks in moments),
# and a stop that waited for them stands out clearly from a slow one on a loaded machine.
LONG = ["sleep", "10"]
STOP_BOUND = 5.0  # seconds: an idle container ends at SIGTERM at once; its tasks are killed


def quilt_container_end(q: QuiltClient, cid: str, timeout: float = 10) -> pb.Container:
    """The container once it is no longer CREATED or RUNNING, or as it is after `timeout`."""
    deadline = time.monotonic() + timeout
    while (c := q.get(cid)).state in (pb.CONTAINER_CREATED, pb.CONTAINER_RUNNING) and time.monotonic() < deadline:
        time.sleep(0.05)
    return c


def test_quilt_stop_with_execs_in_flight(quilt, q):
    """StopContainer while ExecAsync and Exec calls are in flight on the container (released at
    once, the stop 0 to 70 ms later): every call answers (none hangs), the stop answers within
    moments, every task ends CANCELLED, FAILED with a reason, or COMPLETED (`true` only), the
    container ends STOPPED, nothing is left."""
    mark = races.new_mark()
    env = {races.MARK_KEY: mark}
    execs = [
        ("ExecAsync", LONG),
        ("ExecAsync", LONG),
        ("ExecAsync", ["true"]),
        ("Exec", LONG),
        ("Exec", ["true"]),
    ]
    delays = [0, 0.005, 0.01, 0.02, 0.04, 0.07]
    stop_call = q.channel.unary_unary(
        C + "StopContainer", pb.StopContainerRequest.SerializeToString, pb.Container.FromString
    )

    def one(i: int) -> dict[str, Any]:
        box = q.run(env=env)
        inner = races.Pool(len(execs))
        barrier = races.Barrier(len(execs) + 1)

        def call(how: str, argv: list[str]) -> tuple[str, Any, float]:
            barrier.wait()
            began = time.monotonic()
            if how == "ExecAsync":
                got = races.outcome(q.exec_async, box.id, argv, env=env)
            else:
                got = races.outcome(q.exec, box.id, argv, timeout=10, env=env)
            return got[0], got[1], time.monotonic() - began

        futures = [inner.submit(call, how, argv) for how, argv in execs]
        barrier.wait()
        races.at(time.monotonic(), delays[i % len(delays)])
        began = time.monotonic()
        stopped = races.outcome(lambda: stop_call(pb.StopContainerRequest(id=box.id, grace_seconds=2), timeout=10))
        stop_secs = time.monotonic() - began
        calls = [f.result() for f in futures]
        inner.close()
        return {
            "box": box.id,
            "delay": delays[i % len(delays)],
            "stop": stopped,
            "stop_secs": stop_secs,
            "calls": calls,
        }

    began = time.monotonic()
    results = races.Pool(8).map(one, range(100))
    took = time.monotonic() - began
    problems, ends = races.Problems(), Counter()
    for r in results:
        bad = []
        code, _ = r["stop"]
        if code != "ok":
            bad.append(f"StopContainer {code} (waited {r['stop_secs']:.0f} s)")
        elif r["stop_secs"] > STOP_BOUND:
            bad.append(f"StopContainer took more than {STOP_BOUND:g} s (the idle container ends at SIGTERM at once)")
        for (how, argv), (ccode, _, secs) in zip(execs, r["calls"], strict=True):
            ends[f"{how} {argv[0]}: {ccode}"] += 1
            if ccode not in ("ok", "FAILED_PRECONDITION"):
                bad.append(f"{how} {argv[0]}: {ccode} after {secs:.0f} s")
        box = quilt_container_end(q, r["box"])
        if box.state != pb.CONTAINER_STOPPED or box.pid != 0:
            bad.append(f"the container ends {cstate(box)} (10 s after its stop)")
        tasks = q.call(T + "ListTasks", pb.ListTasksRequest(container_id=r["box"]), pb.ListTasksResponse).tasks
        for t in tasks:
            ends[
                races.norm(
                    f"task {t.command[0]} {qstate(t)}" + (f" {t.message!r}" if t.state == pb.TASK_FAILED else "")
                )
            ] += 1
            if box.HasField("finished_at") and t.HasField("started_at"):
                if t.started_at.ToMicroseconds() > box.finished_at.ToMicroseconds():
                    bad.append(f"task {' '.join(t.command)}: started after its container had ended, then {qstate(t)}")
            tb = quilt_task_final(t)
            if t.state == pb.TASK_COMPLETED and t.command[0] != "true":
                tb.append("a sleep 10 COMPLETED")
            if t.state == pb.TASK_TIMEOUT:
                tb.append("TIMEOUT")
            bad += [f"task {' '.join(t.command)}: {b} ({t.message})" for b in tb]
        problems.add(f"{r['box']} (stop at {r['delay'] * 1000:.0f} ms)", bad)
    quilt_leftovers(quilt, mark, problems)
    slowest = max(r["stop_secs"] for r in results)
    finish(
        problems,
        len(results),
        f"{len(results)} repetitions in {took:.1f} s; slowest stop {slowest:.1f} s; ends: {dict(ends)}",
    )


def test_runtime_stop_with_execs_in_flight(rt):
    """StopContainer (runtime) while LaunchTask container:exec calls are in flight: every launch
    answers, every task ends CANCELLED, or FAILED with a reason, the runtime's records and Quilt's
    agree, the container ends CANCELLED, nothing is left."""
    delays = [0, 0.005, 0.01, 0.02, 0.05, 0.1]

    def one(i: int) -> dict[str, Any]:
        box = rt.box()
        inner = races.Pool(4)
        barrier = races.Barrier(5)

        def launch() -> tuple[str, Any]:
            barrier.wait()
            return races.outcome(rt.c.launch, LONG, type=f"container:exec:{box.id}", environment=rt.env)

        futures = [inner.submit(launch) for _ in range(4)]
        barrier.wait()
        races.at(time.monotonic(), delays[i % len(delays)])
        began = time.monotonic()
        stopped = rt.stop(box.id)
        stop_secs = time.monotonic() - began
        launches = [f.result() for f in futures]
        inner.close()
        return {"box": box.id, "stop": stopped, "stop_secs": stop_secs, "launches": launches}

    began = time.monotonic()
    results = races.Pool(8).map(one, range(100))
    took = time.monotonic() - began
    problems, ends = races.Problems(), Counter()
    for r in results:
        bad = []
        if r["stop"][0] != "ok":
            bad.append(f"StopContainer {r['stop'][0]} (waited {r['stop_secs']:.0f} s)")
        elif r["stop_secs"] > STOP_BOUND:
            bad.append(f"StopContainer took more than {STOP_BOUND:g} s (the idle container ends at SIGTERM at once)")
        for code, val in r["launches"]:
            ends[f"LaunchTask {code}"] += 1
            if code == "ok":
                tb, t = runtime_task_problems(rt, val, None)
                ends[
                    races.norm(
                        f"task {astate(t.status)}" + (f" {t.error_message!r}" if t.status == aria_pb2.FAILED else "")
                    )
                ] += 1
                if t.status not in (aria_pb2.CANCELLED, aria_pb2.FAILED):
                    tb.append(f"a sleep 10 ended {astate(t.status)}")
                bad += [f"task: {b}" for b in tb]
            elif code != "FAILED_PRECONDITION":
                bad.append(f"LaunchTask {code}: {val}")
        final = rt.c.container_call("Get", r["box"])
        quilt_view = rt.q.get(r["box"])
        if final.status != aria_pb2.CANCELLED or quilt_view.state != pb.CONTAINER_STOPPED:
            bad.append(f"the container ends {astate(final.status)}, Quilt's {cstate(quilt_view)}")
        problems.add(r["box"], bad)
    rt.leftovers(problems)
    slowest = max(r["stop_secs"] for r in results)
    finish(
        problems,
        len(results),
        f"{len(results)} repetitions in {took:.1f} s; slowest stop {slowest:.1f} s; ends: {dict(ends)}",
    )


# -- 4. the first use of one bundle by two tool calls at once ---------------------------------------------


def unique_bundle(tag: str) -> bytes:
    """A bundle with the tool `add_<tag>` (which adds) and the agent `Adder_<tag>` that has it; its
    bytes unique to `tag`, with some files, so that its first unpack takes a little while."""
    name = f"add_{tag}"
    manifest = {
        "name": f"adder-{tag}",
        "version": "1.0.0",
        "tools": [{"name": name, "description": "adds", "inputs": {"a": "number", "b": "number"}}],
        "agents": [{"name": f"Adder_{tag}", "description": "adds", "tools": [name]}],
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.writestr(f"implementations/tools/{name}.py", f"def {name}(a, b):\n    return a + b\n")
        for k in range(20):
            z.writestr(f"data/{k}.txt", f"{tag} {k}\n" * 200)
    return out.getvalue()


def unpacked_as_once(quilt_data: Any, bundle_ids: set[str], problems: races.Problems) -> None:
    """Each bundle used is unpacked once, whole, and no half-made unpack is left beside it."""
    folder = quilt_data / "bundles" / "unpacked"
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    staging = [e for e in entries if e.startswith(".")]
    if staging:
        problems.add("unpacked/", ["staging folders of unpacks left behind"], ", ".join(staging[:5]))
    missing = sorted(bundle_ids - set(entries))
    if missing:
        problems.add("unpacked/", ["bundles used but not unpacked"], ", ".join(missing[:5]))


def test_quilt_first_use_of_a_bundle_by_concurrent_run_tools(quilt, q):
    """A fresh bundle uploaded, then two RunTool calls at once on its first use: both succeed."""
    per = 2

    def one(i: int) -> list[tuple[str, str, Any]]:
        tag = races.new_mark().replace("-", "_")
        b = upload(q, messages(unique_bundle(tag)))
        barrier = races.Barrier(per)
        request = pb.RunToolRequest(bundle_id=b.id, tool_name=f"add_{tag}", arguments_json='{"a": 2, "b": 3}')

        def run(_: int) -> tuple[str, Any]:
            barrier.wait()
            return races.outcome(q.call, B + "RunTool", request, pb.RunToolResult, timeout=60)

        inner = races.Pool(per)
        got = inner.map(run, range(per))
        inner.close()
        return [(b.id, *g) for g in got]

    began = time.monotonic()
    results = [r for rep in races.Pool(3).map(one, range(100)) for r in rep]
    took = time.monotonic() - began
    problems = races.Problems()
    for bid, code, val in results:
        if code != "ok":
            problems.add(bid, [f"RunTool {code}: {val}"])
        elif not val.ok or json.loads(val.result_json) != 5:
            problems.add(bid, [f"RunTool not ok: {val.error}"], races.short(val))
    unpacked_as_once(quilt.data_dir, {bid for bid, _, _ in results}, problems)
    quilt_leftovers(quilt, "(tools get no environment of ours)", problems)
    finish(problems, len(results), f"100 repetitions ({len(results)} RunTool calls) in {took:.1f} s")


def test_runtime_first_use_of_a_bundle_by_two_sessions(rt):
    """At the runtime: upload a fresh bundle, then two sessions run its tool (`/add_<tag> {...}`)
    at once, its first use: both turns succeed with the tool's result."""

    def turn(session_id: str, text: str) -> tuple[str, Any]:
        request = spb.ExecuteTurnRequest(session_id=session_id, input=text)
        return races.outcome(lambda: list(rt.c.stream(SESSIONS + "ExecuteTurn", request, spb.TurnOutput, 60)))

    def one(i: int) -> list[tuple[str, str, Any]]:
        tag = races.new_mark().replace("-", "_")
        reply = rt.c.upload_bytes(unique_bundle(tag), name=f"{tag}.aria")
        assert reply.success, reply
        sessions = [rt.c.session(agent_id=f"Adder_{tag}").id for _ in range(2)]
        barrier = races.Barrier(2)

        def go(sid: str) -> tuple[str, Any]:
            barrier.wait()
            return turn(sid, f'/add_{tag} {{"a": 2, "b": 3}}')

        inner = races.Pool(2)
        got = inner.map(go, sessions)
        inner.close()
        return [(tag, *g) for g in got]

    began = time.monotonic()
    results = [r for rep in races.Pool(3).map(one, range(100)) for r in rep]
    took = time.monotonic() - began
    problems = races.Problems()
    for tag, code, val in results:
        if code != "ok":
            problems.add(tag, [f"ExecuteTurn {code}: {val}"])
            continue
        result = next((o.tool_result for o in val if o.WhichOneof("event") == "tool_result"), None)
        if result is None or not result.success or json.loads(result.result_json) != 5:
            problems.add(tag, [f"the tool call failed: {result.error_message if result else 'no result'}"])
    used = {r["blake3"] for r in races.db_rows(rt.daemon.data_dir / "runtime.db", "SELECT blake3 FROM bundles")}
    unpacked_as_once(rt.daemon.data_dir / "quilt", used, problems)
    rt.leftovers(problems)
    finish(problems, len(results), f"100 repetitions ({len(results)} turns) in {took:.1f} s")


# -- 5. a followed task cancelled just as it ends -----------------------------------------------------------

# 30 lines, a short sleep, 30 lines more, printed as fast as the shell goes, to the very end
LINES = [str(i) for i in range(60)]
FOLLOWED = (
    "i=0; while [ $i -lt 30 ]; do echo $i; i=$((i+1)); done; "
    f"sleep {SHORT}; "
    "while [ $i -lt 60 ]; do echo $i; i=$((i+1)); done"
)


def test_quilt_follow_of_a_task_as_it_ends(quilt, q):
    """TaskOutput follow of an exec, and ContainerLogs follow of a container, that print lines to
    their very end, half of them cancelled (stopped) 0 to 125 ms after they start: the follower
    ends and sees exactly the lines of the log (read again afterwards), once each, in order; all
    of them if it completed (exited 0)."""
    mark = races.new_mark()
    env = {races.MARK_KEY: mark}
    box = q.run(env=env)

    def texts(stream: Any) -> list[str]:
        return [line.text for line in stream if line.stream == pb.STDOUT]

    def one(i: int) -> tuple[str, str, list[str], list[str], Any]:
        delay = END_DELAYS[(i // 4) % len(END_DELAYS)]
        if i % 2:
            t = q.exec_async(box.id, ["sh", "-c", FOLLOWED], env=env)
            follower = races.Pool(1)
            seen = follower.submit(lambda: races.outcome(lambda: texts(q.output(t.id, follow=True, timeout=20))))
            if i % 4 == 3:
                races.at(time.monotonic(), delay)
                cancel(q, t.id)
            got = seen.result()
            follower.close()
            final = q.result(t.id).task
            return f"exec {t.id}", got[0], got[1], texts(q.output(t.id)), final
        c = q.run(["sh", "-c", FOLLOWED], env=env)
        follower = races.Pool(1)
        seen = follower.submit(lambda: races.outcome(lambda: texts(q.logs(c.id, follow=True, timeout=20))))
        if i % 4 == 2:
            races.at(time.monotonic(), delay)
            races.outcome(q.stop, c.id)
        got = seen.result()
        follower.close()
        final = quilt_container_end(q, c.id)
        return f"container {c.id}", got[0], got[1], texts(q.logs(c.id)), final

    began = time.monotonic()
    results = races.Pool(6).map(one, range(120))
    took = time.monotonic() - began
    problems, ends = races.Problems(), Counter()
    for what, code, seen, log, final in results:
        kind = what.split()[0]
        done = final.state in (pb.TASK_COMPLETED, pb.CONTAINER_EXITED) and exit_of(final) == 0
        ends[f"{kind} {'completed' if done else 'stopped/cancelled'}"] += 1
        bad = []
        if code != "ok":
            bad.append(f"the follower failed: {code}")
        elif seen != log:
            bad.append(
                "the follower missed lines the log has" if len(seen) < len(log) else "the follower saw other lines"
            )
        if log != LINES[: len(log)]:
            bad.append("the log is not the lines printed")
        if done and log != LINES:
            bad.append("exited 0 without all its lines in the log")
        problems.add(what, [f"{kind}: {b}" for b in bad], f"follower saw {len(seen)} lines, the log has {len(log)}")
    q.stop(box.id)
    quilt_leftovers(quilt, mark, problems)
    finish(problems, len(results), f"{len(results)} repetitions in {took:.1f} s; ends: {dict(ends)}")


def test_runtime_cancel_of_a_followed_task_as_it_ends(rt):
    """A task printing lines to its very end, followed (StreamTaskOutput follow) from its launch,
    cancelled 0 to 250 ms after it runs, as it ends (a quarter 600 ms after): the follower ends, sees every stored line
    exactly once and in order, the store holds what Quilt's log holds (an exec), all of them if it
    COMPLETED, and the final status is true (as in test_runtime_cancel_against_completion)."""
    box = rt.box()
    followers = races.Pool(24)

    def follow(tid: str) -> tuple[str, Any, float]:
        began = time.monotonic()
        got = races.outcome(lambda: [o.stdout_line for o in rt.c.output(tid, follow=True, timeout=30)])
        return got[0], got[1], time.monotonic() - began

    def one(i: int) -> tuple[str, Any, Any]:
        kind = "container:run" if i % 2 else f"container:exec:{box.id}"
        tid = rt.c.launch(["sh", "-c", FOLLOWED], type=kind, environment=rt.env)
        follower = followers.submit(follow, tid)
        # a quarter cancelled well after the end (the follower then sees the end by itself)
        races.at(wait_running(rt, tid), 0.6 if i % 8 < 2 else 2 * END_DELAYS[(i // 2) % len(END_DELAYS)])
        answered = rt.c.cancel(tid)
        return tid, answered, follower.result()

    began = time.monotonic()
    results = races.Pool(6).map(one, range(120))
    took = time.monotonic() - began
    problems = races.Problems()
    for tid, _, (code, seen, secs) in results:
        t = rt.c.wait_task(tid)
        kind = "run" if t.type == "container:run" else "exec"
        stored = [o.stdout_line for o in rt.c.output(tid)]
        bad = []
        if code != "ok":
            bad.append(f"the follower failed: {code} after {secs:.0f} s")
        elif seen != stored:
            bad.append("the follower saw other lines than the store has")
        elif seen != LINES[: len(seen)]:
            bad.append("the follower saw lines twice or out of order")
        if stored != LINES[: len(stored)]:
            bad.append("the stored lines are not the lines printed")
        if t.status == aria_pb2.COMPLETED and stored != LINES:
            bad.append("COMPLETED without all its lines")
        detail = f"the follower saw {len(seen) if code == 'ok' else code} lines, the store has {len(stored)}"
        qtid = rt.row(tid).get("quilt_task_id")
        if qtid:  # an exec: Quilt keeps its output; the runtime's store must hold the same lines
            in_quilt = [line.text for line in rt.q.output(qtid) if line.stream == pb.STDOUT]
            detail += f", Quilt's log {len(in_quilt)}"
            if in_quilt != stored:
                bad.append("the runtime stored other lines than Quilt's log of the task has")
        problems.add(f"{tid} ({kind})", [f"{kind}: {b}" for b in bad], f"{detail}; {races.short(t)}")
    ends = check_runtime_tasks(rt, [(tid, answered) for tid, answered, _ in results], problems)
    stop_box_and_check_leftovers(rt, box.id, problems)
    finish(problems, len(results), f"{len(results)} repetitions in {took:.1f} s; ends: {dict(ends)}")
