"""Which runtime uses this Quilt, and what happens without one.

A runtime attaches (System/Attach, a stream it keeps open) for as long as it uses Quilt: the
stream ends when the runtime goes, however it goes (its socket closes with the process, even at
SIGKILL). A Quilt started for a runtime (`QUILT_PARENT_PID` set) keeps its containers and tasks
running while no runtime is attached, so that a runtime can be restarted (an upgrade, a crash)
without killing the work, and the next one adopts this Quilt. Only for the orphan grace
(`--orphan-grace`, 10 minutes by default): then it stops its work and exits, so that nothing
runs unsupervised for ever. Before the first attach it waits at least FIRST_ATTACH seconds,
whatever the grace, for the runtime that started it to connect. Once the runtime that started it
has gone, its log goes to `quilt.log` in its data folder instead of that runtime's stderr.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog
import trio

log = structlog.get_logger("quilt.attach")

FIRST_ATTACH = 60.0  # seconds a new Quilt waits for its runtime, whatever the grace
LOG_KEEP = 16 * 1024 * 1024  # bytes of quilt.log kept when it is opened (the rest is quilt.log.1)


def _log_to_file(path: Path) -> None:
    """From now on, stderr is `path` (appended): the stderr we had is the first runtime's (a pipe,
    a terminal), which may block or break once it is gone, and a Quilt must never stop for its log."""
    if path.exists() and path.stat().st_size > LOG_KEEP:
        path.replace(path.with_name(path.name + ".1"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    log.info("the runtime that started this quilt is gone: logging to a file from now on", file=str(path))
    os.dup2(fd, 2)
    os.close(fd)


class Attachments:
    def __init__(self, managed: bool, grace: float, log_file: Path | None = None) -> None:
        self.managed = managed
        self.grace = grace
        self.log_file = log_file  # where the logs go once the runtime whose stderr we had is gone
        self.count = 0
        self.ever = False  # some runtime has attached since this Quilt started
        self._changed = trio.Event()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @contextmanager
    def attached(self, runtime_pid: int) -> Iterator[None]:
        self.count += 1
        self.ever = True
        log.info("a runtime attached", runtime_pid=runtime_pid, attached=self.count)
        self._changed_now()
        try:
            yield
        finally:
            self.count -= 1
            log.info("a runtime detached", runtime_pid=runtime_pid, attached=self.count)
            self._changed_now()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """For a Quilt started for a runtime: stop (as at SIGTERM) after the grace without one."""
        task_status.started()
        if not self.managed:
            return
        while True:
            while self.count:
                await self._changed.wait()
            if self.ever and self.grace and self.log_file is not None:  # (with no grace: it stops now)
                await trio.to_thread.run_sync(_log_to_file, self.log_file)
                self.log_file = None
            wait = self.grace if self.ever else max(self.grace, FIRST_ATTACH)
            if self.ever and self.grace:
                log.warning("no runtime attached: the work goes on for the orphan grace", grace_s=self.grace)
            with trio.move_on_after(wait):
                while not self.count:
                    await self._changed.wait()
            if not self.count:
                log.warning("no runtime attached within the orphan grace: stopping the work and exiting", grace_s=wait)
                os.kill(os.getpid(), signal.SIGTERM)
                return
