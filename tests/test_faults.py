"""Fault tests: kill -9 of the runtime, then of Quilt, at seeded random moments of mixed work.

Each trial runs, all at once: a task printing 30 lines 0.05 s apart (and a client following it),
bundle uploads in 64 KiB chunks, turns whose model calls run_command, containers created and
started, and five notification subscribers that resume with after_sequence whenever their stream
breaks. The victim is killed -9 at a moment drawn from the seed (ARIA_FAULT_SEED); the runtime is
started again by hand (it adopts the Quilt that outlived it), Quilt by its runtime. After each
trial: every record final and true, the output and every subscriber's sequence without a
duplicate or a gap, uploads registered exactly when they succeeded (and in Quilt exactly then),
container records matching Quilt's, no sandbox process, stray folder or half-made file left, one
Quilt, and `PRAGMA integrity_check` ok on both databases. At the end, a replay of every
notification from 0: 1..N once each, and each task's and container's transitions once each; and
every history the model server was sent is one it accepts (each tool call answered, in place).
The numbers (when the kill fell, what it cut, how long the ends took) are printed (-s shows them).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from test_survival import quilts_of, stop_quilt
from test_turns_direct import turn
from test_turns_model import use_model

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import bundle_pb2 as bpb
from aria_trio.proto.quilt.v1 import quilt_pb2 as qpb
from aria_trio.runtime.quilt_client import HEALTHY_S
from aria_trio.runtime.work.containers import status_of

import bundles
from aria_client import AriaClient
from conftest import Daemon, start_daemon
from fake_llm import FakeLLM, text_stream, tool_stream
from quilt_client import QuiltClient, sandbox_processes

SEED = int(os.environ.get("ARIA_FAULT_SEED", "20261201"))
TRIALS = int(os.environ.get("ARIA_FAULT_TRIALS", "20"))  # per victim
GRACE = ("--quilt-orphan-grace", "120")  # the Quilt outlives a killed runtime
LINES = 30
FINAL = {aria_pb2.COMPLETED, aria_pb2.FAILED, aria_pb2.CANCELLED, aria_pb2.TIMEOUT}
# What a call cut by the kill may answer: the daemon is gone (UNAVAILABLE, or the stream ends
# with CANCELLED/UNKNOWN on the client's side of a reset), or Quilt is (the runtime's UNAVAILABLE).
CUT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
# Each client a connection of its own (grpc shares them between channels by default, with the
# backoff of one that saw the runtime gone), that tries again soon after a restart.
# (Not grpc.min_reconnect_backoff_ms: it is also the time a connection may take to get the
# server's SETTINGS, and a runtime that has just started on a loaded machine can take longer.)
CHANNEL = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 50,
    "grpc.max_reconnect_backoff_ms": 250,
}


def print_command(n: int) -> list[str]:
    return ["sh", "-c", f"for i in $(seq 1 {LINES}); do echo t{n}-$i; sleep 0.05; done"]


def model(request: Any) -> Any:
    """A tool call for a new question; text once the tool answered (or for "and now?")."""
    messages = (request.body or {}).get("messages", [])
    last = messages[-1] if messages else {}
    if last.get("role") == "tool" or last.get("content") == "and now?":
        return text_stream("done")
    return tool_stream([("run_command", {"command": ["sh", "-c", "echo tool; sleep 0.2"]})])


def accepted(messages: list[dict[str, Any]]) -> bool:
    """A history a model server accepts: every tool call answered by a TOOL message, right after."""
    waiting: set[str] = set()
    for m in messages:
        if m["role"] == "tool":
            if m.get("tool_call_id") not in waiting:
                return False
            waiting.discard(m["tool_call_id"])
            continue
        if waiting:
            return False
        if m["role"] == "assistant":
            waiting = {call["id"] for call in m.get("tool_calls") or []}
    return not waiting


@dataclasses.dataclass
class Trial:
    n: int
    victim: str
    uploads: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (agent, "ok" or a code)
    sessions: list[str] = dataclasses.field(default_factory=list)
    codes: Counter[str] = dataclasses.field(default_factory=Counter)  # what the cut calls answered
    killed_at: float = 0.0  # wall clock
    kill_after: float = 0.0
    launch_cut: bool = False  # the kill came before LaunchTask answered

    def cut(self, err: grpc.RpcError) -> None:
        assert err.code() in CUT, f"trial {self.n}: {err.code()} {err.details()}"
        self.codes[err.code().name] += 1


class Subscriber(threading.Thread):
    """Follows the notifications, resuming after the last sequence it saw whenever cut."""

    def __init__(self, d: Daemon, after: int) -> None:
        super().__init__(daemon=True)
        self.channel = d.channel(**CHANNEL)
        self.seen: list[int] = []
        self.after = after
        self.first = after
        self.stopping = threading.Event()
        self.problem: str | None = None
        self.call: Any = None

    def run(self) -> None:
        c = AriaClient(self.channel)
        while not self.stopping.is_set():
            try:
                self.call = c.events(timeout=None, after_sequence=self.after)
                for n in self.call:
                    self.seen.append(n.sequence)
                    self.after = n.sequence
            except grpc.RpcError as err:
                if self.stopping.is_set():
                    return
                if err.code() not in CUT:
                    self.problem = f"{err.code()} {err.details()}"
                    return
                time.sleep(0.05)  # (the runtime is being started again)

    def stop(self) -> None:
        self.stopping.set()
        if self.call is not None:
            self.call.cancel()
        self.join(10)
        assert not self.is_alive()
        self.channel.close()


def last_sequence(data_dir: Path) -> int:
    with sqlite3.connect(f"file:{data_dir / 'runtime.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT last_sequence FROM notification_sequences WHERE user_id = 'root'").fetchone()
    return int(row[0]) if row else 0


def query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def eventually(check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (AssertionError, grpc.RpcError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {exc}") from exc
        else:
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still {result!r}")
        time.sleep(0.05)


class Work:
    """One trial's mixed load, in threads, until stopped."""

    def __init__(self, d: Daemon, trial: Trial, rng: random.Random) -> None:
        self.d = d
        self.channel = d.channel(**CHANNEL)
        self.c = AriaClient(self.channel)
        self.trial = trial
        self.rng = rng
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._guard(f), daemon=True) for f in self._loads()]
        self.problems: list[str] = []

    def _loads(self) -> list[Callable[[], None]]:
        return [self._printer, self._uploader, self._turner, self._boxer]

    def _guard(self, load: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                load()
            except BaseException as exc:  # (reported by the test, not lost in a thread)
                self.problems.append(f"{load.__name__}: {type(exc).__name__}: {exc}")

        return run

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
        self.channel.close()
        if self.problems:  # with what the runtime logged about them (an INTERNAL has its traceback there)
            ids = [m for p in self.problems for m in re.findall(r"request id ([0-9a-f]+)", p)]
            said = [e for e in self.d.logs() if e.get("level") in ("error", "critical") or e.get("request_id") in ids]
            self.problems.append(f"the runtime logged: {said[-5:]}")
            print("the runtime logged, about the problems:", *said[-5:], sep="\n")  # (whole: the assert cuts)
        assert not self.problems, self.problems

    def _printer(self) -> None:
        try:
            task_id = self.c.launch(print_command(self.trial.n))
        except grpc.RpcError as err:
            self.trial.cut(err)
            self.trial.launch_cut = True
            return
        try:
            for _ in self.c.output(task_id, follow=True, timeout=60):
                pass
        except grpc.RpcError as err:
            self.trial.cut(err)

    def _uploader(self) -> None:
        k = 0
        while not self.stopping.is_set():
            k += 1
            agent = f"Fault{self.trial.n}x{k}"
            manifest = bundles.manifest(
                f"fault{self.trial.n}x{k}", agents=[{"name": agent, "description": "d", "tools": ["add"]}]
            )
            data = bundles.flat(manifest, files={"pad.bin": self.rng.randbytes(3 * 64 * 1024)})
            try:
                self.c.upload(self._chunks(data))  # type: ignore[arg-type]  (streamed, paced)
                self.trial.uploads.append((agent, "ok"))
            except grpc.RpcError as err:
                self.trial.uploads.append((agent, err.code().name))
                self.trial.cut(err)

    @staticmethod
    def _chunks(data: bytes) -> Iterator[bpb.UploadBundleRequest]:
        meta = bpb.BundleMetadata(name="fault.aria", total_size_bytes=len(data))
        yield bpb.UploadBundleRequest(metadata=meta)
        for i in range(0, len(data), 64 * 1024):
            time.sleep(0.02)  # (so that a kill finds uploads half-way)
            yield bpb.UploadBundleRequest(chunk=data[i : i + 64 * 1024])

    def _turner(self) -> None:
        while not self.stopping.is_set():
            try:
                session = self.c.session()
                self.trial.sessions.append(session.id)
                out = turn(self.c, session.id, "run something")
                assert out[-1].final_response == "done", out
            except grpc.RpcError as err:
                self.trial.cut(err)
            time.sleep(0.2)  # (a few turns a trial: each runs a sandbox, on two cores)

    def _boxer(self) -> None:
        k = 0
        while not self.stopping.is_set():
            k += 1
            try:
                box = self.c.create_container(f"f{self.trial.n}-{k}", command=["sh", "-c", "echo up; sleep 0.5"])
                self.c.container_call("Start", box.id)
            except grpc.RpcError as err:
                self.trial.cut(err)
            time.sleep(0.3)  # (a few containers a trial: each is a sandbox, on two cores)


class Faults:
    """The daemons under test, their clients, and the checks after each trial."""

    def __init__(self, sock_dir: Path, victim: str) -> None:
        self.sock_dir = sock_dir
        self.victim = victim
        self.rng = random.Random(f"{SEED}:{victim}")
        self.slices = self.rng.sample(range(TRIALS), TRIALS)
        self.quilt_back = time.monotonic()
        self.llm = FakeLLM().start()
        self.llm.default = model
        self.d = start_daemon(sock_dir, *GRACE)
        use_model(AriaClient(self.d.channel()), self.llm.base_url)
        self.quilt_dir = self.d.data_dir / "quilt"
        self.report: list[str] = []

    def close(self) -> None:
        if self.d.proc.poll() is not None:  # it died: say why
            print(
                f"runtime exited with {self.d.proc.returncode}:\n"
                + "\n".join(self.d.log_path.read_text().splitlines()[-30:])
            )
        self.d.stop()
        stop_quilt(quilts_of(self.d.data_dir))
        self.llm.stop()

    def client(self) -> AriaClient:
        return AriaClient(self.d.channel(**CHANNEL))

    def quilt(self) -> QuiltClient:
        options = list(CHANNEL.items())
        return QuiltClient(grpc.insecure_channel(f"unix:{self.d.data_dir / 'quilt.sock'}", options=options))

    def trial(self, n: int) -> None:
        # Stratified: each trial kills in its own slice of the 1.35 s the work takes, in an order
        # drawn from the seed, so that the moments cover the whole of it.
        trial = Trial(n, self.victim, kill_after=0.05 + (self.slices[n - 1] + self.rng.random()) * 1.35 / TRIALS)
        subscribers = [Subscriber(self.d, last_sequence(self.d.data_dir)) for _ in range(5)]
        for s in subscribers:
            s.start()
        work = Work(self.d, trial, random.Random(f"{SEED}:{self.victim}:{n}"))
        (quilt,) = quilts_of(self.d.data_dir)
        if self.victim == "quilt":  # killed only once it has served a while: sooner, it is a crash
            # loop to its runtime, which then waits longer and longer before it starts it again
            time.sleep(max(0.0, HEALTHY_S + 0.2 - trial.kill_after - (time.monotonic() - self.quilt_back)))
        work.start()
        time.sleep(trial.kill_after)
        trial.killed_at = time.time()
        if self.victim == "runtime":
            self.d.proc.kill()
            self.d.proc.wait()
            work.stop()
            self.d = start_daemon(self.sock_dir, *GRACE)
            assert quilts_of(self.d.data_dir) == [quilt], "the new runtime adopts the Quilt, never a second"
        else:
            os.kill(quilt, signal.SIGKILL)
            work.stop()
            eventually(lambda: quilts_of(self.d.data_dir) not in ([], [quilt]), "a new quilt")
        back = time.time() - trial.killed_at
        ends = self.check(trial)
        self.quilt_back = time.monotonic()  # (up at least since)
        last = last_sequence(self.d.data_dir)
        for s in subscribers:
            eventually(lambda s=s: s.after >= last, "a subscriber catching up", timeout=10)
            s.stop()
            assert s.problem is None, s.problem
            assert s.seen == list(range(s.first + 1, s.first + 1 + len(s.seen))), "a duplicate or a gap"
        uploads = Counter(outcome for _, outcome in trial.uploads)
        self.report.append(
            f"trial {n:2}: kill at {trial.kill_after:.2f} s, back in {back:.2f} s; uploads {dict(uploads)}; "
            f"cut calls {dict(trial.codes)}; {ends}"
        )

    # -- the checks after a trial

    def check(self, trial: Trial) -> str:
        c = self.client()
        said = self.check_task(c, trial)
        self.check_uploads(c, trial)
        self.check_containers(c, trial)
        self.check_sessions(c, trial)
        self.check_leftovers()
        return said

    def check_task(self, c: AriaClient, trial: Trial) -> str:
        marker = f"%t{trial.n}-$i%"
        rows = query(self.d.data_dir / "runtime.db", "SELECT id FROM tasks WHERE command_json LIKE ?", marker)
        if not rows:  # the kill came before the launch was stored: the client was told UNAVAILABLE
            assert trial.launch_cut, "a task that was never stored, and nobody told"
            return "task: never stored"
        ((task_id,),) = rows
        task = c.wait_task(task_id, timeout=30)
        lines = [o.stdout_line for o in c.output(task_id)]
        expected = [f"t{trial.n}-{i}" for i in range(1, LINES + 1)]
        took = task.completed_at.ToMicroseconds() / 1e6 - trial.killed_at
        if task.status == aria_pb2.COMPLETED:
            assert (task.exit_code, lines) == (0, expected), (task, lines)
            return f"task: completed, {LINES} lines"
        assert self.victim == "quilt", f"a runtime kill failed the task: {task}"
        assert task.status == aria_pb2.FAILED and "quilt restarted" in task.error_message, task
        assert lines == expected[: len(lines)], lines
        assert took <= 5.0, f"recorded {took:.1f} s after the kill"
        return f"task: failed 'quilt restarted' {took:.2f} s after the kill, {len(lines)} lines"

    def check_uploads(self, c: AriaClient, trial: Trial) -> None:
        registered = {a.name for a in c.agents()}
        lost_answer = 0
        for agent, outcome in trial.uploads:
            if outcome == "ok":
                assert agent in registered, agent
            elif agent in registered:  # stored and registered, then the runtime died before answering
                assert self.victim == "runtime", (agent, outcome)
                lost_answer += 1
        assert lost_answer <= 1, trial.uploads

        def consistent() -> bool:
            mine = {r[0] for r in query(self.d.data_dir / "runtime.db", "SELECT blake3 FROM bundles")}
            listed = self.quilt().call(
                "/quilt.v1.Bundles/ListBundles", qpb.ListBundlesRequest(page_size=1000), qpb.ListBundlesResponse
            )
            held = {b.blake3 for b in listed.bundles}
            assert held == mine, (held - mine, mine - held)
            incoming = self.quilt_dir / "bundles" / "incoming"
            assert not incoming.is_dir() or not list(incoming.iterdir()), list(incoming.iterdir())
            assert not list((self.quilt_dir / "bundles" / "unpacked").glob(".unpack-*"))
            return True

        eventually(consistent, "uploads registered exactly when stored")

    def check_containers(self, c: AriaClient, trial: Trial) -> None:
        rows = query(self.d.data_dir / "runtime.db", "SELECT id FROM containers WHERE name LIKE ?", f"f{trial.n}-%")
        q = self.quilt()

        def settled(box_id: str) -> bool:
            mine = c.container_call("Get", box_id)
            try:
                theirs = q.get(box_id)
            except grpc.RpcError as err:
                assert err.code() is grpc.StatusCode.NOT_FOUND, err
                assert mine.status == aria_pb2.FAILED, mine
                return True
            assert theirs.state != qpb.CONTAINER_RUNNING, "still running"
            assert mine.status == status_of(theirs), (mine, theirs)
            return True

        for (box_id,) in rows:
            eventually(lambda box_id=box_id: settled(box_id), f"container {box_id} recorded as Quilt has it")

        def only_recorded() -> bool:
            recorded = {r[0] for r in query(self.d.data_dir / "runtime.db", "SELECT id FROM containers")}
            listed = q.call(
                "/quilt.v1.Containers/ListContainers", qpb.ListContainersRequest(), qpb.ListContainersResponse
            )
            made = {x.id for x in listed.containers if "aria.persistent" in x.spec.labels}
            assert made <= recorded, made - recorded
            others = [x for x in listed.containers if "aria.persistent" not in x.spec.labels]
            assert not others, [(x.id, dict(x.spec.labels), x.state) for x in others]  # tasks' and tools' go
            return True

        eventually(only_recorded, "no container in Quilt that nobody owns")

    def check_sessions(self, c: AriaClient, trial: Trial) -> None:
        if not trial.sessions:
            return
        session = trial.sessions[-1]  # the one the kill may have cut: it still takes a turn

        def usable() -> bool:
            out = turn(c, session, "and now?")
            assert out[-1].final_response == "done", out
            return True

        eventually(usable, f"session {session} usable")

    def check_leftovers(self) -> None:
        def no_sandbox() -> bool:
            left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in sandbox_processes(str(self.quilt_dir))}
            assert not left, left
            return True

        eventually(no_sandbox, "no sandbox process left")
        assert len(quilts_of(self.d.data_dir)) == 1
        db = self.quilt_dir / "quilt.db"

        def no_strays() -> bool:  # (a removal deletes the record, then the folder)
            folders = {p.name for p in (self.quilt_dir / "containers").glob("*")}
            logs = {p.stem for p in (self.quilt_dir / "tasks").glob("*.jsonl")}
            containers = {r[0] for r in query(db, "SELECT id FROM containers")}
            tasks = {r[0] for r in query(db, "SELECT id FROM tasks")}
            assert folders <= containers, folders - containers
            assert logs <= tasks, logs - tasks
            return True

        eventually(no_strays, "no folder or log without its record")
        for path in (self.d.data_dir / "runtime.db", db):
            assert query(path, "PRAGMA integrity_check") == [("ok",)], path

    # -- at the end

    def check_notifications(self) -> None:
        last = last_sequence(self.d.data_dir)
        c = self.client()
        call = c.events(timeout=60, after_sequence=0)
        got = []
        for n in call:
            got.append(n)
            if n.sequence >= last:
                break
        call.cancel()
        assert [n.sequence for n in got] == list(range(1, last + 1)), "a replay with a duplicate or a gap"
        tasks: dict[str, list[int]] = {}
        boxes: dict[str, list[int]] = {}
        for n in got:
            if n.HasField("task_status"):
                tasks.setdefault(n.task_status.task_id, []).append(n.task_status.new_status)
            elif n.HasField("container_status"):
                boxes.setdefault(n.container_status.container_id, []).append(n.container_status.new_status)
        for what, statuses in [*tasks.items(), *boxes.items()]:
            assert len(statuses) == len(set(statuses)), (what, statuses)  # each transition once
        histories = [r.body["messages"] for r in self.llm.requests if r.body]
        assert histories and all(accepted(h) for h in histories), [h for h in histories if not accepted(h)][:1]
        self.report.append(f"{last} notifications replayed, {len(histories)} model calls, every history accepted")


def run_trials(sock_dir: Path, victim: str) -> None:
    faults = Faults(sock_dir, victim)
    try:
        started = time.monotonic()
        for n in range(1, TRIALS + 1):
            faults.trial(n)
        faults.check_notifications()
        faults.report.append(f"{TRIALS} trials in {time.monotonic() - started:.0f} s (seed {SEED})")
    finally:
        print(f"\n{victim} killed -9:\n" + "\n".join(faults.report))
        faults.close()


def test_kill_9_of_the_runtime_at_random_moments(sock_dir):
    run_trials(sock_dir, "runtime")


def test_kill_9_of_quilt_at_random_moments(sock_dir):
    run_trials(sock_dir, "quilt")


def test_the_accepted_histories_check_refuses_a_call_left_unanswered():
    """(The check above means something.)"""
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]}
    assert accepted([{"role": "user"}, call, {"role": "tool", "tool_call_id": "c1"}])
    assert not accepted([{"role": "user"}, call, {"role": "user"}])
    assert not accepted([{"role": "user"}, call])
    assert not accepted([{"role": "tool", "tool_call_id": "c1"}])


def test_quilt_killed_mid_upload(sock_dir):
    """The client gets UNAVAILABLE; nothing is registered, no file is left once Quilt is back,
    and the same upload then goes through."""
    d = start_daemon(sock_dir)
    try:
        c = AriaClient(d.channel(**CHANNEL))
        data = bundles.flat(bundles.manifest("midway"), files={"pad.bin": os.urandom(4 * 1024 * 1024)})
        (quilt,) = quilts_of(d.data_dir)
        incoming = d.data_dir / "quilt" / "bundles" / "incoming"

        def chunks() -> Iterator[bpb.UploadBundleRequest]:
            yield bpb.UploadBundleRequest(metadata=bpb.BundleMetadata(name="midway.aria", total_size_bytes=len(data)))
            for i in range(0, len(data), 64 * 1024):
                if i == 16 * 64 * 1024:  # a quarter in: Quilt holds a part file, and dies
                    parts.extend(incoming.glob("*.part"))
                    os.kill(quilt, signal.SIGKILL)
                time.sleep(0.005)
                yield bpb.UploadBundleRequest(chunk=data[i : i + 64 * 1024])

        parts: list[Path] = []
        try:
            c.upload(chunks())  # type: ignore[arg-type]
            raise AssertionError("an upload whose Quilt died went through")
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert len(parts) == 1  # (it was half-way)
        assert "Calculator" not in {a.name for a in c.agents()}
        eventually(lambda: quilts_of(d.data_dir) not in ([], [quilt]), "a new quilt")
        eventually(lambda: c.upload_bytes(data, name="midway.aria").bundle_id, "the upload again")
        assert not list(incoming.glob("*.part"))
        assert "Calculator" in {a.name for a in c.agents()}
    finally:
        d.stop()
