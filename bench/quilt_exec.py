"""quilt_exec: ExecAsync of `echo hi` until a follower sees its line, against the same bwrap run directly.

Quilt's path: the call, the sandbox's spawn, the output written to disk and read back by a TaskOutput
follower. The reference: the same bubblewrap command quilt builds, spawned directly by the client,
to its first line on a pipe. Both measured by one client process, alternating, N times each.
Target: quilt's median at most 3 times the direct median.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

from .harness import progress, run_script, start_quilt

RUNS = 40
TARGET = 3.0
CLIENT = Path(__file__).resolve().parent / "_quilt_client.py"


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aria-bench-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        progress("starting quilt")
        quilt = stack.enter_context(start_quilt(tmp / "quilt.sock", tmp / "quilt", tmp))
        with grpc.insecure_channel(f"unix:{tmp / 'quilt.sock'}") as ch:
            create = ch.unary_unary(
                "/quilt.v1.Containers/CreateContainer",
                pb.CreateContainerRequest.SerializeToString,
                pb.Container.FromString,
            )
            start = ch.unary_unary(
                "/quilt.v1.Containers/StartContainer", pb.ContainerRef.SerializeToString, pb.Container.FromString
            )
            container = start(pb.ContainerRef(id=create(pb.CreateContainerRequest(), timeout=30).id), timeout=30)
        progress(f"{RUNS} runs each: direct bwrap, quilt ExecAsync + follower")
        argv = [
            sys.executable,
            str(CLIENT),
            "exec",
            str(tmp / "quilt.sock"),
            container.id,
            str(tmp / "direct"),
            str(RUNS),
        ]
        times = json.loads(run_script(argv, "the exec benchmark client", tmp / "client.err"))
        quilt.stop()
    direct, via_quilt = statistics.median(times["direct_ms"]), statistics.median(times["quilt_ms"])
    ratio = via_quilt / direct
    return {
        "runs": RUNS,
        "direct_median_ms": round(direct, 2),
        "quilt_median_ms": round(via_quilt, 2),
        "direct_p90_ms": round(statistics.quantiles(times["direct_ms"], n=10)[-1], 2),
        "quilt_p90_ms": round(statistics.quantiles(times["quilt_ms"], n=10)[-1], 2),
        "ratio": round(ratio, 2),
        "target": f"<= {TARGET}",
        "pass": ratio <= TARGET,
        "direct_ms": times["direct_ms"],
        "quilt_ms": times["quilt_ms"],
    }


def table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"quilt_exec: `echo hi` to its first line, {r['runs']} runs each",
            f"{'':<22}{'median ms':>10}{'p90 ms':>10}",
            f"{'direct bwrap':<22}{r['direct_median_ms']:>10}{r['direct_p90_ms']:>10}",
            f"{'quilt exec-async':<22}{r['quilt_median_ms']:>10}{r['quilt_p90_ms']:>10}",
            f"quilt/direct = {r['ratio']}  (target {r['target']}: {'pass' if r['pass'] else 'FAIL'})",
        ]
    )
