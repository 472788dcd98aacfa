"""turn_overhead: one agent turn with one tool call, against the same tool run directly in Quilt.

The turn: ExecuteTurn on a session of a bundle agent whose model is `_fake_model.py` (an
OpenAI-compatible server in a process of its own that answers at once: first a call of the Python
tool `add`, then, after the tool's result, a final text). So the turn is two model calls, the tool
run in a Quilt sandbox, and everything the runtime does around them (messages stored, schema
check, events streamed). The reference: the same tool with the same arguments run directly with
`/quilt.v1.Bundles/RunTool` on the runtime's own Quilt child (`<data dir>/quilt.sock`).

One client process (`python -m bench.turn_overhead measure ...`, run from the repository's root)
alternates the two, each turn in a fresh session (made before the clock starts: every turn has the
same history). Reported: median and p90 of each, and the added latency, median turn - median direct
tool. Target: under 20 ms.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import blake3
import grpc
from google.protobuf import struct_pb2

from aria_trio.proto.aria.v1 import bundle_pb2 as bpb
from aria_trio.proto.aria.v1 import session_pb2 as spb
from aria_trio.proto.aria.v1 import user_preference_pb2 as ppb
from aria_trio.proto.quilt.v1 import quilt_pb2 as qpb

from .harness import BenchError, child_env, kill, progress, start_aria, start_model, tail

RUNS = 100
WARMUP = 5
TARGET_MS = 20.0
AGENT = "Adder"
ARGUMENTS = '{"a": 1, "b": 2}'
ROOT = Path(__file__).resolve().parent.parent
FAKE_MODEL = Path(__file__).resolve().parent / "_fake_model.py"
MANIFEST = {
    "name": "bench-adder",
    "version": "1.0.0",
    "tools": [{"name": "add", "description": "Adds two numbers", "inputs": {"a": "number", "b": "number"}}],
    "agents": [{"name": AGENT, "description": "Adds", "tools": ["add"]}],
}
TOOL_SOURCE = "def add(a, b):\n    return a + b\n"


def make_bundle() -> bytes:
    """A flat .aria bundle: the agent and its one Python tool."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("manifest.json", json.dumps(MANIFEST))
        z.writestr("implementations/tools/add.py", TOOL_SOURCE)
    return out.getvalue()


# -- the measuring client (a process of its own) --------------------------------------------------


def measure(runtime_socket: str, quilt_socket: str, bundle_id: str, runs: int, warmup: int) -> dict[str, Any]:
    """Alternating: a turn in a fresh session, then RunTool directly; their wall times in ms."""
    with grpc.insecure_channel(f"unix:{runtime_socket}") as rt, grpc.insecure_channel(f"unix:{quilt_socket}") as qt:
        create = rt.unary_unary(
            "/aria.v1.SessionService/CreateSession", spb.CreateSessionRequest.SerializeToString, spb.Session.FromString
        )
        execute = rt.unary_stream(
            "/aria.v1.SessionService/ExecuteTurn", spb.ExecuteTurnRequest.SerializeToString, spb.TurnOutput.FromString
        )
        run_tool = qt.unary_unary(
            "/quilt.v1.Bundles/RunTool", qpb.RunToolRequest.SerializeToString, qpb.RunToolResult.FromString
        )

        def turn() -> float:
            session = create(spb.CreateSessionRequest(agent_id=AGENT), timeout=30).id
            started = time.perf_counter()
            events = list(execute(spb.ExecuteTurnRequest(session_id=session, input="add 1 and 2"), timeout=60))
            elapsed = (time.perf_counter() - started) * 1000
            kinds = [e.WhichOneof("event") for e in events]
            results = [e.tool_result for e in events if e.HasField("tool_result")]
            if kinds.count("tool_call") != 1 or len(results) != 1 or not results[0].success:
                raise SystemExit(f"unexpected turn: {events}")
            if json.loads(results[0].result_json) != 3 or events[-1].final_response != "The sum is 3.":
                raise SystemExit(f"unexpected turn: {events}")
            return elapsed

        def tool() -> float:
            request = qpb.RunToolRequest(bundle_id=bundle_id, tool_name="add", arguments_json=ARGUMENTS)
            started = time.perf_counter()
            result = run_tool(request, timeout=60)
            elapsed = (time.perf_counter() - started) * 1000
            if not result.ok or json.loads(result.result_json) != 3:
                raise SystemExit(f"unexpected RunTool result: {result}")
            return elapsed

        for _ in range(warmup):
            turn()
            tool()
        turns, tools = [], []
        for _ in range(runs):
            turns.append(turn())
            tools.append(tool())
    return {"turn_ms": turns, "tool_ms": tools}


# -- the benchmark --------------------------------------------------------------------------------


def _setup(socket_path: Path, bundle: bytes, model_port: int) -> str:
    """Upload the bundle and point this user's model settings at the fake model; the bundle's Quilt id."""
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        upload = ch.stream_unary(
            "/aria.v1.BundleService/UploadBundle",
            bpb.UploadBundleRequest.SerializeToString,
            bpb.UploadBundleResponse.FromString,
        )
        meta = bpb.BundleMetadata(name="bench-adder.aria", total_size_bytes=len(bundle))
        reply = upload(
            iter([bpb.UploadBundleRequest(metadata=meta), bpb.UploadBundleRequest(chunk=bundle)]), timeout=60
        )
        if not reply.success:
            raise BenchError(f"the bundle upload failed: {reply.error_message}")
        update = ch.unary_unary(
            "/aria.v1.UserPreferenceService/UpdateUserPreferences",
            ppb.UpdateUserPreferencesRequest.SerializeToString,
            ppb.UserPreferences.FromString,
        )
        updates = struct_pb2.Struct()
        updates.update({"llm.base_url": f"http://127.0.0.1:{model_port}/v1", "llm.model": "bench-model"})
        update(ppb.UpdateUserPreferencesRequest(updates=updates), timeout=30)
    return str(blake3.blake3(bundle).hexdigest())


def _in_turn_tool_ms(log_path: Path) -> list[float]:
    """The runtime's own time of each tool call (its `tool call` log lines), in order."""
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "tool call" and "ms" in entry:
                found.append(float(entry["ms"]))
    return found


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aria-bench-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        progress("starting the fake model server")
        model, port = start_model(FAKE_MODEL, tmp, "fake model server")
        stack.callback(kill, model)
        progress("starting aria serve")
        aria = stack.enter_context(start_aria(tmp / "aria.sock", tmp / "data", tmp))
        bundle_id = _setup(tmp / "aria.sock", make_bundle(), port)
        quilt_socket = tmp / "data" / "quilt.sock"
        if not quilt_socket.exists():
            raise BenchError(f"no Quilt child socket at {quilt_socket}")
        progress(f"{RUNS} runs each (after {WARMUP} warm-up runs): a turn with one tool call, RunTool directly")
        argv = [sys.executable, "-m", "bench.turn_overhead", "measure", str(tmp / "aria.sock"), str(quilt_socket)]
        argv += [bundle_id, str(RUNS), str(WARMUP)]
        with open(tmp / "client.err", "wb") as err:
            done = subprocess.run(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=child_env()
            )
        if done.returncode != 0:
            raise BenchError(
                f"the turn benchmark client failed (exit {done.returncode}):\n{tail(tmp / 'client.err')}\n"
                f"aria's log ends with:\n{tail(tmp / 'aria.log')}"
            )
        times = json.loads(done.stdout)
        aria.stop()
        in_turn = _in_turn_tool_ms(tmp / "aria.log")[-RUNS:]
    turn, tool = times["turn_ms"], times["tool_ms"]
    added = statistics.median(turn) - statistics.median(tool)
    paired = [t - d for t, d in zip(turn, tool, strict=True)]
    around = [t - d for t, d in zip(turn, in_turn, strict=True)] if len(in_turn) == len(turn) else []
    return {
        "runs": RUNS,
        "warmup": WARMUP,
        "turn_median_ms": round(statistics.median(turn), 2),
        "turn_p90_ms": round(_p90(turn), 2),
        "tool_median_ms": round(statistics.median(tool), 2),
        "tool_p90_ms": round(_p90(tool), 2),
        "added_median_ms": round(added, 2),
        "paired_added_median_ms": round(statistics.median(paired), 2),
        "in_turn_tool_median_ms": round(statistics.median(in_turn), 2) if in_turn else None,
        "around_tool_median_ms": round(statistics.median(around), 2) if around else None,
        "target": f"added < {TARGET_MS:g} ms",
        "pass": added < TARGET_MS,
        "turn_ms": turn,
        "tool_ms": tool,
        "in_turn_tool_ms": in_turn,
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"turn_overhead: a turn with one tool call (instant model) against RunTool directly, {r['runs']} runs each",
        f"{'':<26}{'median ms':>10}{'p90 ms':>10}",
        f"{'turn (ExecuteTurn)':<26}{r['turn_median_ms']:>10}{r['turn_p90_ms']:>10}",
        f"{'tool (Quilt RunTool)':<26}{r['tool_median_ms']:>10}{r['tool_p90_ms']:>10}",
    ]
    if r.get("around_tool_median_ms") is not None:
        lines.append(f"{'tool inside the turn':<26}{r['in_turn_tool_median_ms']:>10}   (the runtime's own timing)")
        lines.append(f"{'turn minus its own tool':<26}{r['around_tool_median_ms']:>10}")
    lines.append(
        f"added = median turn - median tool = {r['added_median_ms']} ms (paired median {r['paired_added_median_ms']})"
        f"  (target {r['target']}: {'pass' if r['pass'] else 'FAIL'})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "measure":
        sys.exit("usage: python -m bench.turn_overhead measure RUNTIME_SOCKET QUILT_SOCKET BUNDLE_ID RUNS WARMUP")
    _, _, runtime, quilt, bundle, n, w = sys.argv
    print(json.dumps(measure(runtime, quilt, bundle, int(n), int(w))))
