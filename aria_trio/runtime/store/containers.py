"""containers: the caller's containers (Quilt holds the sandboxes; this holds who owns which)."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from aria_trio.runtime.kinds import TaskStatus


def insert(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    db.table("containers").insert(row)


def update(db: sqlite_utils.Database, container_id: str, fields: dict[str, Any]) -> None:
    db.table("containers").update(container_id, fields)


def get(db: sqlite_utils.Database, user_id: str, container_id: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM containers WHERE id = ? AND user_id = ?", [container_id, user_id]))
    return rows[0] if rows else None


def status(db: sqlite_utils.Database, container_id: str) -> int | None:
    row = db.execute("SELECT status FROM containers WHERE id = ?", [container_id]).fetchone()
    return int(row[0]) if row else None


def delete(db: sqlite_utils.Database, container_id: str) -> None:
    db.execute("DELETE FROM containers WHERE id = ?", [container_id])


def of_user(db: sqlite_utils.Database, user_id: str, session_id: str | None) -> list[dict[str, Any]]:
    if session_id is None:
        return list(db.query("SELECT * FROM containers WHERE user_id = ? ORDER BY created_at, id", [user_id]))
    return list(
        db.query(
            "SELECT * FROM containers WHERE user_id = ? AND session_id = ? ORDER BY created_at, id",
            [user_id, session_id],
        )
    )


def ids(db: sqlite_utils.Database) -> set[str]:
    return {row[0] for row in db.execute("SELECT id FROM containers").fetchall()}


def running(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM containers WHERE status IN (1, 2)"))


def running_count(db: sqlite_utils.Database, user: str) -> int:
    """How many of the user's containers are running (for the max_running_containers quota)."""
    return int(db.execute("SELECT count(*) FROM containers WHERE user_id = ? AND status = 2", [user]).fetchone()[0])


def count_running(db: sqlite_utils.Database) -> int:
    """Containers RUNNING (a container's status is an aria.v1.TaskStatus, like a task's)."""
    row = db.execute("SELECT count(*) FROM containers WHERE status = ?", [int(TaskStatus.RUNNING)]).fetchone()
    return int(row[0])
