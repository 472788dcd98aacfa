"""The HTTP answer, before its content: the body read chunk by chunk within the silence timeout,
transport failures and error statuses turned into domain errors (retryable or not), the server's
Retry-After, and whether the answer is a stream or one JSON completion."""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import AsyncGenerator
from typing import Literal, cast

import httpx
import trio

from aria_trio.runtime.agents.llm.call import Call, Retry, StreamOptionsRefused, redact, shorten
from aria_trio.shared import errors, json_input

CONNECT_TIMEOUT = 15.0  # an unreachable host is reported (and retried) sooner than `timeout`
CLOSE_TIMEOUT = 2.0
RETRY_AFTER_MAX = 30.0
MAX_ERROR_BODY = 64 << 10

Kind = Literal["sse", "json"]


class Body:
    """The response body, chunk by chunk, each within the stream's silence timeout; with push-back
    (for sniffing what kind of answer it is)."""

    def __init__(self, response: httpx.Response, call: Call) -> None:
        self._chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        self._call = call
        self._back: bytes | None = None

    async def next(self) -> bytes | None:
        """The next chunk, or None at the end."""
        if self._back is not None:
            data, self._back = self._back, None
            return data
        call = self._call
        with trio.move_on_after(call.chunk_timeout):
            return await anext(self._chunks, None)
        raise Retry(
            call.unavailable(
                f"timed out: the model server at {call.where} sent nothing for {call.chunk_timeout:g} s",
                "LLM_TIMEOUT",
            )
        )

    def unread(self, data: bytes) -> None:
        self._back = data

    async def read(self, limit: int) -> bytes | None:
        """All of the rest, or None if it is longer than `limit`."""
        buffer = bytearray()
        while (data := await self.next()) is not None:
            buffer += data
            if len(buffer) > limit:
                return None
        return bytes(buffer)

    async def aclose(self) -> None:
        await self._chunks.aclose()


def transport_error(call: Call, exc: httpx.HTTPError, when: str) -> Exception:
    where = call.where
    if isinstance(exc, httpx.UnsupportedProtocol):
        return errors.FailedPrecondition(
            f"the model server URL {where} is not a valid http:// or https:// URL", reason="LLM_BAD_URL"
        )
    if isinstance(exc, httpx.DecodingError):
        return call.malformed("its body could not be decoded")
    if isinstance(exc, httpx.ConnectTimeout):
        message, reason = f"timed out connecting to the model server at {where}", "LLM_TIMEOUT"
    elif isinstance(exc, httpx.TimeoutException):
        message, reason = f"timed out talking to the model server at {where}", "LLM_TIMEOUT"
    elif isinstance(exc, httpx.ConnectError):
        message, reason = f"cannot connect to the model server at {where}", "LLM_UNREACHABLE"
    elif isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        message, reason = f"the model server at {where} closed the connection {when}", "LLM_CONNECTION_LOST"
    else:
        message, reason = f"the request to the model server at {where} failed {when}", "LLM_CONNECTION_LOST"
    call.cause = shorten(redact(repr(exc), call.config.api_key))
    return Retry(call.unavailable(message, reason))


async def check_status(call: Call, response: httpx.Response, body: Body) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    phrase = f"{status} {httpx.codes.get_reason_phrase(status)}".strip()
    if 300 <= status < 400:
        raise errors.FailedPrecondition(
            f"the model server at {call.where} answered {phrase} (a redirect): set its final address as the base URL",
            reason="LLM_REQUEST_REFUSED",
            metadata={"base_url": call.where, "status": str(status)},
        )
    detail, code = await _error_detail(call, response, body)
    if status in (400, 422) and call.ask_usage and "stream_options" in detail.lower():
        raise StreamOptionsRefused(detail)
    quoted = f": {detail}" if detail else ""
    if status in (408, 429) or status >= 500:
        if code == "insufficient_quota":  # a 429 that waiting does not cure
            raise errors.FailedPrecondition(
                f"the model server at {call.where} refused the request ({phrase}){quoted}",
                reason="LLM_REQUEST_REFUSED",
                metadata={"base_url": call.where, "status": str(status)},
            )
        raise Retry(
            call.unavailable(f"the model server at {call.where} answered {phrase}{quoted}", "LLM_SERVER_ERROR"),
            retry_after=_retry_after(response),
        )
    hint = {
        401: " (check the API key)",
        403: " (check the API key)",
        404: " (check the model name, and the base URL: it often ends in /v1)",
    }
    raise errors.FailedPrecondition(
        redact(
            f"the model server at {call.where} refused the request ({phrase}){hint.get(status, '')}{quoted}",
            call.config.api_key,
        ),
        reason="LLM_REQUEST_REFUSED",
        metadata={"base_url": call.where, "status": str(status)},
    )


async def _error_detail(call: Call, response: httpx.Response, body: Body) -> tuple[str, str | None]:
    """The server's own words about an error (OpenAI's {"error": {"message": ...}}, or a short text
    body), shortened and with the key redacted; and the error's code if it gave one."""
    try:
        raw = await body.read(MAX_ERROR_BODY)
    except (Retry, httpx.HTTPError):
        raw = None
    if not raw:
        return "", None
    text = raw.decode("utf-8", "replace")
    message: object = None
    code: object = None
    try:
        document: object = json_input.loads(text)
    except ValueError:
        content_type = response.headers.get("content-type", "")
        if "html" not in content_type and not text.lstrip().startswith("<"):
            message = text
    else:
        if isinstance(document, dict):
            error = document.get("error")
            if isinstance(error, dict):
                message, code = error.get("message"), error.get("code") or error.get("type")
            elif isinstance(error, str):
                message = error
            else:
                message = document.get("message") or document.get("detail")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    return shorten(redact(message or "", call.config.api_key)), code if isinstance(code, str) else None


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asks to wait (Retry-After: seconds or an HTTP date; OpenAI's retry-after-ms)."""
    seconds = _number(response.headers.get("retry-after-ms"), 1000)
    value = response.headers.get("retry-after")
    if seconds is None and value is not None:
        seconds = _number(value, 1)
        if seconds is None:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
    if seconds is None:
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def _number(value: str | None, per_second: float) -> float | None:
    try:
        number = float(value) / per_second if value is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) else None


async def kind(call: Call, response: httpx.Response, body: Body) -> Kind:
    """Whether the answer is a stream ("sse") or one completion ("json"): by the content type, else by
    the first bytes (some servers label neither)."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "text/event-stream":
        return "sse"
    if content_type == "application/json" or content_type.endswith("+json"):
        return "json"
    start = b""
    while len(start) < 16 and (data := await body.next()) is not None:
        start += data
        if start.strip():
            break
    body.unread(start)
    head = start.lstrip()
    if head.startswith(b"{"):
        return "json"
    if head.startswith((b"data:", b":", b"event:", b"id:", b"retry:")):
        return "sse"
    raise call.unavailable(
        f"the model server at {call.where} answered with {content_type or 'an unlabelled body'}, not a chat completion",
        "LLM_BAD_REPLY",
    )
