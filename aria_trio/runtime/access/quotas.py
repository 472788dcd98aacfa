"""Per-user quotas: how much one user may hold at once, so that no caller can take the runtime (or
its sandboxes) from everyone else.

Each quota is a setting (`aria serve --help`); a reached one is RESOURCE_EXHAUSTED with ErrorInfo
reason QUOTA_EXCEEDED and `metadata.quota` naming that setting, except where waiting is the
better answer: the tool calls of one turn past `tool_calls_at_once` wait for their turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

from aria_trio.rpc.context import CallContext, PeerCred
from aria_trio.shared import errors
from aria_trio.shared.config import RuntimeSettings


def exceeded(quota: str, limit: int, what: str) -> errors.ResourceExhausted:
    return errors.ResourceExhausted(
        f"{what}: at most {limit} at once per user (the runtime's {quota} setting)",
        reason="QUOTA_EXCEEDED",
        metadata={"quota": quota},
    )


@dataclass
class PerUser:
    """A count per user with a limit: `hold(user)` takes one for a while, or refuses."""

    quota: str  # the setting's name
    limit: int
    what: str  # what is counted, for the message
    counts: dict[str, int] = field(default_factory=dict)  # only users holding some: bounded by them

    def check(self, user: str, already: int | None = None) -> None:
        """Refuse if `user` is at the limit (`already`: their count, when kept elsewhere)."""
        if (self.counts.get(user, 0) if already is None else already) >= self.limit:
            raise exceeded(self.quota, self.limit, self.what)

    @contextmanager
    def hold(self, user: str) -> Iterator[None]:
        self.check(user)
        self.counts[user] = self.counts.get(user, 0) + 1
        try:
            yield
        finally:
            left = self.counts[user] - 1
            if left:
                self.counts[user] = left
            else:
                del self.counts[user]


class Quotas:
    """The runtime's quotas; also the RPC server's admission of connections and streams."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.running_containers = settings.max_running_containers
        self.running_tasks = settings.max_running_tasks
        self.tool_calls_at_once = settings.tool_calls_at_once
        self.tool_calls_per_reply = settings.max_tool_calls_per_reply
        self.streams = PerUser("max_streams", settings.max_streams, "streaming calls open")
        self.connections = PerUser("max_connections_per_user", settings.max_connections_per_user, "connections open")
        self.turns = PerUser("max_turns", settings.max_turns, "turns running")

    # -- the RPC server's admission hooks ----------------------------------------------------------

    @contextmanager
    def connection(self, peer: PeerCred | None) -> Iterator[errors.AriaError | None]:
        """A connection from a local user: counted while open. Past the quota it is still served,
        but every call on it gets the quota's error (a client learns why; a refusal at accept
        would only look like a broken socket)."""
        if peer is None:
            yield None
            return
        key = f"uid:{peer.uid}"
        try:
            self.connections.check(key)
        except errors.ResourceExhausted as exc:
            yield exc
            return
        with self.connections.hold(key):
            yield None

    def call(self, ctx: CallContext, streaming: bool) -> AbstractContextManager[None]:
        """A streaming call (either way) counts against its user's open streams while it runs."""
        if not streaming or ctx.identity is None:
            return nullcontext()
        return self.streams.hold(ctx.identity.user)
