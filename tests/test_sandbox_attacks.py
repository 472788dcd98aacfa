"""The host stays out of every sandbox: tried from inside, as an attacker would.

One Quilt for the module (as root, as in CI: its sandboxes run as the unprivileged sandbox user),
started with a marker in its environment, an images folder, and a socket of ours under /usr to
hide; each test runs what a hostile command would try.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

from aria_client import AriaClient
from conftest import Daemon, start_daemon, start_quilt
from quilt_client import QuiltClient, error_of, error_reason

aria_error_reason = error_reason  # (the same ErrorInfo, from either daemon)

MARKER = "ARIA_TEST_SECRET_" + secrets.token_hex(8)
SANDBOX_UID = 200000  # quilt's default --sandbox-uid


class Env:
    def __init__(self, quilt: Daemon, client: QuiltClient, images: Path, hidden: Path) -> None:
        self.quilt, self.q, self.images, self.hidden = quilt, client, images, hidden

    def sh(self, script: str, **spec: object) -> tuple[pb.Container, list[str]]:
        c = self.q.run(["/bin/sh", "-c", script], **spec)
        end = self.q.wait_container(c.id, timeout=60)
        return end, [line.text for line in self.q.logs(c.id)]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    folder = Path(tempfile.mkdtemp(prefix="aria-atk-", dir="/tmp"))
    images = folder / "images"
    images.mkdir()
    images.chmod(0o755)
    (images / "root-link").symlink_to("/")  # an operator's mistake: must not become an image
    _tar_with(images / "evil.tar", [_member("../escaped", b"x")])
    _tar_with(images / "suid.tar", [_member("bin/tool", b"#!/bin/sh\n", mode=0o4755), _member("etc/x", b"ok\n")])
    # a socket of ours in a place the host view shows (/usr): Quilt is told to hide it
    hidden = Path("/usr/local/share") / f"aria-hide-{secrets.token_hex(4)}"
    hidden.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(hidden / "daemon.sock"))
    listener.listen()
    quilt = start_quilt(folder, "--images-dir", str(images), "--hide", str(hidden), env={MARKER: "1"})
    try:
        with quilt.channel() as ch:
            yield Env(quilt, QuiltClient(ch), images, hidden)
    finally:
        quilt.stop()
        listener.close()
        shutil.rmtree(hidden, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def _member(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))


# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", ["/", "/home", "../..", "root-link", "/etc/passwd", "images/../../x", "evil"])
def test_a_host_path_or_a_bad_image_is_not_allowed(env, image):
    err = error_of(env.q.create, ["/bin/true"], image=image)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, image
    assert error_reason(err) == "IMAGE_NOT_ALLOWED", (image, err.details())
    assert str(env.images) not in err.details() and "/tmp/" not in err.details()


def test_a_tar_image_loses_its_setuid_bits(env):
    env.q.create(["/bin/tool"], image="suid")  # (unpacked now: the image has no shell to look with)
    tools = list((env.quilt.data_dir / "images").glob("*/bin/tool"))
    assert len(tools) == 1 and tools[0].stat().st_mode & 0o7777 == 0o755


# -- from inside --------------------------------------------------------------------------------


def test_the_sandbox_is_nobody_without_capabilities_and_no_new_privileges(env):
    end, out = env.sh("id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status")
    assert end.exit_code == 0, end.message
    assert out[:2] == ["65534", "65534"]
    fields = dict(line.split(":\t") for line in out[2:])
    assert fields == {
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapBnd": "0000000000000000",
        "NoNewPrivs": "1",
        "Seccomp": "2",
    }


def test_on_the_host_the_sandbox_runs_as_the_unprivileged_sandbox_user(env):
    c = env.q.run(["sleep", "30"])
    try:
        with open(f"/proc/{c.pid}/status") as f:
            ids = {k: v.split() for k, _, v in (line.partition(":\t") for line in f) if k in ("Uid", "Gid")}
        assert ids == {"Uid": [str(SANDBOX_UID)] * 4, "Gid": [str(SANDBOX_UID)] * 4}
    finally:
        env.q.stop(c.id)


def test_no_new_user_namespace_and_no_mount(env):
    _, out = env.sh(
        "unshare -U true 2>/dev/null && echo unshared; unshare -r true 2>/dev/null && echo root-mapped; "
        "mount -t tmpfs x /mnt 2>/dev/null && echo mounted; mount -t tmpfs x /tmp 2>/dev/null && echo mounted; "
        "echo done"
    )
    assert out == ["done"]


def test_the_host_s_processes_and_their_environment_are_out_of_sight(env):
    _, out = env.sh(
        f"cat /proc/1/environ | tr '\\0' '\\n' | grep -c {MARKER}; ls /proc | grep -cE '^[0-9]+$'; "
        f"cat /proc/{env.quilt.proc.pid}/environ 2>/dev/null | tr '\\0' '\\n' | grep -c {MARKER}"
    )
    # its own pid 1 has only the sandbox's environment; it sees a handful of its own processes
    assert out[0] == "0" and int(out[1]) < 10 and out[2] == "0", out


def test_the_host_s_private_folders_and_quilt_s_data_are_not_there(env):
    data = env.quilt.data_dir
    _, out = env.sh(
        f"for p in /root /home /run /var /srv /mnt /tmp/aria-atk-* {data} {env.quilt.socket} /etc/shadow; do "
        'test -e "$p" && echo "seen $p"; done; ls -A /tmp; echo done'
    )
    assert out == ["done"], out


def test_a_hidden_socket_under_a_shown_folder_cannot_be_reached(env):
    path = env.hidden / "daemon.sock"
    assert path.exists()  # (on the host it is there, listening)
    script = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); print('connected')"
    _, out = env.sh(
        f"ls -A {env.hidden}; ls -d /usr/local/share >/dev/null && echo parent-shown; "
        f'python3 -c "{script}" 2>&1 | tail -1'
    )
    assert out[0] == "parent-shown", out  # the host view is there, the hidden folder empty
    assert "connected" not in out[-1] and ("Error" in out[-1] or "refused" in out[-1]), out


# -- limits ---------------------------------------------------------------------------------------


def test_a_write_past_the_disk_limit_fails_inside_and_nowhere_else(env):
    size = 32 * 1024 * 1024
    box = env.q.run(limits=pb.Limits(disk_bytes=size))
    try:
        full = env.q.exec(box.id, ["sh", "-c", "dd if=/dev/zero of=/workspace/fill bs=1M count=64; echo rc=$?"])
        assert "No space left on device" in full.stderr, full.stderr
        assert full.stdout.strip() == "rc=1"
        same = env.q.exec(box.id, ["stat", "-c", "%d", "/tmp", "/workspace"]).stdout.split()
        assert len(same) == 2 and same[0] == same[1]  # /tmp is on the container's disk too
        # the disk's file on the host takes no more than the limit; a neighbour writes as ever
        image = env.quilt.data_dir / "containers" / box.id / "disk.img"
        assert image.stat().st_blocks * 512 <= size
        other = env.q.run()
        ok = env.q.exec(
            other.id, ["sh", "-c", "dd if=/dev/zero of=/workspace/f bs=1M count=40 2>/dev/null; echo rc=$?"]
        )
        assert ok.stdout.strip() == "rc=0"
        env.q.stop(other.id)
        # and the full one still runs commands
        assert env.q.exec(box.id, ["sh", "-c", "rm /workspace/fill; echo freed"]).stdout == "freed\n"
    finally:
        env.q.stop(box.id)


@pytest.mark.serial  # measures CPU time: alone
def test_a_cpu_spinner_gets_no_more_than_its_cpus(env):
    box = env.q.run(["python3", "-c", "while True: pass"], limits=pb.Limits(cpus=0.5))
    try:
        ticks = os.sysconf("SC_CLK_TCK")

        def used() -> float:
            with open(f"/proc/{box.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        time.sleep(0.5)
        began, cpu = time.monotonic(), used()
        time.sleep(3)
        share = (used() - cpu) / (time.monotonic() - began)
        assert 0.2 < share < 0.65, share  # half a CPU (CFS quota), give or take a period
    finally:
        env.q.stop(box.id)


def test_limits_past_the_operator_s_maximum_are_refused(env):
    for limits in (
        pb.Limits(memory_bytes=2**62),
        pb.Limits(cpus=10_000),
        pb.Limits(cpus=float("nan")),
        pb.Limits(pids=10**9),
        pb.Limits(disk_bytes=2**62),
        pb.Limits(disk_bytes=4096),
    ):
        err = error_of(env.q.create, ["/bin/true"], limits=limits)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, limits


def test_an_exec_without_a_timeout_gets_the_default_not_none(env):
    box = env.q.run()
    try:
        task = env.q.exec_async(box.id, ["true"], timeout_seconds=0)
        assert task.timeout_seconds == 3600
        err = error_of(env.q.exec_async, box.id, ["true"], timeout_seconds=-1)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        env.q.stop(box.id)


# -- through the runtime ----------------------------------------------------------------------------


def test_the_runtime_s_own_socket_and_data_are_out_of_reach_even_under_a_shown_folder(tmp_path):
    """A runtime whose data and socket live under /usr (which the host view shows): a task of it
    finds neither, and cannot connect to the socket's path."""
    home = Path("/usr/local/share") / f"aria-rt-{secrets.token_hex(4)}"
    home.mkdir(parents=True)
    try:
        d = start_daemon(home)
        try:
            c = AriaClient(d.channel())
            for image in ("/", "/home", "../..", "/usr"):
                with pytest.raises(grpc.RpcError) as info:
                    c.create_container("x", image_path=image)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, image
                assert aria_error_reason(info.value) == "IMAGE_NOT_ALLOWED", image
            sock = d.socket
            script = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(sock)!r}); print('connected')"
            task_id = c.launch(
                [
                    "sh",
                    "-c",
                    f"ls -A {d.data_dir} | wc -l; test -S {sock} && echo socket-seen; "
                    f'python3 -c "{script}" 2>&1 | tail -1; id -u',
                ]
            )
            done = c.wait_task(task_id)
            out = [o.stdout_line for o in c.output(task_id)]
            assert done.status == aria_pb2.COMPLETED, done
            assert out[0] == "0" and "socket-seen" not in out, out  # the data folder: an empty cover
            assert "connected" not in out[1] and "Error" in out[1], out
            assert out[2] == "65534"
        finally:
            d.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)
