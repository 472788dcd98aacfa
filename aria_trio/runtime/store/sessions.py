"""sessions: a user's conversations with an agent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, TypedDict, cast

import sqlite_utils

from aria_trio.shared.sqlite import PAGE_BYTES, bounded, insert_row, row_bytes, update_row

SessionStatus = Literal["active", "completed", "failed"]


class SessionRow(TypedDict):
    id: str
    user_id: str
    agent_id: str
    status: SessionStatus
    context_json: str  # a JSON object of strings
    created_at: int
    updated_at: int


def insert(db: sqlite_utils.Database, row: SessionRow) -> None:
    insert_row(db, "sessions", row)


def set_status(db: sqlite_utils.Database, session_id: str, status: SessionStatus, at: int) -> None:
    update_row(db, "sessions", session_id, {"status": status, "updated_at": at})


def get(db: sqlite_utils.Database, user_id: str, session_id: str) -> SessionRow | None:
    rows = cast(
        list[SessionRow], list(db.query("SELECT * FROM sessions WHERE id = ? AND user_id = ?", [session_id, user_id]))
    )
    return rows[0] if rows else None


def page(db: sqlite_utils.Database, user_id: str, limit: int, after: tuple[int, str] | None) -> list[SessionRow]:
    """Newest first; keyset on (created_at, id)."""
    sql = "SELECT * FROM sessions WHERE user_id = ?"
    params: list[str | int] = [user_id]
    if after is not None:
        sql += " AND (created_at, id) < (?, ?)"
        params += after
    found = cast(Iterator[SessionRow], db.query(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", [*params, limit]))
    return bounded(found, limit, PAGE_BYTES, row_bytes)
