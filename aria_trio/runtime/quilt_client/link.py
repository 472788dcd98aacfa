"""The runtime's link to Quilt: one connection, kept up; and, by default, Quilt itself as a child.

By default the runtime runs `aria quilt serve` as a supervised child process (restarted with
backoff when it dies); with `--quilt-socket` it uses a Quilt that is already running. Either way
one HTTP/2 connection multiplexes the calls (no lock around calls); while it is down, calls fail
at once with UNAVAILABLE and the services that need Quilt report NOT_SERVING.

Quilt lets one connection carry a bounded number of calls at once (its stream cap), and long
calls (a watcher per running task and container, follows, uploads) hold theirs for minutes. So a
call never fails for being one too many: when every connection is full, the link opens another,
up to MAX_CONNECTIONS; past that, the call waits for a free stream under its own deadline (the
channel's bounded queue).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog
import trio

from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.rpc import Channel, Health, RpcError, StatusCode
from aria_trio.rpc.health import NOT_SERVING, SERVING
from aria_trio.runtime.quilt_client.calls import QuiltCalls
from aria_trio.shared import errors
from aria_trio.shared.lifecycle import StartupError
from aria_trio.shared.quilt_api import SYSTEM
from aria_trio.shared.sqlite import now_us

log = structlog.get_logger("aria.quilt_link")

BACKOFF_FIRST, BACKOFF_MAX = 0.25, 30.0
HEALTHY_S = 2.0  # a link up this long was a Quilt that served: its end is no crash loop
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0
MAX_CONNECTIONS = 8  # to Quilt, each with Quilt's stream cap (1024): 8,192 calls at once, then a queue


def quilt_command(
    socket: Path,
    data_dir: Path,
    sandbox: str,
    log_level: str,
    log_format: str,
    *,
    images_dir: Path | None = None,
    hide: Sequence[Path] = (),
    orphan_grace: float = 600.0,
) -> list[str]:
    """`aria quilt serve` as the runtime's child: its socket and data under the runtime's data
    folder, the operator's images, and the runtime's own paths hidden from every sandbox."""
    extra = ["--orphan-grace", f"{orphan_grace:g}"]
    if images_dir is not None:
        extra += ["--images-dir", str(images_dir)]
    if hide:
        extra += ["--hide", ":".join(str(p) for p in hide)]
    return [
        sys.executable,
        "-m",
        "aria_trio",
        "quilt",
        "serve",
        "--socket",
        str(socket),
        "--data-dir",
        str(data_dir),
        "--sandbox",
        sandbox,
        "--log-level",
        log_level,
        "--log-format",
        "json" if log_format == "auto" and not sys.stderr.isatty() else log_format,
        *extra,
    ]


class WrongQuilt(Exception):
    """The Quilt on our socket belongs to another data folder: never used (nor replaced)."""


class QuiltLink(QuiltCalls):
    """Quilt kept up and connected, and its calls (calls.py) on the connections it holds."""

    def __init__(
        self,
        socket: Path,
        *,
        spawn: Sequence[str] | None,
        health: Health,
        services: Sequence[str],
        data_dir: Path | None = None,
    ) -> None:
        self.socket = socket
        self.spawn = list(spawn) if spawn else None
        self.data_dir = data_dir.resolve() if data_dir is not None else None  # the Quilt we expect
        self.refused: str | None = None  # why the Quilt on the socket is not ours
        self.health = health
        self.services = list(services)
        self._channel: Channel | None = None  # the first connection: the link is up while it is
        self._extra: list[Channel] = []  # more, opened while every connection is full
        self._extras: trio.Nursery | None = None
        self._opening = trio.Lock()
        self.up = trio.Event()
        self.restarts = 0
        self._connections = 0  # connections made so far
        self.connected_at_us = 0  # when the current one came up (wall clock, as Quilt's records)
        self._up_since = 0.0  # the same, on trio's clock
        self._changed = trio.Event()  # set (and replaced) whenever the link comes up or goes down

    def _report(self, up: bool) -> None:
        for name in self.services:
            self.health.set(name, SERVING if up else NOT_SERVING)

    # -- keeping it up ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link (and the child) up until cancelled; started once first connected (or,
        after READY_TIMEOUT, regardless: calls then fail with UNAVAILABLE until it is up)."""
        self._report(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_up)
            with trio.move_on_after(READY_TIMEOUT):
                while not self.up.is_set() and self.refused is None:
                    await self._changed.wait()
            if self.refused is not None:
                raise StartupError(self.refused)
            if not self.up.is_set():
                log.error(
                    "quilt is not up yet; calls that need it answer UNAVAILABLE until it is", socket=str(self.socket)
                )
            task_status.started()

    async def _keep_up(self) -> None:
        """The backoff grows only while Quilt fails to come up (or falls at once): one that served
        a while and then died (a crash, a kill) is started again at once, so that the work it ran
        is recorded lost, and its persistent containers can start again, within seconds."""
        backoff = BACKOFF_FIRST
        while True:
            seen = self._connections
            if self.spawn is None:
                await self._connect_and_hold()
            elif not await self._connect_and_hold(adopting=True):  # one kept running for us? adopt it
                await self._run_child()
            served = self._connections > seen and trio.current_time() - self._up_since >= HEALTHY_S
            if served:
                backoff = BACKOFF_FIRST
            log.warning("quilt link down; retrying", socket=str(self.socket), retry_in_s=backoff)
            await trio.sleep(backoff)
            if not served:
                backoff = min(backoff * 2, BACKOFF_MAX)
            self.restarts += 1

    async def _run_child(self) -> None:
        """Start quilt, wait for its READY=1 (the systemd protocol, on a socket of our own), hold
        the connection while both live. The child is in a session of its own and outlives us: a
        runtime that stops (or is killed) leaves it, and its work, for the next one to adopt; it
        stops by itself after its orphan grace. A child whose connection is gone while we live
        is given STOP_GRACE to exit, then killed, and started again."""
        assert self.spawn is not None
        ready = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = f"\0aria-quilt-ready-{os.getpid()}-{secrets.token_hex(4)}"
        await ready.bind(address)
        try:
            env = {**os.environ, "NOTIFY_SOCKET": "@" + address[1:], "QUILT_PARENT_PID": str(os.getpid())}
            process = await trio.lowlevel.open_process(self.spawn, env=env, start_new_session=True)
            log.info("quilt started", pid=process.pid, socket=str(self.socket))
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await process.wait()
                    log.warning("quilt exited", code=process.returncode)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                with trio.move_on_after(READY_TIMEOUT):
                    while b"READY=1" not in (await ready.recv(4096)).split(b"\n"):
                        pass
                await self._connect_and_hold()
                nursery.cancel_scope.cancel()
            # (only while we live: a cancellation from outside, our own stop, leaves the child be)
            if process.returncode is None:
                with trio.move_on_after(STOP_GRACE):
                    await process.wait()
                if process.returncode is None:
                    log.warning("quilt lost its connection but not its life: killing it", pid=process.pid)
                    process.kill()
                    await process.wait()
        finally:
            ready.close()

    async def _connect_and_hold(self, *, adopting: bool = False) -> bool:
        """Connect, attach (System/Attach, held open: Quilt knows a runtime uses it), and hold the
        connection until it or the attachment goes. False only when adopting and nothing answered."""
        try:
            async with Channel.connect(str(self.socket)) as channel, trio.open_nursery() as extras:
                async with channel.call(SYSTEM + "Attach", q.Attached) as attach:
                    await attach.send(q.AttachRequest(runtime_pid=os.getpid()), end=True)
                    try:
                        whose = await attach.receive()
                    except RpcError as exc:
                        if exc.code is not StatusCode.UNIMPLEMENTED or self.data_dir is not None:
                            raise
                        whose = q.Attached()  # an external Quilt that knows no attachment: used as is
                    if whose is None:
                        raise RpcError(StatusCode.UNAVAILABLE, "quilt ended the attachment at once")
                    if self.data_dir is not None and Path(whose.data_dir) != self.data_dir:
                        raise WrongQuilt(
                            f"the quilt serving {self.socket} (pid {whose.pid}) keeps its data in {whose.data_dir}, "
                            f"not in {self.data_dir}: it belongs to another runtime; stop it or choose another "
                            "--data-dir"
                        )
                    self.connected_at_us, self._up_since = now_us(), trio.current_time()
                    self._channel, self._extras = channel, extras
                    self._connections += 1
                    self.refused = None
                    self._changed_now()
                    self.up.set()
                    self._report(True)
                    if adopting:
                        log.info(
                            "adopted the quilt already running, with its work", pid=whose.pid, socket=str(self.socket)
                        )
                    else:
                        log.info("quilt link up", socket=str(self.socket), pid=whose.pid)
                    async with trio.open_nursery() as held:
                        held.start_soon(_cancel_when, channel.closed.wait, held.cancel_scope)
                        if whose.pid:  # (attached: its end is the end of the link too)
                            held.start_soon(_cancel_when, attach.receive, held.cancel_scope)
                extras.cancel_scope.cancel()  # the others go with the first
        except WrongQuilt as exc:
            log.error("refusing the quilt on our socket", reason=str(exc))
            self.refused = str(exc)
        except RpcError as exc:
            if adopting and exc.code is StatusCode.UNAVAILABLE and not self._channel:
                return False  # nothing there (or a stale socket): start our own
            log.warning("cannot reach quilt", socket=str(self.socket), error=exc.message)
        finally:
            self._channel, self._extras = None, None
            self._changed_now()
            if self.up.is_set():
                self.up = trio.Event()
                self._report(False)
        return True

    def connected(self) -> bool:
        return self._channel is not None and not self._channel.closed.is_set()

    async def reconnected(self) -> None:
        """Wait for the next connection after the current one."""
        seen = self._connections
        while self._connections == seen or not self.connected():
            await self._changed.wait()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- connections for the calls ----------------------------------------------------------------

    def channel(self) -> Channel:
        """The first connection (UNAVAILABLE while there is none): for a check that Quilt is up."""
        if self._channel is None:
            raise errors.Unavailable("the container service (quilt) is not available right now; try again shortly")
        return self._channel

    async def _pick(self) -> Channel:
        """The connection with the most free streams; a new one if all are full (up to
        MAX_CONNECTIONS; then the fullest waits in its channel's queue)."""
        first = self.channel()
        await first.ready()  # (its stream cap is known from then on)
        channels = [c for c in (first, *self._extra) if c.usable]
        best = max(channels, key=Channel.free_streams, default=first)
        if best.free_streams() > 0 or len(channels) >= MAX_CONNECTIONS or self._extras is None:
            return best
        async with self._opening:  # one new connection at a time; others then find its streams
            best = max((c for c in (first, *self._extra) if c.usable), key=Channel.free_streams, default=first)
            if best.free_streams() > 0 or self._extras is None:
                return best
            try:
                return await self._extras.start(self._hold_extra)  # type: ignore[no-any-return]
            except RpcError as exc:
                log.warning("cannot open another connection to quilt", error=exc.message)
                return best  # (its queue)

    async def _hold_extra(self, *, task_status: trio.TaskStatus[Channel] = trio.TASK_STATUS_IGNORED) -> None:
        async with Channel.connect(str(self.socket)) as channel:
            self._extra.append(channel)
            log.info("another connection to quilt", connections=1 + len(self._extra))
            try:
                task_status.started(channel)
                await channel.closed.wait()
            finally:
                self._extra.remove(channel)


async def _cancel_when(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    """Cancel `scope` once `wait()` returns or fails (the connection closed, the attachment ended)."""
    try:
        await wait()
    except RpcError:
        pass
    scope.cancel()
