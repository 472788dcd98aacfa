"""Output of a process tree, line by line, on disk, followable while it grows.

One JSON object per line in a file (`{"o": offset, "t": ns, "s": stream, "l": text}`), appended in
batches from a worker thread as the pipes deliver, so a follower sees a line while the process
still runs, and everything is still there after it ends (and after quilt restarts).

Bounds: a line is cut at MAX_LINE bytes (the rest continues as the next line); the text kept per
log is capped at `cap_bytes` (64 MiB by default), after which a SYSTEM line says so and further
output is counted, not kept; the in-memory index keeps one file offset per INDEX_EVERY lines.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.shared import errors

STDOUT, STDERR, SYSTEM = q.STDOUT, q.STDERR, q.SYSTEM  # quilt.v1.Stream
MAX_LINE = 64 * 1024
INDEX_EVERY = 1024
READ_BATCH = 512  # lines read from disk per worker-thread call when replaying


@dataclass(frozen=True, slots=True)
class Line:
    offset: int
    time_ns: int
    stream: int
    text: str


def _encode(line: Line) -> bytes:
    return (
        json.dumps({"o": line.offset, "t": line.time_ns, "s": line.stream, "l": line.text}, ensure_ascii=False) + "\n"
    ).encode()


def _decode(raw: bytes) -> Line:
    d = json.loads(raw)
    return Line(d["o"], d["t"], d["s"], d["l"])


class Lines:
    """Bytes from a process's pipes, cut into lines: at each newline, and at MAX_LINE bytes (a
    longer line goes on as the next one); a partial line waits for the rest, or for `rest()`."""

    def __init__(self) -> None:
        self._partial: dict[int, bytearray] = {STDOUT: bytearray(), STDERR: bytearray()}

    def feed(self, stream: int, data: bytes | bytearray) -> list[tuple[int, str]]:
        buf = self._partial[stream]
        buf += data
        lines: list[tuple[int, str]] = []
        while True:
            cut = buf.find(b"\n", 0, MAX_LINE + 1)
            if cut >= 0:
                lines.append((stream, bytes(buf[:cut]).decode("utf-8", "replace")))
                del buf[: cut + 1]
            elif len(buf) >= MAX_LINE:  # a very long line: kept in pieces
                lines.append((stream, bytes(buf[:MAX_LINE]).decode("utf-8", "replace")))
                del buf[:MAX_LINE]
            else:
                return lines

    def rest(self) -> list[tuple[int, str]]:
        """The partial lines left at the end (the process ended without a last newline)."""
        rest = [(s, bytes(b).decode("utf-8", "replace")) for s, b in self._partial.items() if b]
        for b in self._partial.values():
            b.clear()
        return rest


class OutputLog:
    def __init__(self, path: Path, cap_bytes: int) -> None:
        self.path = path
        self.cap_bytes = cap_bytes
        self.count = 0  # lines on disk
        self.kept_bytes = 0  # text bytes kept (the cap counts these)
        self.dropped_bytes = 0
        self.truncated = False
        self.closed = False
        self.lost_lines = 0  # lines that found the disk full (not kept; said once there is room)
        self._size = 0  # file size
        self._index: list[int] = []  # file offset of line INDEX_EVERY * i
        self._lines = Lines()
        self._lock = trio.Lock()  # one batch written at a time, in order
        self._changed = trio.Event()

    # -- opening ------------------------------------------------------------------------------------

    @classmethod
    async def create(cls, path: Path, cap_bytes: int) -> OutputLog:
        """A log to write; one already there (a container started again) goes on after its lines."""
        log = cls(path, cap_bytes)

        def prepare() -> None:  # (one worker-thread hop for all three: a task's start waits on it)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
            log._scan()

        await trio.to_thread.run_sync(prepare)
        return log

    @classmethod
    async def open_existing(cls, path: Path, cap_bytes: int) -> OutputLog:
        """A finished log from disk (after a restart): readable, not writable."""
        log = cls(path, cap_bytes)
        log.closed = True  # (before the scan: a half line is left as it is, and not read)
        await trio.to_thread.run_sync(log._scan)
        return log

    def _scan(self) -> None:
        """The lines already in the file: their count, sizes and index (a worker thread's job)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            pos = 0
            for raw in f:
                if not raw.endswith(b"\n"):  # half a line: a crash while it was written
                    if not self.closed:
                        os.truncate(self.path, pos)
                    break
                if self.count % INDEX_EVERY == 0:
                    self._index.append(pos)
                pos += len(raw)
                self.count += 1
            self._size = pos

    # -- writing ------------------------------------------------------------------------------------

    async def feed(self, stream: int, data: bytes | bytearray) -> None:
        """Bytes from a pipe; complete lines are written, a partial one waits for the rest."""
        if lines := self._lines.feed(stream, data):
            await self._write(lines)

    async def system(self, text: str) -> None:
        await self._write([(SYSTEM, text)], capped=False)

    async def close(self) -> None:
        """The process ended: write what is left of partial lines, then let followers finish."""
        if rest := self._lines.rest():
            await self._write(rest)
        if self.dropped_bytes:
            await self.system(f"[quilt] {self.dropped_bytes} bytes of output were dropped (over the limit)")
        self.closed = True
        self._notify()

    async def _write(self, items: list[tuple[int, str]], capped: bool = True) -> None:
        async with self._lock:
            now = time.time_ns()
            lines: list[Line] = []
            for stream, text in items:
                size = len(text.encode())
                if capped and self.truncated:
                    self.dropped_bytes += size
                    continue
                if capped and self.kept_bytes + size > self.cap_bytes:
                    self.truncated = True
                    self.dropped_bytes += size
                    text = f"[quilt] output truncated: the limit of {self.cap_bytes} bytes was reached"
                    stream = SYSTEM
                elif capped:
                    self.kept_bytes += size
                lines.append(Line(self.count + len(lines), now, stream, text))
            if not lines:
                return
            lost = self.lost_lines
            if lost:  # the disk may have room again: say what is missing first
                note = Line(self.count, now, SYSTEM, f"[quilt] {lost} lines were lost: the disk was full")
                lines = [note, *(Line(line.offset + 1, line.time_ns, line.stream, line.text) for line in lines)]
            data = [_encode(line) for line in lines]
            try:
                await trio.to_thread.run_sync(self._append, data)
            except OSError as exc:
                if not errors.is_disk_full(exc):
                    raise
                # Nothing half-written (the file is cut back to its last whole line); the lines
                # are counted, said when there is room again, and the process goes on.
                self.lost_lines = lost + len(lines) - (1 if lost else 0)  # (the note is not one of them)
                return
            self.lost_lines = 0
            for i, raw in enumerate(data):
                if (self.count + i) % INDEX_EVERY == 0:
                    self._index.append(self._size)
                self._size += len(raw)
            self.count += len(lines)
        self._notify()

    def _append(self, data: list[bytes]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            blob = b"".join(data)
            try:
                written = os.write(fd, blob)
                if written != len(blob):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError:
                os.ftruncate(fd, self._size)  # back to the last whole line
                raise
        finally:
            os.close(fd)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- reading ------------------------------------------------------------------------------------

    async def lines(self, offset: int = 0, *, follow: bool = False, since_ns: int = 0) -> AsyncIterator[Line]:
        """Lines from `offset` on; with `follow`, new ones as they come, until the log closes."""
        while True:
            changed = self._changed
            closed = self.closed  # (before the count: lines written after it are read next round)
            end = self.count
            while offset < end:
                batch = await trio.to_thread.run_sync(self._read, offset, min(end, offset + READ_BATCH))
                for line in batch:
                    if line.time_ns >= since_ns:
                        yield line
                offset += len(batch)
                if not batch:  # the file is shorter than we think: never spin
                    return
            if closed or not follow:
                return
            await changed.wait()

    def _read(self, start: int, stop: int) -> list[Line]:
        slot = start // INDEX_EVERY
        if slot >= len(self._index):
            return []
        out: list[Line] = []
        with open(self.path, "rb") as f:
            f.seek(self._index[slot])
            n = slot * INDEX_EVERY
            for raw in f:
                if n >= stop:
                    break
                if n >= start:
                    out.append(_decode(raw))
                n += 1
        return out
