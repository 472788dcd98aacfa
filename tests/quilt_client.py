"""A grpcio client for quilt.v1 (an independent peer), with the few helpers the tests share."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb
from aria_trio.quilt.stage import stage_id

C, T, B, S = "/quilt.v1.Containers/", "/quilt.v1.Tasks/", "/quilt.v1.Bundles/", "/quilt.v1.System/"


class QuiltClient:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def call(self, path: str, request: Any, reply: Any, timeout: float = 30) -> Any:
        return self.channel.unary_unary(path, request.SerializeToString, reply.FromString)(request, timeout=timeout)

    def stream(self, path: str, request: Any, reply: Any, timeout: float = 30) -> Any:
        return self.channel.unary_stream(path, request.SerializeToString, reply.FromString)(request, timeout=timeout)

    # containers
    def create(self, command: list[str] | None = None, **spec: Any) -> pb.Container:
        return self.call(
            C + "CreateContainer",
            pb.CreateContainerRequest(spec=pb.ContainerSpec(command=command or [], **spec)),
            pb.Container,
        )

    def start(self, cid: str) -> pb.Container:
        return self.call(C + "StartContainer", pb.ContainerRef(id=cid), pb.Container)

    def run(self, command: list[str] | None = None, **spec: Any) -> pb.Container:
        return self.start(self.create(command, **spec).id)

    def get(self, cid: str) -> pb.Container:
        return self.call(C + "GetContainer", pb.ContainerRef(id=cid), pb.Container)

    def stop(self, cid: str, grace: float = 0) -> pb.Container:
        return self.call(C + "StopContainer", pb.StopContainerRequest(id=cid, grace_seconds=grace), pb.Container)

    def remove(self, cid: str, force: bool = False) -> None:
        self.call(C + "RemoveContainer", pb.RemoveContainerRequest(id=cid, force=force), pb.RemoveContainerResponse)

    def logs(self, cid: str, follow: bool = False, timeout: float = 30) -> Any:
        return self.stream(C + "ContainerLogs", pb.ContainerLogsRequest(id=cid, follow=follow), pb.OutputLine, timeout)

    def wait_container(self, cid: str, timeout: float = 20) -> pb.Container:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.get(cid)
            if c.state not in (pb.CONTAINER_CREATED, pb.CONTAINER_RUNNING):
                return c
            time.sleep(0.02)
        raise AssertionError(f"container {cid} still {c.state}")

    # tasks
    def exec(self, cid: str, command: list[str], timeout: float = 60, **kw: Any) -> pb.ExecResult:
        return self.call(T + "Exec", pb.ExecRequest(container_id=cid, command=command, **kw), pb.ExecResult, timeout)

    def exec_async(self, cid: str, command: list[str], **kw: Any) -> pb.Task:
        return self.call(T + "ExecAsync", pb.ExecRequest(container_id=cid, command=command, **kw), pb.Task)

    def task(self, tid: str) -> pb.Task:
        return self.call(T + "GetTask", pb.TaskRef(id=tid), pb.Task)

    def result(self, tid: str, wait: bool = True, timeout: float = 60) -> pb.ExecResult:
        return self.call(T + "GetTaskResult", pb.TaskResultRequest(id=tid, wait=wait), pb.ExecResult, timeout)

    def cancel(self, tid: str) -> pb.CancelTaskResponse:
        return self.call(T + "CancelTask", pb.TaskRef(id=tid), pb.CancelTaskResponse)

    def output(self, tid: str, offset: int = 0, follow: bool = False, timeout: float = 30) -> Any:
        return self.stream(
            T + "TaskOutput", pb.TaskOutputRequest(id=tid, offset=offset, follow=follow), pb.OutputLine, timeout
        )


def error_of(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call did not fail")


def error_reason(err: grpc.RpcError) -> str | None:
    """The ErrorInfo reason of a failed call, if it has one."""
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return None


def descendants_running(root: int, needle: bytes) -> list[int]:
    """The processes below `root` whose command line (NUL-separated) holds `needle`."""
    found = []
    for pid in descendants(root):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def descendants(root: int) -> set[int]:
    """The pids of every live process below `root` (by their parent pids, on the host)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and alive(child):
                found.add(child)
                todo.append(child)
    return found


def quilt_daemons(mark: bytes) -> list[int]:
    """Live Quilt daemons whose command line (NUL-separated, one NUL added at the end) holds `mark`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"quilt\0serve" in cmdline and mark in cmdline + b"\0" and alive(int(entry)):
                found.append(int(entry))
    return found


def born(pid: int) -> int | None:
    """When the process with this pid started (clock ticks since boot; None if there is none):
    with it, a pid taken again by a new process (pid_max is 32768 here, and the suite spawns
    thousands) is not taken for the one that was there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Is there a process with this pid (not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sandbox_processes(data_dir: str) -> list[int]:
    """Host pids of the bubblewraps of a Quilt's sandboxes: processes whose command line names its
    data folder, or (Quilt as root) its stage (quilt/stage.py: bubblewrap gets the stage's paths),
    but not a daemon itself (whose --data-dir names it too)."""
    marks = (data_dir.encode(), stage_id(Path(data_dir)).encode())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"aria_trio" in cmdline and b"serve" in cmdline:
                continue  # a daemon, not a sandbox
            if any(m in cmdline for m in marks) and alive(int(entry)):
                found.append(int(entry))
    return found
