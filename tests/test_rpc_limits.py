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


def _grpc_messages(*bodies: bytes) -> bytes:
    return b"".join(bytes([0]) + len(b).to_bytes(4, "big") + b for b in bodies)


def test_messages_reassembled_from_any_cuts_with_all_their_credit() -> None:
    """The message buffer joins each message once from views of the DATA payloads, wherever the
    frames cut it; a frame's padding is credited with the message in progress, so the credit of
    all messages is every flow-controlled byte."""
    import random

    from aria_trio.rpc.protocol import _MessageReadBuffer

    bodies = [b"", b"a" * 3, bytes(range(256)) * 300, b"", b"z" * 70_000, b"q"]
    wire = _grpc_messages(*bodies)
    rng = random.Random(14)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(0, 12)))
        buffer = _MessageReadBuffer(None, 4 * MiB)
        flow = 0
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            padding = rng.choice([0, 0, 9])
            flow += b - a + padding
            buffer.data_received(memoryview(wire)[a:b], b - a + padding)
        got = list(buffer.read_all_complete_messages_flowcontrol())
        assert [m for m, _ in got] == bodies
        assert all(type(m) is bytes for m, _ in got)
        assert sum(c for _, c in got) == flow


def test_an_oversized_message_is_refused_at_its_prefix() -> None:
    import pytest
    from purerpc.grpclib.exceptions import MessageTooLargeError

    from aria_trio.rpc.protocol import _MessageReadBuffer

    buffer = _MessageReadBuffer(None, 1024)
    with pytest.raises(MessageTooLargeError):
        buffer.data_received(b"\x00" + (1025).to_bytes(4, "big"), 5)  # nothing of its body sent yet


def test_data_frames_are_views_and_reads_are_joined_once_per_frame() -> None:
    """A DATA frame's payload is a view of the bytes as read; a frame cut across reads is joined
    when it is complete (not on every read), and a padded one is still parsed by hyperframe."""
    from hyperframe.frame import DataFrame

    from aria_trio.rpc.frames import FrameBuffer

    big = DataFrame(1, data=b"x" * 300_000).serialize()
    padded = DataFrame(1, data=b"p" * 10, flags=["PADDED"])
    padded.pad_length = 5
    reader = FrameBuffer(server=True)
    reader.max_frame_size = 1 << 20
    reader.add_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    stream = big + padded.serialize()
    reads = [stream[i : i + 50_000] for i in range(0, 200_000, 50_000)]
    for n, read in enumerate(reads):
        reader.add_data(read)
        assert list(reader) == []
        # the first read is the buffer itself, the others wait in their list: nothing copied yet
        assert reader.data is reads[0] and reader._buffered == 50_000 * n
    reader.add_data(stream[200_000:])
    frames = list(reader)
    assert [type(f.data) for f in frames] == [memoryview, bytes]
    assert frames[0].data == b"x" * 300_000 and frames[0].flow_controlled_length == 300_000
    assert frames[1].data == b"p" * 10 and frames[1].flow_controlled_length == 16


def test_data_to_send_hands_over_its_buffer() -> None:
    import h2.config

    from aria_trio.rpc.http2 import GracefulH2Connection

    conn = GracefulH2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    first = conn.data_to_send()
    assert first.startswith(b"PRI * HTTP/2.0") and conn.data_to_send() == b""
    conn.ping(b"12345678")
    assert conn.data_to_send(4) + conn.data_to_send() == b"\x00\x00\x08\x06\x00\x00\x00\x00\x0012345678"


def test_a_message_and_its_prefix_go_in_one_frame_as_h2_would_send_them() -> None:
    """send_data(prefix=...) writes the 5-byte prefix and the message without joining them first:
    the same frames, flow-control windows and states as h2 sending them joined."""
    from test_rpc_fast_paths import RESPONSE, _pair, _same

    ours, theirs, _ = _pair()
    _same(ours, theirs, lambda s: s.send_headers(1, RESPONSE))
    prefix, body = b"\0\0\0\x3e\x80", b"m" * 16_000
    for kwargs in ({}, {"end_stream": True}):
        _same(
            ours,
            theirs,
            lambda s, kw=kwargs: (
                s.send_data(1, body, prefix=prefix, **kw)
                if isinstance(s, type(ours))
                else s.send_data(1, prefix + body, **kw)
            ),
        )


def test_a_small_piece_waiting_for_its_message_does_not_pin_its_read() -> None:
    from aria_trio.rpc.protocol import _MessageReadBuffer

    read = bytes(256 * 1024 - 3) + b"\x00\x00\x00"  # the last 3 bytes: the start of a prefix
    buffer = _MessageReadBuffer(None, 4 * MiB)
    buffer.data_received(memoryview(read)[-3:], 3)
    assert [type(p) for p in buffer._parts] == [bytes]  # copied: the 256 KiB read can go
    buffer.data_received(b"\x00\x02ab", 4)
    assert [m for m, _ in buffer.read_all_complete_messages_flowcontrol()] == [b"ab"]
