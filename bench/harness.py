"""What the benchmarks share: server processes (start, readiness, CPU time, stop) and load-generating clients.

Every server and every client runs in a process of its own, so that none shares a GIL with another;
this process only starts them, reads the servers' CPU time from /proc and collects the clients' numbers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
CLIENT_EXIT_TIMEOUT_S = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not be run (a server did not start or stop cleanly, a call failed)."""


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, to put in an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def child_env() -> dict[str, str]:
    """This environment without ARIA_*/QUILT_* variables: children get their settings from their command line."""
    return {key: value for key, value in os.environ.items() if not key.startswith(("ARIA_", "QUILT_"))}


def _accepts(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class ServerProcess:
    """A server serving on a Unix socket; as a context manager, killed on the way out if still running."""

    def __init__(self, name: str, argv: list[str], socket_path: Path, log_path: Path) -> None:
        self.name = name
        self.socket_path = socket_path
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env()
            )

    @classmethod
    def start(cls, name: str, argv: list[str], socket_path: Path, log_path: Path) -> Self:
        """Start the server and wait until its socket accepts connections."""
        server = cls(name, argv, socket_path, log_path)
        try:
            server._wait_ready()
        except BaseException:
            server.kill()
            raise
        return server

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (self.socket_path.exists() and _accepts(self.socket_path)):
            code = self.proc.poll()
            if code is not None:
                raise BenchError(
                    f"{self.name} exited with code {code} before serving; its log ends with:\n{self._log()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} does not accept connections on {self.socket_path} after {READY_TIMEOUT_S:.0f} s; "
                    f"its log ends with:\n{self._log()}"
                )
            time.sleep(0.05)

    def _log(self) -> str:
        return tail(self.log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (all its threads), from /proc/PID/stat."""
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        fields = stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5); fields[0] is field 3
        return (utime + stime) / _CLOCK_TICKS

    def stop(self) -> None:
        """SIGTERM, then wait for the process; anything but a clean exit 0 is an error."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(
                f"{self.name} did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM; its log ends with:\n{self._log()}"
            ) from None
        if code != 0:
            raise BenchError(f"{self.name} exited with code {code} at SIGTERM; its log ends with:\n{self._log()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def start_aria(socket_path: Path, data_dir: Path, workdir: Path, *extra: str) -> ServerProcess:
    """`aria serve` with logs at info as JSON lines to workdir/aria.log, and no settings but its flags
    (and `extra` ones, e.g. --quilt-socket)."""
    aria = Path(sys.executable).with_name("aria")
    if not aria.exists():
        raise BenchError(f"no aria command next to {sys.executable}; install the project in this virtualenv (./dev)")
    argv = [
        str(aria),
        "serve",
        "--config",
        str(workdir / "no-config.toml"),  # absent: the defaults, whatever ~/.aria/config.toml says
        "--socket",
        str(socket_path),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "info",
        "--log-format",
        "json",
        "--quilt-orphan-grace",  # its Quilt goes with it (else it would outlive the benchmark)
        "0",
        *extra,
    ]
    return ServerProcess.start("aria", argv, socket_path, workdir / "aria.log")


def start_model(script: Path, tmp: Path, what: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    """A scripted model server (`python SCRIPT ARGS...`, which prints `ready PORT`): the process and
    its port; its stderr goes to tmp/model.err."""
    with open(tmp / "model.err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=child_env(),
            text=True,
        )
    assert proc.stdout is not None
    ready = proc.stdout.readline().split()
    if len(ready) != 2 or ready[0] != "ready":
        kill(proc)
        raise BenchError(f"the {what} did not start: {(tmp / 'model.err').read_text()[-2000:]}")
    return proc, int(ready[1])


def kill(proc: subprocess.Popen[str]) -> None:
    """Kill a helper process and reap it (for an ExitStack's callback)."""
    proc.kill()
    proc.wait()


def run_script(argv: list[str], what: str, err_path: Path) -> str:
    """Run a helper script to its end; its stdout, or BenchError with its stderr if it fails."""
    with open(err_path, "wb") as err:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=child_env())
    if done.returncode != 0:
        raise BenchError(f"{what} failed (exit {done.returncode}):\n{tail(err_path)}")
    return done.stdout.decode()


def run_load(argv: list[str], server: ServerProcess, what: str, err_path: Path) -> dict[str, Any]:
    """Run a load-generating client against server; its result with the server's CPU time during the load.

    The client warms up, prints `ready` and waits for `go` on stdin, calls for a while, then prints
    its result as one JSON line and exits 0. The server's CPU time is read at `go` and once that line
    is in, so the warm-up is not counted.
    """
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=child_env(), text=True
        )
    assert proc.stdin is not None and proc.stdout is not None  # both are pipes
    try:
        ready = proc.stdout.readline()
        if ready.strip() != "ready":
            raise _client_error(proc, what, err_path)
        cpu_before = server.cpu_seconds()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        cpu = server.cpu_seconds() - cpu_before
        if not line or _exit_code(proc) != 0:
            raise _client_error(proc, what, err_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    result: dict[str, Any] = json.loads(line)
    result["server_cpu_s"] = cpu
    return result


def _exit_code(proc: subprocess.Popen[str]) -> int | None:
    """The client's exit code, once it has exited (None if it does not within CLIENT_EXIT_TIMEOUT_S)."""
    try:
        return proc.wait(timeout=CLIENT_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None


def _client_error(proc: subprocess.Popen[str], what: str, err_path: Path) -> BenchError:
    code = _exit_code(proc)
    status = "still running" if code is None else f"exit {code}"
    return BenchError(f"{what} failed ({status}):\n{tail(err_path)}")


def start_quilt(socket_path: Path, data_dir: Path, workdir: Path, *extra: str) -> ServerProcess:
    """`aria quilt serve` with logs at info as JSON lines to workdir/quilt.log, and no settings but its flags."""
    aria = Path(sys.executable).with_name("aria")
    argv = [
        str(aria),
        "quilt",
        "serve",
        "--config",
        str(workdir / "no-config.toml"),
        "--socket",
        str(socket_path),
        "--data-dir",
        str(data_dir),
        "--log-format",
        "json",
        *extra,
    ]
    return ServerProcess.start("quilt", argv, socket_path, workdir / f"quilt-{time.monotonic_ns()}.log")


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmHWM for pid {pid}")


class Client:
    """A client process that prints `ready` once set up, then its result as one JSON line and exits 0.

    For clients that run side by side (several processes of subscribers, say): start them all, wait
    until each is ready, make them work, then collect each result. Killed on the way out if still running.
    """

    def __init__(self, argv: list[str], what: str, err_path: Path) -> None:
        self.what = what
        self.err_path = err_path
        with open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=child_env(), text=True
            )

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise _client_error(self.proc, self.what, self.err_path)

    def result(self, timeout: float) -> dict[str, Any]:
        """The client's JSON line, once it has exited 0 (BenchError if not within `timeout` seconds)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.what} did not finish within {timeout:.0f} s:\n{tail(self.err_path)}") from None
        if self.proc.returncode != 0 or not out.strip():
            raise BenchError(f"{self.what} failed (exit {self.proc.returncode}):\n{tail(self.err_path)}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rpc_durations(log_path: Path, method: str) -> dict[str, float]:
    """Time at the server of each call to `method` (a path, /pkg.Service/Method), by request id, in ms:
    from the `rpc` lines the server logs (log format json) when a call ends."""
    durations = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == "rpc" and entry.get("method") == method:
            durations[entry["request_id"]] = float(entry["duration_ms"])
    return durations
