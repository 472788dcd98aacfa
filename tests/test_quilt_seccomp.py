"""The seccomp filter of Quilt's sandboxes (aria_trio.quilt.seccomp).

Two halves: the program run on a small classic-BPF interpreter, for every architecture it knows
(x86_64 with i386 and x32, aarch64 with arm), and the program loaded by real bubblewrap with the
argv quilt uses, probed from inside the sandbox. Each refused call is also probed without the
filter: it must then behave differently, so the refusal seen is the filter's, not the kernel's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import random
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aria_trio.quilt import seccomp
from aria_trio.quilt.limits import LimitsMode
from aria_trio.quilt.sandbox import Image, Sandbox, base_env

AUDIT_ARCH = {"x86_64": 0xC000003E, "i386": 0x40000003, "aarch64": 0xC00000B7, "arm": 0x40000028}
BUILDS = {
    "x86_64": ("x86_64", "i386"),
    "i386": ("x86_64", "i386"),
    "aarch64": ("aarch64", "arm"),
    "arm": ("aarch64", "arm"),
}
ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
MACHINE = os.uname().machine


def refused(code: int) -> int:
    return 0x00050000 | code


EPERM = refused(errno.EPERM)
ENOSYS = refused(errno.ENOSYS)


def number(name: str, arch: str) -> int | None:
    return seccomp._NUMBERS[name][seccomp._COLUMN[arch]]


# --- the program, interpreted -------------------------------------------------------------------


def run_bpf(program: bytes, arch: str | int, nr: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """What the filter answers for this call (a classic BPF interpreter, for the few opcodes a
    seccomp filter of ours may use: anything else fails the test)."""
    assert len(program) % 8 == 0 and 0 < len(program) // 8 <= 4096
    code = [struct.unpack_from("<HBBI", program, at) for at in range(0, len(program), 8)]
    audit = AUDIT_ARCH[arch] if isinstance(arch, str) else arch
    data = struct.pack("<IIQ6Q", nr & 0xFFFFFFFF, audit, 0x1000, *(a & (2**64 - 1) for a in args))
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == 0x20:  # ld [k]
            assert k % 4 == 0 and k + 4 <= len(data)
            (acc,) = struct.unpack_from("<I", data, k)
        elif op == 0x05:  # ja
            pc += k
        elif op == 0x15:  # jeq
            pc += jt if acc == k else jf
        elif op == 0x35:  # jge
            pc += jt if acc >= k else jf
        elif op == 0x45:  # jset
            pc += jt if acc & k else jf
        elif op == 0x06:  # ret
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x} at {pc - 1}")
        assert pc < len(code), "jumped past the end"


def answer(arch: str, name: str, *args: int) -> int:
    nr = number(name, arch)
    assert nr is not None, (name, arch)
    return run_bpf(seccomp._build(BUILDS[arch]), arch, nr, (*args, *(0,) * (6 - len(args))))


ARCHES = ("x86_64", "i386", "aarch64", "arm")
ALWAYS = [
    (name, arch)
    for name, rule in seccomp._RULES.items()
    if rule.arg is None
    for arch in ARCHES
    if number(name, arch) is not None
]


@pytest.mark.parametrize(("name", "arch"), ALWAYS, ids=[f"{n}-{a}" for n, a in ALWAYS])
def test_every_refused_call_is_refused_with_its_errno_whatever_its_arguments(name, arch):
    expected = refused(seccomp._RULES[name].errno)
    rng = random.Random(name)
    for args in [(0,) * 6, (2**64 - 1,) * 6, tuple(rng.getrandbits(64) for _ in range(6))]:
        assert answer(arch, name, *args) == expected


@pytest.mark.parametrize("arch", ARCHES)
def test_every_other_call_is_allowed(arch):
    program = seccomp._build(BUILDS[arch])
    listed = {number(name, arch) for name in seccomp._RULES}
    rng = random.Random(arch)
    for nr in range(1024):
        if nr not in listed:
            assert run_bpf(program, arch, nr) == ALLOW, nr
            assert run_bpf(program, arch, nr, tuple(rng.getrandbits(64) for _ in range(6))) == ALLOW, nr


def test_clone3_is_enosys_so_that_libc_falls_back_to_clone():
    assert seccomp._RULES["clone3"].errno == errno.ENOSYS
    assert {answer(arch, "clone3") for arch in ARCHES} == {ENOSYS}


@pytest.mark.parametrize("arch", ARCHES)
def test_clone_is_refused_only_with_namespace_flags(arch):
    thread = 0x003D0F00  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    assert answer(arch, "clone", thread) == ALLOW
    assert answer(arch, "clone", 17) == ALLOW  # fork: SIGCHLD
    assert answer(arch, "clone", 0x80 | 17) == ALLOW  # 0x80 is part of the exit signal, not CLONE_NEWTIME
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert answer(arch, "clone", flag | 17) == EPERM, hex(flag)
        assert answer(arch, "clone", flag | thread | (0xFFFF << 32)) == EPERM, hex(flag)
    # the kernel takes clone's lower 32 bits only: high bits alone are not a namespace
    assert answer(arch, "clone", (0x10000000 << 32) | 17) == ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_unshare_is_refused_only_with_namespace_flags(arch):
    for harmless in (0, 0x200, 0x400, 0x40000):  # CLONE_FS, CLONE_FILES, CLONE_SYSVSEM
        assert answer(arch, "unshare", harmless) == ALLOW
    for flag in (0x80, 0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert answer(arch, "unshare", flag) == EPERM, hex(flag)


@pytest.mark.parametrize("arch", ARCHES)
def test_personality_allows_only_dockers_values(arch):
    for value in (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF):
        assert answer(arch, "personality", value) == ALLOW, hex(value)
    for value in (0x0040000, 0x0400000, 0x0200000, 0x0100000, 0x1, 0x20009, 0xFFFFFFFE):
        assert answer(arch, "personality", value) == EPERM, hex(value)
    # high bits, which the kernel ignores, neither hide a value nor spoil an allowed one
    assert answer(arch, "personality", (1 << 32) | 0x0400000) == EPERM
    assert answer(arch, "personality", (1 << 32) | 0xFFFFFFFF) == ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_ioctl_refuses_tiocsti_and_tioclinux_even_with_high_bits(arch):
    for cmd in (0x5412, 0x541C, 0x1_0000_5412, 0xFFFFFFFF_0000541C):
        assert answer(arch, "ioctl", 1, cmd) == EPERM, hex(cmd)
    for cmd in (0x5401, 0x5413, 0x541B, 0x80045430, 0x5412 << 32):  # TCGETS, TIOCGWINSZ, FIONREAD, ...
        assert answer(arch, "ioctl", 1, cmd) == ALLOW, hex(cmd)
    assert answer(arch, "ioctl", 0x5412, 0x5401) == ALLOW  # the fd is not the request


@pytest.mark.parametrize("arch", ARCHES)
def test_socket_refuses_vsock_and_alg_only(arch):
    for family in (1, 2, 10, 16, 17, 39, 41):  # unix, inet, inet6, netlink, packet...
        assert answer(arch, "socket", family, 1) == ALLOW, family
    assert answer(arch, "socket", 40, 1) == EPERM
    assert answer(arch, "socket", 38, 5) == EPERM
    assert answer(arch, "socket", (1 << 32) | 40, 1) == EPERM


def test_i386_socketcall_refuses_only_sys_socket():
    assert answer("i386", "socketcall", 1) == EPERM
    for call in range(2, 21):  # bind, connect, ..., socketpair: their family is already set
        assert answer("i386", "socketcall", call) == ALLOW


def test_x32_calls_are_refused_with_enosys():
    program = seccomp._build(("x86_64", "i386"))
    for nr in (0, 1, 59, 272, 0x200, 0x3FFFFFFF):
        assert run_bpf(program, "x86_64", 0x40000000 | nr) == ENOSYS
    assert run_bpf(program, "x86_64", -1) == ENOSYS  # (the kernel's answer too)


def test_other_architectures_are_killed():
    x86, arm = seccomp._build(("x86_64", "i386")), seccomp._build(("aarch64", "arm"))
    for program, foreign in ((x86, "aarch64"), (x86, "arm"), (arm, "x86_64"), (arm, "i386"), (x86, 0xC00000F3)):
        assert run_bpf(program, foreign, 0) == KILL_PROCESS


def test_program_is_built_once_for_this_machine():
    if MACHINE not in ("x86_64", "aarch64"):
        with pytest.raises(RuntimeError, match="no seccomp filter"):
            seccomp.program()
        return
    assert seccomp.program() is seccomp.program()
    assert seccomp.program() == seccomp._build(BUILDS[MACHINE])


def test_denied_names_every_call_of_the_policy():
    assert set(seccomp.DENIED) == set(seccomp._RULES) == set(seccomp._NUMBERS)
    assert all(reason and reason == reason.strip() for reason in seccomp.DENIED.values())
    for name in ("unshare", "clone", "clone3", "setns", "mount", "umount", "umount2", "pivot_root", "chroot"):
        assert name in seccomp.DENIED
    with pytest.raises(TypeError):
        seccomp.DENIED["read"] = "no"


# libseccomp does not know these (2.5.4: kernel 6.15's open_tree_attr) or folds them into another
# call (i386's direct socket call, since kernel 4.3, into socketcall)
KERNEL_ONLY = {("open_tree_attr", arch): 467 for arch in ARCHES} | {("socket", "i386"): 359}


def test_the_call_numbers_match_libseccomps():
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp.so.2 is not installed: nothing to compare the numbers with")
    lib.seccomp_syscall_resolve_name_arch.argtypes = (ctypes.c_uint32, ctypes.c_char_p)
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    for name in seccomp._NUMBERS:
        for arch in ARCHES:
            theirs = lib.seccomp_syscall_resolve_name_arch(AUDIT_ARCH[arch], name.encode())
            ours = number(name, arch)
            if theirs >= 0:
                assert ours == theirs, (name, arch)
            else:
                assert ours == KERNEL_ONLY.get((name, arch)), (name, arch)


# --- write() ------------------------------------------------------------------------------------


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_write_is_atomic_and_mode_0644(tmp_path, umask_077):
    path = tmp_path / "seccomp.bpf"
    path.write_bytes(b"old")
    path.chmod(0o600)
    seccomp.write(path)
    assert path.read_bytes() == seccomp.program()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["seccomp.bpf"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "seccomp.bpf"
    path.write_bytes(b"old")

    def fail(*_args: object) -> None:
        raise OSError(errno.EIO, "no")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="no"):
        seccomp.write(path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["seccomp.bpf"]


# --- real bubblewrap ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpf_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seccomp") / "seccomp.bpf"
    seccomp.write(path)
    return path


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    # bubblewrap's own --disable-userns is left out: these tests look at what the filter alone refuses
    return dataclasses.replace(Sandbox.detect("bubblewrap", LimitsMode("rlimits")), disable_userns=False)


class Run:
    def __init__(self, sandbox: Sandbox, bpf_file: Path, tmp_path: Path) -> None:
        self.sandbox, self.bpf_file, self.tmp_path = sandbox, bpf_file, tmp_path

    def __call__(
        self, command: list[str], *, filtered: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`command` in a sandbox as quilt makes them (sandbox.py's argv, wrapper included), with
        the filter passed the way quilt would: a descriptor of its own on the file write() made."""
        for d in ("workspace", "tmp"):
            (self.tmp_path / d).mkdir(exist_ok=True)
        argv = self.sandbox.argv(
            command,
            image=Image(None),
            workspace=self.tmp_path / "workspace",
            tmp=self.tmp_path / "tmp",
            workdir="/workspace",
            env=base_env(env or {}),
            network=False,
            hostname="box",
            cgroup=None,
            memory_bytes=0,
            pids=0,
        )
        info_r, info_w = os.pipe()
        fds = [info_r, info_w]
        try:
            argv = [str(info_w) if a == "{info_fd}" else a for a in argv]
            if filtered:
                fd = os.open(self.bpf_file, os.O_RDONLY | os.O_CLOEXEC)
                fds.append(fd)
                at = argv.index(str(self.sandbox.bwrap)) + 1
                argv[at:at] = ["--seccomp", str(fd)]
            return subprocess.run(
                argv, pass_fds=fds[1:], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
            )
        finally:
            for fd in fds:
                os.close(fd)


@pytest.fixture
def run(sandbox, bpf_file, tmp_path) -> Run:
    return Run(sandbox, bpf_file, tmp_path)


def sh(run: Run, script: str, *, filtered: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["/bin/sh", "-c", script], filtered=filtered)


def test_the_sandbox_has_no_new_privs_and_a_seccomp_filter(run):
    done = sh(run, "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["NoNewPrivs:", "1", "Seccomp:", "2"]


def test_without_the_filter_there_is_none(run):
    done = sh(run, "grep -E '^Seccomp:' /proc/self/status", filtered=False)
    assert done.stdout.split() == ["Seccomp:", "0"]


def test_bwrap_does_not_leak_the_filters_descriptor(run):
    done = run(["/usr/bin/python3", "-c", "import os; print(sorted(map(int, os.listdir('/proc/self/fd'))))"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [0, 1, 2, 3]  # 3: listdir's own


def test_unshare_user_namespace_command_fails(run):
    done = sh(run, "unshare -U true")
    assert done.returncode != 0
    assert "Operation not permitted" in done.stderr
    assert sh(run, "unshare -U true", filtered=False).returncode == 0  # it is the filter


def test_bubblewraps_own_layer_refuses_user_namespaces_too(sandbox, bpf_file, tmp_path):
    """The second layer, as Quilt's sandboxes have it (bubblewrap 0.8's --disable-userns): even
    without the filter, no new user namespace."""
    both = Run(dataclasses.replace(sandbox, disable_userns=True), bpf_file, tmp_path)
    done = both(["/bin/sh", "-c", "unshare -U true"], filtered=False)
    assert done.returncode != 0, done.stdout


def test_mount_tmpfs_command_fails(run):
    done = sh(run, "mount -t tmpfs x /tmp && echo mounted")
    assert done.returncode != 0 and "mounted" not in done.stdout
    assert "ermission denied" in done.stderr or "not permitted" in done.stderr, done.stderr


# The probes: Python run inside the sandbox, calling the kernel through ctypes (raw syscalls, and
# for i386 and x32 a few bytes of machine code), each answering "ok" or the errno's name.
PRELUDE = r"""
import ctypes, errno, fcntl, mmap, os, struct, sys, termios
NR = NUMBERS
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def _arg(a):
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    return ctypes.c_ulong(a & 0xFFFFFFFFFFFFFFFF) if isinstance(a, int) else a

def _errno(r):
    return errno.errorcode[ctypes.get_errno()] if r == -1 else "ok"

def call(name, *args):
    ctypes.set_errno(0)
    return _errno(libc.syscall(ctypes.c_long(NR[name]), *map(_arg, args)))

def clone(flags):  # fork-like (no new stack); the child leaves at once
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(NR["clone"]), *map(_arg, (flags | 17, 0, 0, 0, 0)))
    if r == 0:
        os._exit(0)
    if r > 0:
        os.waitpid(r, 0)
    return _errno(r)

def in_child(f):  # f() in a child process of its own; its answer
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            answer = f()
        except BaseException as e:
            answer = repr(e)
        os.write(w, answer.encode())
        os._exit(0)
    os.close(w)
    answer = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    return answer

def tty_ioctl(cmd):  # on a terminal of our own, our controlling one (what TIOCSTI needs)
    def f():
        master, slave = os.openpty()
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        return call("ioctl", slave, cmd, ctypes.create_string_buffer(b"x", 256))
    return in_child(f)

def ptrace_attach():
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "10"])
    try:
        return call("ptrace", 16, pid, 0, 0)  # PTRACE_ATTACH
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)

def _machine_code(code):
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    r = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
    return errno.errorcode[-r] if r < 0 else "ok"

def _u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)

def i386(nr, a=0, b=0, c=0):  # push rbx; mov eax, nr; mov ebx, a; mov ecx, b; mov edx, c; int 0x80; pop rbx; ret
    regs = b"\xb8" + _u32(nr) + b"\xbb" + _u32(a) + b"\xb9" + _u32(b) + b"\xba" + _u32(c)
    return _machine_code(b"\x53" + regs + b"\xcd\x80\x5b\xc3")

def x32(nr, a=0):  # mov eax, nr | __X32_SYSCALL_BIT; mov edi, a; syscall; ret
    return _machine_code(b"\xb8" + _u32(nr | 0x40000000) + b"\xbf" + _u32(a) + b"\x0f\x05\xc3")
"""


def probe(run: Run, expression: str, *, filtered: bool = True) -> str:
    numbers = {name: number(name, "aarch64" if MACHINE == "aarch64" else "x86_64") for name in seccomp._NUMBERS}
    script = PRELUDE.replace("NUMBERS", repr(numbers)) + f"\nprint({expression})\n"
    done = run(["/usr/bin/python3", "-c", script], filtered=filtered)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


X86_ONLY = pytest.mark.skipif(MACHINE != "x86_64", reason="i386 and x32 probes are x86_64 machine code")
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
KEY_SPEC_SESSION_KEYRING, KEY_SPEC_PROCESS_KEYRING = -3, -2

# id, expression, its answer with the filter, without it (None: the kernel itself answers the same,
# so only the filter's answer is checked), x86_64 only
PROBES = [
    ("keyctl", f"call('keyctl', 0, {KEY_SPEC_SESSION_KEYRING}, 1)", "EPERM", "ok", False),  # GET_KEYRING_ID
    ("add_key", f"call('add_key', b'user', b'quilt', b'x', 1, {KEY_SPEC_PROCESS_KEYRING})", "EPERM", "ok", False),
    ("bpf", "call('bpf', 0, 0, 0)", "EPERM", "EINVAL", False),  # BPF_MAP_CREATE without attributes
    ("perf_event_open", "call('perf_event_open', 0, 0, -1, -1, 0)", "EPERM", "EFAULT", False),
    ("ptrace-traceme", "call('ptrace', 0, 0, 0, 0)", "EPERM", "ok", False),
    ("ptrace-attach", "ptrace_attach()", "EPERM", "ok", False),
    ("clone-newuser", f"clone({CLONE_NEWUSER})", "EPERM", "ok", False),
    ("unshare-newns", f"call('unshare', {CLONE_NEWNS})", "EPERM", None, False),  # no CAP_SYS_ADMIN: EPERM anyway
    ("unshare-newuser-newns", f"call('unshare', {CLONE_NEWUSER | CLONE_NEWNS})", "EPERM", "ok", False),
    ("setns", "call('setns', -1, 0)", "EPERM", "EBADF", False),
    ("clone3", "call('clone3', 0, 0)", "ENOSYS", "EINVAL", False),
    ("mount", "call('mount', b'x', b'/nowhere', b'tmpfs', 0, 0)", "EPERM", "ENOENT", False),
    ("tiocsti", "tty_ioctl(termios.TIOCSTI)", "EPERM", "ok", False),
    ("tiocsti-high-bits", "tty_ioctl(termios.TIOCSTI | 1 << 32)", "EPERM", "ok", False),
    ("tioclinux", "tty_ioctl(0x541C)", "EPERM", "ENOTTY", False),
    ("af_vsock", "call('socket', 40, 1, 0)", "EPERM", "ok", False),
    ("io_uring", "call('io_uring_setup', 1, 0)", "EPERM", "EFAULT", False),
    ("personality-read-implies-exec", "call('personality', 0x0400000)", "EPERM", "ok", False),
    ("i386-unshare-newuser", f"i386(310, {CLONE_NEWUSER})", "EPERM", "ok", True),
    ("i386-ptrace-traceme", "i386(26)", "EPERM", "ok", True),
    ("i386-keyctl", f"i386(288, 0, {KEY_SPEC_SESSION_KEYRING}, 1)", "EPERM", "ok", True),
    # this kernel has no x32 (CONFIG_X86_X32_ABI unset): ENOSYS either way
    ("x32-unshare-newuser", f"x32(272, {CLONE_NEWUSER})", "ENOSYS", None, True),
]


def cases(*, control: bool) -> list[object]:
    return [
        pytest.param(expression, without if control else with_, id=name, marks=[X86_ONLY] if x86 else [])
        for name, expression, with_, without, x86 in PROBES
        if not (control and without is None)
    ]


@pytest.fixture(scope="module")
def ia32_emulation() -> None:
    """int 0x80 from a 64-bit process needs the kernel's IA32 emulation (ia32_emulation=1)."""
    if MACHINE != "x86_64":
        return
    code = PRELUDE.replace("NUMBERS", "{}") + "\nprint(i386(20))\n"  # getpid
    done = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"this kernel has no IA32 emulation (int 0x80 died: {done.returncode})")


@pytest.mark.parametrize(("expression", "expected"), cases(control=False))
def test_refused_inside_the_sandbox(run, ia32_emulation, expression, expected):
    assert probe(run, expression) == expected


@pytest.mark.parametrize(("expression", "expected"), cases(control=True))
def test_without_the_filter_the_same_probe_gets_through(run, ia32_emulation, expression, expected):
    assert probe(run, expression, filtered=False) == expected


ALLOWED = [
    pytest.param("call('unshare', 0x400)", id="unshare-files"),  # CLONE_FILES: no namespace
    pytest.param("clone(0)", id="clone-fork"),
    pytest.param("call('personality', 0xffffffff)", id="personality-query"),
    pytest.param("call('personality', 0)", id="personality-linux"),
    pytest.param("call('socket', 1, 1, 0)", id="af_unix"),
    pytest.param("tty_ioctl(termios.TCGETS)", id="tty-ioctl-tcgets"),
    pytest.param("i386(20)", id="i386-getpid", marks=X86_ONLY),
]


@pytest.mark.parametrize("expression", ALLOWED)
def test_allowed_inside_the_sandbox(run, ia32_emulation, expression):
    assert probe(run, expression) == "ok"


def test_shell_pipelines_work(run):
    done = sh(run, "seq 1 1000 | sort -rn | head -3 | tr '\\n' ' '; echo hi > /tmp/f && cat /tmp/f | wc -c")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000", "999", "998", "3"]


PYTHON_WORK = r"""
import asyncio, concurrent.futures, os, subprocess, threading
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    squares = list(pool.map(lambda n: n * n, range(100)))
t = threading.Thread(target=lambda: None); t.start(); t.join()
out = subprocess.run(["sh", "-c", "echo sub"], capture_output=True, text=True, check=True).stdout.strip()
pid = os.fork()
if pid == 0:
    os._exit(7)
_, status = os.waitpid(pid, 0)
async def main():
    p = await asyncio.create_subprocess_exec("true")
    return await p.wait()
print(sum(squares), out, os.waitstatus_to_exitcode(status), asyncio.run(main()))
"""


def test_python_threads_subprocesses_and_fork_work(run):
    done = run(["python3", "-c", PYTHON_WORK])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["328350", "sub", "7", "0"]


NODE_WORK = r"""
const fs = require('fs'), cp = require('child_process'), { Worker } = require('worker_threads');
fs.writeFileSync('/tmp/n', 'node');
const sub = cp.execSync('echo sub').toString().trim();
fs.promises.readFile('/tmp/n', 'utf8').then((text) => {
  const w = new Worker('require("worker_threads").parentPort.postMessage(6 * 7)', { eval: true });
  w.on('message', (m) => setTimeout(() => console.log(text, sub, m), 10));
});
"""


@pytest.mark.parametrize("io_uring", ["default", "UV_USE_IO_URING=1"])
def test_node_works(run, io_uring):
    env = {"UV_USE_IO_URING": "1"} if io_uring != "default" else {}
    done = run(["node", "-e", NODE_WORK], env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["node", "sub", "42"]


def test_coreutils_work(run):
    script = (
        "set -e; cd /tmp; mkdir -p a/b; echo x > a/b/f; cp a/b/f g; mv g h; ln -s h l; chmod 600 h; touch t; "
        "stat -c %a h; cat l; ls a/b; sha256sum h | cut -c1-8; wc -l < h; sort -u h h | uniq | tee u >/dev/null; "
        "rm -r a; test ! -e a && echo gone; date +%Y >/dev/null; id -u; uname -s; nproc >/dev/null; "
        "timeout 5 sleep 0.1 && echo slept; nice -n 5 true; env | grep -c ^PATH=; tar czf t.tgz h && tar tzf t.tgz"
    )
    done = sh(run, script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["600", "x", "f", "73cb3858", "1", "gone", "0", "Linux", "slept", "1", "h"]
