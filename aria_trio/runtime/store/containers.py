"""containers: the caller's containers (Quilt holds the sandboxes; this holds who owns which)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypedDict, cast

import sqlite_utils

from aria_trio.runtime.kinds import TaskStatus
from aria_trio.shared.sqlite import insert_row, update_row


class ContainerRow(TypedDict):
    """A row of `containers`: times in microseconds, status an aria.v1.TaskStatus (TaskStatus)."""

    id: str
    user_id: str
    session_id: str | None
    name: str
    image_path: str
    environment_json: str  # a JSON object of strings
    command_json: str  # a JSON array of strings
    persistent: int  # 0 or 1
    status: int
    exit_code: int | None
    quilt_container_id: str
    created_at: int
    updated_at: int
    message: str  # how it ended, in Quilt's words


class ContainerChange(TypedDict):
    """What a status change sets."""

    status: int
    exit_code: int | None
    message: str
    updated_at: int


def _rows(db: sqlite_utils.Database, sql: str, params: Sequence[str | int]) -> Iterator[ContainerRow]:
    return cast(Iterator[ContainerRow], db.query(sql, params))


def insert(db: sqlite_utils.Database, row: ContainerRow) -> None:
    insert_row(db, "containers", row)


def update(db: sqlite_utils.Database, container_id: str, fields: ContainerChange) -> None:
    update_row(db, "containers", container_id, fields)


def get(db: sqlite_utils.Database, user_id: str, container_id: str) -> ContainerRow | None:
    return next(_rows(db, "SELECT * FROM containers WHERE id = ? AND user_id = ?", [container_id, user_id]), None)


def status(db: sqlite_utils.Database, container_id: str) -> int | None:
    row = db.execute("SELECT status FROM containers WHERE id = ?", [container_id]).fetchone()
    return int(row[0]) if row else None


def delete(db: sqlite_utils.Database, container_id: str) -> None:
    db.execute("DELETE FROM containers WHERE id = ?", [container_id])


def of_user(db: sqlite_utils.Database, user_id: str, session_id: str | None) -> list[ContainerRow]:
    if session_id is None:
        return list(_rows(db, "SELECT * FROM containers WHERE user_id = ? ORDER BY created_at, id", [user_id]))
    return list(
        _rows(
            db,
            "SELECT * FROM containers WHERE user_id = ? AND session_id = ? ORDER BY created_at, id",
            [user_id, session_id],
        )
    )


def ids(db: sqlite_utils.Database) -> set[str]:
    return {row[0] for row in db.execute("SELECT id FROM containers").fetchall()}


def running(db: sqlite_utils.Database) -> list[ContainerRow]:
    return list(_rows(db, "SELECT * FROM containers WHERE status IN (1, 2)", []))


def running_count(db: sqlite_utils.Database, user: str) -> int:
    """How many of the user's containers are running (for the max_running_containers quota)."""
    return int(db.execute("SELECT count(*) FROM containers WHERE user_id = ? AND status = 2", [user]).fetchone()[0])


def count_running(db: sqlite_utils.Database) -> int:
    """Containers RUNNING (a container's status is an aria.v1.TaskStatus, like a task's)."""
    row = db.execute("SELECT count(*) FROM containers WHERE status = ?", [int(TaskStatus.RUNNING)]).fetchone()
    return int(row[0])
