"""The SQLite database: WAL, foreign keys, numbered migrations, and never on the event loop.

One connection, used by one worker thread at a time (a CapacityLimiter of 1): SQLite serialises
writers anyway, and the runtime is its only writer. Every call goes through `Store.run`, which
runs a plain function of a `sqlite_utils.Database` in a worker thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

import sqlite_utils
import trio

from .migrations import MIGRATIONS

T = TypeVar("T")
P = ParamSpec("P")


def now_us() -> int:
    return time.time_ns() // 1000


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One write transaction (the connection is in autocommit mode otherwise)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _connect(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
    conn.execute("PRAGMA busy_timeout = 10000")
    return sqlite_utils.Database(conn)


Migrations = list[tuple[int, str, str]]


def migrate(db: sqlite_utils.Database, migrations: Migrations = MIGRATIONS) -> list[int]:
    """Apply the migrations not applied yet, each in its own transaction; return their numbers."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, name, sql in migrations:
        if version in done:
            continue
        # executescript commits first, so the migration and its record go in one script.
        db.conn.executescript(
            f"BEGIN;\n{sql}\nINSERT INTO schema_migrations VALUES ({version}, '{name}', {now_us()});\nCOMMIT;"
        )
        applied.append(version)
    return applied


class Store:
    def __init__(self, db: sqlite_utils.Database, path: Path) -> None:
        self.db = db
        self.path = path
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: Path, migrations: Migrations = MIGRATIONS) -> Store:
        """Open (or create) the database at `path` and bring its schema up to date."""

        def setup() -> sqlite_utils.Database:
            db = _connect(path)
            try:
                migrate(db, migrations)
            except BaseException:
                db.conn.close()
                raise
            return db

        db = await trio.to_thread.run_sync(setup)
        return cls(db, path)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(db, *args) in a worker thread, one at a time; cancellation waits for it to finish
        (a half-run SQLite call cannot be abandoned), so keep store functions short."""
        return await trio.to_thread.run_sync(lambda: fn(self.db, *args), limiter=self._limiter)

    async def close(self) -> None:
        await self.run(lambda db: db.conn.close())
