"""Notifications: every event of a user, persisted with a per-user sequence, then fanned out live.

Publishing stores the event first (so nothing is ever lost) and then offers it to each subscriber
of that user through a bounded memory channel, without waiting: a slow subscriber never slows a
publisher. A subscriber whose buffer is full is marked behind and catches up from the store, in
order, before it takes live events again; a subscriber that resumes (`after_sequence`) replays
from the store first. Either way it sees every event once, in sequence order. A per-user lock
makes "store, then offer" and "subscribe" atomic to each other, so live order is sequence order.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import sqlite_utils
import trio
from google.protobuf.message import Message

from aria_trio.proto.aria.v1 import notification_pb2 as pb
from aria_trio.runtime.store import notifications as table
from aria_trio.shared.json_input import JSON
from aria_trio.shared.sqlite import Store

BUFFER = 256  # live events waiting per subscriber; beyond that it catches up from the store
REPLAY_BATCH = 500
KINDS = ("bundle_upload", "task_status", "container_status")


class _Subscriber:
    def __init__(self, kinds: frozenset[str]) -> None:
        self.kinds = kinds
        self.send, self.receive = trio.open_memory_channel[pb.Notification](BUFFER)
        self.behind = False  # its buffer overflowed: what it missed is in the store

    def offer(self, kind: str, n: pb.Notification) -> None:
        if self.kinds and kind not in self.kinds:
            return
        try:
            self.send.send_nowait(n)
        except trio.WouldBlock:
            self.behind = True


class Notifications:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._subscribers: dict[str, set[_Subscriber]] = defaultdict(set)
        self._locks: dict[str, trio.Lock] = defaultdict(trio.Lock)  # one per user who ever had an event
        self.published = 0

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    async def publish(
        self,
        user: str,
        kind: str,
        event: Message,
        *,
        title: str = "",
        message: str = "",
        metadata: Mapping[str, JSON] | None = None,
        change: Callable[[sqlite_utils.Database], object] | None = None,
    ) -> pb.Notification:
        """Store and deliver one event; `event` is the payload message for `kind`; `change` (a
        store function of the db) is what the event tells of, stored in the same transaction."""
        n = pb.Notification(id="n-" + secrets.token_hex(8))
        getattr(n, kind).CopyFrom(event)

        def payload(sequence: int, created_us: int) -> bytes:
            n.sequence = sequence
            n.timestamp.FromMicroseconds(created_us)
            return n.SerializeToString()

        meta = json.dumps(dict(metadata or {}), sort_keys=True)
        async with self._locks[user]:
            await self.store.run(table.append, user, n.id, kind, title, message, meta, payload, change)
            for sub in tuple(self._subscribers.get(user, ())):
                sub.offer(kind, n)
        self.published += 1
        return n

    @asynccontextmanager
    async def subscription(
        self, user: str, kinds: list[str], after_sequence: int | None
    ) -> AsyncIterator[AsyncIterator[pb.Notification]]:
        """Subscribe now; iterate what this yields for the user's events: those after
        `after_sequence` from the store, then live ones (when None: live ones only), each once,
        in sequence order. Leaving the block unsubscribes."""
        sub = _Subscriber(frozenset(kinds))
        async with self._locks[user]:
            now = await self.store.run(table.last_sequence, user)
            self._subscribers[user].add(sub)
        try:
            # (closed on leaving, so that its replay and its wait end now, not when collected)
            async with contextlib.aclosing(
                self._events(user, sub, now if after_sequence is None else min(after_sequence, now), now)
            ) as events:
                yield events
        finally:
            self._subscribers[user].discard(sub)
            if not self._subscribers[user]:
                del self._subscribers[user]

    async def _events(self, user: str, sub: _Subscriber, last: int, now: int) -> AsyncGenerator[pb.Notification, None]:
        kinds = list(sub.kinds)
        while True:
            if sub.behind or last < now:
                sub.behind = False
                async with contextlib.aclosing(self._replay(user, kinds, last)) as replay:
                    async for n in replay:
                        last = n.sequence
                        yield n
                now = last
            n = await sub.receive.receive()
            if n.sequence > last:  # (else: already replayed from the store)
                last = now = n.sequence
                yield n

    async def _replay(self, user: str, kinds: list[str], after: int) -> AsyncGenerator[pb.Notification, None]:
        while True:
            payloads = await self.store.run(table.after, user, after, kinds, REPLAY_BATCH)
            for payload in payloads:
                n = pb.Notification.FromString(payload)
                after = n.sequence
                yield n
            if len(payloads) < REPLAY_BATCH:
                return
