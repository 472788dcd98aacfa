"""Store rows to aria.v1 messages: the one place that knows both shapes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import assert_never, cast

from google.protobuf import message as protobuf_message
from google.protobuf import timestamp_pb2

from aria_trio.proto.aria.v1 import aria_pb2, container_pb2, session_pb2, task_pb2
from aria_trio.runtime.agents.sessions import MessageRow, SessionRow
from aria_trio.runtime.agents.tool_calls import Call, Outcome
from aria_trio.runtime.agents.turns import (
    Final,
    MessageStored,
    ModelCallStarted,
    TextDelta,
    ToolCallStarted,
    ToolOutput,
    ToolResult,
    TurnEvent,
    Usage,
    tool_calls_of,
)
from aria_trio.runtime.kinds import OutputStream
from aria_trio.runtime.work.containers import ContainerRow
from aria_trio.runtime.work.tasks import OutputItem, TaskRow


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def set_times(msg: protobuf_message.Message, row: Mapping[str, object], *fields: str) -> None:
    """The optional timestamp fields of a message, from the row's microseconds where not NULL."""
    for field in fields:
        us = row.get(field)
        if us is not None:
            assert isinstance(us, int)
            getattr(msg, field).CopyFrom(timestamp(us))


def wire_status(status: int) -> aria_pb2.TaskStatus:
    """A stored status as the message field's type (the same integer; protobuf's stubs type enum
    fields by their wrapper class)."""
    return cast(aria_pb2.TaskStatus, status)


def task(row: TaskRow) -> task_pb2.Task:
    msg = task_pb2.Task(
        id=row["id"],
        user_id=row["user_id"],
        session_id=row["session_id"],
        container_id=row["container_id"],
        type=row["type"],
        command_json=row["command_json"],
        environment=json.loads(row["environment_json"]),
        timeout_seconds=row["timeout_seconds"],
        status=wire_status(row["status"]),
        created_at=timestamp(row["created_at"]),
        progress_percent=row["progress_percent"],
        current_operation=row["current_operation"],
    )
    set_times(msg, row, "started_at", "completed_at")
    for field in ("parent_task_id", "exit_code", "error_message"):
        if row.get(field) is not None:
            setattr(msg, field, row[field])
    return msg


def container(row: ContainerRow) -> container_pb2.Container:
    msg = container_pb2.Container(
        id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        image_path=row["image_path"],
        status=wire_status(row["status"]),
        created_at=timestamp(row["created_at"]),
    )
    if session_id := row["session_id"]:
        msg.session_id = session_id
    return msg


def session(row: SessionRow) -> session_pb2.Session:
    return session_pb2.Session(
        id=row["id"],
        user_id=row["user_id"],
        created_at=timestamp(row["created_at"]),
        context_data=json.loads(row["context_json"]),
        status=row["status"],
        agent_id=row["agent_id"],
    )


def tool_call(call: Call) -> session_pb2.ToolCall:
    return session_pb2.ToolCall(tool_name=call.name, parameters_json=call.arguments, call_id=call.call_id)


def message(row: MessageRow) -> session_pb2.Message:
    return session_pb2.Message(
        id=row["id"],
        role=cast(aria_pb2.MessageRole, row["role"]),  # (kinds.Role: the same numbers)
        content=row["content"],
        created_at=timestamp(row["created_at"]),
        tool_calls=[tool_call(c) for c in tool_calls_of(row)],
        tool_call_id=row["tool_call_id"] or "",
        tool_name=row["tool_name"] or "",
        reasoning=row["reasoning"],
        truncated=bool(row["truncated"]),
        usage=_message_usage(row["usage_json"]),
    )


def _message_usage(usage_json: str | None) -> session_pb2.TurnUsage | None:
    """An assistant message's model call, as TurnUsage (model_calls 1); None for other messages."""
    if not usage_json:
        return None
    usage = json.loads(usage_json)
    return session_pb2.TurnUsage(
        prompt_tokens=_u32(usage.get("prompt_tokens")),
        completion_tokens=_u32(usage.get("completion_tokens")),
        model_calls=1,
        tool_calls=_u32(usage.get("tool_calls")),
        duration_seconds=float(usage.get("duration_seconds") or 0),
    )


def _u32(value: object) -> int:
    """A count as uint32 (a server may report anything: clamped, never a wire error)."""
    return min(max(value, 0), 0xFFFFFFFF) if isinstance(value, int) and not isinstance(value, bool) else 0


def tool_result(call: Call, outcome: Outcome) -> session_pb2.ToolResult:
    result = session_pb2.ToolResult(
        tool_name=call.name,
        result_json=outcome.result_json,
        success=outcome.ok,
        call_id=call.call_id,
        duration_seconds=outcome.duration_seconds,
    )
    if outcome.error is not None:
        result.error_message = outcome.error
    return result


def turn_output(event: TurnEvent) -> session_pb2.TurnOutput:
    """One event of a turn as ExecuteTurn streams it."""
    match event:
        case MessageStored(row):
            return session_pb2.TurnOutput(message=message(row))
        case ToolCallStarted(call):
            return session_pb2.TurnOutput(tool_call=tool_call(call))
        case ToolResult(call, outcome):
            return session_pb2.TurnOutput(tool_result=tool_result(call, outcome))
        case Final(text):
            return session_pb2.TurnOutput(final_response=text)
        case ModelCallStarted(iteration):
            return session_pb2.TurnOutput(model_call=session_pb2.ModelCallStarted(iteration=iteration))
        case TextDelta(message_id, text, reasoning):
            return session_pb2.TurnOutput(
                text_delta=session_pb2.TextDelta(message_id=message_id, text=text, reasoning=reasoning)
            )
        case ToolOutput(call_id, stream, line):
            if stream == OutputStream.STDOUT:
                return session_pb2.TurnOutput(tool_output=session_pb2.ToolOutput(call_id=call_id, stdout_line=line))
            return session_pb2.TurnOutput(tool_output=session_pb2.ToolOutput(call_id=call_id, stderr_line=line))
        case Usage(prompt, completion, model_calls, tool_calls, seconds):
            return session_pb2.TurnOutput(
                usage=session_pb2.TurnUsage(
                    prompt_tokens=_u32(prompt),
                    completion_tokens=_u32(completion),
                    model_calls=model_calls,
                    tool_calls=tool_calls,
                    duration_seconds=seconds,
                )
            )
        case _:
            assert_never(event)


def task_output(task_id: str, item: OutputItem) -> task_pb2.TaskOutput:
    """One stored output item as TaskService.StreamTaskOutput (and the tap) send it."""
    out = task_pb2.TaskOutput(task_id=task_id, timestamp=timestamp(item.at_us))
    if item.stream == OutputStream.PROGRESS:
        out.progress.CopyFrom(task_pb2.ProgressUpdate(percent_complete=item.percent, operation_description=item.line))
    elif item.stream == OutputStream.STDERR:
        out.stderr_line = item.line
    else:
        out.stdout_line = item.line
    return out
