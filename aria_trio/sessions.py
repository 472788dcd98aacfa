"""Sessions: a user's conversation with one agent. (The turn loop comes with issue 5.)"""

from __future__ import annotations

import json
import secrets
from typing import Any

from . import errors
from .containers import Containers
from .registry import DEFAULT_AGENT, Registry
from .store import Store
from .store import sessions as table
from .store.db import now_us

MAX_CONTEXT_BYTES = 64 * 1024


class Sessions:
    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry

    async def create(self, user: str, agent_id: str, context: dict[str, str]) -> dict[str, Any]:
        agent, _ = await self.registry.agent(user, agent_id)  # NOT_FOUND for an unknown agent
        context_json = json.dumps(context, sort_keys=True)
        if len(context_json.encode()) > MAX_CONTEXT_BYTES:
            raise errors.InvalidArgument(
                f"context_data is larger than {MAX_CONTEXT_BYTES} bytes", fields={"context_data": "too large"}
            )
        now = now_us()
        row = {
            "id": "s-" + secrets.token_hex(8),
            "user_id": user,
            "agent_id": agent.agent_id or DEFAULT_AGENT,
            "status": "active",
            "context_json": context_json,
            "created_at": now,
            "updated_at": now,
        }
        await self.store.run(table.insert, row)
        return row

    async def end(self, user: str, session_id: str, containers: Containers) -> dict[str, Any]:
        """Mark the session completed and remove its containers that are not persistent."""
        row = await self.get(user, session_id)
        if row["status"] == "active":
            row.update(status="completed", updated_at=now_us())
            await self.store.run(table.set_status, session_id, row["status"], row["updated_at"])
        await containers.end_session(user, session_id)  # (again, if an earlier end was cut short)
        return row

    async def get(self, user: str, session_id: str) -> dict[str, Any]:
        row = await self.store.run(table.get, user, session_id) if session_id else None
        if row is None:
            raise errors.NotFound(f"no session {session_id!r}", reason="SESSION_NOT_FOUND")
        return row
