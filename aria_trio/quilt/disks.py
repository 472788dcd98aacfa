"""A container's own disk: a filesystem of a fixed size, so a write past its limit fails with
ENOSPC inside that container, and nowhere else (not Quilt's data, not the host, not a neighbour).

Each container gets a sparse file holding an ext4 filesystem (`disk.img` in its folder; it only
takes the space its files take), loop-mounted, in Quilt's own mount namespace, while the container
runs; its workspace and its /tmp are folders of it, so the two share the container's `disk_bytes`.
A persistent container's files stay in that image between runs. This needs root (mount) and loop
devices; without them, workspaces are plain folders with no size limit, and Quilt says so at start.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import structlog

from aria_trio.quilt.stage import umount

log = structlog.get_logger("quilt.disks")

MIN_DISK_BYTES = 16 * 1024 * 1024  # ext4 and its metadata need room; smaller is refused
FULL_BELOW = 64 * 1024 * 1024  # free bytes under which a failed mkfs counts as "the disk is full"
IMAGE = "disk.img"
MOUNT = "disk"


@dataclass(frozen=True)
class Disks:
    enabled: bool
    why_not: str = ""

    @classmethod
    def detect(cls, root: bool) -> Disks:
        if not root:
            return cls(False, "they need Quilt to run as root (mount)")
        missing = [p for p in ("mkfs.ext4", "mount") if _which(p) is None]
        if missing:
            return cls(False, f"{' and '.join(missing)} not found (e2fsprogs, util-linux)")
        if not Path("/dev/loop-control").exists():
            return cls(False, "this machine has no loop devices (/dev/loop-control)")
        return cls(True)

    # (each of these in a worker thread: they run programs and wait for them)

    def make(self, folder: Path, size: int, uid: int, gid: int) -> None:
        """A new, empty filesystem of `size` bytes in folder/disk.img, its root owned by uid:gid."""
        image = folder / IMAGE
        with open(image, "wb") as f:
            f.truncate(size)
        _run_on(
            folder,
            _which("mkfs.ext4") or "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",  # no blocks reserved for root: the container may use all of it
            "-E",
            f"lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner={uid}:{gid}",
            "-L",
            "aria-workspace",
            str(image),
        )

    def attach(self, folder: Path, at: Path, uid: int, gid: int) -> None:
        """Mount folder/disk.img at `at` (nosuid, nodev), with workspace/ and tmp/ in it."""
        at.mkdir(exist_ok=True)
        _run(_which("mount") or "mount", "-o", "loop,nosuid,nodev", "-t", "ext4", str(folder / IMAGE), str(at))
        for sub, mode in (("workspace", 0o755), ("tmp", 0o1777)):
            path = at / sub
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        lost = at / "lost+found"
        if lost.is_dir():
            os.chmod(lost, 0o700)

    def detach(self, at: Path) -> None:
        """Unmount (lazily: a process still holding a file lets go of it when it ends)."""
        try:
            umount(at)
        except OSError as exc:
            if exc.errno not in (22, 2):  # EINVAL: not mounted; ENOENT: no such folder
                log.warning("could not unmount a container's disk", error=str(exc))


def _which(program: str) -> str | None:
    """(Root's programs live in sbin, which a PATH may leave out.)"""
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise OSError(f"{argv[0]} failed: {(done.stderr or done.stdout).strip()[:300]}")


def _run_on(folder: Path, *argv: str) -> None:
    """_run, for a program that writes in `folder`: its failure on a full disk is ENOSPC."""
    try:
        _run(*argv)
    except OSError as exc:
        if shutil.disk_usage(folder).free < FULL_BELOW:
            raise OSError(errno.ENOSPC, f"no space left for a container's disk ({exc})") from None
        raise
