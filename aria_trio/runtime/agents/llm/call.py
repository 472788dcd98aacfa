"""One complete() call: what its attempts share (the config, whether text was shown, the usage),
and how its failures read: naming the server by a URL without credentials, the key redacted."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aria_trio.runtime.agents.llm.config import LLMConfig
from aria_trio.shared import errors

CHUNK_TIMEOUT = 60.0  # seconds the stream may stay silent
MAX_DETAIL = 300  # characters of the server's own error message quoted to clients


OnDelta = Callable[[str, bool], Awaitable[None]]  # (a piece of the reply's text, is it reasoning?)


class StreamOptionsRefused(Exception):
    """The server refused `stream_options` (a 400 or 422 whose error names it): ask again without."""


class Retry(Exception):
    """An attempt failed in a way another attempt may not: connection, timeout, 429, 5xx."""

    def __init__(self, error: errors.Unavailable, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


@dataclass
class Call:
    """One complete() call: what the attempts share."""

    config: LLMConfig
    where: str  # the base URL as shown in messages and logs (no credentials, no query)
    on_delta: OnDelta | None
    attempts: int = 0
    ask_usage: bool = True  # send stream_options.include_usage (off for a server that refused it)
    emitted: bool = False  # text was passed to on_text: no more retries
    cause: str | None = None  # the last transport error, for the log
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def chunk_timeout(self) -> float:
        return min(CHUNK_TIMEOUT, self.config.timeout)

    def unavailable(self, message: str, reason: str, **metadata: str) -> errors.Unavailable:
        return errors.Unavailable(
            redact(message, self.config.api_key), reason=reason, metadata={"base_url": self.where, **metadata}
        )

    def malformed(self, what: str) -> errors.Unavailable:
        return self.unavailable(f"the model server at {self.where} sent a malformed reply: {what}", "LLM_BAD_REPLY")

    def too_large(self) -> errors.Unavailable:
        return self.unavailable("the model's reply is too large", "LLM_REPLY_TOO_LARGE")

    async def emit(self, text: str, reasoning: bool = False) -> None:
        """Show text (or reasoning) to the caller: from then on, the call is not retried."""
        if text and self.on_delta is not None:
            self.emitted = True
            await self.on_delta(text, reasoning)


def display_url(url: str) -> str:
    """The URL as shown to people: without any user:password@ or query (both may carry secrets)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    except ValueError:
        return "(an invalid URL)"


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "****") if secret and len(secret) >= 4 else text


def shorten(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"
