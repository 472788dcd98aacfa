"""The turn loop with a model: the real provider code against a scripted OpenAI-compatible server,
the real daemon on its socket, tools in real sandboxes."""

from __future__ import annotations

import json
import socket
import time

import grpc
import pytest
from google.protobuf import struct_pb2
from test_runtime_bundles import TWO_TOOLS
from test_turns_direct import failing, messages, turn
from turn_events import contract_problems, kinds

from aria_trio.proto.aria.v1 import aria_pb2, session_pb2
from aria_trio.proto.aria.v1 import user_preference_pb2 as prefs_pb

import bundles
from aria_client import AriaClient
from fake_llm import FakeLLM, text_stream

LOOPY = dict(
    TWO_TOOLS,
    name="loopy",
    agents=[{"name": "Looper", "description": "Never done", "tools": ["add"], "max_iterations": 2}],
)


def use_model(c: AriaClient, base_url: str) -> None:
    s = struct_pb2.Struct()
    s.update({"llm.base_url": base_url, "llm.model": "fake-model", "llm.api_key": "sk-test-0123456789"})
    request = prefs_pb.UpdateUserPreferencesRequest(updates=s)
    c.call("/aria.v1.UserPreferenceService/UpdateUserPreferences", request, prefs_pb.UserPreferences)


@pytest.fixture
def llm():
    with FakeLLM() as fake:
        yield fake


@pytest.fixture
def helper(daemon, llm):
    c = AriaClient(daemon.channel())
    c.upload_bytes(bundles.flat(TWO_TOOLS))
    use_model(c, llm.base_url)
    return c, c.session(agent_id="Helper")


def test_a_turn_with_a_tool_call_then_a_final_answer(helper, llm):
    c, session = helper
    llm.call_tool("add", {"a": 2, "b": 3})
    llm.reply_text("The sum is 5.")
    out = turn(c, session.id, "What is 2 + 3?")
    assert contract_problems(out) == []
    assert kinds(out) == [
        *["message", "model_call", "message", "tool_call", "tool_output", "tool_result", "message"],
        *["model_call", "text_delta", "text_delta", "text_delta", "message", "usage", "final_response"],
    ]
    assert out[0].message.role == aria_pb2.USER
    assert [out[1].model_call.iteration, out[7].model_call.iteration] == [1, 2]
    assert (out[2].message.role, out[2].message.content, len(out[2].message.tool_calls)) == (aria_pb2.ASSISTANT, "", 1)
    assert json.loads(out[3].tool_call.parameters_json) == {"a": 2, "b": 3}
    assert out[4].tool_output.stderr_line == "adding 2 3"
    assert out[5].tool_result.success and json.loads(out[5].tool_result.result_json) == 5
    assert (out[6].message.role, out[6].message.content) == (aria_pb2.TOOL, "5")
    assert "".join(o.text_delta.text for o in out[8:11]) == "The sum is 5."
    assert (out[11].message.role, out[11].message.content) == (aria_pb2.ASSISTANT, "The sum is 5.")
    assert out[11].message.id == out[8].text_delta.message_id
    assert (out[12].usage.model_calls, out[12].usage.tool_calls) == (2, 1)
    assert out[13].final_response == "The sum is 5."

    first, second = llm.requests
    assert first.headers["authorization"] == "Bearer sk-test-0123456789"
    assert first.body["model"] == "fake-model" and first.body["stream"] is True
    assert sorted(t["function"]["name"] for t in first.body["tools"]) == ["add", "shout"]  # the agent's own
    assert first.body["tools"][0]["function"]["parameters"]["type"] == "object"
    assert [m["role"] for m in second.body["messages"]] == ["user", "assistant", "tool"]
    assert second.body["messages"][2] == {
        "role": "tool",
        "tool_call_id": out[3].tool_call.call_id,
        "content": "5",
    }
    # the whole conversation is kept, in order, with the calls
    history = messages(c, session.id).messages
    assert [m.role for m in history] == [aria_pb2.USER, aria_pb2.ASSISTANT, aria_pb2.TOOL, aria_pb2.ASSISTANT]
    assert history[1].tool_calls[0].tool_name == "add"
    # the next turn carries the history
    llm.reply_text("Still 5.")
    turn(c, session.id, "And again?")
    assert len(llm.requests[-1].body["messages"]) == 5


@pytest.mark.serial  # timed: two 1.5 s calls in under 2.9 s
def test_calls_of_one_reply_run_concurrently(daemon, llm):
    c = AriaClient(daemon.channel())
    use_model(c, llm.base_url)
    session = c.session()
    sleep = {"command": ["sleep", "1.5"]}
    llm.call_tools([("run_command", sleep), ("run_command", sleep)])
    llm.reply_text("Both slept.")
    started = time.monotonic()
    out = turn(c, session.id, "sleep twice")
    took = time.monotonic() - started
    assert contract_problems(out) == []
    assert kinds(out)[:7] == ["message", "model_call", "message", "tool_call", "tool_call", "tool_result", "message"]
    assert all(o.tool_result.success for o in out if o.WhichOneof("event") == "tool_result")
    assert took < 2.9, f"two 1.5 s calls took {took:.1f} s: not concurrent"


def test_bad_tool_calls_are_fed_back_to_the_model(helper, llm):
    c, session = helper
    llm.call_tool("add", '{"a": 2, "b": ')  # malformed JSON
    llm.call_tool("rm_rf", {"path": "/"})  # not one of the agent's tools
    llm.call_tool("add", {"a": "x", "b": 1})  # fails the schema
    llm.reply_text("I give up.")
    out = turn(c, session.id, "try things")
    results = [o.tool_result for o in out if o.WhichOneof("event") == "tool_result"]
    assert [r.success for r in results] == [False, False, False]
    assert "not valid JSON" in results[0].error_message
    assert "not permitted" in results[1].error_message
    assert "invalid arguments" in results[2].error_message
    assert out[-1].final_response == "I give up."
    fed_back = [m for m in llm.requests[1].body["messages"] if m["role"] == "tool"]
    assert "not valid JSON" in json.loads(fed_back[0]["content"])["error"]


def test_max_iterations_ends_the_turn_and_says_so(daemon, llm):
    c = AriaClient(daemon.channel())
    c.upload_bytes(bundles.flat(LOOPY), name="loopy.aria")
    use_model(c, llm.base_url)
    session = c.session(agent_id="Looper")
    llm.call_tool("add", {"a": 1, "b": 1})
    llm.call_tool("add", {"a": 2, "b": 2})
    out = turn(c, session.id, "loop")
    assert "max_iterations" in out[-1].final_response
    assert len(llm.requests) == 2


def test_a_model_server_that_fails_then_recovers(helper, llm):
    c, session = helper
    llm.fail(500, "overloaded")
    llm.reply_text("Fine now.")
    assert turn(c, session.id, "hello")[-1].final_response == "Fine now."
    assert len(llm.requests) == 2


def test_a_model_server_that_is_down(daemon):
    c = AriaClient(daemon.channel())
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there
    use_model(c, f"http://127.0.0.1:{port}/v1")
    session = c.session()
    err = failing(turn, c, session.id, "hello")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert f"127.0.0.1:{port}" in err.details() and "sk-test" not in err.details()
    assert [m.role for m in messages(c, session.id).messages] == [aria_pb2.USER]  # kept
    with FakeLLM() as back:  # the session is still usable
        use_model(c, back.base_url)
        back.reply_text("Back.")
        assert turn(c, session.id, "hello again")[-1].final_response == "Back."


def test_a_client_that_leaves_mid_turn_cancels_the_model_call(helper, llm):
    c, session = helper
    llm.push(text_stream("a slow answer, word by word", pieces=6, interval=2))
    request = session_pb2.ExecuteTurnRequest(session_id=session.id, input="talk slowly")
    request_stream = c.stream("/aria.v1.SessionService/ExecuteTurn", request, session_pb2.TurnOutput, 60)
    assert next(request_stream).message.role == aria_pb2.USER
    deadline = time.monotonic() + 10
    while not llm.requests:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    request_stream.cancel()
    assert llm.requests[0].disconnected.wait(5), "the model request was not cancelled"
    llm.reply_text("Quick now.")
    assert turn(c, session.id, "again")[-1].final_response == "Quick now."


def test_the_system_prompt_leads_once_and_the_agent_s_model_wins(daemon, llm):
    c = AriaClient(daemon.channel())
    agent = dict(
        TWO_TOOLS,
        name="poet",
        agents=[
            {"name": "Poet", "description": "Rhymes", "tools": ["shout"], "system_prompt": "Rhyme.", "model": "m2"}
        ],
    )
    c.upload_bytes(bundles.flat(agent), name="poet.aria")
    use_model(c, llm.base_url)
    session = c.session(agent_id="Poet")
    llm.reply_text("Roses.")
    llm.reply_text("Violets.")
    turn(c, session.id, "one")
    turn(c, session.id, "two")
    for request in llm.requests:
        assert [m for m in request.body["messages"] if m["role"] == "system"] == [
            {"role": "system", "content": "Rhyme."}
        ]
        assert request.body["messages"][0]["role"] == "system" and request.body["model"] == "m2"
    assert [m.role for m in messages(c, session.id).messages] == [
        aria_pb2.SYSTEM,
        aria_pb2.USER,
        aria_pb2.ASSISTANT,
        aria_pb2.USER,
        aria_pb2.ASSISTANT,
    ]


def test_a_tool_call_cut_short_is_closed_as_interrupted_before_the_next_model_call(daemon, llm):
    """A client that leaves while its turn's tool runs: the call never gets a result. The next
    turn first gives it a failed TOOL message, so the model server gets a history it accepts."""
    from test_turns_direct import SLOW

    c = AriaClient(daemon.channel())
    c.upload_bytes(bundles.flat(SLOW))
    use_model(c, llm.base_url)
    session = c.session(agent_id="Sleeper")
    llm.call_tool("slow", {})
    request = session_pb2.ExecuteTurnRequest(session_id=session.id, input="sleep, please")
    first = c.stream("/aria.v1.SessionService/ExecuteTurn", request, session_pb2.TurnOutput, 60)
    kinds_seen = []
    for out in first:
        kinds_seen.append(out.WhichOneof("event"))
        if kinds_seen[-1] == "tool_call":
            first.cancel()  # gone mid-call
            break
    deadline = time.monotonic() + 10
    llm.reply_text("done")
    while True:
        try:
            out = turn(c, session.id, "and now?")
            break
        except grpc.RpcError as e:
            assert "already running" in e.details() and time.monotonic() < deadline
            time.sleep(0.05)
    assert out[-1].final_response == "done"
    sent = llm.requests[-1].body["messages"]
    tools = [m for m in sent if m["role"] == "tool"]
    assert len(tools) == 1 and "interrupted" in tools[0]["content"], sent
    assert [m["role"] for m in sent][-3:] == ["assistant", "tool", "user"]  # right after its call
