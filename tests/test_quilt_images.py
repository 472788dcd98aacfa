"""Container images: safetar's refusals (each crafted by hand here), and Images' names, cache and
eviction. Everything lives under tmp_path: nothing depends on where the checkout is."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trio

from aria_trio.quilt import images as images_mod
from aria_trio.quilt import safetar
from aria_trio.quilt.images import HOST, Images
from aria_trio.quilt.sandbox import Image
from aria_trio.shared import errors

MiB = 1024 * 1024

# -- crafting archives -----------------------------------------------------------------------------


def reg(name: str, data: bytes = b"", mode: int = 0o644, **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_600_000_000
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, data


def folder(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 1_500_000_000
    return info, b""


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return link(name, target, tarfile.LNKTYPE)


def special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, b""


def make_tar(
    path: Path,
    members: Iterable[tuple[tarfile.TarInfo, bytes]],
    mode: str = "w",
    fmt: int = tarfile.PAX_FORMAT,
) -> Path:
    with tarfile.open(path, mode, format=fmt) as tar:  # type: ignore[call-overload]
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def unpack(archive: Path, dest: Path, max_bytes: int = 64 * MiB) -> safetar.Unpacked:
    with open(archive, "rb") as f:
        return safetar.unpack(f, dest, max_bytes=max_bytes)


def refused(archive: Path, dest: Path, max_bytes: int = 64 * MiB) -> str:
    with pytest.raises(safetar.UnsafeArchive) as exc:
        unpack(archive, dest, max_bytes)
    assert not dest.exists() and not os.path.lexists(dest), "nothing is left behind"
    return str(exc.value)


def files_under(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*")}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the destination, that no archive may touch."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "victim").write_text("untouched")
    os.chmod(out / "victim", 0o600)
    return out


def assert_untouched(outside: Path) -> None:
    assert files_under(outside) == {"victim"}
    assert (outside / "victim").read_text() == "untouched"
    assert stat.S_IMODE((outside / "victim").stat().st_mode) == 0o600


# -- safetar: what is kept ---------------------------------------------------------------------


def test_a_good_archive_unpacks_with_its_links_modes_and_times(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "good.tar",
        [
            folder("."),
            folder("./usr/bin"),  # its parent "usr" is not listed: made
            reg("./usr/bin/python3", b"#!/bin/true\n", 0o755),
            reg("usr//lib/os.py", b"import this\n"),  # slashes normalised
            link("bin", "usr/bin"),
            link("usr/bin/python", "/usr/bin/python3"),  # absolute: from the image's root
            link("usr/lib/up", "../bin/python3"),
            hard("usr/bin/python3.11", "usr/bin/python3"),
            folder("tmp", 0o1777),
            link("etc/mtab", "/proc/self/mounts"),  # dangling in the image: fine
        ],
    )
    dest = tmp_path / "root"
    result = unpack(archive, dest)
    assert (result.files, result.symlinks, result.hardlinks, result.skipped_devices) == (2, 4, 1, 0)
    assert result.bytes_written == len(b"#!/bin/true\n") + len(b"import this\n")
    assert (dest / "usr/bin/python3").read_bytes() == b"#!/bin/true\n"
    assert stat.S_IMODE((dest / "usr/bin/python3").stat().st_mode) == 0o755
    assert (dest / "usr/bin/python3").stat().st_mtime == 1_600_000_000
    assert os.readlink(dest / "bin") == "usr/bin"
    assert os.readlink(dest / "usr/bin/python") == "/usr/bin/python3"
    assert os.path.samefile(dest / "usr/bin/python3.11", dest / "usr/bin/python3")
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777  # sticky kept on folders
    assert (dest / "usr/bin").stat().st_mtime == 1_500_000_000
    assert (dest / "usr/bin/python3").stat().st_uid == os.getuid()


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2"])
def test_compressed_archives_unpack(tmp_path: Path, mode: str) -> None:
    archive = make_tar(tmp_path / "a.tar", [reg("etc/marker", b"hello")], mode)
    unpack(archive, tmp_path / "root")
    assert (tmp_path / "root/etc/marker").read_bytes() == b"hello"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_link_targets_unpack(tmp_path: Path, fmt: int) -> None:
    deep = "/".join(["a" * 99] * 8)  # past ustar's 100 and 155 bytes: GNU long names, or pax
    archive = make_tar(
        tmp_path / "long.tar",
        [reg(f"{deep}/file", b"x"), link("l", f"{deep}/file"), hard("h", f"{deep}/file")],
        fmt=fmt,
    )
    unpack(archive, tmp_path / "root")
    assert (tmp_path / "root/l").read_bytes() == b"x" and (tmp_path / "root/h").read_bytes() == b"x"


def test_device_nodes_and_fifos_are_skipped_and_counted(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "dev.tar",
        [
            special("dev/null", tarfile.CHRTYPE),
            special("dev/sda", tarfile.BLKTYPE),
            special("run/fifo", tarfile.FIFOTYPE),
            reg("etc/ok", b"ok"),
        ],
    )
    result = unpack(archive, tmp_path / "root")
    assert result.skipped_devices == 3
    assert not (tmp_path / "root/dev/null").exists() and not (tmp_path / "root/run/fifo").exists()
    assert (tmp_path / "root/etc/ok").read_bytes() == b"ok"


def test_setuid_setgid_and_ownership_are_not_taken_from_the_archive(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "suid.tar",
        [
            reg("bin/su", b"x", 0o4755, uid=0, gid=0, uname="root"),
            reg("bin/wall", b"x", 0o2755, uid=12345, gid=54321),
            reg("bin/sticky", b"x", 0o1755),
            folder("shared", 0o2775),
            folder("tmp", 0o3777),
        ],
    )
    dest = tmp_path / "root"
    unpack(archive, dest)
    for name in ("bin/su", "bin/wall", "bin/sticky"):
        st = (dest / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o755, name
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE((dest / "shared").stat().st_mode) == 0o775  # setgid gone
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777  # setgid gone, sticky kept


# -- safetar: what is refused --------------------------------------------------------------------

REFUSALS: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes]], str]] = {
    "dotdot": ([reg("../x", b"evil")], "'..'"),
    "dotdot inside": ([reg("usr/../../x", b"evil")], "'..'"),
    "absolute": ([reg("/tmp/x", b"evil")], "absolute"),
    "empty name": ([reg("", b"evil")], "empty"),
    "symlink out": ([link("up", "../../..")], "points outside the image"),
    "absolute symlink above the root": ([link("up", "/../etc")], "points outside the image"),
    "a file through a symlink": ([link("evil", "/etc"), reg("evil/passwd", b"root::0:0")], "a symbolic link"),
    "a folder through a symlink": ([link("evil", "."), folder("evil/x")], "a symbolic link"),
    "hardlink out": ([hard("h", "../../outside/victim")], "'..'"),
    "hardlink absolute": ([hard("h", "/etc/passwd")], "absolute"),
    "hardlink to a missing member": ([hard("h", "nope")], "no such file earlier"),
    "hardlink to a symlink": ([link("s", "/etc/passwd"), hard("h", "s")], "a symbolic link, not a regular file"),
    "hardlink to a folder": ([folder("d"), hard("h", "d")], "a folder, not a regular file"),
    "hardlink to a later member": ([hard("h", "f"), reg("f", b"x")], "no such file earlier"),
    "a name twice": ([reg("a", b"1"), reg("a", b"2")], "appears twice"),
    "a symlink replaced by a file": ([link("a", "/etc/passwd"), reg("a", b"x", 0o4777)], "appears twice"),
    "a file under a file": ([reg("a", b"1"), reg("a/b", b"2")], "a file in the archive"),
    "a file under a device": ([special("d", tarfile.CHRTYPE), reg("d/b", b"2")], "a device in the archive"),
    "unknown type": ([link("v", "", b"V")], "unsupported type"),
    "too deep": ([reg("/".join(["d"] * 65), b"x")], "deeper than 64"),
    "component too long": ([reg("d/" + "x" * 256, b"x")], "longer than 255"),
    "name too long": ([reg("/".join(["x" * 200] * 6), b"x")], "longer than 1024"),
    "symlink target too long": ([link("l", "a/" * 600)], "longer than 1024"),
    # CVE-2025-4138 and 4330 style: every link looks fine on its own, not once resolved
    "links through links": (
        [folder("d/e"), link("d/e/up", "../.."), link("x", "d/e/up/..")],
        "resolves outside the image through other links",
    ),
    "a link to the root, then up": ([link("a/b", "/"), link("c", "a/b/..")], "resolves outside"),
    "the link made later": ([link("c", "a/b/.."), link("a/b", "/")], "resolves outside"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_archives_are_refused_and_leave_nothing(tmp_path: Path, outside: Path, case: str) -> None:
    members, reason = REFUSALS[case]
    archive = make_tar(tmp_path / "bad.tar", members)
    message = refused(archive, tmp_path / "root")
    assert reason in message
    assert str(tmp_path) not in message
    assert_untouched(outside)


def test_absolute_symlinks_to_host_files_are_made_but_never_followed(tmp_path: Path, outside: Path) -> None:
    """CVE-2024-12718 style: a link to a host file, then members that would write or chmod it."""
    victim = str(outside / "victim")  # absolute: inside the image, "/<tmp>/outside/victim" there
    archive = make_tar(tmp_path / "meta.tar", [link("s", victim), reg("s", b"pwned", 0o777)])
    assert "appears twice" in refused(archive, tmp_path / "root")
    archive = make_tar(tmp_path / "ok.tar", [link("s", victim), folder(".", 0o777)])
    unpack(archive, tmp_path / "root")
    assert os.readlink(tmp_path / "root/s") == victim
    assert_untouched(outside)


def test_nul_in_a_pax_name_is_refused(tmp_path: Path) -> None:
    info, data = reg("a", b"x")
    info.pax_headers = {"path": "etc/\x00passwd"}
    assert "NUL" in refused(make_tar(tmp_path / "nul.tar", [(info, data)]), tmp_path / "root")


def test_path_max_tricks_of_cve_2025_4517_are_refused(tmp_path: Path, outside: Path) -> None:
    """The published exploit: folders of 247-character names, each reached by a one-letter
    link, until a link's real path passes PATH_MAX and realpath() stops checking; then a link
    climbing out through it, and a file written through that link."""

    def exploit(comp: str) -> list[tuple[tarfile.TarInfo, bytes]]:
        steps = "abcdefghijklmnop"
        members, path = [], ""
        for step in steps:
            members.append(folder(os.path.join(path, comp)))
            members.append(link(os.path.join(path, step), comp))
            path = os.path.join(path, comp)
        linkpath = os.path.join(*steps, "l" * 254)
        members.append(link(linkpath, "../" * len(steps)))
        members.append(link("escape", linkpath + "/" + "../" * 16 + str(outside)))
        members.append(reg("escape/victim", b"pwned"))
        return members

    # as published: the names themselves pass 1024 bytes
    message = refused(make_tar(tmp_path / "poc.tar", exploit("d" * 247)), tmp_path / "root")
    assert "longer than 1024 bytes" in message
    # shorter names: the members that go through the one-letter links are refused
    message = refused(make_tar(tmp_path / "poc2.tar", exploit("d" * 20)), tmp_path / "root")
    assert "a symbolic link in the archive" in message
    assert_untouched(outside)


def test_sparse_members_are_refused(tmp_path: Path) -> None:
    info, data = reg("s", b"x")
    info.type = tarfile.GNUTYPE_SPARSE
    gnu = make_tar(tmp_path / "gnu.tar", [(info, data)], fmt=tarfile.GNU_FORMAT)
    assert "sparse" in refused(gnu, tmp_path / "root")
    info, data = reg("s", b"x")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s"}
    assert "sparse" in refused(make_tar(tmp_path / "pax.tar", [(info, data)]), tmp_path / "root")


def test_pax_headers_that_make_tarfile_backtrack_are_refused_at_once(tmp_path: Path) -> None:
    """CVE-2024-6232: tarfile's pax regexes are quadratic on runs of digits (64 KiB of them take
    seconds to parse); such headers are refused before tarfile sees them."""
    info, data = reg("a", b"x")
    info.pax_headers = {"comment": "1" * 12_000}
    started = time.monotonic()
    assert "run of 12000 digits" in refused(make_tar(tmp_path / "redos.tar", [(info, data)]), tmp_path / "root")
    assert time.monotonic() - started < 1
    info.pax_headers = {"comment": "x" * 20_000}
    assert "larger than 16384" in refused(make_tar(tmp_path / "big.tar", [(info, data)]), tmp_path / "root")


def _patch_header(archive: Path, offset: int, field: slice, value: bytes) -> None:
    """Overwrite a field of the ustar header at `offset`, and fix its checksum."""
    raw = bytearray(archive.read_bytes())
    header = raw[offset : offset + 512]
    header[field] = value
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    raw[offset : offset + 512] = header
    archive.write_bytes(bytes(raw))


def test_negative_sizes_are_refused(tmp_path: Path) -> None:
    """A base-256 negative size sends tarfile backwards (an endless loop: CVE-2025-8194)."""
    archive = make_tar(tmp_path / "neg.tar", [reg("a", b"x" * 600), reg("b", b"y")], fmt=tarfile.USTAR_FORMAT)
    _patch_header(archive, 0, slice(124, 136), b"\xff" * 12)  # -1
    assert "negative size" in refused(archive, tmp_path / "root")


def test_damaged_and_foreign_archives_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    assert "not a tar archive" in refused(junk, tmp_path / "root")
    good = make_tar(tmp_path / "t.tar.gz", [reg("a", os.urandom(200_000))], "w:gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:50_000])
    message = refused(cut, tmp_path / "root")
    assert "damaged" in message or "truncated" in message
    zstd = tmp_path / "z.tar.zst"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 100)
    assert "zstd" in refused(zstd, tmp_path / "root")


def test_too_many_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetar, "MAX_MEMBERS", 10)
    archive = make_tar(tmp_path / "many.tar", [reg(f"f{i}") for i in range(11)])
    assert "more than 10 members" in refused(archive, tmp_path / "root")


class _Writes:
    """Counts the bytes os.write writes (the extractor's only way of writing content)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        real = os.write

        def write(fd: int, data: Any) -> int:
            n = real(fd, data)
            self.total += n
            return n

        monkeypatch.setattr(os, "write", write)


def test_a_bomb_stops_at_the_size_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # one member of 200 MiB of zeros (~200 KiB compressed): refused before anything is written
    zeros = tmp_path / "zeros"
    with open(zeros, "wb") as f:
        f.truncate(200 * MiB)
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(zeros, "zeros")
    zeros.unlink()
    writes = _Writes(monkeypatch)
    message = refused(tmp_path / "bomb.tar.gz", tmp_path / "root", max_bytes=MiB)
    assert f"larger than the limit of {MiB} bytes" in message
    assert writes.total == 0
    # many members, each small: stopped when the bytes written would pass the cap
    chunk = b"\0" * (300 * 1024)
    archive = make_tar(tmp_path / "many.tar.gz", [reg(f"f{i}", chunk) for i in range(50)], "w:gz")
    message = refused(archive, tmp_path / "root", max_bytes=MiB)
    assert "larger than the limit" in message
    assert 0 < writes.total <= MiB


def test_remove_tree_never_follows_links(tmp_path: Path, outside: Path) -> None:
    top = tmp_path / "top"
    (top / "d").mkdir(parents=True)
    os.symlink(outside, top / "d" / "out")
    os.chmod(top / "d", 0o500)
    safetar.remove_tree(top)
    assert not top.exists()
    assert_untouched(outside)


# -- Image.find: the image's links, resolved as the sandbox would ---------------------------------


def test_find_resolves_links_inside_the_image_never_on_the_host(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("#!/bin/sh\n")
    os.chmod(root / "usr/bin/tool", 0o755)
    (root / "usr/bin/data").write_text("not executable")
    os.symlink("usr/bin", root / "bin")
    os.symlink("/usr/bin/tool", root / "usr/bin/alias")
    os.symlink("/", root / "host")  # inside the sandbox, the image's own root
    image = Image(root, "rootfs")
    assert image.find("tool") and image.find("/bin/tool") and image.find("alias")
    assert image.find("/host/host/usr/bin/tool") and image.find("/../../usr/bin/tool")
    assert not image.find("data") and not image.find("/usr/bin/tool/..") and not image.find("missing")
    # /host/bin/sh is the host's /bin/sh only if the host's kernel follows the link: not here
    assert Path("/bin/sh").exists() and not image.find("/host/bin/sh") and not image.find("sh")


def test_an_image_name_is_never_its_path(tmp_path: Path) -> None:
    assert HOST.name == "host" and HOST.root is None
    assert Image(tmp_path, "alpine").name == "alpine"
    with pytest.raises(ValueError):
        Image(tmp_path)


# -- Images ---------------------------------------------------------------------------------------


def rootfs_members(marker: str, size: int = 0) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        reg("usr/bin/tool", b"#!/bin/sh\n", 0o755),
        link("bin", "usr/bin"),
        reg("etc/marker", marker.encode()),
        reg("var/blob", os.urandom(size)),
    ]


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    (d / "plain/usr/bin").mkdir(parents=True)
    (d / "plain/usr/bin/tool").write_text("#!/bin/sh\n")
    os.chmod(d / "plain/usr/bin/tool", 0o755)
    make_tar(d / "alpine.tar.gz", rootfs_members("alpine"), "w:gz")
    make_tar(d / "debian.tar", rootfs_members("debian"))
    make_tar(d / "bad.tar", [reg("../escaped", b"x")])
    make_tar(tmp_path / "elsewhere.tar", rootfs_members("elsewhere"))
    os.symlink("/", d / "evil")
    os.symlink(tmp_path / "elsewhere.tar", d / "linked.tar")
    os.symlink("plain", d / "alias")
    (d / ".hidden").mkdir()
    (d / "README").write_text("not an archive")
    make_tar(d / "twice.tar", rootfs_members("twice"))
    make_tar(d / "twice.tar.xz", rootfs_members("twice"), "w:xz")
    return d


def test_the_cache_and_the_images_folder_must_not_overlap(tmp_path: Path) -> None:
    for cache in (tmp_path, tmp_path / "cache", tmp_path.parent):
        with pytest.raises(ValueError):
            Images(tmp_path, cache, max_image_bytes=MiB, max_cache_bytes=MiB)
    Images(tmp_path, tmp_path / ".cache", max_image_bytes=MiB, max_cache_bytes=MiB)  # hidden: never an image
    Images(tmp_path / "images", tmp_path / "cache", max_image_bytes=MiB, max_cache_bytes=MiB)


def make_images(images_dir: Path | None, tmp_path: Path, **limits: int) -> Images:
    limits.setdefault("max_image_bytes", 64 * MiB)
    limits.setdefault("max_cache_bytes", 1024 * MiB)
    return Images(images_dir, tmp_path / "cache", **limits)


def not_allowed(exc: pytest.ExceptionInfo[errors.InvalidArgument], tmp_path: Path) -> str:
    err = exc.value
    assert err.reason == "IMAGE_NOT_ALLOWED" and "image" in err.fields
    assert str(tmp_path) not in err.message and "/home" not in err.message
    return err.message


class Counting:
    """Wraps a function, counting its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.calls = 0
        real = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


async def test_host_is_the_empty_name_and_host(tmp_path: Path, images_dir: Path) -> None:
    images = make_images(images_dir, tmp_path)
    assert await images.resolve("") is HOST and await images.resolve("host") is HOST
    assert (await images.available())[:1] == ["host"]


@pytest.mark.parametrize(
    "name",
    ["/", "/home", "../..", "..", ".", ".hidden", "a/b", "plain/", "x" * 129, "evil", "linked", "linked.tar", "alias"],
)
async def test_paths_links_and_hidden_entries_are_not_images(tmp_path: Path, images_dir: Path, name: str) -> None:
    images = make_images(images_dir, tmp_path)
    with pytest.raises(errors.InvalidArgument) as exc:
        await images.resolve(name)
    message = not_allowed(exc, tmp_path)
    assert "/" not in message  # no path at all, not even the one asked for
    assert "alpine" in message or "symbolic link" in message  # says what there is, or why not
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


async def test_unknown_ambiguous_and_unsafe_images_are_refused(tmp_path: Path, images_dir: Path) -> None:
    images = make_images(images_dir, tmp_path)
    with pytest.raises(errors.InvalidArgument) as exc:
        await images.resolve("ubuntu")
    message = not_allowed(exc, tmp_path)
    assert "no image 'ubuntu'" in message
    for name in ("host", "alpine", "debian", "plain", "twice"):
        assert name in message
    assert "evil" not in message and "hidden" not in message and "README" not in message
    with pytest.raises(errors.InvalidArgument) as exc:
        await images.resolve("twice")
    assert "ambiguous" in not_allowed(exc, tmp_path)
    assert (await images.resolve("twice.tar.xz")).name == "twice.tar.xz"
    for name in ("bad", "README"):
        with pytest.raises(errors.InvalidArgument) as exc:
            await images.resolve(name)
        not_allowed(exc, tmp_path)
    assert not (images_dir.parent / "escaped").exists()
    no_dir = make_images(None, tmp_path)
    with pytest.raises(errors.InvalidArgument) as exc:
        await no_dir.resolve("alpine")
    assert 'only "host"' in not_allowed(exc, tmp_path)


async def test_a_rootfs_folder_and_an_archive_resolve(tmp_path: Path, images_dir: Path) -> None:
    images = make_images(images_dir, tmp_path)
    plain = await images.resolve("plain")
    assert plain.root == images_dir / "plain" and plain.name == "plain" and plain.find("tool")
    alpine = await images.resolve("alpine")
    full = await images.resolve("alpine.tar.gz")
    digest = hashlib.sha256((images_dir / "alpine.tar.gz").read_bytes()).hexdigest()
    assert alpine.root == full.root == tmp_path / "cache" / digest
    assert (alpine.name, full.name) == ("alpine", "alpine.tar.gz")
    assert alpine.root is not None and (alpine.root / "etc/marker").read_text() == "alpine"
    assert alpine.find("tool") and alpine.find("/bin/tool")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [digest, f"{digest}.json"]
    assert await images.available() == ["host", "alpine", "bad", "debian", "plain", "twice"]


async def test_archives_are_hashed_once_and_unpacked_once(
    tmp_path: Path, images_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes = Counting(monkeypatch, images_mod, "_sha256")
    unpacks = Counting(monkeypatch, safetar, "unpack")
    images = make_images(images_dir, tmp_path)
    roots = []

    async def resolve() -> None:
        roots.append((await images.resolve("debian")).root)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(resolve)
    assert len(set(roots)) == 1 and len(roots) == 5
    assert (hashes.calls, unpacks.calls) == (1, 1)
    await images.resolve("debian")
    assert (hashes.calls, unpacks.calls) == (1, 1)
    os.utime(images_dir / "debian.tar")  # changed (as far as its stat says): hashed again, same content
    await images.resolve("debian")
    assert (hashes.calls, unpacks.calls) == (2, 1)


async def test_a_refused_archive_stays_refused_without_unpacking_again(
    tmp_path: Path, images_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unpacks = Counting(monkeypatch, safetar, "unpack")
    images = make_images(images_dir, tmp_path)
    messages = []
    for _ in range(3):
        with pytest.raises(errors.InvalidArgument) as exc:
            await images.resolve("bad")
        messages.append(not_allowed(exc, tmp_path))
    assert unpacks.calls == 1 and len(set(messages)) == 1 and "'..'" in messages[0]
    assert list((tmp_path / "cache").iterdir()) == []


async def test_an_archive_over_the_image_cap_is_refused(tmp_path: Path, images_dir: Path) -> None:
    make_tar(images_dir / "fat.tar.gz", rootfs_members("fat", 2 * MiB), "w:gz")
    images = make_images(images_dir, tmp_path, max_image_bytes=MiB)
    with pytest.raises(errors.InvalidArgument) as exc:
        await images.resolve("fat")
    assert f"larger than the limit of {MiB} bytes" in not_allowed(exc, tmp_path)
    assert list((tmp_path / "cache").iterdir()) == []


async def test_the_cache_evicts_unheld_images_least_recently_used_first(
    tmp_path: Path, captured_logs: list[dict[str, Any]]
) -> None:
    d = tmp_path / "images"
    d.mkdir()
    for name in "abcde":
        make_tar(d / f"{name}.tar", rootfs_members(name, 100_000))
    images = make_images(d, tmp_path, max_cache_bytes=250_000)  # two images fit, not three

    def cached() -> set[str]:
        return {p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".json")}

    a = await images.resolve("a")
    images.hold(a)
    b = await images.resolve("b")
    assert len(cached()) == 2
    c = await images.resolve("c")  # over: b, the least recently used one not held, goes
    assert a.root is not None and b.root is not None and c.root is not None
    assert cached() == {a.root.name, c.root.name} and not b.root.exists()
    assert (a.root / "etc/marker").read_text() == "a"
    images.release(a)
    await images.resolve("c")  # used again: a is now the least recently used
    d_ = await images.resolve("d")
    assert d_.root is not None and cached() == {c.root.name, d_.root.name}
    # everything held: kept, over the limit, with a warning
    images.hold(c)
    images.hold(d_)
    e = await images.resolve("e")
    assert e.root is not None and cached() == {c.root.name, d_.root.name, e.root.name}
    assert any("over its limit" in entry["event"] for entry in captured_logs)
    # released: the next resolve brings the cache back under its limit
    images.release(c)
    images.release(d_)
    again = await images.resolve("b")  # unpacked again; the two least recently used go
    assert again.root is not None and cached() == {e.root.name, again.root.name}
    assert (again.root / "etc/marker").read_text() == "b"
    assert not list((tmp_path / "cache").glob(".*"))


async def test_clean_removes_what_a_crash_left_and_keeps_complete_images(
    tmp_path: Path, images_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_images(images_dir, tmp_path)
    debian = await first.resolve("debian")
    assert debian.root is not None
    cache = tmp_path / "cache"
    (cache / ".unpack-0123456789abcdef-00000000/usr/lib").mkdir(parents=True)
    (cache / ".unpack-0123456789abcdef-00000000/usr/lib/half").write_text("x")
    os.chmod(cache / ".unpack-0123456789abcdef-00000000/usr", 0o500)
    (cache / ".unpack-0123456789abcdef-00000000.json").write_text("{}")
    (cache / ".evict-fedcba9876543210-00000000/etc").mkdir(parents=True)
    noteless = cache / ("e" * 64)
    (noteless / "etc").mkdir(parents=True)  # renamed into place, then a crash before its note
    (cache / f"{'f' * 64}.json").write_text('{"format": 1, "bytes": 5}')  # a note without its image
    (cache / "operator-notes.txt").write_text("not ours: left alone")

    unpacks = Counting(monkeypatch, safetar, "unpack")
    second = make_images(images_dir, tmp_path)
    removed = await second.clean()
    assert sorted(p.name for p in removed) == sorted(
        [
            ".evict-fedcba9876543210-00000000",
            ".unpack-0123456789abcdef-00000000",
            ".unpack-0123456789abcdef-00000000.json",
            "e" * 64,
            f"{'f' * 64}.json",
        ]
    )
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [debian.root.name, f"{debian.root.name}.json", "operator-notes.txt"]
    )
    assert await second.clean() == []
    again = await second.resolve("debian")  # the complete one is used as it is
    assert again.root == debian.root and unpacks.calls == 0
