"""Turns that stream as they happen (CONTRACT.md, second round): deltas as the model writes them,
tool output while tools run, usage, cancellation mid-stream, and the bad inputs of each.

One runtime per module (each test has its own session and its own scripted model server, set as
the user's model at the test's start); a grpcio client reads the stream and notes when each event
arrived."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from test_fuzz import rss
from test_turns_direct import messages, turn
from test_turns_model import use_model
from turn_events import contract_problems, kinds

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import session_pb2 as pb
from aria_trio.proto.aria.v1 import user_preference_pb2 as prefs_pb

import bundles
from aria_client import SESSIONS, AriaClient
from fake_llm import Error, FakeLLM, Stream, chunk
from quilt_client import descendants_running

TICKER = (
    "import sys, time\n"
    "def ticker():\n"
    "    print('one')\n"  # (the runner's stdout is its stderr: the tool's log, line-buffered)
    "    time.sleep(1)\n"
    "    print('two')\n"
    "    return 2\n"
)
STREAMING = bundles.manifest(
    name="streaming",
    tools=[{"name": "ticker", "description": "Prints, sleeps, prints", "inputs": {}}],
    agents=[{"name": "Ticker", "description": "Ticks", "tools": ["ticker"]}],
)


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


@pytest.fixture
def c(module_daemon: Any, llm: FakeLLM) -> AriaClient:
    """A client whose user's model is this test's scripted server."""
    client = AriaClient(module_daemon.channel())
    use_model(client, llm.base_url)
    return client


@pytest.fixture
def d(module_daemon: Any) -> AriaClient:
    """A client whose user has no model: `/<tool> {...}` runs a tool directly."""
    client = AriaClient(module_daemon.channel())
    s = struct_pb2.Struct()
    s.update({"llm.base_url": None, "llm.model": None, "llm.api_key": None})
    request = prefs_pb.UpdateUserPreferencesRequest(updates=s)
    client.call("/aria.v1.UserPreferenceService/UpdateUserPreferences", request, prefs_pb.UserPreferences)
    return client


def timed(c: AriaClient, session_id: str, text: str, timeout: float = 60) -> list[tuple[float, pb.TurnOutput]]:
    """The turn's events, each with the time.monotonic() it arrived at."""
    request = pb.ExecuteTurnRequest(session_id=session_id, input=text)
    return [(time.monotonic(), o) for o in c.stream(SESSIONS + "ExecuteTurn", request, pb.TurnOutput, timeout)]


def written_content(llm: FakeLLM) -> dict[str, float]:
    """The time each content piece was written by the scripted server."""
    found = {}
    for at, data in llm.written:
        if data.startswith(b"data: {"):
            choices = json.loads(data[len(b"data: ") :]).get("choices") or [{}]
            content = choices[0].get("delta", {}).get("content")
            if content:
                found[content] = at
    return found


def deltas(out: list[pb.TurnOutput], reasoning: bool = False) -> str:
    return "".join(
        o.text_delta.text for o in out if o.WhichOneof("event") == "text_delta" and o.text_delta.reasoning == reasoning
    )


def lines(out: list[pb.TurnOutput]) -> list[str]:
    return [
        o.tool_output.stdout_line or o.tool_output.stderr_line for o in out if o.WhichOneof("event") == "tool_output"
    ]


def only(out: list[pb.TurnOutput], kind: str) -> Any:
    [found] = [getattr(o, kind) for o in out if o.WhichOneof("event") == kind]
    return found


def run_command(argv: list[str]) -> str:
    return "/run_command " + json.dumps({"command": argv})


# -- text as the model writes it --------------------------------------------------------------------


@pytest.mark.serial  # timed: each delta within 50 ms of its chunk
def test_each_delta_reaches_the_client_within_50_ms_of_its_chunk(c: AriaClient, llm: FakeLLM) -> None:
    words = [f"word{i} " for i in range(10)]
    events = [chunk({"role": "assistant", "content": ""}), *[chunk({"content": w}) for w in words], chunk({}, "stop")]
    llm.push(Stream(events, interval=0.2))
    session = c.session()
    got = timed(c, session.id, "talk slowly")
    out = [o for _, o in got]
    assert contract_problems(out) == []
    arrived = [(at, o.text_delta.text) for at, o in got if o.WhichOneof("event") == "text_delta"]
    assert [text for _, text in arrived] == words
    written = written_content(llm)
    lags = [at - written[text] for at, text in arrived]
    assert max(lags) < 0.05, [round(lag * 1000, 1) for lag in lags]
    assert arrived[0][0] < written[words[-1]] - 1.5  # the first word long before the reply ends
    stored = messages(c, session.id).messages[-1]
    assert stored.content == "".join(words)
    assert stored.id == got[-3][1].message.id and not stored.truncated


def test_reasoning_streams_apart_and_is_kept_with_its_message_not_sent_back(c: AriaClient, llm: FakeLLM) -> None:
    events = [
        chunk({"role": "assistant", "reasoning_content": "The user greets. "}),
        chunk({"reasoning_content": "I greet back."}),
        chunk({"reasoning": None, "content": "Hello"}),
        chunk({"content": " to you."}, "stop"),
    ]
    llm.push(Stream(events, interval=0.05))
    llm.reply_text("Again.")
    session = c.session()
    out = turn(c, session.id, "hi")
    assert contract_problems(out) == []
    assert deltas(out, reasoning=True) == "The user greets. I greet back."
    assert deltas(out) == "Hello to you."
    [assistant] = [
        o.message for o in out if o.WhichOneof("event") == "message" and o.message.role == aria_pb2.ASSISTANT
    ]
    assert (assistant.content, assistant.reasoning) == ("Hello to you.", "The user greets. I greet back.")
    turn(c, session.id, "and again")
    sent = llm.requests[1].body["messages"]
    assert sent[1] == {"role": "assistant", "content": "Hello to you."}  # its reasoning stays here
    assert "greets" not in json.dumps(sent)
    # Ollama's name for it
    llm.push(Stream([chunk({"reasoning": "hmm"}), chunk({"content": "ok"}, "stop")]))
    assert deltas(turn(c, session.id, "more"), reasoning=True) == "hmm"


def test_a_chunk_with_both_text_and_a_tool_call(c: AriaClient, llm: FakeLLM) -> None:
    call = {"index": 0, "id": "call_both", "type": "function", "function": {"name": "run_command", "arguments": ""}}
    arguments = json.dumps({"command": ["echo", "both"]})
    events = [
        chunk({"role": "assistant", "content": "Let me check. ", "tool_calls": [call]}),
        chunk({"content": "Running it.", "tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
        chunk({}, "tool_calls"),
    ]
    llm.push(Stream(events))
    llm.reply_text("It said both.")
    out = turn(c, c.session().id, "check")
    assert contract_problems(out) == []
    first = next(o.message for o in out if o.WhichOneof("event") == "message" and o.message.role == aria_pb2.ASSISTANT)
    assert (first.role, first.content, [t.call_id for t in first.tool_calls]) == (
        aria_pb2.ASSISTANT,
        "Let me check. Running it.",
        ["call_both"],
    )
    assert deltas(out).startswith("Let me check. Running it.") and lines(out) == ["both"]
    assert out[-1].final_response == "It said both."


def test_usage_is_asked_for_summed_and_kept(c: AriaClient, llm: FakeLLM) -> None:
    llm.call_tool("run_command", {"command": ["true"]}, usage={"prompt_tokens": 11, "completion_tokens": 3})
    llm.reply_text("Done.", usage={"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22})
    session = c.session()
    out = turn(c, session.id, "go")
    assert contract_problems(out) == []
    usage = only(out, "usage")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.model_calls, usage.tool_calls) == (31, 5, 2, 1)
    assert usage.duration_seconds > 0
    assert all(r.body["stream_options"] == {"include_usage": True} for r in llm.requests)
    result = only(out, "tool_result")
    assert 0 < result.duration_seconds < usage.duration_seconds
    kept = [m for m in messages(c, session.id).messages if m.role == aria_pb2.ASSISTANT]
    assert [(m.usage.prompt_tokens, m.usage.completion_tokens, m.usage.tool_calls) for m in kept] == [
        (11, 3, 1),
        (20, 2, 0),
    ]
    assert all(m.usage.model_calls == 1 and m.usage.duration_seconds > 0 for m in kept)


def test_a_server_that_refuses_stream_options_is_asked_again_without_and_remembered(
    c: AriaClient, llm: FakeLLM
) -> None:
    llm.push(Error(400, "Unrecognized request argument supplied: stream_options"))
    llm.reply_text("Fine.")
    llm.reply_text("Still fine.")
    session = c.session()
    assert turn(c, session.id, "one")[-1].final_response == "Fine."
    assert turn(c, session.id, "two")[-1].final_response == "Still fine."
    asked = ["stream_options" in r.body for r in llm.requests]
    assert asked == [True, False, False]  # asked once, then never again for this server


# -- tools that speak while they run ------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["run_command", "bundle"])
def test_a_tool_s_first_line_reaches_the_client_before_it_ends(d: AriaClient, tool: str) -> None:
    if tool == "bundle":
        d.upload_bytes(bundles.flat(STREAMING, files={"implementations/tools/ticker.py": TICKER}), name="t.aria")
        session, text = d.session(agent_id="Ticker"), "/ticker {}"
    else:
        session, text = d.session(), run_command(["sh", "-c", "echo one; sleep 1; echo two"])
    got = timed(d, session.id, text)
    out = [o for _, o in got]
    assert contract_problems(out, model=False) == []
    assert lines(out) == ["one", "two"]
    one = next(at for at, o in got if o.WhichOneof("event") == "tool_output")
    ended = next(at for at, o in got if o.WhichOneof("event") == "tool_result")
    assert ended - one > 0.7, "the first line came only when the tool ended"


def test_calls_of_one_reply_interleave_their_lines_each_with_its_call_id(c: AriaClient, llm: FakeLLM) -> None:
    script = "for i in 1 2 3; do echo {0}$i; sleep 0.3; done"
    llm.call_tools([("run_command", {"command": ["sh", "-c", script.format(x)]}) for x in "ab"])
    llm.reply_text("Both ran.")
    out = turn(c, c.session().id, "two at once")
    assert contract_problems(out) == []
    calls = [o.tool_call.call_id for o in out if o.WhichOneof("event") == "tool_call"]
    by_call = {
        call: [
            o.tool_output.stdout_line
            for o in out
            if o.WhichOneof("event") == "tool_output" and o.tool_output.call_id == call
        ]
        for call in calls
    }
    assert list(by_call.values()) == [["a1", "a2", "a3"], ["b1", "b2", "b3"]]
    order = [o.tool_output.stdout_line[0] for o in out if o.WhichOneof("event") == "tool_output"]
    assert order != sorted(order), "the two calls' lines did not interleave: they ran one after the other"


def test_a_huge_line_and_very_many_lines_are_bounded(d: AriaClient) -> None:
    session = d.session()
    out = turn(d, session.id, run_command(["python3", "-c", "print('x' * (10 * 1024 * 1024))"]))
    shown = lines(out)
    assert all(len(line) <= 64 * 1024 for line in shown)
    assert sum(map(len, shown)) <= 1024 * 1024 + 200 and "not shown live" in shown[-1]
    result = json.loads(only(out, "tool_result").result_json)
    assert result["exit_code"] == 0 and result["stdout"].endswith("[... output truncated]")
    assert len(result["stdout"]) < 70 * 1024  # the stored result keeps its cap

    out = turn(d, session.id, run_command(["seq", "100000"]))
    shown = lines(out)
    assert shown[:3] == ["1", "2", "3"] and len(shown) == 10_001 and "not shown live" in shown[-1]
    assert shown[9_999] == "10000"
    assert json.loads(only(out, "tool_result").result_json)["exit_code"] == 0


def test_invalid_utf8_is_replaced_not_a_broken_stream(d: AriaClient) -> None:
    out = turn(d, d.session().id, run_command(["printf", "\\377\\376ok\\n"]))
    assert contract_problems(out, model=False) == []
    assert lines(out) == ["\ufffd\ufffdok"]


@pytest.mark.serial  # timed: the tool is not slowed by a client that does not read
def test_a_client_that_reads_slowly_slows_no_tool_and_loses_nothing(module_daemon: Any, d: AriaClient) -> None:
    """The client reads nothing for 8 s: the command still ends at its own pace (it says when, on
    stderr), every line up to the live bound still reaches the client, the result is whole."""
    session = d.session()
    text = run_command(["sh", "-c", "seq 200000; date +%s.%N >&2"])
    request = pb.ExecuteTurnRequest(session_id=session.id, input=text)
    began = time.time()
    stream = d.stream(SESSIONS + "ExecuteTurn", request, pb.TurnOutput, 120)
    first = next(stream)
    assert first.message.role == aria_pb2.USER
    time.sleep(8)  # not reading: the HTTP/2 window and the turn's buffer fill up
    out = [first, *stream]
    assert contract_problems(out, model=False) == []
    result = only(out, "tool_result")
    stored = json.loads(messages(d, session.id).messages[-1].content)
    assert result.success and stored == json.loads(result.result_json)
    ended = float(stored["stderr"])
    assert ended - began < 6, f"the command ended {ended - began:.1f} s after the turn began: slowed by its reader"
    shown = lines(out)
    assert len(shown) == 10_001 and shown[:2] == ["1", "2"] and shown[9_999] == "10000" and "not shown" in shown[-1]
    assert stored["exit_code"] == 0 and stored["stdout"].startswith("1\n2\n3\n")


def test_a_slow_reader_of_deltas_gets_them_all(c: AriaClient, llm: FakeLLM) -> None:
    text = "".join(f"w{i} " for i in range(3000))
    llm.reply_text(text, pieces=3000)
    session = c.session()
    request = pb.ExecuteTurnRequest(session_id=session.id, input="a long one")
    stream = c.stream(SESSIONS + "ExecuteTurn", request, pb.TurnOutput, 120)
    first = next(stream)
    time.sleep(2)
    out = [first, *stream]
    assert contract_problems(out) == []
    assert deltas(out) == text == messages(c, session.id).messages[-1].content


def test_a_reply_of_100000_tiny_deltas(module_daemon: Any, c: AriaClient, llm: FakeLLM) -> None:
    text = "ab" * 50_000
    llm.reply_text(text, pieces=100_000, batch=500)  # (500 events a write, as a fast server's would arrive)
    session = c.session()
    before = rss(module_daemon.proc.pid)
    out = turn(c, session.id, "many tiny pieces", timeout=120)
    assert contract_problems(out) == []
    assert deltas(out) == text == messages(c, session.id).messages[-1].content
    sent = kinds(out).count("text_delta")
    assert sent <= 100_000
    print(
        f"100,000 pieces came as {sent} deltas; runtime RSS {before >> 20} -> {rss(module_daemon.proc.pid) >> 20} MiB"
    )
    assert rss(module_daemon.proc.pid) - before < 64 << 20


# -- cut short ---------------------------------------------------------------------------------------


def test_a_stream_that_stops_mid_json_keeps_what_came_and_the_session_goes_on(c: AriaClient, llm: FakeLLM) -> None:
    events = [
        chunk({"role": "assistant", "content": "Half of "}),
        chunk({"content": "an answer"}),
        b'data: {"choices": [{"index": 0, "delta": {"content": "and th',  # then the connection ends
    ]
    llm.push(Stream(events, interval=0.05, done=False, drop_after=3))
    session = c.session()
    request = pb.ExecuteTurnRequest(session_id=session.id, input="go")
    seen: list[pb.TurnOutput] = []
    with pytest.raises(grpc.RpcError) as failed:
        for o in c.stream(SESSIONS + "ExecuteTurn", request, pb.TurnOutput, 60):
            seen.append(o)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert deltas(seen) == "Half of an answer"  # every delta sent before the failure arrived
    cut = messages(c, session.id).messages[-1]
    assert (cut.role, cut.content, cut.truncated) == (aria_pb2.ASSISTANT, "Half of an answer", True)
    assert cut.id == seen[-1].text_delta.message_id
    llm.reply_text("Whole now.")
    assert turn(c, session.id, "again")[-1].final_response == "Whole now."
    assert llm.requests[-1].body["messages"][-2] == {"role": "assistant", "content": "Half of an answer"}


def test_cancel_mid_delta_stops_the_model_call_and_keeps_the_text_truncated(c: AriaClient, llm: FakeLLM) -> None:
    llm.reply_text("one two three four five six seven eight nine ten", pieces=10, interval=0.3)
    session = c.session()
    request = pb.ExecuteTurnRequest(session_id=session.id, input="count slowly")
    stream = c.stream(SESSIONS + "ExecuteTurn", request, pb.TurnOutput, 60)
    seen = ""
    for o in stream:
        if o.WhichOneof("event") == "text_delta":
            seen += o.text_delta.text
            if len(seen) > 5:
                break
    stream.cancel()
    began = time.monotonic()
    assert llm.requests[0].disconnected.wait(5), "the model request was not cancelled"
    assert time.monotonic() - began < 1.5
    deadline = time.monotonic() + 10
    while not (kept := [m for m in messages(c, session.id).messages if m.role == aria_pb2.ASSISTANT]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (
        kept[0].truncated
        and kept[0].content.startswith(seen)
        and kept[0].content != "one two three four five six seven eight nine ten"
    )
    llm.reply_text("Usable.")
    deadline = time.monotonic() + 10
    while True:
        try:
            assert turn(c, session.id, "still there?")[-1].final_response == "Usable."
            break
        except grpc.RpcError as e:  # the cancelled turn may still be ending
            assert "already running" in e.details() and time.monotonic() < deadline
            time.sleep(0.05)


def test_cancel_mid_tool_output_kills_the_sandbox_within_a_second(module_daemon: Any, d: AriaClient) -> None:
    session = d.session()
    text = run_command(["sh", "-c", "while :; do echo tick-tock; sleep 0.1; done"])
    stream = d.stream(
        SESSIONS + "ExecuteTurn", pb.ExecuteTurnRequest(session_id=session.id, input=text), pb.TurnOutput, 60
    )
    for o in stream:
        if o.WhichOneof("event") == "tool_output":
            break
    assert descendants_running(module_daemon.proc.pid, b"tick-tock")
    stream.cancel()
    began = time.monotonic()
    while descendants_running(module_daemon.proc.pid, b"tick-tock"):
        assert time.monotonic() - began < 1.0, "the tool's sandbox outlived the cancel by a second"
        time.sleep(0.02)


def test_deltas_and_output_are_a_client_s_own(module_daemon: Any, d: AriaClient) -> None:
    """Two turns at once in two sessions: each stream carries its own turn's events only."""
    results: dict[str, list[pb.TurnOutput]] = {}

    failures: list[BaseException] = []

    def one(word: str) -> None:
        try:
            session = d.session()
            script = f"for i in 1 2 3; do echo {word}; sleep 0.1; done"
            results[word] = turn(d, session.id, run_command(["sh", "-c", script]))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(w,)) for w in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert lines(results["left"]) == ["left"] * 3 and lines(results["right"]) == ["right"] * 3


def test_the_tool_execution_log_has_each_streamed_call(module_daemon: Any, d: AriaClient) -> None:
    session = d.session()
    turn(d, session.id, run_command(["sh", "-c", "echo logged"]))
    with sqlite3.connect(f"file:{module_daemon.data_dir / 'runtime.db'}?mode=ro", uri=True) as db:
        [(result_json, duration_ms)] = db.execute(
            "SELECT result_json, duration_ms FROM tool_executions WHERE session_id = ?", [session.id]
        ).fetchall()
    assert json.loads(result_json)["stdout"] == "logged\n" and duration_ms > 0


QUIET = "import time\ndef quiet():\n    print('before')\n    time.sleep(12)\n    print('after')\n    return 'done'\n"


@pytest.mark.parametrize("tool", ["run_command", "bundle"])
def test_a_tool_silent_past_every_idle_timeout_still_streams_to_its_end(d: AriaClient, tool: str) -> None:
    """12 s without a line (trio retires idle worker threads after 10 s; the streams between the
    client, the runtime and Quilt sit idle meanwhile): the next line and the result still come."""
    if tool == "bundle":
        quiet = bundles.manifest(
            name="quiet",
            tools=[{"name": "quiet", "description": "Sleeps between two lines", "inputs": {}}],
            agents=[{"name": "Quiet", "description": "Waits", "tools": ["quiet"]}],
        )
        d.upload_bytes(bundles.flat(quiet, files={"implementations/tools/quiet.py": QUIET}), name="quiet.aria")
        session, text = d.session(agent_id="Quiet"), "/quiet {}"
    else:
        session, text = d.session(), run_command(["sh", "-c", "echo before; sleep 12; echo after"])
    out = turn(d, session.id, text, timeout=120)
    assert contract_problems(out, model=False) == []
    assert lines(out) == ["before", "after"]
    assert only(out, "tool_result").success
