"""The model provider: OpenAI-compatible Chat Completions, streamed, with tool calling.

One protocol reaches OpenAI, Ollama, vLLM, llama.cpp's server and LM Studio, so the runtime speaks
only it: POST {base_url}/chat/completions with `stream: true`, read the server-sent events, and
assemble the text and the tool calls from their fragments. A server that ignores `stream` and
answers one JSON completion is accepted too.

Failures are domain errors a client can act on: the server cannot be reached, is overloaded or too
slow (UNAVAILABLE, after retries with backoff); it refuses the request (FAILED_PRECONDITION: a bad
key, an unknown model). Retries happen only while nothing has been shown to the caller: a reply
half streamed is never replayed. The API key is never put in a message or a log line.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import structlog
import trio

from aria_trio.shared import errors, json_input

log = structlog.get_logger("aria.llm")

OPENAI_BASE_URL = "https://api.openai.com/v1"
CHUNK_TIMEOUT = 60.0  # seconds the stream may stay silent
CONNECT_TIMEOUT = 15.0  # an unreachable host is reported (and retried) sooner than `timeout`
CLOSE_TIMEOUT = 2.0
DRAIN_TIMEOUT = 1.0  # after [DONE], read the body's end so that the connection can be reused
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0
RETRY_AFTER_MAX = 30.0
MAX_CONTENT = 1 << 20  # bytes of reply text (UTF-8)
MAX_TOOL_BYTES = 1 << 20  # bytes of all tool calls' ids, names and arguments together
MAX_TOOL_CALLS = 1024  # tool calls parsed from one reply (a turn runs at most max_tool_calls_per_reply)
MAX_EVENT = 8 << 20  # one SSE line or event, or a whole plain JSON answer
MAX_EVENTS = 250_000  # events of one streamed reply: each costs ~0.1 ms here, so this bounds a reply's CPU
MAX_ERROR_BODY = 64 << 10
MAX_DETAIL = 300  # characters of the server's own error message quoted to clients


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to call the model.

    `timeout` bounds each attempt until the server starts answering (connecting, sending, waiting for
    the response headers; a server that does not stream answers only when it is done). After that,
    the stream may stay silent at most min(CHUNK_TIMEOUT, timeout) seconds at a time, however long
    the whole reply takes.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float | None = None
    system_prompt: str | None = None
    timeout: float = 120.0
    max_retries: int = 3


def resolve_config(prefs: Mapping[str, Any], env: Mapping[str, str]) -> LLMConfig | None:
    """The model configuration of one user: their preferences (llm.base_url, llm.model,
    llm.temperature, llm.system_prompt, llm.api_key), else the daemon's environment
    (ARIA_LLM_BASE_URL, ARIA_LLM_MODEL, ARIA_LLM_API_KEY, else OPENAI_BASE_URL, OPENAI_API_KEY).
    The base URL defaults to OpenAI's only when OPENAI_API_KEY is the key configured. None when no
    model is configured (no model name, or no base URL).

    The operator's key (from the environment) is sent only to the operator's URL: a user who points
    llm.base_url elsewhere must give their own llm.api_key, so that no user can collect it.
    """

    def pref(key: str) -> str | None:
        value = prefs.get(key)
        return (value.strip() or None) if isinstance(value, str) else None

    def var(name: str) -> str | None:
        return env.get(name, "").strip() or None

    env_key = var("ARIA_LLM_API_KEY") or var("OPENAI_API_KEY")
    env_url = var("ARIA_LLM_BASE_URL") or var("OPENAI_BASE_URL")
    if env_url is None and var("ARIA_LLM_API_KEY") is None and var("OPENAI_API_KEY") is not None:
        env_url = OPENAI_BASE_URL
    user_url = pref("llm.base_url")
    base_url = user_url or env_url
    model = pref("llm.model") or var("ARIA_LLM_MODEL")
    if base_url is None or model is None:
        return None
    api_key = pref("llm.api_key")
    if api_key is None and (user_url is None or _same_url(user_url, env_url)):
        api_key = env_key
    temperature = prefs.get("llm.temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not math.isfinite(temperature):
        temperature = None
    system_prompt = prefs.get("llm.system_prompt")
    return LLMConfig(
        base_url=base_url,
        model=model,
        api_key=api_key,
        temperature=None if temperature is None else float(temperature),
        system_prompt=system_prompt if isinstance(system_prompt, str) and system_prompt.strip() else None,
    )


def _same_url(a: str, b: str | None) -> bool:
    return b is not None and a.rstrip("/") == b.rstrip("/")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the raw JSON text the model produced (may be malformed: the caller checks it)


@dataclass(frozen=True)
class Reply:
    content: str  # "" when the model only called tools
    tool_calls: list[ToolCall]
    finish_reason: str | None


class _Retry(Exception):
    """An attempt failed in a way another attempt may not: connection, timeout, 429, 5xx."""

    def __init__(self, error: errors.Unavailable, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


@dataclass
class _Call:
    """One complete() call: what the attempts share."""

    config: LLMConfig
    where: str  # the base URL as shown in messages and logs (no credentials, no query)
    on_text: Callable[[str], Awaitable[None]] | None
    attempts: int = 0
    emitted: bool = False  # text was passed to on_text: no more retries
    cause: str | None = None  # the last transport error, for the log
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def chunk_timeout(self) -> float:
        return min(CHUNK_TIMEOUT, self.config.timeout)

    def unavailable(self, message: str, reason: str, **metadata: str) -> errors.Unavailable:
        return errors.Unavailable(
            _redact(message, self.config.api_key), reason=reason, metadata={"base_url": self.where, **metadata}
        )

    def malformed(self, what: str) -> errors.Unavailable:
        return self.unavailable(f"the model server at {self.where} sent a malformed reply: {what}", "LLM_BAD_REPLY")


class ChatModel:
    """Calls models over one shared HTTP client (connections are reused across calls and users)."""

    def __init__(self, http: httpx.AsyncClient | None = None, *, backoff: float = BACKOFF_FIRST) -> None:
        self._owned = http is None
        self.http = (
            http if http is not None else httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT))
        )
        self.backoff = backoff  # the first retry's wait, doubled for each next one

    async def aclose(self) -> None:
        """Close the HTTP client if this object made it (a client passed in belongs to the caller)."""
        if self._owned:
            await self.http.aclose()

    async def complete(
        self,
        config: LLMConfig,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> Reply:
        """One assistant turn: the reply's text (passed to `on_text` delta by delta as it streams; in
        one piece from a server that does not stream) and its tool calls. `config.system_prompt`,
        when set, is sent as a first system message before `messages`."""
        call = _Call(config, _display_url(config.base_url), on_text)
        started = time.monotonic()
        outcome: dict[str, Any] = {"outcome": "cancelled"}
        try:
            request = self._request(call, messages, tools)
            reply = await self._retrying(call, request)
            outcome = {"outcome": "ok", "finish_reason": reply.finish_reason, "tool_calls": len(reply.tool_calls)}
            return reply
        except errors.AriaError as exc:
            outcome = {"outcome": "failed", "error": exc.message}
            raise
        except Exception as exc:
            outcome = {"outcome": "failed", "error": type(exc).__name__}
            raise
        finally:
            level = log.warning if outcome["outcome"] == "failed" else log.info
            level(
                "model call",
                model=config.model,
                base_url=call.where,
                duration_s=round(time.monotonic() - started, 3),
                attempts=call.attempts,
                **outcome,
                **({"cause": call.cause} if call.cause and outcome["outcome"] != "ok" else {}),
                **call.usage,
            )

    def _request(self, call: _Call, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> httpx.Request:
        config = call.config
        if config.system_prompt:
            messages = [{"role": "system", "content": config.system_prompt}, *messages]
        body: dict[str, Any] = {"model": config.model, "messages": messages, "stream": True}
        if tools:
            body["tools"] = tools
        if config.temperature is not None:
            body["temperature"] = config.temperature
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        connect = min(CONNECT_TIMEOUT, config.timeout)
        try:
            return self.http.build_request(
                "POST",
                config.base_url.rstrip("/") + "/chat/completions",
                json=body,
                headers=headers,
                timeout=httpx.Timeout(None, connect=connect),
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            raise errors.FailedPrecondition(
                f"the model server URL {call.where} is not a valid http:// or https:// URL", reason="LLM_BAD_URL"
            ) from None

    async def _retrying(self, call: _Call, request: httpx.Request) -> Reply:
        while True:
            call.attempts += 1
            try:
                return await self._attempt(call, request)
            except _Retry as retry:
                if call.emitted or call.attempts > call.config.max_retries:
                    error = retry.error
                    if call.attempts > 1:
                        error = errors.Unavailable(
                            f"{error.message} (gave up after {call.attempts} attempts)",
                            reason=error.reason,
                            metadata=error.metadata,
                        )
                    raise error from None
                if retry.retry_after is not None:
                    delay = retry.retry_after
                else:
                    delay = min(self.backoff * 2 ** (call.attempts - 1), BACKOFF_MAX)
                await trio.sleep(delay)

    async def _attempt(self, call: _Call, request: httpx.Request) -> Reply:
        response: httpx.Response | None = None
        with trio.move_on_after(call.config.timeout):
            try:
                response = await self.http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _transport_error(call, exc, "before answering") from None
        if response is None:
            raise _Retry(
                call.unavailable(
                    f"timed out after {call.config.timeout:g} s waiting for the model server at {call.where} to answer",
                    "LLM_TIMEOUT",
                )
            )
        body = _Body(response, call)
        try:
            await _check_status(call, response, body)
            kind = await _kind(call, response, body)
            if kind == "json":
                return await _read_json(call, body)
            return await _read_sse(call, body)
        except httpx.HTTPError as exc:
            raise _transport_error(call, exc, "mid-reply") from None
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                with contextlib.suppress(httpx.HTTPError):
                    await body.aclose()
                with contextlib.suppress(httpx.HTTPError):
                    await response.aclose()


class _Body:
    """The response body, chunk by chunk, each within the stream's silence timeout; with push-back
    (for sniffing what kind of answer it is)."""

    def __init__(self, response: httpx.Response, call: _Call) -> None:
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
        raise _Retry(
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


def _transport_error(call: _Call, exc: httpx.HTTPError, when: str) -> Exception:
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
    call.cause = _shorten(_redact(repr(exc), call.config.api_key))
    return _Retry(call.unavailable(message, reason))


async def _check_status(call: _Call, response: httpx.Response, body: _Body) -> None:
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
    quoted = f": {detail}" if detail else ""
    if status in (408, 429) or status >= 500:
        if code == "insufficient_quota":  # a 429 that waiting does not cure
            raise errors.FailedPrecondition(
                f"the model server at {call.where} refused the request ({phrase}){quoted}",
                reason="LLM_REQUEST_REFUSED",
                metadata={"base_url": call.where, "status": str(status)},
            )
        raise _Retry(
            call.unavailable(f"the model server at {call.where} answered {phrase}{quoted}", "LLM_SERVER_ERROR"),
            retry_after=_retry_after(response),
        )
    hint = {
        401: " (check the API key)",
        403: " (check the API key)",
        404: " (check the model name, and the base URL: it often ends in /v1)",
    }
    raise errors.FailedPrecondition(
        _redact(
            f"the model server at {call.where} refused the request ({phrase}){hint.get(status, '')}{quoted}",
            call.config.api_key,
        ),
        reason="LLM_REQUEST_REFUSED",
        metadata={"base_url": call.where, "status": str(status)},
    )


async def _error_detail(call: _Call, response: httpx.Response, body: _Body) -> tuple[str, str | None]:
    """The server's own words about an error (OpenAI's {"error": {"message": ...}}, or a short text
    body), shortened and with the key redacted; and the error's code if it gave one."""
    try:
        raw = await body.read(MAX_ERROR_BODY)
    except (_Retry, httpx.HTTPError):
        raw = None
    if not raw:
        return "", None
    text = raw.decode("utf-8", "replace")
    message: Any = None
    code: Any = None
    try:
        document = json_input.loads(text)
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
    return _shorten(_redact(message or "", call.config.api_key)), code if isinstance(code, str) else None


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


async def _kind(call: _Call, response: httpx.Response, body: _Body) -> str:
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


class _Assembler:
    """The reply, put together from the fragments the server sends; bounded."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.content: list[str] = []
        self.content_bytes = 0
        # index -> {"id", "name", "arguments": its pieces} (joined at the end: a server may send
        # 200 KB of arguments 7 characters at a time, and += on a string would copy it all each time)
        self.calls: dict[int, dict[str, Any]] = {}
        self.tool_bytes = 0
        self.finish_reason: str | None = None

    def text(self, piece: str) -> None:
        self.content_bytes += len(piece.encode())
        if self.content_bytes > MAX_CONTENT:
            raise _too_large(self.call)
        self.content.append(piece)

    def tool_fragment(self, fragment: Any, position: int) -> None:
        if not isinstance(fragment, dict):
            raise self.call.malformed("a tool call is not an object")
        index = fragment.get("index")
        fid = fragment.get("id") if isinstance(fragment.get("id"), str) else ""
        if not isinstance(index, int) or isinstance(index, bool):
            # Some servers leave the index out: a new id (or a whole call) starts a new one.
            last = max(self.calls) if self.calls else None
            same = last is not None and (not fid or fid == self.calls[last]["id"])
            index = last if same and last is not None else (position if last is None else last + 1)
        part = self.calls.get(index)
        if part is None:
            if len(self.calls) >= MAX_TOOL_CALLS:
                raise _too_large(self.call)
            part = self.calls[index] = {"id": "", "name": "", "arguments": []}
        if fid and not part["id"]:
            part["id"] = fid
            self._count(fid)
        function = fragment.get("function")
        if not isinstance(function, dict):
            return
        name = function.get("name")
        if isinstance(name, str) and name and name != part["name"]:
            part["name"] += name  # streamed in pieces (a repeat of the whole name is ignored)
            self._count(name)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            part["arguments"].append(arguments)
            self._count(arguments)
        elif isinstance(arguments, dict | list):  # a server that sends the object itself
            text = json.dumps(arguments)
            part["arguments"] = [text]
            self._count(text)

    def _count(self, text: str) -> None:
        self.tool_bytes += len(text.encode())
        if self.tool_bytes > MAX_TOOL_BYTES:
            raise _too_large(self.call)

    def reply(self) -> Reply:
        calls = []
        for index in sorted(self.calls):
            part = self.calls[index]
            if not part["name"]:
                raise self.call.malformed("a tool call has no name")
            arguments = "".join(part["arguments"])
            calls.append(
                ToolCall(
                    id=part["id"] or f"call_{secrets.token_hex(8)}",
                    name=part["name"],
                    arguments=arguments if arguments.strip() else "{}",
                )
            )
        return Reply("".join(self.content), calls, self.finish_reason)


def _too_large(call: _Call) -> errors.Unavailable:
    return call.unavailable("the model's reply is too large", "LLM_REPLY_TOO_LARGE")


def _usage(call: _Call, document: dict[str, Any]) -> None:
    usage = document.get("usage")
    if isinstance(usage, dict):
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                call.usage[key] = value


def _server_error(call: _Call, document: dict[str, Any]) -> errors.Unavailable | None:
    """An error reported inside a 200 answer (OpenAI and vLLM do so for errors mid-stream)."""
    error = document.get("error")
    if error is None:
        return None
    message = error.get("message") if isinstance(error, dict) else error
    detail = _shorten(_redact(message if isinstance(message, str) else json.dumps(message), call.config.api_key))
    return call.unavailable(f"the model server at {call.where} reported an error: {detail}", "LLM_SERVER_ERROR")


def _first_choice(call: _Call, document: Any) -> dict[str, Any] | None:
    if not isinstance(document, dict):
        raise call.malformed("a chunk is not a JSON object")
    if (error := _server_error(call, document)) is not None:
        raise error
    _usage(call, document)
    choices = document.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list):
        raise call.malformed("choices is not a list")
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


async def _emit(call: _Call, text: str) -> None:
    if text and call.on_text is not None:
        call.emitted = True
        await call.on_text(text)


async def _read_json(call: _Call, body: _Body) -> Reply:
    """A server that ignored `stream`: one chat.completion."""
    raw = await body.read(MAX_EVENT)
    if raw is None:
        raise _too_large(call)
    try:
        document = json_input.loads(raw)
    except ValueError:
        raise call.malformed("the answer is not valid JSON") from None
    choice = _first_choice(call, document)
    message = choice.get("message") if choice is not None else None
    if not isinstance(message, dict):
        raise call.malformed("the answer has no message")
    reply = _Assembler(call)
    reply.text(_content(call, message.get("content")))
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise call.malformed("tool_calls is not a list")
    for position, fragment in enumerate(tool_calls):
        if isinstance(fragment, dict):
            fragment = {**fragment, "index": position}
        reply.tool_fragment(fragment, position)
    assert choice is not None
    reason = choice.get("finish_reason")
    reply.finish_reason = reason if isinstance(reason, str) else None
    await _emit(call, "".join(reply.content))
    return reply.reply()


def _content(call: _Call, content: Any) -> str:
    """A message's text: a string, or (some servers) a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise call.malformed("content is not text")


async def _read_sse(call: _Call, body: _Body) -> Reply:
    reply = _Assembler(call)
    events = _SSE(call)
    done = False
    events_seen = 0
    while not done:
        data = await body.next()
        batch = events.feed(data) if data is not None else events.end()
        events_seen += len(batch)
        if events_seen > MAX_EVENTS:
            raise _too_large(call)
        for event in batch:
            if event.strip() == "[DONE]":
                done = True
                break
            try:
                document = json_input.loads(event)
            except ValueError:
                raise call.malformed("a chunk is not valid JSON") from None
            choice = _first_choice(call, document)
            if choice is None:
                continue
            delta = choice.get("delta")
            if delta is None:
                delta = choice.get("message")  # a few servers put the last chunk's text here
            if isinstance(delta, dict):
                text = _content(call, delta.get("content"))
                if text:
                    reply.text(text)
                tool_calls = delta.get("tool_calls") or []
                if not isinstance(tool_calls, list):
                    raise call.malformed("tool_calls is not a list")
                for position, fragment in enumerate(tool_calls):
                    reply.tool_fragment(fragment, position)
                await _emit(call, text)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                reply.finish_reason = reason
        if data is None:
            break
    if done:
        await _drain(body)
    elif reply.finish_reason is None:
        raise _Retry(
            call.unavailable(
                f"the model server at {call.where} ended the stream before the reply was complete",
                "LLM_CONNECTION_LOST",
            )
        )
    return reply.reply()


async def _drain(body: _Body) -> None:
    """Read what follows [DONE] (normally just the body's end), briefly, so that the connection goes
    back to the pool instead of being closed."""
    with trio.move_on_after(DRAIN_TIMEOUT):
        try:
            drained = 0
            while drained < MAX_ERROR_BODY and (data := await body.next()) is not None:
                drained += len(data)
        except (_Retry, httpx.HTTPError):
            pass


class _SSE:
    """Server-sent events, incrementally: the data of each event (lines end with LF or CRLF)."""

    def __init__(self, call: _Call) -> None:
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
            raise _too_large(self.call)
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
            raise _too_large(self.call)
        self.data.append(value.decode("utf-8", "replace"))


def _display_url(url: str) -> str:
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


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "****") if secret and len(secret) >= 4 else text


def _shorten(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"
