"""aria.v1.AuthService (ext): API keys and the audit log."""

from __future__ import annotations

from aria_trio.proto.aria.v1 import auth_grpc
from aria_trio.proto.aria.v1 import auth_pb2 as pb
from aria_trio.rpc import CallContext
from aria_trio.runtime.access.api_keys import ApiKeyRow, ApiKeys
from aria_trio.runtime.access.audit import Audit
from aria_trio.runtime.access.pagination import PageTokens, page_size
from aria_trio.runtime.services import convert
from aria_trio.shared import errors


def _key(row: ApiKeyRow) -> pb.ApiKey:
    msg = pb.ApiKey(
        id=row["id"], user_id=row["user_id"], name=row["name"], created_at=convert.timestamp(row["created_at"])
    )
    convert.set_times(msg, row, "last_used_at", "revoked_at")
    return msg


def _admin(ctx: CallContext) -> bool:
    return ctx.identity is not None and ctx.identity.admin


class AuthService(auth_grpc.AuthServiceServicer):  # type: ignore[misc]
    def __init__(self, keys: ApiKeys, audit: Audit, tokens: PageTokens) -> None:
        self.keys = keys
        self.audit = audit
        self.tokens = tokens

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, ctx: CallContext) -> pb.CreatedApiKey:
        if ctx.identity is None or ctx.identity.via != "peer":
            raise errors.PermissionDenied("API keys are made by a user on the socket, not with a key")
        user = request.user_id or ctx.user
        if user != ctx.user and not _admin(ctx):
            raise errors.PermissionDenied("only an administrator makes keys for another user")
        row, secret = await self.keys.create(user, request.name)
        await self.audit.record(ctx, "key.create", "api_key", row["id"], user=user, name=request.name)
        return pb.CreatedApiKey(key=_key(row), secret=secret)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, ctx: CallContext) -> pb.ListApiKeysResponse:
        wanted = request.user_id or ctx.user
        if wanted != ctx.user and not _admin(ctx):
            raise errors.PermissionDenied("only an administrator lists another user's keys")
        rows = await self.keys.list(None if wanted == "*" else wanted)
        return pb.ListApiKeysResponse(keys=[_key(r) for r in rows])

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, ctx: CallContext) -> pb.ApiKey:
        row = await self.keys.revoke(ctx.user, _admin(ctx), request.key_id)
        await self.audit.record(ctx, "key.revoke", "api_key", row["id"], user=row["user_id"])
        return _key(row)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, ctx: CallContext) -> pb.ListAuditEventsResponse:
        actor = (request.actor or None) if _admin(ctx) else ctx.user
        limit = page_size(request.page_size)
        filter_key = f"audit:{ctx.user}:{actor}"
        before = self.tokens.read(request.page_token, filter_key)[0] if request.page_token else None
        rows, token = self.tokens.cut(
            filter_key, await self.audit.page(actor, limit + 1, before), limit, ("id", "actor")
        )
        events = [
            pb.AuditEvent(
                id=r["id"],
                at=convert.timestamp(r["at"]),
                actor=r["actor"],
                action=r["action"],
                resource_type=r["resource_type"],
                resource_id=r["resource_id"],
                request_id=r["request_id"],
                detail_json=r["detail_json"],
            )
            for r in rows
        ]
        return pb.ListAuditEventsResponse(events=events, next_page_token=token)
