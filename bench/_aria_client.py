"""Clients of the runtime's aria.v1 services for the benchmarks, each run as a process of its own.

_aria_client.py page SOCKET [TOKEN]
    One ListTasks call (page_size 100). Prints {"ids": [...], "next_page_token": ...}.
_aria_client.py list SOCKET DEEP_TOKEN CALLS WARMUP
    ListTasks of the first page and of the page DEEP_TOKEN points to, alternately, WARMUP times
    each, then CALLS times each, one call at a time, every call tagged with an x-request-id
    (first-N, deep-N) for the server's log. Prints {"first_ms": [...], "deep_ms": [...]} (as the client saw them).
_aria_client.py subscribe SOCKET STREAMS PHASES
    STREAMS StreamNotifications calls (container_status, after_sequence 0) on one channel. Each
    replays event 1 (the warm-up); once all have it, prints `ready`. Then each takes events
    2, 3, ... in order; PHASES (e.g. 50,200) says how many belong to each phase. Prints per phase
    the latency of every delivery (receive time - Notification.timestamp) and the last receive time.
_aria_client.py publish SOCKET EVENTS RATE
    EVENTS CreateContainer calls (one container_status event each), RATE a second (0: back to back).
    The first call waits for the runtime's Quilt (UNAVAILABLE is retried). Prints {"start": s, "end": s}
    (wall clock) and the time of each call.
_aria_client.py upload SOCKET FILE
    Streams FILE to BundleService.UploadBundle: metadata, then 1 MiB chunks. Prints {"seconds": s, "bundle_id": id}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from aria_trio.proto.aria.v1 import bundle_pb2, container_pb2, notification_pb2, task_pb2

PAGE_SIZE = 100
CHUNK = 1024 * 1024
CALL_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 120.0  # a subscriber gives up when an event it waits for takes longer
QUILT_WAIT_S = 30.0


class Failed(Exception):
    """A call answered something other than what the benchmark needs."""


def _channel(socket_path: str) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{socket_path}")


def _list_tasks(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        "/aria.v1.TaskService/ListTasks",
        request_serializer=task_pb2.ListTasksRequest.SerializeToString,
        response_deserializer=task_pb2.ListTasksResponse.FromString,
    )


def page(socket_path: str, token: str = "") -> dict[str, Any]:
    with _channel(socket_path) as channel:
        answer = _list_tasks(channel)(task_pb2.ListTasksRequest(page_size=PAGE_SIZE, page_token=token))
    return {"ids": [t.id for t in answer.tasks], "next_page_token": answer.next_page_token}


def list_pages(socket_path: str, deep_token: str, calls: int, warmup: int) -> dict[str, Any]:
    requests = {
        "first": task_pb2.ListTasksRequest(page_size=PAGE_SIZE),
        "deep": task_pb2.ListTasksRequest(page_size=PAGE_SIZE, page_token=deep_token),
    }
    times: dict[str, list[float]] = {"first": [], "deep": []}
    with _channel(socket_path) as channel:
        list_tasks = _list_tasks(channel)
        for i in range(-warmup, calls):
            for name, request in requests.items():
                tag = f"{name}-{i}" if i >= 0 else f"warmup-{name}{i}"
                started = time.perf_counter()
                answer = list_tasks(request, metadata=[("x-request-id", tag)], timeout=CALL_TIMEOUT_S)
                elapsed = (time.perf_counter() - started) * 1000
                if len(answer.tasks) != PAGE_SIZE:
                    raise Failed(f"the {name} page has {len(answer.tasks)} tasks, not {PAGE_SIZE}")
                if i >= 0:
                    times[name].append(elapsed)
    return {f"{name}_ms": values for name, values in times.items()}


async def subscribe(socket_path: str, streams: int, phases: list[int]) -> dict[str, Any]:
    total = sum(phases)
    bounds = [sum(phases[:k]) for k in range(len(phases) + 1)]  # event k (0-based) is in phase p: bounds[p] <= k
    latencies: list[list[float]] = [[] for _ in phases]
    last_receive = [0.0] * len(phases)
    warmed = 0
    all_warm = asyncio.Event()
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        call = channel.unary_stream(
            "/aria.v1.NotificationService/StreamNotifications",
            request_serializer=notification_pb2.StreamNotificationsRequest.SerializeToString,
            response_deserializer=notification_pb2.Notification.FromString,
        )
        request = notification_pb2.StreamNotificationsRequest(event_types=["container_status"], after_sequence=0)

        async def one() -> None:
            nonlocal warmed
            stream = call(request).__aiter__()
            expected = 1
            while expected <= total + 1:
                n = await asyncio.wait_for(anext(stream, None), STREAM_TIMEOUT_S)
                now = time.time()
                if n is None:
                    raise Failed(f"a subscriber's stream ended before event {expected}")
                if n.sequence != expected:
                    raise Failed(f"a subscriber got event {n.sequence} where {expected} was due")
                if expected == 1:
                    warmed += 1
                    if warmed == streams:
                        all_warm.set()
                else:
                    k = expected - 2
                    phase = max(p for p in range(len(phases)) if bounds[p] <= k)
                    latencies[phase].append((now - n.timestamp.ToMicroseconds() / 1e6) * 1000)
                    last_receive[phase] = max(last_receive[phase], now)
                expected += 1

        async def announce() -> None:
            await asyncio.wait_for(all_warm.wait(), STREAM_TIMEOUT_S)
            print("ready", flush=True)

        await asyncio.gather(announce(), *(one() for _ in range(streams)))
    return {
        "phases": [{"latency_ms": lat, "last_receive": last} for lat, last in zip(latencies, last_receive, strict=True)]
    }


def publish(socket_path: str, events: int, rate: float) -> dict[str, Any]:
    with _channel(socket_path) as channel:
        create = channel.unary_unary(
            "/aria.v1.ContainerService/CreateContainer",
            request_serializer=container_pb2.CreateContainerRequest.SerializeToString,
            response_deserializer=container_pb2.Container.FromString,
        )
        call_ms = []
        start = time.time()
        for i in range(events):
            if rate:
                time.sleep(max(0.0, start + i / rate - time.time()))
            request = container_pb2.CreateContainerRequest(name=f"bench-{i}")
            before = time.perf_counter()
            _call(create, request, retry_unavailable=i == 0)
            call_ms.append((time.perf_counter() - before) * 1000)
        return {"start": start, "end": time.time(), "call_ms": call_ms}


def _call(method: Any, request: Any, *, retry_unavailable: bool) -> Any:
    """One call; with retry_unavailable, made again while the runtime answers UNAVAILABLE (its Quilt
    is not up yet), for up to QUILT_WAIT_S."""
    deadline = time.monotonic() + QUILT_WAIT_S
    while True:
        try:
            return method(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if not retry_unavailable or exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _chunks(path: Path) -> Iterator[bundle_pb2.UploadBundleRequest]:
    metadata = bundle_pb2.BundleMetadata(name=path.name, total_size_bytes=path.stat().st_size)
    yield bundle_pb2.UploadBundleRequest(metadata=metadata)
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            yield bundle_pb2.UploadBundleRequest(chunk=data)


def upload(socket_path: str, file: str) -> dict[str, Any]:
    with _channel(socket_path) as channel:
        call = channel.stream_unary(
            "/aria.v1.BundleService/UploadBundle",
            request_serializer=bundle_pb2.UploadBundleRequest.SerializeToString,
            response_deserializer=bundle_pb2.UploadBundleResponse.FromString,
        )
        started = time.perf_counter()
        answer = call(_chunks(Path(file)), timeout=600)
        seconds = time.perf_counter() - started
    if not answer.success:
        raise Failed(f"UploadBundle answered success=false: {answer.error_message}")
    return {"seconds": seconds, "bundle_id": answer.bundle_id}


def main(mode: str, args: list[str]) -> dict[str, Any]:
    if mode == "page":
        return page(*args)
    if mode == "list":
        return list_pages(args[0], args[1], int(args[2]), int(args[3]))
    if mode == "subscribe":
        return asyncio.run(subscribe(args[0], int(args[1]), [int(n) for n in args[2].split(",")]))
    if mode == "publish":
        return publish(args[0], int(args[1]), float(args[2]))
    if mode == "upload":
        return upload(*args)
    raise Failed(f"unknown mode {mode}")


if __name__ == "__main__":
    try:
        result = main(sys.argv[1], sys.argv[2:])
    except (grpc.RpcError, Failed, TimeoutError) as exc:
        sys.exit(f"_aria_client.py {sys.argv[1]}: {exc!r}")
    print(json.dumps(result), flush=True)
