"""A full disk is an answer, not a crash: tested on a small tmpfs holding both daemons' data.

While the disk is full: calls that must write fail RESOURCE_EXHAUSTED "disk full" (never
INTERNAL), nothing is half-written (no partial bundle, nothing registered, SQLite consistent),
reads keep working, and the daemons keep serving. Once space is freed, both carry on by
themselves: a task that was running meanwhile completes and is recorded.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import user_preference_pb2 as prefs_pb

import bundles
from aria_client import AriaClient
from conftest import start_daemon
from quilt_client import error_reason

SIZE_MB = 48
PREFS = "/aria.v1.UserPreferenceService/"


@pytest.fixture
def small_disk() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="aria-full-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m,mode=0700", "aria-full", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def fill(folder: Path) -> Path:
    """Take every free byte of the filesystem (a file that grows until ENOSPC)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1024 * 1024, 65536, 4096, 512, 1):  # big pieces, then the last crumbs
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(folder).free < 4096
    return filler


def set_pref(c: AriaClient, key: str, value: object) -> None:
    s = struct_pb2.Struct()
    s.update({key: value})
    c.call(PREFS + "UpdateUserPreferences", prefs_pb.UpdateUserPreferencesRequest(updates=s), prefs_pb.UserPreferences)


def get_prefs(c: AriaClient) -> dict[str, object]:
    reply = c.call(PREFS + "GetUserPreferences", prefs_pb.GetUserPreferencesRequest(), prefs_pb.UserPreferences)
    return dict(reply.preferences)


def disk_full(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert "disk full" in err.details()
    return err


def test_a_full_disk_is_an_answer_and_both_daemons_recover(sock_dir, small_disk):
    d = start_daemon(sock_dir, "--data-dir", str(small_disk / "data"))
    try:
        c = AriaClient(d.channel())
        set_pref(c, "theme", "dark")
        agents_before = [a.agent_id for a in c.agents()]
        # work that runs through it all: a line every 0.1 s for 8 s
        task_id = c.launch(["sh", "-c", "for i in $(seq 1 80); do echo line $i; sleep 0.1; done; echo end"])
        deadline = time.monotonic() + 20
        while not list(c.output(task_id)) and time.monotonic() < deadline:  # (its first line is stored)
            time.sleep(0.05)
        filler = fill(small_disk)

        # calls that must write: RESOURCE_EXHAUSTED "disk full", nothing half-done
        err = disk_full(set_pref, c, "theme", "light")
        assert error_reason(err) == "DISK_FULL"
        disk_full(c.launch, ["true"])
        disk_full(c.create_container, "box")
        data = bundles.flat(bundles.manifest(name="filled"))
        try:
            reply = c.upload_bytes(data, name="filled.aria")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
        else:
            assert not reply.success and "disk full" in reply.error_message
        quilt_bundles = small_disk / "data" / "quilt" / "bundles"
        assert not [p for p in quilt_bundles.rglob("*") if p.is_file() and p.suffix in (".part", ".aria")]
        # reads keep working
        assert get_prefs(c) == {"theme": "dark"}
        assert [a.agent_id for a in c.agents()] == agents_before
        assert c.task(task_id).status == aria_pb2.RUNNING
        assert c.list_tasks().tasks
        time.sleep(2)  # the task's lines meanwhile find no room: they wait (runtime) or are counted (Quilt)
        assert d.proc.poll() is None

        filler.unlink()  # room again: both carry on by themselves
        done = c.wait_task(task_id, timeout=60)
        assert (done.status, done.exit_code) == (aria_pb2.COMPLETED, 0), done
        lines = [o.stdout_line for o in c.output(task_id) if o.WhichOneof("output") == "stdout_line"]
        assert lines[0] == "line 1" and lines[-1] == "end"
        numbers = [int(x.split()[1]) for x in lines[:-1]]
        assert numbers == sorted(set(numbers))  # in order, once each (some lost while it was full)
        set_pref(c, "theme", "light")
        assert get_prefs(c) == {"theme": "light"}
        assert c.upload_bytes(data, name="filled.aria").success
        again = c.launch(["echo", "again"])
        assert c.wait_task(again).status == aria_pb2.COMPLETED
        assert d.proc.poll() is None
        logged = d.logs()
        assert not [e for e in logged if e.get("code") in ("INTERNAL", "UNKNOWN") or e.get("level") == "error"], [
            e for e in logged if e.get("level") == "error"
        ]
        assert any(e.get("event") == "disk full: a background write waits for space" for e in logged)
    finally:
        d.stop()
    for db in (small_disk / "data" / "runtime.db", small_disk / "data" / "quilt" / "quilt.db"):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",), db
        conn.close()


def test_a_disk_that_fills_during_an_upload(sock_dir, small_disk):
    """Room for the start of a 16 MiB bundle, not for the rest: the upload fails RESOURCE_EXHAUSTED
    "disk full" part-way, leaves no file and registers nothing; with room again, it goes through."""
    d = start_daemon(sock_dir, "--data-dir", str(small_disk / "data"))
    try:
        c = AriaClient(d.channel())
        pad = os.urandom(16 * 1024 * 1024)  # (random: the zip stores it as it is)
        data = bundles.flat(bundles.manifest(name="big"), files={"pad.bin": pad})
        filler = fill(small_disk)
        filler_size = filler.stat().st_size
        os.truncate(filler, filler_size - 6 * 1024 * 1024)  # 6 MiB free: the upload starts, then fills it
        quilt_bundles = small_disk / "data" / "quilt" / "bundles"
        err = disk_full(c.upload_bytes, data, name="big.aria")
        assert error_reason(err) == "DISK_FULL", err.details()
        assert not [p for p in quilt_bundles.rglob("*") if p.is_file() and p.suffix in (".part", ".aria")]
        assert [a.name for a in c.agents() if a.name == "Calculator"] == []
        filler.unlink()
        assert c.upload_bytes(data, name="big.aria").bundle_id
        assert [a.name for a in c.agents() if a.name == "Calculator"] == ["Calculator"]
        assert d.proc.poll() is None
    finally:
        d.stop()
