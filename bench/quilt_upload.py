"""quilt_upload: a 256 MiB bundle uploaded to quilt against the same bytes copied over a Unix socket;
and quilt's peak memory for a 64 MiB and a 512 MiB upload.

The upload path: gRPC chunks of 1 MiB, each written to a temporary file and hashed (blake3 and
sha256) in a worker thread, then the archive checked, fsynced and renamed. The reference: the
same file sent over a plain Unix socket to a process that reads and drops it. Both clients are
processes of their own. Memory: a fresh quilt per size, its VmHWM after the upload.
Targets: peak RSS for 64 MiB and 512 MiB within 32 MiB of each other, both under 128 MiB.
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

from .harness import BenchError, child_env, peak_rss_bytes, progress, run_script, start_quilt

MiB = 1024 * 1024
CLIENT = Path(__file__).resolve().parent / "_quilt_client.py"


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


def _upload(tmp: Path, bundle: Path, label: str) -> dict[str, Any]:
    with start_quilt(
        tmp / f"{label}.sock", tmp / f"quilt-{label}", tmp, "--max-bundle-bytes", str(1024 * MiB)
    ) as quilt:
        before = peak_rss_bytes(quilt.pid)
        out = json.loads(
            run_script(
                [sys.executable, str(CLIENT), "upload", str(quilt.socket_path), str(bundle)],
                f"upload {label}",
                tmp / "up.err",
            )
        )
        peak = peak_rss_bytes(quilt.pid)
        quilt.stop()
    size = bundle.stat().st_size
    return {
        "bytes": size,
        "seconds": out["seconds"],
        "mib_per_s": size / MiB / out["seconds"],
        "peak_rss_before": before,
        "peak_rss": peak,
    }


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
        results = {}
        for mib in (256, 64, 512):
            progress(f"uploading {mib} MiB to a fresh quilt")
            results[mib] = _upload(tmp, bundles[mib], f"u{mib}")
    rss64, rss512 = results[64]["peak_rss"], results[512]["peak_rss"]
    return {
        "copy_mib_per_s": round(copy_rate, 1),
        "upload_mib_per_s": round(results[256]["mib_per_s"], 1),
        "ratio": round(results[256]["mib_per_s"] / copy_rate, 3),
        "peak_rss_64_mib": round(rss64 / MiB, 1),
        "peak_rss_512_mib": round(rss512 / MiB, 1),
        "peak_rss_difference_mib": round((rss512 - rss64) / MiB, 1),
        "targets": {"difference_mib": "<= 32", "each_mib": "< 128"},
        "pass": abs(rss512 - rss64) <= 32 * MiB and max(rss64, rss512) < 128 * MiB,
        "uploads": {str(k): v for k, v in results.items()},
    }


def table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            "quilt_upload: a 256 MiB bundle, and quilt's peak RSS per upload size",
            f"raw copy over a Unix socket   {r['copy_mib_per_s']:>8} MiB/s",
            f"quilt UploadBundle            {r['upload_mib_per_s']:>8} MiB/s   (ratio {r['ratio']})",
            f"peak RSS, 64 MiB upload       {r['peak_rss_64_mib']:>8} MiB",
            f"peak RSS, 512 MiB upload      {r['peak_rss_512_mib']:>8} MiB"
            f"   (difference {r['peak_rss_difference_mib']} MiB)",
            f"target: within 32 MiB of each other, each under 128 MiB: {'pass' if r['pass'] else 'FAIL'}",
        ]
    )
