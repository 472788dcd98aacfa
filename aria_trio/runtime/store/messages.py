"""messages and tool_executions: a session's conversation, and every tool run in it."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from aria_trio.shared.sqlite import PAGE_BYTES, bounded, row_bytes, transaction

# Text of the history sent to the model (the newest messages that fit): models take far less.
HISTORY_BYTES = 2 * 1024 * 1024


def append(db: sqlite_utils.Database, row: dict[str, Any]) -> dict[str, Any]:
    """Add a message at the end of its session (its `seq` is the next one); the row as stored."""
    with transaction(db):
        seq = db.execute(
            "SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE session_id = ?", [row["session_id"]]
        ).fetchone()[0]
        row = {**row, "seq": seq}
        db.table("messages").insert(row)
        db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", [row["created_at"], row["session_id"]])
    return row


def last(
    db: sqlite_utils.Database, session_id: str, limit: int, max_bytes: int = HISTORY_BYTES
) -> list[dict[str, Any]]:
    """The session's last messages, oldest first: at most `limit`, and only as many of the newest
    as fit in `max_bytes` of text (the one that goes past is left out, unless it is the only one)."""
    rows = bounded(
        db.query("SELECT * FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?", [session_id, limit]),
        limit,
        max_bytes,
        row_bytes,
    )
    if len(rows) > 1 and sum(row_bytes(r) for r in rows) > max_bytes:
        rows.pop()
    return rows[::-1]


def page(db: sqlite_utils.Database, session_id: str, after_seq: int, limit: int) -> list[dict[str, Any]]:
    return bounded(
        db.query(
            "SELECT * FROM messages WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            [session_id, after_seq, limit],
        ),
        limit,
        PAGE_BYTES,
        row_bytes,
    )


def log_tool_execution(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    db.table("tool_executions").insert(row)
