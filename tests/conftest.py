"""Fixtures: the Probe service in-process, and the real daemon as a subprocess on a real socket."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from aria_trio.rpc import Server
from aria_trio.shared import logs

import users
from probe import Probe, make_server

logs.setup("debug", "json")

# The tests that take half a minute or more each, started first, each by a different worker, so
# that no worker runs several of them in a row and the others wait for it at the end.
LONG_FIRST = (
    "test_lifetimes.py",
    "test_faults.py::test_kill_9",
    "test_races.py::test_runtime_first_use",
    "test_survival.py::test_a_printing_task",
    "test_races.py::test_runtime_stop_against_start",
    "test_races.py::test_runtime_cancel_of_a_followed",
    "test_races.py::test_runtime_cancel_against_completion",
    "test_races.py::test_quilt_first_use",
    "test_races.py::test_runtime_stop_with_execs",
    "test_fuzz.py::test_fuzz",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long tests first, one per chunk of the xdist schedule: its `load` scheduler hands each
    worker, to begin with, a run of consecutive tests of len(items) // workers // 4 (at least 2),
    then more as it goes; a long test at the start of each run begins at once, in every worker
    (the rest keep their order)."""

    def rank(item: pytest.Item) -> int:
        return next((n for n, mark in enumerate(LONG_FIRST) if mark in item.nodeid), len(LONG_FIRST))

    long = sorted((i for i in items if rank(i) < len(LONG_FIRST)), key=rank)
    rest = [i for i in items if rank(i) == len(LONG_FIRST)]
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    chunk = max(2, len(items) // workers // 4)
    order: list[pytest.Item] = []
    for i, item in enumerate(long):
        if i < workers:  # one at the head of each worker's first run
            order += [item, *rest[: chunk - 1]]
            del rest[: chunk - 1]
        else:  # the others as soon as possible after
            order.append(item)
    items[:] = order + rest


def pytest_sessionfinish() -> None:
    for d in _STARTED:  # (a scenario's daemons, when the session was interrupted)
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def _kill_quilts_under(path: Path) -> None:
    from quilt_client import quilt_daemons

    for pid in quilt_daemons(str(path).encode() + b"/"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _socket_folder(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        _clean_folder(path)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short folder for sockets (AF_UNIX paths are limited to 107 bytes). Daemons started in it
    that a test left running (it failed before stopping them) are killed with it."""
    with _socket_folder("aria-t-") as path:
        yield path


def _clean_folder(path: Path) -> None:
    for d in _STARTED:
        if d.proc.poll() is None and path in d.socket.parents:
            d.stop(signal.SIGKILL)
    _STARTED[:] = [d for d in _STARTED if d.proc.poll() is None]
    _kill_quilts_under(path)  # (kept by an orphan grace, if the test failed before it stopped them)
    if not os.environ.get("ARIA_TEST_KEEP"):  # (set it to look at the daemons' logs afterwards)
        shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class RunningProbe:
    probe: Probe
    server: Server
    path: str


@pytest.fixture
async def probe_server(nursery: Any, sock_dir: Path) -> RunningProbe:
    probe = Probe()
    server = make_server(probe)
    path = str(sock_dir / "probe.sock")
    await nursery.start(server.serve, path)
    return RunningProbe(probe, server, path)


@pytest.fixture(scope="session")
def unix_users() -> Iterator[dict[str, users.User]]:
    """Two real Unix users (see users.py), made for this run and removed after it."""
    try:
        yield users.make_users()
    finally:
        users.remove_users()


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


# -- the real daemon -------------------------------------------------------------------------------


@dataclasses.dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    data_dir: Path
    log_path: Path
    keeps_quilt: bool = False  # started with an orphan grace: its Quilt outlives it, by design
    notified: bool = False  # it says READY=1 on our NOTIFY_SOCKET (see _Readiness)

    def channel(self, **options: Any) -> grpc.Channel:
        return grpc.insecure_channel("unix:" + str(self.socket), options=list(options.items()))

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "non-json", "line": line})
        return out

    def quilt_pids(self) -> list[int]:
        """The Quilt this runtime started, if any (it lives in a session of its own)."""
        from quilt_client import descendants_running

        return descendants_running(self.proc.pid, b"quilt\0serve")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the daemon; and wait for the Quilt it started to be gone too (the tests start
        runtimes with --quilt-orphan-grace 0: it stops at once when its runtime has gone), unless
        it was started to keep its Quilt (a grace: the test stops that Quilt itself)."""
        quilts = self.quilt_pids() if self.proc.poll() is None and not self.keeps_quilt else []
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in quilts) and time.monotonic() < deadline:
            time.sleep(0.02)
        return code


_STARTED: list[Daemon] = []  # every daemon the tests started (see sock_dir)


class _Readiness:
    """One NOTIFY_SOCKET for every daemon this test process starts: the daemons say READY=1 with
    their MAINPID there (systemd's protocol, which they speak anyway), so a test waits for exactly
    that datagram instead of re-reading the daemon's log. A thread reads the socket for the
    session's life, so no daemon ever blocks on a full queue (STOPPING=1 too is read, and dropped)."""

    def __init__(self) -> None:
        self.address = f"@aria-test-ready-{os.getpid()}-{secrets.token_hex(4)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.address[1:])
        self._ready: set[int] = set()
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="notify-socket", daemon=True).start()

    def _read(self) -> None:
        while True:
            fields = dict(
                line.partition("=")[::2] for line in self._sock.recv(4096).decode(errors="replace").splitlines()
            )
            if fields.get("READY") == "1" and fields.get("MAINPID", "").isdigit():
                with self._changed:
                    self._ready.add(int(fields["MAINPID"]))
                    self._changed.notify_all()

    def wait(self, pid: int, timeout: float) -> bool:
        """True once `pid` said READY=1; False after `timeout` s (the caller checks for an exit)."""
        with self._changed:
            return self._changed.wait_for(lambda: pid in self._ready, timeout)

    def forget(self, pid: int) -> None:
        """(pids are reused: a later daemon with this pid must say READY=1 for itself)"""
        with self._changed:
            self._ready.discard(pid)


_readiness: _Readiness | None = None
_readiness_made = threading.Lock()


def _notify_socket() -> _Readiness:
    """The one listener of this test process (made once: scenarios start daemons from threads, and
    two listeners would each miss the other's daemons' READY=1)."""
    global _readiness
    with _readiness_made:
        if _readiness is None:
            _readiness = _Readiness()
        return _readiness


def _spawn(
    folder: Path,
    command: list[str],
    name: str,
    data: str,
    args: tuple[str, ...],
    env: dict[str, str] | None,
    wait: bool,
) -> Daemon:
    """`python -m aria_trio <command>` on folder/run/<name>.sock, logging JSON at debug to a file."""
    socket = folder / "run" / f"{name}.sock"
    data_dir = folder / data
    log_path = folder / f"{name}-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "aria_trio", *command, "--socket", str(socket), "--data-dir", str(data_dir)]
    argv += ["--log-format", "json", "--log-level", "debug", *args]
    env = {**os.environ, "HOME": str(folder), **(env or {})}
    notified = "NOTIFY_SOCKET" not in env  # (a test that listens itself: its daemon's log says when)
    if notified:
        env["NOTIFY_SOCKET"] = _notify_socket().address
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
    if notified:
        _notify_socket().forget(proc.pid)
    daemon = Daemon(proc, socket, data_dir, log_path, notified=notified)
    _STARTED.append(daemon)
    if wait:
        wait_ready(daemon)
    return daemon


def start_daemon(folder: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> Daemon:
    """A runtime (with its Quilt child). Its Quilt stops when the runtime has gone (orphan grace 0)
    unless the test asks for a grace (--quilt-orphan-grace N) to see the work outlive it."""
    if not any(a.startswith("--quilt-orphan-grace") for a in args):
        args = (*args, "--quilt-orphan-grace", "0")
    keeps = args[args.index("--quilt-orphan-grace") + 1] != "0" if "--quilt-orphan-grace" in args else False
    d = _spawn(folder, ["serve"], "runtime", "data", args, env, wait=False)
    d.keeps_quilt = keeps
    if wait:
        wait_ready(d)
    return d


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_ready(daemon: Daemon, timeout: float = 60) -> None:
    """Until the daemon serves: its READY=1 (it says so after it logged "serving"), or else that
    line in its log. An exit on the way raises at once, with the log. (A start takes 1-2 s; the
    timeout is for a machine busy with other work, where one took more than 20 s.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log_path.read_text()}")
        if daemon.notified:
            if _notify_socket().wait(daemon.proc.pid, timeout=0.05):  # (a short wait: then look for an exit)
                return
            continue
        # (a runtime's Quilt child logs to the same file: its own socket tells them apart)
        if any(e.get("event") == "serving" and e.get("socket") == str(daemon.socket) for e in daemon.logs()):
            return
        time.sleep(0.02)
    daemon.stop(signal.SIGKILL)
    raise RuntimeError(f"daemon not ready after {timeout}s:\n{daemon.log_path.read_text()}")


SLOW_STOP_S = 5.0  # a daemon with nothing in flight stops in well under a second


@pytest.fixture
def daemon(sock_dir: Path) -> Iterator[Daemon]:
    """A runtime (and its Quilt) of the test's own: for a test that looks at everything the daemon
    holds (a listing, the event log from 0, preferences), stops it, or reads its log."""
    d = start_daemon(sock_dir)
    yield d
    _stop_and_check(d)


@pytest.fixture(scope="module")
def module_daemon() -> Iterator[Daemon]:
    """One runtime (and its Quilt) for the tests of a module (in each worker) that only read, or
    that own what they make and look only at that (their own session, task, container, bundle):
    a daemon pair's start-up costs more CPU than most of such tests."""
    with _socket_folder("aria-m-") as folder:
        d = start_daemon(folder)
        yield d
        _stop_and_check(d)


def _stop_and_check(d: Daemon) -> None:
    if d.proc.poll() is not None:  # it died during the test: show why
        print(f"daemon exited with {d.proc.returncode}:\n" + "\n".join(d.log_path.read_text().splitlines()[-40:]))
    started = time.monotonic()
    d.stop()
    took = time.monotonic() - started
    if took > SLOW_STOP_S:  # seen once in a full run (10 s); its log says where the time went
        tail = "\n".join(d.log_path.read_text().splitlines()[-30:])
        warnings.warn(f"the daemon took {took:.1f} s to stop; the end of its log:\n{tail}", stacklevel=1)


@pytest.fixture
def daemon_factory(sock_dir: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(*args: str, **kwargs: Any) -> Daemon:
        d = start_daemon(sock_dir, *args, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(signal.SIGKILL)


# -- the real quilt daemon -------------------------------------------------------------------------

Quilt = Daemon


def start_quilt(folder: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> Daemon:
    return _spawn(folder, ["quilt", "serve"], "quilt", "quilt", ("--stop-grace", "2", *args), env, wait)


@pytest.fixture
def quilt(sock_dir: Path) -> Iterator[Quilt]:
    q = start_quilt(sock_dir)
    yield q
    q.stop()


@pytest.fixture(scope="module")
def module_quilt() -> Iterator[Quilt]:
    """One Quilt for the tests of a module (in each worker) that own their containers and tasks
    and look only at those (see module_daemon)."""
    with _socket_folder("aria-m-") as folder:
        q = start_quilt(folder)
        yield q
        q.stop()


# -- callers that give up half-way ------------------------------------------------------------------


def typical_seconds(call: Callable[[Any], object], prepare: Callable[[], Any] = lambda: None, runs: int = 5) -> float:
    """The median time of `call(prepare())` over `runs` runs; `prepare` is not timed."""
    took = []
    for _ in range(runs):
        argument = prepare()
        began = time.monotonic()
        call(argument)
        took.append(time.monotonic() - began)
    return sorted(took)[runs // 2]


def give_up_midway(call: Callable[[float], object], timeouts: Iterable[float]) -> None:
    """`call(timeout)` for each timeout: each call succeeds or its deadline passes, nothing else."""
    for timeout in timeouts:
        try:
            call(timeout)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
