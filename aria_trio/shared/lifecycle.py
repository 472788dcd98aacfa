"""What both daemons do the same way: claim their socket, serve until a signal, drain, stop."""

from __future__ import annotations

import errno
import fcntl
import functools
import grp
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import structlog
import trio

from aria_trio.rpc import Health, Server
from aria_trio.rpc.health import NOT_SERVING
from aria_trio.shared import sdnotify
from aria_trio.shared.config import aria_home

log = structlog.get_logger("aria.lifecycle")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def prepare_socket_dir(path: Path) -> None:
    """Make the socket's folder (0700). An existing folder is only tightened when it is ours:
    ~/.aria, or one we created."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        return
    if folder == aria_home():
        os.chmod(folder, 0o700)
    elif folder.stat().st_mode & 0o077:
        log.warning("socket folder is open to other users; the socket itself is 0600", folder=str(folder))


def socket_access(mode: int, group: str) -> tuple[int, int | None]:
    """The socket folder's mode and group for a socket `mode` and `group`: others can only reach a
    socket they may open when they may also traverse its folder (x, not r)."""
    gid = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"no group {group!r} (--socket-group)") from None
    folder = 0o700 | (0o010 if mode & 0o060 else 0) | (0o001 if mode & 0o006 else 0)
    return folder, gid


def open_socket(path: Path, folder_mode: int, gid: int | None) -> None:
    """Open the socket (already `mode`) and its folder to its group or others, as asked."""
    if gid is not None:
        os.chown(path, -1, gid)
        os.chown(path.parent, -1, gid)
    if folder_mode != 0o700:
        os.chmod(path.parent, folder_mode)
        log.warning("socket open beyond its owner", socket=str(path), mode=oct(path.stat().st_mode & 0o777), gid=gid)


def take_lock(path: Path) -> int:
    """Hold `<socket>.lock` for the daemon's life; a second daemon on the same socket fails here."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(f"another aria runtime (pid {other}) is already serving {path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_not_served(path: Path) -> None:
    """A socket file that answers belongs to a live server (perhaps not ours): never steal it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("replacing a stale socket file", socket=str(path))
            return
        raise StartupError(f"cannot check {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError(f"something is already listening on {path}; stop it or choose another --socket")


def claim(socket_path: Path, data_dir: Path) -> int:
    """Make the socket's folder, take the lock, check nobody serves the socket, make data_dir.
    Returns the lock's descriptor: keep it open while serving."""
    prepare_socket_dir(socket_path)
    lock_fd = take_lock(socket_path)
    try:
        check_not_served(socket_path)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd


async def serve_until_signal(
    server: Server,
    health: Health,
    socket_path: str,
    grace: float,
    *,
    background: Sequence[Callable[..., Awaitable[None]]] = (),
    on_stop: Callable[[float], Awaitable[None]] | None = None,
    socket_mode: int = 0o600,
    socket_group: str = "",
    **log_fields: object,
) -> None:
    """Start `background` services (each with nursery.start), serve on `socket_path`, tell the
    supervisor we are ready; at SIGTERM/SIGINT report NOT_SERVING, drain for `grace` seconds,
    run `on_stop`, then cancel everything. A second signal cuts the drain short."""
    access = await trio.to_thread.run_sync(socket_access, socket_mode, socket_group)  # (a bad group: StartupError)
    # Signals are caught from here on (before READY), so none is lost between the two.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for service in background:
                await nursery.start(service)
            await nursery.start(functools.partial(server.serve, socket_path, mode=socket_mode))
            await trio.to_thread.run_sync(open_socket, Path(socket_path), *access)
            log.info("serving", socket=socket_path, pid=os.getpid(), **log_fields)
            sdnotify.notify(f"READY=1\nSTATUS=serving on {socket_path}\nMAINPID={os.getpid()}")

            signum = await signals.__anext__()
            log.info("shutting down", signal=signal.Signals(signum).name, grace_s=grace)
            sdnotify.notify("STOPPING=1\nSTATUS=shutting down")
            health.set_all(NOT_SERVING)
            with trio.CancelScope() as grace_scope:
                nursery.start_soon(_second_signal, signals, grace_scope)
                await server.shutdown(grace)
                if on_stop is not None:
                    await on_stop(grace)
            nursery.cancel_scope.cancel()
    log.info("stopped")


async def _second_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    await signals.__anext__()
    log.warning("second signal: stopping now, without waiting for calls to finish")
    scope.cancel()
