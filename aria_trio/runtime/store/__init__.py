"""The runtime's SQLite tables: one module per aggregate, plain functions of a `sqlite_utils.Database`
that the domain runs with `Store.run` (off the event loop)."""

from __future__ import annotations

from pathlib import Path

from aria_trio.runtime.store.migrations import MIGRATIONS
from aria_trio.shared.sqlite import Store


async def open_store(path: Path) -> Store:
    """The runtime's database at `path`, its schema brought up to date."""
    return await Store.open(path, MIGRATIONS)
