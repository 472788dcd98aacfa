"""launch_first_line: the whole path a client sees, LaunchTask on the runtime to the first line at a
StreamTaskOutput follower, against the same `echo hi` spawned directly by the bwrap command Quilt
builds (spawn to its first line read), in the same run.

Two kinds of launch: `container:exec:<id>` into a running container (the runtime stores the task,
asks Quilt's ExecAsync, its watcher stores the line, the follower gets it), and `container:run`,
a fresh throw-away container per task (which adds the container's creation, its disk and its
start). One client process (`python -m bench.launch_first_line measure ...`) alternates the three.
Target (issue 14): exec at most 2x direct bwrap.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from aria_trio.proto.aria.v1 import container_pb2 as cpb
from aria_trio.proto.aria.v1 import task_pb2 as tpb

from ._quilt_client import direct_argv
from .harness import BenchError, child_env, progress, start_aria, tail

RUNS, WARMUP = 60, 5
TARGET = 2.0
ROOT = Path(__file__).resolve().parent.parent


def measure(socket: str, workdir: str, runs: int, warmup: int) -> dict[str, list[float]]:
    argv = direct_argv(Path(workdir))
    out: dict[str, list[float]] = {"direct_ms": [], "exec_ms": [], "run_ms": []}
    with grpc.insecure_channel(f"unix:{socket}") as ch:
        launch = ch.unary_unary(
            "/aria.v1.TaskService/LaunchTask",
            tpb.LaunchTaskRequest.SerializeToString,
            tpb.LaunchTaskResponse.FromString,
        )
        follow = ch.unary_stream(
            "/aria.v1.TaskService/StreamTaskOutput",
            tpb.StreamTaskOutputRequest.SerializeToString,
            tpb.TaskOutput.FromString,
        )
        create = ch.unary_unary(
            "/aria.v1.ContainerService/CreateContainer",
            cpb.CreateContainerRequest.SerializeToString,
            cpb.Container.FromString,
        )
        start = ch.unary_unary(
            "/aria.v1.ContainerService/StartContainer",
            cpb.StartContainerRequest.SerializeToString,
            cpb.StartContainerResponse.FromString,
        )
        box = create(cpb.CreateContainerRequest(name="bench", persistent=True), timeout=30)
        start(cpb.StartContainerRequest(container_id=box.id), timeout=30)
        time.sleep(0.5)
        command = json.dumps(["/bin/echo", "hi"])

        def first_line(kind: str) -> float:
            began = time.perf_counter()
            task = launch(tpb.LaunchTaskRequest(type=kind, command_json=command), timeout=30)
            stream = follow(tpb.StreamTaskOutputRequest(task_id=task.task_id, follow=True), timeout=30)
            line = next(iter(stream))
            took = (time.perf_counter() - began) * 1000
            stream.cancel()
            if line.stdout_line != "hi":
                raise SystemExit(f"unexpected first line: {line}")
            return took

        def direct() -> float:
            began = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline() == b"hi\n"
            took = (time.perf_counter() - began) * 1000
            proc.wait()
            return took

        for n in range(warmup + runs):
            got = (direct(), first_line(f"container:exec:{box.id}"), first_line("container:run"))
            if n >= warmup:
                for key, value in zip(("direct_ms", "exec_ms", "run_ms"), got, strict=True):
                    out[key].append(value)
            time.sleep(0.05)  # (the throw-away containers go meanwhile)
    return out


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aria-bench-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        progress("starting aria serve")
        aria = stack.enter_context(start_aria(tmp / "aria.sock", tmp / "data", tmp))
        progress(f"{RUNS} runs each (after {WARMUP}): direct bwrap, LaunchTask exec, LaunchTask run, to the first line")
        argv = [sys.executable, "-m", "bench.launch_first_line", "measure", str(tmp / "aria.sock"), str(tmp / "direct")]
        argv += [str(RUNS), str(WARMUP)]
        with open(tmp / "client.err", "wb") as err:
            done = subprocess.run(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=child_env()
            )
        if done.returncode != 0:
            raise BenchError(
                f"the launch benchmark client failed (exit {done.returncode}):\n{tail(tmp / 'client.err')}\n"
                f"aria's log ends with:\n{tail(tmp / 'aria.log')}"
            )
        times = json.loads(done.stdout)
        aria.stop()
    result: dict[str, Any] = {"runs": RUNS}
    for key in ("direct_ms", "exec_ms", "run_ms"):
        result[key.replace("_ms", "_median_ms")] = round(statistics.median(times[key]), 2)
        result[key.replace("_ms", "_p90_ms")] = round(statistics.quantiles(times[key], n=10)[-1], 2)
    result["exec_ratio"] = round(result["exec_median_ms"] / result["direct_median_ms"], 2)
    result["run_ratio"] = round(result["run_median_ms"] / result["direct_median_ms"], 2)
    result["target"] = f"exec <= {TARGET:g}x direct bwrap"
    result["pass"] = result["exec_ratio"] <= TARGET
    result.update(times)
    return result


def table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"launch_first_line: `echo hi`, call to its first line at a follower, {r['runs']} runs each",
            f"{'':<40}{'median ms':>10}{'p90 ms':>10}{'ratio':>8}",
            f"{'direct bwrap (the reference)':<40}{r['direct_median_ms']:>10}{r['direct_p90_ms']:>10}{1.0:>8}",
            f"{'LaunchTask container:exec + follower':<40}{r['exec_median_ms']:>10}{r['exec_p90_ms']:>10}"
            f"{r['exec_ratio']:>8}",
            f"{'LaunchTask container:run + follower':<40}{r['run_median_ms']:>10}{r['run_p90_ms']:>10}"
            f"{r['run_ratio']:>8}",
            f"target {r['target']}: {'pass' if r['pass'] else 'FAIL'}",
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "measure":
        sys.exit("usage: python -m bench.launch_first_line measure RUNTIME_SOCKET WORKDIR RUNS WARMUP")
    print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
