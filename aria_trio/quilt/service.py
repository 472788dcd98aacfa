"""quilt.v1 over gRPC: decode a request, call the engine / bundle store / tool runner, encode."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TypedDict

import trio
from google.protobuf import timestamp_pb2

from aria_trio.proto.quilt.v1 import quilt_grpc
from aria_trio.proto.quilt.v1 import quilt_pb2 as pb
from aria_trio.quilt.attach import Attachments
from aria_trio.quilt.bundles import Bundle, BundleStore, Checksum, Metadata
from aria_trio.quilt.engine import Container, Engine, ExecSpec, Spec, Task
from aria_trio.quilt.output import Line, OutputLog
from aria_trio.quilt.tools import ToolResult, ToolRunner
from aria_trio.rpc import CallContext
from aria_trio.shared import errors
from aria_trio.shared.live_output import LIVE_LINES


def _ts(us: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(us * 1000)
    return ts


def container_pb(c: Container) -> pb.Container:
    s = c.spec
    msg = pb.Container(
        id=c.id,
        spec=pb.ContainerSpec(
            name=s.name,
            image=s.image,
            command=s.command,
            env=s.env,
            workdir=s.workdir,
            network=s.network,
            limits=pb.Limits(memory_bytes=s.memory_bytes, pids=s.pids, cpus=s.cpus, disk_bytes=s.disk_bytes),
            labels=s.labels,
        ),
        state=pb.ContainerState.Name(c.state),
        created_at=_ts(c.created_at),
        message=c.message,
        pid=c.pid,
    )
    _set_run(msg, c)
    return msg


def task_pb(t: Task) -> pb.Task:
    msg = pb.Task(
        id=t.id,
        container_id=t.container_id,
        command=t.command,
        state=pb.TaskState.Name(t.state),
        created_at=_ts(t.created_at),
        message=t.message,
        timeout_seconds=t.timeout_seconds,
        output_lines=t.log.count if t.log is not None else t.output_lines,
        output_truncated=t.log.truncated if t.log is not None else t.output_truncated,
        labels=t.labels,
        pid=t.pid,
    )
    _set_run(msg, t)
    return msg


def _set_run(msg: pb.Container | pb.Task, run: Container | Task) -> None:
    """The optional fields of a run (set only when known): start, end, exit code, signal."""
    if run.started_at is not None:
        msg.started_at.CopyFrom(_ts(run.started_at))
    if run.finished_at is not None:
        msg.finished_at.CopyFrom(_ts(run.finished_at))
    if run.exit_code is not None:
        msg.exit_code = run.exit_code
    if run.signal is not None:
        msg.signal = run.signal


def line_pb(line: Line) -> pb.OutputLine:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(line.time_ns)
    return pb.OutputLine(offset=line.offset, timestamp=ts, stream=pb.Stream.Name(line.stream), text=line.text)


def bundle_pb(b: Bundle) -> pb.Bundle:
    return pb.Bundle(
        id=b.id,
        name=b.name,
        version=b.version,
        filename=b.filename,
        size_bytes=b.size_bytes,
        sha256=b.sha256,
        blake3=b.id,
        created_at=_ts(b.created_at),
        layout=b.layout,
        manifest_json=json.dumps(b.manifest),
        tools=[
            pb.ToolSummary(
                name=t.name,
                description=t.description,
                input_schema_json=json.dumps(t.input_schema),
                runtime=t.runtime,
                entry=t.entry,
            )
            for t in b.tools
        ],
        agents=[pb.AgentSummary(**dataclasses.asdict(a)) for a in b.agents],
        labels=b.labels,
    )


class ContainersService(quilt_grpc.ContainersServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def CreateContainer(self, request: pb.CreateContainerRequest, ctx: CallContext) -> pb.Container:
        s = request.spec
        spec = Spec(
            name=s.name,
            image=s.image or "host",
            command=list(s.command),
            env=dict(s.env),
            workdir=s.workdir or "/workspace",
            network=s.network,
            memory_bytes=s.limits.memory_bytes,
            pids=s.limits.pids,
            cpus=s.limits.cpus,
            disk_bytes=s.limits.disk_bytes,
            labels=dict(s.labels),
        )
        if s.command and not s.command[0]:
            raise errors.InvalidArgument(
                "command must not start with an empty string", fields={"spec.command": "empty"}
            )
        return container_pb(await self.engine.create(spec))

    async def StartContainer(self, request: pb.ContainerRef, ctx: CallContext) -> pb.Container:
        return container_pb(await self.engine.start(request.id))

    async def StopContainer(self, request: pb.StopContainerRequest, ctx: CallContext) -> pb.Container:
        errors.seconds(request.grace_seconds, "grace_seconds", 24 * 3600)
        return container_pb(await self.engine.stop(request.id, request.grace_seconds))

    async def RemoveContainer(self, request: pb.RemoveContainerRequest, ctx: CallContext) -> pb.RemoveContainerResponse:
        await self.engine.remove(request.id, request.force)
        return pb.RemoveContainerResponse()

    async def GetContainer(self, request: pb.ContainerRef, ctx: CallContext) -> pb.Container:
        return container_pb(self.engine.container(request.id))

    async def ListContainers(self, request: pb.ListContainersRequest, ctx: CallContext) -> pb.ListContainersResponse:
        found = self.engine.list_containers(set(request.states), dict(request.labels))
        return pb.ListContainersResponse(containers=[container_pb(c) for c in found])

    async def WaitContainer(self, request: pb.ContainerRef, ctx: CallContext) -> pb.Container:
        return container_pb(await self.engine.wait(request.id))

    async def ContainerLogs(self, request: pb.ContainerLogsRequest, ctx: CallContext) -> AsyncIterator[pb.OutputLine]:
        log = await self.engine.container_log(request.id)
        since = errors.timestamp_ns(request.since, "since") if request.HasField("since") else 0
        async for line in log.lines(request.offset, follow=request.follow, since_ns=since):
            yield line_pb(line)


class TasksService(quilt_grpc.TasksServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def _spec(request: pb.ExecRequest) -> ExecSpec:
        if len(request.stdin) > 1024 * 1024:
            raise errors.InvalidArgument("stdin is limited to 1 MiB", fields={"stdin": "too large"})
        return ExecSpec(
            request.container_id,
            list(request.command),
            dict(request.env),
            request.workdir,
            request.timeout_seconds,
            request.stdin,
            dict(request.labels),
        )

    async def Exec(self, request: pb.ExecRequest, ctx: CallContext) -> pb.ExecResult:
        task, captured = await self.engine.exec_and_wait(self._spec(request))
        return pb.ExecResult(
            task=task_pb(task),
            stdout=captured.stdout.decode("utf-8", "replace"),
            stderr=captured.stderr.decode("utf-8", "replace"),
            stdout_truncated=captured.stdout_truncated,
            stderr_truncated=captured.stderr_truncated,
            duration_seconds=_duration(task),
        )

    async def ExecAsync(self, request: pb.ExecRequest, ctx: CallContext) -> pb.Task:
        return task_pb(await self.engine.exec(self._spec(request)))

    async def GetTask(self, request: pb.TaskRef, ctx: CallContext) -> pb.Task:
        return task_pb(await self.engine.task(request.id))

    async def GetTaskResult(self, request: pb.TaskResultRequest, ctx: CallContext) -> pb.ExecResult:
        task = await self.engine.task(request.id)
        if not task.done.is_set():
            if not request.wait:
                raise errors.FailedPrecondition(f"task {task.id} is still running", reason="TASK_RUNNING")
            await task.done.wait()
        out, err = await _head_of(await self.engine.task_log(task))
        return pb.ExecResult(
            task=task_pb(task),
            stdout=out[0],
            stderr=err[0],
            stdout_truncated=out[1],
            stderr_truncated=err[1],
            duration_seconds=_duration(task),
        )

    async def ListTasks(self, request: pb.ListTasksRequest, ctx: CallContext) -> pb.ListTasksResponse:
        tasks = await self.engine.list_tasks(request.container_id, set(request.states))
        return pb.ListTasksResponse(tasks=[task_pb(t) for t in tasks])

    async def CancelTask(self, request: pb.TaskRef, ctx: CallContext) -> pb.CancelTaskResponse:
        cancelled, task = await self.engine.cancel(request.id)
        return pb.CancelTaskResponse(cancelled=cancelled, task=task_pb(task))

    async def TaskOutput(self, request: pb.TaskOutputRequest, ctx: CallContext) -> AsyncIterator[pb.OutputLine]:
        task = await self.engine.task(request.id)
        log = await self.engine.task_log(task)
        async for line in log.lines(request.offset, follow=request.follow):
            yield line_pb(line)


def _duration(task: Task) -> float:
    if task.started_at is None or task.finished_at is None:
        return 0.0
    return (task.finished_at - task.started_at) / 1e6


async def _head_of(log: OutputLog, limit: int = 1024 * 1024) -> tuple[tuple[str, bool], tuple[str, bool]]:
    """The first `limit` bytes of stdout and of stderr, rebuilt from the log's lines."""
    parts: dict[int, list[str]] = {1: [], 2: []}
    sizes = {1: 0, 2: 0}
    cut = {1: False, 2: False}
    async for line in log.lines(0):
        if line.stream not in parts or cut[line.stream]:
            continue
        text = line.text + "\n"
        if sizes[line.stream] + len(text) > limit:
            cut[line.stream] = True
            continue
        parts[line.stream].append(text)
        sizes[line.stream] += len(text)
    return ("".join(parts[1]), cut[1] or log.truncated), ("".join(parts[2]), cut[2] or log.truncated)


class BundlesService(quilt_grpc.BundlesServicer):  # type: ignore[misc]
    def __init__(self, store: BundleStore, runner: ToolRunner) -> None:
        self.store = store
        self.runner = runner

    async def UploadBundle(self, requests: AsyncIterator[pb.UploadBundleRequest], ctx: CallContext) -> pb.Bundle:
        async def items() -> AsyncGenerator[Metadata | bytes | Checksum, None]:
            async for r in requests:
                kind = r.WhichOneof("payload")
                if kind == "metadata":
                    m = r.metadata
                    yield Metadata(m.filename, m.size_bytes, m.sha256, dict(m.labels))
                elif kind == "chunk":
                    yield r.chunk
                elif kind == "checksum":
                    yield Checksum(r.checksum.sha256, r.checksum.blake3)
                else:
                    raise errors.InvalidArgument("an upload message carries nothing", fields={"payload": "empty"})

        stream = items()
        try:
            return bundle_pb(await self.store.upload(stream))
        finally:
            await stream.aclose()

    async def GetBundle(self, request: pb.BundleRef, ctx: CallContext) -> pb.Bundle:
        return bundle_pb(await self.store.get(request.id))

    async def ListBundles(self, request: pb.ListBundlesRequest, ctx: CallContext) -> pb.ListBundlesResponse:
        bundles, token = await self.store.page(request.page_size, request.page_token)
        return pb.ListBundlesResponse(bundles=[bundle_pb(b) for b in bundles], next_page_token=token)

    async def DeleteBundle(self, request: pb.BundleRef, ctx: CallContext) -> pb.DeleteBundleResponse:
        await self.store.delete(request.id)
        return pb.DeleteBundleResponse()

    async def ValidateBundle(self, request: pb.BundleRef, ctx: CallContext) -> pb.ValidateBundleResponse:
        problem = await self.store.validate(request.id)
        return pb.ValidateBundleResponse(valid=not problem, error=problem)

    async def RunTool(self, request: pb.RunToolRequest, ctx: CallContext) -> pb.RunToolResult:
        errors.seconds(request.timeout_seconds, "timeout_seconds", 24 * 3600)
        return _tool_result(await self._run_tool(request))

    @trio.as_safe_channel
    async def RunToolStream(
        self, request: pb.RunToolRequest, ctx: CallContext
    ) -> AsyncGenerator[pb.RunToolEvent, None]:
        """RunTool, with the tool's log lines as it prints them, then the result. The tool runs in
        a task of this call's own; its lines wait for the reader in a channel that holds a run's
        whole live cap (tools.LiveLines), so a slow reader never slows the tool."""
        errors.seconds(request.timeout_seconds, "timeout_seconds", 24 * 3600)
        send, receive = trio.open_memory_channel[str](LIVE_LINES + 1)
        done: list[ToolResult] = []

        async def run() -> None:
            async with send:
                done.append(await self._run_tool(request, send))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            async with receive:
                offset = 0
                async for text in receive:
                    yield pb.RunToolEvent(line=pb.OutputLine(offset=offset, stream=pb.STDERR, text=text))
                    offset += 1
        yield pb.RunToolEvent(result=_tool_result(done[0]))

    async def _run_tool(
        self, request: pb.RunToolRequest, lines: trio.MemorySendChannel[str] | None = None
    ) -> ToolResult:
        return await self.runner.run(
            request.bundle_id,
            request.tool_name,
            request.arguments_json,
            request.timeout_seconds,
            request.memory_bytes,
            request.network,
            lines,
        )


class SystemService(quilt_grpc.SystemServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine, bundles: BundleStore, attachments: Attachments | None = None) -> None:
        self.engine = engine
        self.bundles = bundles
        self.attachments = attachments or Attachments(managed=False, grace=0.0)
        self.started = time.monotonic()

    async def Attach(self, request: pb.AttachRequest, ctx: CallContext) -> AsyncIterator[pb.Attached]:
        """Held open by a runtime for as long as it uses this Quilt (attach.py)."""
        with self.attachments.attached(request.runtime_pid):
            yield pb.Attached(
                data_dir=str(self.engine.settings.data_dir.resolve()),
                pid=os.getpid(),
                orphan_grace_seconds=self.attachments.grace,
            )
            await trio.sleep_forever()

    async def GetSystemMetrics(self, request: pb.GetSystemMetricsRequest, ctx: CallContext) -> pb.SystemMetrics:
        total, running, tasks = self.engine.counts()
        count, size = await self.engine.store.run(
            lambda db: db.execute("SELECT count(*), coalesce(sum(size_bytes), 0) FROM bundles").fetchone()
        )
        host = await trio.to_thread.run_sync(_host_metrics, self.engine.settings.data_dir)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return pb.SystemMetrics(
            now=now,
            uptime_seconds=time.monotonic() - self.started,
            sandbox=self.engine.sandbox.kind,
            limits=self.engine.sandbox.limits.name,
            containers_total=total,
            containers_running=running,
            tasks_running=tasks,
            bundles=count,
            bundle_bytes=size,
            **host,
        )


class _HostMetrics(TypedDict):
    """The host's part of SystemMetrics."""

    load_1m: float
    memory_total_bytes: int
    memory_available_bytes: int
    disk_free_bytes: int
    rss_bytes: int


def _host_metrics(data_dir: Path) -> _HostMetrics:
    """Load, memory, free disk, our RSS: from /proc and statvfs (a worker thread's job)."""
    fields = {}
    for path, keys in (("/proc/meminfo", ("MemTotal", "MemAvailable")), ("/proc/self/status", ("VmRSS",))):
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    fields[key] = int(rest.split()[0]) * 1024
    return {
        "load_1m": os.getloadavg()[0],
        "memory_total_bytes": fields.get("MemTotal", 0),
        "memory_available_bytes": fields.get("MemAvailable", 0),
        "disk_free_bytes": shutil.disk_usage(data_dir).free,
        "rss_bytes": fields.get("VmRSS", 0),
    }


def _tool_result(r: ToolResult) -> pb.RunToolResult:
    result = pb.RunToolResult(
        ok=r.ok,
        result_json=r.result_json,
        error=r.error,
        log=r.log[: 1024 * 1024],
        duration_seconds=r.duration_seconds,
        timed_out=r.timed_out,
    )
    if r.exit_code is not None:
        result.exit_code = r.exit_code
    return result
