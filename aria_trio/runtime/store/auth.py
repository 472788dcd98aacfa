"""api_keys and audit_log: who may act for whom, and who did what."""

from __future__ import annotations

from typing import Any

import sqlite_utils


def insert_key(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    db.table("api_keys").insert(row)


def key_by_hash(db: sqlite_utils.Database, key_hash: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM api_keys WHERE key_hash = ?", [key_hash]))
    return rows[0] if rows else None


def key(db: sqlite_utils.Database, key_id: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM api_keys WHERE id = ?", [key_id]))
    return rows[0] if rows else None


def keys(db: sqlite_utils.Database, user_id: str | None) -> list[dict[str, Any]]:
    """A user's keys (None: everyone's), newest first."""
    if user_id is None:
        return list(db.query("SELECT * FROM api_keys ORDER BY created_at DESC, id DESC"))
    return list(db.query("SELECT * FROM api_keys WHERE user_id = ? ORDER BY created_at DESC, id DESC", [user_id]))


def set_key(db: sqlite_utils.Database, key_id: str, fields: dict[str, Any]) -> None:
    db.table("api_keys").update(key_id, fields)


def audit(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    db.table("audit_log").insert(row)


def audit_page(db: sqlite_utils.Database, actor: str | None, limit: int, before: int | None) -> list[dict[str, Any]]:
    """Newest first; keyset on the row id (it only grows)."""
    sql = ["SELECT * FROM audit_log WHERE 1 = 1"]
    params: list[Any] = []
    if actor is not None:
        sql.append("AND actor = ?")
        params.append(actor)
    if before is not None:
        sql.append("AND id < ?")
        params.append(before)
    sql.append("ORDER BY id DESC LIMIT ?")
    params.append(limit)
    return list(db.query(" ".join(sql), params))
