"""messages and tool_executions: a session's conversation, and every tool run in it."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from .db import transaction


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


def last(db: sqlite_utils.Database, session_id: str, limit: int) -> list[dict[str, Any]]:
    """The session's last `limit` messages, oldest first."""
    rows = db.query(
        "SELECT * FROM (SELECT * FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
        [session_id, limit],
    )
    return list(rows)


def page(db: sqlite_utils.Database, session_id: str, after_seq: int, limit: int) -> list[dict[str, Any]]:
    return list(
        db.query(
            "SELECT * FROM messages WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            [session_id, after_seq, limit],
        )
    )


def log_tool_execution(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    db.table("tool_executions").insert(row)
