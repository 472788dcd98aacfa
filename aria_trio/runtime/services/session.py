"""aria.v1.SessionService: sessions, their history, and turns streamed as they happen."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import trio

from aria_trio.proto.aria.v1 import session_grpc
from aria_trio.proto.aria.v1 import session_pb2 as pb
from aria_trio.rpc import CallContext
from aria_trio.runtime.access.audit import Audit
from aria_trio.runtime.agents.sessions import Sessions
from aria_trio.runtime.agents.turns import Turns
from aria_trio.runtime.services import convert
from aria_trio.runtime.work.containers import Containers


class SessionService(session_grpc.SessionServiceServicer):  # type: ignore[misc]
    def __init__(self, sessions: Sessions, containers: Containers, turns: Turns, audit: Audit) -> None:
        self.sessions = sessions
        self.containers = containers
        self.turns = turns
        self.audit = audit

    async def CreateSession(self, request: pb.CreateSessionRequest, ctx: CallContext) -> pb.Session:
        row = await self.sessions.create(ctx.user, request.agent_id, dict(request.context_data))
        await self.audit.record(ctx, "session.create", "session", row["id"], agent=row["agent_id"])
        return convert.session(row)

    async def GetSession(self, request: pb.GetSessionRequest, ctx: CallContext) -> pb.Session:
        return convert.session(await self.sessions.get(ctx.user, request.session_id))

    async def EndSession(self, request: pb.EndSessionRequest, ctx: CallContext) -> pb.Session:
        row = await self.sessions.end(ctx.user, request.session_id, self.containers)
        await self.audit.record(ctx, "session.end", "session", row["id"])
        return convert.session(row)

    async def ListSessions(self, request: pb.ListSessionsRequest, ctx: CallContext) -> pb.ListSessionsResponse:
        rows, token = await self.sessions.page(ctx.user, request.page_size, request.page_token)
        return pb.ListSessionsResponse(sessions=[convert.session(r) for r in rows], next_page_token=token)

    async def ListMessages(self, request: pb.ListMessagesRequest, ctx: CallContext) -> pb.ListMessagesResponse:
        rows, token = await self.sessions.messages(ctx.user, request.session_id, request.page_size, request.page_token)
        return pb.ListMessagesResponse(messages=[convert.message(r) for r in rows], next_page_token=token)

    @trio.as_safe_channel
    async def ExecuteTurn(
        self, request: pb.ExecuteTurnRequest, ctx: CallContext
    ) -> AsyncGenerator[pb.TurnOutput, None]:
        async with self.turns.execute(ctx.user, request.session_id, request.input) as events:
            async for event in events:
                yield convert.turn_output(event)
