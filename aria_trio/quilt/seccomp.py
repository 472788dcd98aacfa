"""The seccomp filter of Quilt's sandboxes: the system calls a sandboxed command may not make.

Why: bubblewrap gives a sandbox its own namespaces and drops every capability, but the whole kernel
is still there to call. Some calls undo the sandbox (a new user namespace gives back every
capability, and with it mount, pivot_root...); others are large or unnamespaced kernel surfaces (the
keyring, eBPF, perf events, io_uring, ptrace, the clock, modules). In the spirit of Docker's default
profile, the filter lets everything through except those, which fail with EPERM (clone3 with
ENOSYS, so libc falls back to clone, whose flags the filter can see): programs get a clean error,
not a kill. `DENIED` lists them, each with its reason.

How bubblewrap uses it: `bwrap --seccomp FD` reads the raw program (an array of `struct
sock_filter`, 8 bytes each) from FD up to its end, closes FD, and loads the filter as its very last
step before exec'ing the command (with no_new_privs, which bubblewrap always sets): its own set-up
(namespaces, mounts) is unaffected, and the command and everything it starts are filtered for good.
Give every bwrap a descriptor of its own at offset 0, for instance `os.open()` of the file `write()`
made, passed with `pass_fds` and closed in the parent once bwrap has started: bwrap reads to the end,
so a descriptor shared by two spawns would leave the second an empty program.

The program is classic BPF, generated here (not with libseccomp, whose rules cannot say "personality
except these values" in a default-allow filter, nor name, for i386, a call newer than the installed
libseccomp knows). It checks the architecture first: on an x86_64 host it has rules for x86_64 and
for i386 (int 0x80, 32-bit programs: the same rules), and refuses every x32 call (nr with bit 30
set) with ENOSYS, as a kernel without x32 does; on aarch64, rules for aarch64 and 32-bit arm. Every
other architecture is killed (it cannot occur on those hosts). Argument checks look at the low 32
bits only, which is all the kernel uses of those arguments (ioctl's cmd and personality's are
`unsigned int`, clone takes the lower 32 bits of its flags, unshare fails on any high bit), so high
bits set are no way around.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

__all__ = ["DENIED", "program", "write"]

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }, little-endian
_NR = 0
_ARCH = 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index


_X32_SYSCALL_BIT = 0x40000000
_AUDIT_ARCH = {"x86_64": 0xC000003E, "i386": 0x40000003, "aarch64": 0xC00000B7, "arm": 0x40000028}
_HOSTS = {"x86_64": ("x86_64", "i386"), "aarch64": ("aarch64", "arm")}  # os.uname().machine -> arches

_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000

# classic BPF opcodes (linux/bpf_common.h)
_LD_W_ABS = 0x20
_JA = 0x05
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

_CLONE_NEWTIME = 0x00000080
_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
# clone's low byte is the exit signal: CLONE_NEWTIME (0x80) can only be asked of unshare and clone3
_CLONE_NEW = (
    _CLONE_NEWNS | _CLONE_NEWCGROUP | _CLONE_NEWUTS | _CLONE_NEWIPC | _CLONE_NEWUSER | _CLONE_NEWPID | _CLONE_NEWNET
)
_UNSHARE_NEW = _CLONE_NEW | _CLONE_NEWTIME

_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C
_AF_ALG = 38
_AF_VSOCK = 40
_SYS_SOCKET = 1  # socketcall's call number for socket()
# Docker's: PER_LINUX, PER_LINUX32, UNAME26, UNAME26 | PER_LINUX32, and 0xffffffff (only asks)
_PERSONALITIES = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)

# The calls' numbers: x86_64, i386, aarch64, arm (None: no such call there). From the kernel's syscall
# tables; the tests compare them with libseccomp's.
_NUMBERS: dict[str, tuple[int | None, int | None, int | None, int | None]] = {
    "unshare": (272, 310, 97, 337),
    "clone": (56, 120, 220, 120),
    "clone3": (435, 435, 435, 435),
    "setns": (308, 346, 268, 375),
    "mount": (165, 21, 40, 21),
    "umount": (None, 22, None, None),
    "umount2": (166, 52, 39, 52),
    "pivot_root": (155, 217, 41, 218),
    "chroot": (161, 61, 51, 61),
    "open_tree": (428, 428, 428, 428),
    "move_mount": (429, 429, 429, 429),
    "fsopen": (430, 430, 430, 430),
    "fsconfig": (431, 431, 431, 431),
    "fsmount": (432, 432, 432, 432),
    "fspick": (433, 433, 433, 433),
    "mount_setattr": (442, 442, 442, 442),
    "open_tree_attr": (467, 467, 467, 467),  # kernel 6.15; libseccomp 2.5.4 does not know it
    "keyctl": (250, 288, 219, 311),
    "add_key": (248, 286, 217, 309),
    "request_key": (249, 287, 218, 310),
    "bpf": (321, 357, 280, 386),
    "perf_event_open": (298, 336, 241, 364),
    "ptrace": (101, 26, 117, 26),
    "process_vm_readv": (310, 347, 270, 376),
    "process_vm_writev": (311, 348, 271, 377),
    "process_madvise": (440, 440, 440, 440),
    "pidfd_getfd": (438, 438, 438, 438),
    "kcmp": (312, 349, 272, 378),
    "userfaultfd": (323, 374, 282, 388),
    "io_uring_setup": (425, 425, 425, 425),
    "io_uring_enter": (426, 426, 426, 426),
    "io_uring_register": (427, 427, 427, 427),
    "open_by_handle_at": (304, 342, 265, 371),
    "name_to_handle_at": (303, 341, 264, 370),
    "init_module": (175, 128, 105, 128),
    "finit_module": (313, 350, 273, 379),
    "delete_module": (176, 129, 106, 129),
    "kexec_load": (246, 283, 104, 347),
    "kexec_file_load": (320, None, 294, 401),
    "reboot": (169, 88, 142, 88),
    "swapon": (167, 87, 224, 87),
    "swapoff": (168, 115, 225, 115),
    "acct": (163, 51, 89, 51),
    "quotactl": (179, 131, 60, 131),
    "quotactl_fd": (443, 443, 443, 443),
    "settimeofday": (164, 79, 170, 79),
    "stime": (None, 25, None, None),
    "clock_settime": (227, 264, 112, 262),
    "clock_settime64": (None, 404, None, 404),
    "clock_adjtime": (305, 343, 266, 372),
    "clock_adjtime64": (None, 405, None, 405),
    "adjtimex": (159, 124, 171, 124),
    "iopl": (172, 110, None, None),
    "ioperm": (173, 101, None, None),
    "syslog": (103, 103, 116, 103),
    "lookup_dcookie": (212, 253, 18, 249),
    "sethostname": (170, 74, 161, 74),
    "setdomainname": (171, 121, 162, 121),
    "vhangup": (153, 111, 58, 111),
    "fanotify_init": (300, 338, 262, 367),
    "mbind": (237, 274, 235, 319),
    "set_mempolicy": (238, 276, 237, 321),
    "set_mempolicy_home_node": (450, 450, 450, 450),
    "get_mempolicy": (239, 275, 236, 320),
    "migrate_pages": (256, 294, 238, 400),
    "move_pages": (279, 317, 239, 344),
    "uselib": (134, 86, None, 86),
    "ustat": (136, 62, None, 62),
    "sysfs": (139, 135, None, 135),
    "_sysctl": (156, 149, None, 149),
    "vm86": (None, 166, None, None),
    "vm86old": (None, 113, None, None),
    "personality": (135, 136, 92, 136),
    "ioctl": (16, 54, 29, 54),
    "socket": (41, 359, 198, 281),  # i386: the direct call (kernel 4.3); libseccomp folds it into socketcall
    "socketcall": (None, 102, None, None),
}
_COLUMN = {"x86_64": 0, "i386": 1, "aarch64": 2, "arm": 3}


@dataclass(frozen=True)
class _Refuse:
    """What the filter does with one call: refuse it always, or when its argument `arg` (the low 32
    bits of it) has one of `flags`, is one of `values`, or is none of `unless`."""

    reason: str
    errno: int = errno.EPERM
    arg: int | None = None
    flags: int = 0
    values: tuple[int, ...] = ()
    unless: tuple[int, ...] = ()


_MOUNTS = "no changing the file system view bubblewrap set up"
_NEW_MOUNT_API = "the new mount API: " + _MOUNTS
_KEYS = "the kernel keyring is not namespaced"
_MEMORY = "no access to other processes' memory"
_MODULES = "no kernel modules"
_KEXEC = "no booting another kernel"
_SWAP = "the machine's swap"
_QUOTAS = "the machine's disk quotas"
_CLOCK = "the system clock is not namespaced"
_CLOCK_READ = _CLOCK + " (refused even to read it, which Docker allows)"
_IO_PORTS = "no I/O ports"
_HOSTNAME = "the host name is quilt's to set"
_NUMA = "NUMA memory policy (Docker: only with CAP_SYS_NICE)"
_IO_URING = "io_uring: a large kernel surface (Docker refuses it too); programs fall back to plain I/O"
_OBSOLETE = "obsolete"
_VM86 = "obsolete (i386's virtual 8086 mode)"

_RULES: dict[str, _Refuse] = {
    # The argument checks first: those calls are frequent, and the filter tests the list in order.
    "ioctl": _Refuse("TIOCSTI and TIOCLINUX only: no typing into a terminal", arg=1, values=(_TIOCSTI, _TIOCLINUX)),
    "clone": _Refuse("with a CLONE_NEW* flag only: no new namespaces (threads, fork: fine)", arg=0, flags=_CLONE_NEW),
    "socket": _Refuse(
        "AF_VSOCK (it reaches the host or hypervisor, network or not) and AF_ALG (kernel crypto) only",
        arg=0,
        values=(_AF_VSOCK, _AF_ALG),
    ),
    "socketcall": _Refuse(
        "i386, SYS_SOCKET only: the family is behind a pointer (the direct socket call is checked)",
        arg=0,
        values=(_SYS_SOCKET,),
    ),
    "unshare": _Refuse(
        "with a CLONE_NEW* flag only: no new namespaces, above all no user namespace (every capability back)",
        arg=0,
        flags=_UNSHARE_NEW,
    ),
    "personality": _Refuse(
        "except Docker's values (PER_LINUX, PER_LINUX32, UNAME26, the query 0xffffffff): "
        "no READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE...",
        arg=0,
        unless=_PERSONALITIES,
    ),
    "clone3": _Refuse(
        "ENOSYS, not EPERM: its flags are behind a pointer; libc falls back to clone, whose flags are checked",
        errno=errno.ENOSYS,
    ),
    "setns": _Refuse("no joining other namespaces"),
    "mount": _Refuse(_MOUNTS),
    "umount": _Refuse(_MOUNTS),
    "umount2": _Refuse(_MOUNTS),
    "pivot_root": _Refuse(_MOUNTS),
    "chroot": _Refuse(_MOUNTS),
    "open_tree": _Refuse(_NEW_MOUNT_API),
    "move_mount": _Refuse(_NEW_MOUNT_API),
    "fsopen": _Refuse(_NEW_MOUNT_API),
    "fsconfig": _Refuse(_NEW_MOUNT_API),
    "fsmount": _Refuse(_NEW_MOUNT_API),
    "fspick": _Refuse(_NEW_MOUNT_API),
    "mount_setattr": _Refuse(_NEW_MOUNT_API),
    "open_tree_attr": _Refuse(_NEW_MOUNT_API),
    "keyctl": _Refuse(_KEYS),
    "add_key": _Refuse(_KEYS),
    "request_key": _Refuse(_KEYS),
    "bpf": _Refuse("eBPF: a large kernel surface"),
    "perf_event_open": _Refuse("performance events: a large kernel surface, and side channels"),
    "ptrace": _Refuse("no tracing processes (no debuggers, no strace)"),
    "process_vm_readv": _Refuse(_MEMORY),
    "process_vm_writev": _Refuse(_MEMORY),
    "process_madvise": _Refuse(_MEMORY),
    "pidfd_getfd": _Refuse("no taking other processes' file descriptors"),
    "kcmp": _Refuse("no comparing other processes' kernel objects"),
    "userfaultfd": _Refuse("a classic tool for winning kernel races"),
    "io_uring_setup": _Refuse(_IO_URING),
    "io_uring_enter": _Refuse(_IO_URING),
    "io_uring_register": _Refuse(_IO_URING),
    "open_by_handle_at": _Refuse("opens files by handle, around the mount view (the 'shocker' escape)"),
    "name_to_handle_at": _Refuse("the other half of open_by_handle_at"),
    "init_module": _Refuse(_MODULES),
    "finit_module": _Refuse(_MODULES),
    "delete_module": _Refuse(_MODULES),
    "kexec_load": _Refuse(_KEXEC),
    "kexec_file_load": _Refuse(_KEXEC),
    "reboot": _Refuse("no rebooting the machine"),
    "swapon": _Refuse(_SWAP),
    "swapoff": _Refuse(_SWAP),
    "acct": _Refuse("the machine's process accounting"),
    "quotactl": _Refuse(_QUOTAS),
    "quotactl_fd": _Refuse(_QUOTAS),
    "settimeofday": _Refuse(_CLOCK),
    "stime": _Refuse(_CLOCK),
    "clock_settime": _Refuse(_CLOCK),
    "clock_settime64": _Refuse(_CLOCK),
    "clock_adjtime": _Refuse(_CLOCK_READ),
    "clock_adjtime64": _Refuse(_CLOCK_READ),
    "adjtimex": _Refuse(_CLOCK_READ),
    "iopl": _Refuse(_IO_PORTS),
    "ioperm": _Refuse(_IO_PORTS),
    "syslog": _Refuse("the kernel log is the machine's"),
    "lookup_dcookie": _Refuse("kernel profiling"),
    "sethostname": _Refuse(_HOSTNAME),
    "setdomainname": _Refuse(_HOSTNAME),
    "vhangup": _Refuse("no hanging up terminals"),
    "fanotify_init": _Refuse("file-system-wide event monitoring"),
    "mbind": _Refuse(_NUMA),
    "set_mempolicy": _Refuse(_NUMA),
    "set_mempolicy_home_node": _Refuse(_NUMA),
    "get_mempolicy": _Refuse(_NUMA),
    "migrate_pages": _Refuse(_NUMA),
    "move_pages": _Refuse(_NUMA),
    "uselib": _Refuse(_OBSOLETE),
    "ustat": _Refuse(_OBSOLETE),
    "sysfs": _Refuse(_OBSOLETE),
    "_sysctl": _Refuse(_OBSOLETE),
    "vm86": _Refuse(_VM86),
    "vm86old": _Refuse(_VM86),
}

DENIED: Mapping[str, str] = MappingProxyType({name: rule.reason for name, rule in _RULES.items()})


class _Assembler:
    """Instructions with jumps to labels, resolved at the end (conditional jumps reach 255 ahead)."""

    def __init__(self) -> None:
        self._code: list[tuple[int, str | int, str | int, int | str]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        assert name not in self._labels, name
        self._labels[name] = len(self._code)

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        self._code.append((op, jt, jf, k))

    def goto(self, label: str) -> None:
        self._code.append((_JA, 0, 0, label))

    def ret(self, value: int) -> None:
        self._code.append((_RET_K, 0, 0, value))

    def assemble(self) -> bytes:
        def offset(at: int, target: str | int, limit: int) -> int:
            if isinstance(target, int):
                return target
            distance = self._labels[target] - at - 1
            if not 0 <= distance <= limit:
                raise ValueError(f"jump from {at} to {target} out of range ({distance})")
            return distance

        out = bytearray()
        for at, (op, jt, jf, k) in enumerate(self._code):
            if op == _JA:
                out += struct.pack("<HBBI", op, 0, 0, offset(at, k, 0xFFFFFFFF))
            else:
                assert isinstance(k, int)
                out += struct.pack("<HBBI", op, offset(at, jt, 255), offset(at, jf, 255), k)
        return bytes(out)


def _errno(code: int) -> int:
    return _RET_ERRNO | code


def _arch_rules(asm: _Assembler, arch: str) -> None:
    asm.load(_NR)
    if arch == "x86_64":
        asm.jump(_JGE_K, _X32_SYSCALL_BIT, jt=0, jf=1)
        asm.ret(_errno(errno.ENOSYS))
    for name, rule in _RULES.items():
        nr = _NUMBERS[name][_COLUMN[arch]]
        if nr is None:
            continue
        refuse = _errno(rule.errno)
        if rule.arg is None:
            asm.jump(_JEQ_K, nr, jt=0, jf=1)
            asm.ret(refuse)
            continue
        # the call's own block, entered on its number; it always returns, so the next call's test
        # still finds the number in the accumulator
        after, deny, allow = f"{arch}:{name}", f"{arch}:{name}:refuse", f"{arch}:{name}:allow"
        asm.jump(_JEQ_K, nr, jt=0, jf=after)
        asm.load(_arg_low(rule.arg))
        if rule.unless:
            for value in rule.unless:
                asm.jump(_JEQ_K, value, jt=allow)
            asm.ret(refuse)
            asm.label(allow)
            asm.ret(_RET_ALLOW)
        else:
            if rule.flags:
                asm.jump(_JSET_K, rule.flags, jt=deny)
            for value in rule.values:
                asm.jump(_JEQ_K, value, jt=deny)
            asm.ret(_RET_ALLOW)
            asm.label(deny)
            asm.ret(refuse)
        asm.label(after)
    asm.ret(_RET_ALLOW)


def _build(arches: Sequence[str]) -> bytes:
    """The program for these architectures (the first is the host's own)."""
    asm = _Assembler()
    asm.load(_ARCH)
    for arch in arches:
        asm.jump(_JEQ_K, _AUDIT_ARCH[arch], jt=0, jf=1)
        asm.goto(arch)
    asm.ret(_RET_KILL_PROCESS)
    for arch in arches:
        asm.label(arch)
        _arch_rules(asm, arch)
    return asm.assemble()


@functools.cache
def program() -> bytes:
    """The filter for this machine, as bubblewrap's --seccomp reads it (built once)."""
    machine = os.uname().machine
    if machine not in _HOSTS:
        raise RuntimeError(f"no seccomp filter for {machine} (only for {', '.join(_HOSTS)})")
    return _build(_HOSTS[machine])


def write(path: Path) -> None:
    """Write program() to `path` (mode 0644) atomically: a temporary file beside it, renamed."""
    data = program()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
