"""soak: ten minutes of mixed load from 50 clients on one `aria serve` (and its Quilt child), to see
that nothing piles up: calls by status code, latency per method, and both daemons' memory and open
file descriptors over time.

One runtime (with its own Quilt child) and `_fake_model.py` (the OpenAI-compatible model server of
turn_overhead, in a process of its own: it answers a call of the bundle tool `add`, then a final
text). PROCESSES client processes (`python -m bench.soak clients ...`, grpcio.aio, an independent
peer of the runtime) run CLIENTS clients between them, each client one of these roles, in a loop
with small random pauses:

* tasks: LaunchTask (`sh -c` printing three lines), StreamTaskOutput with follow to its end (the
  three lines, in order), then GetTask (COMPLETED, exit code 0); every 10th round a ListTasks page.
* follow: StreamNotifications of every kind for 10 to 40 s, then the client hangs up and resumes
  with after_sequence = the last sequence it saw: every event must come once, in sequence (no gap,
  no repeat, across resumes); the delivery latency of live events is kept.
* upload: a small .aria bundle, unique every time (a nonce file), with its sha256, then
  GetAgentDetails of its agent. aria.v1 has no way to delete or unregister a bundle, so each upload
  stays stored by design (a `bundles` row, and the file in Quilt's store): the report shows how much.
* turns: sessions of the bundle agent `Adder` (the turn_overhead bundle, uploaded once at setup):
  ExecuteTurn with one tool call run in a Quilt sandbox (the result 3, the final text), 5 turns a
  session, then EndSession.
* prefs: UpdateUserPreferences of the client's own key (every 10th update removes it), then
  GetUserPreferences (the key as last set, the model settings intact); every 20th round one
  GetUserPreferences on a fresh connection, closed after it (connection churn).

Every client of a role in a process shares one channel (its own connection): 10 connections in all,
under the runtime's default max_connections_per_user (32), as the fresh ones are (at most
CHURN_AT_ONCE at once per process). The runtime runs with its defaults; the mix is sized to its
per-user quotas (4 turns at once: 4 turn clients; streams open at once stay under 64).

Timeline: a warm-up of load first (30 s; its numbers kept apart), then ARIA_SOAK_SECONDS (default
600) of measured load. Both daemons' RSS (VmRSS) and open fds (/proc/PID/fd), each the median of 5
readings over a second, are sampled under load at the start, every 30 s, at the midpoint (5 min) and
at the end; at the start, the midpoint and the end also settled (the clients pause until nothing is
in flight in either daemon, then resume: under load the fds count what is in flight, settled what is
kept); and once more 10 s after the load, idle. Growth = end / midpoint - 1 of the settled values:
the reference is each daemon's own state at the midpoint of this run; target: at most +5% for each
of the four. Each sample also has the runtime's /metrics (open streams, subscribers, containers running),
Quilt's GetSystemMetrics (containers, tasks running, bundles), the processes below Quilt (sandboxes),
the sizes of both daemons' data, CPU time and the load average.

Unexpected codes: every call that ends with anything but OK (a notification stream the client ends
itself counts as OK), and CHECK_FAILED for an answer that is not what it should be. None is expected;
target 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf import json_format, struct_pb2

from aria_trio.proto.aria.v1 import aria_pb2, bundle_pb2, notification_pb2, registry_pb2, session_pb2
from aria_trio.proto.aria.v1 import task_pb2 as tpb
from aria_trio.proto.aria.v1 import user_preference_pb2 as ppb
from aria_trio.proto.quilt.v1 import quilt_pb2 as qpb

from .harness import BenchError, ServerProcess, child_env, kill, percentile, progress, start_aria, start_model, tail
from .turn_overhead import AGENT, FAKE_MODEL, _setup, make_bundle

SECONDS_ENV = "ARIA_SOAK_SECONDS"
DEFAULT_SECONDS = 600.0
SAMPLE_EVERY_S = 30.0
READINGS = 5  # per sample, 0.25 s apart; the median is kept
IDLE_S = 10.0  # after the load, before the idle sample
SETTLE_TIMEOUT_S = 60.0  # for the daemons to finish what is in flight while the clients pause
TARGET_GROWTH = 0.05
PROCESSES = 2
ROLES = {"tasks": 10, "follow": 8, "upload": 4, "turns": 4, "prefs": 24}  # 50 clients
CLIENTS = sum(ROLES.values())
PAUSES = {"tasks": (1.0, 2.5), "follow": (0.2, 1.0), "upload": (2.0, 5.0), "turns": (0.3, 1.2), "prefs": (0.3, 0.9)}
HOLD_S = (10.0, 40.0)  # a notification stream's life before the client resumes
TURNS_PER_SESSION = 5
CHURN_EVERY = 20
CHURN_AT_ONCE = 4
CALL_TIMEOUT_S = 60.0
STREAM_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 120.0  # for the clients to finish what they are doing and report
MAX_PROBLEMS = 40  # described in full, per process
CHECK_FAILED = "CHECK_FAILED"
TASK_LINES = ["soak-1", "soak-2", "soak-3"]
TASK_ARGV = ["sh", "-c", "for i in 1 2 3; do echo soak-$i; done"]
TURN_INPUT = "add 1 and 2"
TURN_FINAL = "The sum is 3."  # what _fake_model.py answers after the tool's result
UPLOAD_AGENT = "SoakUploader"
UPLOAD_TOOL = "soak_echo"
UPLOAD_MANIFEST = {
    "name": "soak-upload",
    "version": "1.0.0",
    "tools": [{"name": UPLOAD_TOOL, "description": "Echoes", "inputs": {"text": "string"}}],
    "agents": [{"name": UPLOAD_AGENT, "description": "Uploaded again and again", "tools": [UPLOAD_TOOL]}],
}
ROOT = Path(__file__).resolve().parent.parent
DELIVERY = "notification delivery (live)"
DB_TABLES = (
    "tasks",
    "task_output",
    "task_status_history",
    "sessions",
    "messages",
    "tool_executions",
    "notifications",
    "bundles",
    "agents",
    "tools",
    "containers",
)

# -- the clients (a process of their own: `python -m bench.soak clients SOCKET INDEX ROLES`) -------


def _unique_bundle(nonce: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("manifest.json", json.dumps(UPLOAD_MANIFEST))
        z.writestr(f"implementations/tools/{UPLOAD_TOOL}.py", f"def {UPLOAD_TOOL}(text):\n    return text\n")
        z.writestr("soak/nonce.txt", nonce)
    return out.getvalue()


def _channel(target: str) -> grpc.aio.Channel:
    # a connection of its own (grpc would otherwise share one between channels to the same target)
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


class _Methods:
    """The aria.v1 methods the clients call, on one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        def unary(path: str, request: Any, reply: Any) -> Any:
            return channel.unary_unary(f"/aria.v1.{path}", request.SerializeToString, reply.FromString)

        def stream(path: str, request: Any, reply: Any) -> Any:
            return channel.unary_stream(f"/aria.v1.{path}", request.SerializeToString, reply.FromString)

        self.launch = unary("TaskService/LaunchTask", tpb.LaunchTaskRequest, tpb.LaunchTaskResponse)
        self.output = stream("TaskService/StreamTaskOutput", tpb.StreamTaskOutputRequest, tpb.TaskOutput)
        self.get_task = unary("TaskService/GetTask", tpb.GetTaskRequest, tpb.Task)
        self.list_tasks = unary("TaskService/ListTasks", tpb.ListTasksRequest, tpb.ListTasksResponse)
        self.notifications = stream(
            "NotificationService/StreamNotifications",
            notification_pb2.StreamNotificationsRequest,
            notification_pb2.Notification,
        )
        self.upload = channel.stream_unary(
            "/aria.v1.BundleService/UploadBundle",
            bundle_pb2.UploadBundleRequest.SerializeToString,
            bundle_pb2.UploadBundleResponse.FromString,
        )
        self.agent = unary(
            "RegistryService/GetAgentDetails", registry_pb2.GetAgentDetailsRequest, registry_pb2.AgentDefinition
        )
        self.create_session = unary(
            "SessionService/CreateSession", session_pb2.CreateSessionRequest, session_pb2.Session
        )
        self.end_session = unary("SessionService/EndSession", session_pb2.EndSessionRequest, session_pb2.Session)
        self.turn = stream("SessionService/ExecuteTurn", session_pb2.ExecuteTurnRequest, session_pb2.TurnOutput)
        self.update_prefs = unary(
            "UserPreferenceService/UpdateUserPreferences", ppb.UpdateUserPreferencesRequest, ppb.UserPreferences
        )
        self.get_prefs = unary(
            "UserPreferenceService/GetUserPreferences", ppb.GetUserPreferencesRequest, ppb.UserPreferences
        )


class _Load:
    """The clients of one process and their numbers."""

    def __init__(self, socket_path: str, index: int) -> None:
        self.target = f"unix:{socket_path}"
        self.index = index
        self.phase = "warmup"
        self.codes: dict[str, dict[str, Counter[str]]] = {p: defaultdict(Counter) for p in ("warmup", "measure")}
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.problems: list[str] = []
        self.counts: Counter[str] = Counter()
        self.stopping = asyncio.Event()
        self.running = asyncio.Event()  # cleared while the benchmark has the clients pause
        self.running.set()
        self.churn = asyncio.Semaphore(CHURN_AT_ONCE)
        self.rng = random.Random(index)

    # -- bookkeeping

    def record(self, method: str, code: str, ms: float | None = None) -> None:
        self.codes[self.phase][method][code] += 1
        if ms is not None and self.phase == "measure":
            self.ms[method].append(round(ms, 3))

    def _describe(self, method: str, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{time.strftime('%H:%M:%S')} [{self.phase}] {method}: {text[:300]}")

    def problem(self, method: str, text: str) -> None:
        """An answer that is not what it should be."""
        self.record(method, CHECK_FAILED)
        self._describe(method, text)

    def failed(self, method: str, exc: grpc.aio.AioRpcError) -> None:
        self.record(method, exc.code().name)
        self._describe(method, f"{exc.code().name}: {exc.details()}")

    async def call(self, method: str, fn: Any, request: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """One unary (or stream-unary) call, recorded; its reply, or None if it failed."""
        started = time.perf_counter()
        try:
            reply = await fn(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self.failed(method, exc)
            return None
        self.record(method, "OK", (time.perf_counter() - started) * 1000)
        return reply

    async def stream(self, method: str, fn: Any, request: Any, timeout: float = STREAM_TIMEOUT_S) -> list[Any] | None:
        """A server stream read to its end, recorded; its messages, or None if it failed."""
        started = time.perf_counter()
        try:
            items = [item async for item in fn(request, timeout=timeout)]
        except grpc.aio.AioRpcError as exc:
            self.failed(method, exc)
            return None
        self.record(method, "OK", (time.perf_counter() - started) * 1000)
        return items

    async def pause(self, role: str) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), self.rng.uniform(*PAUSES[role]))

    async def gate(self) -> None:
        """Wait while the clients are paused (to start no new work; what is open stays open)."""
        if not self.running.is_set():
            waiters = [asyncio.create_task(event.wait()) for event in (self.running, self.stopping)]
            await asyncio.wait(waiters, return_when="FIRST_COMPLETED")
            for waiter in waiters:
                waiter.cancel()

    async def loop(self, role: str, one_round: Callable[[], Awaitable[None]]) -> None:
        while not self.stopping.is_set():
            await self.gate()
            if self.stopping.is_set():
                return
            try:
                await one_round()
            except Exception as exc:  # a bug of this client or a malformed answer: reported, then on
                self.problem(f"{role} client", repr(exc))
            await self.pause(role)

    # -- the roles

    def tasks(self, m: _Methods) -> Callable[[], Awaitable[None]]:
        rounds = 0

        async def one_round() -> None:
            nonlocal rounds
            rounds += 1
            request = tpb.LaunchTaskRequest(command_json=json.dumps(TASK_ARGV), timeout_seconds=60)
            launched = await self.call("TaskService/LaunchTask", m.launch, request)
            if launched is None:
                return
            follow = tpb.StreamTaskOutputRequest(task_id=launched.task_id, follow=True)
            output = await self.stream("TaskService/StreamTaskOutput", m.output, follow)
            if output is None:
                return
            lines = [o.stdout_line.rstrip("\n") for o in output if o.WhichOneof("output") == "stdout_line"]
            if lines != TASK_LINES:
                self.problem("TaskService/StreamTaskOutput", f"task {launched.task_id} printed {lines}")
            await self._finished(m, launched.task_id)
            if rounds % 10 == 0:
                page = await self.call("TaskService/ListTasks", m.list_tasks, tpb.ListTasksRequest(page_size=20))
                if page is not None and not 0 < len(page.tasks) <= 20:
                    self.problem("TaskService/ListTasks", f"a page of {len(page.tasks)} tasks")

        return one_round

    async def _finished(self, m: _Methods, task_id: str) -> None:
        """GetTask after the follow ended: COMPLETED with exit code 0 (asked again for up to 10 s if
        it is not final yet, which is counted)."""
        deadline = time.monotonic() + 10
        first = True
        while True:
            task = await self.call("TaskService/GetTask", m.get_task, tpb.GetTaskRequest(task_id=task_id))
            if task is None:
                return
            if task.status in (aria_pb2.COMPLETED, aria_pb2.FAILED, aria_pb2.CANCELLED, aria_pb2.TIMEOUT):
                break
            if first:
                self.counts["task not final when its follow ended"] += 1
                first = False
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if task.status != aria_pb2.COMPLETED or task.exit_code != 0:
            status = aria_pb2.TaskStatus.Name(task.status)
            self.problem("TaskService/GetTask", f"task {task_id} is {status}, exit code {task.exit_code}")

    def follow(self, m: _Methods) -> Callable[[], Awaitable[None]]:
        last: int | None = None

        async def one_round() -> None:
            nonlocal last
            if last is None:
                request = notification_pb2.StreamNotificationsRequest()  # live events only
            else:
                request = notification_pb2.StreamNotificationsRequest(after_sequence=last)
                self.counts["notification resumes"] += 1
            subscribed_us = time.time_ns() // 1000
            call = m.notifications(request)

            async def read() -> None:
                nonlocal last
                async for n in call:
                    if last is not None and n.sequence != last + 1:
                        self.problem("NotificationService/StreamNotifications", f"event {n.sequence} after {last}")
                    last = n.sequence
                    self.counts["notifications received"] += 1
                    stored_us = n.timestamp.ToMicroseconds()
                    if stored_us >= subscribed_us and self.phase == "measure":
                        self.ms[DELIVERY].append(round((time.time_ns() // 1000 - stored_us) / 1000, 3))

            reader = asyncio.create_task(read())
            stop = asyncio.create_task(self.stopping.wait())
            started = time.perf_counter()
            done, _ = await asyncio.wait(
                {reader, stop}, timeout=self.rng.uniform(*HOLD_S), return_when="FIRST_COMPLETED"
            )
            stop.cancel()
            method = "NotificationService/StreamNotifications"
            if reader in done:  # the stream ended, and not by our doing
                exc = reader.exception()
                if isinstance(exc, grpc.aio.AioRpcError):
                    self.failed(method, exc)
                else:
                    self.problem(method, f"the stream ended by itself ({exc!r})")
                return
            call.cancel()  # the client hangs up: counted OK
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            self.record(method, "OK", (time.perf_counter() - started) * 1000)

        return one_round

    def upload(self, m: _Methods) -> Callable[[], Awaitable[None]]:
        async def one_round() -> None:
            data = _unique_bundle(f"{self.index}-{uuid.uuid4()}")
            meta = bundle_pb2.BundleMetadata(
                name="soak-upload.aria", total_size_bytes=len(data), sha256_checksum=hashlib.sha256(data).hexdigest()
            )
            requests = [bundle_pb2.UploadBundleRequest(metadata=meta), bundle_pb2.UploadBundleRequest(chunk=data)]
            reply = await self.call("BundleService/UploadBundle", m.upload, iter(requests))
            if reply is None:
                return
            if not reply.success or not reply.bundle_id:
                self.problem("BundleService/UploadBundle", f"success={reply.success}: {reply.error_message}")
                return
            request = registry_pb2.GetAgentDetailsRequest(agent_id=UPLOAD_AGENT)
            agent = await self.call("RegistryService/GetAgentDetails", m.agent, request)
            if agent is not None and [t.name for t in agent.tools] != [UPLOAD_TOOL]:
                self.problem("RegistryService/GetAgentDetails", f"tools {[t.name for t in agent.tools]}")

        return one_round

    def turns(self, m: _Methods) -> Callable[[], Awaitable[None]]:
        async def one_round() -> None:
            session = await self.call(
                "SessionService/CreateSession", m.create_session, session_pb2.CreateSessionRequest(agent_id=AGENT)
            )
            if session is None:
                return
            for k in range(TURNS_PER_SESSION):
                if k:
                    await self.pause("turns")
                    await self.gate()
                request = session_pb2.ExecuteTurnRequest(session_id=session.id, input=TURN_INPUT)
                events = await self.stream("SessionService/ExecuteTurn", m.turn, request)
                if events is None:
                    break
                kinds = [e.WhichOneof("event") for e in events]
                results = [e.tool_result for e in events if e.HasField("tool_result")]
                if (
                    kinds.count("tool_call") != 1
                    or len(results) != 1
                    or not results[0].success
                    or json.loads(results[0].result_json) != 3
                    or events[-1].final_response != TURN_FINAL
                ):
                    self.problem("SessionService/ExecuteTurn", f"events {kinds}, results {results}")
                if self.stopping.is_set():
                    break
            ended = await self.call(
                "SessionService/EndSession", m.end_session, session_pb2.EndSessionRequest(session_id=session.id)
            )
            if ended is not None and ended.status != "completed":
                self.problem("SessionService/EndSession", f"the session is {ended.status!r}")

        return one_round

    def prefs(self, m: _Methods, client: int) -> Callable[[], Awaitable[None]]:
        key = f"soak.p{self.index}.c{client}"
        rounds = 0

        async def one_round() -> None:
            nonlocal rounds
            rounds += 1
            value = None if rounds % 10 == 0 else float(rounds)
            updates = struct_pb2.Struct()
            updates.update({key: value})
            reply = await self.call(
                "UserPreferenceService/UpdateUserPreferences",
                m.update_prefs,
                ppb.UpdateUserPreferencesRequest(updates=updates),
            )
            if reply is not None:
                self._check_prefs("UserPreferenceService/UpdateUserPreferences", reply, key, value)
            reply = await self.call(
                "UserPreferenceService/GetUserPreferences", m.get_prefs, ppb.GetUserPreferencesRequest()
            )
            if reply is not None:
                self._check_prefs("UserPreferenceService/GetUserPreferences", reply, key, value)
            if rounds % CHURN_EVERY == 0:
                async with self.churn, _channel(self.target) as fresh:
                    method = "GetUserPreferences (fresh connection)"
                    reply = await self.call(method, _Methods(fresh).get_prefs, ppb.GetUserPreferencesRequest())
                    if reply is not None:
                        self._check_prefs(method, reply, key, value)

        return one_round

    def _check_prefs(self, method: str, reply: ppb.UserPreferences, key: str, value: float | None) -> None:
        prefs = json_format.MessageToDict(reply.preferences)
        if prefs.get(key) != value or prefs.get("llm.model") != "bench-model":
            self.problem(method, f"{key}={prefs.get(key)!r} (set {value!r}), llm.model={prefs.get('llm.model')!r}")

    # -- the process

    async def main(self, roles: dict[str, int]) -> dict[str, Any]:
        async with contextlib.AsyncExitStack() as stack:
            methods = {}
            for role in roles:
                methods[role] = _Methods(await stack.enter_async_context(_channel(self.target)))
                await methods[role].get_prefs(ppb.GetUserPreferencesRequest(), timeout=CALL_TIMEOUT_S)
            print("ready", flush=True)
            if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
                raise SystemExit("soak clients: the benchmark did not say go")
            commands = asyncio.create_task(self._commands())
            loops = []
            for role, count in roles.items():
                for client in range(count):
                    one_round = (
                        self.prefs(methods[role], client) if role == "prefs" else getattr(self, role)(methods[role])
                    )
                    loops.append(self.loop(role, one_round))
            await asyncio.gather(*loops)
            commands.cancel()
        codes = {phase: {m: dict(c) for m, c in by.items()} for phase, by in self.codes.items()}
        return {"codes": codes, "ms": self.ms, "problems": self.problems, "counts": dict(self.counts)}

    async def _commands(self) -> None:
        """`measure` on stdin starts the measured phase, `pause` and `resume` hold new work back and
        let it go again, `stop` (or the end of stdin) ends the clients."""
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if line == "measure":
                self.phase = "measure"
            elif line == "pause":
                self.running.clear()
            elif line == "resume":
                self.running.set()
            elif line in ("stop", ""):
                self.stopping.set()
                return


def clients(socket_path: str, index: int, roles: dict[str, int]) -> dict[str, Any]:
    return asyncio.run(_Load(socket_path, index).main(roles))


# -- the benchmark --------------------------------------------------------------------------------


class _ClientProcess:
    """A client process: `ready`, then commands on its stdin (go, measure, stop), then its JSON line."""

    def __init__(self, socket_path: Path, index: int, roles: dict[str, int], err_path: Path) -> None:
        self.what = f"client process {index}"
        self.err_path = err_path
        argv = [sys.executable, "-m", "bench.soak", "clients", str(socket_path), str(index), json.dumps(roles)]
        with open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=child_env(),
                text=True,
            )

    def _error(self, problem: str) -> BenchError:
        return BenchError(f"{self.what} {problem}:\n{tail(self.err_path)}")

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.wait(timeout=10)
            raise self._error(f"did not start (exit {self.proc.returncode})")

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise self._error(f"exited early (exit {self.proc.returncode})")

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)  # (closes its stdin: the end of its commands)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise self._error(f"did not finish within {timeout:.0f} s") from None
        if self.proc.returncode != 0 or not out.strip():
            raise self._error(f"failed (exit {self.proc.returncode})")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _split_roles() -> list[dict[str, int]]:
    """ROLES shared out between the PROCESSES client processes."""
    shares: list[dict[str, int]] = [{} for _ in range(PROCESSES)]
    for role, count in ROLES.items():
        for k in range(PROCESSES):
            n = count // PROCESSES + (1 if k < count % PROCESSES else 0)
            if n:
                shares[k][role] = n
    return shares


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quilt_pid(aria: ServerProcess) -> int:
    """Quilt's pid, from the runtime's `quilt link up` log line (the child it started)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in aria.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == "quilt link up" and entry.get("pid"):
                    return int(entry["pid"])
        time.sleep(0.2)
    raise BenchError(f"no `quilt link up` in the runtime's log; it ends with:\n{tail(aria.log_path)}")


def _status(pid: int) -> dict[str, int]:
    """VmRSS (KiB; of it RssAnon, the heap, and RssFile, mapped files), Threads and open fds of a process."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                found[key] = int(value.split()[0])
    return {
        "rss_kib": found["VmRSS"],
        "rss_anon_kib": found["RssAnon"],
        "rss_file_kib": found["RssFile"],
        "threads": found["Threads"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(root: int) -> int:
    """How many processes are below `root` (Quilt's sandboxes and their processes)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children[int(f.read().rsplit(")", 1)[1].split()[1])].append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    found, todo = 0, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found += 1
            todo.append(child)
    return found


def _bytes_under(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512  # (the disk images are sparse)
    return total


def _db_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("runtime.db*") if p.is_file())


def _scrape(port: int) -> dict[str, Any]:
    """The runtime's /metrics, the few series the soak looks at."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found: dict[str, Any] = {"open_streams": 0.0, "calls": {}}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        if name == "aria_rpc_open_streams":
            found["open_streams"] += float(value)
            if 'method="StreamNotifications"' in labels:
                found["open_notification_streams"] = found.get("open_notification_streams", 0.0) + float(value)
        elif name == "aria_rpc_calls_total":
            parts = dict(p.split("=", 1) for p in labels.rstrip("}").split(","))
            key = f"{parts['service'].strip(chr(34))}/{parts['method'].strip(chr(34))} {parts['code'].strip(chr(34))}"
            found["calls"][key] = float(value)
        elif name in ("aria_notification_subscribers", "aria_containers_running", "aria_quilt_link_restarts_total"):
            found[name.removeprefix("aria_").removesuffix("_total")] = float(value)
    return found


class _Sampler:
    def __init__(self, aria: ServerProcess, quilt_pid: int, data_dir: Path, metrics_port: int) -> None:
        self.aria = aria
        self.quilt_pid = quilt_pid
        self.data_dir = data_dir
        self.metrics_port = metrics_port
        self.quilt = grpc.insecure_channel(f"unix:{data_dir / 'quilt.sock'}")
        self.system_metrics = self.quilt.unary_unary(
            "/quilt.v1.System/GetSystemMetrics",
            qpb.GetSystemMetricsRequest.SerializeToString,
            qpb.SystemMetrics.FromString,
        )
        self.t0 = time.monotonic()

    def sample(self, label: str) -> dict[str, Any]:
        readings: dict[str, list[dict[str, int]]] = {"aria": [], "quilt": []}
        for k in range(READINGS):
            if k:
                time.sleep(0.25)
            for name, pid in (("aria", self.aria.pid), ("quilt", self.quilt_pid)):
                try:
                    readings[name].append(_status(pid))
                except OSError:
                    raise BenchError(f"{name} (pid {pid}) is gone") from None
        daemons: dict[str, dict[str, Any]] = {
            name: {key: int(statistics.median(r[key] for r in rs)) for key in rs[0]} for name, rs in readings.items()
        }
        for name, pid in (("aria", self.aria.pid), ("quilt", self.quilt_pid)):
            daemons[name]["rss_mib"] = round(daemons[name]["rss_kib"] / 1024, 1)
            daemons[name]["cpu_s"] = round(_cpu_s(pid), 2)
        qm = self.system_metrics(qpb.GetSystemMetricsRequest(), timeout=30)
        sample: dict[str, Any] = {
            "label": label,
            "t_s": round(time.monotonic() - self.t0, 1),
            "aria": daemons["aria"],
            "quilt": daemons["quilt"],
            "quilt_processes_below": _descendants(self.quilt_pid),
            "quilt_metrics": {
                "containers_total": qm.containers_total,
                "containers_running": qm.containers_running,
                "tasks_running": qm.tasks_running,
                "bundles": qm.bundles,
                "bundle_bytes": qm.bundle_bytes,
            },
            "runtime_metrics": _scrape(self.metrics_port),
            "runtime_db_bytes": _db_bytes(self.data_dir),
            "quilt_data_bytes": _bytes_under(self.data_dir / "quilt"),
            "load_1m": os.getloadavg()[0],
        }
        a, q = sample["aria"], sample["quilt"]
        progress(
            f"{label} (t={sample['t_s']:.0f} s): aria {a['rss_mib']} MiB {a['fds']} fds, "
            f"quilt {q['rss_mib']} MiB {q['fds']} fds, load {sample['load_1m']:.1f}"
        )
        return sample

    def settled(self, label: str, processes: list[_ClientProcess]) -> dict[str, Any]:
        """A sample with the clients paused and nothing in flight in either daemon (no call but the
        notification streams, no container, task or sandbox in Quilt), up to SETTLE_TIMEOUT_S."""
        for p in processes:
            p.send("pause")
        started = time.monotonic()
        while (busy := self._busy()) and time.monotonic() - started < SETTLE_TIMEOUT_S:
            time.sleep(0.25)
        if busy:
            progress(f"{label}: not settled after {SETTLE_TIMEOUT_S:.0f} s: {busy}")
        time.sleep(0.5)
        sample = self.sample(f"{label} (settled)")
        sample["settle_s"] = round(time.monotonic() - started, 1)
        sample["still_busy"] = busy
        for p in processes:
            p.send("resume")
        return sample

    def _busy(self) -> str:
        """What is still in flight ("" when nothing is)."""
        qm = self.system_metrics(qpb.GetSystemMetricsRequest(), timeout=30)
        rm = _scrape(self.metrics_port)
        calls = rm["open_streams"] - rm.get("open_notification_streams", 0)
        below = _descendants(self.quilt_pid)
        found = {
            "runtime calls open": calls,
            "quilt containers": qm.containers_total,
            "quilt tasks running": qm.tasks_running,
            "processes below quilt": below,
        }
        return ", ".join(f"{k} {v:g}" for k, v in found.items() if v)

    def close(self) -> None:
        self.quilt.close()


def _stop_quilt(pid: int) -> str:
    """SIGTERM to the runtime's Quilt child (it outlives a runtime that stops, by design); how it went."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "already gone"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return "exited at SIGTERM"
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return "killed: still running 20 s after SIGTERM"


def _log_warnings(log_path: Path) -> dict[str, int]:
    """The runtime's log lines (Quilt's too: the child writes to the same log) at warning or above,
    counted by level, logger and event."""
    found: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line) if line.startswith("{") else None
        except ValueError:
            entry = None
        if entry is None:
            if line.strip():
                found["(not a JSON line)"] += 1
            continue
        if entry.get("level") in ("warning", "error", "critical", "exception"):
            found[f"{entry['level']}: {entry.get('logger', '?')}: {entry.get('event')}"] += 1
    return dict(found.most_common())


def _db_counts(data_dir: Path) -> dict[str, int]:
    counts = {}
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'runtime.db'}?mode=ro", uri=True)) as db:
        for name in DB_TABLES:
            with contextlib.suppress(sqlite3.Error):
                counts[name] = int(db.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
    return counts


def _seconds() -> float:
    raw = os.environ.get(SECONDS_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_SECONDS
    except ValueError:
        raise BenchError(f"{SECONDS_ENV} must be a number of seconds, not {raw!r}") from None
    if seconds < 10:
        raise BenchError(f"{SECONDS_ENV} must be at least 10 (seconds)")
    return seconds


def _schedule(seconds: float) -> list[tuple[float, str]]:
    mid = seconds / 2
    points: dict[float, str] = {
        t: f"t={t:.0f} s" for t in range(int(SAMPLE_EVERY_S), int(seconds), int(SAMPLE_EVERY_S))
    }
    points[mid] = "midpoint"
    points[seconds] = "end"
    return sorted(points.items())


def _load_for(
    seconds: float, aria: ServerProcess, processes: list[_ClientProcess], sampler: _Sampler
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The load for `seconds`, sampled on the schedule (under load); at the start, the midpoint and
    the end also settled. Both sets of samples."""
    samples = [sampler.sample("start")]
    settled = {"start": sampler.settled("start", processes)}
    started = time.monotonic()
    for at, label in _schedule(seconds):
        while (left := started + at - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            if aria.proc.poll() is not None:
                raise BenchError(
                    f"aria exited (code {aria.proc.returncode}); its log ends with:\n{tail(aria.log_path)}"
                )
            for p in processes:
                p.check_alive()
        samples.append(sampler.sample(label))
        if label in ("midpoint", "end"):
            settled[label] = sampler.settled(label, processes)
    return samples, settled


def run() -> dict[str, Any]:
    seconds = _seconds()
    warmup = min(30.0, max(5.0, seconds / 10))
    with (
        tempfile.TemporaryDirectory(prefix="aria-bench-", dir=os.environ.get("BENCH_TMP")) as name,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(name)
        data = tmp / "data"
        progress("starting the fake model server")
        model, model_port = start_model(FAKE_MODEL, tmp, "fake model server")
        stack.callback(kill, model)
        metrics_port = _free_port()
        progress("starting aria serve")
        aria = stack.enter_context(start_aria(tmp / "aria.sock", data, tmp, "--metrics-port", str(metrics_port)))
        _setup(aria.socket_path, make_bundle(), model_port)
        quilt_pid = _quilt_pid(aria)
        quilt_stop = stack.enter_context(contextlib.ExitStack())
        quilt_stop.callback(_stop_quilt, quilt_pid)
        sampler = _Sampler(aria, quilt_pid, data, metrics_port)
        stack.callback(sampler.close)
        shares = _split_roles()
        processes = [
            stack.enter_context(_ClientProcess(aria.socket_path, k, roles, tmp / f"clients-{k}.err"))
            for k, roles in enumerate(shares)
        ]
        for p in processes:
            p.wait_ready()
        progress(f"{CLIENTS} clients in {PROCESSES} processes: {warmup:.0f} s of warm-up, then {seconds:.0f} s")
        for p in processes:
            p.send("go")
        time.sleep(warmup)
        for p in processes:
            p.send("measure")
        samples, settled = _load_for(seconds, aria, processes, sampler)
        for p in processes:
            p.send("stop")
        results = [p.result(STOP_TIMEOUT_S) for p in processes]
        time.sleep(IDLE_S)
        idle = sampler.sample("idle after the load")
        counts = _db_counts(data)
        warnings = _log_warnings(aria.log_path)
        aria.stop()
        quilt_stop.pop_all()
        quilt_exit = _stop_quilt(quilt_pid)
    return _summary(seconds, warmup, shares, samples, settled, idle, results, counts, warnings, quilt_exit)


def _merge(results: list[dict[str, Any]], phase: str) -> dict[str, dict[str, int]]:
    merged: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        for method, codes in r["codes"][phase].items():
            merged[method].update(codes)
    return {method: dict(sorted(codes.items())) for method, codes in sorted(merged.items())}


def _latency(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 0.5), 2),
        "p90": round(percentile(values, 0.9), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values), 2),
    }


def _growth(mid: float, end: float) -> float:
    return round((end / mid - 1) * 100, 2)


def _summary(
    seconds: float,
    warmup: float,
    shares: list[dict[str, int]],
    samples: list[dict[str, Any]],
    settled: dict[str, dict[str, Any]],
    idle: dict[str, Any],
    results: list[dict[str, Any]],
    counts: dict[str, int],
    warnings: dict[str, int],
    quilt_exit: str,
) -> dict[str, Any]:
    measured, warm = _merge(results, "measure"), _merge(results, "warmup")
    ms: dict[str, list[float]] = defaultdict(list)
    for r in results:
        for method, values in r["ms"].items():
            ms[method] += values
    latency = {method: _latency(values) for method, values in sorted(ms.items()) if values}
    unexpected = {
        phase: {m: {c: n for c, n in codes.items() if c != "OK"} for m, codes in by.items()}
        for phase, by in (("measure", measured), ("warmup", warm))
    }
    unexpected = {phase: {m: c for m, c in by.items() if c} for phase, by in unexpected.items()}
    unexpected_total = sum(n for by in unexpected.values() for c in by.values() for n in c.values())
    start = samples[0]
    mid = next(s for s in samples if s["label"] == "midpoint")
    end = samples[-1]
    loaded = {"start": start, "midpoint": mid, "end": end}
    growth = []
    for daemon in ("aria", "quilt"):
        for metric, key in (("RSS", "rss_kib"), ("open fds", "fds")):
            value = _growth(settled["midpoint"][daemon][key], settled["end"][daemon][key])
            growth.append(
                {
                    "metric": f"{daemon} {metric}, settled: end / midpoint - 1 (%)",
                    "daemon": daemon,
                    "key": key,
                    "values": {label: s[daemon][key] for label, s in settled.items()},
                    "under_load": {label: s[daemon][key] for label, s in loaded.items()},
                    "under_load_growth": _growth(mid[daemon][key], end[daemon][key]),
                    "value": value,
                    "target": f"<= +{TARGET_GROWTH * 100:g}%",
                    "pass": value <= TARGET_GROWTH * 100,
                }
            )
    server_calls = {
        key: round(n - start["runtime_metrics"]["calls"].get(key, 0))
        for key, n in end["runtime_metrics"]["calls"].items()
        if n - start["runtime_metrics"]["calls"].get(key, 0)
    }
    notes: Counter[str] = Counter()
    for r in results:
        notes.update(r["counts"])
    return {
        "parameters": {
            "seconds": seconds,
            "seconds_env": SECONDS_ENV,
            "warmup_s": warmup,
            "clients": CLIENTS,
            "roles": ROLES,
            "processes": PROCESSES,
            "roles_per_process": shares,
            "pauses_s": PAUSES,
            "notification_hold_s": HOLD_S,
            "turns_per_session": TURNS_PER_SESSION,
            "sample_every_s": SAMPLE_EVERY_S,
            "readings_per_sample": READINGS,
            "settled": "at the start, midpoint and end: the clients pause until nothing is in flight "
            "(no call open but the notification streams, no container, task or sandbox in Quilt), then resume",
            "expected_codes": "none but OK (a notification stream the client hangs up on counts as OK)",
            "growth_reference": "each daemon's own state at the midpoint of this run",
        },
        "calls": measured,
        "warmup_calls": warm,
        "latency_ms": latency,
        "unexpected": unexpected,
        "unexpected_total": unexpected_total,
        "problems": [p for r in results for p in r["problems"]],
        "client_counts": dict(notes),
        "server_calls_measured": dict(sorted(server_calls.items())),
        "samples": samples,
        "settled": settled,
        "idle": idle,
        "db_rows_at_end": counts,
        "log_warnings": warnings,
        "quilt_at_the_end": quilt_exit,
        "targets": [
            *growth,
            {
                "metric": "unexpected codes (warm-up and measured)",
                "value": unexpected_total,
                "target": "0",
                "pass": unexpected_total == 0,
            },
        ],
    }


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(r: dict[str, Any]) -> str:
    p = r["parameters"]
    roles = ", ".join(f"{n} {role}" for role, n in p["roles"].items())
    lines = [
        f"soak: {p['seconds']:.0f} s of mixed load (after {p['warmup_s']:.0f} s of warm-up) from {p['clients']} "
        f"clients in {p['processes']} processes ({roles}), one aria serve and its Quilt",
        "",
        f"{'method (measured calls)':<46}{'OK':>8}  {'other codes':<22}{'p50 ms':>9}{'p99 ms':>9}",
    ]
    methods = sorted(set(r["calls"]) | set(r["latency_ms"]))
    for method in methods:
        codes = r["calls"].get(method, {})
        other = ", ".join(f"{c} {n}" for c, n in codes.items() if c != "OK") or "-"
        lat = r["latency_ms"].get(method)
        ok = codes.get("OK", lat["n"] if method == DELIVERY and lat else 0)
        p50, p99 = (f"{lat['p50']:.1f}", f"{lat['p99']:.1f}") if lat else ("-", "-")
        if method == "NotificationService/StreamNotifications":
            p50, p99 = "(held", "10-40 s)"
        lines.append(f"{method:<46}{ok:>8}  {other:<22}{p50:>9}{p99:>9}")
    warm_total = sum(n for codes in r["warmup_calls"].values() for n in codes.values())
    lines.append(f"(warm-up: {warm_total} calls, not in the table; their codes are in the JSON)")
    unexpected = r["unexpected_total"]
    listed = "; ".join(
        f"{phase}: {m} {c} {n}" for phase, by in r["unexpected"].items() for m, cs in by.items() for c, n in cs.items()
    )
    lines.append(
        f"unexpected codes: {unexpected}{' (' + listed + ')' if listed else ''}  (target 0: {_mark(not unexpected)})"
    )
    for problem in r["problems"][:8]:
        lines.append(f"  {problem}")
    if r["client_counts"]:
        lines.append("counted by the clients: " + ", ".join(f"{k} {v}" for k, v in sorted(r["client_counts"].items())))
    growth = r["targets"][:-1]
    for title, values, change, target in (
        ("settled", "values", "value", True),
        ("under load", "under_load", "under_load_growth", False),
    ):
        lines += ["", f"{title:<18}{'start':>10}{'midpoint':>10}{'end':>10}{'end/mid':>10}"]
        lines[-1] += "   target <= +5%" if target else ""
        for t in growth:
            v = [t[values][k] for k in ("start", "midpoint", "end")]
            rss = t["key"] == "rss_kib"
            cells = [f"{x / 1024:.1f}" if rss else str(x) for x in v]
            name = f"{t['daemon']} {'RSS MiB' if rss else 'fds'}"
            mark = f"   {_mark(t['pass'])}" if target else ""
            lines.append(f"{name:<18}{cells[0]:>10}{cells[1]:>10}{cells[2]:>10}{t[change]:>+9.2f}%{mark}")
    settled = r["settled"]
    lines.append(
        f"(growth = end / midpoint - 1; the reference is each daemon's own state at the midpoint, "
        f"t={settled['midpoint']['t_s']:.0f} s, of this same run. Settled: the clients paused until nothing was in "
        f"flight (took {', '.join(str(s['settle_s']) for s in settled.values())} s), with "
        f"{'/'.join(str(round(s['runtime_metrics'].get('open_notification_streams', 0))) for s in settled.values())} "
        f"notification streams and {sum(len(share) for share in p['roles_per_process'])} client connections still "
        f"open. Each value the median of {p['readings_per_sample']} readings)"
    )
    idle = r["idle"]
    lines.append(
        f"idle {IDLE_S:.0f} s after the load: aria {idle['aria']['rss_mib']} MiB {idle['aria']['fds']} fds, quilt "
        f"{idle['quilt']['rss_mib']} MiB {idle['quilt']['fds']} fds; quilt containers "
        f"{idle['quilt_metrics']['containers_total']}, tasks running {idle['quilt_metrics']['tasks_running']}, "
        f"processes below quilt {idle['quilt_processes_below']}; runtime open streams "
        f"{idle['runtime_metrics']['open_streams']:.0f}, subscribers "
        f"{idle['runtime_metrics'].get('notification_subscribers', 0):.0f}"
    )
    start, end = r["samples"][0], r["samples"][-1]
    mib = 1024 * 1024
    lines.append(
        f"stored by design: runtime.db {start['runtime_db_bytes'] / mib:.1f} -> "
        f"{end['runtime_db_bytes'] / mib:.1f} MiB, "
        f"quilt data {start['quilt_data_bytes'] / mib:.1f} -> {end['quilt_data_bytes'] / mib:.1f} MiB "
        f"(bundles {start['quilt_metrics']['bundles']} -> {end['quilt_metrics']['bundles']}); rows at the end: "
        + ", ".join(f"{k} {v}" for k, v in r["db_rows_at_end"].items())
    )
    warned = r["log_warnings"]
    lines.append(
        f"log lines at warning or above (both daemons, the whole run): {sum(warned.values())}"
        + "".join(f"\n  {n} x {what}" for what, n in list(warned.items())[:6])
    )
    mid = next(s for s in r["samples"] if s["label"] == "midpoint")
    loads = ", ".join(f"{s['load_1m']:.1f}" for s in (start, mid, end))
    lines.append(f"load average (1 min) at start, midpoint, end: {loads} (2 cores)")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "clients":
        sys.exit("usage: python -m bench.soak clients RUNTIME_SOCKET INDEX ROLES_JSON")
    _, _, socket_arg, index_arg, roles_arg = sys.argv
    print(json.dumps(clients(socket_arg, int(index_arg), json.loads(roles_arg))), flush=True)
