"""HPACK (RFC 7541) for our HTTP/2 connections: hpack 3's coder, with caches for what repeats.

Every call codes almost the same headers: the response's `:status 200` and content type, its
`grpc-status 0`, and a client's request headers, identical for every call of a method. hpack 3
(the series h2 3 needs) codes each of them afresh, and finds a header by scanning its whole static
table: about half of a unary call's CPU. The classes here give exactly what hpack gives
(tests/test_rpc_fast_paths.py checks it against hpack itself), from dict lookups: a header block
decoded once per state of the dynamic table, a fixed pair encoded once per state, the static
table searched by dict. The protocol engine (protocol.py) installs them on each connection.

They use hpack 3 internals (`_maxsize`, `resized`, `dynamic_entries`); the versions are pinned and
checked in protocol.py, which every import of aria_trio.rpc goes through.
"""

from __future__ import annotations

from collections.abc import Iterable

import hpack
import hpack.table
from hpack import NeverIndexedHeaderTuple
from hpack.hpack import encode_integer

# A header as h2 and our server hand it to the encoder: a (name, value) tuple, or hpack's
# NeverIndexedHeaderTuple (a tuple subclass) for a value that must stay out of the table.
Header = tuple[str | bytes, str | bytes]
# A decoded header: bytes when decoded `raw` (as h2 asks), text otherwise.
DecodedHeader = tuple[bytes, bytes] | tuple[str, str]


class VersionedHeaderTable(hpack.table.HeaderTable):  # type: ignore[misc]
    """A header table that counts its changes: a header block coded against one state of the table
    means the same thing for as long as that state lasts, so its coding can be reused."""

    def __init__(self) -> None:
        self.version = 0
        super().__init__()

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return int(self._maxsize)

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        hpack.table.HeaderTable.maxsize.fset(self, newmax)


class IndexedHeaderTable(VersionedHeaderTable):
    """hpack 3 finds a header by scanning all 61 static entries, for every header of every
    message: about half of a unary call's CPU. Same answers, from dicts."""

    _STATIC_EXACT: dict[tuple[bytes, bytes], int] = {}
    _STATIC_NAME: dict[bytes, int] = {}
    for _i, (_n, _v) in enumerate(hpack.table.HeaderTable.STATIC_TABLE, start=1):
        _STATIC_EXACT.setdefault((_n, _v), _i)
        _STATIC_NAME.setdefault(_n, _i)
    del _i, _n, _v

    def search(self, name: bytes, value: bytes) -> tuple[int, bytes, bytes | None] | None:
        index = self._STATIC_EXACT.get((name, value))
        if index is not None:
            return index, name, value
        index = self._STATIC_NAME.get(name)
        partial = None if index is None else (index, name, None)
        offset = hpack.table.HeaderTable.STATIC_TABLE_LENGTH + 1
        for i, (n, v) in enumerate(self.dynamic_entries):
            if n == name:
                if v == value:
                    return i + offset, n, v
                if partial is None:
                    partial = (i + offset, n, None)
        return partial


class PlainEncoder(hpack.Encoder):  # type: ignore[misc]
    """hpack's encoder, made cheap for the headers every call sends alike.

    Values go out as literals, not Huffman-coded: hpack's pure-Python Huffman coder costs more per
    call than the bytes it saves are worth on a Unix socket. And the coding of a plain (name,
    value) pair is kept while the dynamic table stays as it is: `:status 200`, the content type and
    `grpc-status 0` then cost a dict lookup each. Sensitive headers (NeverIndexedHeaderTuple: the
    request id, messages, details) differ per call and are always coded afresh."""

    # At the cap the cache starts over; a server sends a handful of fixed pairs, and a long value
    # (custom metadata) is coded every time: at most 64 x 256 bytes per connection.
    CACHE_HEADERS = 64
    CACHE_HEADER_BYTES = 256

    def __init__(self) -> None:
        super().__init__()
        self.header_table = IndexedHeaderTable()
        self._cache: dict[Header, bytes] = {}
        self._cache_version = 0

    def encode(self, headers: Iterable[Header] | dict[str | bytes, str | bytes], huffman: bool = True) -> bytes:
        table = self.header_table
        if table.resized or isinstance(headers, dict):
            self._cache.clear()
            encoded: bytes = super().encode(headers, huffman=False)
            self._cache_version = table.version
            return encoded
        cache = self._cache
        if table.version != self._cache_version:
            cache.clear()
            self._cache_version = table.version
        parts = []
        for header in headers:
            if type(header) is NeverIndexedHeaderTuple:
                parts.append(_never_indexed(header))
                continue
            plain = type(header) is tuple and len(header) == 2
            if plain and (hit := cache.get(header)) is not None:
                parts.append(hit)
                continue
            before = table.version
            encoded = super().encode((header,), huffman=False)
            if table.version != before:  # the pair went into the table: every index moved
                cache.clear()
                self._cache_version = table.version
            elif plain and len(encoded) <= self.CACHE_HEADER_BYTES:
                if len(cache) >= self.CACHE_HEADERS:
                    cache.clear()
                cache[header] = encoded
            parts.append(encoded)
        return b"".join(parts)


def _never_indexed(header: Header) -> bytes:
    """RFC 7541 6.2.3, the name as a literal too (always valid, whatever the table holds): what
    hpack would send for a sensitive header, without its general path."""
    name, value = (x.encode() if isinstance(x, str) else bytes(x) for x in header)
    return b"".join((b"\x10", encode_integer(len(name), 7), name, encode_integer(len(value), 7), value))


class CachingDecoder(hpack.Decoder):  # type: ignore[misc]
    """hpack's decoder, remembering the header blocks that left the dynamic table as it was.

    Once a client's headers are in the table, it sends the same few bytes of indexes on every
    call of a method; while the table (and the header list limit) stays the same, the same bytes
    decode to the same headers, so they are looked up instead of decoded again."""

    # At the cap the cache starts over; larger blocks are decoded every time. Each kept block
    # decodes to at most the header list limit (8 KiB as purerpc sets it): ~150 KiB per connection
    # at worst, a few hundred bytes in practice (a client sends one block per method it calls).
    CACHE_BLOCKS = 16
    CACHE_BLOCK_BYTES = 1024

    def __init__(self) -> None:
        super().__init__()
        self.header_table = VersionedHeaderTable()
        self._cache: dict[tuple[bytes, bool], tuple[DecodedHeader, ...]] = {}
        self._cache_state: tuple[int, int] = (0, 0)

    def decode(self, data: bytes, raw: bool = False) -> list[DecodedHeader]:
        state = (self.header_table.version, self.max_header_list_size)
        if state != self._cache_state:
            self._cache.clear()
            self._cache_state = state
        key = (bytes(data), raw)
        hit = self._cache.get(key)
        if hit is not None:
            return list(hit)
        headers: list[DecodedHeader] = super().decode(data, raw)
        if self.header_table.version == state[0] and len(key[0]) <= self.CACHE_BLOCK_BYTES:
            if len(self._cache) >= self.CACHE_BLOCKS:
                self._cache.clear()
            self._cache[key] = tuple(headers)
        return headers
