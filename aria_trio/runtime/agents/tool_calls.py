"""Running the tools an agent calls: the built-ins (`run_command`, `launch_task`) and bundle tools.

A call is checked before it runs: the tool must be one of the agent's (anything else is refused as
"not permitted", never run), its arguments must be a JSON object that its JSON Schema accepts.
A refusal or a failure is a result too (`ok=False` and why): the model reads it and may try
again. Bundle tools run in Quilt (RunToolStream: a sandbox with the bundle read-only at /bundle);
`run_command` runs an argv in a fresh throw-away Quilt container; `launch_task` starts a task
through the task service's own logic and returns its id. Cancelling a call (the client left)
kills its sandbox: Quilt ends a call's processes when the call is cancelled, and a container made
here is removed with force on the way out.

What a running tool prints reaches `on_output` line by line as it prints it (run_command: its
stdout and stderr, followed in Quilt's task log; a bundle tool: its log, its stderr), each line cut
at 64 KiB by Quilt, at most LIVE_LINES lines and LIVE_BYTES per call (then one line says the rest is
not shown). A slow `on_output` (a client that reads slowly) never slows the tool itself: a
command's output goes to Quilt's log on disk, which we follow at our pace, and Quilt holds a
bundle tool's live lines (up to the same cap) until we read them. The stored result is made from
Quilt's capture either way, so nothing of it is lost.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Required, TypedDict, cast

import jsonschema
import structlog
import trio

from aria_trio.proto.quilt.v1 import quilt_pb2 as q
from aria_trio.runtime.agents.registry import ToolInfo
from aria_trio.runtime.kinds import OutputStream
from aria_trio.runtime.quilt_client import QuiltLink
from aria_trio.runtime.store import messages as table
from aria_trio.runtime.work.tasks import Launch, Tasks
from aria_trio.shared import errors, json_input
from aria_trio.shared.live_output import LiveBound
from aria_trio.shared.sqlite import Store, now_us

log = structlog.get_logger("aria.tool_calls")

OUTPUT_CAP = 64 * 1024  # of each of stdout and stderr returned to the model; the rest is cut (and said)
RESULT_CAP = 256 * 1024  # of a result's JSON given back to the model

OnOutput = Callable[[OutputStream, str], Awaitable[None]]  # a running tool's line


async def _ignore(stream: OutputStream, line: str) -> None:
    pass


@dataclass
class Call:
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


class _RunCommand(TypedDict, total=False):
    """run_command's arguments, as its JSON Schema (agents/registry.py) accepted them."""

    command: Required[list[str]]
    timeout_seconds: float  # (an integer, which JSON Schema lets be 5.0)


class _LaunchTask(TypedDict, total=False):
    """launch_task's arguments, as its JSON Schema (agents/registry.py) accepted them."""

    command: Required[list[str]]
    timeout_seconds: float
    environment: dict[str, str]


@dataclass
class Outcome:
    ok: bool
    result_json: str  # "null" when not ok
    error: str | None = None
    container_id: str | None = None
    exit_status: int | None = None
    duration_seconds: float = 0.0  # the whole call: checks, sandbox and run (ToolCalls.run sets it)


class ToolCalls:
    def __init__(self, store: Store, quilt: QuiltLink, tasks: Tasks, tool_timeout: float) -> None:
        self.store = store
        self.quilt = quilt
        self.tasks = tasks
        self.tool_timeout = tool_timeout

    async def run(
        self,
        user: str,
        session_id: str,
        message_id: str,
        tools: dict[str, ToolInfo],
        call: Call,
        on_output: OnOutput = _ignore,
    ) -> Outcome:
        """Check, run and log one call; never raises for the tool's own failures."""
        started, started_us = time.monotonic(), now_us()
        outcome = await self._checked(user, session_id, tools, call, _Live(on_output))
        outcome.duration_seconds = time.monotonic() - started
        await self.store.run(
            table.log_tool_execution,
            {
                "id": "x-" + secrets.token_hex(8),
                "user_id": user,
                "session_id": session_id,
                "message_id": message_id,
                "tool_name": call.name,
                "parameters_json": call.arguments[:RESULT_CAP],
                "result_json": outcome.result_json if outcome.ok else None,
                "error": outcome.error,
                "duration_ms": outcome.duration_seconds * 1000,
                "container_id": outcome.container_id,
                "exit_status": outcome.exit_status,
                "started_at": started_us,
            },
        )
        log.info("tool call", tool=call.name, ok=outcome.ok, ms=round(outcome.duration_seconds * 1000, 1))
        return outcome

    async def _checked(
        self, user: str, session_id: str, tools: dict[str, ToolInfo], call: Call, live: _Live
    ) -> Outcome:
        tool = tools.get(call.name)
        if tool is None:
            return _failed(f"tool {call.name!r} is not one of this agent's tools: not permitted")
        try:
            arguments = json_input.loads(call.arguments or "{}")
        except ValueError as exc:
            return _failed(f"the arguments are not valid JSON: {exc}")
        if not isinstance(arguments, dict):
            return _failed("the arguments must be a JSON object")
        problem = _schema_problem(tool.schema, arguments)
        if problem:
            return _failed(f"invalid arguments: {problem}")
        try:
            if call.name == "run_command" and tool.builtin:
                return await self._run_command(cast(_RunCommand, arguments), live)
            if call.name == "launch_task" and tool.builtin:
                return await self._launch_task(user, session_id, cast(_LaunchTask, arguments))
            return await self._bundle_tool(tool, arguments, live)
        except errors.AriaError as exc:
            return _failed(exc.message)

    async def _run_command(self, arguments: _RunCommand, live: _Live) -> Outcome:
        timeout = float(arguments.get("timeout_seconds") or self.tool_timeout)
        spec = q.ContainerSpec(name="run_command", labels={"aria.tool": "run_command"})
        made = await self.quilt.create_container(q.CreateContainerRequest(spec=spec))
        try:
            await self.quilt.start_container(q.ContainerRef(id=made.id))
            request = q.ExecRequest(container_id=made.id, command=arguments["command"], timeout_seconds=timeout)
            task = await self.quilt.exec_async(request)
            # its lines as Quilt's task log gets them, to the end of the task (then the result)
            async with self.quilt.task_output(q.TaskOutputRequest(id=task.id, follow=True)) as lines:
                async for line in lines:
                    if line.stream in (q.STDOUT, q.STDERR):
                        stream = OutputStream.STDOUT if line.stream == q.STDOUT else OutputStream.STDERR
                        await live.line(stream, line.text)
                        if live.cut:
                            break  # (past the live bound: the rest is in the result, or in Quilt's log)
            done = await self.quilt.task_result(q.TaskResultRequest(id=task.id, wait=True), timeout=timeout + 30)
        finally:
            with trio.CancelScope(shield=True):  # the sandbox never outlives the call
                await self._remove(made.id)
        task = done.task
        exit_code = task.exit_code if task.HasField("exit_code") else None
        result = {
            "exit_code": exit_code,
            "stdout": _capped(done.stdout, done.stdout_truncated),
            "stderr": _capped(done.stderr, done.stderr_truncated),
        }
        if task.state == q.TASK_TIMEOUT:
            return Outcome(False, "null", f"timed out after {timeout:g} s", made.id, exit_code)
        if exit_code is None:
            return Outcome(False, "null", task.message or "the command did not run", made.id)
        return Outcome(True, json.dumps(result), None, made.id, exit_code)

    async def _launch_task(self, user: str, session_id: str, arguments: _LaunchTask) -> Outcome:
        launch = Launch(
            session_id=session_id,
            type="container:run",
            command=list(arguments["command"]),
            environment=dict(arguments.get("environment") or {}),
            timeout_seconds=int(arguments.get("timeout_seconds") or 0),
            parent_task_id=None,
        )
        task_id = await self.tasks.launch(user, launch, _no_containers)
        return Outcome(True, json.dumps({"task_id": task_id}))

    async def _bundle_tool(self, tool: ToolInfo, arguments: Mapping[str, object], live: _Live) -> Outcome:
        request = q.RunToolRequest(
            bundle_id=tool.bundle_blake3,
            tool_name=tool.name,
            arguments_json=json.dumps(arguments),
            timeout_seconds=self.tool_timeout,
        )
        r: q.RunToolResult | None = None
        with trio.move_on_after(self.tool_timeout + 30):
            async with self.quilt.run_tool_stream(request) as events:
                async for event in events:
                    if event.HasField("line"):
                        await live.line(OutputStream.STDERR, event.line.text)
                    elif event.HasField("result"):
                        r = event.result
        if r is None:
            raise errors.Unavailable("the container service did not answer the tool call in time")
        exit_code = r.exit_code if r.HasField("exit_code") else None
        if r.timed_out:
            return Outcome(False, "null", f"timed out after {self.tool_timeout:g} s", exit_status=exit_code)
        if not r.ok:
            return Outcome(False, "null", r.error or "the tool failed", exit_status=exit_code)
        if len(r.result_json) > RESULT_CAP:
            return Outcome(False, "null", f"the tool's result is larger than {RESULT_CAP} bytes")
        return Outcome(True, r.result_json, exit_status=exit_code)

    async def _remove(self, cid: str) -> None:
        try:
            await self.quilt.remove_container(q.RemoveContainerRequest(id=cid, force=True), timeout=30)
        except errors.AriaError as exc:
            log.warning("could not remove a run_command container", container=cid, error=exc.message)


def _failed(error: str) -> Outcome:
    return Outcome(False, "null", error)


def _schema_problem(schema: Mapping[str, object], arguments: Mapping[str, object]) -> str | None:
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(arguments))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where}: {error.message}" if where else error.message


def _capped(text: str, truncated: bool) -> str:
    if len(text) > OUTPUT_CAP:
        text, truncated = text[:OUTPUT_CAP], True
    return text + ("\n[... output truncated]" if truncated else "")


async def _no_containers(user: str, container_id: str) -> str:
    raise errors.InvalidArgument("launch_task runs in a fresh container only")


class _Live:
    """One call's live lines, bounded (shared.live_output: then one line says the rest is not shown)."""

    def __init__(self, on_output: OnOutput) -> None:
        self.on_output = on_output
        self.bound = LiveBound("aria")

    @property
    def cut(self) -> bool:
        return self.bound.cut

    async def line(self, stream: OutputStream, text: str) -> None:
        shown = self.bound.admit(text)
        if shown is not None:
            await self.on_output(OutputStream.STDERR if self.bound.cut else stream, shown)
