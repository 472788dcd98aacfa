"""Images: "host" (a read-only view of the host's programs), or one of the operator's images.

The operator's images are the entries of one folder (`--images-dir`): rootfs folders, and tar
archives of them (plain, gzip, xz or bzip2). A client names one by its entry's name, with or
without its archive suffix (`alpine` for `alpine.tar.gz`), never by a path: anything else is
INVALID_ARGUMENT with reason IMAGE_NOT_ALLOWED, and so is an entry that is a symlink (an
operator's `evil -> /`), a hidden one, or an archive that safetar refuses. Messages name the
images there are, never a host path.

An archive is unpacked once, by safetar, into cache_dir/<sha256 of the archive>/ (a staging
folder renamed into place, so a half-unpacked image is never used), with a note beside it,
<sha256>.json, that says it is complete and how large. The digest of an archive is remembered by
its (device, inode, size, mtime, ctime), so a big archive is hashed again only when it changes;
an archive refused once stays refused (by digest) until it changes, so a bomb is not unpacked on
every request.

The cache is bounded: when an archive is resolved and the cache is over max_cache_bytes (the
bytes of content written, as safetar counts them), the least recently used unpacked images that
no container holds are removed. When everything left is held, they all stay (a running sandbox
has them mounted), the cache stays over its limit for a while, and a warning says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from aria_trio.quilt import safetar
from aria_trio.quilt.sandbox import Image
from aria_trio.shared import errors

log = structlog.get_logger("quilt.images")

HOST = Image(None, "host")
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.xz", ".tar.bz2", ".tgz", ".txz", ".tbz2", ".tbz", ".tar")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # plain, not hidden, at most 128 characters
REASON = "IMAGE_NOT_ALLOWED"
MAX_LISTED = 20  # images named in a message
DEFAULT_MAX_IMAGE_BYTES = 8 * 1024**3  # content of one unpacked archive
DEFAULT_MAX_CACHE_BYTES = 32 * 1024**3  # all unpacked archives together

_DIGEST = re.compile(r"[0-9a-f]{64}")
_STAGING = ".unpack-"
_EVICTING = ".evict-"
_NOTE_FORMAT = 1
_HASH_CHUNK = 1024 * 1024


@dataclass
class _Entry:
    size: int
    last_used: float


@dataclass(frozen=True)
class _Found:
    entry: str
    folder: bool
    fd: int = -1  # an archive's, open
    key: tuple[int, ...] = ()  # (device, inode, size, mtime_ns, ctime_ns)


class Images:
    def __init__(self, images_dir: Path | None, cache_dir: Path, *, max_image_bytes: int, max_cache_bytes: int) -> None:
        if max_image_bytes <= 0 or max_cache_bytes <= 0:
            raise ValueError("max_image_bytes and max_cache_bytes must be positive")
        self.images_dir = None if images_dir is None else Path(os.path.abspath(images_dir))
        self.cache_dir = Path(os.path.abspath(cache_dir))
        if self.images_dir is not None and _overlap(self.images_dir, self.cache_dir):
            # its unpacked images would be images themselves (a cache hidden inside is fine)
            raise ValueError("the image cache must not be the images folder, nor be in it, nor hold it")
        self.max_image_bytes = max_image_bytes
        self.max_cache_bytes = max_cache_bytes
        self._digests: dict[tuple[int, ...], str] = {}
        self._refused: dict[str, str] = {}  # digest -> why
        self._hash_locks: dict[tuple[int, ...], trio.Lock] = {}
        self._locks: dict[str, trio.Lock] = {}  # digest -> held while it is unpacked or removed
        self._entries: dict[str, _Entry] = {}  # the unpacked images
        self._holds: dict[str, int] = {}  # digest -> containers using it
        self._pins: dict[str, int] = {}  # digest -> resolves under way, about to hand it out
        self._staging: set[str] = set()  # staging folders of unpacks under way
        self._clock = 0.0  # the last last_used given: strictly increasing, so LRU order has no ties

    # -- resolving --------------------------------------------------------------------------------

    async def resolve(self, name: str) -> Image:
        """The image called `name` ("" or "host": the host view), unpacked if it is an archive.
        A container that uses it should `hold` it at once (no await between), and `release` it
        when done: an unheld image may be removed from the cache by the next resolve."""
        if name in ("", "host"):
            return HOST
        try:
            found = await trio.to_thread.run_sync(self._find, name)
            if found.folder:
                assert self.images_dir is not None
                return Image(self.images_dir / found.entry, name)
            try:
                return await self._unpacked(name, found)
            finally:
                os.close(found.fd)
        except OSError as exc:  # the host's trouble (a race with the operator, a full disk): logged, not said
            log.error("could not resolve an image", image=name, error=str(exc))
            raise errors.Unavailable(
                f"image {_said(name)} cannot be used now ({exc.strerror or type(exc).__name__}); try again later",
                reason="IMAGE_UNAVAILABLE",
            ) from None

    async def available(self) -> list[str]:
        """The names of the images there are, "host" first."""
        return ["host", *await trio.to_thread.run_sync(self._available)]

    def _find(self, name: str) -> _Found:  # in a worker thread
        if self.images_dir is None:
            what = f"image {name!r}" if NAME.fullmatch(name) else "a path"
            raise _not_allowed(
                f'{what} is not allowed: an image is "host" or the name of one of the operator\'s images, and '
                'none are configured here (--images-dir), so only "host"',
                "no images",
            )
        if not NAME.fullmatch(name):
            raise _not_allowed(
                'an image is "host" or the plain name of one of the operator\'s images (up to 128 letters, '
                f'digits, ".", "_", "+" or "-"; not a path); there are: {self._listing()}',
                "not allowed",
            )
        try:
            dir_fd = os.open(self.images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("the images folder cannot be read", folder=str(self.images_dir), error=str(exc))
            raise _not_allowed(
                f'image {name!r} is not allowed: the images folder is unavailable, only "host" is', "unavailable"
            ) from None
        try:
            entries = os.listdir(dir_fd)
            if name in entries:
                entry = name
            else:
                matches = sorted(e for e in entries if _stem(e) == name)
                if not matches:
                    raise _not_allowed(f"no image {name!r}; there are: {self._listing()}", "unknown image")
                if len(matches) > 1:
                    raise _not_allowed(
                        f"image {name!r} is ambiguous: say which, {' or '.join(map(repr, matches))}", "ambiguous"
                    )
                entry = matches[0]
            st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                log.warning("refused an image that is a symlink", image=name, folder=str(self.images_dir))
                raise _not_allowed(
                    f"image {name!r} is not allowed: it is a symbolic link, and images must be real folders or "
                    "archives in the images folder",
                    "symbolic link",
                )
            if stat.S_ISDIR(st.st_mode):
                return _Found(entry, folder=True)
            if not stat.S_ISREG(st.st_mode):
                raise _not_allowed(
                    f"image {name!r} is not allowed: it is neither a folder nor an archive", "not a file"
                )
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise _not_allowed(f"image {name!r} changed while it was opened; try again", "changed")
            key = (fst.st_dev, fst.st_ino, fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns)
            return _Found(entry, folder=False, fd=fd, key=key)
        finally:
            os.close(dir_fd)

    def _available(self) -> list[str]:  # in a worker thread
        if self.images_dir is None:
            return []
        try:
            dir_fd = os.open(self.images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            names: set[str] = set()
            for entry in os.listdir(dir_fd):
                try:
                    st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode) and NAME.fullmatch(entry) and entry != "host":
                    names.add(entry)
                elif stat.S_ISREG(st.st_mode) and (stem := _stem(entry)) is not None and NAME.fullmatch(stem):
                    names.add(stem if stem != "host" else entry)
            return sorted(names)
        finally:
            os.close(dir_fd)

    def _listing(self) -> str:
        names = ["host", *self._available()]
        shown = ", ".join(names[:MAX_LISTED])
        return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")

    # -- archives ---------------------------------------------------------------------------------

    async def _unpacked(self, name: str, found: _Found) -> Image:
        digest = self._digests.get(found.key)
        if digest is None:
            async with self._hash_locks.setdefault(found.key, trio.Lock()):  # one hash per archive
                digest = self._digests.get(found.key)
                if digest is None:
                    digest = await trio.to_thread.run_sync(_sha256, found.fd)
                    self._digests[found.key] = digest
        async with self._locks.setdefault(digest, trio.Lock()):  # one unpack per digest
            why = self._refused.get(digest)
            if why is not None:
                raise _not_allowed(f"image {name!r} is not allowed: {why}", "unsafe archive")
            size = await trio.to_thread.run_sync(self._present, digest, self._entries.get(digest))
            if size is None:
                self._entries.pop(digest, None)
                size = await self._unpack(name, found.fd, digest)
            self._clock = max(time.time(), self._clock + 1e-6)
            self._entries[digest] = _Entry(size, self._clock)
            self._pins[digest] = self._pins.get(digest, 0) + 1
        try:
            await self._evict(keep=digest)
        finally:
            self._pins[digest] -= 1
            if not self._pins[digest]:
                del self._pins[digest]
        return Image(self.cache_dir / digest, name)  # no await from here to the caller's hold

    async def _unpack(self, name: str, fd: int, digest: str) -> int:
        staging = f"{_STAGING}{digest[:16]}-{secrets.token_hex(4)}"
        self._staging.add(staging)
        started = time.monotonic()
        try:
            result = await trio.to_thread.run_sync(self._unpack_into, fd, digest, staging)
        except safetar.UnsafeArchive as exc:
            self._refused[digest] = str(exc)
            log.warning("refused an image archive", image=name, digest=digest, why=str(exc))
            raise _not_allowed(f"image {name!r} is not allowed: {exc}", "unsafe archive") from None
        except OSError as exc:
            log.error("could not unpack an image", image=name, digest=digest, error=str(exc))
            raise errors.Unavailable(
                f"image {name!r} could not be unpacked ({exc.strerror or type(exc).__name__}); try again later",
                reason="IMAGE_UNPACK_FAILED",
            ) from None
        finally:
            self._staging.discard(staging)
        log.info(
            "image unpacked",
            image=name,
            digest=digest,
            bytes=result.bytes_written,
            members=result.members,
            skipped_devices=result.skipped_devices,
            seconds=round(time.monotonic() - started, 3),
        )
        return result.bytes_written

    def _unpack_into(self, fd: int, digest: str, staging: str) -> safetar.Unpacked:  # in a worker thread
        os.makedirs(self.cache_dir, mode=0o711, exist_ok=True)  # (the sandbox user passes; quilt/stage.py)
        with os.fdopen(os.dup(fd), "rb") as archive:
            result = safetar.unpack(archive, self.cache_dir / staging, max_bytes=self.max_image_bytes)
        try:
            os.rename(self.cache_dir / staging, self.cache_dir / digest)
        except OSError:
            safetar.remove_tree(self.cache_dir / staging)
            raise
        note = self.cache_dir / f"{staging}.json"
        note.write_text(json.dumps({"format": _NOTE_FORMAT, "bytes": result.bytes_written, "members": result.members}))
        os.replace(note, self._note(digest))
        return result

    def _present(self, digest: str, entry: _Entry | None) -> int | None:  # in a worker thread
        """The size of the unpacked image if it is there and complete (and now the most recently
        used); else None, with whatever is left of it removed."""
        folder = self.cache_dir / digest
        try:
            is_dir = stat.S_ISDIR(os.lstat(folder).st_mode)
        except FileNotFoundError:
            is_dir = False
        size = _read_note(self._note(digest)) if is_dir else None
        if size is None:
            _remove(folder)
            _remove(self._note(digest))
            return None
        os.utime(self._note(digest))  # last used, for the next start
        return entry.size if entry is not None else size

    def _note(self, digest: str) -> Path:
        return self.cache_dir / f"{digest}.json"

    # -- holding, and the cache's bound -----------------------------------------------------------

    def hold(self, image: Image) -> None:
        """A container uses `image` (until `release`): it is not removed from the cache meanwhile."""
        digest = self._digest_of(image)
        if digest is None:
            return
        if digest not in self._entries:
            log.warning("held an image the cache no longer has", image=image.name, digest=digest)
        self._holds[digest] = self._holds.get(digest, 0) + 1

    def release(self, image: Image) -> None:
        digest = self._digest_of(image)
        if digest is None:
            return
        held = self._holds.get(digest, 0)
        if held <= 0:
            log.warning("released an image that was not held", image=image.name, digest=digest)
        elif held == 1:
            del self._holds[digest]
        else:
            self._holds[digest] = held - 1

    @contextlib.contextmanager
    def held(self, image: Image) -> Iterator[Image]:
        self.hold(image)
        try:
            yield image
        finally:
            self.release(image)

    def _digest_of(self, image: Image) -> str | None:
        """The cache's name for an unpacked image; None for the host and rootfs folders."""
        if image.root is None or image.root.parent != self.cache_dir or not _DIGEST.fullmatch(image.root.name):
            return None
        return image.root.name

    async def _evict(self, keep: str | None) -> list[Path]:
        total = sum(e.size for e in self._entries.values())
        if total <= self.max_cache_bytes:
            return []
        victims: list[tuple[str, trio.Lock]] = []
        for digest, entry in sorted(self._entries.items(), key=lambda item: item[1].last_used):
            if total <= self.max_cache_bytes:
                break
            lock = self._locks.setdefault(digest, trio.Lock())
            if digest == keep or self._holds.get(digest) or self._pins.get(digest) or lock.locked():
                continue
            lock.acquire_nowait()  # not locked (just seen, no checkpoint since): a resolve of it waits
            victims.append((digest, lock))
            del self._entries[digest]
            total -= entry.size
        if total > self.max_cache_bytes:
            log.warning(
                "the image cache is over its limit, but the images left are in use (or just unpacked): keeping "
                "them until they are released",
                bytes=total,
                limit=self.max_cache_bytes,
                images=len(self._entries),
            )
        try:
            with trio.CancelScope(shield=True):  # out of the index already: off the disk too
                removed = await trio.to_thread.run_sync(self._remove_images, [d for d, _ in victims])
        finally:
            for _, lock in victims:
                lock.release()
        for path in removed:
            log.info("removed an unused image from the cache", digest=path.name)
        return removed

    def _remove_images(self, digests: list[str]) -> list[Path]:  # in a worker thread
        removed = []
        for digest in digests:
            # renamed first: it is gone at once, and a crash midway leaves a folder clean() removes
            doomed = self.cache_dir / f"{_EVICTING}{digest[:16]}-{secrets.token_hex(4)}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.cache_dir / digest, doomed)
            _remove(self._note(digest))
            _remove(doomed)
            removed.append(self.cache_dir / digest)
        return removed

    # -- at start ---------------------------------------------------------------------------------

    async def clean(self) -> list[Path]:
        """Remove what a crash (or an older version) left in the cache: staging folders, images
        half removed, images without their note; learn the complete ones; then bring the cache
        within its limit. Returns what was removed, for the daemon's log."""
        removed, found = await trio.to_thread.run_sync(self._scan, frozenset(self._staging), frozenset(self._entries))
        for digest, (size, last_used) in found.items():
            self._entries.setdefault(digest, _Entry(size, last_used))
        return removed + await self._evict(keep=None)

    def _scan(
        self, busy: frozenset[str], known: frozenset[str]
    ) -> tuple[list[Path], dict[str, tuple[int, float]]]:  # in a worker thread
        removed: list[Path] = []
        found: dict[str, tuple[int, float]] = {}
        try:
            names = sorted(os.listdir(self.cache_dir))
        except FileNotFoundError:
            return removed, found
        for entry in names:
            path = self.cache_dir / entry
            if entry.startswith((_STAGING, _EVICTING)):
                if not any(entry.startswith(b) for b in busy):
                    _remove(path)
                    removed.append(path)
            elif _DIGEST.fullmatch(entry):
                if entry in known:
                    continue
                size = _read_note(self._note(entry)) if stat.S_ISDIR(os.lstat(path).st_mode) else None
                if size is None:  # incomplete, or unpacked by an older version: unpacked again when used
                    _remove(path)
                    _remove(self._note(entry))
                    removed.append(path)
                else:
                    found[entry] = (size, os.stat(self._note(entry)).st_mtime)
            elif entry.endswith(".json") and _DIGEST.fullmatch(entry[: -len(".json")]):
                if not (self.cache_dir / entry[: -len(".json")]).is_dir():
                    _remove(path)
                    removed.append(path)
            else:
                log.warning("left alone an unknown entry of the image cache", path=str(path))
        return removed, found


def _not_allowed(message: str, what: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, reason=REASON, fields={"image": what})


def _overlap(images_dir: Path, cache_dir: Path) -> bool:
    if images_dir == cache_dir or cache_dir in images_dir.parents:
        return True
    if images_dir in cache_dir.parents:
        return not cache_dir.relative_to(images_dir).parts[0].startswith(".")
    return False


def _said(name: str) -> str:
    """A requested name, for a message: as said if it is a plain name, else not repeated (it
    could be a host path)."""
    return repr(name) if NAME.fullmatch(name) else "(not a plain name)"


def _stem(entry: str) -> str | None:
    """An archive's name without its suffix ("alpine" for "alpine.tar.gz"), or None."""
    for suffix in ARCHIVE_SUFFIXES:
        if entry.endswith(suffix) and len(entry) > len(suffix):
            return entry[: -len(suffix)]
    return None


def _sha256(fd: int) -> str:  # in a worker thread
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _read_note(path: Path) -> int | None:
    """The size an unpacked image's note gives, or None if there is no (valid) note."""
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or note.get("format") != _NOTE_FORMAT or not isinstance(note.get("bytes"), int):
        return None
    return int(note["bytes"])


def _remove(path: Path) -> None:
    """Remove a file or a folder (never following a symlink); fine if it is not there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        safetar.remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
