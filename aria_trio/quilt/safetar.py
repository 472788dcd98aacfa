"""Unpack a tar archive of a rootfs without trusting it, nor tarfile's extraction filters.

tarfile only parses here: members are read one by one (`TarFile.next`), and everything is created
by this module, relative to folder descriptors (`os.open`/`os.mkdir`/`os.symlink`/`os.link` with
`dir_fd`, `O_NOFOLLOW`, `O_EXCL`), so no path of the host is ever resolved and no symlink ever
followed while unpacking. Python 3.11.7's filters (`tar`, `data`) are bypassed by
CVE-2025-4517 (realpath stops at PATH_MAX), CVE-2025-4330 and CVE-2025-4138 (links out of the
folder), CVE-2024-12718 (metadata changed outside) and CVE-2025-4435 (errors ignored); none of
that code runs here.

The rules (a refusal refuses the whole archive, and leaves nothing behind):

- names: a leading `./` and repeated slashes are normalised away; an empty name, a NUL, an
  absolute name or a `..` component is refused, and so is a name longer than MAX_PATH_BYTES, a
  component longer than MAX_COMPONENT_BYTES or deeper than MAX_DEPTH; so is a name that appears
  twice (except a folder repeated), and a member under a symlink, a file or a device;
- symlinks: their target must stay inside the image as the sandbox sees it (an absolute target
  starts at the image's root, a relative one at the link's folder): checked on the target's text
  when the link is made, and once everything is unpacked by resolving every link through the
  image's links (`a -> b/c/..` where b/c is itself a link to `/`); `../../..` out is refused,
  `/usr/bin/python3` is fine (inside the sandbox it is the image's);
- hard links: only to a regular file unpacked earlier from the same archive;
- device nodes and FIFOs are skipped (the sandbox has its own /dev), and counted;
- permissions: masked to 0o777 (setuid, setgid and sticky bits cleared) for files, 0o777 plus
  sticky for folders; owners are not taken from the archive (what is made belongs to whoever
  unpacks); modification times are kept;
- sparse, multi-volume and unknown member types are refused (contiguous files are regular ones);
- caps: `max_bytes` of content actually written (checked before each write: a bomb stops at the
  cap), MAX_MEMBERS members, MAX_LINK_BYTES per link target;
- tarfile itself is kept in bounds (its own parsing has bugs of its own): one pax or GNU long-name
  header is at most MAX_HEADER_BYTES, a pax header must be well formed, without sparse keys and
  with few long runs of digits (CVE-2024-6232: its regexes backtrack quadratically on them), the
  stream never goes backwards (negative sizes, CVE-2025-8194) nor further than
  `max_bytes + MAX_MEMBERS * MEMBER_OVERHEAD`, and the list of members tarfile keeps is emptied as
  it goes.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

MAX_MEMBERS = 200_000  # a Debian rootfs with Python is ~30 000; node_modules-heavy ones more
MAX_PATH_BYTES = 1024  # a member's name or a hard link's target, once normalised (PATH_MAX is 4096)
MAX_COMPONENT_BYTES = 255  # NAME_MAX
MAX_DEPTH = 64  # components in a name
MAX_LINK_BYTES = 1024  # a symlink's target
MAX_HEADER_BYTES = 16 * 1024  # one pax header, or one GNU long name or long link name
MAX_DIGIT_RUN = 128  # in a pax header: legit numbers are 20 digits at most
PAX_DIGIT_BUDGET = 100_000_000  # sum of squared digit-run lengths over all pax headers (~0.5 s of regex)
MEMBER_OVERHEAD = 4096  # stream bytes allowed per member beyond its content (headers, padding)
MAX_SYMLINK_HOPS = 40  # as the kernel's
RESOLVE_BUDGET = 10_000_000  # path components walked to resolve every link, all together

_CHUNK = 64 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_SKIPPED_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_DIGITS = re.compile(rb"[0-9]+")
# the archive's own (decompression, header) errors; OSError is not among them: the reader turns
# what its stream raises into UnsafeArchive, so an OSError is the host's (no space left...)
_PARSE_ERRORS = (tarfile.TarError, EOFError, ValueError, LookupError, RecursionError, OverflowError, zlib.error)

DIR, FILE, LINK, SKIPPED = "folder", "file", "symbolic link", "device"


class UnsafeArchive(Exception):
    """The archive is refused. The message says why in words fit for clients: it names members
    of the archive, never a path of the host."""


@dataclass(frozen=True)
class Unpacked:
    bytes_written: int
    members: int
    files: int
    folders: int
    symlinks: int
    hardlinks: int
    skipped_devices: int  # device nodes and FIFOs, left out


def unpack(archive: IO[bytes], dest: Path, *, max_bytes: int) -> Unpacked:
    """Unpack `archive` (a seekable binary file, read from its start: a plain tar, or one
    compressed with gzip, xz or bzip2) into `dest`, a new folder whose parent exists. On any
    failure `dest` is removed and the error raised: UnsafeArchive when the archive is refused,
    OSError for trouble of the host's (no space left, ...)."""
    os.mkdir(dest, 0o700)  # FileExistsError: not ours to remove
    try:
        root = os.open(dest, _DIR_FLAGS)
        try:
            with _open_stream(archive, max_bytes + MAX_MEMBERS * MEMBER_OVERHEAD) as reader:
                return _Extractor(root, reader, max_bytes).run()
        finally:
            os.close(root)
    except BaseException:
        remove_tree(dest)
        raise


def remove_tree(path: Path) -> None:
    """Remove a folder unpacked here, never following a symlink, even when the modes of its
    folders would forbid it to a user other than root (it makes them writable first)."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except PermissionError:
        pass
    _make_removable(path)
    shutil.rmtree(path)


def _make_removable(top: Path) -> None:
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode):
        return
    os.chmod(top, stat.S_IMODE(st.st_mode) | 0o700)
    for _, dirs, _, fd in os.fwalk(top, follow_symlinks=False):
        for d in dirs:
            st = os.stat(d, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):  # just seen as a folder: chmod does not follow anything
                os.chmod(d, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=fd)


def _show(text: str) -> str:
    """An archive's name or link target, for a message: quoted, escaped, cut."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


# -- the stream tarfile reads ---------------------------------------------------------------------


class _Reader:
    """What tarfile reads from: the (decompressed) archive, kept in bounds. It only goes forward,
    never past `limit`, reads at most MAX_HEADER_BYTES or a content chunk at once, and reports
    the stream's own errors (damaged compression, truncation) as UnsafeArchive."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.pos = 0
        self.check_next_read: Callable[[bytes], None] | None = None
        self.pax_budget = _PaxBudget()

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > max(MAX_HEADER_BYTES, _CHUNK):
            raise UnsafeArchive(f"a read of {size} bytes at once was asked for (a header too large?)")
        if self.pos + size > self.limit:
            raise UnsafeArchive(f"the archive is longer than its content limit allows ({self.limit} bytes)")
        try:
            data = self.stream.read(size)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            raise UnsafeArchive(f"the archive is damaged ({_why(exc)})") from None
        self.pos += len(data)
        check, self.check_next_read = self.check_next_read, None
        if check is not None:
            check(data)
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET, /) -> int:
        target = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos}.get(whence)
        if target is None:
            raise UnsafeArchive("a seek from the end of the archive was asked for")
        target += pos
        if target < self.pos:
            raise UnsafeArchive("the archive's headers point backwards (a negative size?)")
        if target > self.limit:
            raise UnsafeArchive(f"the archive is longer than its content limit allows ({self.limit} bytes)")
        if target != self.pos:
            try:
                self.stream.seek(target)
            except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
                raise UnsafeArchive(f"the archive is damaged ({_why(exc)})") from None
            self.pos = target
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: bytes, /) -> int:
        raise UnsafeArchive("writing to an archive being unpacked")  # never: tarfile opens it "r"

    def close(self) -> None:
        pass  # the caller closes the stream

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def _why(exc: BaseException) -> str:
    """An error of the stream, without a path (these carry none, but say so by construction)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {str(exc)[:120]}" if str(exc) else type(exc).__name__


class _Stream:
    """The archive as a decompressed stream, by its magic number, closed with it."""

    def __init__(self, archive: IO[bytes], limit: int) -> None:
        archive.seek(0)
        magic = archive.read(6)
        archive.seek(0)
        self.decompressor: IO[bytes] | None = None
        if magic.startswith(b"\x1f\x8b"):
            self.decompressor = cast(IO[bytes], gzip.GzipFile(fileobj=archive, mode="rb"))
        elif magic.startswith(b"\xfd7zXZ\x00"):
            self.decompressor = cast(IO[bytes], lzma.LZMAFile(archive))
        elif magic.startswith(b"BZh"):
            self.decompressor = cast(IO[bytes], bz2.BZ2File(archive))
        elif magic.startswith(b"\x28\xb5\x2f\xfd"):
            raise UnsafeArchive("zstd-compressed archives are not supported (Python 3.11 has no zstd)")
        self.reader = _Reader(self.decompressor or archive, limit)

    def __enter__(self) -> _Reader:
        return self.reader

    def __exit__(self, *exc: object) -> None:
        if self.decompressor is not None:
            self.decompressor.close()


def _open_stream(archive: IO[bytes], limit: int) -> _Stream:
    return _Stream(archive, limit)


class _PaxBudget:
    def __init__(self) -> None:
        self.left = PAX_DIGIT_BUDGET


def _check_pax(size: int, budget: _PaxBudget) -> Callable[[bytes], None]:
    """The check of a pax header's body (`size` bytes of records, NUL padding), before tarfile's
    regexes see it: well formed records, no sparse keys, digit runs short and few."""

    def check(buf: bytes) -> None:
        if len(buf) < size:
            raise UnsafeArchive("the archive is truncated in a pax header")
        if buf[size:].strip(b"\0"):
            raise UnsafeArchive("a pax header has data in its padding")
        pos = 0
        while pos < size:
            space = buf.find(b" ", pos, min(size, pos + 21))
            if space <= pos or not buf[pos:space].isdigit():
                raise UnsafeArchive("a pax header is malformed")
            end = pos + int(buf[pos:space])
            equals = buf.find(b"=", space + 1, end)
            if end > size or end <= space + 2 or buf[end - 1 : end] != b"\n" or equals <= space + 1:
                raise UnsafeArchive("a pax header is malformed")
            if buf[space + 1 : equals].startswith(b"GNU.sparse."):
                raise UnsafeArchive("sparse members are not supported")
            pos = end
        for run in _DIGITS.finditer(buf):
            length = run.end() - run.start()
            if length > MAX_DIGIT_RUN:
                raise UnsafeArchive(f"a pax header has a run of {length} digits (more than {MAX_DIGIT_RUN})")
            budget.left -= length * length
        if budget.left < 0:
            raise UnsafeArchive("the archive's pax headers have too many long numbers")

    return check


class _MemberParsing(Protocol):
    """What tarfile.TarInfo has and typeshed leaves out: the parsing of a member's header, which
    `_TarInfo` overrides."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo: ...


class _TarInfo(tarfile.TarInfo):
    """tarfile's member, with its parsing kept in bounds. `_proc_member` is the hook tarfile's
    source names for subclasses ("can be overridden in a subclass")."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        reader = tf.fileobj
        assert isinstance(reader, _Reader)
        if self.size < 0:
            raise UnsafeArchive("a member has a negative size")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchive("sparse members are not supported")
        if self.type in _PAX_TYPES or self.type in _LONG_TYPES:
            if self.size > MAX_HEADER_BYTES:
                raise UnsafeArchive(f"a header of {self.size} bytes is larger than {MAX_HEADER_BYTES}")
            if self.type in _PAX_TYPES:
                reader.check_next_read = _check_pax(self.size, reader.pax_budget)
        return cast(_MemberParsing, super())._proc_member(tf)


# -- making the files -----------------------------------------------------------------------------


@dataclass
class _Node:
    kind: str
    mode: int = 0o755
    mtime: float | None = None
    target: str = ""  # a symlink's


class _Extractor:
    def __init__(self, root: int, reader: _Reader, max_bytes: int) -> None:
        self.root = root
        self.reader = reader
        self.max_bytes = max_bytes
        self.nodes: dict[tuple[str, ...], _Node] = {}
        self.root_node = _Node(DIR)
        self.written = self.members = self.files = self.symlinks = self.hardlinks = self.skipped = 0
        self.last_offset = -1
        self._parent_cache: tuple[tuple[str, ...], int] | None = None

    def run(self) -> Unpacked:
        try:
            try:
                tar = tarfile.TarFile(fileobj=self.reader, mode="r", tarinfo=_TarInfo)
            except _PARSE_ERRORS as exc:
                raise UnsafeArchive(f"not a tar archive ({_why(exc)})") from None
            while (member := self._next(tar)) is not None:
                tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every member otherwise
                self.members += 1
                if self.members > MAX_MEMBERS:
                    raise UnsafeArchive(f"the archive has more than {MAX_MEMBERS} members")
                self._member(member)
            self._close_parent()
            self._check_links()
            self._finish_folders()
        finally:
            self._close_parent()
        return Unpacked(
            bytes_written=self.written,
            members=self.members,
            files=self.files,
            folders=sum(1 for n in self.nodes.values() if n.kind == DIR),
            symlinks=self.symlinks,
            hardlinks=self.hardlinks,
            skipped_devices=self.skipped,
        )

    def _next(self, tar: tarfile.TarFile) -> tarfile.TarInfo | None:
        try:
            member = tar.next()
        except _PARSE_ERRORS as exc:
            raise UnsafeArchive(f"the archive is damaged ({_why(exc)})") from None
        if member is not None:
            if member.offset <= self.last_offset or member.offset_data < member.offset:
                raise UnsafeArchive("the archive's headers point backwards")
            self.last_offset = member.offset
        return member

    # -- one member --

    def _member(self, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, "name")
        if m.size < 0:
            raise UnsafeArchive(f"member {_show(m.name)} has a negative size")
        if not parts:  # "." or "./": the image's root
            if not m.isdir():
                raise UnsafeArchive("the archive's root is not a folder")
            self.root_node.mode, self.root_node.mtime = _folder_mode(m.mode), m.mtime
            return
        if m.type in _FILE_TYPES:
            if m.sparse is not None:
                raise UnsafeArchive(f"member {_show(m.name)} is sparse: sparse members are not supported")
            self._file(parts, m)
        elif m.type == tarfile.DIRTYPE:
            self._folder(parts, m)
        elif m.type == tarfile.SYMTYPE:
            self._symlink(parts, m)
        elif m.type == tarfile.LNKTYPE:
            self._hardlink(parts, m)
        elif m.type in _SKIPPED_TYPES:
            self._new(parts, m.name)
            self.nodes[parts] = _Node(SKIPPED)
            self.skipped += 1
        else:
            raise UnsafeArchive(f"member {_show(m.name)} has an unsupported type {m.type!r}")

    def _new(self, parts: tuple[str, ...], name: str) -> None:
        """`parts` may be made: not there yet, and under folders only."""
        if parts in self.nodes:
            raise UnsafeArchive(f"member {_show(name)} appears twice in the archive")
        for i in range(1, len(parts)):
            node = self.nodes.get(parts[:i])
            if node is not None and node.kind != DIR:
                where = "/".join(parts[:i])
                raise UnsafeArchive(f"member {_show(name)} is under {_show(where)}, a {node.kind} in the archive")

    def _file(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        self._new(parts, m.name)
        if self.written + m.size > self.max_bytes:
            raise UnsafeArchive(f"the image is larger than the limit of {self.max_bytes} bytes")
        parent = self._parent(parts)
        fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent)
        self.nodes[parts] = _Node(FILE)
        try:
            self.reader.seek(m.offset_data)
            left = m.size
            while left:
                chunk = self.reader.read(min(_CHUNK, left))
                if not chunk:
                    raise UnsafeArchive(f"the archive is truncated in member {_show(m.name)}")
                if self.written + len(chunk) > self.max_bytes:  # counted in bytes written
                    raise UnsafeArchive(f"the image is larger than the limit of {self.max_bytes} bytes")
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    self.written += n
                    view = view[n:]
                left -= len(chunk)
            os.fchmod(fd, m.mode & 0o777)  # no setuid, setgid, sticky
            _set_mtime(fd, m.mtime)
        finally:
            os.close(fd)
        self.files += 1

    def _folder(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        node = self.nodes.get(parts)
        if node is None:
            self._new(parts, m.name)
            parent = self._parent(parts)
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
            node = self.nodes[parts] = _Node(DIR)
        elif node.kind != DIR:
            raise UnsafeArchive(f"member {_show(m.name)} appears twice in the archive")
        node.mode, node.mtime = _folder_mode(m.mode), m.mtime  # applied at the end

    def _symlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        target = m.linkname
        if not target or "\0" in target:
            raise UnsafeArchive(f"symbolic link {_show(m.name)} has an empty or malformed target")
        if len(os.fsencode(target)) > MAX_LINK_BYTES:
            raise UnsafeArchive(f"symbolic link {_show(m.name)} has a target longer than {MAX_LINK_BYTES} bytes")
        if not _lexically_inside(parts[:-1], target):
            raise UnsafeArchive(f"symbolic link {_show(m.name)} -> {_show(target)} points outside the image")
        self._new(parts, m.name)
        parent = self._parent(parts)
        os.symlink(target, parts[-1], dir_fd=parent)
        self.nodes[parts] = _Node(LINK, target=target)
        _set_mtime(parts[-1], m.mtime, dir_fd=parent)
        self.symlinks += 1

    def _hardlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        source = _parts(m.linkname, "hard link target")
        node = self.nodes.get(source)
        if node is None:
            raise UnsafeArchive(
                f"hard link {_show(m.name)} -> {_show(m.linkname)}: no such file earlier in the archive"
            )
        if node.kind != FILE:
            raise UnsafeArchive(f"hard link {_show(m.name)} -> {_show(m.linkname)}: a {node.kind}, not a regular file")
        self._new(parts, m.name)
        parent = self._parent(parts)
        source_parent = self._walk(source[:-1])
        try:
            os.link(source[-1], parts[-1], src_dir_fd=source_parent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            if source_parent != self.root:
                os.close(source_parent)
        self.nodes[parts] = _Node(FILE)
        self.hardlinks += 1

    # -- folders, by descriptor --

    def _parent(self, parts: tuple[str, ...]) -> int:
        """A descriptor of the folder of `parts`, making the folders the archive did not list."""
        folder = parts[:-1]
        if self._parent_cache is not None and self._parent_cache[0] == folder:
            return self._parent_cache[1]
        for i in range(1, len(folder) + 1):
            if parts[:i] not in self.nodes:  # _new saw no link nor file on the way
                fd = self._walk(parts[: i - 1])
                try:
                    os.mkdir(parts[i - 1], 0o700, dir_fd=fd)
                finally:
                    if fd != self.root:
                        os.close(fd)
                self.nodes[parts[:i]] = _Node(DIR)
        self._close_parent()
        fd = self._walk(folder)
        if fd != self.root:
            self._parent_cache = (folder, fd)
        return fd

    def _close_parent(self) -> None:
        if self._parent_cache is not None:
            os.close(self._parent_cache[1])
            self._parent_cache = None

    def _walk(self, folder: tuple[str, ...]) -> int:
        """Open a folder made here, one component at a time, following no symlink (O_NOFOLLOW:
        should one be there after all, this fails rather than go through it)."""
        fd = self.root
        for name in folder:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            finally:
                if fd != self.root:
                    os.close(fd)
            fd = nxt
        return fd

    def _finish_folders(self) -> None:
        """Modes and times of folders, last (deepest first): writing into a folder changes its
        time, and a folder without write or search permission could not be filled."""
        folders = sorted((p for p, n in self.nodes.items() if n.kind == DIR), key=len, reverse=True)
        for parts in folders:
            node = self.nodes[parts]
            fd = self._walk(parts)
            try:
                os.fchmod(fd, node.mode)
                if node.mtime is not None:
                    _set_mtime(fd, node.mtime)
            finally:
                os.close(fd)
        os.fchmod(self.root, self.root_node.mode)
        if self.root_node.mtime is not None:
            _set_mtime(self.root, self.root_node.mtime)

    # -- symlinks, once all are there --

    def _check_links(self) -> None:
        budget = [RESOLVE_BUDGET]
        for parts, node in self.nodes.items():
            if node.kind == LINK and self._escapes(parts[:-1], node.target, budget):
                raise UnsafeArchive(
                    f"symbolic link {_show('/'.join(parts))} -> {_show(node.target)} resolves outside the image "
                    "through other links"
                )

    def _escapes(self, folder: tuple[str, ...], target: str, budget: list[int]) -> bool:
        """Does `target`, resolved from `folder` as the kernel would with the image as its root,
        go above the root? Dangling links, loops and paths through files stop inside: no."""
        here = [] if target.startswith("/") else list(folder)
        todo = deque(target.split("/"))
        hops = 0
        while todo:
            budget[0] -= 1
            if budget[0] < 0:
                raise UnsafeArchive("the archive's symbolic links are too intricate to check")
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if not here:
                    return True
                here.pop()
                continue
            node = self.nodes.get((*here, name))
            if node is None or node.kind == SKIPPED:
                return False  # not there: resolution stops (ENOENT)
            if node.kind == LINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return False  # ELOOP
                if node.target.startswith("/"):
                    here = []
                todo.extendleft(reversed(node.target.split("/")))
                continue
            here.append(name)
            if node.kind != DIR and any(n not in ("", ".") for n in todo):
                return False  # through a file: ENOTDIR
        return False


def _parts(name: str, what: str) -> tuple[str, ...]:
    """A member's name (or a hard link's target) as its components, or refused."""
    if not name:
        raise UnsafeArchive(f"a member has an empty {what}")
    if "\0" in name:
        raise UnsafeArchive(f"a member has a NUL in its {what} {_show(name)}")
    if name.startswith("/"):
        raise UnsafeArchive(f"a member has an absolute {what} {_show(name)}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive(f"a member has a '..' in its {what} {_show(name)}")
    if len(os.fsencode(name)) > MAX_PATH_BYTES:
        raise UnsafeArchive(f"a member has a {what} longer than {MAX_PATH_BYTES} bytes ({_show(name)})")
    if len(parts) > MAX_DEPTH:
        raise UnsafeArchive(f"a member's {what} is deeper than {MAX_DEPTH} folders ({_show(name)})")
    if any(len(os.fsencode(p)) > MAX_COMPONENT_BYTES for p in parts):
        raise UnsafeArchive(f"a member's {what} has a component longer than {MAX_COMPONENT_BYTES} bytes")
    return parts


def _lexically_inside(folder: tuple[str, ...], target: str) -> bool:
    """Does the target's text stay inside the image (absolute from its root, relative from the
    link's folder)?"""
    here = [] if target.startswith("/") else list(folder)
    for name in target.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            if not here:
                return False
            here.pop()
        else:
            here.append(name)
    return True


def _folder_mode(mode: int) -> int:
    return mode & (0o777 | stat.S_ISVTX)


def _set_mtime(where: int | str, mtime: float, *, dir_fd: int | None = None) -> None:
    """Keep the archive's time when it is a sane one (a symlink's own, not its target's)."""
    if not (0 <= mtime < 2**34):  # also NaN: the pax header's text is parsed with float()
        return
    ns = int(mtime * 1_000_000_000)
    if isinstance(where, int):
        os.utime(where, ns=(ns, ns))
    else:
        os.utime(where, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=False)
