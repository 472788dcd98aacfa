"""The bundle store: uploads streamed to disk while hashed, checked, then kept by content hash.

An upload goes to a temporary file chunk by chunk (written and hashed, blake3 and sha256, in a
worker thread, which takes every chunk waiting at once), so memory stays bounded whatever the
size. Only when the declared size, the checksums and the archive with its manifest are all right
is the file fsynced and renamed to objects/<blake3[:2]>/<blake3>.aria; anything else, or an
interrupted upload, deletes the temporary file. The same bytes uploaded twice are stored once
(the id is their blake3).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import structlog
import trio

from aria_trio.quilt import store as table
from aria_trio.quilt.engine import now_us
from aria_trio.shared import errors, json_input
from aria_trio.shared.bundle_manifest import Agent, InvalidBundle, Manifest, Tool, inspect_bundle
from aria_trio.shared.json_input import JSON
from aria_trio.shared.sqlite import Store, fits

log = structlog.get_logger("quilt.bundles")

WRITE_AHEAD = 4  # chunks received but not yet on disk (each at most one gRPC message, 4 MiB)
PAGE_CACHE_LAG = 8 * 1024 * 1024  # bytes of an upload's end kept in the page cache (see _Upload)
PAGE_CACHE_STEP = 4 * 1024 * 1024  # ... handed to writeback this many at a time at least
MAX_PAGE = 1000
DEFAULT_PAGE = 50


@dataclass
class Metadata:
    filename: str
    size_bytes: int
    sha256: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Checksum:
    sha256: str = ""
    blake3: str = ""


@dataclass
class Bundle:
    id: str
    name: str
    version: str
    filename: str
    size_bytes: int
    sha256: str
    layout: str
    manifest: dict[str, JSON]
    tools: list[Tool]
    agents: list[Agent]
    labels: dict[str, str]
    created_at: int

    @classmethod
    def from_row(cls, row: table.BundleRow) -> Bundle:
        return cls(
            row["id"],
            row["name"],
            row["version"],
            row["filename"],
            row["size_bytes"],
            row["sha256"],
            row["layout"],
            json.loads(row["manifest_json"]),
            [Tool(**t) for t in json.loads(row["tools_json"])],
            [Agent(**a) for a in json.loads(row["agents_json"])],
            json.loads(row["labels_json"]),
            row["created_at"],
        )

    def row(self) -> table.BundleRow:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "filename": self.filename,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "layout": self.layout,
            "manifest_json": table.dumps(self.manifest),
            "tools_json": table.dumps([dataclasses.asdict(t) for t in self.tools]),
            "agents_json": table.dumps([dataclasses.asdict(a) for a in self.agents]),
            "labels_json": table.dumps(self.labels),
            "created_at": self.created_at,
        }


class _Upload:
    """The temporary file of one upload and its running hashes (used from worker threads).

    Page cache: what is written is handed to the kernel's writeback once it is PAGE_CACHE_LAG
    behind the end, and its pages are dropped once it is twice that behind (both
    posix_fadvise(DONTNEED), which never blocks: pages still being written back simply stay).
    So an upload keeps about 2 x PAGE_CACHE_LAG of page cache whatever its size, new pages come
    from the ones just freed instead of memory never touched (which cost the write more than
    hashing twice on the development VM: 3.6 against 1.8 ms/MiB), and the final fsync has little
    left to wait for."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=folder)
        self.file = os.fdopen(fd, "wb", buffering=0)  # chunks are large: no copy into a buffer first
        self.path = Path(name)
        self.blake3 = blake3.blake3()
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._handed = 0  # bytes from the start given to writeback
        self._dropped = 0  # bytes from the start whose pages were dropped

    def write(self, chunks: list[bytes]) -> None:
        """A batch of chunks, in order, each hashed then written while it is in the CPU's cache."""
        fd = self.file.fileno()
        for chunk in chunks:
            self.blake3.update(chunk)
            self.sha256.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]  # a full disk raises (ENOSPC); a short write goes on
            self.size += len(chunk)
        self._recycle(fd)

    def _recycle(self, fd: int) -> None:
        behind = self.size - PAGE_CACHE_LAG
        if behind - self._handed < PAGE_CACHE_STEP:
            return
        with contextlib.suppress(OSError, AttributeError):  # advice only (and not on every system)
            os.posix_fadvise(fd, self._handed, behind - self._handed, os.POSIX_FADV_DONTNEED)  # writeback starts
            self._handed = behind
            old = behind - PAGE_CACHE_LAG
            if old > self._dropped:
                os.posix_fadvise(fd, self._dropped, old - self._dropped, os.POSIX_FADV_DONTNEED)  # written: dropped
                self._dropped = old

    def finish(self) -> None:
        os.fsync(self.file.fileno())
        self.file.close()

    def discard(self) -> None:
        # On a full disk the close cannot flush what is buffered, and says so: the file goes anyway
        # (the descriptor is closed all the same).
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BundleStore:
    def __init__(self, root: Path, store: Store, max_bytes: int) -> None:
        self.root = root
        self.store = store
        self.max_bytes = max_bytes
        self._unpacking: dict[str, trio.Lock] = {}  # one per bundle used since start (bounded by the bundles)

    def clean(self) -> list[Path]:
        """(At start, in a worker thread.) What a crash left: uploads cut short (incoming/*.part)
        and bundles half unpacked (unpacked/.unpack-*). Returns what was removed."""
        removed: list[Path] = []
        for pattern in ("incoming/upload-*.part", "unpacked/.unpack-*"):
            for path in self.root.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def object_path(self, bundle_id: str) -> Path:
        return self.root / "objects" / bundle_id[:2] / f"{bundle_id}.aria"

    async def upload(self, items: AsyncIterator[Metadata | bytes | Checksum]) -> Bundle:
        """`items`: the metadata, then chunks, then optionally a checksum (an upload stream)."""
        first = await anext(items, None)
        if not isinstance(first, Metadata):
            raise errors.InvalidArgument(
                "the first message of an upload must be its metadata",
                reason="METADATA_FIRST",
                fields={"metadata": "missing"},
            )
        meta = first
        if meta.size_bytes > self.max_bytes:
            raise errors.ResourceExhausted(
                f"the bundle is {meta.size_bytes} bytes; at most {self.max_bytes} are accepted",
                reason="BUNDLE_TOO_LARGE",
            )
        upload = await trio.to_thread.run_sync(_Upload, self.root / "incoming")
        try:
            checksum = await self._receive(items, meta, upload)
            if upload.size != meta.size_bytes:
                raise errors.InvalidArgument(
                    f"size mismatch: {meta.size_bytes} bytes declared, {upload.size} received",
                    reason="SIZE_MISMATCH",
                    fields={"size_bytes": "does not match"},
                )
            digest, sha = upload.blake3.hexdigest(), upload.sha256.hexdigest()
            for name, want, got in (
                ("sha256", meta.sha256, sha),
                ("sha256", checksum.sha256, sha),
                ("blake3", checksum.blake3, digest),
            ):
                if want and want.lower() != got:
                    raise errors.InvalidArgument(
                        f"{name} checksum mismatch: expected {want.lower()}, got {got}",
                        reason="CHECKSUM_MISMATCH",
                        fields={name: "mismatch"},
                    )
            await trio.to_thread.run_sync(upload.finish)
            manifest = await _inspect(upload.path)
            bundle = Bundle(
                digest,
                manifest.name,
                manifest.version,
                meta.filename,
                upload.size,
                sha,
                manifest.layout,
                manifest.raw,
                manifest.tools,
                manifest.agents,
                meta.labels,
                now_us(),
            )
            existing = await self.store.run(table.get, table.BUNDLES, digest)
            if existing is not None:
                await trio.to_thread.run_sync(upload.discard)
                log.info("bundle uploaded again: stored once", bundle=digest)
                return Bundle.from_row(existing)
            await trio.to_thread.run_sync(self._keep, upload.path, self.object_path(digest))
            await self.store.run(table.upsert, table.BUNDLES, bundle.row())
            log.info("bundle stored", bundle=digest, name=manifest.name, bytes=upload.size)
            return bundle
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(upload.discard)  # nothing left behind, whatever happened

    async def _receive(
        self, items: AsyncIterator[Metadata | bytes | Checksum], meta: Metadata, upload: _Upload
    ) -> Checksum:
        """Chunks to the file: one task receives, another writes and hashes (in a worker thread)
        what the first hands over. At most WRITE_AHEAD chunks are in memory between the two (waiting
        or being written): the receiver takes a slot per chunk, and waits for one when all are taken
        (then the client waits too, for flow-control credit: backpressure when the disk or the
        hashing is slower than the client). The writer hands all the chunks waiting, up to
        WRITE_AHEAD, to one worker-thread call, and frees their slots when they are on disk."""
        checksum = Checksum()
        received = 0
        slots = trio.Semaphore(WRITE_AHEAD)
        send, receive = trio.open_memory_channel[bytes](WRITE_AHEAD)  # never full: slots come first

        async def write() -> None:
            async with receive:
                async for chunk in receive:
                    batch = [chunk]
                    while len(batch) < WRITE_AHEAD:
                        try:
                            batch.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await trio.to_thread.run_sync(upload.write, batch)
                    for _ in batch:
                        slots.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            async with send:
                async for item in items:
                    if isinstance(item, Metadata):
                        raise errors.InvalidArgument("metadata may only come first", fields={"metadata": "repeated"})
                    if isinstance(item, Checksum):
                        checksum = item
                        if await anext(items, None) is not None:
                            raise errors.InvalidArgument(
                                "the checksum must be the last message", fields={"checksum": "not last"}
                            )
                        break
                    received += len(item)
                    if received > meta.size_bytes:
                        raise errors.InvalidArgument(
                            f"more bytes than the {meta.size_bytes} declared",
                            reason="SIZE_MISMATCH",
                            fields={"size_bytes": "exceeded"},
                        )
                    await slots.acquire()
                    send.send_nowait(item)
        return checksum

    @staticmethod
    def _keep(part: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(part, final)
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # the rename itself must survive a crash too
        finally:
            os.close(fd)

    async def get(self, bundle_id: str) -> Bundle:
        row = await self.store.run(table.get, table.BUNDLES, bundle_id)
        if row is None:
            raise errors.NotFound(f"no bundle {bundle_id!r}", reason="BUNDLE_NOT_FOUND")
        return Bundle.from_row(row)

    async def page(self, page_size: int, token: str) -> tuple[list[Bundle], str]:
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        after = _decode_token(token) if token else None
        rows = await self.store.run(table.bundles_page, size + 1, after)
        keep = fits(rows, size)  # (bounded by bytes too: a manifest may be 1 MiB)
        more = len(rows) > keep
        rows = rows[:keep]
        next_token = _encode_token(rows[-1]["created_at"], rows[-1]["id"]) if more else ""
        return [Bundle.from_row(r) for r in rows], next_token

    async def delete(self, bundle_id: str) -> None:
        await self.get(bundle_id)
        await self.store.run(table.delete, table.BUNDLES, bundle_id)
        await trio.to_thread.run_sync(self._remove_files, bundle_id)
        log.info("bundle deleted", bundle=bundle_id)

    def _remove_files(self, bundle_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.object_path(bundle_id).unlink()
        shutil.rmtree(self.root / "unpacked" / bundle_id, ignore_errors=True)

    async def validate(self, bundle_id: str) -> str:
        """Check a stored bundle again; "" when it is fine, else what is wrong."""
        bundle = await self.get(bundle_id)
        path = self.object_path(bundle_id)

        def hashes() -> tuple[str, str] | None:
            try:
                with open(path, "rb") as f:
                    b, s = blake3.blake3(), hashlib.sha256()
                    while chunk := f.read(1024 * 1024):
                        b.update(chunk)
                        s.update(chunk)
                return b.hexdigest(), s.hexdigest()
            except FileNotFoundError:
                return None

        found = await trio.to_thread.run_sync(hashes)
        if found is None:
            return "the bundle's file is missing from the store"
        if found != (bundle.id, bundle.sha256):
            return "the stored bytes no longer match their hashes (the file was damaged)"
        try:
            await _inspect(path)
        except errors.InvalidArgument as exc:
            return exc.message
        return ""

    async def unpacked(self, bundle_id: str) -> Path:
        """The bundle's files (the inner archive's, for the nested layout), unpacked once: two
        first uses at once wait for the one unpack (a lock per bundle)."""
        bundle = await self.get(bundle_id)
        target = self.root / "unpacked" / bundle_id
        lock = self._unpacking.setdefault(bundle_id, trio.Lock())
        async with lock:
            if not await trio.to_thread.run_sync(target.is_dir):
                await trio.to_thread.run_sync(_unpack, self.object_path(bundle_id), target, bundle.layout)
        return target


async def _inspect(path: Path) -> Manifest:
    try:
        return await trio.to_thread.run_sync(inspect_bundle, str(path))
    except InvalidBundle as exc:
        raise errors.InvalidArgument(str(exc), reason="INVALID_BUNDLE", fields={"bundle": str(exc)}) from None


def _unpack(archive: Path, target: Path, layout: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as outer:
            if layout == "nested":
                with outer.open("bundle.zip") as inner_file, zipfile.ZipFile(inner_file) as inner:
                    inner.extractall(staging)  # member names were checked at upload
            else:
                outer.extractall(staging)
        _readable(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _readable(root: Path) -> None:
    """Folders 0755, files 0644: the sandbox user reads a bundle at /bundle (read-only there),
    and quilt's umask (077) would leave it only quilt's. Nothing in it is setuid or executable."""
    os.chmod(root, 0o755)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o755, follow_symlinks=False)
        for f in files:
            path = os.path.join(folder, f)
            if not os.path.islink(path):
                os.chmod(path, 0o644)


def _encode_token(created_at: int, bundle_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, bundle_id]).encode()).decode()


def _decode_token(token: str) -> tuple[int, str]:
    try:
        decoded = json_input.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(decoded, list) or len(decoded) != 2:
            raise TypeError("not a pair")
        created_at, bundle_id = decoded
        if not isinstance(created_at, int) or not isinstance(bundle_id, str):
            raise TypeError("not (int, str)")
        return created_at, bundle_id
    except (ValueError, TypeError, OverflowError):
        raise errors.InvalidArgument("invalid page token", fields={"page_token": "invalid"}) from None
