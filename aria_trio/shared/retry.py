"""Capped exponential backoff, for loops that try one operation again while its failure may pass
(a model server that is overloaded, a disk that is full): the waits double from `first` up to
`cap`, so a failure that lasts is not hammered and one that passes is noticed soon; a server that
says how long to wait (Retry-After) is believed instead."""

from __future__ import annotations

import trio


class Backoff:
    """The waits between attempts: first, 2 * first, 4 * first, ..., never more than cap."""

    def __init__(self, first: float, cap: float) -> None:
        self.cap = cap
        self.delay = min(first, cap)  # the next wait (for log lines that say when the next try is)

    async def wait(self, instead: float | None = None) -> None:
        """Sleep the next wait, or `instead` (the server's own: the waits grow all the same, so
        that the next one without it is as long as if it had never been given)."""
        await trio.sleep(self.delay if instead is None else instead)
        self.delay = min(self.delay * 2, self.cap)
