"""Server-sent events, read incrementally from the body and bounded: a line or an event longer than
MAX_EVENT, or more than MAX_EVENTS events, is refused as too large.

httpx-sse is not used: its line decoder buffers a line without limit (and its EventSource also
insists on the text/event-stream content type, where we sniff unlabelled bodies), so a server could
make us hold an endless line before any check could see it. This parser is the few lines of the
spec we need: `data:` fields, joined by newlines, ended by a blank line; comments (keep-alives),
`event:`, `id:` and `retry:` are ignored; lines end with LF or CRLF."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import httpx
import trio

from aria_trio.runtime.agents.llm.call import Call, Retry
from aria_trio.runtime.agents.llm.transport import MAX_ERROR_BODY, Body

MAX_EVENT = 8 << 20  # one SSE line or event, or a whole plain JSON answer
MAX_EVENTS = 250_000  # events of one streamed reply: each costs ~0.1 ms here, so this bounds a reply's CPU
DRAIN_TIMEOUT = 1.0  # after [DONE], read the body's end so that the connection can be reused


async def batches(call: Call, body: Body) -> AsyncGenerator[list[str], None]:
    """The data of the events of each read of the body (possibly none), until the body ends
    (close it, with contextlib.aclosing, when stopping early): one read's events together, so that
    a reply's text can be shown once per read, however finely the server cut it."""
    parser = Parser(call)
    seen = 0
    while True:
        data = await body.next()
        batch = parser.feed(data) if data is not None else parser.end()
        seen += len(batch)
        if seen > MAX_EVENTS:
            raise call.too_large()
        if batch:
            yield batch
        if data is None:
            return


async def drain(body: Body) -> None:
    """Read what follows [DONE] (normally just the body's end), briefly, so that the connection goes
    back to the pool instead of being closed."""
    with trio.move_on_after(DRAIN_TIMEOUT):
        try:
            drained = 0
            while drained < MAX_ERROR_BODY and (data := await body.next()) is not None:
                drained += len(data)
        except (Retry, httpx.HTTPError):
            pass


class Parser:
    """Server-sent events, incrementally: the data of each event (lines end with LF or CRLF)."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.buffer = bytearray()
        self.data: list[str] = []
        self.size = 0

    def feed(self, chunk: bytes) -> list[str]:
        self.buffer += chunk
        events: list[str] = []
        start = 0
        while (end := self.buffer.find(b"\n", start)) >= 0:
            self._line(bytes(self.buffer[start:end]).rstrip(b"\r"), events)
            start = end + 1
        del self.buffer[:start]
        if len(self.buffer) > MAX_EVENT:
            raise self.call.too_large()
        return events

    def end(self) -> list[str]:
        events: list[str] = []
        if self.buffer:
            self._line(bytes(self.buffer).rstrip(b"\r"), events)
            self.buffer.clear()
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[str]) -> None:
        if not line:
            if self.data:
                events.append("\n".join(self.data))
            self.data, self.size = [], 0
            return
        name, _, value = line.partition(b":")
        if name != b"data":
            return  # comments (keep-alives), event:, id:, retry:
        if value.startswith(b" "):
            value = value[1:]
        self.size += len(value)
        if self.size > MAX_EVENT:
            raise self.call.too_large()
        self.data.append(value.decode("utf-8", "replace"))
