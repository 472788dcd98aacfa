"""aria.v1.SessionService: create and read sessions (ExecuteTurn arrives with the turn loop)."""

from __future__ import annotations

from ..containers import Containers
from ..proto.aria.v1 import session_grpc
from ..proto.aria.v1 import session_pb2 as pb
from ..rpc import CallContext
from ..sessions import Sessions
from . import convert


class SessionService(session_grpc.SessionServiceServicer):  # type: ignore[misc]
    def __init__(self, sessions: Sessions, containers: Containers) -> None:
        self.sessions = sessions
        self.containers = containers

    async def CreateSession(self, request: pb.CreateSessionRequest, ctx: CallContext) -> pb.Session:
        return convert.session(await self.sessions.create(ctx.user, request.agent_id, dict(request.context_data)))

    async def GetSession(self, request: pb.GetSessionRequest, ctx: CallContext) -> pb.Session:
        return convert.session(await self.sessions.get(ctx.user, request.session_id))

    async def EndSession(self, request: pb.EndSessionRequest, ctx: CallContext) -> pb.Session:
        return convert.session(await self.sessions.end(ctx.user, request.session_id, self.containers))
