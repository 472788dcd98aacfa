"""bundles, agents, tools: what a user's uploads registered (Quilt keeps the bytes)."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from aria_trio.shared.sqlite import transaction


def register(
    db: sqlite_utils.Database,
    bundle: dict[str, Any],
    agents: list[dict[str, Any]],
    tools: list[dict[str, Any]],
) -> str:
    """Record a bundle and register its agents and tools for its user, all at once. The same bytes
    uploaded again keep their bundle id; an agent or tool name the user already has is taken over
    by this bundle (the latest upload of a name wins). Returns the bundle's id."""
    user = bundle["user_id"]
    with transaction(db):
        found = db.execute(
            "SELECT id FROM bundles WHERE user_id = ? AND blake3 = ?", [user, bundle["blake3"]]
        ).fetchone()
        if found:
            bundle = {**bundle, "id": found[0], "created_at": bundle["created_at"]}
        db.table("bundles").upsert(bundle, pk="id")
        for kind, rows in (("agents", agents), ("tools", tools)):
            for row in rows:
                db.execute(f"DELETE FROM {kind} WHERE user_id = ? AND name = ?", [user, row["name"]])
                db.table(kind).insert({**row, "user_id": user, "bundle_id": bundle["id"]})
    return str(bundle["id"])


def agents(db: sqlite_utils.Database, user_id: str) -> list[dict[str, Any]]:
    return list(db.query("SELECT * FROM agents WHERE user_id = ? ORDER BY name", [user_id]))


def agent(db: sqlite_utils.Database, user_id: str, name: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM agents WHERE user_id = ? AND name = ?", [user_id, name]))
    return rows[0] if rows else None


def tools(db: sqlite_utils.Database, user_id: str, names: list[str] | None = None) -> list[dict[str, Any]]:
    """The user's tools (only `names`, when given), by name, each with its bundle's content id."""
    sql = "SELECT t.*, b.blake3 AS bundle_blake3 FROM tools t JOIN bundles b ON b.id = t.bundle_id WHERE t.user_id = ?"
    params: list[Any] = [user_id]
    if names is not None:
        sql += f" AND t.name IN ({','.join('?' * len(names))})"
        params += names
    return list(db.query(sql + " ORDER BY t.name", params))


def blake3_in_use(db: sqlite_utils.Database, blake3: str) -> bool:
    return db.execute("SELECT 1 FROM bundles WHERE blake3 = ? LIMIT 1", [blake3]).fetchone() is not None
