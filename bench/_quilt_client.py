"""Load generator of the quilt benchmarks, run as a process of its own.

_quilt_client.py exec SOCKET CONTAINER_ID WORKDIR N
    N times, alternating: `echo hi` run by the same bubblewrap command quilt builds, directly
    (spawn to its first line read), and ExecAsync of `echo hi` in quilt (call to the first line
    seen by a TaskOutput follower). Prints {"direct_ms": [...], "quilt_ms": [...]}.
_quilt_client.py upload SOCKET FILE
    Streams FILE to UploadBundle in 1 MiB chunks. Prints {"seconds": s, "bundle_id": id}.
_quilt_client.py copy SOCKET FILE
    Sends FILE over a plain Unix socket to `_quilt_client.py sink`. Prints {"seconds": s}.
_quilt_client.py sink SOCKET
    Accepts one connection and reads it to the end (the raw-copy reference).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb
from aria_trio.quilt.images import HOST
from aria_trio.quilt.limits import LimitsMode
from aria_trio.quilt.sandbox import Sandbox, base_env

CHUNK = 1024 * 1024


def direct_argv(workdir: Path) -> list[str]:
    """The argv quilt would run for `echo hi` (without the cgroup step and the pid report)."""
    for sub in ("workspace", "tmp"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    argv = Sandbox.detect("bubblewrap", LimitsMode("rlimits")).argv(
        ["/bin/echo", "hi"],
        image=HOST,
        workspace=workdir / "workspace",
        tmp=workdir / "tmp",
        workdir="/workspace",
        env=base_env({}),
        network=False,
        hostname="bench",
        cgroup=None,
        memory_bytes=0,
        pids=0,
    )
    i = argv.index("--info-fd")
    return argv[:i] + argv[i + 2 :]


def exec_bench(path: str, container: str, workdir: str, n: int) -> None:
    argv = direct_argv(Path(workdir))
    direct, quilt = [], []
    with grpc.insecure_channel("unix:" + path) as ch:
        exec_async = ch.unary_unary("/quilt.v1.Tasks/ExecAsync", pb.ExecRequest.SerializeToString, pb.Task.FromString)
        output = ch.unary_stream(
            "/quilt.v1.Tasks/TaskOutput", pb.TaskOutputRequest.SerializeToString, pb.OutputLine.FromString
        )
        exec_async(pb.ExecRequest(container_id=container, command=["/bin/true"]), timeout=30)  # warm up
        for _ in range(n):
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline() == b"hi\n"
            direct.append((time.perf_counter() - started) * 1000)
            proc.wait()

            started = time.perf_counter()
            task = exec_async(pb.ExecRequest(container_id=container, command=["/bin/echo", "hi"]), timeout=30)
            first = next(iter(output(pb.TaskOutputRequest(id=task.id, follow=True), timeout=30)))
            assert first.text == "hi", first
            quilt.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"direct_ms": direct, "quilt_ms": quilt}))


def chunks(path: str) -> Iterator[pb.UploadBundleRequest]:
    size = Path(path).stat().st_size
    yield pb.UploadBundleRequest(metadata=pb.BundleMetadata(filename=Path(path).name, size_bytes=size))
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            yield pb.UploadBundleRequest(chunk=data)


def upload(path: str, file: str) -> None:
    with grpc.insecure_channel("unix:" + path) as ch:
        call = ch.stream_unary(
            "/quilt.v1.Bundles/UploadBundle", pb.UploadBundleRequest.SerializeToString, pb.Bundle.FromString
        )
        started = time.perf_counter()
        bundle = call(chunks(file), timeout=600)
        print(json.dumps({"seconds": time.perf_counter() - started, "bundle_id": bundle.id}))


def copy(path: str, file: str) -> None:
    with socket.socket(socket.AF_UNIX) as s, open(file, "rb") as f:
        s.connect(path)
        started = time.perf_counter()
        while data := f.read(CHUNK):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes once it has read everything
        print(json.dumps({"seconds": time.perf_counter() - started}))


def sink(path: str) -> None:
    Path(path).unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            while conn.recv(CHUNK):
                pass


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "exec":
        exec_bench(rest[0], rest[1], rest[2], int(rest[3]))
    elif mode == "upload":
        upload(*rest)
    elif mode == "copy":
        copy(*rest)
    elif mode == "sink":
        sink(*rest)
    else:
        sys.exit(f"unknown mode {mode}")
