"""Quilt's own SQLite: containers, tasks and bundles, so their state survives a restart."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypedDict, TypeVar, cast

import sqlite_utils

from aria_trio.shared.sqlite import PAGE_BYTES, bounded, row_bytes, upsert_row

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
CREATE TABLE containers (
    id           TEXT PRIMARY KEY,
    spec_json    TEXT NOT NULL,
    state        INTEGER NOT NULL,        -- quilt.v1.ContainerState
    created_at   INTEGER NOT NULL,        -- microseconds since the epoch
    started_at   INTEGER,
    finished_at  INTEGER,
    exit_code    INTEGER,
    signal       INTEGER,
    message      TEXT NOT NULL DEFAULT '',
    pid          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX containers_by_state ON containers (state);

CREATE TABLE tasks (
    id                TEXT PRIMARY KEY,
    container_id      TEXT NOT NULL,
    command_json      TEXT NOT NULL,
    labels_json       TEXT NOT NULL DEFAULT '{}',
    state             INTEGER NOT NULL,   -- quilt.v1.TaskState
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    exit_code         INTEGER,
    signal            INTEGER,
    message           TEXT NOT NULL DEFAULT '',
    timeout_seconds   REAL NOT NULL DEFAULT 0,
    pid               INTEGER NOT NULL DEFAULT 0,
    output_lines      INTEGER NOT NULL DEFAULT 0,
    output_truncated  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_by_container ON tasks (container_id, created_at);
CREATE INDEX tasks_by_state ON tasks (state);

CREATE TABLE bundles (
    id             TEXT PRIMARY KEY,      -- blake3 of the bytes
    name           TEXT NOT NULL,
    version        TEXT NOT NULL DEFAULT '',
    filename       TEXT NOT NULL DEFAULT '',
    size_bytes     INTEGER NOT NULL,
    sha256         TEXT NOT NULL,
    layout         TEXT NOT NULL,
    manifest_json  TEXT NOT NULL,
    tools_json     TEXT NOT NULL,         -- the tools as checked: schema converted, entry resolved
    agents_json    TEXT NOT NULL,
    labels_json    TEXT NOT NULL DEFAULT '{}',
    created_at     INTEGER NOT NULL
);
CREATE INDEX bundles_by_created ON bundles (created_at DESC, id DESC);
""",
    ),
]


class ContainerRow(TypedDict):
    """A row of `containers`: times in microseconds, state a quilt.v1.ContainerState."""

    id: str
    spec_json: str  # a JSON object: the engine's Spec
    state: int
    created_at: int
    started_at: int | None
    finished_at: int | None
    exit_code: int | None
    signal: int | None
    message: str
    pid: int


class TaskRow(TypedDict):
    """A row of `tasks`: times in microseconds, state a quilt.v1.TaskState."""

    id: str
    container_id: str
    command_json: str  # a JSON array of strings
    labels_json: str  # a JSON object of strings
    state: int
    created_at: int
    started_at: int | None
    finished_at: int | None
    exit_code: int | None
    signal: int | None
    message: str
    timeout_seconds: float
    pid: int
    output_lines: int
    output_truncated: int  # 0 or 1


class BundleRow(TypedDict):
    """A row of `bundles`: created_at in microseconds."""

    id: str
    name: str
    version: str
    filename: str
    size_bytes: int
    sha256: str
    layout: str
    manifest_json: str
    tools_json: str
    agents_json: str
    labels_json: str
    created_at: int


Row = TypeVar("Row", ContainerRow, TaskRow, BundleRow)
Param = str | int


@dataclass(frozen=True)
class Table(Generic[Row]):
    """A table, and the TypedDict of its rows."""

    name: str


CONTAINERS = Table[ContainerRow]("containers")
TASKS = Table[TaskRow]("tasks")
BUNDLES = Table[BundleRow]("bundles")


def _query(db: sqlite_utils.Database, table: Table[Row], sql: str, params: Sequence[Param]) -> list[Row]:
    """The rows of `table` a SELECT * gives: their columns are its TypedDict's."""
    return cast(list[Row], list(db.query(sql, params)))


def upsert(db: sqlite_utils.Database, table: Table[Row], row: Row) -> None:
    upsert_row(db, table.name, row)


def get(db: sqlite_utils.Database, table: Table[Row], row_id: str) -> Row | None:
    rows = _query(db, table, f"SELECT * FROM {table.name} WHERE id = ?", [row_id])
    return rows[0] if rows else None


def ids(db: sqlite_utils.Database, table: Table[Row]) -> set[str]:
    return {row[0] for row in db.execute(f"SELECT id FROM {table.name}").fetchall()}


def delete(db: sqlite_utils.Database, table: Table[Row], row_id: str) -> None:
    db.execute(f"DELETE FROM {table.name} WHERE id = ?", [row_id])


def rows(db: sqlite_utils.Database, table: Table[Row], where: str = "", params: Sequence[Param] = ()) -> list[Row]:
    sql = f"SELECT * FROM {table.name}" + (f" WHERE {where}" if where else "") + " ORDER BY created_at, id"
    return _query(db, table, sql, params)


def mark_lost(db: sqlite_utils.Database, now: int) -> tuple[list[ContainerRow], int]:
    """At start: what was running when quilt stopped is failed now. Returns those containers (so
    their leftovers can be cleaned up) and the number of tasks."""
    lost = _query(db, CONTAINERS, "SELECT * FROM containers WHERE state = 2", [])
    db.execute(
        "UPDATE containers SET state = 4, message = 'quilt restarted', finished_at = ?, pid = 0 WHERE state = 2",
        [now],
    )
    cursor = db.execute(
        "UPDATE tasks SET state = 4, message = 'quilt restarted', finished_at = ?, pid = 0 WHERE state IN (1, 2)",
        [now],
    )
    return lost, cursor.rowcount


def bundles_page(db: sqlite_utils.Database, limit: int, after: tuple[int, str] | None) -> list[BundleRow]:
    """Newest first, keyset on (created_at, id)."""
    if after is None:
        rows = db.query("SELECT * FROM bundles ORDER BY created_at DESC, id DESC LIMIT ?", [limit])
    else:
        rows = db.query(
            "SELECT * FROM bundles WHERE (created_at, id) < (?, ?) ORDER BY created_at DESC, id DESC LIMIT ?",
            [after[0], after[1], limit],
        )
    # (a manifest may be 1 MiB: bytes, not rows)
    return bounded(cast(Iterator[BundleRow], rows), limit, PAGE_BYTES, row_bytes)


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
