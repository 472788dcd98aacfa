"""cpu_spinners: how much sandboxes that spin on every core slow everyone else's calls.

One `aria serve` (with its Quilt child). A client process (bench/_client.py sequential) calls
GetUserPreferences one call at a time for DURATION_S seconds, idle; then SPINNERS tasks each run
`python3 -c 'while True: pass'` in their sandboxes (each with the default 1 CPU of quota, all of
them in the sandboxes' low-weight cgroup: quilt/limits.py), and the client runs again. The
idle and the loaded runs alternate ROUNDS times; of each kind the run with the lowest p99 is kept
(noise only ever adds latency).

Target (reported, not enforced): the p99 with the spinners at most 3 times the idle p99.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import task_pb2 as tpb

from .harness import BenchError, ServerProcess, progress, run_load, run_script, start_aria

DURATION_S = 4.0
WARMUP_CALLS = 200
SPINNERS = 4
ROUNDS = 3
TARGET = 3.0  # loaded p99 / idle p99, at most
SEED = {"ui.theme": "dark"}
TASKS = "/aria.v1.TaskService/"
CLIENT = Path(__file__).resolve().parent / "_client.py"


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aria-bench-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        progress("starting aria serve")
        aria = stack.enter_context(start_aria(tmp / "aria.sock", tmp / "data", tmp))
        run_script(
            [sys.executable, str(CLIENT), "seed", str(aria.socket_path), json.dumps(SEED)], "seeding", tmp / "s.err"
        )
        channel = stack.enter_context(grpc.insecure_channel(f"unix:{aria.socket_path}"))
        runs = []
        for round_no in range(1, ROUNDS + 1):
            runs.append(_measure(aria, "idle", round_no, tmp))
            spinners = [_launch(channel) for _ in range(SPINNERS)]
            _wait_running(channel, spinners)
            time.sleep(1.0)  # they spin
            runs.append(_measure(aria, "spinners", round_no, tmp))
            for task_id in spinners:
                _call(channel, "CancelTask", tpb.CancelTaskRequest(task_id=task_id), tpb.CancelTaskResponse)
            _wait_ended(channel, spinners)
        aria.stop()
    idle = min((r for r in runs if r["load"] == "idle"), key=lambda r: r["p99_ms"])
    loaded = min((r for r in runs if r["load"] == "spinners"), key=lambda r: r["p99_ms"])
    ratio = round(loaded["p99_ms"] / idle["p99_ms"], 2)
    return {
        "parameters": {"duration_s": DURATION_S, "spinners": SPINNERS, "rounds": ROUNDS, "cpus_each": 1.0},
        "runs": runs,
        "selected": {"idle": idle, "spinners": loaded},
        "ratio_p99": ratio,
        "targets": [{"metric": "p99 with spinners / idle p99", "bound": f"<= {TARGET}", "pass": ratio <= TARGET}],
    }


def _call(channel: grpc.Channel, method: str, request: Any, reply: Any) -> Any:
    fn = channel.unary_unary(TASKS + method, request.SerializeToString, reply.FromString)
    return fn(request, timeout=30)


def _launch(channel: grpc.Channel) -> str:
    request = tpb.LaunchTaskRequest(command_json=json.dumps(["python3", "-c", "while True: pass"]), timeout_seconds=600)
    return str(_call(channel, "LaunchTask", request, tpb.LaunchTaskResponse).task_id)


def _statuses(channel: grpc.Channel, ids: list[str]) -> list[int]:
    return [_call(channel, "GetTask", tpb.GetTaskRequest(task_id=i), tpb.Task).status for i in ids]


def _wait_running(channel: grpc.Channel, ids: list[str]) -> None:
    deadline = time.monotonic() + 30
    while any(s != aria_pb2.RUNNING for s in _statuses(channel, ids)):
        if time.monotonic() > deadline:
            raise BenchError("the spinner tasks did not start")
        time.sleep(0.1)


def _wait_ended(channel: grpc.Channel, ids: list[str]) -> None:
    deadline = time.monotonic() + 30
    while any(s in (aria_pb2.PENDING, aria_pb2.RUNNING) for s in _statuses(channel, ids)):
        if time.monotonic() > deadline:
            raise BenchError("the spinner tasks did not end when cancelled")
        time.sleep(0.1)


def _measure(aria: ServerProcess, load: str, round_no: int, tmp: Path) -> dict[str, Any]:
    argv = [sys.executable, str(CLIENT), "sequential", str(aria.socket_path)]
    argv += ["--duration", str(DURATION_S), "--warmup", str(WARMUP_CALLS)]
    raw = run_load(argv, aria, f"the client, {load}", tmp / f"client-{load}-{round_no}.err")
    run = {
        "round": round_no,
        "load": load,
        "calls_per_s": round(raw["calls"] / raw["elapsed_s"], 1),
        **{f"{key}_ms": value for key, value in raw["latency_ms"].items()},
    }
    progress(
        f"round {round_no} {load:<9} {run['calls_per_s']:>7.0f} calls/s  "
        f"p50 {run['p50_ms']:.3f} ms  p99 {run['p99_ms']:.3f} ms"
    )
    return run


def table(result: dict[str, Any]) -> str:
    idle, loaded = result["selected"]["idle"], result["selected"]["spinners"]
    verdict = "pass" if result["targets"][0]["pass"] else "FAIL"
    return "\n".join(
        [
            "cpu_spinners: GetUserPreferences one at a time, idle vs "
            f"{result['parameters']['spinners']} sandboxes spinning",
            f"  {'':<9} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8}",
            *(
                f"  {name:<9} {r['calls_per_s']:>8.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}"
                for name, r in (("idle", idle), ("spinners", loaded))
            ),
            f"  p99 ratio {result['ratio_p99']} (target <= {TARGET}): {verdict}",
        ]
    )
