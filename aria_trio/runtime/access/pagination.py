"""Keyset pagination: page sizes, and page tokens that cannot be forged or reused for another query.

A token holds the last row's sort key and a digest of the filter it was made for, signed with
HMAC-SHA256 under a key only the daemon knows (kept in its data folder). A corrupted, forged or
mismatched token is INVALID_ARGUMENT, never a wrong page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from aria_trio.shared import errors
from aria_trio.shared.sqlite import PAGE_BYTES, fits

DEFAULT_PAGE = 50
KEY_BYTES = 32
MAX_PAGE = 1000

Row = TypeVar("Row", bound=Mapping[str, object])  # a store row (a TypedDict of its module)


def page_size(requested: int) -> int:
    if requested < 0:
        raise errors.InvalidArgument("page_size must not be negative", fields={"page_size": "negative"})
    return min(requested or DEFAULT_PAGE, MAX_PAGE)  # larger is clamped


def load_key(path: Path) -> bytes:
    """The signing key, made on first use (0600): written whole to a temporary file, fsynced,
    renamed into place and the folder fsynced, so no crash leaves a short or empty key (which
    would make every token given out so far invalid, or a weak key)."""
    try:
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
    except FileNotFoundError:
        pass
    key = os.urandom(KEY_BYTES)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return key


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:16]

    @staticmethod
    def _filter_digest(filter_key: str) -> str:
        return hashlib.sha256(filter_key.encode()).hexdigest()[:16]

    def make(self, filter_key: str, created_at: int, row_id: str) -> str:
        body = json.dumps([created_at, row_id, self._filter_digest(filter_key)], separators=(",", ":")).encode()
        return _b64(body) + "." + _b64(self._sign(body))

    def cut(
        self,
        filter_key: str,
        rows: list[Row],
        limit: int,
        key: tuple[str, str] = ("created_at", "id"),
        max_bytes: int = PAGE_BYTES,
    ) -> tuple[list[Row], str]:
        """Rows fetched as `limit + 1` (one more tells whether there is a next page), or fewer when
        they went past `max_bytes` (store.db.bounded): the page (never empty when there are rows,
        whatever their size), and the token of the next one ("" when this is the last)."""
        keep = fits(rows, limit, max_bytes)
        if len(rows) <= keep:
            return rows, ""
        sort_key, row_id = rows[keep - 1][key[0]], rows[keep - 1][key[1]]
        assert isinstance(sort_key, int) and isinstance(row_id, str)  # (created_at, seq or id; and a str)
        return rows[:keep], self.make(filter_key, sort_key, row_id)

    def read(self, token: str, filter_key: str) -> tuple[int, str]:
        bad = errors.InvalidArgument(
            "invalid page token", reason="INVALID_PAGE_TOKEN", fields={"page_token": "invalid"}
        )
        try:
            body_part, sig_part = token.split(".")
            body, sig = _unb64(body_part), _unb64(sig_part)
        except ValueError:
            raise bad from None
        if not hmac.compare_digest(sig, self._sign(body)):
            raise bad
        created_at, row_id, digest = json.loads(body)
        if digest != self._filter_digest(filter_key):
            raise errors.InvalidArgument(
                "this page token belongs to a different query (its filter changed)",
                reason="PAGE_TOKEN_MISMATCH",
                fields={"page_token": "made for another filter"},
            )
        return int(created_at), str(row_id)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None
