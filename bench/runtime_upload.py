"""runtime_upload: a 256 MiB bundle uploaded through the runtime (aria.v1 BundleService.UploadBundle,
which hands it on to Quilt) against the same bundle uploaded straight to Quilt (quilt.v1
Bundles/UploadBundle); and the runtime's peak memory for a 64 MiB and a 512 MiB upload.

Both clients are processes of their own sending 1 MiB chunks after the metadata (bench/_aria_client.py
upload, bench/_quilt_client.py upload). Every upload gets a fresh Quilt (started with a 1 GiB bundle
limit, above its 512 MiB default) and, through the runtime, a fresh `aria serve --quilt-socket` on it,
so no upload finds its bytes already stored and every peak RSS (VmHWM of the runtime's process, read
after the upload) belongs to that upload alone. Direct and runtime uploads take turns, ROUNDS times;
of each path the fastest run is kept (noise only slows runs down).

Targets (reported, not enforced): through the runtime at least 0.8 of straight to Quilt; the
runtime's peak RSS for 512 MiB within 32 MiB of that for 64 MiB.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .harness import ServerProcess, peak_rss_bytes, progress, run_script, start_aria, start_quilt
from .quilt_upload import MiB, make_bundle

SPEED_MIB = 256
MEMORY_MIB = (64, 512)
ROUNDS = 3
TARGET_DIFFERENCE_MIB = 32
TARGET_RATIO = 0.8
BENCH_DIR = Path(__file__).resolve().parent
CLIENTS = {"quilt": BENCH_DIR / "_quilt_client.py", "runtime": BENCH_DIR / "_aria_client.py"}


def _upload(workdir: Path, server: ServerProcess, path: str, bundle: Path) -> float:
    argv = [sys.executable, str(CLIENTS[path]), "upload", str(server.socket_path), str(bundle)]
    out = json.loads(run_script(argv, f"the upload to {path}", workdir / f"upload-{path}.err"))
    return float(out["seconds"])


def _measure(tmp: Path, label: str, path: str, bundle: Path) -> dict[str, Any]:
    """One upload of `bundle`, straight to a fresh Quilt (path "quilt") or through a fresh runtime on it."""
    workdir = tmp / label
    workdir.mkdir()
    quilt_args = ("--max-bundle-bytes", str(1024 * MiB))
    with start_quilt(workdir / "quilt.sock", workdir / "quilt", workdir, *quilt_args) as quilt:
        if path == "quilt":
            seconds = _upload(workdir, quilt, path, bundle)
            memory = {}
        else:
            extra = ("--quilt-socket", str(quilt.socket_path))
            with start_aria(workdir / "aria.sock", workdir / "data", workdir, *extra) as aria:
                rss_before, cpu_before = peak_rss_bytes(aria.pid), aria.cpu_seconds()
                seconds = _upload(workdir, aria, path, bundle)
                memory = {
                    "runtime_peak_rss_before_mib": round(rss_before / MiB, 1),
                    "runtime_peak_rss_mib": round(peak_rss_bytes(aria.pid) / MiB, 1),
                    "runtime_cpu_s": round(aria.cpu_seconds() - cpu_before, 2),
                    "quilt_peak_rss_mib": round(peak_rss_bytes(quilt.pid) / MiB, 1),
                }
                aria.stop()
        quilt.stop()
    size = bundle.stat().st_size
    run = {"path": path, "bytes": size, "seconds": round(seconds, 3), "mib_per_s": round(size / MiB / seconds, 1)}
    progress(f"{label}: {run['mib_per_s']} MiB/s")
    return {**run, **memory}


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aria-bench-", dir=os.environ.get("BENCH_TMP")) as name:
        tmp = Path(name)
        bundles = {}
        for mib in (SPEED_MIB, *MEMORY_MIB):
            progress(f"making a {mib} MiB bundle")
            bundles[mib] = tmp / f"b{mib}.aria"
            make_bundle(bundles[mib], mib * MiB)
        runs = [
            _measure(tmp, f"{path}-{SPEED_MIB}-round-{n}", path, bundles[SPEED_MIB])
            for n in range(1, ROUNDS + 1)
            for path in ("quilt", "runtime")
        ]
        memory = {mib: _measure(tmp, f"runtime-{mib}", "runtime", bundles[mib]) for mib in MEMORY_MIB}
    best = {path: max((r for r in runs if r["path"] == path), key=lambda r: r["mib_per_s"]) for path in CLIENTS}
    small, large = (memory[mib]["runtime_peak_rss_mib"] for mib in MEMORY_MIB)
    difference = round(large - small, 1)
    return {
        "parameters": {
            "speed_bundle_mib": SPEED_MIB,
            "memory_bundles_mib": list(MEMORY_MIB),
            "chunk_bytes": MiB,
            "rounds": ROUNDS,
            "selection": "per path, the fastest round",
            "quilt_max_bundle_bytes": 1024 * MiB,
        },
        "runs": runs,
        "memory_runs": {str(mib): run for mib, run in memory.items()},
        "direct_mib_per_s": best["quilt"]["mib_per_s"],
        "runtime_mib_per_s": best["runtime"]["mib_per_s"],
        "ratio": round(best["runtime"]["mib_per_s"] / best["quilt"]["mib_per_s"], 3),
        "runtime_peak_rss_mib": {str(mib): memory[mib]["runtime_peak_rss_mib"] for mib in MEMORY_MIB},
        "runtime_peak_rss_difference_mib": difference,
        "targets": [
            {
                "metric": "through the runtime / straight to Quilt (MiB/s)",
                "value": round(best["runtime"]["mib_per_s"] / best["quilt"]["mib_per_s"], 3),
                "target": f">= {TARGET_RATIO}",
                "pass": best["runtime"]["mib_per_s"] >= TARGET_RATIO * best["quilt"]["mib_per_s"],
            },
            {
                "metric": "runtime peak RSS, 512 MiB upload - 64 MiB upload (MiB)",
                "value": difference,
                "target": f"<= {TARGET_DIFFERENCE_MIB}",
                "pass": abs(difference) <= TARGET_DIFFERENCE_MIB,
            },
        ],
    }


def table(r: dict[str, Any]) -> str:
    rss = r["runtime_peak_rss_mib"]
    speed, target = r["targets"]
    return "\n".join(
        [
            f"runtime_upload: a {r['parameters']['speed_bundle_mib']} MiB bundle through the runtime vs straight to "
            f"Quilt (best of {r['parameters']['rounds']}); the runtime's peak RSS per upload size",
            f"straight to Quilt (quilt.v1 UploadBundle)       {r['direct_mib_per_s']:>8} MiB/s",
            f"through the runtime (aria.v1 UploadBundle)      {r['runtime_mib_per_s']:>8} MiB/s   (ratio {r['ratio']}, "
            f"target {speed['target']}: {'pass' if speed['pass'] else 'FAIL'})",
            *(f"runtime peak RSS, {mib} MiB upload {'':<13} {value:>8} MiB" for mib, value in rss.items()),
            f"difference {target['value']} MiB, target {target['target']}: {'pass' if target['pass'] else 'FAIL'}",
        ]
    )
