"""Store rows to aria.v1 messages: the one place that knows both shapes."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import timestamp_pb2

from aria_trio.proto.aria.v1 import container_pb2, session_pb2, task_pb2
from aria_trio.runtime.agents.tool_calls import Call
from aria_trio.runtime.agents.turns import tool_calls_of
from aria_trio.runtime.kinds import OutputStream
from aria_trio.runtime.work.tasks import OutputItem


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def set_times(msg: Any, row: dict[str, Any], *fields: str) -> None:
    """The optional timestamp fields of a message, from the row's microseconds where not NULL."""
    for field in fields:
        if row.get(field) is not None:
            getattr(msg, field).CopyFrom(timestamp(row[field]))


def task(row: dict[str, Any]) -> task_pb2.Task:
    msg = task_pb2.Task(
        id=row["id"],
        user_id=row["user_id"],
        session_id=row["session_id"],
        container_id=row["container_id"],
        type=row["type"],
        command_json=row["command_json"],
        environment=json.loads(row["environment_json"]),
        timeout_seconds=row["timeout_seconds"],
        status=row["status"],
        created_at=timestamp(row["created_at"]),
        progress_percent=row["progress_percent"],
        current_operation=row["current_operation"],
    )
    set_times(msg, row, "started_at", "completed_at")
    for field in ("parent_task_id", "exit_code", "error_message"):
        if row.get(field) is not None:
            setattr(msg, field, row[field])
    return msg


def container(row: dict[str, Any]) -> container_pb2.Container:
    msg = container_pb2.Container(
        id=row["id"],
        user_id=row["user_id"],
        name=row["name"],
        image_path=row["image_path"],
        status=row["status"],
        created_at=timestamp(row["created_at"]),
    )
    if row.get("session_id"):
        msg.session_id = row["session_id"]
    return msg


def session(row: dict[str, Any]) -> session_pb2.Session:
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


def message(row: dict[str, Any]) -> session_pb2.Message:
    return session_pb2.Message(
        id=row["id"],
        role=row["role"],
        content=row["content"],
        created_at=timestamp(row["created_at"]),
        tool_calls=[tool_call(c) for c in tool_calls_of(row)],
        tool_call_id=row.get("tool_call_id") or "",
        tool_name=row.get("tool_name") or "",
    )


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
