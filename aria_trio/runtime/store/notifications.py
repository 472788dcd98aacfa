"""notifications: every event of a user, with a per-user sequence, kept for resuming subscribers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import sqlite_utils

from aria_trio.shared.sqlite import now_us, transaction

RETENTION = 100_000  # events kept per user; older ones go (a resume from before them finds a gap)
SEQUENCE_GAP = 1_000_000  # skipped by every user's sequence after a run the machine's crash cut short


def append(
    db: sqlite_utils.Database,
    user_id: str,
    notification_id: str,
    kind: str,
    title: str,
    message: str,
    metadata_json: str,
    payload: Callable[[int, int], bytes],
    change: Callable[[sqlite_utils.Database], object] | None = None,
) -> tuple[int, int]:
    """Store one event under the user's next sequence number; returns (sequence, created_at).
    `payload(sequence, created_at)` makes the stored bytes, which carry both. `change`, the
    change the event tells of, is made in the same transaction: both are kept, or neither (a
    runtime killed in between never leaves a change unannounced, nor an event of nothing)."""
    created = now_us()
    with transaction(db):  # the change, the sequence and the row, together
        if change is not None:
            change(db)
        seq = db.execute(
            "INSERT INTO notification_sequences (user_id, last_sequence) VALUES (?, 1) "
            "ON CONFLICT (user_id) DO UPDATE SET last_sequence = last_sequence + 1 RETURNING last_sequence",
            [user_id],
        ).fetchone()[0]
        db.execute(
            "INSERT INTO notifications (id, user_id, sequence, type, title, message, metadata_json, payload, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [notification_id, user_id, seq, kind, title, message, metadata_json, payload(seq, created), created],
        )
        if seq % 1000 == 0:
            db.execute("DELETE FROM notifications WHERE user_id = ? AND sequence <= ?", [user_id, seq - RETENTION])
    return seq, created


def begin_run(db: sqlite_utils.Database, boot_id: str) -> int:
    """At start: if the last run was cut short by the machine going down (it never ended, and the
    machine has booted since; "" when the boot id is unknown counts as a new boot), every user's
    sequence skips SEQUENCE_GAP; the gap skipped (0 if none). Then this run is recorded, durably.

    Why: events commit at synchronous=NORMAL (the WAL is fsynced at checkpoints, not at each
    commit: a task's start waits on no fsync). A runtime that is killed loses nothing that way;
    only a crash of the machine may take back the last commits, and with them sequence numbers a
    subscriber has seen, which must never be handed out again for other events. After such a
    crash the sequences jump past anything that can have been lost; a subscriber that resumes
    after a number it saw gets every event from then on."""
    with _durable(db), transaction(db):
        row = db.execute("SELECT boot_id, clean FROM runtime_runs WHERE id = 1").fetchone()
        gap = 0
        if row is not None and not row[1] and (row[0] != boot_id or not boot_id):
            db.execute("UPDATE notification_sequences SET last_sequence = last_sequence + ?", [SEQUENCE_GAP])
            gap = SEQUENCE_GAP
        db.execute(
            "INSERT INTO runtime_runs (id, boot_id, clean) VALUES (1, ?, 0) "
            "ON CONFLICT (id) DO UPDATE SET boot_id = excluded.boot_id, clean = 0",
            [boot_id],
        )
    return gap


def end_run(db: sqlite_utils.Database) -> None:
    """At the end of a run (a clean stop, or an error on the way out: the process ends, the
    machine does not), durably: the next start need not skip any sequence."""
    with _durable(db):
        db.execute("UPDATE runtime_runs SET clean = 1 WHERE id = 1")


@contextlib.contextmanager
def _durable(db: sqlite_utils.Database) -> Iterator[None]:
    """The commit inside is fsynced before it returns (synchronous=FULL), and with it every commit
    before it."""
    db.execute("PRAGMA synchronous = FULL")
    try:
        yield
    finally:
        db.execute("PRAGMA synchronous = NORMAL")


def after(db: sqlite_utils.Database, user_id: str, sequence: int, kinds: list[str], limit: int) -> list[bytes]:
    """Payloads of the user's events after `sequence`, in order (only `kinds`, when given)."""
    sql = "SELECT payload FROM notifications WHERE user_id = ? AND sequence > ?"
    params: list[str | int] = [user_id, sequence]
    if kinds:
        sql += f" AND type IN ({','.join('?' * len(kinds))})"
        params += kinds
    sql += " ORDER BY sequence LIMIT ?"
    params.append(limit)
    return [row[0] for row in db.execute(sql, params).fetchall()]


def last_sequence(db: sqlite_utils.Database, user_id: str) -> int:
    row = db.execute("SELECT last_sequence FROM notification_sequences WHERE user_id = ?", [user_id]).fetchone()
    return int(row[0]) if row else 0
