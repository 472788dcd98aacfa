"""Work lives as long as it should, however idle both daemons are.

Every timeout in play is outlasted: Trio retires an idle worker thread after 10 s (that killed
every sandbox spawned from one, by its parent-death signal), the runtime's and Quilt's
connections idle meanwhile, and nothing calls either daemon while the work sits there. The
scenarios run at once, in threads, in one test (about two minutes of mostly sleeping).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.quilt.v1 import quilt_pb2 as qpb

from aria_client import AriaClient
from conftest import start_daemon, start_quilt
from quilt_client import QuiltClient, alive
from scenarios import scenario

IDLE_THREAD_S = 10  # trio's worker threads retire after this long unused


@scenario
def container_sleeping_600(folder: Path) -> None:
    d = start_daemon(folder)
    try:
        c = AriaClient(d.channel())
        box = c.create_container("sleeper", command=["sleep", "600"])
        c.container_call("Start", box.id)
        time.sleep(60)  # nothing else happens meanwhile
        got = c.container_call("Get", box.id)
        assert got.status == aria_pb2.RUNNING, (aria_pb2.TaskStatus.Name(got.status), got)
        quilt = QuiltClient(grpc.insecure_channel("unix:" + str(d.data_dir / "quilt.sock")))
        inner = quilt.get(box.id)
        assert inner.state == qpb.CONTAINER_RUNNING and alive(inner.pid), inner
        c.container_call("Stop", box.id)
    finally:
        d.stop()


@scenario
def task_of_45_seconds(folder: Path) -> None:
    d = start_daemon(folder)
    try:
        c = AriaClient(d.channel())
        task_id = c.launch(["sh", "-c", "echo begin; sleep 45; echo end"])
        time.sleep(47)
        done = c.wait_task(task_id, timeout=15)
        assert (aria_pb2.TaskStatus.Name(done.status), done.exit_code) == ("COMPLETED", 0), done
        assert [o.stdout_line for o in c.output(task_id)] == ["begin", "end"]
    finally:
        d.stop()


@scenario
def persistent_container_idle_2_minutes(folder: Path) -> None:
    d = start_daemon(folder)
    try:
        c = AriaClient(d.channel())
        box = c.create_container("keeper", persistent=True)  # no command: idles until stopped
        c.container_call("Start", box.id)
        task_id = c.launch(["sh", "-c", "echo hello > /workspace/note"], type=f"container:exec:{box.id}")
        assert c.wait_task(task_id).status == aria_pb2.COMPLETED
        time.sleep(120)
        assert c.container_call("Get", box.id).status == aria_pb2.RUNNING
        task_id = c.launch(["cat", "/workspace/note"], type=f"container:exec:{box.id}")
        done = c.wait_task(task_id)
        assert done.status == aria_pb2.COMPLETED, done
        assert [o.stdout_line for o in c.output(task_id)] == ["hello"]
        c.container_call("Stop", box.id)
    finally:
        d.stop()


@scenario
def unsandboxed_work_lives_too(folder: Path) -> None:
    """--sandbox=none: setpriv's --pdeathsig followed the spawning thread the same way."""
    q = start_quilt(folder, "--sandbox", "none")
    try:
        c = QuiltClient(q.channel())
        box = c.run(["sleep", "600"])
        time.sleep(IDLE_THREAD_S + 20)
        got = c.get(box.id)
        assert got.state == qpb.CONTAINER_RUNNING and alive(got.pid), got
        c.stop(box.id)
    finally:
        q.stop()


def test_work_lives_as_long_as_it_should():
    """The four scenarios at once, each in a thread of its own (they mostly sleep): about two
    minutes, during which the other test worker runs the rest of the suite."""
    scenarios = [
        container_sleeping_600,
        task_of_45_seconds,
        persistent_container_idle_2_minutes,
        unsandboxed_work_lives_too,
    ]
    for each in scenarios:
        each.start()
    failures = [each.failure(timeout=400) for each in scenarios]
    assert not any(failures), "\n\n".join(f for f in failures if f)
