"""The SQLite database: WAL, foreign keys, numbered migrations, and never on the event loop.

One connection, used by one worker thread at a time (a CapacityLimiter of 1): SQLite serialises
writers anyway, and the runtime is its only writer. Every call goes through `Store.run`, which
runs a plain function of a `sqlite_utils.Database` in a worker thread.

A full disk: SQLite rolls the statement (or the transaction) back, so nothing is half-written.
In a call, the caller gets RESOURCE_EXHAUSTED "disk full" at once. In a background task (a
watcher storing a task's output, an event being published: `background()`), the write waits for
space instead, retrying with backoff, so nothing is lost and the daemon goes on by itself once
space is freed; reads never stop working.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import sqlite_utils
import structlog
import trio

from aria_trio.shared import errors, retry

log = structlog.get_logger("aria.store")

_BACKGROUND = contextvars.ContextVar("store_background", default=False)
FULL_RETRY_FIRST, FULL_RETRY_MAX = 0.5, 30.0  # seconds between tries of a write that found the disk full


def background() -> None:
    """Mark the current task (and those it starts) as background work: its writes wait for disk
    space rather than fail. Call it first thing in a watcher's task."""
    _BACKGROUND.set(True)


T = TypeVar("T")
P = ParamSpec("P")


PAGE_BYTES = 2 * 1024 * 1024  # text in one page of rows: under the 4 MiB of a gRPC message, with room


def row_bytes(row: Mapping[str, object]) -> int:
    """About what a row takes in a message: its text and bytes (numbers are small)."""
    return sum(len(v) for v in row.values() if isinstance(v, (str, bytes)))


def bounded(rows: Iterable[T], limit: int, max_bytes: int, size: Callable[[T], int]) -> list[T]:
    """Rows from a cursor until `limit` of them, or until they hold more than `max_bytes`: the row
    that goes past is still taken (so a caller sees there is more), no further one is read. So a
    page's memory is bounded by bytes, not rows (a row of a 1 MiB message counts as such)."""
    out: list[T] = []
    total = 0
    for row in rows:
        out.append(row)
        total += size(row)
        if len(out) >= limit or total > max_bytes:
            break
    return out


def fits(rows: Sequence[Mapping[str, object]], limit: int, max_bytes: int = PAGE_BYTES) -> int:
    """How many of `rows` (from `bounded`) a page keeps: up to `limit`, within `max_bytes`, at
    least one. Rows past it mean there is a next page."""
    keep, total = 0, 0
    for row in rows[:limit]:
        total += row_bytes(row)
        if keep and total > max_bytes:
            break
        keep += 1
    return keep


def insert_row(db: sqlite_utils.Database, table: str, row: Mapping[str, object]) -> None:
    """INSERT one row: a prepared statement per (table, columns). sqlite_utils' insert, update and
    upsert read the table's schema (PRAGMA table_info) on every call, and its update SELECTs the
    row first: on a task's path that was most of the store's time."""
    columns = tuple(row)
    db.execute(_insert_sql(table, columns), [row[c] for c in columns])


def upsert_row(db: sqlite_utils.Database, table: str, row: Mapping[str, object]) -> None:
    """INSERT one row, or replace the columns given of the one with its `id`."""
    columns = tuple(row)
    db.execute(_upsert_sql(table, columns), [row[c] for c in columns])


def update_row(db: sqlite_utils.Database, table: str, row_id: str, fields: Mapping[str, object]) -> None:
    """UPDATE the columns given of the row with this `id` (LookupError if there is none)."""
    if not fields:
        return
    columns = tuple(fields)
    cursor = db.execute(_update_sql(table, columns), [*(fields[c] for c in columns), row_id])
    if cursor.rowcount == 0:
        raise LookupError(f"no row {row_id!r} in {table}")


# (the names in these statements are our tables' and their TypedDicts' keys, never a caller's)


@functools.lru_cache(maxsize=128)
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


@functools.lru_cache(maxsize=128)
def _upsert_sql(table: str, columns: tuple[str, ...]) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "id")
    return _insert_sql(table, columns) + f" ON CONFLICT (id) DO UPDATE SET {updates}"


@functools.lru_cache(maxsize=128)
def _update_sql(table: str, columns: tuple[str, ...]) -> str:
    return f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?"


def now_us() -> int:
    return time.time_ns() // 1000


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One write transaction (the connection is in autocommit mode otherwise); inside another,
    it is part of that one (a change and its notification commit together)."""
    if db.conn.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:  # (SQLite may have rolled back already, e.g. on SQLITE_FULL)
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


def migrate(db: sqlite_utils.Database, migrations: Migrations) -> list[int]:
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
        self.stopping = False  # set at shutdown: background writes stop waiting for disk space

    @classmethod
    async def open(cls, path: Path, migrations: Migrations) -> Store:
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

    async def run(self, fn: Callable[Concatenate[sqlite_utils.Database, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(db, *args) in a worker thread, one at a time; cancellation waits for it to finish
        (a half-run SQLite call cannot be abandoned), so keep store functions short. A full disk:
        see the module's docstring."""
        backoff = retry.Backoff(FULL_RETRY_FIRST, FULL_RETRY_MAX)
        while True:
            try:
                return await trio.to_thread.run_sync(lambda: fn(self.db, *args, **kwargs), limiter=self._limiter)
            except (sqlite3.Error, OSError) as exc:
                if not errors.is_disk_full(exc):
                    raise
                if not _BACKGROUND.get() or self.stopping:
                    log.warning("disk full: a write was refused", database=str(self.path), error=str(exc))
                    raise errors.disk_full() from None
                log.warning(
                    "disk full: a background write waits for space", database=str(self.path), retry_in_s=backoff.delay
                )
            await backoff.wait()

    async def close(self) -> None:
        await self.run(lambda db: db.conn.close())
