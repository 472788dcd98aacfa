"""Who is calling: the Unix user behind the socket (SO_PEERCRED), or the user an API key acts for.

A call with `authorization: Bearer <key>` acts for the key's user, and only if the key is good:
a bad, revoked or malformed key is PERMISSION_DENIED, never a fall back to the socket peer. The
runtime's own user and root are administrators (they may see everyone's audit log and make keys
for others); everyone else sees only their own resources.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Awaitable, Callable

import trio

from aria_trio.rpc.context import CallContext, Identity
from aria_trio.shared import errors

Verify = Callable[[str], Awaitable[str | None]]


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"  # a uid without a passwd entry (containers) still owns its resources


class PeerIdentity:
    """The server's authenticate hook: sets ctx.identity or refuses the call."""

    def __init__(self, verify_key: Verify | None = None) -> None:
        self._verify_key = verify_key
        self._names: dict[int, str] = {}  # bounded by the number of local users
        self._own_uid = os.getuid()
        self.admins = {"root", user_name(self._own_uid)}

    async def __call__(self, ctx: CallContext) -> None:
        authorization = ctx.metadata_value("authorization")
        if authorization is not None:
            ctx.identity = await self._from_key(authorization)
            return
        if ctx.peer is None:
            raise errors.PermissionDenied("cannot tell who is calling (no peer credentials)", reason="NO_IDENTITY")
        uid = ctx.peer.uid
        name = self._names.get(uid)
        if name is None:
            name = await trio.to_thread.run_sync(user_name, uid)  # NSS may be slow (LDAP...)
            self._names[uid] = name
        ctx.identity = Identity(user=name, uid=uid, via="peer", admin=uid in (0, self._own_uid))

    async def _from_key(self, authorization: object) -> Identity:
        scheme, _, secret = str(authorization).partition(" ")
        user = None
        if scheme.lower() == "bearer" and self._verify_key is not None:
            user = await self._verify_key(secret.strip())
        if user is None:
            raise errors.PermissionDenied("invalid API key", reason="INVALID_API_KEY")
        return Identity(user=user, via="api_key", admin=user in self.admins)
