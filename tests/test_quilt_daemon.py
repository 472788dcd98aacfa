"""`aria quilt serve` and the `aria quilt` verbs, as a person would use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

from bundles import flat
from conftest import start_quilt
from quilt_client import QuiltClient


def aria(quilt, *args, check=True):
    env = {**os.environ, "QUILT_SOCK": str(quilt.socket)}
    out = subprocess.run(
        [sys.executable, "-m", "aria_trio", *args], capture_output=True, text=True, env=env, timeout=60
    )
    if check and out.returncode != 0:
        raise AssertionError(f"aria {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


def test_missing_bubblewrap_is_a_clear_refusal(sock_dir):
    quilt = start_quilt(sock_dir, env={"PATH": str(Path(sys.executable).parent)}, wait=False)
    assert quilt.proc.wait(30) == 1
    text = quilt.log_path.read_text()
    assert "bubblewrap (bwrap) is not installed" in text and "apt-get install bubblewrap" in text


def test_sandbox_none_says_so_loudly_and_runs_unisolated(sock_dir):
    quilt = start_quilt(sock_dir, "--sandbox", "none")
    try:
        assert any(e.get("level") == "warning" and "SANDBOX IS OFF" in e.get("event", "") for e in quilt.logs())
        with quilt.channel() as ch:
            q = QuiltClient(ch)
            c = q.run()
            r = q.exec(c.id, ["/bin/sh", "-c", "echo $$; pwd; test -d /work && echo host-visible"])
            pid, cwd, visible = r.stdout.split()
            assert int(pid) > 1 and cwd.endswith("/workspace") and visible == "host-visible"
            slow = q.exec_async(c.id, ["/bin/sh", "-c", "sleep 100 & wait"])
            assert q.cancel(slow.id).task.state == pb.TASK_CANCELLED
            q.stop(c.id)
            metrics = q.call("/quilt.v1.System/GetSystemMetrics", pb.GetSystemMetricsRequest(), pb.SystemMetrics)
            assert metrics.sandbox == "none"
    finally:
        assert quilt.stop() == 0


def test_cli_create_exec_logs_stop_and_bundles(quilt, tmp_path):
    cid = aria(
        quilt, "quilt", "create", "--name", "demo", "--start", "--", "/bin/sh", "-c", "echo hello; sleep 30"
    ).stdout.strip()
    assert cid.startswith("c-")
    assert "demo" in aria(quilt, "quilt", "ps").stdout
    done = aria(quilt, "quilt", "exec", cid, "--", "/bin/sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (done.returncode, done.stdout, done.stderr.splitlines()[0]) == (3, "out\n", "err")
    assert aria(quilt, "quilt", "logs", cid).stdout == "hello\n"
    assert "stopped" in aria(quilt, "quilt", "stop", "--grace", "0.2", cid).stdout
    assert cid in aria(quilt, "quilt", "ps", "--all").stdout

    path = tmp_path / "calc.aria"
    path.write_bytes(flat())
    bundle = json.loads(aria(quilt, "--json", "quilt", "bundle", "upload", str(path)).stdout)
    assert bundle["name"] == "calc"
    assert "calc" in aria(quilt, "quilt", "bundle", "list").stdout
    assert aria(quilt, "quilt", "bundle", "run-tool", bundle["id"], "add", '{"a": 1, "b": 2}').stdout.strip() == "3"
    aria(quilt, "quilt", "rm", cid)
    metrics = json.loads(aria(quilt, "--json", "quilt", "metrics").stdout)
    assert metrics["sandbox"] == "bubblewrap" and metrics["limits"] in ("cgroup v1", "cgroup v2", "rlimits")
    assert int(metrics["bundles"]) == 1


def test_quilt_serve_help_documents_every_setting():
    from aria_trio.shared.config import QUILT_SETTINGS

    out = subprocess.run(
        [sys.executable, "-m", "aria_trio", "quilt", "serve", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(out.stdout.split())
    for s in QUILT_SETTINGS:
        assert s.flag in text and s.env in text and f"config [quilt] {s.name}" in text
