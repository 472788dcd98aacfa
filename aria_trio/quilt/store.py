"""Quilt's own SQLite: containers, tasks and bundles, so their state survives a restart."""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from aria_trio.shared.sqlite import PAGE_BYTES, bounded, row_bytes

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


def upsert(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> None:
    db.table(table).upsert(row, pk="id")


def get(db: sqlite_utils.Database, table: str, row_id: str) -> dict[str, Any] | None:
    rows = list(db.query(f"SELECT * FROM {table} WHERE id = ?", [row_id]))
    return rows[0] if rows else None


def ids(db: sqlite_utils.Database, table: str) -> set[str]:
    return {row[0] for row in db.execute(f"SELECT id FROM {table}").fetchall()}


def delete(db: sqlite_utils.Database, table: str, row_id: str) -> None:
    db.execute(f"DELETE FROM {table} WHERE id = ?", [row_id])


def rows(
    db: sqlite_utils.Database, table: str, where: str = "", params: list[Any] | None = None
) -> list[dict[str, Any]]:
    sql = f"SELECT * FROM {table}" + (f" WHERE {where}" if where else "") + " ORDER BY created_at, id"
    return list(db.query(sql, params or []))


def mark_lost(db: sqlite_utils.Database, now: int) -> tuple[list[dict[str, Any]], int]:
    """At start: what was running when quilt stopped is failed now. Returns those containers (so
    their leftovers can be cleaned up) and the number of tasks."""
    lost = list(db.query("SELECT * FROM containers WHERE state = 2"))
    db.execute(
        "UPDATE containers SET state = 4, message = 'quilt restarted', finished_at = ?, pid = 0 WHERE state = 2",
        [now],
    )
    cursor = db.execute(
        "UPDATE tasks SET state = 4, message = 'quilt restarted', finished_at = ?, pid = 0 WHERE state IN (1, 2)",
        [now],
    )
    return lost, cursor.rowcount


def bundles_page(db: sqlite_utils.Database, limit: int, after: tuple[int, str] | None) -> list[dict[str, Any]]:
    """Newest first, keyset on (created_at, id)."""
    if after is None:
        rows = db.query("SELECT * FROM bundles ORDER BY created_at DESC, id DESC LIMIT ?", [limit])
    else:
        rows = db.query(
            "SELECT * FROM bundles WHERE (created_at, id) < (?, ?) ORDER BY created_at DESC, id DESC LIMIT ?",
            [after[0], after[1], limit],
        )
    return bounded(rows, limit, PAGE_BYTES, row_bytes)  # (a manifest may be 1 MiB: bytes, not rows)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
