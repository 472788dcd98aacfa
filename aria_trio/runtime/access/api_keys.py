"""API keys: for callers that act for a user without being that user on the socket (a web front
end's local server, the websocket tap).

A key is 32 random bytes, shown once when made; the store keeps only its SHA-256 (a key is
random enough that a slow hash buys nothing). A key acts for its user while the key is not revoked
and the user still exists on this machine; anything else (unknown, revoked, malformed, a deleted
user's) is refused, and never falls back to the socket peer's identity.
"""

from __future__ import annotations

import hashlib
import pwd
import re
import secrets

import trio

from aria_trio.runtime.store import auth as table
from aria_trio.runtime.store.auth import ApiKeyRow as ApiKeyRow  # (the services' too: re-exported)
from aria_trio.shared import errors
from aria_trio.shared.sqlite import Store, now_us

PREFIX = "aria_"
KEY = re.compile(r"aria_[A-Za-z0-9_-]{43}")
MAX_NAME = 100
USED_RESOLUTION_US = 60_000_000  # last_used_at is kept to the minute


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except (KeyError, ValueError):  # (ValueError: a name with a NUL in it, no one's)
        return False
    return True


class ApiKeys:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(self, user: str, name: str) -> tuple[ApiKeyRow, str]:
        """A new key for `user` (an existing Unix user): its row, and its secret (shown once)."""
        if len(name) > MAX_NAME:
            raise errors.InvalidArgument(f"name is longer than {MAX_NAME} characters", fields={"name": "too long"})
        if not await trio.to_thread.run_sync(user_exists, user):
            raise errors.NotFound(f"no user {user!r} on this machine", reason="USER_NOT_FOUND")
        secret = PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(
            id="k-" + secrets.token_hex(6),
            user_id=user,
            name=name,
            key_hash=_hash(secret),
            created_at=now_us(),
            last_used_at=None,
            revoked_at=None,
        )
        await self.store.run(table.insert_key, row)
        return row, secret

    async def verify(self, secret: str) -> str | None:
        """The user a key acts for, or None (unknown, revoked, malformed, or its user is gone)."""
        if not KEY.fullmatch(secret):
            return None
        row = await self.store.run(table.key_by_hash, _hash(secret))
        if row is None or row["revoked_at"] is not None:
            return None
        if not await trio.to_thread.run_sync(user_exists, row["user_id"]):
            return None
        if (row["last_used_at"] or 0) < now_us() - USED_RESOLUTION_US:  # (not a write per call)
            await self.store.run(table.set_key, row["id"], {"last_used_at": now_us()})
        return row["user_id"]

    async def list(self, user: str | None) -> list[ApiKeyRow]:
        return await self.store.run(table.keys, user)

    async def revoke(self, actor: str, admin: bool, key_id: str) -> ApiKeyRow:
        row = await self.store.run(table.key, key_id)
        if row is None or (row["user_id"] != actor and not admin):
            raise errors.NotFound(f"no API key {key_id!r}", reason="KEY_NOT_FOUND")
        if row["revoked_at"] is None:
            revoked_at = row["revoked_at"] = now_us()
            await self.store.run(table.set_key, key_id, {"revoked_at": revoked_at})
        return row
