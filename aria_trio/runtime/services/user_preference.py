"""aria.v1.UserPreferenceService: the caller's own preferences."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import json_format, struct_pb2

from aria_trio.proto.aria.v1 import user_preference_grpc
from aria_trio.proto.aria.v1 import user_preference_pb2 as pb
from aria_trio.rpc import CallContext
from aria_trio.runtime.access.audit import Audit
from aria_trio.runtime.access.preferences import Preferences, masked
from aria_trio.shared import errors
from aria_trio.shared.json_input import JSON


def _response(prefs: Mapping[str, JSON]) -> pb.UserPreferences:
    struct = struct_pb2.Struct()
    struct.update(masked(prefs))
    return pb.UserPreferences(preferences=struct)


class UserPreferenceService(user_preference_grpc.UserPreferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, preferences: Preferences, audit: Audit) -> None:
        self.preferences = preferences
        self.audit = audit

    async def GetUserPreferences(self, request: pb.GetUserPreferencesRequest, ctx: CallContext) -> pb.UserPreferences:
        return _response(await self.preferences.get(ctx.user))

    async def UpdateUserPreferences(
        self, request: pb.UpdateUserPreferencesRequest, ctx: CallContext
    ) -> pb.UserPreferences:
        try:
            updates = json_format.MessageToDict(request.updates)  # null values come back as None
        except ValueError:  # NaN or infinity: not JSON, not a preference
            raise errors.InvalidArgument(
                "preference values must be JSON values (no NaN or infinity)", fields={"updates": "not JSON"}
            ) from None
        result = _response(await self.preferences.update(ctx.user, updates))
        await self.audit.record(ctx, "preferences.update", "preferences", ctx.user, keys=sorted(updates))
        return result
