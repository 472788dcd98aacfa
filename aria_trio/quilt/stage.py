"""Where sandboxes find their files when Quilt runs as root: a private mount namespace and a stage.

As root, Quilt never runs a sandbox as root: bubblewrap is started as the sandbox user
(`--sandbox-uid`, an unprivileged uid of no one else's), so that a process that escaped every
other layer would still be nobody on the host, and a socket it reached would see that nobody as
its peer. But bubblewrap looks up the folders it binds with the sandbox user's rights, and Quilt's
data usually lives where only root may go (`/root/.aria/quilt`, a 0700 folder).

So at start Quilt moves into a mount namespace of its own (a slave of the host's: it sees what
the host mounts later, the host never sees Quilt's mounts), mounts a small tmpfs at STAGE, and
binds there each folder a sandbox needs (containers, tool scratch, unpacked bundles and images,
the tool runners). Sandboxes are built from the stage's paths. Nothing on the host changes: no
permission is loosened, and every mount Quilt makes (the stage, the containers' disks) vanishes
with Quilt and the last of its sandboxes, even after a kill -9.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("quilt.stage")

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE, MS_SHARED = 0x1000, 0x4000, 0x40000, 0x80000, 0x100000
MNT_DETACH = 0x2
STAGE = Path("/run/aria-quilt")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str, target: str | Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            str(target).encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def umount(target: str | Path, lazy: bool = True) -> None:
    _check(_libc.umount2(str(target).encode(), MNT_DETACH if lazy else 0), f"umount {target}")


def enter_private_mounts() -> None:
    """Move this process into a mount namespace of its own. Call it before any thread exists
    (unshare(CLONE_NEWNS) refuses a process whose threads share its filesystem attributes)."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount("none", "/", None, MS_REC | MS_SLAVE)  # host mounts still arrive; ours never leave


def stage_id(data_dir: Path) -> str:
    """A short name for a Quilt's data folder, in the paths of its stage."""
    return "q-" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Stage:
    """Folders bound under one root; `path(p)` is where a sandbox's bubblewrap finds host path p."""

    root: Path
    roots: Mapping[Path, Path]  # host folder -> its place on the stage

    @classmethod
    def build(cls, folders: Mapping[str, Path], data_dir: Path, root: Path = STAGE) -> Stage:
        """(In a worker thread, in Quilt's own mount namespace.) The stage: a tmpfs that only
        root may list, with each folder bound at root/<this Quilt's id>/<name> (the id, of its
        data folder, tells its sandboxes' bubblewraps from another Quilt's in a process list)."""
        root.mkdir(parents=True, exist_ok=True)  # (an empty folder on the host; all else is ours)
        mount("aria-quilt-stage", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0711,size=1m")
        base = root / stage_id(data_dir)
        base.mkdir(mode=0o711)
        os.chmod(base, 0o711)
        roots: dict[Path, Path] = {}
        for name, folder in folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            target = base / name
            target.mkdir()
            # The folder becomes a shared mount (of itself) and the stage's copy its peer, so what
            # Quilt mounts in it later (a container's disk) shows on the stage too.
            mount(str(folder), folder, None, MS_BIND | MS_REC)
            mount("none", folder, None, MS_SHARED | MS_REC)
            mount(str(folder), target, None, MS_BIND | MS_REC)
            roots[folder.resolve()] = target
        log.info("sandbox stage ready", stage=str(root), folders=sorted(folders))
        return cls(root, roots)

    def path(self, host_path: Path) -> Path:
        """Where bubblewrap, as the sandbox user, finds `host_path` (which lies in a staged folder)."""
        resolved = host_path.resolve()
        for folder, target in self.roots.items():
            if resolved == folder or folder in resolved.parents:
                return target / resolved.relative_to(folder)
        raise ValueError(f"{host_path} is not in a staged folder")
