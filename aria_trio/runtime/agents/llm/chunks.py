"""The wire shapes of Chat Completions answers, as far as we read them: a chat.completion (one
JSON answer) or the chat.completion.chunk events of a stream.

They say what a field is when the server gets it right. A server is not trusted and servers
differ, so a document is only cast to these once it is known to be an object, and the readers
still check every field they use."""

from __future__ import annotations

from typing import TypedDict


class Function(TypedDict, total=False):
    name: str  # may come in pieces
    arguments: str | dict[str, object] | list[object]  # JSON text in pieces; a few send the object


class ToolCallPart(TypedDict, total=False):
    index: int  # which call a fragment belongs to (a few servers leave it out)
    id: str
    type: str
    function: Function


class TextPart(TypedDict, total=False):
    type: str
    text: str


class Message(TypedDict, total=False):
    """A stream chunk's delta, or a whole completion's message."""

    role: str
    content: str | list[TextPart] | None
    tool_calls: list[ToolCallPart]
    reasoning_content: str | None  # the model's reasoning (vLLM, DeepSeek, llama.cpp)
    reasoning: str | None  # the same, as Ollama and OpenRouter name it


class Choice(TypedDict, total=False):
    index: int
    delta: Message  # in a stream
    message: Message  # in a completion (and, from a few servers, a stream's last chunk)
    finish_reason: str | None


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Error(TypedDict, total=False):
    message: str
    type: str
    code: str


class Chunk(TypedDict, total=False):
    """One chat.completion.chunk, or a whole chat.completion; or an error reported in a 200 answer."""

    choices: list[Choice]
    usage: Usage
    error: Error | str
