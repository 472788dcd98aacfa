"""ExecuteTurn without a model: direct tool use, every check, real sandboxes; history and sessions."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import grpc
import pytest
from test_runtime_bundles import TWO_TOOLS
from turn_events import contract_problems, kinds

from aria_trio.proto.aria.v1 import aria_pb2
from aria_trio.proto.aria.v1 import session_pb2 as pb

import bundles
from aria_client import SESSIONS, AriaClient
from conftest import Daemon
from quilt_client import descendants_running

SLOW = dict(
    TWO_TOOLS,
    name="slowpoke",
    tools=[{"name": "slow", "description": "Sleeps", "inputs": {}}],
    agents=[{"name": "Sleeper", "description": "Sleeps", "tools": ["slow"]}],
)


def tool_runners(daemon: Daemon) -> list[int]:
    """Pids of the tool sandboxes of this daemon (its Quilt child's; other tests may run theirs)."""
    return descendants_running(daemon.proc.pid, b"/runner/python_runner.py")


def turn(c: AriaClient, session_id: str, text: str, timeout: float = 60) -> list[pb.TurnOutput]:
    request = pb.ExecuteTurnRequest(session_id=session_id, input=text)
    return list(c.stream(SESSIONS + "ExecuteTurn", request, pb.TurnOutput, timeout))


def only(outputs: list[pb.TurnOutput], kind: str) -> Any:
    """The one event of that kind (its message)."""
    [found] = [getattr(o, kind) for o in outputs if o.WhichOneof("event") == kind]
    return found


def messages(c: AriaClient, session_id: str, **kw) -> pb.ListMessagesResponse:
    request = pb.ListMessagesRequest(session_id=session_id, **kw)
    return c.call(SESSIONS + "ListMessages", request, pb.ListMessagesResponse)


def failing(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


@pytest.fixture
def helper_session(daemon):
    c = AriaClient(daemon.channel())
    c.upload_bytes(bundles.flat(TWO_TOOLS))
    return c, c.session(agent_id="Helper")


def test_a_bundle_tool_runs_directly_in_a_sandbox_and_is_kept(helper_session, daemon):
    c, session = helper_session
    out = turn(c, session.id, '/add {"a": 2, "b": 3}')
    assert contract_problems(out, model=False) == []
    assert kinds(out) == ["message", "tool_call", "tool_output", "tool_result", "message", "usage", "final_response"]
    assert (out[0].message.role, out[0].message.content) == (aria_pb2.USER, '/add {"a": 2, "b": 3}')
    assert (out[1].tool_call.tool_name, json.loads(out[1].tool_call.parameters_json)) == ("add", {"a": 2, "b": 3})
    assert (out[2].tool_output.call_id, out[2].tool_output.stderr_line) == (out[1].tool_call.call_id, "adding 2 3")
    result = out[3].tool_result
    assert result.success and json.loads(result.result_json) == 5 and result.call_id == out[1].tool_call.call_id
    assert 0 < result.duration_seconds < 60
    assert (out[4].message.role, out[4].message.tool_call_id) == (aria_pb2.TOOL, result.call_id)
    usage = out[5].usage
    assert (usage.model_calls, usage.tool_calls, usage.prompt_tokens) == (0, 1, 0) and usage.duration_seconds > 0
    assert out[6].final_response == "5"

    history = messages(c, session.id).messages
    assert [m.role for m in history] == [aria_pb2.USER, aria_pb2.ASSISTANT, aria_pb2.TOOL]
    with sqlite3.connect(f"file:{daemon.data_dir / 'runtime.db'}?mode=ro", uri=True) as db:
        logged = db.execute(
            "SELECT tool_name, parameters_json, result_json, error, duration_ms, exit_status, message_id "
            "FROM tool_executions WHERE session_id = ?",
            [session.id],
        ).fetchall()
    assert len(logged) == 1
    name, parameters, result_json, error, duration_ms, exit_status, message_id = logged[0]
    assert (name, json.loads(parameters), result_json, error, exit_status) == ("add", {"a": 2, "b": 3}, "5", None, 0)
    assert duration_ms > 0 and message_id == history[1].id
    assert history[1].tool_calls[0].tool_name == "add" and history[2].tool_name == "add"
    assert [m.id for m in history] == [out[0].message.id, history[1].id, out[4].message.id]


def test_checks_turn_into_failed_results_never_executions(helper_session):
    c, session = helper_session
    for text, problem in [
        ('/run_command {"command": ["true"]}', "not permitted"),  # a built-in, but not this agent's
        ("/nope {}", "not permitted"),
        ('/add {"a": "two", "b": 3}', "invalid arguments"),
        ('/add {"a": 1}', "invalid arguments"),
        ("/add {not json", "not valid JSON"),
        ("/add [1, 2]", "JSON object"),
    ]:
        out = turn(c, session.id, text)
        result = out[2].tool_result
        assert not result.success and problem in result.error_message, (text, result.error_message)
        assert out[-1].final_response.startswith("error: ")


def test_built_in_tools_of_the_default_agent(daemon):
    c = AriaClient(daemon.channel())
    session = c.session()
    out = turn(c, session.id, '/run_command {"command": ["sh", "-c", "echo hi; echo oops >&2; exit 4"]}')
    assert contract_problems(out, model=False) == []
    result = json.loads(only(out, "tool_result").result_json)
    assert result == {"exit_code": 4, "stdout": "hi\n", "stderr": "oops\n"}
    lines = [o.tool_output for o in out if o.WhichOneof("event") == "tool_output"]
    assert sorted((o.WhichOneof("line"), o.stdout_line or o.stderr_line) for o in lines) == [
        ("stderr_line", "oops"),
        ("stdout_line", "hi"),
    ]
    out = turn(c, session.id, '/launch_task {"command": ["echo", "from a task"]}')
    task_id = json.loads(only(out, "tool_result").result_json)["task_id"]
    task = c.wait_task(task_id)
    assert task.session_id == session.id and task.status == aria_pb2.COMPLETED


def test_bad_turns(daemon):
    c = AriaClient(daemon.channel())
    session = c.session()
    cases = [
        ("s-unknown", "hi", grpc.StatusCode.NOT_FOUND, "no session"),
        (session.id, "", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (session.id, "   ", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (session.id, "x" * (1024 * 1024 + 1), grpc.StatusCode.INVALID_ARGUMENT, "larger than"),
        (session.id, "hello there", grpc.StatusCode.FAILED_PRECONDITION, "llm.model"),
    ]
    for session_id, text, code, words in cases:
        err = failing(turn, c, session_id, text)
        assert err.code() == code and words in err.details(), (text[:20], err.details())
    assert messages(c, session.id).messages == []  # nothing of a refused turn is kept


def test_a_slow_tool_times_out_one_turn_at_a_time_and_a_vanished_client(sock_dir):
    from conftest import start_daemon

    d = start_daemon(sock_dir, "--tool-timeout", "2")
    try:
        c = AriaClient(d.channel())
        c.upload_bytes(bundles.flat(SLOW))
        session = c.session(agent_id="Sleeper")
        started = time.monotonic()
        out = turn(c, session.id, "/slow {}")
        assert not out[2].tool_result.success and "timed out" in out[2].tool_result.error_message
        assert time.monotonic() - started < 15

        # a turn is running: a second one on the session is refused
        request = pb.ExecuteTurnRequest(session_id=session.id, input="/slow {}")
        first = c.stream(SESSIONS + "ExecuteTurn", request, pb.TurnOutput, 60)
        assert next(first).message.role == aria_pb2.USER
        err = failing(turn, c, session.id, "/slow {}")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already running" in err.details()
        while not tool_runners(d):
            time.sleep(0.02)  # the tool's sandbox runs
        first.cancel()  # the client leaves mid-turn: the sandbox is killed, the session usable again
        deadline = time.monotonic() + 10
        while True:
            try:
                out = turn(c, session.id, '/slow {"x": 1}')
                break
            except grpc.RpcError as e:
                assert "already running" in e.details() and time.monotonic() < deadline
                time.sleep(0.05)
        assert "invalid arguments" in out[2].tool_result.error_message  # (additional properties: refused)
        while tool_runners(d):
            assert time.monotonic() < deadline, "the cancelled tool's sandbox still runs"
            time.sleep(0.05)
    finally:
        d.stop()


def test_list_sessions_pages(daemon):
    c = AriaClient(daemon.channel())
    made = [c.session().id for _ in range(7)]
    seen, token = [], ""
    while True:
        reply = c.call(
            SESSIONS + "ListSessions", pb.ListSessionsRequest(page_size=3, page_token=token), pb.ListSessionsResponse
        )
        seen += [s.id for s in reply.sessions]
        token = reply.next_page_token
        if not token:
            break
    assert seen == made[::-1]
    assert all(s.agent_id == "default" for s in reply.sessions)
    err = failing(lambda: messages(c, made[0], page_token="bogus"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
