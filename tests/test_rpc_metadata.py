"""Request ids, metadata both ways, and one structured log line per call."""

from __future__ import annotations

import re

import grpc
import trio

from probe import Req, grpc_channel, server_stream, unary


async def test_request_id_from_client_is_kept_logged_and_returned(probe_server, captured_logs):
    def call():
        with grpc_channel(probe_server.path) as ch:
            _, call = unary(ch).with_call(Req(mode="x"), timeout=5, metadata=[("x-request-id", "abc-123")])
            return dict(call.trailing_metadata())

    trailing = await trio.to_thread.run_sync(call)
    assert trailing["x-request-id"] == "abc-123"
    assert probe_server.probe.last_ctx.request_id == "abc-123"
    lines = [e for e in captured_logs if e["event"] == "rpc"]
    assert len(lines) == 1
    assert lines[0]["request_id"] == "abc-123"


async def test_request_id_generated_when_missing_or_unusable(probe_server):
    def call(metadata):
        with grpc_channel(probe_server.path) as ch:
            _, call = unary(ch).with_call(Req(mode="x"), timeout=5, metadata=metadata)
            return dict(call.trailing_metadata())["x-request-id"]

    generated = await trio.to_thread.run_sync(call, [])
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    other = await trio.to_thread.run_sync(call, [])
    assert other != generated
    replaced = await trio.to_thread.run_sync(call, [("x-request-id", "bad id; with spaces")])
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)


async def test_one_log_line_per_call_with_the_facts(probe_server, captured_logs):
    def calls():
        with grpc_channel(probe_server.path) as ch:
            unary(ch)(Req(mode="x"), timeout=5)
            try:
                unary(ch)(Req(mode="not_found"), timeout=5)
            except grpc.RpcError:
                pass
            list(server_stream(ch)(Req(n=3), timeout=5))

    await trio.to_thread.run_sync(calls)
    lines = [e for e in captured_logs if e["event"] == "rpc"]
    assert [(e["method"], e["code"]) for e in lines] == [
        ("/probe.v1.Probe/Unary", "OK"),
        ("/probe.v1.Probe/Unary", "NOT_FOUND"),
        ("/probe.v1.Probe/ServerStream", "OK"),
    ]
    for e in lines:
        assert e["log_level"] == "info"
        assert e["duration_ms"] >= 0
        assert re.fullmatch(r"[0-9a-f]{32}", e["request_id"])
        assert e["peer_uid"] == __import__("os").getuid()


async def test_initial_and_trailing_metadata_reach_the_client(probe_server):
    def call():
        with grpc_channel(probe_server.path) as ch:
            _, call = unary(ch).with_call(Req(mode="trailing"), timeout=5)
            return dict(call.initial_metadata()), dict(call.trailing_metadata())

    initial, trailing = await trio.to_thread.run_sync(call)
    assert initial["x-initial"] == "hello"
    assert trailing["x-trailer"] == "bye"
    assert "x-request-id" in trailing


async def test_handler_sees_the_client_deadline(probe_server):
    def call(timeout):
        with grpc_channel(probe_server.path) as ch:
            return unary(ch)(Req(mode="deadline"), timeout=timeout).text

    assert await trio.to_thread.run_sync(call, None) == "none"
    remaining = float(await trio.to_thread.run_sync(call, 7.5))
    assert 6.0 < remaining <= 7.6
