"""One sandboxed process tree: spawn it, capture its output, wait for it, signal or kill it.

`start_process` runs one in a nursery and returns once it exists (or raises if the spawn itself
failed), with a Run: the Handle to signal it (the host pid of the sandbox's pid 1), and its Exit
when the process and its pipes are done. Meanwhile stdout and stderr go to a Sink (an OutputLog, or
a tool run's live lines) as they come. Killing pid 1 of a pid namespace kills everything in it:
that is how a whole tree goes.

Processes are spawned from the event loop's own thread, on purpose. The parent-death signal
(bubblewrap's --die-with-parent, setpriv --pdeathsig) fires when the *thread* that forked the
child exits, not the process: spawned from one of Trio's worker threads (as trio.open_process
does), every sandbox was killed when that thread retired after 10 idle seconds. The loop's thread
lives exactly as long as Quilt, which is the guarantee we want: nothing outlives Quilt. A spawn is
a vfork and an exec of /bin/sh (about 0.25 ms, measured), so it does not hold up the loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from aria_trio.quilt.output import STDERR, STDOUT

MAX_STDIN = 1024 * 1024
CAPTURE_LIMIT = 1024 * 1024  # bytes of each stream kept in memory for Exec's answer


class Sink(Protocol):
    """Where a process's output goes as it comes (bytes as the pipe gives them)."""

    async def feed(self, stream: int, data: bytes | bytearray) -> None: ...


@dataclass
class Captured:
    """The first CAPTURE_LIMIT bytes of each stream (for a synchronous Exec)."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    def add(self, stream: int, data: bytes | bytearray) -> None:
        buf = self.stdout if stream == STDOUT else self.stderr
        room = CAPTURE_LIMIT - len(buf)
        if len(data) > room:
            data = data[: max(room, 0)]
            if stream == STDOUT:
                self.stdout_truncated = True
            else:
                self.stderr_truncated = True
        buf += data


@dataclass
class Exit:
    returncode: int
    exit_code: int | None  # None when a signal ended it
    signal: int | None
    first_error: str  # the first stderr line (for messages of a failed start)
    head: str = ""  # the first 4 KiB of stderr


class Handle:
    """What the supervisor of a running process can do to it."""

    def __init__(self, process: Process, sandbox_pid: int, group: bool) -> None:
        self.process = process
        self.pid = sandbox_pid  # host pid of the sandbox's pid 1 (the command, or its wrapper)
        self.group = group  # no sandbox: signal the process group instead

    def signal(self, sig: int) -> None:
        try:
            if self.group:
                os.killpg(self.process.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.pid != self.process.pid:
            try:
                self.process.kill()  # the outer bubblewrap, in case the sandbox never got going
            except ProcessLookupError:
                pass


class Run:
    """A process started in a nursery by start_process: its handle now, its Exit when it ends."""

    def __init__(self) -> None:
        self.handle: Handle | None = None
        self.exit: Exit | None = None
        self.ended = trio.Event()

    def kill(self) -> None:
        if self.handle is not None:
            self.handle.kill()

    async def result(self) -> Exit:
        await self.ended.wait()
        assert self.exit is not None
        return self.exit


async def start_process(
    nursery: trio.Nursery,
    argv: Sequence[str],
    log: Sink | None,
    *,
    sandboxed: bool,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes = b"",
    captured: Captured | None = None,
    files: Mapping[str, Path] | None = None,
) -> Run:
    """_run_process in `nursery`; returns once the process exists (raises if it could not start).
    `files`: placeholders of the argv ("{seccomp_fd}") for a descriptor of a file of its own."""
    run = Run()

    async def body(task_status: trio.TaskStatus[Handle] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            run.exit = await _run_process(
                argv,
                log,
                sandboxed=sandboxed,
                cwd=cwd,
                env=env,
                stdin=stdin,
                captured=captured,
                files=files or {},
                task_status=task_status,
            )
        finally:
            run.ended.set()

    run.handle = await nursery.start(body)
    return run


async def _run_process(
    argv: Sequence[str],
    log: Sink | None,
    *,
    sandboxed: bool,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes = b"",
    captured: Captured | None = None,
    files: Mapping[str, Path],
    task_status: trio.TaskStatus[Handle] = trio.TASK_STATUS_IGNORED,
) -> Exit:
    info_r = -1
    fds: dict[str, int] = {}
    argv = list(argv)
    stderr_head = bytearray()
    try:
        if sandboxed:
            info_r, fds["{info_fd}"] = os.pipe2(os.O_CLOEXEC)
        for placeholder, path in files.items():
            fds[placeholder] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # (each spawn reads its own)
        argv = [str(fds[a]) if a in fds else a for a in argv]
        process = Process.spawn(
            argv, stdin=bool(stdin), pass_fds=tuple(fds.values()), cwd=cwd, env=env, new_session=not sandboxed
        )
    except BaseException:
        if info_r >= 0:
            os.close(info_r)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    try:
        pid = process.pid
        if sandboxed:
            pid = await _sandbox_pid(info_r) or process.pid
        task_status.started(Handle(process, pid, group=not sandboxed))

        async def pump(stream: trio.abc.ReceiveStream | None, which: int) -> None:
            if stream is None:
                return
            while data := await stream.receive_some(65536):
                if which == STDERR and len(stderr_head) < 4096:
                    stderr_head.extend(data[: 4096 - len(stderr_head)])
                if captured is not None:
                    captured.add(which, data)
                if log is not None:
                    await log.feed(which, data)

        async def feed_stdin() -> None:
            assert process.stdin is not None
            try:
                await process.stdin.send_all(stdin[:MAX_STDIN])
            except (trio.BrokenResourceError, BrokenPipeError):
                pass  # the command did not read it all: fine
            finally:
                await process.stdin.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, process.stdout, STDOUT)
            nursery.start_soon(pump, process.stderr, STDERR)
            if stdin:
                nursery.start_soon(feed_stdin)
            returncode = await process.wait()
    except BaseException:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()  # never leave a process behind us
                await process.wait()
        raise
    finally:
        process.close()
        if info_r >= 0:
            os.close(info_r)
    head = stderr_head.decode("utf-8", "replace").strip()
    lines = head.splitlines()
    return _exit(returncode, lines[0] if lines else "", head)


class Process:
    """A child spawned from the loop's thread (see the module's docstring): its pipes as Trio
    streams, and its end seen through a pidfd, without a thread."""

    def __init__(self, popen: subprocess.Popen[bytes], pipes: dict[str, int]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.stdin = trio.lowlevel.FdStream(pipes["stdin"]) if "stdin" in pipes else None
        self.stdout: trio.lowlevel.FdStream | None = trio.lowlevel.FdStream(pipes["stdout"])
        self.stderr: trio.lowlevel.FdStream | None = trio.lowlevel.FdStream(pipes["stderr"])
        self._pidfd = os.pidfd_open(popen.pid)

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        stdin: bool,
        pass_fds: tuple[int, ...],
        cwd: str | None,
        env: Mapping[str, str] | None,
        new_session: bool,
    ) -> Process:
        ours: dict[str, int] = {}
        theirs: list[int] = []
        try:
            child_in: int = subprocess.DEVNULL
            if stdin:
                child_in, ours["stdin"] = os.pipe2(os.O_CLOEXEC)
                theirs.append(child_in)
            ours["stdout"], child_out = os.pipe2(os.O_CLOEXEC)
            theirs.append(child_out)
            ours["stderr"], child_err = os.pipe2(os.O_CLOEXEC)
            theirs.append(child_err)
            popen = subprocess.Popen(  # in the loop's thread, on purpose: see the module docstring
                list(argv),
                stdin=child_in,
                stdout=child_out,
                stderr=child_err,
                pass_fds=pass_fds,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=new_session,
            )
        except BaseException:
            for fd in ours.values():
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return cls(popen, ours)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """The exit status (negative: the signal), once the child has ended; it is reaped here."""
        while self.popen.poll() is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # pidfd kept open: the pid cannot be reused yet
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1


def _exit(returncode: int, first_error: str, head: str = "") -> Exit:
    if returncode < 0:  # killed by a signal, no sandbox in between
        return Exit(128 - returncode, None, -returncode, first_error, head)
    if 128 < returncode <= 128 + 64:  # the shell convention, which bubblewrap follows
        return Exit(returncode, None, returncode - 128, first_error, head)
    return Exit(returncode, returncode, None, first_error, head)


async def _sandbox_pid(fd: int) -> int | None:
    """bubblewrap writes {"child-pid": N, ...} on --info-fd once the sandbox exists."""
    stream = trio.lowlevel.FdStream(os.dup(fd))
    data = b""
    try:
        with trio.move_on_after(10):
            while chunk := await stream.receive_some(4096):
                data += chunk
                try:
                    return int(json.loads(data)["child-pid"])
                except (ValueError, KeyError):
                    continue
    finally:
        await stream.aclose()
    return None
