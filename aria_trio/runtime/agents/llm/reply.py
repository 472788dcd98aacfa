"""The reply, assembled from what the server sends: the text and the tool calls, from a stream's
deltas or from one completion; bounded in size and in number of tool calls."""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass, field
from typing import cast

from aria_trio.runtime.agents.llm import stream
from aria_trio.runtime.agents.llm.call import Call, Retry, redact, shorten
from aria_trio.runtime.agents.llm.chunks import Choice, Chunk, Message, ToolCallPart
from aria_trio.runtime.agents.llm.transport import Body
from aria_trio.shared import errors, json_input

MAX_CONTENT = 1 << 20  # bytes of reply text (UTF-8)
MAX_TOOL_BYTES = 1 << 20  # bytes of all tool calls' ids, names and arguments together
MAX_TOOL_CALLS = 1024  # tool calls parsed from one reply (a turn runs at most max_tool_calls_per_reply)
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the raw JSON text the model produced (may be malformed: the caller checks it)


@dataclass(frozen=True)
class Usage:
    """Tokens of one model call, as the server reported them (0: it reported none)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Reply:
    content: str  # "" when the model only called tools
    tool_calls: list[ToolCall]
    finish_reason: str | None
    reasoning: str = ""  # the model's reasoning text (reasoning_content / reasoning), never content
    usage: Usage = Usage()


@dataclass
class _Part:
    """One tool call so far. Its arguments are kept in pieces, joined at the end: a server may send
    200 KB of arguments 7 characters at a time, and += on a string would copy it all each time."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class Assembler:
    """The reply, put together from the fragments the server sends; bounded."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.content: list[str] = []
        self.content_bytes = 0
        self.reasoning: list[str] = []
        self.reasoning_bytes = 0
        self.calls: dict[int, _Part] = {}
        self.tool_bytes = 0
        self.finish_reason: str | None = None

    def text(self, piece: str) -> None:
        self.content_bytes += len(piece.encode())
        if self.content_bytes > MAX_CONTENT:
            raise self.call.too_large()
        self.content.append(piece)

    def thought(self, piece: str) -> None:
        self.reasoning_bytes += len(piece.encode())
        if self.reasoning_bytes > MAX_CONTENT:
            raise self.call.too_large()
        self.reasoning.append(piece)

    def tool_fragment(self, value: object, position: int) -> None:
        if not isinstance(value, dict):
            raise self.call.malformed("a tool call is not an object")
        fragment = cast(ToolCallPart, value)
        index = fragment.get("index")
        fid = fragment.get("id") if isinstance(fragment.get("id"), str) else ""
        if not isinstance(index, int) or isinstance(index, bool):
            # Some servers leave the index out: a new id (or a whole call) starts a new one.
            last = max(self.calls) if self.calls else None
            same = last is not None and (not fid or fid == self.calls[last].id)
            index = last if same and last is not None else (position if last is None else last + 1)
        part = self.calls.get(index)
        if part is None:
            if len(self.calls) >= MAX_TOOL_CALLS:
                raise self.call.too_large()
            part = self.calls[index] = _Part()
        if fid and not part.id:
            part.id = fid
            self._count(fid)
        function = fragment.get("function")
        if not isinstance(function, dict):
            return
        name = function.get("name")
        if isinstance(name, str) and name and name != part.name:
            part.name += name  # streamed in pieces (a repeat of the whole name is ignored)
            self._count(name)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            part.arguments.append(arguments)
            self._count(arguments)
        elif isinstance(arguments, dict | list):  # a server that sends the object itself
            text = json.dumps(arguments)
            part.arguments = [text]
            self._count(text)

    def _count(self, text: str) -> None:
        self.tool_bytes += len(text.encode())
        if self.tool_bytes > MAX_TOOL_BYTES:
            raise self.call.too_large()

    def reply(self) -> Reply:
        calls = []
        for index in sorted(self.calls):
            part = self.calls[index]
            if not part.name:
                raise self.call.malformed("a tool call has no name")
            arguments = "".join(part.arguments)
            calls.append(
                ToolCall(
                    id=part.id or f"call_{secrets.token_hex(8)}",
                    name=part.name,
                    arguments=arguments if arguments.strip() else "{}",
                )
            )
        usage = self.call.usage
        return Reply(
            "".join(self.content),
            calls,
            self.finish_reason,
            "".join(self.reasoning),
            Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)),
        )


async def read_json(call: Call, body: Body) -> Reply:
    """A server that ignored `stream`: one chat.completion."""
    raw = await body.read(stream.MAX_EVENT)
    if raw is None:
        raise call.too_large()
    try:
        document = json_input.loads(raw)
    except ValueError:
        raise call.malformed("the answer is not valid JSON") from None
    choice = _first_choice(call, document)
    message = choice.get("message") if choice is not None else None
    if not isinstance(message, dict):
        raise call.malformed("the answer has no message")
    reply = Assembler(call)
    reply.text(_content(call, message.get("content")))
    thought = _reasoning(call, message)
    if thought:
        reply.thought(thought)
        await call.emit(thought, reasoning=True)
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
    await call.emit("".join(reply.content))
    return reply.reply()


async def read_sse(call: Call, body: Body) -> Reply:
    """A stream of chat.completion.chunk events, up to [DONE] (or the body's end, if the reply said
    why it finished). The text (and the reasoning) of each read of the body is shown to the caller
    at once, in one piece per read: a server that sends a token an event, a hundred events a read,
    costs a hundred times fewer deltas, none of them later than its read."""
    reply = Assembler(call)
    done = False
    async with contextlib.aclosing(stream.batches(call, body)) as batches:
        async for batch in batches:
            text: list[str] = []
            thought: list[str] = []
            for event in batch:
                if event.strip() == "[DONE]":
                    done = True
                    break
                _chunk(call, reply, event, text, thought)
            await call.emit("".join(thought), reasoning=True)
            await call.emit("".join(text))
            if done:
                break
    if done:
        await stream.drain(body)
    elif reply.finish_reason is None:
        raise Retry(
            call.unavailable(
                f"the model server at {call.where} ended the stream before the reply was complete",
                "LLM_CONNECTION_LOST",
            )
        )
    return reply.reply()


def _chunk(call: Call, reply: Assembler, event: str, text: list[str], thought: list[str]) -> None:
    """One chunk event into the reply; its text and reasoning also into `text` and `thought`."""
    try:
        document = json_input.loads(event)
    except ValueError:
        raise call.malformed("a chunk is not valid JSON") from None
    choice = _first_choice(call, document)
    if choice is None:
        return
    delta = choice.get("delta")
    if delta is None:
        delta = choice.get("message")  # a few servers put the last chunk's text here
    if isinstance(delta, dict):
        piece = _reasoning(call, delta)
        if piece:
            reply.thought(piece)
            thought.append(piece)
        piece = _content(call, delta.get("content"))
        if piece:
            reply.text(piece)
            text.append(piece)
        tool_calls = delta.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise call.malformed("tool_calls is not a list")
        for position, fragment in enumerate(tool_calls):
            reply.tool_fragment(fragment, position)
    reason = choice.get("finish_reason")
    if isinstance(reason, str) and reason:
        reply.finish_reason = reason


def _first_choice(call: Call, document: object) -> Choice | None:
    """The first choice of a chunk (the only one we ask for); its usage noted, its error raised."""
    if not isinstance(document, dict):
        raise call.malformed("a chunk is not a JSON object")
    chunk = cast(Chunk, document)
    if (error := _server_error(call, chunk)) is not None:
        raise error
    _usage(call, chunk)
    choices = chunk.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list):
        raise call.malformed("choices is not a list")
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


def _usage(call: Call, chunk: Chunk) -> None:
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        for key in USAGE_KEYS:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                call.usage[key] = value


def _server_error(call: Call, chunk: Chunk) -> errors.Unavailable | None:
    """An error reported inside a 200 answer (OpenAI and vLLM do so for errors mid-stream)."""
    error = chunk.get("error")
    if error is None:
        return None
    message = error.get("message") if isinstance(error, dict) else error
    detail = shorten(redact(message if isinstance(message, str) else json.dumps(message), call.config.api_key))
    return call.unavailable(f"the model server at {call.where} reported an error: {detail}", "LLM_SERVER_ERROR")


def _content(call: Call, content: object) -> str:
    """A message's text: a string, or (some servers) a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise call.malformed("content is not text")


def _reasoning(call: Call, delta: Message) -> str:
    """A delta's reasoning text: `reasoning_content` (vLLM, DeepSeek, llama.cpp) or `reasoning`
    (Ollama, OpenRouter); a server that sends both means the same text by both."""
    for key in ("reasoning_content", "reasoning"):
        value = delta.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise call.malformed(f"{key} is not text")
            return value
    return ""
