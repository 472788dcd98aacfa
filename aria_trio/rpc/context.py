"""What a handler knows about its call: who is calling, the request id, the deadline, metadata."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import trio

Metadata = Sequence[tuple[str, Any]]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclasses.dataclass(frozen=True)
class PeerCred:
    """SO_PEERCRED of the Unix socket peer: who is on the other end, as the kernel says."""

    pid: int
    uid: int
    gid: int


@dataclasses.dataclass(frozen=True)
class Identity:
    """The caller the request acts for. `user` owns every resource the call touches."""

    user: str
    uid: int | None = None
    via: str = "peer"  # "peer" (SO_PEERCRED) or "api_key"
    admin: bool = False


def request_id_from(metadata: Metadata) -> str:
    """The caller's `x-request-id` when it is a sane token, else a fresh one."""
    for key, value in metadata:
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return os.urandom(16).hex()


class CallContext:
    __slots__ = (
        "deadline",
        "identity",
        "initial_metadata",
        "metadata",
        "method",
        "peer",
        "request_id",
        "trailing_metadata",
    )

    def __init__(
        self,
        method: str,
        metadata: Metadata,
        peer: PeerCred | None,
        deadline: float = math.inf,
    ) -> None:
        self.method = method
        self.metadata = tuple(metadata)
        self.request_id = request_id_from(self.metadata)
        self.peer = peer
        self.deadline = deadline  # trio clock; math.inf when the client set none
        self.identity: Identity | None = None
        self.initial_metadata: list[tuple[str, Any]] = []
        self.trailing_metadata: list[tuple[str, Any]] = []

    def metadata_value(self, key: str) -> Any:
        for k, v in self.metadata:
            if k == key:
                return v
        return None

    def time_remaining(self) -> float | None:
        """Seconds left before the client's deadline (pass it on to calls we make), or None."""
        if self.deadline == math.inf:
            return None
        return max(0.0, self.deadline - trio.current_time())

    @property
    def user(self) -> str:
        if self.identity is None:
            raise RuntimeError(f"{self.method} runs without an identity")
        return self.identity.user
