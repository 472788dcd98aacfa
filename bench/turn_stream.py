"""turn_stream: how late a model's text reaches a client through a turn, against reading the model
server directly; and a tool's 1,000 lines, every one, in order.

The model is `_paced_model.py` (its own process): each request gets CHUNKS content chunks, one
every INTERVAL_MS, each carrying the CLOCK_MONOTONIC time it was written. The measured path:
ExecuteTurn on the runtime (a grpcio client), each `text_delta` timestamped as it arrives. The
reference, in the same run and the same client process: the same stream read by a plain httpx
client straight from the model server. A chunk's latency is its arrival minus its writing; the
added latency is the turn's minus the reference's, at p50 and at p99 (target: p99 added under
10 ms). Then, without a model, `/run_command {"command": ["seq", "1000"]}`: every line must
reach the client as a `tool_output`, in order.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import struct_pb2

from aria_trio.proto.aria.v1 import session_pb2 as spb
from aria_trio.proto.aria.v1 import user_preference_pb2 as ppb

from .harness import BenchError, child_env, kill, percentile, progress, start_aria, start_model, tail

CHUNKS, INTERVAL_MS, TURNS = 200, 10, 5
LINES = 1000
TARGET_P99_MS = 10.0
ROOT = Path(__file__).resolve().parent.parent
PACED_MODEL = Path(__file__).resolve().parent / "_paced_model.py"


def _latencies(text: str, arrived_ns: int, into: list[float]) -> None:
    """The latency in ms of each `<n>@<written ns>` piece of a text that arrived at `arrived_ns`."""
    for piece in text.split():
        _, _, written = piece.partition("@")
        into.append((arrived_ns - int(written)) / 1e6)


def _preferences(channel: grpc.Channel, values: dict[str, Any]) -> None:
    update = channel.unary_unary(
        "/aria.v1.UserPreferenceService/UpdateUserPreferences",
        ppb.UpdateUserPreferencesRequest.SerializeToString,
        ppb.UserPreferences.FromString,
    )
    updates = struct_pb2.Struct()
    updates.update(values)
    update(ppb.UpdateUserPreferencesRequest(updates=updates), timeout=30)


def measure(runtime_socket: str, port: int, turns: int) -> dict[str, Any]:
    base_url = f"http://127.0.0.1:{port}/v1"
    direct: list[float] = []
    through: list[float] = []
    with grpc.insecure_channel(f"unix:{runtime_socket}") as ch, httpx.Client(timeout=60) as http:
        create = ch.unary_unary(
            "/aria.v1.SessionService/CreateSession", spb.CreateSessionRequest.SerializeToString, spb.Session.FromString
        )
        execute = ch.unary_stream(
            "/aria.v1.SessionService/ExecuteTurn", spb.ExecuteTurnRequest.SerializeToString, spb.TurnOutput.FromString
        )
        _preferences(ch, {"llm.base_url": base_url, "llm.model": "paced"})
        body = {"model": "paced", "messages": [{"role": "user", "content": "go"}], "stream": True}
        for n in range(turns + 1):  # (the first of each is a warm-up)
            got: list[float] = []
            with http.stream("POST", base_url + "/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    arrived = time.monotonic_ns()
                    if line.startswith("data: {"):
                        content = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                        _latencies(content, arrived, got)
            direct += got if n else []
            got = []
            session = create(spb.CreateSessionRequest(), timeout=30).id
            for event in execute(spb.ExecuteTurnRequest(session_id=session, input="go"), timeout=120):
                arrived = time.monotonic_ns()
                if event.WhichOneof("event") == "text_delta":
                    _latencies(event.text_delta.text, arrived, got)
            if len(got) != CHUNKS:
                raise SystemExit(f"the turn streamed {len(got)} of {CHUNKS} chunks")
            through += got if n else []
        # a tool's lines, without a model
        _preferences(ch, {"llm.base_url": None, "llm.model": None})
        session = create(spb.CreateSessionRequest(), timeout=30).id
        command = json.dumps({"command": ["seq", str(LINES)]})
        started = time.perf_counter()
        lines = [
            e.tool_output.stdout_line
            for e in execute(spb.ExecuteTurnRequest(session_id=session, input=f"/run_command {command}"), timeout=120)
            if e.WhichOneof("event") == "tool_output"
        ]
        lines_s = time.perf_counter() - started
    return {
        "direct_ms": direct,
        "turn_ms": through,
        "lines_in_order": lines == [str(i) for i in range(1, LINES + 1)],
        "lines_seen": len(lines),
        "lines_s": lines_s,
    }


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aria-bench-") as name, contextlib.ExitStack() as stack:
        tmp = Path(name)
        progress(f"starting the paced model server ({CHUNKS} chunks, {INTERVAL_MS} ms apart)")
        model, port = start_model(PACED_MODEL, tmp, "paced model server", str(CHUNKS), str(INTERVAL_MS))
        stack.callback(kill, model)
        progress("starting aria serve")
        aria = stack.enter_context(start_aria(tmp / "aria.sock", tmp / "data", tmp))
        progress(f"{TURNS} streams each (after a warm-up): straight from the model server, and through a turn")
        argv = [sys.executable, "-m", "bench.turn_stream", "measure", str(tmp / "aria.sock"), str(port), str(TURNS)]
        with open(tmp / "client.err", "wb") as err:
            done = subprocess.run(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=child_env()
            )
        if done.returncode != 0:
            raise BenchError(
                f"the turn_stream client failed (exit {done.returncode}):\n{tail(tmp / 'client.err')}\n"
                f"aria's log ends with:\n{tail(tmp / 'aria.log')}"
            )
        got = json.loads(done.stdout)
        aria.stop()
    direct, turn = got["direct_ms"], got["turn_ms"]
    result: dict[str, Any] = {"chunks": CHUNKS, "interval_ms": INTERVAL_MS, "turns": TURNS, "samples": len(turn)}
    for q in (50, 99):
        d, t = percentile(direct, q / 100), percentile(turn, q / 100)
        result[f"direct_p{q}_ms"], result[f"turn_p{q}_ms"], result[f"added_p{q}_ms"] = (
            round(d, 3),
            round(t, 3),
            round(t - d, 3),
        )
    result.update(
        target=f"p99 added < {TARGET_P99_MS:g} ms; {LINES} lines in order",
        lines_in_order=got["lines_in_order"],
        lines_seen=got["lines_seen"],
        lines_s=round(got["lines_s"], 3),
    )
    result["pass"] = result["added_p99_ms"] < TARGET_P99_MS and got["lines_in_order"]
    return result


def table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"turn_stream: {r['chunks']} chunks {r['interval_ms']} ms apart, {r['turns']} streams each "
            f"({r['samples']} deltas)",
            f"{'chunk written -> seen':<34}{'p50 ms':>10}{'p99 ms':>10}",
            f"{'httpx, straight from the model':<34}{r['direct_p50_ms']:>10}{r['direct_p99_ms']:>10}",
            f"{'grpcio, through ExecuteTurn':<34}{r['turn_p50_ms']:>10}{r['turn_p99_ms']:>10}",
            f"{'added by the runtime':<34}{r['added_p50_ms']:>10}{r['added_p99_ms']:>10}",
            f"run_command `seq {LINES}`: {r['lines_seen']} tool_output lines in {r['lines_s']} s, "
            f"{'all in order' if r['lines_in_order'] else 'NOT all in order'}",
            f"target {r['target']}: {'pass' if r['pass'] else 'FAIL'}",
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "measure":
        sys.exit("usage: python -m bench.turn_stream measure RUNTIME_SOCKET MODEL_PORT TURNS")
    print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
