"""Containers and tasks: their lifecycle, told truthfully, and their processes supervised.

Every process runs in a supervisor task in the engine's nursery. A container's supervisor records
RUNNING once its sandbox exists and EXITED/STOPPED/FAILED when its main process ends; a task's does
the same for PENDING/RUNNING/COMPLETED/FAILED/CANCELLED/TIMEOUT, with a watchdog for its timeout.
Every state change is written to quilt's SQLite before anyone is told, so a restart finds the
truth: what was running then is FAILED "quilt restarted" (the sandboxes die with quilt, by
--die-with-parent, and their cgroups are emptied).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.quilt import store as table
from aria_trio.quilt.disks import MIN_DISK_BYTES, MOUNT, Disks
from aria_trio.quilt.images import Images
from aria_trio.quilt.limits import Cgroup
from aria_trio.quilt.output import OutputLog
from aria_trio.quilt.process import Captured, Exit, Handle, start_process
from aria_trio.quilt.sandbox import Image, Sandbox, base_env
from aria_trio.shared import errors
from aria_trio.shared.sqlite import Store, background

log = structlog.get_logger("quilt.engine")

# quilt.v1.ContainerState and TaskState: the numbers Quilt's store keeps and its API sends
CREATED, RUNNING, EXITED, FAILED, STOPPED = (
    q.CONTAINER_CREATED,
    q.CONTAINER_RUNNING,
    q.CONTAINER_EXITED,
    q.CONTAINER_FAILED,
    q.CONTAINER_STOPPED,
)
CONTAINER_STATES: dict[int, str] = {
    CREATED: "created",
    RUNNING: "running",
    EXITED: "exited",
    FAILED: "failed",
    STOPPED: "stopped",
}
T_PENDING, T_RUNNING, T_COMPLETED, T_FAILED, T_CANCELLED, T_TIMEOUT = (
    q.TASK_PENDING,
    q.TASK_RUNNING,
    q.TASK_COMPLETED,
    q.TASK_FAILED,
    q.TASK_CANCELLED,
    q.TASK_TIMEOUT,
)
TASK_STATES: dict[int, str] = {
    T_PENDING: "pending",
    T_RUNNING: "running",
    T_COMPLETED: "completed",
    T_FAILED: "failed",
    T_CANCELLED: "cancelled",
    T_TIMEOUT: "timeout",
}
TASK_FINISHED = {T_COMPLETED, T_FAILED, T_CANCELLED, T_TIMEOUT}

# The main process of a container started without a command: idles until stopped, and (unlike
# `sleep`) ends at SIGTERM, which pid 1 of a namespace otherwise ignores, with the status of a
# process SIGTERM ended (143): a stop just after the start, whose SIGTERM was held until the shell
# set its trap, is still told from an end of its own.
IDLE = ["/bin/sh", "-c", "trap 'exit 143' TERM INT; while :; do sleep 3600 & wait $!; done"]
HANDLER_WAIT = 1.0  # seconds a new pid 1 gets to install its SIGTERM handler before it counts as deaf


def handles_signal(pid: int, sig: int) -> bool | None:
    """Does the process handle `sig` (so pid 1 of a namespace can be asked to stop with it)?
    From /proc/<pid>/status SigCgt; None when it is gone (or a zombie: it ended by itself)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                    return None
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # a name that can be one; else the id
MAX_NAME = 256  # bytes of a container's name
MAX_ARG = 128 * 1024 - 1  # bytes of one argument or environment entry (the kernel's MAX_ARG_STRLEN, less its NUL)
MAX_ARGS_TOTAL = 1024 * 1024  # all of them together (the kernel allows about 2 MiB; the sandbox's own take the rest)


def check_strings(command: list[str], env: dict[str, str], workdir: str) -> None:
    """What the kernel would refuse at exec (a NUL; an argument, variable or all of them too
    long), refused here as INVALID_ARGUMENT naming the field, instead of a failed start."""
    total = 0
    for name, values in (("command", command), ("env", [f"{k}={v}" for k, v in env.items()]), ("workdir", [workdir])):
        for value in values:
            size = len(value.encode("utf-8", "surrogateescape"))
            if "\0" in value:
                raise errors.InvalidArgument(f"{name} must not contain NUL characters", fields={name: "NUL"})
            if size > MAX_ARG:
                raise errors.InvalidArgument(
                    f"an entry of {name} is longer than {MAX_ARG} bytes", fields={name: "too long"}
                )
            total += size + 1
    if any(not key or "=" in key for key in env):
        raise errors.InvalidArgument("environment names must be non-empty, without '='", fields={"env": "bad name"})
    if total > MAX_ARGS_TOTAL:
        raise errors.InvalidArgument(
            f"the command, environment and workdir together are longer than {MAX_ARGS_TOTAL} bytes",
            fields={"command": "too long"},
        )


def now_us() -> int:
    return time.time_ns() // 1000


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(6)


GiB = 1024 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    max_output_bytes: int = 64 * 1024 * 1024
    default_memory_bytes: int = 512 * 1024 * 1024
    default_pids: int = 256
    default_cpus: float = 1.0
    default_disk_bytes: int = GiB
    # The operator's maxima: a container may ask for up to these (more is INVALID_ARGUMENT).
    max_memory_bytes: int = 8 * GiB
    max_pids: int = 4096
    max_cpus: float = 64.0
    max_disk_bytes: int = 64 * GiB
    exec_timeout: float = 3600.0  # an exec's timeout when it asks for none (0): never "no limit"
    max_exec_timeout: float = 7 * 24 * 3600.0
    stop_grace: float = 10.0


@dataclass
class Spec:
    name: str = ""
    image: str = "host"
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/workspace"
    network: bool = False
    memory_bytes: int = 0
    pids: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    cpus: float = 0.0
    disk_bytes: int = 0


@dataclass
class Container:
    id: str
    spec: Spec
    state: int = CREATED
    created_at: int = field(default_factory=now_us)
    started_at: int | None = None
    finished_at: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    message: str = ""
    pid: int = 0
    # while quilt runs it:
    handle: Handle | None = None
    log: OutputLog | None = None
    cgroup: Cgroup | None = None
    stop_requested: bool = False
    stop_reached: bool = False  # a SIGTERM it handles, or a kill, was sent: its end is the stop's
    killed_after_grace: bool = False
    killed_deaf: bool = False  # killed at once: its pid 1 had no SIGTERM handler
    done: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)

    def row(self) -> table.ContainerRow:
        spec = self.spec.__dict__
        return {
            "id": self.id,
            "spec_json": table.dumps(spec),
            "state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "message": self.message,
            "pid": self.pid,
        }

    @classmethod
    def from_row(cls, row: table.ContainerRow) -> Container:
        c = cls(row["id"], Spec(**json.loads(row["spec_json"])))
        c.state, c.created_at, c.started_at = row["state"], row["created_at"], row["started_at"]
        c.finished_at, c.exit_code, c.signal = row["finished_at"], row["exit_code"], row["signal"]
        c.message, c.pid = row["message"], row["pid"]
        if c.state not in (CREATED, RUNNING):
            c.done.set()  # (ended under an earlier quilt: nothing of it is left to clean)
        return c


@dataclass
class Task:
    id: str
    container_id: str
    command: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    state: int = T_PENDING
    created_at: int = field(default_factory=now_us)
    started_at: int | None = None
    finished_at: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    message: str = ""
    timeout_seconds: float = 0.0
    pid: int = 0
    output_lines: int = 0
    output_truncated: bool = False
    # while quilt runs it:
    handle: Handle | None = None
    log: OutputLog | None = None
    cancel_requested: str = ""  # why, when it was asked to stop
    timed_out: bool = False
    done: trio.Event = field(default_factory=trio.Event)

    def row(self) -> table.TaskRow:
        return {
            "id": self.id,
            "container_id": self.container_id,
            "command_json": table.dumps(self.command),
            "labels_json": table.dumps(self.labels),
            "state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "message": self.message,
            "timeout_seconds": self.timeout_seconds,
            "pid": self.pid,
            "output_lines": self.output_lines,
            "output_truncated": int(self.output_truncated),
        }

    @classmethod
    def from_row(cls, row: table.TaskRow) -> Task:
        t = cls(row["id"], row["container_id"], json.loads(row["command_json"]), json.loads(row["labels_json"]))
        t.state, t.created_at, t.started_at = row["state"], row["created_at"], row["started_at"]
        t.finished_at, t.exit_code, t.signal = row["finished_at"], row["exit_code"], row["signal"]
        t.message = row["message"]
        t.timeout_seconds, t.pid, t.output_lines = row["timeout_seconds"], row["pid"], row["output_lines"]
        t.output_truncated = bool(row["output_truncated"])
        t.done.set()  # from the database: a finished task
        return t


@dataclass
class ExecSpec:
    container_id: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    timeout_seconds: float = 0.0
    stdin: bytes = b""
    labels: dict[str, str] = field(default_factory=dict)


class Engine:
    def __init__(
        self, store: Store, sandbox: Sandbox, images: Images, settings: Settings, disks: Disks | None = None
    ) -> None:
        self.store = store
        self.sandbox = sandbox
        self.images = images
        self.settings = settings
        self.disks = disks or Disks(False, "not asked for")
        self.containers: dict[str, Container] = {}
        self.tasks: dict[str, Task] = {}  # the running ones; finished tasks live in the database
        self._nursery: trio.Nursery | None = None

    # -- life of the engine -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover from the last run, then supervise processes until cancelled."""
        await self._recover()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _recover(self) -> None:
        for removed in await self.images.clean():
            log.info("removed what a crash left in the image cache", path=str(removed))
        old_scratch = self.settings.data_dir / "tools"  # (tool runs had host folders before tmpfs)
        if await trio.to_thread.run_sync(old_scratch.is_dir):
            await trio.to_thread.run_sync(lambda: shutil.rmtree(old_scratch, ignore_errors=True))
            log.info("removed the tool runs' old scratch folders", path=str(old_scratch))
        starting = await self.store.run(table.rows, table.CONTAINERS, "state = ?", [CREATED])
        lost, lost_tasks = await self.store.run(table.mark_lost, now_us())
        # Their sandboxes died with quilt; make sure nothing is left in their cgroups. CREATED ones
        # too: one whose start the crash cut may have a sandbox that was spawned in the instant
        # before bubblewrap's --die-with-parent took hold (it joins the cgroup first thing).
        for row in [*lost, *starting]:
            cgroup = Cgroup(self.sandbox.limits, row["id"])
            if await trio.to_thread.run_sync(cgroup.pids):
                log.warning("killed the processes a crash left in a container's cgroup", container=row["id"])
            await trio.to_thread.run_sync(cgroup.kill_all)
            await trio.to_thread.run_sync(cgroup.remove)
        for row in await self.store.run(table.rows, table.CONTAINERS):
            self.containers[row["id"]] = Container.from_row(row)
        if lost or lost_tasks:
            log.warning("quilt restarted: marked lost work as failed", containers=len(lost), tasks=lost_tasks)
        tasks = await self.store.run(table.ids, table.TASKS)
        for stray in await trio.to_thread.run_sync(self._strays, tasks):  # a crash in the middle of a create
            await trio.to_thread.run_sync(self._remove_dir, stray)
            log.info("removed the folder of a container a crash left half-made", path=str(stray))
        # run_command's throw-away containers, whose runtime's call ended with that runtime
        for c in [c for c in self.containers.values() if c.spec.labels.get("aria.tool") == "run_command"]:
            await self.remove(c.id, force=True)
            log.info("removed a throw-away container a crash left", container=c.id)

    async def shutdown(self, grace: float) -> None:
        """Stop every running container (and so its tasks); record why."""
        self.store.stopping = True  # a write waiting for disk space must not hold the stop
        async with trio.open_nursery() as nursery:
            for c in list(self.containers.values()):
                if c.state == RUNNING:
                    nursery.start_soon(self._stop, c, grace, "quilt shut down")

    # -- containers -------------------------------------------------------------------------------

    def container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise errors.NotFound(f"no container {cid!r}", reason="CONTAINER_NOT_FOUND")
        return c

    async def create(self, spec: Spec) -> Container:
        image = await self.images.resolve(spec.image)
        if spec.command:
            await trio.to_thread.run_sync(self._check_command, spec.command, image, "command")
        self._check_limits(spec)
        check_strings(spec.command, spec.env, spec.workdir)
        if len(spec.name.encode()) > MAX_NAME or "\0" in spec.name:
            raise errors.InvalidArgument(f"name must be at most {MAX_NAME} bytes, without NUL", fields={"name": "bad"})
        if not spec.workdir.startswith("/"):
            raise errors.InvalidArgument("workdir must be an absolute path", fields={"workdir": "not absolute"})
        c = Container(new_id("c-"), spec)
        try:
            await trio.to_thread.run_sync(self._make_dirs, c.id, self._limits(spec).disk_bytes)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: shutil.rmtree(self._dir(c.id), ignore_errors=True))
            raise
        with trio.CancelScope(shield=True):  # stored and known together, or a caller gone in between left a stray
            await self.store.run(table.upsert, table.CONTAINERS, c.row())
            self.containers[c.id] = c
        log.info("container created", container=c.id, image=image.name, command=spec.command or "(idle)")
        return c

    def _check_limits(self, spec: Spec) -> None:
        """Each limit 0 (the default) or within the operator's maximum."""
        st = self.settings
        for name, value, most in (
            ("memory_bytes", spec.memory_bytes, st.max_memory_bytes),
            ("pids", spec.pids, st.max_pids),
            ("cpus", spec.cpus, st.max_cpus),
            ("disk_bytes", spec.disk_bytes, st.max_disk_bytes),
        ):
            if not (value == value and 0 <= value <= most):  # (NaN is not a limit either)
                shown = _bytes(int(most)) if name.endswith("_bytes") else f"{most:g}"
                raise errors.InvalidArgument(
                    f"limits.{name} must be between 0 (the default) and {shown}, the operator's maximum",
                    fields={f"limits.{name}": "out of range"},
                )
        if 0 < spec.memory_bytes < 4 * 1024 * 1024:
            raise errors.InvalidArgument(
                "limits.memory_bytes must be at least 4 MiB", fields={"limits.memory_bytes": "too small"}
            )
        if 0 < spec.disk_bytes < MIN_DISK_BYTES:
            raise errors.InvalidArgument(
                f"limits.disk_bytes must be at least {MIN_DISK_BYTES} bytes", fields={"limits.disk_bytes": "too small"}
            )
        if 0 < spec.cpus < 0.01:
            raise errors.InvalidArgument("limits.cpus must be at least 0.01", fields={"limits.cpus": "too small"})

    def _limits(self, spec: Spec) -> Spec:
        """The spec's limits with the defaults filled in."""
        st = self.settings
        return dataclasses.replace(
            spec,
            memory_bytes=spec.memory_bytes or st.default_memory_bytes,
            pids=spec.pids or st.default_pids,
            cpus=spec.cpus or st.default_cpus,
            disk_bytes=spec.disk_bytes or st.default_disk_bytes,
        )

    def _check_command(self, command: list[str], image: Image, field_name: str) -> None:
        if not command or not command[0]:
            raise errors.InvalidArgument(f"{field_name} must not be empty", fields={field_name: "empty"})
        if self.sandbox.kind == "bubblewrap" and not image.find(command[0]):
            raise errors.InvalidArgument(
                f"{command[0]!r} is not an executable in image {image.name}",
                reason="COMMAND_NOT_FOUND",
                fields={field_name: "not found in the image"},
            )

    def _strays(self, tasks: set[str]) -> list[Path]:
        """Container folders and task logs with no record (a worker thread's job): what a crash in
        the middle of a create or a remove left."""
        folders = self.settings.data_dir / "containers"
        logs = self.settings.data_dir / "tasks"
        found = [p for p in (folders.iterdir() if folders.is_dir() else ()) if p.name not in self.containers]
        found += [p for p in (logs.glob("*.jsonl") if logs.is_dir() else ()) if p.stem not in tasks]
        return sorted(found)

    @staticmethod
    def _remove_dir(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def _dir(self, cid: str) -> Path:
        return self.settings.data_dir / "containers" / cid

    def _make_dirs(self, cid: str, disk_bytes: int) -> None:
        """The container's folder (0711: the sandbox user may pass, not look), and in it either
        its disk (an image of `disk_bytes`) or, where disks cannot be, plain folders."""
        folder = self._dir(cid)
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder.parent, 0o711)
        os.chmod(folder, 0o711)
        uid, gid = self.sandbox.user or (os.getuid(), os.getgid())
        if self.disks.enabled:
            self.disks.make(folder, disk_bytes, uid, gid)
            return
        for sub, mode in (("workspace", 0o755), ("tmp", 0o1777)):
            (folder / sub).mkdir(exist_ok=True)
            os.chown(folder / sub, uid, gid)
            os.chmod(folder / sub, mode)

    def _files(self, cid: str) -> Path:
        """Where the container's workspace/ and tmp/ are: its disk (mounted while it runs), or its folder."""
        return self._dir(cid) / (MOUNT if self.disks.enabled else "")

    async def start(self, cid: str) -> Container:
        c = self.container(cid)
        async with c.lock:
            if c.state == RUNNING:
                raise errors.FailedPrecondition(f"container {cid} is already running", reason="INVALID_TRANSITION")
            if c.state != CREATED:  # ended: it starts again, its disk (workspace) as it was left
                await c.done.wait()  # (its last run's clean-up, disk detached, is over)
                c.exit_code = c.signal = c.finished_at = None
                c.message, c.stop_requested, c.stop_reached = "", False, False
                c.killed_after_grace = c.killed_deaf = False
                c.done = trio.Event()
            assert self._nursery is not None
            # Once begun, a start is seen through and the container supervised, whatever becomes
            # of the caller: trio leaves a task that calls started() under a cancelled caller
            # where it was, to be cancelled with it, which left a running container unwatched
            # (and a shutdown waiting for it) when a client gave up at that moment. A start is
            # local work of a few tens of milliseconds.
            with trio.CancelScope(shield=True):
                await self._nursery.start(self._supervise_container, c)
        return c

    async def _supervise_container(
        self, c: Container, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        background()  # its writes wait for disk space, not fail: the record must be made (store/db.py)
        spec = c.spec
        limits = self._limits(spec)
        memory, pids = limits.memory_bytes, limits.pids
        started = attached = False
        ended: tuple[int | None, int | None] = (None, None)  # (exit code, signal)
        image: Image | None = None
        try:
            image = await self.images.resolve(spec.image)
            self.images.hold(image)  # (no await in between: the cache may not evict it now)
            c.log = await OutputLog.create(self._dir(c.id) / "output.jsonl", self.settings.max_output_bytes)
            c.cgroup = await self._cgroup(c.id, memory, pids, limits.cpus)
            if self.disks.enabled:
                uid, gid = self.sandbox.user or (os.getuid(), os.getgid())
                attached = True
                await trio.to_thread.run_sync(self.disks.attach, self._dir(c.id), self._files(c.id), uid, gid)
            argv, cwd, env = await trio.to_thread.run_sync(
                self._argv, spec.command or IDLE, c, image, spec.env, spec.workdir, memory, pids
            )
            async with trio.open_nursery() as nursery:
                run = await start_process(
                    nursery, argv, c.log, sandboxed=self._sandboxed, cwd=cwd, env=env, files=self._spawn_files
                )
                c.handle = run.handle
                assert c.handle is not None
                c.state, c.started_at, c.pid = RUNNING, now_us(), c.handle.pid
                await self.store.run(table.upsert, table.CONTAINERS, c.row())
                log.info("container started", container=c.id, pid=c.pid)
                task_status.started()
                started = True
                exit_ = await run.result()
            await c.log.close()
            ended = (exit_.exit_code, exit_.signal)
            if c.stop_requested and (c.stop_reached or exit_.signal is not None):
                # (a stop that never reached the process, which then ended by itself: what it did)
                killed = " (killed after the grace period)" if c.killed_after_grace else ""
                killed = " (killed: it does not handle SIGTERM)" if c.killed_deaf else killed
                state, message = STOPPED, c.message or f"stopped{killed}"
            elif _start_failure(exit_):
                state, message = FAILED, f"could not start: {exit_.first_error}"
            else:
                state, message = EXITED, _ending(exit_, c.cgroup, memory)
            self._ended(c, ended, state, message)
        except Exception as exc:
            inner = errors.single(exc)
            if isinstance(inner, (errors.AriaError, OSError)):  # never ran: bad image, no /bin/sh, no cgroup...
                state, message = FAILED, f"could not start: {_reason(inner)}"
                log.info("container could not start", container=c.id, why=_reason(inner))
            else:  # ours: say so, keep serving
                log.exception("container supervisor failed", container=c.id)
                state, message = FAILED, f"quilt lost track of it ({type(inner).__name__})"
            self._ended(c, ended, state, message)
        finally:
            if image is not None:
                self.images.release(image)
            await self._release(c.cgroup)
            if attached:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.disks.detach, self._files(c.id))
        await self._record_end(table.CONTAINERS, c.row())
        log.info("container ended", container=c.id, state=CONTAINER_STATES[c.state], message=c.message)
        c.done.set()  # (after the clean-up: a start again or a removal waits for it)
        if not started:
            task_status.started()

    @staticmethod
    def _ended(c: Container, ended: tuple[int | None, int | None], state: int, message: str) -> None:
        """The end, shown all at once (no await): a reader never sees an ended state without its
        code or time, nor a log follower its state still RUNNING."""
        (c.exit_code, c.signal), c.state, c.message = ended, state, message
        c.finished_at, c.pid, c.handle = now_us(), 0, None

    async def _record_end(self, into: table.Table[table.Row], row: table.Row) -> None:
        """A run's end, stored whatever happens: shielded (it must be made), and if even that fails
        (the disk still full at shutdown), logged; the next start marks it lost ("quilt restarted")."""
        try:
            with trio.CancelScope(shield=True):
                await self.store.run(table.upsert, into, row)
        except Exception:
            log.exception("could not record the end of a run", table=into.name, id=row["id"])

    async def stop(self, cid: str, grace: float = 0.0) -> Container:
        c = self.container(cid)
        async with c.lock:  # (a start in flight holds it: the stop comes after, and stops it)
            if c.state != RUNNING:
                raise errors.FailedPrecondition(
                    f"container {cid} is {CONTAINER_STATES[c.state]}, not running", reason="INVALID_TRANSITION"
                )
        # Once begun, a stop is seen through whatever becomes of its caller (bounded: the grace,
        # then kills), so that no container is left half-stopped with its tasks cancelled.
        with trio.CancelScope(shield=True):
            await self._stop(c, grace or self.settings.stop_grace, "")
        return c

    async def _stop(self, c: Container, grace: float, why: str) -> None:
        async with c.lock:
            if c.state != RUNNING or c.handle is None:
                return
            c.stop_requested = True
            c.message = why
            await self._cancel_tasks_of(c.id, f"container {c.id} stopped")
            # pid 1 of a namespace only gets signals it handles, and one that has not installed
            # its handler yet (it just started) loses a SIGTERM: say it again now and then. One
            # that has run a while without a handler (`sleep 60`) cannot be asked: it is killed.
            deaf = False
            with trio.move_on_after(grace):
                while c.handle is not None:
                    handles: bool | None = True
                    if c.handle.pid and not c.handle.group:
                        handles = await trio.to_thread.run_sync(handles_signal, c.handle.pid, signal.SIGTERM)
                    if handles is None:  # gone by itself already: its end is its own
                        await c.done.wait()
                        break
                    c.handle.signal(signal.SIGTERM)
                    if not handles and c.handle.pid:  # (one installing its handler just then may catch it)
                        handles = bool(await trio.to_thread.run_sync(handles_signal, c.handle.pid, signal.SIGTERM))
                    c.stop_reached = c.stop_reached or handles  # (a pid 1 without a handler never sees it)
                    ran_for = (now_us() - (c.started_at or now_us())) / 1e6
                    if ran_for > HANDLER_WAIT and not handles:
                        deaf = True
                        break
                    with trio.move_on_after(0.5):
                        await c.done.wait()
            if not c.done.is_set():
                c.killed_after_grace = not deaf
                c.killed_deaf = deaf
                if c.handle is not None:
                    c.handle.kill()
                if c.cgroup is not None:
                    await trio.to_thread.run_sync(c.cgroup.kill_all)
                await c.done.wait()

    async def remove(self, cid: str, force: bool) -> None:
        c = self.container(cid)
        async with c.lock:
            pass  # (a start in flight is seen through first: then its container is RUNNING)
        if c.state == RUNNING:
            if not force:
                raise errors.FailedPrecondition(
                    f"container {cid} is running; stop it first, or remove it with force", reason="CONTAINER_RUNNING"
                )
            await self._stop(c, 0.0, "removed")
        if c.state != CREATED:
            await c.done.wait()  # its run's clean-up (cgroup, disk) is over before its folder goes
        async with c.lock:
            if c.state == RUNNING:  # started again meanwhile, by another caller
                raise errors.FailedPrecondition(f"container {cid} was started again", reason="CONTAINER_RUNNING")
            for row in await self.store.run(table.rows, table.TASKS, "container_id = ?", [cid]):
                await self.store.run(table.delete, table.TASKS, row["id"])
                with contextlib.suppress(FileNotFoundError):
                    await trio.to_thread.run_sync(self._task_log_path(row["id"]).unlink)
            await self.store.run(table.delete, table.CONTAINERS, cid)
            self.containers.pop(cid, None)
            await trio.to_thread.run_sync(lambda: shutil.rmtree(self._dir(cid), ignore_errors=True))
        log.info("container removed", container=cid)

    async def wait(self, cid: str) -> Container:
        """The container once its main process has ended; at once if it is not running."""
        c = self.container(cid)
        if c.state == RUNNING:
            await c.done.wait()
        return c

    def list_containers(self, states: set[int], labels: dict[str, str]) -> list[Container]:
        return [
            c
            for c in sorted(self.containers.values(), key=lambda c: (c.created_at, c.id))
            if (not states or c.state in states) and all(c.spec.labels.get(k) == v for k, v in labels.items())
        ]

    async def container_log(self, cid: str) -> OutputLog:
        c = self.container(cid)
        if c.log is None:
            c.log = await OutputLog.open_existing(self._dir(cid) / "output.jsonl", self.settings.max_output_bytes)
        return c.log

    # -- tasks ------------------------------------------------------------------------------------

    async def exec(self, spec: ExecSpec, captured: Captured | None = None) -> Task:
        """Start a command in a running container; returns once it runs (or failed to start).
        `captured` collects the head of its output in memory, for a synchronous Exec."""
        c = self.container(spec.container_id)
        if c.state != RUNNING:
            raise errors.FailedPrecondition(
                f"container {c.id} is {CONTAINER_STATES[c.state]}; exec needs a running container",
                reason="CONTAINER_NOT_RUNNING",
            )
        timeout = spec.timeout_seconds
        if not (timeout == timeout and 0 <= timeout <= self.settings.max_exec_timeout):
            raise errors.InvalidArgument(
                f"timeout_seconds must be between 0 (the default, {self.settings.exec_timeout:g} s) and "
                f"{self.settings.max_exec_timeout:g}",
                fields={"timeout_seconds": "out of range"},
            )
        timeout = timeout or self.settings.exec_timeout
        check_strings(spec.command, {**c.spec.env, **spec.env}, spec.workdir or c.spec.workdir)
        image = await self.images.resolve(c.spec.image)
        self.images.hold(image)  # until the task ends (released by its supervisor)
        try:
            await trio.to_thread.run_sync(self._check_command, spec.command, image, "command")
        except BaseException:
            self.images.release(image)
            raise
        t = Task(new_id("t-"), c.id, list(spec.command), dict(spec.labels), timeout_seconds=timeout)
        assert self._nursery is not None
        with trio.CancelScope(shield=True):  # seen through once begun, as a container's start
            try:
                await self.store.run(table.upsert, table.TASKS, t.row())
            except BaseException:
                self.images.release(image)
                raise
            self.tasks[t.id] = t
            await self._nursery.start(self._supervise_task, t, c, image, spec, captured)
        return t

    async def exec_and_wait(self, spec: ExecSpec) -> tuple[Task, Captured]:
        """Exec, and wait for the end; if our caller goes away first, the task is cancelled."""
        captured = Captured()
        t = await self.exec(spec, captured)
        try:
            await t.done.wait()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self.cancel(t.id, "the caller went away")
            raise
        return t, captured

    async def _supervise_task(
        self,
        t: Task,
        c: Container,
        image: Image,
        spec: ExecSpec,
        captured: Captured | None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        background()  # (as a container's supervisor)
        limits = self._limits(c.spec)
        memory, pids = limits.memory_bytes, limits.pids
        env = {**c.spec.env, **spec.env}
        started = False
        try:
            t.log = await OutputLog.create(self._task_log_path(t.id), self.settings.max_output_bytes)
            argv, cwd, full_env = await trio.to_thread.run_sync(
                self._argv, spec.command, c, image, env, spec.workdir or c.spec.workdir, memory, pids
            )
            # No await from this check to the spawn: a cancel or a stop that came while the task
            # was getting ready ends it here, never spawned (its container may be going).
            if t.cancel_requested or c.stop_requested or c.state != RUNNING:
                raise _NotRun(t.cancel_requested or f"container {c.id} stopped")
            async with trio.open_nursery() as nursery:
                run = await start_process(
                    nursery,
                    argv,
                    t.log,
                    sandboxed=self._sandboxed,
                    cwd=cwd,
                    env=full_env,
                    stdin=spec.stdin,
                    captured=captured,
                    files=self._spawn_files,
                )
                t.handle = run.handle
                assert t.handle is not None
                if t.cancel_requested:  # it came while the sandbox started: the kill it could not make
                    t.handle.kill()
                t.state, t.started_at, t.pid = T_RUNNING, now_us(), t.handle.pid
                await self.store.run(table.upsert, table.TASKS, t.row())
                task_status.started()
                started = True
                if t.timeout_seconds > 0:
                    nursery.start_soon(self._watchdog, t)
                exit_ = await run.result()
                nursery.cancel_scope.cancel()  # the watchdog
            await t.log.close()
            t.exit_code, t.signal = exit_.exit_code, exit_.signal
            if t.cancel_requested and exit_.signal is not None:  # (it did not end by itself first)
                t.state, t.message = T_CANCELLED, f"cancelled: {t.cancel_requested}"
            elif t.timed_out:
                t.state, t.message = T_TIMEOUT, f"timed out after {t.timeout_seconds:g} s; its processes were killed"
            elif _start_failure(exit_):
                t.state, t.message = T_FAILED, f"could not start: {exit_.first_error}"
            elif exit_.exit_code == 0:
                t.state, t.message = T_COMPLETED, "exited with code 0"
            else:
                t.state, t.message = T_FAILED, _ending(exit_, c.cgroup, memory)
        except _NotRun as never:
            t.state, t.message = T_CANCELLED, f"cancelled before it started: {never}"
        except Exception as exc:
            inner = errors.single(exc)
            if isinstance(inner, (errors.AriaError, OSError)):
                t.state, t.message = T_FAILED, f"could not start: {_reason(inner)}"
                log.info("task could not start", task=t.id, why=_reason(inner))
            else:
                log.exception("task supervisor failed", task=t.id)
                t.state, t.message = T_FAILED, f"quilt lost track of it ({type(inner).__name__})"
        finally:
            self.tasks.pop(t.id, None)
            self.images.release(image)
        if t.log is not None:
            t.output_lines, t.output_truncated = t.log.count, t.log.truncated
        t.finished_at, t.pid, t.handle = now_us(), 0, None
        await self._record_end(table.TASKS, t.row())
        log.info("task ended", task=t.id, container=t.container_id, state=TASK_STATES[t.state], message=t.message)
        t.done.set()
        if not started:
            task_status.started()

    async def _watchdog(self, t: Task) -> None:
        await trio.sleep(t.timeout_seconds)
        if t.handle is not None:
            t.timed_out = not t.cancel_requested
            t.handle.kill()

    async def task(self, tid: str) -> Task:
        t = self.tasks.get(tid)
        if t is not None:
            return t
        row = await self.store.run(table.get, table.TASKS, tid)
        if row is None:
            raise errors.NotFound(f"no task {tid!r}", reason="TASK_NOT_FOUND")
        return Task.from_row(row)

    async def list_tasks(self, container_id: str, states: set[int]) -> list[Task]:
        where: list[str] = []
        params: list[table.Param] = []
        if container_id:
            where.append("container_id = ?")
            params.append(container_id)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(sorted(states))
        rows = await self.store.run(table.rows, table.TASKS, " AND ".join(where), params)
        return [self.tasks.get(r["id"]) or Task.from_row(r) for r in rows]

    async def cancel(self, tid: str, why: str = "by a caller") -> tuple[bool, Task]:
        t = await self.task(tid)
        if t.state in TASK_FINISHED or t.cancel_requested:
            return False, t
        t.cancel_requested = why
        if t.handle is not None:
            t.handle.kill()  # (still starting: its supervisor kills it once it exists, or never starts it)
        await t.done.wait()
        return t.state == T_CANCELLED, t  # (it may have ended by itself just before: then it says so)

    async def _cancel_tasks_of(self, cid: str, why: str) -> None:
        """Every task of the container at once (one after another, a stop waited for each)."""
        async with trio.open_nursery() as nursery:
            for t in [t for t in self.tasks.values() if t.container_id == cid]:
                nursery.start_soon(self.cancel, t.id, why)

    def _task_log_path(self, tid: str) -> Path:
        return self.settings.data_dir / "tasks" / f"{tid}.jsonl"

    async def task_log(self, t: Task) -> OutputLog:
        if t.log is not None:
            return t.log
        return await OutputLog.open_existing(self._task_log_path(t.id), self.settings.max_output_bytes)

    # -- running processes ------------------------------------------------------------------------

    def _argv(  # in a worker thread: it looks at the image's files
        self,
        command: list[str],
        c: Container,
        image: Image,
        env: dict[str, str],
        workdir: str,
        memory: int,
        pids: int,
    ) -> tuple[list[str], str | None, dict[str, str] | None]:
        full_env = base_env(env)
        argv = self.sandbox.argv(
            command,
            image=image,
            workspace=self._files(c.id) / "workspace",
            tmp=self._files(c.id) / "tmp",
            workdir=workdir,
            env=full_env,
            network=c.spec.network,
            hostname=c.spec.name if HOSTNAME.fullmatch(c.spec.name) else c.id,
            cgroup=c.cgroup,
            memory_bytes=memory,
            pids=pids,
        )
        if self.sandbox.kind == "none":
            # Unisolated: the workspace is a host folder; /workspace paths are translated.
            workspace = str(self._files(c.id) / "workspace")
            cwd = workspace + workdir[len("/workspace") :] if workdir.startswith("/workspace") else workdir
            return argv, cwd, {**full_env, "HOME": workspace, "TMPDIR": str(self._files(c.id) / "tmp")}
        return argv, None, None

    @property
    def _sandboxed(self) -> bool:
        return self.sandbox.kind == "bubblewrap"

    @property
    def _spawn_files(self) -> dict[str, Path]:
        return {"{seccomp_fd}": self.sandbox.seccomp} if self.sandbox.seccomp is not None else {}

    async def _cgroup(self, name: str, memory: int, pids: int, cpus: float = 0.0) -> Cgroup | None:
        if not self.sandbox.limits.parents:
            return None
        cgroup = Cgroup(self.sandbox.limits, name)
        await trio.to_thread.run_sync(cgroup.create, memory, pids, cpus)
        return cgroup

    async def _release(self, cgroup: Cgroup | None) -> None:
        if cgroup is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(cgroup.kill_all)
                await trio.to_thread.run_sync(cgroup.remove)

    # -- metrics ----------------------------------------------------------------------------------

    def counts(self) -> tuple[int, int, int]:
        running = sum(1 for c in self.containers.values() if c.state == RUNNING)
        return len(self.containers), running, len(self.tasks)


def _bytes(n: int) -> str:
    """1073741824 -> "1073741824 (1 GiB)": the number, and what it is in words."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n} ({n / size:g} {unit})"
    return str(n)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, errors.AriaError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


class _NotRun(Exception):
    """A task cancelled (or whose container stopped) before its sandbox was spawned."""


def _start_failure(exit_: Exit) -> bool:
    """The sandbox never ran the command: bubblewrap or our wrapper said why on stderr (the
    wrapper's line may follow the shell's own, e.g. about a cgroup that is gone)."""
    return (exit_.returncode == 1 and exit_.first_error.startswith("bwrap:")) or (
        exit_.returncode == 125 and any(line.startswith("quilt:") for line in exit_.head.splitlines())
    )


def _ending(exit_: Exit, cgroup: Cgroup | None, memory: int) -> str:
    if exit_.signal is not None:
        if exit_.signal == signal.SIGKILL and cgroup is not None and cgroup.oom_killed():
            return f"killed: out of memory (the limit is {memory} bytes)"
        return f"killed by signal {exit_.signal} ({signal.Signals(exit_.signal).name})"
    return f"exited with code {exit_.exit_code}"
