"""The model provider against a real (scripted) HTTP server: streaming, tool calls, retries, errors,
timeouts, cancellation; and how a user's model configuration is resolved."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

from aria_trio.runtime.agents.llm import OPENAI_BASE_URL, ChatModel, LLMConfig, Reply, ToolCall, resolve_config
from aria_trio.runtime.agents.llm.reply import Usage
from aria_trio.shared import errors

from fake_llm import Error, FakeLLM, Json, Stream, chunk, completion, text_stream

KEY = "sk-test-0123456789abcdef"
HELLO = [{"role": "user", "content": "hello"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    }
]


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


@pytest.fixture
async def model() -> AsyncIterator[ChatModel]:
    chat = ChatModel(backoff=0.01)
    try:
        yield chat
    finally:
        await chat.aclose()


def config(fake: FakeLLM, **changes: Any) -> LLMConfig:
    return LLMConfig(**{"base_url": fake.base_url, "model": "fake-model", "api_key": KEY, **changes})


class Deltas:
    """on_delta: the answer's pieces in `got`, the reasoning's in `thought`."""

    def __init__(self) -> None:
        self.got: list[str] = []
        self.thought: list[str] = []

    async def __call__(self, text: str, reasoning: bool) -> None:
        (self.thought if reasoning else self.got).append(text)


async def test_streamed_text_reaches_on_text_in_order(fake: FakeLLM, model: ChatModel) -> None:
    fake.reply_text("The quick brown fox jumps", pieces=5, interval=0.05)  # (a read each: a delta each)
    deltas = Deltas()
    cfg = config(fake, temperature=0.2, system_prompt="Be brief.")
    reply = await model.complete(cfg, HELLO, [], deltas)
    assert reply == Reply("The quick brown fox jumps", [], "stop")
    assert len(deltas.got) == 5 and "".join(deltas.got) == reply.content
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body == {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "Be brief."}, *HELLO],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
    }


async def test_tools_are_sent_and_no_key_means_no_authorization(fake: FakeLLM, model: ChatModel) -> None:
    fake.reply_text("ok")
    await model.complete(config(fake, api_key=None, base_url=fake.base_url + "/"), HELLO, TOOLS)
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert "authorization" not in request.headers
    assert request.body["tools"] == TOOLS
    assert "temperature" not in request.body


async def test_two_tool_calls_assembled_from_fragments(fake: FakeLLM, model: ChatModel) -> None:
    fake.call_tools(
        [("read_file", {"path": "/etc/motd"}), ("list_dir", {"path": "/", "depth": 2})], text="Let me look."
    )
    deltas = Deltas()
    reply = await model.complete(config(fake), HELLO, TOOLS, deltas)
    assert reply.content == "Let me look." == "".join(deltas.got)
    assert reply.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("read_file", '{"path": "/etc/motd"}'),
        ("list_dir", '{"path": "/", "depth": 2}'),
    ]
    assert all(c.id.startswith("call_") for c in reply.tool_calls)
    assert len({c.id for c in reply.tool_calls}) == 2


async def test_interleaved_fragments_and_names_in_pieces(fake: FakeLLM, model: ChatModel) -> None:
    def fragment(index: int, **function: str) -> dict[str, Any]:
        return chunk({"tool_calls": [{"index": index, "function": function}]})

    fake.push(
        Stream(
            [
                chunk({"tool_calls": [{"index": 0, "id": "a1", "type": "function", "function": {"name": "re"}}]}),
                chunk({"tool_calls": [{"index": 1, "id": "b2", "type": "function", "function": {"name": "wr"}}]}),
                fragment(0, name="ad", arguments='{"pa'),
                fragment(1, name="ite", arguments='{"pa'),
                fragment(1, arguments='th": "y"}'),
                fragment(0, arguments='th": "x"'),
                fragment(0, arguments="}"),
                chunk({}, "tool_calls"),
            ]
        )
    )
    reply = await model.complete(config(fake), HELLO, TOOLS)
    assert reply.tool_calls == [ToolCall("a1", "read", '{"path": "x"}'), ToolCall("b2", "write", '{"path": "y"}')]


async def test_a_server_that_does_not_stream(fake: FakeLLM, model: ChatModel) -> None:
    fake.reply_json("Plain answer.")
    fake.push(Json(completion(tool_calls=[("read_file", {"path": "a"}), ("read_file", "{not json")])))
    deltas = Deltas()
    assert await model.complete(config(fake), HELLO, [], deltas) == Reply(
        "Plain answer.", [], "stop", usage=Usage(prompt_tokens=10, completion_tokens=5)
    )
    assert deltas.got == ["Plain answer."]
    reply = await model.complete(config(fake), HELLO, TOOLS)
    assert reply.content == "" and reply.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [
        ("read_file", '{"path": "a"}'),
        ("read_file", "{not json"),  # passed on as it is: the caller checks it
    ]


async def test_429_honours_retry_after(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(Error(429, "Rate limit reached", retry_after="1"))
    fake.reply_text("after the wait")
    started = trio.current_time()
    reply = await model.complete(config(fake), HELLO, [])
    assert reply.content == "after the wait"
    assert len(fake.requests) == 2
    assert trio.current_time() - started >= 0.9


async def test_500_then_200(fake: FakeLLM, model: ChatModel) -> None:
    fake.fail(500, "oops")
    fake.fail(502)
    fake.reply_text("fine now")
    assert (await model.complete(config(fake), HELLO, [])).content == "fine now"
    assert len(fake.requests) == 3


async def test_500_always_is_unavailable_naming_the_server_not_the_key(
    fake: FakeLLM, model: ChatModel, captured_logs: list[dict[str, Any]]
) -> None:
    for _ in range(3):
        fake.fail(503, f"overloaded; your key {KEY} is fine")
    with pytest.raises(errors.Unavailable) as info:
        await model.complete(config(fake, max_retries=2), HELLO, [])
    message = info.value.message
    assert fake.base_url in message and "503" in message and "overloaded" in message and "3 attempts" in message
    assert KEY not in message
    assert len(fake.requests) == 3
    [line] = [e for e in captured_logs if e["event"] == "model call"]
    assert line["outcome"] == "failed" and line["attempts"] == 3 and line["model"] == "fake-model"
    assert line["error"] == message
    assert KEY not in repr(captured_logs)


async def test_401_is_a_failed_precondition_with_the_servers_message(fake: FakeLLM, model: ChatModel) -> None:
    fake.fail(401, f"Incorrect API key provided: {KEY}.")
    with pytest.raises(errors.FailedPrecondition) as info:
        await model.complete(config(fake), HELLO, [])
    message = info.value.message
    assert "401" in message and "Incorrect API key provided" in message and fake.base_url in message
    assert KEY not in message
    assert len(fake.requests) == 1  # not retried


async def test_unknown_model_404_with_a_plain_error_string(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(Error(404, body={"error": "model 'nope' not found"}))
    with pytest.raises(errors.FailedPrecondition, match="model 'nope' not found"):
        await model.complete(config(fake), HELLO, [])


async def test_nothing_listening_is_unavailable(model: ChatModel) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=KEY, max_retries=1)
    with pytest.raises(errors.Unavailable) as info:
        await model.complete(cfg, HELLO, [])
    assert info.value.message.startswith(f"cannot connect to the model server at http://127.0.0.1:{port}/v1")
    assert "(gave up after 2 attempts)" in info.value.message
    assert KEY not in info.value.message


async def test_credentials_in_the_url_are_not_shown(model: ChatModel) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = LLMConfig(base_url=f"http://user:hunter2@127.0.0.1:{port}/v1?key=hunter2", model="m", max_retries=0)
    with pytest.raises(errors.Unavailable) as info:
        await model.complete(cfg, HELLO, [])
    assert "hunter2" not in info.value.message and f"127.0.0.1:{port}/v1" in info.value.message


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/v1", "not a url"])
async def test_a_bad_url_is_a_failed_precondition(model: ChatModel, url: str) -> None:
    with pytest.raises(errors.FailedPrecondition, match="is not a valid http:// or https:// URL"):
        await model.complete(LLMConfig(base_url=url, model="m"), HELLO, [])


async def test_slow_server_times_out(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(text_stream("late", delay=3))  # no headers for 3 s
    fake.push(text_stream("late again", pieces=2, interval=3))  # headers, then silence
    started = trio.current_time()
    with pytest.raises(errors.Unavailable, match=r"timed out after 0\.3 s waiting for the model server"):
        await model.complete(config(fake, timeout=0.3, max_retries=0), HELLO, [])
    with pytest.raises(errors.Unavailable, match=r"timed out: the model server at .* sent nothing for 0\.3 s"):
        await model.complete(config(fake, timeout=0.3, max_retries=0), HELLO, [])
    assert trio.current_time() - started < 2


async def test_malformed_chunk_is_unavailable(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(Stream([chunk({"content": "Hi"}), "{not json", chunk({}, "stop")]))
    with pytest.raises(errors.Unavailable, match="malformed reply: a chunk is not valid JSON"):
        await model.complete(config(fake), HELLO, [])
    assert len(fake.requests) == 1


async def test_error_reported_inside_the_stream(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(Stream([{"error": {"message": "context length exceeded", "type": "server_error"}}]))
    with pytest.raises(errors.Unavailable, match="reported an error: context length exceeded"):
        await model.complete(config(fake), HELLO, [])


async def test_connection_lost_before_any_text_is_retried(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(text_stream("", drop_after=1))  # the role chunk only, then the connection closes
    fake.reply_text("second try")
    deltas = Deltas()
    assert (await model.complete(config(fake), HELLO, [], deltas)).content == "second try"
    assert "".join(deltas.got) == "second try"
    assert len(fake.requests) == 2


async def test_connection_lost_mid_reply_is_not_replayed(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(text_stream("one two three", pieces=3, drop_after=2))
    fake.reply_text("must not be used")
    deltas = Deltas()
    with pytest.raises(errors.Unavailable, match="closed the connection mid-reply"):
        await model.complete(config(fake), HELLO, [], deltas)
    assert deltas.got == ["one t"]
    assert len(fake.requests) == 1 and fake.pending == 1


async def test_stream_ending_early_without_done_or_finish_reason(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(Stream([chunk({"content": "cut"})], done=False))
    with pytest.raises(errors.Unavailable, match="ended the stream before the reply was complete"):
        await model.complete(config(fake, max_retries=0), HELLO, [], Deltas())


async def test_cancelled_mid_stream_closes_the_request(fake: FakeLLM, model: ChatModel) -> None:
    fake.push(text_stream("a b c d e f", pieces=6, interval=0.2))
    with trio.CancelScope() as scope:

        async def on_text(text: str, reasoning: bool) -> None:
            scope.cancel()

        await model.complete(config(fake), HELLO, [], on_text)
    assert scope.cancelled_caught
    await _disconnected(fake)
    fake.push(Stream([chunk({"content": "x"})], delay=5))  # cancelled while waiting for the headers
    with trio.move_on_after(0.2):
        await model.complete(config(fake), HELLO, [])
    await _disconnected(fake)


async def _disconnected(fake: FakeLLM) -> None:
    request = fake.requests[-1]
    with trio.fail_after(1):
        while not request.disconnected.is_set():
            await trio.sleep(0.01)


async def test_reply_too_large(fake: FakeLLM, model: ChatModel) -> None:
    fake.reply_text("x" * (1024 * 1024 + 1), pieces=4)
    with pytest.raises(errors.Unavailable, match="too large"):
        await model.complete(config(fake), HELLO, [])


async def test_sse_framing_comments_fields_crlf_and_split_lines(fake: FakeLLM, model: ChatModel) -> None:
    first = json.dumps(chunk({"content": "Hi"}))
    last = json.dumps(chunk({"content": " there"}, "stop"))
    cut = last.index(", ") + 1  # between two members: the LF that joins the lines is whitespace
    fake.push(
        Stream(
            [
                b": keep-alive\r\n\r\n",  # a comment: no event
                b"event: message\r\nid: 7\r\nretry: 100\r\n",  # fields we ignore
                b"data: " + first[:10].encode(),  # a line split across chunks
                first[10:].encode() + b"\r\n\r\n",
                ("data: " + last[:cut] + "\ndata:" + last[cut:] + "\n\n").encode(),  # data lines join with LF
            ]
        )
    )
    deltas = Deltas()
    assert await model.complete(config(fake), HELLO, [], deltas) == Reply("Hi there", [], "stop")
    assert "".join(deltas.got) == "Hi there"  # (in one piece when the two events come in one read)


@pytest.mark.parametrize("shape", ["one line", "one event"])
async def test_an_sse_line_or_event_over_the_bound_is_refused(fake: FakeLLM, model: ChatModel, shape: str) -> None:
    mib = 1 << 20
    if shape == "one line":  # no end of line: refused before it ends
        events: list[dict[str, Any] | str | bytes] = [b"data: " + b"x" * mib] * 9
    else:  # short lines, but no blank line to end the event
        events = [b"data: " + b"x" * (mib - 1) + b"\n"] * 9
    fake.push(Stream(events))
    with pytest.raises(errors.Unavailable, match="too large"):
        await model.complete(config(fake), HELLO, [])
    assert len(fake.requests) == 1  # not retried


async def test_one_log_line_with_usage(fake: FakeLLM, model: ChatModel, captured_logs: list[dict[str, Any]]) -> None:
    fake.reply_text("hi", usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15})
    await model.complete(config(fake, system_prompt="secret instructions"), HELLO, [])
    [line] = [e for e in captured_logs if e["event"] == "model call"]
    assert line["outcome"] == "ok" and line["finish_reason"] == "stop" and line["attempts"] == 1
    assert (line["prompt_tokens"], line["completion_tokens"]) == (12, 3)
    assert line["base_url"] == fake.base_url and line["model"] == "fake-model"
    assert KEY not in repr(captured_logs) and "secret instructions" not in repr(captured_logs)
    assert KEY not in repr(config(fake))


# -- resolve_config ----------------------------------------------------------------------------------------------

ENV = {"ARIA_LLM_BASE_URL": "http://ollama:11434/v1", "ARIA_LLM_MODEL": "llama3.1", "ARIA_LLM_API_KEY": "aria-key"}
OPENAI = {"OPENAI_BASE_URL": "https://proxy.example/v1", "OPENAI_API_KEY": "sk-openai"}


def test_resolve_nothing_configured() -> None:
    assert resolve_config({}, {}) is None
    assert resolve_config({"llm.model": "m"}, {}) is None  # no base URL
    assert resolve_config({}, {"ARIA_LLM_BASE_URL": "http://x/v1", "ARIA_LLM_API_KEY": "k"}) is None  # no model
    assert resolve_config({"llm.model": "m"}, {"ARIA_LLM_API_KEY": "k"}) is None  # not an OpenAI key: no default URL
    assert resolve_config({"llm.model": " ", "llm.base_url": "http://x/v1"}, {}) is None


def test_resolve_preferences_win() -> None:
    prefs = {
        "llm.base_url": "http://mine:8000/v1",
        "llm.model": "qwen",
        "llm.api_key": "my-key",
        "llm.temperature": 1,
        "llm.system_prompt": "Be kind.",
    }
    assert resolve_config(prefs, {**ENV, **OPENAI}) == LLMConfig(
        base_url="http://mine:8000/v1", model="qwen", api_key="my-key", temperature=1.0, system_prompt="Be kind."
    )


def test_resolve_environment_aria_over_openai() -> None:
    assert resolve_config({}, {**ENV, **OPENAI}) == LLMConfig("http://ollama:11434/v1", "llama3.1", "aria-key")
    assert resolve_config({"llm.model": "phi"}, {**ENV, **OPENAI}) == LLMConfig(
        "http://ollama:11434/v1", "phi", "aria-key"
    )
    assert resolve_config({}, {"ARIA_LLM_MODEL": "gpt-x", **OPENAI}) == LLMConfig(
        "https://proxy.example/v1", "gpt-x", "sk-openai"
    )
    assert resolve_config({}, {"ARIA_LLM_MODEL": "gpt-x", "OPENAI_API_KEY": "sk-openai"}) == LLMConfig(
        OPENAI_BASE_URL, "gpt-x", "sk-openai"
    )


def test_resolve_the_operators_key_stays_with_the_operators_url() -> None:
    mine = resolve_config({"llm.base_url": "http://attacker.example/v1"}, ENV)
    assert mine is not None and mine.base_url == "http://attacker.example/v1" and mine.api_key is None
    same = resolve_config({"llm.base_url": "http://ollama:11434/v1/"}, ENV)
    assert same is not None and same.api_key == "aria-key"
    own = resolve_config({"llm.api_key": "mine"}, ENV)
    assert own is not None and own.base_url == ENV["ARIA_LLM_BASE_URL"] and own.api_key == "mine"


def test_resolve_ignores_bad_values() -> None:
    cfg = resolve_config({"llm.temperature": True, "llm.system_prompt": "  ", "llm.api_key": 3}, ENV)
    assert cfg == LLMConfig("http://ollama:11434/v1", "llama3.1", "aria-key")
