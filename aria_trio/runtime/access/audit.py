"""The audit log: who created, cancelled, removed, uploaded, or changed preferences or keys, when,
with the request id (so a log line and an audit entry can be matched)."""

from __future__ import annotations

import json

from aria_trio.rpc import CallContext
from aria_trio.runtime.store import auth as table
from aria_trio.runtime.store.auth import AuditRow, NewAuditEntry
from aria_trio.shared.sqlite import Store, now_us

MAX_DETAIL = 4096  # bytes of detail JSON kept per entry (the rest is cut)


class Audit:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def record(
        self, ctx: CallContext, action: str, resource_type: str, resource_id: str, **detail: object
    ) -> None:
        """`detail`: JSON values, or anything else as its str()."""
        row = NewAuditEntry(
            at=now_us(),
            actor=ctx.user,
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            request_id=ctx.request_id,
            detail_json=json.dumps(detail, sort_keys=True, default=str)[:MAX_DETAIL],
        )
        await self.store.run(table.audit, row)

    async def page(self, actor: str | None, limit: int, before: int | None) -> list[AuditRow]:
        return await self.store.run(table.audit_page, actor, limit, before)
