"""The protocol engine's short paths (HPACK caches, response frames built without h2's frame
objects, request parses kept per header list) give exactly what hpack, h2 and purerpc give on
their own general paths."""

from __future__ import annotations

import random
import socket

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import hpack
import pytest
import trio
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, WindowUpdateFrame
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import RequestReceived

from aria_trio.rpc.frames import FrameBuffer
from aria_trio.rpc.hpack import CachingDecoder, PlainEncoder
from aria_trio.rpc.http2 import GracefulH2Connection
from aria_trio.rpc.protocol import ServerConnection

RESPONSE = [(":status", "200"), ("content-type", "application/grpc+proto")]


def _header_lists() -> list[list[object]]:
    """What a server sends over a connection: fixed pairs again and again, per-call sensitive
    values, pairs new to the table, one that evicts the others, and repeats after that."""
    lists: list[list[object]] = []
    for n in range(40):
        lists.append([*RESPONSE, ("x-served-by", "aria")])
        trailers: list[object] = [("grpc-status", "0" if n % 3 else "5")]
        trailers.append(NeverIndexedHeaderTuple("x-request-id", f"{n:032x}"))
        if n % 7 == 0:
            trailers.append(NeverIndexedHeaderTuple("grpc-message", "é" * (n * 5)))  # long, non-ASCII
        if n % 5 == 0:
            trailers.append((f"x-new-{n}", "v" * 200))  # goes into the table, indexes move
        if n == 25:
            trailers.append(("x-huge", "h" * 3000))  # larger than the table: it empties
        lists.append(trailers)
    return lists


def _plain(headers: list[object]) -> list[tuple[str, str]]:
    return [(str(name), str(value)) for name, value in headers]  # type: ignore[misc]


def test_encoder_codes_like_hpack_and_decodes_back() -> None:
    ours, reference = PlainEncoder(), hpack.Encoder()
    decoder = hpack.Decoder()
    for i, headers in enumerate(_header_lists()):
        if i == 50:  # the peer shrinks the table: a size update leads the next block
            ours.header_table_size = reference.header_table_size = 1024
        block = ours.encode(headers)
        assert block == reference.encode(headers, huffman=False), f"block {i}"
        assert decoder.decode(block) == _plain(headers)
    assert len(ours._cache) <= ours.CACHE_HEADERS


def test_encoder_cache_is_used_and_bounded() -> None:
    encoder = PlainEncoder()
    encoder.encode(RESPONSE)  # content-type goes into the table
    first = encoder.encode(RESPONSE)
    assert set(encoder._cache) == {(":status", "200"), ("content-type", "application/grpc+proto")}
    assert encoder.encode(RESPONSE) == first
    huge = ("x-huge", "h" * 5000)  # larger than the table: a literal every time, too long to keep
    reference = hpack.Encoder()
    reference.encode(RESPONSE, huffman=False), reference.encode(RESPONSE, huffman=False)
    for _ in range(3):
        assert encoder.encode([huge]) == reference.encode([huge], huffman=False)
    assert huge not in encoder._cache
    assert all(len(coded) <= encoder.CACHE_HEADER_BYTES for coded in encoder._cache.values())
    for n in range(encoder.CACHE_HEADERS * 3):  # values the static table names: no table change
        encoder.encode([(":status", str(100 + n))])
        assert len(encoder._cache) <= encoder.CACHE_HEADERS


def test_decoder_decodes_like_hpack() -> None:
    encoder = hpack.Encoder()  # with Huffman coding, as other clients send
    ours, reference = CachingDecoder(), hpack.Decoder()
    blocks = []
    for i, headers in enumerate(_header_lists() * 2):
        if i == 60:
            encoder.header_table_size = 512
        blocks.append(encoder.encode(headers))
    for block in blocks:
        assert ours.decode(block, raw=True) == reference.decode(block, raw=True)
    repeated = encoder.encode(RESPONSE)
    assert ours.decode(repeated) == reference.decode(repeated) == RESPONSE
    assert (repeated, False) in ours._cache  # indexes only: kept
    assert ours.decode(repeated) == RESPONSE  # and served from there
    assert len(ours._cache) <= ours.CACHE_BLOCKS


def test_decoder_cache_honours_a_lower_header_list_limit() -> None:
    encoder, decoder = hpack.Encoder(), CachingDecoder()
    headers = [("x-big", "b" * 1000)]
    decoder.decode(encoder.encode(headers))  # a literal that goes into the table
    block = encoder.encode(headers)  # an index only now
    assert decoder.decode(block) == headers
    decoder.max_header_list_size = 100
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(block)


def _pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection, h2.connection.H2Connection]:
    """Our server connection, h2's own, and a client that opened streams 1, 3, 5 on both."""
    config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8", validate_outbound_headers=False)
    ours, theirs = GracefulH2Connection(config), h2.connection.H2Connection(config)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for sid in (1, 3, 5):
        client.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/s/m"), (":authority", "x")])
    client.send_data(5, b"x", end_stream=True)
    wire = client.data_to_send()
    for server in (ours, theirs):
        server.encoder = PlainEncoder()
        server.initiate_connection()
        server.receive_data(wire)
        server.data_to_send()
    return ours, theirs, client


def _same(ours: h2.connection.H2Connection, theirs: h2.connection.H2Connection, action: object) -> None:
    outcomes = []
    for server in (ours, theirs):
        try:
            action(server)  # type: ignore[operator]
            outcomes.append(("ok", server.data_to_send()))
        except h2.exceptions.H2Error as exc:
            outcomes.append((type(exc).__name__, server.data_to_send()))
    assert outcomes[0] == outcomes[1]
    for sid in (1, 3, 5):
        if sid in theirs.streams:
            mine, other = ours.streams[sid], theirs.streams[sid]
            assert mine.state_machine.state == other.state_machine.state
            assert mine.outbound_flow_control_window == other.outbound_flow_control_window
    assert ours.outbound_flow_control_window == theirs.outbound_flow_control_window
    assert ours.state_machine.state == theirs.state_machine.state


def test_response_frames_are_h2s() -> None:
    ours, theirs, _ = _pair()
    _same(ours, theirs, lambda s: s.send_headers(5, RESPONSE))
    _same(ours, theirs, lambda s: s.send_data(5, b"\0\0\0\0\x03abc"))
    _same(ours, theirs, lambda s: s.send_headers(5, [("grpc-status", "0")]))  # trailers need END_STREAM
    trailers = [("grpc-status", "0"), NeverIndexedHeaderTuple("x-request-id", "r1")]
    _same(ours, theirs, lambda s: s.send_headers(5, trailers, end_stream=True))
    _same(ours, theirs, lambda s: s.send_data(5, b"late"))  # the stream is closed
    _same(ours, theirs, lambda s: s.send_headers(5, RESPONSE))
    # Headers larger than a frame: HEADERS and CONTINUATION frames; END_STREAM on the first.
    big = [*RESPONSE, NeverIndexedHeaderTuple("x-big", "b" * 40000)]
    _same(ours, theirs, lambda s: s.send_headers(3, big, end_stream=True))
    # Data and windows: a frame of the largest size, more than a frame, more than the window.
    _same(ours, theirs, lambda s: s.send_headers(1, RESPONSE))
    _same(ours, theirs, lambda s: s.send_data(1, b"d" * 16_384))
    _same(ours, theirs, lambda s: s.send_data(1, b"d" * 16_385))
    _same(ours, theirs, lambda s: s.send_data(1, b"d" * 16_384))
    _same(ours, theirs, lambda s: s.send_data(1, b"d" * 16_384))
    _same(ours, theirs, lambda s: s.send_data(1, b"d" * 20_000))  # 65535 - 49152 left
    _same(ours, theirs, lambda s: s.send_data(1, b"d" * 16_383, end_stream=True))
    _same(ours, theirs, lambda s: s.send_data(7, b"never opened"))


def test_reset_streams_refuse_alike() -> None:
    ours, theirs, client = _pair()
    client.reset_stream(1)
    wire = client.data_to_send()
    for server in (ours, theirs):
        server.receive_data(wire)
    _same(ours, theirs, lambda s: s.send_headers(1, RESPONSE))
    _same(ours, theirs, lambda s: s.send_data(1, b"x"))


def _request(path: str = "/probe.v1.Probe/Unary", *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"localhost"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        *extra,
    ]


def test_request_parses_are_reused_per_header_list() -> None:

    server = ServerConnection(
        GRPCConfiguration(client_side=False), max_concurrent_streams=100, connection_window=1 << 20
    )
    server.initiate_connection()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    lists = [_request(), _request(), _request("/probe.v1.Probe/Unary", (b"grpc-timeout", b"5S"), (b"k", b"v"))]
    lists.append(_request())
    for n, headers in enumerate(lists):
        client.send_headers(2 * n + 1, headers)
    events = [e for e in server.receive_data(client.data_to_send()) if isinstance(e, RequestReceived)]
    first, second, third, fourth = events
    assert [e.stream_id for e in events] == [1, 3, 5, 7]
    assert first is not second and vars(first) == {**vars(second), "stream_id": 1}
    assert (third.timeout.total_seconds(), third.custom_metadata) == (5.0, (("k", "v"),))
    assert (fourth.timeout, fourth.custom_metadata, fourth.method_name) == (None, (), "Unary")
    assert len(server._requests) == 2
    for n in range(server.REQUEST_CACHE * 2):  # a new header list per call: the cache stays bounded
        client.send_headers(9 + 2 * n, _request("/probe.v1.Probe/Unary", (b"x-n", str(n).encode())))
        server.receive_data(client.data_to_send())
        assert len(server._requests) <= server.REQUEST_CACHE


async def test_a_request_header_that_is_not_utf8_fails_only_its_stream(probe_server) -> None:
    def exchange() -> tuple[list[object], bytes]:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, _request("/probe.v1.Probe/Unary", (b"x-bad", b"\xff\xfe")))
        client.send_data(1, b"\0\0\0\0\0", end_stream=True)
        client.send_headers(3, _request())
        client.send_data(3, b"\0\0\0\0\0", end_stream=True)
        events: list[object] = []
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(probe_server.path)
            sock.sendall(client.data_to_send())
            data = b""
            while not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 3 for e in events):
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                data += chunk
                events += client.receive_data(chunk)
                sock.sendall(client.data_to_send())
        return events, data

    events, _ = await trio.to_thread.run_sync(exchange)
    resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(1, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
    trailers = [e for e in events if isinstance(e, h2.events.TrailersReceived) and e.stream_id == 3]
    assert (b"grpc-status", b"0") in trailers[0].headers


def _frames_of(buffer: object, stream: bytes, cuts: list[int]) -> list[object]:
    """What a frame reader yields for `stream` arriving in pieces cut at `cuts`, or the error."""
    out: list[object] = []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    try:
        for piece in pieces:
            buffer.add_data(piece)  # type: ignore[attr-defined]
            out += [(type(f).__name__, f.stream_id, sorted(f.flags), f.serialize()) for f in buffer]  # type: ignore[attr-defined]
    except h2.exceptions.H2Error as exc:
        out.append(type(exc).__name__)
    return out


def test_frame_reader_reads_like_h2s() -> None:
    frames = []
    headers = HeadersFrame(1, data=b"h" * 100, flags=["PADDED"])
    headers.pad_length = 7
    frames.append(headers.serialize())
    frames.append(ContinuationFrame(1, data=b"c" * 50).serialize())
    frames.append(ContinuationFrame(1, data=b"d" * 20, flags=["END_HEADERS"]).serialize())
    frames.append(DataFrame(1, data=b"x" * 40_000, flags=["END_STREAM"]).serialize())
    frames.append(WindowUpdateFrame(0, window_increment=1000).serialize())
    frames.append(b"\x00\x00\x03\xee\x05\x00\x00\x00\x03abc")  # a frame type hyperframe does not know
    frames.append(PingFrame(0, opaque_data=b"12345678").serialize())
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    good = preface + b"".join(frames)
    bad_stream = preface + b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"12345678"  # a PING on stream 1
    short_body = preface + b"\x00\x00\x03\x08\x00\x00\x00\x00\x00" + b"abc"  # WINDOW_UPDATE of 3 bytes
    oversized = preface + b"\x00\x40\x01\x00\x00\x00\x00\x00\x01"  # 16 KiB + 1, body not sent yet
    rng = random.Random(7)
    for stream in (good, bad_stream, short_body, oversized):
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(stream)), min(5, len(stream) - 1)))
            theirs, ours = h2.frame_buffer.FrameBuffer(server=True), FrameBuffer(server=True)
            theirs.max_frame_size = ours.max_frame_size = 16_384 * 4
            if stream is oversized:
                theirs.max_frame_size = ours.max_frame_size = 16_384
                # h2 waits for the whole oversized frame before refusing it; ours refuses at once
                assert _frames_of(ours, stream, cuts)[-1] == "FrameTooLargeError"
                assert _frames_of(theirs, stream + b"x" * 16_385, cuts)[-1] == "FrameTooLargeError"
                continue
            assert _frames_of(ours, stream, cuts) == _frames_of(theirs, stream, cuts)
    reader = FrameBuffer(server=True)
    reader.max_frame_size = 65_536
    whole = _frames_of(reader, good, [len(preface)])
    assert [f[0] for f in whole] == ["HeadersFrame", "DataFrame", "WindowUpdateFrame", "ExtensionFrame", "PingFrame"]  # type: ignore[index]
