"""The adapter serves grpcio (an independent client) on a Unix socket, for every cardinality."""

from __future__ import annotations

import os

import grpc
import pytest
import trio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aria_trio.proto.aria.v1 import task_pb2
from aria_trio.rpc import Channel, RpcError, Server, StatusCode
from aria_trio.runtime.services import register

from probe import SECRET, Req, bidi, client_stream, grpc_channel, server_stream, unary


async def test_all_cardinalities_over_unix_socket(probe_server):
    def calls():
        with grpc_channel(probe_server.path) as ch:
            one = unary(ch)(Req(mode="hi"), timeout=5)
            many = [r.text for r in server_stream(ch)(Req(n=5), timeout=5)]
            up = client_stream(ch)(iter([Req(data=b"ab"), Req(data=b"cde")]), timeout=5)
            both = [r.text for r in bidi(ch)(iter([Req(mode="a"), Req(mode="b")]), timeout=5)]
            return one, many, up, both

    one, many, up, both = await trio.to_thread.run_sync(calls)
    assert one.text == "echo:hi"
    assert many == ["0", "1", "2", "3", "4"]
    assert (up.text, up.count) == ("2 messages", 5)
    assert both == ["echo:a", "echo:b"]


def _details(err: grpc.RpcError):
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in grpc-status-details-bin"
    found = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                found[cls.__name__] = msg
    return status, found


async def test_domain_error_has_status_details_with_error_info(probe_server):
    def call():
        with grpc_channel(probe_server.path) as ch:
            try:
                unary(ch)(Req(mode="not_found"), timeout=5)
            except grpc.RpcError as err:
                return err
        raise AssertionError("no error")

    err = await trio.to_thread.run_sync(call)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "thing 42 not found"
    status, details = _details(err)
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    info = details["ErrorInfo"]
    assert info.reason == "NOT_FOUND" and info.domain == "aria.v1"
    request_id = dict(err.trailing_metadata())["x-request-id"]
    assert info.metadata["request_id"] == request_id


async def test_invalid_argument_carries_bad_request(probe_server):
    def call():
        with grpc_channel(probe_server.path) as ch:
            try:
                unary(ch)(Req(mode="invalid"), timeout=5)
            except grpc.RpcError as err:
                return err

    err = await trio.to_thread.run_sync(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, details = _details(err)
    violations = {(v.field, v.description) for v in details["BadRequest"].field_violations}
    assert violations == {("n", "must be > 0")}
    assert details["ErrorInfo"].reason == "INVALID_ARGUMENT"


async def test_internal_error_hides_internals_and_names_request_id(probe_server, captured_logs):
    def call():
        with grpc_channel(probe_server.path) as ch:
            try:
                unary(ch)(Req(mode="boom"), timeout=5, metadata=[("x-request-id", "req-boom-1")])
            except grpc.RpcError as err:
                return err

    err = await trio.to_thread.run_sync(call)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error (request id req-boom-1)"
    everything_sent = err.details() + repr(err.trailing_metadata())
    for leak in ("hunter2", "/srv/secret", "RuntimeError", "Traceback"):
        assert leak not in everything_sent
    _, details = _details(err)
    assert details["ErrorInfo"].metadata["request_id"] == "req-boom-1"
    # ...while the log has the whole story under the same request id.
    failures = [e for e in captured_logs if e["event"] == "handler failed"]
    assert failures and failures[0]["request_id"] == "req-boom-1"
    assert SECRET in repr(failures[0]["exc_info"])


async def test_unknown_method_and_service_are_unimplemented(probe_server):
    def call(path):
        with grpc_channel(probe_server.path) as ch:
            try:
                ch.unary_unary(path, Req.SerializeToString, Req.FromString)(Req(), timeout=5)
            except grpc.RpcError as err:
                return err

    for path in ("/probe.v1.Probe/Nope", "/nope.v1.Nope/Unary"):
        err = await trio.to_thread.run_sync(call, path)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert path in err.details()


async def test_malformed_request_bytes_fail_only_that_call(probe_server):
    def calls():
        with grpc_channel(probe_server.path) as ch:
            raw = ch.unary_unary("/probe.v1.Probe/Unary", lambda b: b, lambda b: b)
            stream = server_stream(ch)(Req(n=20, seconds=0.01), timeout=10)
            first = next(stream)
            try:
                raw(b"\xff\xff\xff\xff\x0f", timeout=5)  # field 0x1fffffff.. with a truncated varint
            except grpc.RpcError as err:
                bad = err
            rest = [r.text for r in stream]
            after = unary(ch)(Req(mode="after"), timeout=5)
            return bad, first, rest, after

    bad, first, rest, after = await trio.to_thread.run_sync(calls)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "probe.v1.Req" in bad.details()
    _, details = _details(bad)
    assert details["ErrorInfo"].reason == "MALFORMED_REQUEST"
    assert first.text == "0" and len(rest) == 19  # the neighbour stream on the same connection went on
    assert after.text == "echo:after"


async def test_failure_after_stream_messages_keeps_them(probe_server):
    def call():
        with grpc_channel(probe_server.path) as ch:
            got = []
            try:
                for r in server_stream(ch)(Req(n=3, mode="fail_after"), timeout=5):
                    got.append(r.text)
            except grpc.RpcError as err:
                return got, err

    got, err = await trio.to_thread.run_sync(call)
    assert got == ["0", "1", "2"]
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_peer_credentials_on_every_call(probe_server):
    def call():
        with grpc_channel(probe_server.path) as ch:
            return [unary(ch)(Req(mode="peer"), timeout=5).text for _ in range(3)]

    answers = await trio.to_thread.run_sync(call)
    assert answers == [f"{os.getpid()}:{os.getuid()}:{os.getgid()}"] * 3


async def test_a_service_without_an_implementation_answers_unimplemented_plainly(nursery, sock_dir):
    server = Server()
    register(server, {})  # every aria.v1 service by its generated base class: nothing implemented
    path = str(sock_dir / "bare.sock")
    await nursery.start(server.serve, path)
    async with Channel.connect(path) as channel:
        for name in ("aria.v1", "aria"):
            with pytest.raises(RpcError) as info:
                await channel.unary(f"/{name}.TaskService/GetTask", task_pb2.GetTaskRequest(), task_pb2.Task)
            assert info.value.code == StatusCode.UNIMPLEMENTED
            assert "not implemented by this server yet" in info.value.message
