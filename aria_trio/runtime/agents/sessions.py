"""Sessions: a user's conversation with one agent. (The turn loop comes with issue 5.)"""

from __future__ import annotations

import json
import secrets

from aria_trio.runtime.access.pagination import PageTokens, page_size
from aria_trio.runtime.agents.registry import DEFAULT_AGENT, Registry
from aria_trio.runtime.store import messages
from aria_trio.runtime.store import sessions as table
from aria_trio.runtime.store.messages import MessageRow as MessageRow  # (the services' too: re-exported)
from aria_trio.runtime.store.sessions import SessionRow as SessionRow
from aria_trio.runtime.work.containers import Containers
from aria_trio.shared import errors
from aria_trio.shared.sqlite import Store, now_us

MAX_CONTEXT_BYTES = 64 * 1024


class Sessions:
    def __init__(self, store: Store, registry: Registry, tokens: PageTokens) -> None:
        self.store = store
        self.registry = registry
        self.tokens = tokens

    async def create(self, user: str, agent_id: str, context: dict[str, str]) -> SessionRow:
        agent, _ = await self.registry.agent(user, agent_id)  # NOT_FOUND for an unknown agent
        context_json = json.dumps(context, sort_keys=True)
        if len(context_json.encode()) > MAX_CONTEXT_BYTES:
            raise errors.InvalidArgument(
                f"context_data is larger than {MAX_CONTEXT_BYTES} bytes", fields={"context_data": "too large"}
            )
        now = now_us()
        row = SessionRow(
            id="s-" + secrets.token_hex(8),
            user_id=user,
            agent_id=agent.agent_id or DEFAULT_AGENT,
            status="active",
            context_json=context_json,
            created_at=now,
            updated_at=now,
        )
        await self.store.run(table.insert, row)
        return row

    async def end(self, user: str, session_id: str, containers: Containers) -> SessionRow:
        """Mark the session completed and remove its containers that are not persistent."""
        row = await self.get(user, session_id)
        if row["status"] == "active":
            row = {**row, "status": "completed", "updated_at": now_us()}
            await self.store.run(table.set_status, session_id, row["status"], row["updated_at"])
        await containers.end_session(user, session_id)  # (again, if an earlier end was cut short)
        return row

    async def get(self, user: str, session_id: str) -> SessionRow:
        row = await self.store.run(table.get, user, session_id) if session_id else None
        if row is None:
            raise errors.NotFound(f"no session {session_id!r}", reason="SESSION_NOT_FOUND")
        return row

    async def page(self, user: str, size: int, token: str) -> tuple[list[SessionRow], str]:
        """The user's sessions, newest first, a keyset page at a time."""
        limit = page_size(size)
        filter_key = json.dumps(["sessions", user])
        after = self.tokens.read(token, filter_key) if token else None
        return self.tokens.cut(filter_key, await self.store.run(table.page, user, limit + 1, after), limit)

    async def messages(self, user: str, session_id: str, size: int, token: str) -> tuple[list[MessageRow], str]:
        """A session's messages in order, a page at a time."""
        await self.get(user, session_id)
        limit = page_size(size)
        filter_key = json.dumps(["messages", user, session_id])
        after = self.tokens.read(token, filter_key)[0] if token else 0
        rows = await self.store.run(messages.page, session_id, after, limit + 1)
        return self.tokens.cut(filter_key, rows, limit, key=("seq", "id"))
