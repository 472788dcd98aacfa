"""How a command becomes a sandboxed process: the argv for bubblewrap (or for no sandbox at all).

Every sandbox gets new pid, ipc, uts, mount, user and (unless network is asked for) network
namespaces, `--die-with-parent` (it cannot outlive quilt), all capabilities dropped, no new
privileges, no new user namespaces (`--disable-userns` and the seccomp filter), a fresh /proc and
/dev, a /tmp and /workspace of its container, and a read-only view of its image. The command is
pid 1 of its namespace (`--as-pid-1`), so killing it kills everything it started. When Quilt runs
as root, bubblewrap runs as the unprivileged sandbox user, never as root.

A small /bin/sh wrapper runs first, outside the sandbox: it joins the container's cgroups (or sets
rlimits) and then execs bubblewrap, so the limits hold from the start.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aria_trio.quilt.limits import Cgroup, LimitsMode
from aria_trio.quilt.stage import Stage

BWRAP_INSTALL_HINT = (
    "bubblewrap (bwrap) is not installed; quilt needs it to sandbox containers. Install it with "
    "`sudo apt-get install bubblewrap` (Debian, Ubuntu), `sudo dnf install bubblewrap` (Fedora) or "
    "`sudo pacman -S bubblewrap` (Arch); `./dev` installs it when run as root. Or start quilt with "
    "--sandbox=none to run commands without any isolation."
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# What the "host" image shows of the host, read-only: the programs and libraries, and the few
# files of /etc that programs need to run (the dynamic loader's cache, certificates, users).
HOST_TOP = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
HOST_ETC = (
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "localtime",
    "mime.types",
)
NETWORK_ETC = ("resolv.conf", "gai.conf", "host.conf", "services", "protocols")

_WRAPPER = r"""
while [ "$1" != "--" ]; do
  case "$1" in
    cg=*) echo $$ > "${1#cg=}" || { echo "quilt: cannot join cgroup ${1#cg=}" >&2; exit 125; } ;;
    as=*) ulimit -v "${1#as=}" || exit 125 ;;
    nproc=*) ulimit -u "${1#nproc=}" || exit 125 ;;
  esac
  shift
done
shift
exec "$@"
"""


@dataclass(frozen=True)
class Image:
    """What a sandbox's root shows: the host view, or a rootfs folder.

    `name` is what clients see ("host", or the image's name in the operator's images folder,
    such as "alpine"); `root` is a host path, for the sandbox's mounts only: never put it in a
    message."""

    root: Path | None  # None: the host view
    name: str = "host"

    def __post_init__(self) -> None:
        if self.root is not None and self.name == "host":
            raise ValueError("a rootfs image needs a name of its own")

    def find(self, program: str, path: str = DEFAULT_PATH) -> bool:
        """Is `program` there (an absolute path, or a name found on PATH) inside the image?"""
        candidates = [program] if "/" in program else [f"{d}/{program}" for d in path.split(":") if d]
        for c in candidates:
            if self.root is None:
                if any(c.startswith(f"/{top}/") for top in HOST_TOP) and _exists_in(Path("/"), Path(c)):
                    return True  # the host's own paths, as the sandbox sees them
            elif self._executable_in(self.root, c):
                return True
        return False

    @staticmethod
    def _executable_in(root: Path, path: str) -> bool:
        """Is `path` an executable file in the rootfs `root`, its symlinks resolved as the
        sandbox would (absolute ones from `root`, `..` stopping at it)? No symlink is followed on
        the host: each component is looked at with lstat, under components already found to be
        real folders, so a link in the image (`usr -> /`) cannot make this look at the host."""
        import stat  # here, not at the top: only this class of the module is this change's
        from collections import deque

        here: list[str] = []
        todo = deque(path.split("/") if path.startswith("/") else ["", *path.split("/")])
        hops = 0
        try:
            st = os.lstat(root)
            while todo:
                name = todo.popleft()
                if name in ("", "."):
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    return False  # a component after a file: ENOTDIR
                if name == "..":
                    if here:
                        here.pop()
                        st = os.lstat(root.joinpath(*here))
                    continue
                st = os.lstat(root.joinpath(*here, name))
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > 40:
                        return False  # ELOOP
                    link = os.readlink(root.joinpath(*here, name))
                    if link.startswith("/"):
                        here = []
                    st = os.lstat(root.joinpath(*here))
                    todo.extendleft(reversed(link.split("/")))
                    continue
                here.append(name)
            return stat.S_ISREG(st.st_mode) and os.access(root.joinpath(*here), os.X_OK)
        except (OSError, ValueError):  # not there (ENOENT), or a NUL in the name
            return False


def _exists_in(root: Path, target: Path) -> bool:
    """target exists and is executable, resolving symlinks as if `root` were /."""
    for _ in range(40):
        try:
            if not target.is_symlink():
                return target.is_file() and os.access(target, os.X_OK)
            link = os.readlink(target)
        except OSError:
            return False
        target = (root / link.lstrip("/")) if link.startswith("/") else (target.parent / link)
    return False


@dataclass(frozen=True)
class Sandbox:
    """The daemon's way of running things: bubblewrap, or nothing ("none", when asked for).

    `user` (set when Quilt runs as root): the unprivileged uid:gid bubblewrap runs as, so no
    sandbox is ever root on the host (inside, it is `nobody`); `stage` is where that user's
    bubblewrap finds Quilt's folders (quilt/stage.py). `seccomp` is the filter every sandbox gets
    (quilt/seccomp.py), `hidden` the host paths no sandbox may see even where the host view would
    show them (the daemons' sockets and data folders, if they live under /usr, say).
    """

    kind: str  # "bubblewrap" or "none"
    limits: LimitsMode
    bwrap: str | None = None
    user: tuple[int, int] | None = None
    stage: Stage | None = None
    seccomp: Path | None = None
    disable_userns: bool = False  # bubblewrap 0.8+: no user namespace inside, besides the filter
    hidden: tuple[Path, ...] = ()

    @classmethod
    def detect(cls, kind: str, limits: LimitsMode) -> Sandbox:
        if kind == "none":
            return cls("none", limits)
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise FileNotFoundError(BWRAP_INSTALL_HINT)
        return cls("bubblewrap", limits, bwrap, disable_userns=_bwrap_version(bwrap) >= (0, 8))

    def source(self, path: Path) -> str:
        """A host path as bubblewrap finds it (on the stage, when it runs as the sandbox user)."""
        return str(self.stage.path(path)) if self.stage is not None else str(path)

    def argv(
        self,
        command: Sequence[str],
        *,
        image: Image,
        workspace: Path | None,
        tmp: Path | None,
        workdir: str,
        env: Mapping[str, str],
        network: bool,
        hostname: str,
        cgroup: Cgroup | None,
        memory_bytes: int,
        pids: int,
        ro_binds: Sequence[tuple[Path, str]] = (),
        scratch_bytes: int = 0,
    ) -> list[str]:
        """The whole argv: wrapper, sandbox, command. `{info_fd}` stands for the descriptor on
        which bubblewrap reports the sandbox's pid, `{seccomp_fd}` for one of the filter's file
        (quilt.process fills both in). `workspace`/`tmp` None: a tmpfs of `scratch_bytes` each,
        the sandbox's own (a tool run's)."""
        wrap = ["/bin/sh", "-c", _WRAPPER, "quilt-spawn"]
        if cgroup is not None and cgroup.dirs:
            wrap += [f"cg={p}" for p in cgroup.procs_files]
        elif memory_bytes or pids:
            wrap += [f"as={max(1, memory_bytes // 1024)}", f"nproc={pids}"]
        wrap.append("--")
        if self.kind == "none":
            # No isolation at all: the command runs as the daemon's user, in the workspace.
            return [*wrap, "setpriv", "--pdeathsig", "KILL", "--", *command]
        assert self.bwrap is not None
        if self.user is not None:  # root: bubblewrap (and all below it) as the sandbox user
            uid, gid = self.user
            wrap += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        args = [
            self.bwrap,
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--as-pid-1",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            hostname,
        ]
        if self.user is not None:
            args += ["--uid", str(NOBODY), "--gid", str(NOBODY)]
        if self.disable_userns:
            args.append("--disable-userns")
        if not network:
            args.append("--unshare-net")
        args += ["--info-fd", "{info_fd}"]
        if self.seccomp is not None:
            args += ["--seccomp", "{seccomp_fd}"]
        args += _root_view(image, network, self)
        args += ["--proc", "/proc", "--dev", "/dev"]
        for place, folder in (("/tmp", tmp), ("/workspace", workspace)):
            if folder is None:
                args += ["--perms", "1777" if place == "/tmp" else "0755", "--size", str(scratch_bytes)]
                args += ["--tmpfs", place]
            else:
                args += ["--bind", self.source(folder), place]
        for src, dst in ro_binds:
            args += ["--ro-bind", self.source(src), dst]
        args += ["--clearenv"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        args += ["--chdir", workdir, "--", *command]
        return [*wrap, *args]


NOBODY = 65534  # the uid and gid a sandbox has inside when Quilt runs as root


def _bwrap_version(bwrap: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
        return tuple(int(x) for x in out.split()[-1].split("."))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return (0,)


def _root_view(image: Image, network: bool, sandbox: Sandbox) -> list[str]:
    """The image's top-level entries, read-only, on the sandbox's own (tmpfs) root: that root
    stays writable for the mount points of /proc, /dev, /tmp and /workspace. In the host view,
    a hidden path that lies in a bound folder is covered (an empty tmpfs, or /dev/null)."""
    args: list[str] = []
    if image.root is not None:
        for entry in sorted(image.root.iterdir()):
            target = f"/{entry.name}"
            if target in ("/proc", "/dev", "/tmp", "/workspace"):
                continue
            if entry.is_symlink():
                args += ["--symlink", os.readlink(entry), target]
            else:
                args += ["--ro-bind", sandbox.source(entry), target]
        return args
    bound: list[Path] = []
    for top in HOST_TOP:
        path = Path("/") / top
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
            bound.append(path)
    for name in HOST_ETC + (NETWORK_ETC if network else ()):
        path = Path("/etc") / name
        if path.exists():
            args += ["--ro-bind", str(path), str(path)]
            bound.append(path)
    covered: list[Path] = []
    for real in sorted({h.resolve() for h in sandbox.hidden}, key=lambda p: len(p.parts)):
        if any(c == real or c in real.parents for c in covered):
            continue  # inside one covered already
        if real.exists() and any(real == b or b in real.parents for b in bound) and _reachable(real, sandbox.user):
            args += ["--tmpfs", str(real)] if real.is_dir() else ["--ro-bind", "/dev/null", str(real)]
            covered.append(real)
    return args


def _reachable(path: Path, user: tuple[int, int] | None) -> bool:
    """Could the sandbox user get to `path` through its folders? (If not, the kernel keeps it out
    already, and bubblewrap, as that user, could not even cover it.) The daemon's own user, when
    not root, can get anywhere it can."""
    if user is None:
        return True
    uid, gid = user
    for folder in reversed(path.parents):
        st = os.stat(folder)
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def base_env(spec_env: Mapping[str, str]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/workspace", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
    env.update(spec_env)
    return env
