"""User preferences: a JSON object per user, changed by partial updates.

Top-level keys given in an update replace the stored ones; a key set to null is removed. Keys of
the `llm.` family configure the model and are checked; any other key is the client's own (a GUI's
theme, say) and is stored as given. `llm.api_key` is stored, but only ever shown masked.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping

import trio

from aria_trio.runtime.store import preferences as table
from aria_trio.runtime.store.preferences import Document
from aria_trio.shared import errors
from aria_trio.shared.json_input import JSON
from aria_trio.shared.sqlite import Store

MAX_BYTES = 64 * 1024  # the whole document of one user, as JSON
MAX_KEY_LENGTH = 256
MAX_SYSTEM_PROMPT = 32 * 1024
CACHE_USERS = 1024  # most recently used users kept in memory; others are read from the store


def _string(key: str, value: JSON) -> str | None:
    return None if isinstance(value, str) else f"{key} must be a string"


def _temperature(key: str, value: JSON) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{key} must be a number"
    return None if 0 <= value <= 2 else f"{key} must be between 0 and 2"


def _system_prompt(key: str, value: JSON) -> str | None:
    if not isinstance(value, str):
        return f"{key} must be a string"
    size = len(value.encode())
    return None if size <= MAX_SYSTEM_PROMPT else f"{key} is {size} bytes; at most {MAX_SYSTEM_PROMPT} are allowed"


def _url(key: str, value: JSON) -> str | None:
    if not isinstance(value, str):
        return f"{key} must be a string"
    try:
        url = urllib.parse.urlsplit(value)
        ok = url.scheme in ("http", "https") and bool(url.hostname)
        url.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        ok = False
    return None if ok else f"{key} must be an http:// or https:// URL"


KNOWN: dict[str, Callable[[str, JSON], str | None]] = {
    "llm.model": _string,
    "llm.temperature": _temperature,
    "llm.system_prompt": _system_prompt,
    "llm.base_url": _url,
    "llm.api_key": _string,
}
SECRET = {"llm.api_key"}


def _check(key: str, value: JSON) -> str | None:
    if not key or len(key) > MAX_KEY_LENGTH:
        return f"keys must be 1 to {MAX_KEY_LENGTH} characters long"
    if value is None:
        return None  # removal
    if key == "llm":
        return f"use the flat keys {', '.join(sorted(KNOWN))}"
    if key.startswith("llm."):
        check = KNOWN.get(key)
        if check is None:
            return f"unknown model setting {key}; known: {', '.join(sorted(KNOWN))}"
        return check(key, value)
    return None


def mask(value: str) -> str:
    return "****" + value[-4:] if len(value) >= 12 else "****"


def masked(prefs: Mapping[str, JSON]) -> Document:
    """What a client is shown: secrets masked."""
    return {k: mask(v) if k in SECRET and isinstance(v, str) else v for k, v in prefs.items()}


class Preferences:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: OrderedDict[str, Document] = OrderedDict()
        self._write_lock = trio.Lock()  # read-modify-write of one document at a time

    async def get(self, user: str) -> Document:
        """The user's preferences as stored (secrets in clear: for the runtime's own use)."""
        prefs = self._cache.get(user)
        if prefs is None:
            prefs = await self.store.run(table.get, user)
            self._remember(user, prefs)
        else:
            self._cache.move_to_end(user)
        return prefs

    async def update(self, user: str, updates: Mapping[str, JSON]) -> Document:
        problems = {k: p for k, v in updates.items() if (p := _check(k, v)) is not None}
        if problems:
            key = sorted(problems)[0]
            raise errors.InvalidArgument(
                problems[key], reason="INVALID_PREFERENCE", fields={f"updates.{k}": p for k, p in problems.items()}
            )
        async with self._write_lock:
            prefs = dict(await self.get(user))
            for key, value in updates.items():
                if value is None:
                    prefs.pop(key, None)
                else:
                    prefs[key] = value
            document = json.dumps(prefs, separators=(",", ":"), sort_keys=True)
            if len(document.encode()) > MAX_BYTES:
                raise errors.InvalidArgument(
                    f"preferences would take {len(document.encode())} bytes; at most {MAX_BYTES} are allowed per user",
                    reason="PREFERENCES_TOO_LARGE",
                    fields={"updates": "too large"},
                )
            await self.store.run(table.put, user, document)
            self._remember(user, prefs)
        return prefs

    def _remember(self, user: str, prefs: Document) -> None:
        self._cache[user] = prefs
        self._cache.move_to_end(user)
        while len(self._cache) > CACHE_USERS:
            self._cache.popitem(last=False)
