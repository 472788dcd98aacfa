"""sessions: a user's conversations with an agent."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from aria_trio.shared.sqlite import PAGE_BYTES, bounded, row_bytes


def insert(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    db.table("sessions").insert(row)


def set_status(db: sqlite_utils.Database, session_id: str, status: str, at: int) -> None:
    db.table("sessions").update(session_id, {"status": status, "updated_at": at})


def get(db: sqlite_utils.Database, user_id: str, session_id: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM sessions WHERE id = ? AND user_id = ?", [session_id, user_id]))
    return rows[0] if rows else None


def page(db: sqlite_utils.Database, user_id: str, limit: int, after: tuple[int, str] | None) -> list[dict[str, Any]]:
    """Newest first; keyset on (created_at, id)."""
    sql = "SELECT * FROM sessions WHERE user_id = ?"
    params: list[Any] = [user_id]
    if after is not None:
        sql += " AND (created_at, id) < (?, ?)"
        params += after
    return bounded(
        db.query(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", [*params, limit]), limit, PAGE_BYTES, row_bytes
    )
