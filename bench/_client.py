"""Load generator of bench.unary_prefs, run as a process of its own (its own GIL, its own core).

    _client.py seed SOCKET UPDATES_JSON
        One UpdateUserPreferences call; prints the preferences returned, as JSON.
    _client.py sequential SOCKET [--duration S] [--warmup N]
        grpcio (sync) calling GetUserPreferences one call at a time.
    _client.py concurrent SOCKET [--duration S] [--warmup N] [--concurrency C]
        grpcio.aio on one channel, C coroutines each calling GetUserPreferences in a loop.

sequential and concurrent make the warm-up calls, print `ready` and wait for `go` on stdin (the
benchmark reads the server's CPU time meanwhile), call for --duration seconds, then print one JSON
line: calls, elapsed_s, latency_ms (p50, p90, p99, max, mean of every call) and sample (the first
response, for the benchmark to check). A failed call ends the process with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from aria_trio.proto.aria.v1 import user_preference_pb2 as pb

SERVICE = "/aria.v1.UserPreferenceService"
CALL_TIMEOUT_S = 10.0
REQUEST = pb.GetUserPreferencesRequest()


def _target(socket_path: str) -> str:
    return f"unix:{socket_path}"


def _get(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        f"{SERVICE}/GetUserPreferences",
        request_serializer=pb.GetUserPreferencesRequest.SerializeToString,
        response_deserializer=pb.UserPreferences.FromString,
    )


def _as_dict(response: pb.UserPreferences) -> dict[str, Any]:
    answer: dict[str, Any] = json_format.MessageToDict(response.preferences)
    return answer


def _wait_for_go() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("_client.py: the benchmark did not say go")


def _summary(latencies_ns: list[int], elapsed_ns: int, sample: dict[str, Any]) -> dict[str, Any]:
    ordered = sorted(latencies_ns)

    def ms(ns: float) -> float:
        return round(ns / 1e6, 4)

    def percentile(q: float) -> float:  # nearest rank
        return ms(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {
        "calls": len(ordered),
        "elapsed_s": round(elapsed_ns / 1e9, 4),
        "latency_ms": {
            "p50": percentile(0.50),
            "p90": percentile(0.90),
            "p99": percentile(0.99),
            "max": ms(ordered[-1]),
            "mean": ms(sum(ordered) / len(ordered)),
        },
        "sample": sample,
    }


def seed(socket_path: str, updates: dict[str, Any]) -> dict[str, Any]:
    request = pb.UpdateUserPreferencesRequest()
    request.updates.update(updates)
    with grpc.insecure_channel(_target(socket_path)) as channel:
        update = channel.unary_unary(
            f"{SERVICE}/UpdateUserPreferences",
            request_serializer=pb.UpdateUserPreferencesRequest.SerializeToString,
            response_deserializer=pb.UserPreferences.FromString,
        )
        return _as_dict(update(request, timeout=CALL_TIMEOUT_S))


def sequential(socket_path: str, duration_s: float, warmup: int) -> dict[str, Any]:
    with grpc.insecure_channel(_target(socket_path)) as channel:
        get = _get(channel)
        sample = _as_dict(get(REQUEST, timeout=CALL_TIMEOUT_S))
        for _ in range(warmup - 1):
            get(REQUEST, timeout=CALL_TIMEOUT_S)
        _wait_for_go()
        latencies: list[int] = []
        start = time.perf_counter_ns()
        deadline = start + int(duration_s * 1e9)
        end = start
        while end < deadline:
            before = time.perf_counter_ns()
            get(REQUEST, timeout=CALL_TIMEOUT_S)
            end = time.perf_counter_ns()
            latencies.append(end - before)
        return _summary(latencies, end - start, sample)


async def _drive(get: Callable[..., Awaitable[Any]], concurrency: int, more: Callable[[], bool]) -> list[int]:
    """concurrency coroutines calling get while more() says so; the latency of every call."""
    latencies: list[int] = []

    async def worker() -> None:
        while more():
            before = time.perf_counter_ns()
            await get(REQUEST, timeout=CALL_TIMEOUT_S)
            latencies.append(time.perf_counter_ns() - before)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def concurrent(socket_path: str, duration_s: float, warmup: int, concurrency: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(_target(socket_path)) as channel:
        get = _get(channel)
        sample = _as_dict(await get(REQUEST, timeout=CALL_TIMEOUT_S))
        warmup_left: Iterator[int] = iter(range(warmup - 1))
        await _drive(get, concurrency, lambda: next(warmup_left, None) is not None)
        await asyncio.to_thread(_wait_for_go)
        start = time.perf_counter_ns()
        deadline = start + int(duration_s * 1e9)
        latencies = await _drive(get, concurrency, lambda: time.perf_counter_ns() < deadline)
        return _summary(latencies, time.perf_counter_ns() - start, sample)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="_client.py", description="Load generator of bench.unary_prefs.")
    modes = parser.add_subparsers(dest="mode", required=True)
    seeding = modes.add_parser("seed")
    seeding.add_argument("socket")
    seeding.add_argument("updates", type=json.loads)
    for name in ("sequential", "concurrent"):
        load = modes.add_parser(name)
        load.add_argument("socket")
        load.add_argument("--duration", type=float, default=4.0, help="seconds of measured calls")
        load.add_argument("--warmup", type=int, default=300, help="calls made before the measurement")
        if name == "concurrent":
            load.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    return parser


def main() -> int:
    args = _parser().parse_args()
    try:
        if args.mode == "seed":
            result = seed(args.socket, args.updates)
        elif args.mode == "sequential":
            result = sequential(args.socket, args.duration, max(args.warmup, 1))
        else:
            result = asyncio.run(concurrent(args.socket, args.duration, max(args.warmup, 1), args.concurrency))
    except grpc.RpcError as exc:
        print(f"_client.py {args.mode}: a call failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
