"""The SQLite store: WAL, foreign keys, recorded migrations, every table later issues need."""

from __future__ import annotations

import secrets
import sqlite3
import threading

import pytest

from aria_trio.runtime.store import open_store
from aria_trio.runtime.store.migrations import MIGRATIONS
from aria_trio.shared.sqlite import migrate

TABLES = {
    "sessions",
    "messages",
    "tasks",
    "task_status_history",
    "task_output",
    "containers",
    "notifications",
    "notification_sequences",
    "tool_executions",
    "bundles",
    "agents",
    "tools",
    "user_preferences",
    "api_keys",
    "audit_log",
    "schema_migrations",
}


async def test_wal_foreign_keys_and_migrations(tmp_path):
    store = await open_store(tmp_path / "s.db")
    try:

        def facts(db):
            return (
                db.execute("PRAGMA journal_mode").fetchone()[0],
                db.execute("PRAGMA foreign_keys").fetchone()[0],
                set(db.table_names()),
                [tuple(r) for r in db.execute("SELECT version, name FROM schema_migrations ORDER BY version")],
                {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")},
            )

        mode, fks, tables, applied, indexes = await store.run(facts)
        assert mode == "wal" and fks == 1
        assert TABLES <= tables
        assert applied == [(v, n) for v, n, _ in MIGRATIONS]
        assert {
            "tasks_by_user",
            "tasks_by_session",
            "tasks_by_status",
            "sessions_by_user",
            "audit_log_by_actor",
        } <= indexes
        assert await store.run(migrate, MIGRATIONS) == []  # applying again changes nothing
    finally:
        await store.close()


async def test_foreign_keys_are_enforced(tmp_path):
    store = await open_store(tmp_path / "f.db")
    try:

        def orphan(db):
            db.execute("INSERT INTO messages (id, session_id, seq, role, created_at) VALUES ('m', 'nope', 1, 2, 0)")

        with pytest.raises(sqlite3.IntegrityError):
            await store.run(orphan)
    finally:
        await store.close()


async def test_store_calls_never_run_on_the_event_loop_thread(tmp_path):
    store = await open_store(tmp_path / "t.db")
    try:
        loop_thread = threading.get_ident()
        seen = await store.run(lambda db: threading.get_ident())
        assert seen != loop_thread
    finally:
        await store.close()


async def test_reopening_keeps_data_and_schema(tmp_path):
    store = await open_store(tmp_path / "r.db")
    await store.run(
        lambda db: db.execute(
            "INSERT INTO user_preferences (user_id, preferences_json, updated_at) VALUES ('u', '{}', 1)"
        )
    )
    await store.close()
    again = await open_store(tmp_path / "r.db")
    try:
        assert await again.run(lambda db: db.execute("SELECT count(*) FROM user_preferences").fetchone()[0]) == 1
    finally:
        await again.close()


async def test_notification_sequences_skip_ahead_only_after_a_run_the_machine_cut_short(tmp_path):
    """Events commit without an fsync each (synchronous=NORMAL): a killed runtime loses none, a
    machine that goes down may lose the last ones. So a run that never ended, on a boot that is
    not this one, makes every sequence skip SEQUENCE_GAP; any other start continues where it was."""
    from aria_trio.runtime.store import notifications as rows

    store = await open_store(tmp_path / "s.db")
    try:

        async def publish() -> int:
            seq, _ = await store.run(rows.append, "ann", secrets.token_hex(4), "task_status", "t", "m", "{}", payload)
            return seq

        def payload(seq: int, created: int) -> bytes:
            return str(seq).encode()

        assert await store.run(rows.begin_run, "boot-a") == 0  # a new database
        assert [await publish(), await publish()] == [1, 2]
        await store.run(rows.end_run)
        assert await store.run(rows.begin_run, "boot-b") == 0  # it ended: a reboot since is fine
        assert await publish() == 3
        assert await store.run(rows.begin_run, "boot-b") == 0  # killed, same boot: nothing lost
        assert await publish() == 4
        assert await store.run(rows.begin_run, "boot-c") == rows.SEQUENCE_GAP  # never ended, new boot
        assert await publish() == 4 + rows.SEQUENCE_GAP + 1
        assert await store.run(rows.begin_run, "") == rows.SEQUENCE_GAP  # boot unknown: assume the worst
        assert await store.run(rows.last_sequence, "ann") == 4 + 2 * rows.SEQUENCE_GAP + 1
        # what a subscriber resuming after a number it saw gets: every event after it
        assert await store.run(rows.after, "ann", 4, [], 10) == [str(4 + rows.SEQUENCE_GAP + 1).encode()]
        synchronous = await store.run(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])
        assert synchronous == 1  # NORMAL again after each durable write
    finally:
        await store.close()
