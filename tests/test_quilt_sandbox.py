"""Real bubblewrap sandboxes: what a process inside can see and do."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import grpc
import pytest

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

from conftest import start_quilt
from quilt_client import QuiltClient, error_of, error_reason


@pytest.fixture
def q(module_quilt):
    """The module's Quilt (each test looks only at its own containers)."""
    with module_quilt.channel() as ch:
        yield QuiltClient(ch)


def run_sh(q, script, **spec):
    """A container whose main process is `sh -c script`; its output once it ends."""
    c = q.run(["/bin/sh", "-c", script], **spec)
    end = q.wait_container(c.id)
    return end, [line.text for line in q.logs(c.id)]


def test_the_command_is_pid_1(q):
    end, out = run_sh(q, "echo $$; ps -e -o pid=,comm=")
    assert end.state == pb.CONTAINER_EXITED and end.exit_code == 0
    assert out[0] == "1"
    assert [line.split() for line in out[1:]] == [["1", "sh"], ["2", "ps"]]


def test_a_pid_1_without_a_sigterm_handler_is_killed_at_once_not_after_the_grace(q):
    c = q.run(["sleep", "100"])  # pid 1 of its namespace, with no handler: SIGTERM cannot reach it
    time.sleep(1.2)  # (a new pid 1 gets a second to install its handler)
    started = time.monotonic()
    end = q.stop(c.id, grace=30)
    assert time.monotonic() - started < 5
    assert end.state == pb.CONTAINER_STOPPED and end.signal == 9
    assert end.message == "stopped (killed: it does not handle SIGTERM)"


def test_exec_is_pid_1_of_its_own_sandbox_and_shares_the_files(q):
    c = q.run()  # idle
    first = q.exec(c.id, ["/bin/sh", "-c", "echo $$ > /workspace/pid; echo shared > /tmp/t"])
    assert first.task.state == pb.TASK_COMPLETED
    second = q.exec(c.id, ["/bin/sh", "-c", "cat /workspace/pid /tmp/t; ps -e -o pid=,comm="])
    lines = second.stdout.splitlines()
    assert lines[:2] == ["1", "shared"]  # the same files...
    processes = [line.split() for line in lines[2:]]
    assert processes[0] == ["1", "sh"] and [p[1] for p in processes] == ["sh", "ps"]  # ...its own processes
    q.stop(c.id)


def test_no_network_but_a_working_loopback(q):
    script = (
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
        "python3 -c \"import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
        "c=socket.create_connection(s.getsockname()); print('lo up')\"; "
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\" 2>&1 | tail -1"
    )
    _, out = run_sh(q, script)
    assert out[0] == "lo" and out[1] == "lo up"
    assert "Network is unreachable" in out[2]


def test_network_when_asked(q):
    _, out = run_sh(q, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '", network=True)
    assert "lo" in out and len(out) > 1  # the host's interfaces


def test_host_files_outside_the_view_are_absent(q, module_quilt):
    data = str(module_quilt.data_dir)
    probes = [data, str(Path(__file__).parent), "/root", "/home", "/etc/shadow", "/var", "/etc/hostname"]
    script = "; ".join(f"test -e {p} && echo present {p} || echo absent {p}" for p in probes) + "; ls /"
    _, out = run_sh(q, script)
    assert out[: len(probes)] == [f"absent {p}" for p in probes]
    assert sorted(out[len(probes) :]) == [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib64",
        "proc",
        "sbin",
        "tmp",
        "usr",
        "workspace",
    ]


def test_the_view_is_read_only(q):
    _, out = run_sh(q, "touch /usr/bin/x 2>&1; touch /etc/passwd 2>&1; echo ok > /workspace/w && cat /workspace/w")
    assert "Read-only file system" in out[0]
    # (as root, the sandbox is nobody: the host's files are not even its own to write)
    assert "Read-only file system" in out[1] or "Permission denied" in out[1]
    assert out[2] == "ok"


def test_no_capabilities_even_as_root(q):
    _, out = run_sh(q, "grep CapEff /proc/self/status; mount -t tmpfs x /usr 2>&1 || echo refused")
    assert out[0].split()[1] == "0000000000000000"
    assert out[-1] == "refused"


def test_argv_env_and_workdir_are_honoured(q):
    c = q.run(
        [
            "/usr/bin/python3",
            "-c",
            "import os, sys; print(sys.argv[1:]); print(os.getcwd()); print(os.environ['GREETING'])",
            "two words",
            'it\'s "quoted"',
            "$HOME",
            ";rm -rf /",
        ],
        env={"GREETING": "hello there"},
        workdir="/tmp",
    )
    q.wait_container(c.id)
    out = [line.text for line in q.logs(c.id)]
    assert out == ["['two words', 'it\\'s \"quoted\"', '$HOME', ';rm -rf /']", "/tmp", "hello there"]


@pytest.fixture
def rootfs(tmp_path):
    """A minimal rootfs: dash and the libraries it needs, nothing else."""
    root = tmp_path / "rootfs"
    sh = Path(shutil.which("dash") or "/bin/sh").resolve()
    libs = [
        line.split("=>")[-1].split("(")[0].strip()
        for line in subprocess.run(["ldd", str(sh)], capture_output=True, text=True, check=True).stdout.splitlines()
    ]
    for f in [str(sh), *[lib for lib in libs if lib.startswith("/")]]:
        target = root / f.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(f).resolve(), target)
    (root / "bin").mkdir(exist_ok=True)
    if not (root / "bin" / "sh").exists():
        (root / "bin" / "sh").symlink_to(f"/{sh.relative_to('/')}")
    (root / "etc").mkdir()
    (root / "etc" / "marker").write_text("from the rootfs\n")
    return root


@pytest.fixture
def images(rootfs, tmp_path, sock_dir):
    """A Quilt with an images folder: `mini` (the rootfs folder) and `mini-tar.tar.gz` of it."""
    folder = tmp_path / "images"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)  # (the sandbox user reads it)
    shutil.copytree(rootfs, folder / "mini", symlinks=True)
    _tar(rootfs, folder / "mini-tar.tar.gz")
    quilt = start_quilt(sock_dir, "--images-dir", str(folder))
    with quilt.channel() as ch:
        yield QuiltClient(ch), quilt
    quilt.stop()


def test_rootfs_folder_and_tar_images(images):
    q, _ = images
    for image in ("mini", "mini-tar", "mini-tar.tar.gz"):
        end, out = run_sh(
            q, "read line < /etc/marker; echo $line; test -e /usr/bin/python3 || echo no python", image=image
        )
        assert end.exit_code == 0, end.message
        assert out == ["from the rootfs", "no python"]


def test_tar_images_are_unpacked_once(images):
    q, quilt = images
    for _ in range(2):
        end, _ = run_sh(q, "true", image="mini-tar")
        assert end.exit_code == 0
    unpacked = [p for p in (quilt.data_dir / "images").iterdir() if p.is_dir()]
    assert len(unpacked) == 1


def _tar(root: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz" if target.name.endswith(".gz") else "w") as tar:
        tar.add(root, arcname=".")
    return target


def test_unknown_images_and_commands_are_refused(q):
    for image in ("ubuntu:latest", "/nowhere/at/all", "/", "nothing-here"):
        err = error_of(q.create, ["/bin/true"], image=image)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, image
        assert "IMAGE_NOT_ALLOWED" in str(error_reason(err)), image
        assert "/nowhere" not in err.details()
    err = error_of(q.create, ["no-such-program"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not an executable" in err.details()
    err = error_of(q.create, [""])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_memory_hog_is_killed_at_its_limit(q):
    c = q.run(
        ["/usr/bin/python3", "-c", "x = bytearray(400 * 1024 * 1024); print('survived')"],
        limits=pb.Limits(memory_bytes=64 * 1024 * 1024),
    )
    end = q.wait_container(c.id)
    assert end.state == pb.CONTAINER_EXITED and end.signal == 9
    assert "out of memory" in end.message


def test_fork_bomb_hits_the_pids_limit(q):
    c = q.run(limits=pb.Limits(pids=32))
    # The script forks once, first (the bomb, in a subshell: `b` itself would fork twice from the
    # script, the second time maybe into a full limit, which ends sh), then nothing more (a `sleep`
    # could find the limit still taken on a loaded machine): it counts with builtins, then echoes.
    spin = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"
    bomb = q.exec(c.id, ["/bin/sh", "-c", f"b() {{ b | b & }}; (b) & {spin}; echo still here"], timeout_seconds=10)
    # the bomb hit the limit (forks refused), the script itself went on, and its end took the
    # whole tree with it
    assert "Cannot fork" in bomb.stderr
    why = (bomb.task.message, bomb.stderr[:200])
    assert (bomb.task.state, bomb.stdout) == (pb.TASK_COMPLETED, "still here\n"), why
    # the daemon and the container are fine
    assert q.exec(c.id, ["/bin/echo", "alive"]).stdout == "alive\n"
    q.stop(c.id)
