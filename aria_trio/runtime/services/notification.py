"""aria.v1.NotificationService: the caller's events, live, or resumed from a sequence number."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aria_trio.proto.aria.v1 import notification_grpc
from aria_trio.proto.aria.v1 import notification_pb2 as pb
from aria_trio.rpc import CallContext
from aria_trio.runtime.work.notifications import KINDS, Notifications
from aria_trio.shared import errors


class NotificationService(notification_grpc.NotificationServiceServicer):  # type: ignore[misc]
    def __init__(self, notifications: Notifications) -> None:
        self.notifications = notifications

    async def StreamNotifications(
        self, request: pb.StreamNotificationsRequest, ctx: CallContext
    ) -> AsyncIterator[pb.Notification]:
        unknown = sorted(set(request.event_types) - set(KINDS))
        if unknown:
            raise errors.InvalidArgument(
                f"unknown event type {unknown[0]!r}; known: {', '.join(KINDS)}", fields={"event_types": "unknown"}
            )
        after = request.after_sequence if request.HasField("after_sequence") else None
        async with self.notifications.subscription(ctx.user, list(request.event_types), after) as events:
            async for n in events:
                yield n
