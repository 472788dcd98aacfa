"""quilt_upload: a 256 MiB bundle uploaded to quilt against the same upload to a grpcio.aio server
doing the same work (bench/ref_upload_grpcio.py), and the same bytes copied over a Unix socket;
and quilt's peak memory for a 64 MiB and a 512 MiB upload.

The upload path: gRPC chunks of 1 MiB, written to a temporary file and hashed (blake3 and
sha256) in a worker thread, then the archive checked, fsynced and renamed. The references: the
same client's same stream to ref_upload_grpcio.py (grpcio's C core receiving, the same work per
chunk and at the end), and the same file sent over a plain Unix socket to a process that reads and
drops it. Every client is a process of its own. Quilt and the grpcio server take turns, ROUNDS
times, each upload on a fresh server and data folder; of each the fastest round is kept (noise on
a shared machine only slows runs down), and all rounds are in the JSON. Memory: a fresh quilt per
size, its VmHWM after the upload.
Targets: quilt / grpcio.aio at least 0.8; peak RSS for 64 MiB and 512 MiB within 32 MiB of each
other, both under 128 MiB.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .harness import BenchError, ServerProcess, child_env, peak_rss_bytes, progress, run_script, start_quilt

MiB = 1024 * 1024
CLIENT = Path(__file__).resolve().parent / "_quilt_client.py"
REFERENCE = Path(__file__).resolve().parent / "ref_upload_grpcio.py"
ROUNDS = 3
TARGET_RATIO = 0.8


def make_bundle(path: Path, size: int) -> None:
    """A valid flat bundle of about `size` bytes (its bulk is one stored, incompressible file)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("manifest.json", json.dumps({"name": "big", "version": "1", "tools": [], "agents": []}))
        with z.open("data/blob.bin", "w", force_zip64=True) as f:
            left = size - 1024
            while left > 0:
                n = min(left, 8 * MiB)
                f.write(os.urandom(n))
                left -= n


def _start(server: str, tmp: Path, label: str) -> ServerProcess:
    if server == "quilt":
        return start_quilt(tmp / f"{label}.sock", tmp / f"quilt-{label}", tmp, "--max-bundle-bytes", str(1024 * MiB))
    argv = [sys.executable, str(REFERENCE), str(tmp / f"{label}.sock"), str(tmp / f"grpcio-{label}")]
    return ServerProcess.start("ref_upload_grpcio", argv, tmp / f"{label}.sock", tmp / f"grpcio-{label}.log")


def _upload(tmp: Path, bundle: Path, label: str, server: str = "quilt") -> dict[str, Any]:
    """One upload of `bundle` to a fresh `server` ("quilt" or "grpcio"): its speed, the server's CPU and peak RSS."""
    with _start(server, tmp, label) as proc:
        before, cpu_before = peak_rss_bytes(proc.pid), proc.cpu_seconds()
        out = json.loads(
            run_script(
                [sys.executable, str(CLIENT), "upload", str(proc.socket_path), str(bundle)],
                f"upload {label}",
                tmp / "up.err",
            )
        )
        peak, cpu = peak_rss_bytes(proc.pid), proc.cpu_seconds() - cpu_before
        proc.stop()
    size = bundle.stat().st_size
    result = {
        "server": server,
        "bytes": size,
        "seconds": out["seconds"],
        "mib_per_s": size / MiB / out["seconds"],
        "server_cpu_s": round(cpu, 2),
        "server_cpu_ms_per_mib": round(cpu * 1000 / (size / MiB), 2),
        "peak_rss_before": before,
        "peak_rss": peak,
    }
    progress(f"{label}: {result['mib_per_s']:.1f} MiB/s, server CPU {result['server_cpu_ms_per_mib']} ms/MiB")
    return result


def _copy(tmp: Path, bundle: Path) -> float:
    sink_path = tmp / "sink.sock"
    sink = subprocess.Popen(
        [sys.executable, str(CLIENT), "sink", str(sink_path)], stdout=subprocess.PIPE, env=child_env(), text=True
    )
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise BenchError("the copy sink did not start")
        out = json.loads(
            run_script([sys.executable, str(CLIENT), "copy", str(sink_path), str(bundle)], "raw copy", tmp / "copy.err")
        )
    finally:
        sink.kill()
        sink.wait()
    return bundle.stat().st_size / MiB / float(out["seconds"])


def run() -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="aria-bench-", dir=os.environ.get("BENCH_TMP")) as name,
        contextlib.ExitStack(),
    ):
        tmp = Path(name)
        bundles = {}
        for mib in (64, 256, 512):
            progress(f"making a {mib} MiB bundle")
            bundles[mib] = tmp / f"b{mib}.aria"
            make_bundle(bundles[mib], mib * MiB)
        progress("raw copy of 256 MiB over a Unix socket")
        copy_rate = max(_copy(tmp, bundles[256]) for _ in range(2))
        rounds = [
            _upload(tmp, bundles[256], f"{server}-256-round-{n}", server)
            for n in range(1, ROUNDS + 1)
            for server in ("quilt", "grpcio")
        ]
        results = {}
        for mib in (64, 512):
            progress(f"uploading {mib} MiB to a fresh quilt")
            results[mib] = _upload(tmp, bundles[mib], f"u{mib}")
    speeds = {server: sorted(r["mib_per_s"] for r in rounds if r["server"] == server) for server in ("quilt", "grpcio")}
    best = {server: values[-1] for server, values in speeds.items()}
    ratio = best["quilt"] / best["grpcio"]
    rss64, rss512 = results[64]["peak_rss"], results[512]["peak_rss"]
    rss_pass = abs(rss512 - rss64) <= 32 * MiB and max(rss64, rss512) < 128 * MiB
    return {
        "parameters": {"bundle_mib": 256, "chunk_bytes": MiB, "rounds": ROUNDS, "selection": "per server, the fastest"},
        "copy_mib_per_s": round(copy_rate, 1),
        "upload_mib_per_s": round(best["quilt"], 1),
        "upload_mib_per_s_range": [round(speeds["quilt"][0], 1), round(best["quilt"], 1)],
        "grpcio_mib_per_s": round(best["grpcio"], 1),
        "grpcio_mib_per_s_range": [round(speeds["grpcio"][0], 1), round(best["grpcio"], 1)],
        "ratio_grpcio": round(ratio, 3),
        "ratio": round(best["quilt"] / copy_rate, 3),
        "peak_rss_64_mib": round(rss64 / MiB, 1),
        "peak_rss_512_mib": round(rss512 / MiB, 1),
        "peak_rss_difference_mib": round((rss512 - rss64) / MiB, 1),
        "targets": {"ratio_grpcio": f">= {TARGET_RATIO}", "difference_mib": "<= 32", "each_mib": "< 128"},
        "ratio_pass": ratio >= TARGET_RATIO,
        "pass": rss_pass,
        "rounds": rounds,
        "uploads": {str(k): v for k, v in results.items()},
    }


def table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            "quilt_upload: a 256 MiB bundle, and quilt's peak RSS per upload size",
            f"raw copy over a Unix socket   {r['copy_mib_per_s']:>8} MiB/s",
            f"grpcio.aio, same work         {r['grpcio_mib_per_s']:>8} MiB/s   (rounds {r['grpcio_mib_per_s_range'][0]}"
            f" to {r['grpcio_mib_per_s_range'][1]})",
            f"quilt UploadBundle            {r['upload_mib_per_s']:>8} MiB/s   (rounds {r['upload_mib_per_s_range'][0]}"
            f" to {r['upload_mib_per_s_range'][1]}; {r['ratio']} of the raw copy)",
            f"quilt / grpcio.aio            {r['ratio_grpcio']:>8}         target >= {TARGET_RATIO}: "
            f"{'pass' if r['ratio_pass'] else 'FAIL'}",
            f"peak RSS, 64 MiB upload       {r['peak_rss_64_mib']:>8} MiB",
            f"peak RSS, 512 MiB upload      {r['peak_rss_512_mib']:>8} MiB"
            f"   (difference {r['peak_rss_difference_mib']} MiB)",
            f"target: within 32 MiB of each other, each under 128 MiB: {'pass' if r['pass'] else 'FAIL'}",
        ]
    )
