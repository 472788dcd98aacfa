"""messages and tool_executions: a session's conversation, and every tool run in it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict, cast

import sqlite_utils

from aria_trio.shared.sqlite import PAGE_BYTES, bounded, insert_row, row_bytes, transaction

# Text of the history sent to the model (the newest messages that fit): models take far less.
HISTORY_BYTES = 2 * 1024 * 1024


class NewMessage(TypedDict):
    """A message to append: a row without its `seq`, which `append` gives it."""

    id: str
    session_id: str
    role: int  # a kinds.Role (SQLite gives back the plain int)
    content: str
    tool_calls_json: str | None  # an assistant's: the tool calls it asked for, as JSON
    tool_call_id: str | None  # a tool's: the call it answers
    tool_name: str | None
    created_at: int
    reasoning: str  # an assistant's reasoning text ("" when none): shown, never sent to the model
    truncated: int  # 1: an assistant's reply cut short as it streamed (the turn was cancelled)
    usage_json: (
        str | None
    )  # an assistant's model call: {"prompt_tokens", "completion_tokens", "tool_calls", "duration_seconds"}


class MessageRow(NewMessage):
    seq: int  # its place in the session, from 1


class ToolExecutionRow(TypedDict):
    id: str
    user_id: str
    session_id: str | None
    message_id: str | None
    tool_name: str
    parameters_json: str
    result_json: str | None
    error: str | None
    duration_ms: float | None
    container_id: str | None
    exit_status: int | None
    started_at: int


def append(db: sqlite_utils.Database, new: NewMessage) -> MessageRow:
    """Add a message at the end of its session (its `seq` is the next one); the row as stored."""
    with transaction(db):
        seq: int = db.execute(
            "SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE session_id = ?", [new["session_id"]]
        ).fetchone()[0]
        row = MessageRow(**new, seq=seq)
        insert_row(db, "messages", row)
        db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", [row["created_at"], row["session_id"]])
    return row


def last(db: sqlite_utils.Database, session_id: str, limit: int, max_bytes: int = HISTORY_BYTES) -> list[MessageRow]:
    """The session's last messages, oldest first: at most `limit`, and only as many of the newest
    as fit in `max_bytes` of text (the one that goes past is left out, unless it is the only one)."""
    newest = db.query("SELECT * FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?", [session_id, limit])
    rows = bounded(cast(Iterator[MessageRow], newest), limit, max_bytes, row_bytes)
    if len(rows) > 1 and sum(row_bytes(r) for r in rows) > max_bytes:
        rows.pop()
    return rows[::-1]


def page(db: sqlite_utils.Database, session_id: str, after_seq: int, limit: int) -> list[MessageRow]:
    found = db.query(
        "SELECT * FROM messages WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?", [session_id, after_seq, limit]
    )
    return bounded(cast(Iterator[MessageRow], found), limit, PAGE_BYTES, row_bytes)


def log_tool_execution(db: sqlite_utils.Database, row: ToolExecutionRow) -> None:
    insert_row(db, "tool_executions", row)
