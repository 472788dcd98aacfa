"""Images: "host" (a read-only view of the host's programs), a rootfs folder, or a tar(.gz) of one.

An archive is unpacked once into images/<sha256 of the archive>/ and reused; unpacking goes to a
temporary folder first and is renamed into place, so a half-unpacked image is never used. Members
that would land outside the folder (absolute names, `..`, writing through a link) are refused,
setuid bits cleared and device files skipped (tarfile's "tar" filter, plus ours); symlinks to
absolute paths stay, as a rootfs needs them: they resolve inside the sandbox.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
from pathlib import Path

import trio

from .. import errors
from .sandbox import Image

HOST = Image(None)
_CHUNK = 1024 * 1024


class Images:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._locks: dict[str, trio.Lock] = {}

    async def resolve(self, spec: str) -> Image:
        if spec in ("", "host"):
            return HOST
        path = Path(spec)
        if not path.is_absolute():
            raise errors.InvalidArgument(
                f'unknown image {spec!r}: use "host" or an absolute path to a rootfs folder or .tar/.tar.gz',
                reason="UNKNOWN_IMAGE",
                fields={"image": "unknown"},
            )
        kind = await trio.to_thread.run_sync(_kind, path)
        if kind == "dir":
            return Image(path)
        if kind == "tar":
            return Image(await self._unpacked(path))
        raise errors.InvalidArgument(
            f"unknown image {spec!r}: no such rootfs folder or tar archive",
            reason="UNKNOWN_IMAGE",
            fields={"image": "not found"},
        )

    async def _unpacked(self, archive: Path) -> Path:
        digest = await trio.to_thread.run_sync(_sha256, archive)
        lock = self._locks.setdefault(digest, trio.Lock())
        async with lock:
            target = self.cache_dir / digest
            if not await trio.to_thread.run_sync(target.is_dir):
                await trio.to_thread.run_sync(_unpack, archive, target)
        return target


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return "dir"
    if path.is_file() and tarfile.is_tarfile(path):
        return "tar"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _rootfs_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    member = tarfile.tar_filter(member, dest)
    if member.ischr() or member.isblk():
        return None  # the sandbox has its own /dev
    return member


def _unpack(archive: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter=_rootfs_filter)
        staging.rename(target)
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise errors.InvalidArgument(
            f"image archive {archive.name} cannot be unpacked: {exc}",
            reason="BAD_IMAGE",
            fields={"image": "bad archive"},
        ) from None
