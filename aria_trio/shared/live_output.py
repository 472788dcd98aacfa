"""The bound on what a running tool's output shows live, one for both daemons: Quilt's
RunToolStream and the runtime's tool calls cut at the same place and say so the same way."""

from __future__ import annotations

LIVE_LINES, LIVE_BYTES = 10_000, 1024 * 1024  # of one run's lines shown live (each cut at 64 KiB before)


class LiveBound:
    """At most LIVE_LINES lines and LIVE_BYTES characters of one run: `admit` gives back the line
    to show, the note that the rest is not shown (once, in place of the line past the bound; `cut`
    is then true), or None once cut."""

    def __init__(self, who: str) -> None:
        self.note = f"[{who}] the rest of the output is not shown live (over {LIVE_LINES:,} lines or 1 MiB)"
        self.count = self.size = 0
        self.cut = False

    def admit(self, text: str) -> str | None:
        if self.cut:
            return None
        self.count += 1
        self.size += len(text)
        if self.count > LIVE_LINES or self.size > LIVE_BYTES:
            self.cut = True
            return self.note
        return text
