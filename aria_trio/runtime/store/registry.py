"""bundles, agents, tools: what a user's uploads registered (Quilt keeps the bytes)."""

from __future__ import annotations

from typing import TypedDict, cast

import sqlite_utils

from aria_trio.shared.sqlite import transaction


class BundleRow(TypedDict):
    id: str
    user_id: str
    name: str
    version: str
    blake3: str
    sha256: str
    size_bytes: int
    manifest_json: str
    filename: str
    layout: str
    created_at: int


class NewAgent(TypedDict):
    """An agent of a bundle being registered (`register` adds its user and bundle)."""

    id: str
    name: str
    description: str
    system_prompt: str | None
    model: str | None
    max_iterations: int | None
    tools_json: str  # a JSON array of tool names
    created_at: int


class AgentRow(NewAgent):
    user_id: str
    bundle_id: str | None


class NewTool(TypedDict):
    """A tool of a bundle being registered (`register` adds its user and bundle)."""

    id: str
    name: str
    description: str
    input_schema_json: str
    runtime: str  # python, node
    entry: str
    created_at: int


class ToolRow(NewTool):
    user_id: str
    bundle_id: str | None
    bundle_blake3: str  # (joined from bundles: the bundle Quilt runs it from)


def register(db: sqlite_utils.Database, bundle: BundleRow, agents: list[NewAgent], tools: list[NewTool]) -> str:
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
        db.table("bundles").upsert(dict(bundle), pk="id")
        for kind, rows in (("agents", agents), ("tools", tools)):
            for row in rows:
                db.execute(f"DELETE FROM {kind} WHERE user_id = ? AND name = ?", [user, row["name"]])
                db.table(kind).insert({**row, "user_id": user, "bundle_id": bundle["id"]})
    return bundle["id"]


def agents(db: sqlite_utils.Database, user_id: str) -> list[AgentRow]:
    return cast(list[AgentRow], list(db.query("SELECT * FROM agents WHERE user_id = ? ORDER BY name", [user_id])))


def agent(db: sqlite_utils.Database, user_id: str, name: str) -> AgentRow | None:
    rows = list(db.query("SELECT * FROM agents WHERE user_id = ? AND name = ?", [user_id, name]))
    return cast(AgentRow, rows[0]) if rows else None


def tools(db: sqlite_utils.Database, user_id: str, names: list[str] | None = None) -> list[ToolRow]:
    """The user's tools (only `names`, when given), by name, each with its bundle's content id."""
    sql = "SELECT t.*, b.blake3 AS bundle_blake3 FROM tools t JOIN bundles b ON b.id = t.bundle_id WHERE t.user_id = ?"
    params = [user_id]
    if names is not None:
        sql += f" AND t.name IN ({','.join('?' * len(names))})"
        params += names
    return cast(list[ToolRow], list(db.query(sql + " ORDER BY t.name", params)))


def blake3_in_use(db: sqlite_utils.Database, blake3: str) -> bool:
    return db.execute("SELECT 1 FROM bundles WHERE blake3 = ? LIMIT 1", [blake3]).fetchone() is not None
