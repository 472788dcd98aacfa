"""tasks, task_status_history, task_output: everything about a task, so it outlives both daemons."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypedDict, cast

import sqlite_utils

from aria_trio.runtime.kinds import OutputStream, TaskStatus
from aria_trio.shared.sqlite import PAGE_BYTES, bounded, insert_row, now_us, row_bytes, transaction, update_row

REPLAY_BYTES = 1024 * 1024  # text of the output lines read from the store at a time (replaying a follow)

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT = TaskStatus
UNFINISHED = (PENDING, RUNNING)
STDOUT, STDERR, PROGRESS = OutputStream

OutputRow = tuple[int, int, str, float | None, int]  # seq, stream (an OutputStream), line, percent, at


class TaskRow(TypedDict):
    """A row of `tasks`: times in microseconds, status an aria.v1.TaskStatus (TaskStatus)."""

    id: str
    user_id: str
    session_id: str
    container_id: str  # a container:exec task's container (Quilt's id); "" for container:run
    parent_task_id: str | None
    type: str  # "container:run" or "container:exec:<container id>"
    command_json: str  # a JSON array of strings
    environment_json: str  # a JSON object of strings
    timeout_seconds: int
    status: int
    created_at: int
    started_at: int | None
    completed_at: int | None
    exit_code: int | None
    error_message: str | None
    progress_percent: float
    current_operation: str
    quilt_task_id: str | None  # container:exec: its task in Quilt, once started
    quilt_container_id: str | None  # container:run: its throw-away container, once made
    output_offset: int  # Quilt's output lines already stored


class TaskChange(TypedDict, total=False):
    """What a watcher changes in a task's row (its types are TaskRow's: mypy compares them)."""

    status: int
    started_at: int | None
    completed_at: int | None
    exit_code: int | None
    error_message: str | None
    progress_percent: float
    current_operation: str
    quilt_task_id: str | None
    quilt_container_id: str | None


def insert(db: sqlite_utils.Database, row: TaskRow, message: str) -> None:
    with transaction(db):
        insert_row(db, "tasks", row)
        _history(db, row["id"], row["status"], message)


def set_status(db: sqlite_utils.Database, task_id: str, status: int, message: str, fields: TaskChange) -> None:
    """A status transition, recorded with its history line, atomically."""
    with transaction(db):
        update_row(db, "tasks", task_id, {**fields, "status": status})
        _history(db, task_id, status, message)


def update(db: sqlite_utils.Database, task_id: str, fields: TaskChange) -> None:
    update_row(db, "tasks", task_id, fields)


def _history(db: sqlite_utils.Database, task_id: str, status: int, message: str) -> None:
    db.execute(
        "INSERT INTO task_status_history (task_id, seq, status, message, at) "
        "VALUES (?, (SELECT coalesce(max(seq), 0) + 1 FROM task_status_history WHERE task_id = ?), ?, ?, ?)",
        [task_id, task_id, status, message, now_us()],
    )


def _rows(db: sqlite_utils.Database, sql: str, params: Sequence[str | int]) -> Iterator[TaskRow]:
    return cast(Iterator[TaskRow], db.query(sql, params))


def get(db: sqlite_utils.Database, user_id: str, task_id: str) -> TaskRow | None:
    return next(_rows(db, "SELECT * FROM tasks WHERE id = ? AND user_id = ?", [task_id, user_id]), None)


def unfinished(db: sqlite_utils.Database) -> list[TaskRow]:
    return list(_rows(db, "SELECT * FROM tasks WHERE status IN (1, 2) ORDER BY created_at", []))


def page(
    db: sqlite_utils.Database,
    user_id: str,
    session_id: str | None,
    statuses: Sequence[int],
    limit: int,
    after: tuple[int, str] | None,
) -> list[TaskRow]:
    """Newest first; keyset on (created_at, id); the filters are in SQL."""
    sql = ["SELECT * FROM tasks WHERE user_id = ?"]
    params: list[str | int] = [user_id]
    if session_id is not None:
        sql.append("AND session_id = ?")
        params.append(session_id)
    if statuses:
        sql.append(f"AND status IN ({','.join('?' * len(statuses))})")
        params.extend(statuses)
    if after is not None:
        sql.append("AND (created_at, id) < (?, ?)")
        params.extend(after)
    sql.append("ORDER BY created_at DESC, id DESC LIMIT ?")
    params.append(limit)
    return bounded(_rows(db, " ".join(sql), params), limit, PAGE_BYTES, row_bytes)


def append_output(db: sqlite_utils.Database, task_id: str, items: Sequence[OutputRow], offset: int) -> None:
    """Output items (seq, stream, line, percent, at) and how far into quilt's output they reach."""
    with transaction(db):
        db.conn.executemany(
            "INSERT OR IGNORE INTO task_output (task_id, seq, stream, line, percent, at) VALUES (?, ?, ?, ?, ?, ?)",
            [(task_id, *item) for item in items],
        )
        db.execute("UPDATE tasks SET output_offset = ? WHERE id = ?", [offset, task_id])


def output_after(db: sqlite_utils.Database, task_id: str, seq: int, limit: int) -> list[OutputRow]:
    """Lines after `seq`: at most `limit`, and no more once they hold REPLAY_BYTES of text."""
    cursor = db.execute(
        "SELECT seq, stream, line, percent, at FROM task_output WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        [task_id, seq, limit],
    )
    found: Iterator[OutputRow] = (tuple(r) for r in cursor)
    return bounded(found, limit, REPLAY_BYTES, lambda r: len(r[2]))


def last_output_seq(db: sqlite_utils.Database, task_id: str) -> int:
    return int(db.execute("SELECT coalesce(max(seq), 0) FROM task_output WHERE task_id = ?", [task_id]).fetchone()[0])


def count_by_status(db: sqlite_utils.Database) -> dict[str, int]:
    """Tasks by status name, every status present (zeros too: a series that vanishes reads as "no data")."""
    counts = {status.name: 0 for status in TaskStatus}
    for status, n in db.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall():
        name = TaskStatus(status).name if status in TaskStatus._value2member_map_ else str(status)
        counts[name] = int(n)
    return counts
