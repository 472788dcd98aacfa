"""Who is calling: the Unix user behind the socket (SO_PEERCRED), by name."""

from __future__ import annotations

import os
import pwd

import trio

from . import errors
from .rpc.context import CallContext, Identity


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"  # a uid without a passwd entry (containers) still owns its resources


class PeerIdentity:
    """The server's authenticate hook: sets ctx.identity or refuses the call."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}  # bounded by the number of local users
        self._own_uid = os.getuid()

    async def __call__(self, ctx: CallContext) -> None:
        if ctx.metadata_value("authorization") is not None:
            # API keys come with a later release; a key we cannot check must never fall back to
            # the socket peer's identity.
            raise errors.PermissionDenied("invalid API key", reason="INVALID_API_KEY")
        if ctx.peer is None:
            raise errors.PermissionDenied("cannot tell who is calling (no peer credentials)", reason="NO_IDENTITY")
        uid = ctx.peer.uid
        name = self._names.get(uid)
        if name is None:
            name = await trio.to_thread.run_sync(user_name, uid)  # NSS may be slow (LDAP...)
            self._names[uid] = name
        ctx.identity = Identity(user=name, uid=uid, via="peer", admin=uid in (0, self._own_uid))
