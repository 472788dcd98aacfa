"""Tool runners (BUNDLES.md): Python and Node entries in real sandboxes, and the ways tools fail."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from test_quilt_bundles import messages, upload

from aria_trio.proto.quilt.v1 import quilt_pb2 as pb

from bundles import flat, manifest, nested
from quilt_client import B, QuiltClient, error_of


@pytest.fixture
def q(module_quilt):
    """The module's Quilt (each test runs its own tools; one at a time in a worker)."""
    with module_quilt.channel() as ch:
        yield QuiltClient(ch)


@pytest.fixture
def calc(q):
    return upload(q, messages(flat())).id


def run(q, bundle, tool, arguments, **kw):
    request = pb.RunToolRequest(bundle_id=bundle, tool_name=tool, arguments_json=json.dumps(arguments), **kw)
    return q.call(B + "RunTool", request, pb.RunToolResult, timeout=60)


def test_python_function_async_and_class_entries(q, calc):
    added = run(q, calc, "add", {"a": 2, "b": 3})
    assert added.ok and json.loads(added.result_json) == 5
    assert added.log == "adding 2 3\n"  # the tool's prints are its log, not its answer
    assert 0 < added.duration_seconds < 10 and added.exit_code == 0
    assert json.loads(run(q, calc, "shout", {"text": "hey"}).result_json) == "HEY"
    assert json.loads(run(q, calc, "Greeter", {"name": "bob"}).result_json) == {"greeting": "hi bob"}


def test_node_entry_of_a_nested_bundle(q):
    weather = upload(q, messages(nested())).id
    r = run(q, weather, "forecast", {"city": "Oslo"})
    assert r.ok, r.error
    assert json.loads(r.result_json) == {"city": "Oslo", "temp": 21}
    assert "looking up Oslo" in r.log


def test_a_tool_that_raises_answers_ok_false(q, calc):
    r = run(q, calc, "fails", {})
    assert not r.ok and r.error == "no such city"
    assert "ValueError" in r.log


def test_a_tool_that_prints_garbage(q, calc):
    r = run(q, calc, "garbage", {})
    assert not r.ok and "not its answer" in r.error and "this is not json" in r.error


def test_a_tool_that_sleeps_past_its_timeout(q, calc, module_quilt):
    started = time.monotonic()
    r = run(q, calc, "slow", {}, timeout_seconds=1)
    assert time.monotonic() - started < 5
    assert not r.ok and r.timed_out and "timed out after 1 s" in r.error
    tools = module_quilt.data_dir / "tools"
    assert not tools.exists() or not any(tools.iterdir())


def test_a_memory_hog_over_its_limit(q, calc):
    r = run(q, calc, "hog", {}, memory_bytes=64 * 1024 * 1024)
    assert not r.ok and "out of memory" in r.error


def test_a_crashing_tool(q, calc):
    r = run(q, calc, "crash", {})
    assert not r.ok and r.exit_code == 7 and "exited with code 7" in r.error


def test_tools_see_the_bundle_read_only_and_no_network(q):
    probe = flat(
        files={
            "implementations/tools/probe.py": (
                "import os, socket\n"
                "def probe():\n"
                "    try:\n        open('/bundle/manifest.json', 'a')\n        writable = True\n"
                "    except OSError:\n        writable = False\n"
                "    try:\n        socket.create_connection(('1.1.1.1', 53), timeout=1)\n        net = True\n"
                "    except OSError:\n        net = False\n"
                "    files = sorted(os.listdir('/bundle'))\n"
                "    return {'writable': writable, 'net': net, 'cwd': os.getcwd(), 'files': files}\n"
            )
        },
        data={**manifest("probe"), "tools": [{"name": "probe", "inputs": {}}], "agents": []},
    )
    bundle = upload(q, messages(probe)).id
    r = run(q, bundle, "probe", {})
    assert r.ok, r.error
    assert json.loads(r.result_json) == {
        "writable": False,
        "net": False,
        "cwd": "/bundle",
        "files": ["implementations", "manifest.json"],
    }


def test_bad_tool_calls(q, calc):
    assert error_of(run, q, calc, "teleport", {}).code() == grpc.StatusCode.NOT_FOUND
    assert error_of(run, q, "0" * 64, "add", {}).code() == grpc.StatusCode.NOT_FOUND
    request = pb.RunToolRequest(bundle_id=calc, tool_name="add", arguments_json="[1, 2]")
    assert error_of(q.call, B + "RunTool", request, pb.RunToolResult).code() == grpc.StatusCode.INVALID_ARGUMENT


# -- RunToolStream: what the tool prints, as it prints it ---------------------------------------------

PRINTER = {
    "implementations/tools/printer.py": (
        "import sys, time\n"
        "def printer(lines=2, pause=0.0, big=0):\n"
        "    for i in range(lines):\n"
        "        print(f'line {i}')\n"
        "        time.sleep(pause)\n"
        "    if big:\n"
        "        print('x' * big)\n"
        "    sys.stderr.buffer.write(b'\\xff\\xfebad bytes\\n')\n"
        "    return lines\n"
    )
}
PRINTER_MANIFEST = {
    **manifest("printer"),
    "tools": [
        {
            "name": "printer",
            "inputs": {
                "type": "object",
                "properties": {"lines": {"type": "integer"}, "pause": {"type": "number"}, "big": {"type": "integer"}},
            },
        }
    ],
    "agents": [],
}


@pytest.fixture
def printer(q):
    return upload(q, messages(flat(PRINTER_MANIFEST, files=PRINTER))).id


def stream_tool(q, bundle, tool, arguments, **kw):
    """RunToolStream's events, each with the time it arrived."""
    request = pb.RunToolRequest(bundle_id=bundle, tool_name=tool, arguments_json=json.dumps(arguments), **kw)
    return [(time.monotonic(), e) for e in q.stream(B + "RunToolStream", request, pb.RunToolEvent, timeout=120)]


def test_run_tool_stream_sends_each_line_as_it_is_printed_then_the_result(q, printer):
    got = stream_tool(q, printer, "printer", {"lines": 3, "pause": 0.5})
    events = [e for _, e in got]
    assert [e.WhichOneof("event") for e in events] == ["line"] * 4 + ["result"]
    assert [e.line.text for e in events[:4]] == ["line 0", "line 1", "line 2", "\ufffd\ufffdbad bytes"]
    assert [e.line.offset for e in events[:4]] == [0, 1, 2, 3] and all(e.line.stream == pb.STDERR for e in events[:4])
    assert got[-1][0] - got[0][0] > 1.0, "the first line came only when the tool ended"
    result = events[-1].result
    assert result.ok and json.loads(result.result_json) == 3
    assert result.log.startswith("line 0\nline 1\nline 2\n")  # the log in the result as before


def test_run_tool_stream_bounds_what_it_sends(q, printer):
    events = [e for _, e in stream_tool(q, printer, "printer", {"lines": 20_000})]
    lines = [e.line.text for e in events if e.WhichOneof("event") == "line"]
    assert len(lines) == 10_001 and lines[9_999] == "line 9999" and "not shown live" in lines[-1]
    assert events[-1].result.ok and len(events[-1].result.log) <= 1024 * 1024

    events = [e for _, e in stream_tool(q, printer, "printer", {"lines": 0, "big": 10 * 1024 * 1024})]
    lines = [e.line.text for e in events if e.WhichOneof("event") == "line"]
    assert all(len(line) <= 64 * 1024 for line in lines) and "not shown live" in lines[-1]
    assert sum(map(len, lines)) <= 1024 * 1024 + 100
    assert events[-1].result.ok


@pytest.mark.serial  # timed: the tool ends well before its reader comes back
def test_run_tool_stream_never_waits_for_a_slow_reader(q, printer):
    """Nobody reads for 6 s while the tool prints 5,000 lines at once: the tool ends at its own
    pace (its lines wait for the reader, bounded by the live cap), and every line still comes."""
    request = pb.RunToolRequest(bundle_id=printer, tool_name="printer", arguments_json=json.dumps({"lines": 5000}))
    stream = q.stream(B + "RunToolStream", request, pb.RunToolEvent, timeout=60)
    first = next(stream)
    time.sleep(6)
    events = [first, *stream]
    result = events[-1].result
    assert result.ok and result.duration_seconds < 4, result.duration_seconds
    lines = [e.line.text for e in events if e.WhichOneof("event") == "line"]
    assert lines[:-1] == [f"line {i}" for i in range(5000)]
    assert result.log.count("\n") == 5001


def test_run_tool_stream_refuses_as_run_tool_does(q, calc):
    def first_event(**kw):
        request = pb.RunToolRequest(**kw)
        return list(q.stream(B + "RunToolStream", request, pb.RunToolEvent, timeout=30))

    assert error_of(first_event, bundle_id=calc, tool_name="teleport").code() == grpc.StatusCode.NOT_FOUND
    bad = error_of(first_event, bundle_id=calc, tool_name="add", arguments_json="[1, 2]")
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_long = error_of(first_event, bundle_id=calc, tool_name="add", timeout_seconds=10**9)
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
