"""user_preferences: one JSON document per user."""

from __future__ import annotations

import json

import sqlite_utils

from aria_trio.shared.json_input import JSON
from aria_trio.shared.sqlite import now_us

Document = dict[str, JSON]  # a user's preferences: a JSON object


def get(db: sqlite_utils.Database, user_id: str) -> Document:
    row = db.execute("SELECT preferences_json FROM user_preferences WHERE user_id = ?", [user_id]).fetchone()
    document: Document = json.loads(row[0]) if row else {}
    return document


def put(db: sqlite_utils.Database, user_id: str, preferences_json: str) -> None:
    db.table("user_preferences").upsert(
        {"user_id": user_id, "preferences_json": preferences_json, "updated_at": now_us()}, pk="user_id"
    )
