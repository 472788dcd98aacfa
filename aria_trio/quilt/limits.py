"""Memory, process and CPU limits for a sandbox: cgroups (v2, else v1) where we may write them,
else rlimits.

A container gets a cgroup of its own under the daemon's; its main process and every command exec'd
in it join that cgroup before they start (the spawn wrapper writes its pid into cgroup.procs and
then execs), so the limits hold for the whole tree from its first instruction. Without writable
cgroups, the wrapper sets RLIMIT_AS and RLIMIT_NPROC instead: weaker (per process, and per user),
with no CPU limit, and the daemon says so at start.

CPU: each sandbox gets a quota (`cpus`: CPU time per period, cfs_quota_us in v1, cpu.max in v2),
and all sandboxes together sit in one parent with a low weight (SANDBOX_WEIGHT of the default),
so that sandboxes spinning on every core still leave the daemons, which answer everyone, their
share of the CPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("quilt.limits")

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
SANDBOX_WEIGHT = 0.25  # of the CPU weight a process outside the sandboxes has, for all sandboxes together


@dataclass(frozen=True)
class LimitsMode:
    name: str  # "cgroup v2", "cgroup v1", "rlimits"
    # v2: the folder under which container cgroups go; v1: one such folder per controller
    parents: tuple[Path, ...] = ()
    cpu: bool = False  # can we limit CPU (v2: the cpu controller; v1: the last parent is cpu's)


def _own_cgroup(controller: str | None) -> str | None:
    """Our cgroup path for a v1 controller, or the v2 path when controller is None."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller is None and controllers == "":
                return path
            if controller is not None and controller in controllers.split(","):
                return path
    return None


def _try_parent(path: Path) -> bool:
    """Can we make (and remove) cgroups under `path`?"""
    try:
        path.mkdir(exist_ok=True)
        probe = path / f"probe-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        return True
    except OSError:
        return False


def _detect_v2() -> LimitsMode | None:
    own = _own_cgroup(None)
    if own is None or not (CGROUP_ROOT / "cgroup.controllers").exists():
        return None
    base = CGROUP_ROOT / own.lstrip("/")
    try:
        available = set((base / "cgroup.controllers").read_text().split())
        if not {"memory", "pids"} <= available:
            return None
        wanted = "+memory +pids" + (" +cpu" if "cpu" in available else "")
        control = base / "cgroup.subtree_control"
        try:
            control.write_text(wanted)
        except OSError:
            # "no internal processes": move the daemon into a leaf of its own first.
            leaf = base / "quilt-daemon"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            control.write_text(wanted)
    except OSError:
        return None
    parent = base / "quilt"
    if not _try_parent(parent):
        return None
    cpu = False
    with contextlib.suppress(OSError):
        (parent / "cgroup.subtree_control").write_text(wanted)
        if "cpu" in available:
            (parent / "cpu.weight").write_text(str(max(1, int(100 * SANDBOX_WEIGHT))))
            cpu = True
    return LimitsMode("cgroup v2", (parent,), cpu)


def _v1_parent(controller: str) -> Path | None:
    own = _own_cgroup(controller)
    mount = CGROUP_ROOT / controller
    if own is None or not (mount / "cgroup.procs").exists():
        return None
    parent = mount / own.lstrip("/") / "quilt"
    return parent if _try_parent(parent) else None


def _detect_v1() -> LimitsMode | None:
    parents = []
    for controller in ("memory", "pids"):
        parent = _v1_parent(controller)
        if parent is None:
            return None
        parents.append(parent)
    cpu = _v1_parent("cpu")
    if cpu is not None:
        try:
            (cpu / "cpu.shares").write_text(str(max(2, int(1024 * SANDBOX_WEIGHT))))
            parents.append(cpu)
        except OSError:
            cpu = None
    return LimitsMode("cgroup v1", tuple(parents), cpu is not None)


def detect() -> LimitsMode:
    return _detect_v2() or _detect_v1() or LimitsMode("rlimits")


class Cgroup:
    """The cgroup(s) of one sandbox: memory and pids limits, membership, OOM, kill-all."""

    def __init__(self, mode: LimitsMode, name: str) -> None:
        self.mode = mode
        self.dirs = [parent / name for parent in mode.parents]

    def create(self, memory_bytes: int, pids: int, cpus: float = 0.0) -> None:
        """Make the cgroup with its limits (`cpus` 0: no CPU quota, only the sandboxes' weight)."""
        for d in self.dirs:
            d.mkdir(exist_ok=True)
        quota = max(1000, int(cpus * CPU_PERIOD_US)) if cpus > 0 else 0
        if self.mode.name == "cgroup v2":
            d = self.dirs[0]
            (d / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):
                (d / "memory.swap.max").write_text("0")
            (d / "pids.max").write_text(str(pids))
            if self.mode.cpu and quota:
                (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        elif self.mode.name == "cgroup v1":
            memory, pid_dir = self.dirs[:2]
            (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: the memory limit alone
                (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            (pid_dir / "pids.max").write_text(str(pids))
            if self.mode.cpu and quota:
                cpu = self.dirs[2]
                (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (cpu / "cpu.cfs_quota_us").write_text(str(quota))

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return found

    def kill_all(self) -> None:
        """SIGKILL every process left in the cgroup (v2: all at once, with cgroup.kill)."""
        if self.mode.name == "cgroup v2":
            with contextlib.suppress(OSError):
                (self.dirs[0] / "cgroup.kill").write_text("1")
                return
        for _ in range(100):  # a fork bomb forks while we kill: go round until it is empty
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def oom_killed(self) -> bool:
        """Did the kernel kill something here for going over the memory limit?"""
        try:
            if self.mode.name == "cgroup v2":
                events = (self.dirs[0] / "memory.events").read_text()
            elif self.mode.name == "cgroup v1":
                events = (self.dirs[0] / "memory.oom_control").read_text()
            else:
                return False
        except OSError:
            return False
        for line in events.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value) > 0:
                return True
        return False

    def remove(self) -> None:
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:  # still busy: a process we could not kill; say so, retry later
                log.warning("could not remove cgroup", path=str(d), error=exc.strerror)
