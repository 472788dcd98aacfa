"""notifications: every event of a user, with a per-user sequence, kept for resuming subscribers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import sqlite_utils

from aria_trio.shared.sqlite import now_us, transaction

RETENTION = 100_000  # events kept per user; older ones go (a resume from before them finds a gap)


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
    with _durable(db), transaction(db):  # the change, the sequence and the row, together
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


@contextlib.contextmanager
def _durable(db: sqlite_utils.Database) -> Iterator[None]:
    """The commit inside is made durable before anyone is told (synchronous=FULL: the WAL is
    fsynced, and with it every commit before it), so a sequence number a subscriber has seen is
    never handed out again, even after a power cut. The cost is one fsync per event, not per
    output line (those stay at NORMAL: durable at checkpoints, never corrupt)."""
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
