"""Bounds: message size, concurrent streams, compression, and flow-control credit."""

from __future__ import annotations

import gzip
import zlib

import grpc
import trio

from aria_trio.rpc import Channel, RpcError, StatusCode

from probe import Probe, Req, Resp, client_stream, grpc_channel, make_server, server_stream, unary

MiB = 1024 * 1024


async def test_oversized_request_fails_only_its_call(probe_server):
    def calls():
        with grpc_channel(probe_server.path, **{"grpc.max_send_message_length": 64 * MiB}) as ch:
            neighbour = server_stream(ch)(Req(n=30, seconds=0.01), timeout=10)
            next(neighbour)
            try:
                unary(ch)(Req(data=b"x" * (5 * MiB)), timeout=10)
            except grpc.RpcError as err:
                big = err
            rest = list(neighbour)
            after = unary(ch)(Req(mode="after"), timeout=5)
            return big, len(rest), after

    big, rest, after = await trio.to_thread.run_sync(calls)
    assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than" in big.details()
    assert rest == 29
    assert after.text == "echo:after"


async def test_oversized_response_is_resource_exhausted(probe_server):
    def call():
        with grpc_channel(probe_server.path, **{"grpc.max_receive_message_length": 64 * MiB}) as ch:
            try:
                unary(ch)(Req(mode="big", n=5 * MiB), timeout=10)
            except grpc.RpcError as err:
                return err

    err = await trio.to_thread.run_sync(call)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_concurrent_streams_are_bounded(nursery, sock_dir):
    probe = Probe()
    server = make_server(probe, max_concurrent_streams=4)
    path = str(sock_dir / "s.sock")
    await nursery.start(server.serve, path)

    def calls():
        with grpc_channel(path) as ch:
            futures = [unary(ch).future(Req(mode="sleep", seconds=0.2), timeout=20) for _ in range(12)]
            return [f.result().text for f in futures]

    assert await trio.to_thread.run_sync(calls) == ["slept"] * 12
    assert probe.max_running == 4  # grpcio queued the rest, as the server's SETTINGS asked


async def test_gzip_and_deflate_requests_are_decompressed(probe_server):
    def call(compression):
        with grpc_channel(probe_server.path) as ch:
            return unary(ch)(Req(mode="zipped", data=b"a" * 100_000), timeout=5, compression=compression)

    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        reply = await trio.to_thread.run_sync(call, compression)
        assert (reply.text, reply.count) == ("echo:zipped", 100_000)


async def _raw_call(path: str, encoding: str, payload: bytes, compressed: bool) -> RpcError | Resp:
    """A call whose request says `grpc-encoding: <encoding>` (grpcio only sends what it knows)."""
    async with Channel.connect(path) as channel:
        channel.proto.config._message_encoding = encoding
        try:
            async with channel.call("/probe.v1.Probe/Unary", Resp, timeout=5) as call:
                frame = bytes([1 if compressed else 0]) + len(payload).to_bytes(4, "big") + payload
                for i in range(0, len(frame), 16384):
                    end = i + 16384 >= len(frame)
                    channel.proto.send_data(call.sid, frame[i : i + 16384], end_stream=end)
                channel.kick()
                return await call.single()
        except RpcError as exc:
            return exc
        finally:
            channel.proto.config._message_encoding = None


async def test_unsupported_encoding_and_zip_bombs_fail_per_call(probe_server):
    message = Req(mode="x").SerializeToString()
    snappy = await _raw_call(probe_server.path, "snappy", message, compressed=True)
    assert isinstance(snappy, RpcError) and snappy.code is StatusCode.UNIMPLEMENTED
    assert "snappy" in snappy.message

    bomb = gzip.compress(Req(data=b"\0" * (20 * MiB)).SerializeToString())
    assert len(bomb) < 64 * 1024
    exploded = await _raw_call(probe_server.path, "gzip", bomb, compressed=True)
    assert isinstance(exploded, RpcError) and exploded.code is StatusCode.RESOURCE_EXHAUSTED

    garbage = await _raw_call(probe_server.path, "deflate", b"not zlib at all", compressed=True)
    assert isinstance(garbage, RpcError) and garbage.code is StatusCode.INTERNAL

    ok = await _raw_call(probe_server.path, "deflate", zlib.compress(message), compressed=True)
    assert isinstance(ok, Resp) and ok.text == "echo:x"

    def plain():  # and the server is still fine for everyone
        with grpc_channel(probe_server.path) as ch:
            return unary(ch)(Req(mode="still"), timeout=5).text

    assert await trio.to_thread.run_sync(plain) == "echo:still"


async def test_early_returning_uploads_give_their_credit_back(probe_server):
    """Handlers that stop reading early used to strand the connection's flow-control window:
    purerpc stalled the whole connection after 17 such 64 MiB uploads. Here: 25, then more."""
    chunk = Req(data=b"u" * (1 * MiB))

    def calls():
        with grpc_channel(probe_server.path) as ch:
            results = []
            for _ in range(25):

                def requests():
                    yield Req(mode="early", seconds=0.05, data=b"1")
                    for _ in range(64):
                        yield chunk

                try:
                    results.append(client_stream(ch)(requests(), timeout=10).text)
                except grpc.RpcError as err:  # grpcio may report the early end as an error
                    results.append(err.code().name)
            results.append(unary(ch)(Req(mode="after"), timeout=5).text)
            return results

    results = await trio.to_thread.run_sync(calls)
    assert results[-1] == "echo:after"
    assert all(r == "early" for r in results[:-1]), results
