"""api_keys and audit_log: who may act for whom, and who did what."""

from __future__ import annotations

from typing import TypedDict, cast

import sqlite_utils


class ApiKeyRow(TypedDict):
    id: str
    user_id: str
    name: str
    key_hash: str  # SHA-256 of the key: never the key itself
    created_at: int
    last_used_at: int | None
    revoked_at: int | None


class KeyChange(TypedDict, total=False):
    last_used_at: int
    revoked_at: int


class NewAuditEntry(TypedDict):
    at: int
    actor: str  # the user the call acted for
    action: str  # e.g. task.cancel, preferences.update
    resource_type: str
    resource_id: str
    request_id: str
    detail_json: str  # a JSON object


class AuditRow(NewAuditEntry):
    id: int  # only grows: the keyset of audit_page


def insert_key(db: sqlite_utils.Database, row: ApiKeyRow) -> None:
    db.table("api_keys").insert(dict(row))


def key_by_hash(db: sqlite_utils.Database, key_hash: str) -> ApiKeyRow | None:
    rows = list(db.query("SELECT * FROM api_keys WHERE key_hash = ?", [key_hash]))
    return cast(ApiKeyRow, rows[0]) if rows else None


def key(db: sqlite_utils.Database, key_id: str) -> ApiKeyRow | None:
    rows = list(db.query("SELECT * FROM api_keys WHERE id = ?", [key_id]))
    return cast(ApiKeyRow, rows[0]) if rows else None


def keys(db: sqlite_utils.Database, user_id: str | None) -> list[ApiKeyRow]:
    """A user's keys (None: everyone's), newest first."""
    if user_id is None:
        found = db.query("SELECT * FROM api_keys ORDER BY created_at DESC, id DESC")
    else:
        found = db.query("SELECT * FROM api_keys WHERE user_id = ? ORDER BY created_at DESC, id DESC", [user_id])
    return cast(list[ApiKeyRow], list(found))


def set_key(db: sqlite_utils.Database, key_id: str, fields: KeyChange) -> None:
    db.table("api_keys").update(key_id, dict(fields))


def audit(db: sqlite_utils.Database, row: NewAuditEntry) -> None:
    db.table("audit_log").insert(dict(row))


def audit_page(db: sqlite_utils.Database, actor: str | None, limit: int, before: int | None) -> list[AuditRow]:
    """Newest first; keyset on the row id (it only grows)."""
    sql = ["SELECT * FROM audit_log WHERE 1 = 1"]
    params: list[str | int] = []
    if actor is not None:
        sql.append("AND actor = ?")
        params.append(actor)
    if before is not None:
        sql.append("AND id < ?")
        params.append(before)
    sql.append("ORDER BY id DESC LIMIT ?")
    params.append(limit)
    return cast(list[AuditRow], list(db.query(" ".join(sql), params)))
