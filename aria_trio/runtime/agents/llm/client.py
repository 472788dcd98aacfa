"""ChatModel: one call to the model as the runtime makes it: the request, its attempts (retried
with backoff while nothing has been shown to the caller), and one log line that says how it went.

Usage is asked for in the stream (`stream_options: {"include_usage": true}`, which OpenAI, vLLM,
Ollama and llama.cpp honour). A server that refuses the option (a 400 or 422 whose error names
`stream_options`) is asked again at once without it, and its base URL is remembered (for the
daemon's life, at most NO_USAGE_URLS of them) so that it is not asked with it again."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence

import httpx
import structlog
import trio

from aria_trio.runtime.agents.llm import reply as replies
from aria_trio.runtime.agents.llm import transport
from aria_trio.runtime.agents.llm.call import Call, OnDelta, Retry, StreamOptionsRefused, display_url
from aria_trio.runtime.agents.llm.config import LLMConfig
from aria_trio.runtime.agents.llm.reply import Reply
from aria_trio.shared import errors, retry

log = structlog.get_logger("aria.llm")

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0
NO_USAGE_URLS = 1024  # base URLs remembered as refusing stream_options (then the memory starts again)

JSONObject = Mapping[str, object]  # a message or a tool spec, sent as the caller made it


class ChatModel:
    """Calls models over one shared HTTP client (connections are reused across calls and users)."""

    def __init__(self, http: httpx.AsyncClient | None = None, *, backoff: float = BACKOFF_FIRST) -> None:
        self._owned = http is None
        self.http = (
            http
            if http is not None
            else httpx.AsyncClient(timeout=httpx.Timeout(None, connect=transport.CONNECT_TIMEOUT))
        )
        self.backoff = backoff  # the first retry's wait, doubled for each next one
        self.no_usage: set[str] = set()  # base URLs whose server refused stream_options

    async def aclose(self) -> None:
        """Close the HTTP client if this object made it (a client passed in belongs to the caller)."""
        if self._owned:
            await self.http.aclose()

    async def complete(
        self,
        config: LLMConfig,
        messages: Sequence[JSONObject],
        tools: Sequence[JSONObject],
        on_delta: OnDelta | None = None,
    ) -> Reply:
        """One assistant turn: the reply's text (passed to `on_delta` piece by piece as it streams,
        reasoning apart; in one piece from a server that does not stream), its tool calls and the
        usage the server reported. `config.system_prompt`, when set, is sent as a first system
        message before `messages`."""
        call = Call(config, display_url(config.base_url), on_delta)
        call.ask_usage = config.base_url not in self.no_usage
        started = time.monotonic()
        outcome: dict[str, object] = {"outcome": "cancelled"}
        try:
            try:
                reply = await self._retrying(call, self._request(call, messages, tools))
            except StreamOptionsRefused:
                if len(self.no_usage) >= NO_USAGE_URLS:
                    self.no_usage.clear()
                self.no_usage.add(config.base_url)
                log.info("the model server refuses stream_options: asking without", base_url=call.where)
                call.ask_usage = False
                reply = await self._retrying(call, self._request(call, messages, tools))
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

    def _request(self, call: Call, messages: Sequence[JSONObject], tools: Sequence[JSONObject]) -> httpx.Request:
        config = call.config
        if config.system_prompt:
            messages = [{"role": "system", "content": config.system_prompt}, *messages]
        body: dict[str, object] = {"model": config.model, "messages": list(messages), "stream": True}
        if call.ask_usage:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = list(tools)
        if config.temperature is not None:
            body["temperature"] = config.temperature
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        connect = min(transport.CONNECT_TIMEOUT, config.timeout)
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

    async def _retrying(self, call: Call, request: httpx.Request) -> Reply:
        backoff = retry.Backoff(self.backoff, BACKOFF_MAX)
        while True:
            call.attempts += 1
            try:
                return await self._attempt(call, request)
            except Retry as failed:
                if call.emitted or call.attempts > call.config.max_retries:
                    error = failed.error
                    if call.attempts > 1:
                        error = errors.Unavailable(
                            f"{error.message} (gave up after {call.attempts} attempts)",
                            reason=error.reason,
                            metadata=error.metadata,
                        )
                    raise error from None
                await backoff.wait(failed.retry_after)

    async def _attempt(self, call: Call, request: httpx.Request) -> Reply:
        response: httpx.Response | None = None
        with trio.move_on_after(call.config.timeout):
            try:
                response = await self.http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise transport.transport_error(call, exc, "before answering") from None
        if response is None:
            raise Retry(
                call.unavailable(
                    f"timed out after {call.config.timeout:g} s waiting for the model server at {call.where} to answer",
                    "LLM_TIMEOUT",
                )
            )
        body = transport.Body(response, call)
        try:
            await transport.check_status(call, response, body)
            if await transport.kind(call, response, body) == "json":
                return await replies.read_json(call, body)
            return await replies.read_sse(call, body)
        except httpx.HTTPError as exc:
            raise transport.transport_error(call, exc, "mid-reply") from None
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(transport.CLOSE_TIMEOUT):
                with contextlib.suppress(httpx.HTTPError):
                    await body.aclose()
                with contextlib.suppress(httpx.HTTPError):
                    await response.aclose()
