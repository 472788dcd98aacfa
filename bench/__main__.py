"""`python -m bench [NAME ...]`: run benchmarks (default: all of BENCHMARKS), in the order given.

Each writes bench/results/NAME.json (its parameters, raw numbers, ratios and targets, with when and
where it ran) and prints its table; the tables of the run also go to bench/results/summary.txt.
A missed target is only reported. Exit code 1 if a benchmark could not run (a server did not start or
stop cleanly, a call failed), else 0.

A benchmark is a module with `run() -> dict` (its result, JSON-serialisable) and `table(result) -> str`;
add it to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Protocol

from . import (
    cpu_spinners,
    launch_first_line,
    list_tasks,
    notify_fanout,
    quilt_exec,
    quilt_upload,
    runtime_upload,
    soak,
    turn_overhead,
    turn_stream,
    unary_prefs,
)
from .harness import BenchError


class Benchmark(Protocol):
    def run(self) -> dict[str, Any]: ...

    def table(self, result: dict[str, Any]) -> str: ...


BENCHMARKS: dict[str, Benchmark] = {
    "unary_prefs": unary_prefs,
    "quilt_exec": quilt_exec,
    "launch_first_line": launch_first_line,
    "quilt_upload": quilt_upload,
    "list_tasks": list_tasks,
    "notify_fanout": notify_fanout,
    "runtime_upload": runtime_upload,
    "turn_overhead": turn_overhead,
    "turn_stream": turn_stream,
    "cpu_spinners": cpu_spinners,
    "soak": soak,
}
RESULTS = Path(__file__).resolve().parent / "results"


def _environment() -> dict[str, Any]:
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def _run_one(name: str) -> str:
    """Run a benchmark, write its JSON; its table."""
    benchmark = BENCHMARKS[name]
    result = {"benchmark": name, **_environment(), **benchmark.run()}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return f"{benchmark.table(result)}\n(full results: {path})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run aria's benchmarks.")
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: {', '.join(BENCHMARKS)})"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")

    RESULTS.mkdir(exist_ok=True)
    env = _environment()
    sections = [f"aria benchmarks, {env['timestamp']}, {env['python']} on {env['platform']} ({env['cpus']} cpus)"]
    failed = False
    for name in args.names or list(BENCHMARKS):
        try:
            section = _run_one(name)
        except BenchError as exc:
            print(f"bench: {name} could not run: {exc}", file=sys.stderr)
            section, failed = f"{name}: could not run: {exc}", True
        print(f"\n{section}", flush=True)
        sections.append(section)
    (RESULTS / "summary.txt").write_text("\n\n".join(sections) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
