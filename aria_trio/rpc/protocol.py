"""purerpc's sans-io gRPC protocol engine, made safe for a long-running daemon.

purerpc 0.8.0 splits into a protocol layer (`grpclib.connection.GRPCConnection`: HTTP/2 through
h2, gRPC framing, headers) and an anyio socket layer (`GRPCSocket`, `ConnectionHandler`). We keep
the protocol layer and drive it from our own Trio loops (server.py, client.py), so none of the
socket layer's defects (see research/purerpc.md) apply. The subclasses here fix the protocol
layer's remaining ones without monkeypatching:

* a peer's RST_STREAM becomes a `StreamReset` event (purerpc drops it);
* an oversized, badly compressed or undecodable message fails only its own call
  (`StreamFailed`) instead of killing the connection, and its flow-control credit is returned;
* DATA for a call we already finished is acknowledged and dropped instead of raising KeyError;
* gzip is decoded as gzip (purerpc used zlib framing), and decompressed size is capped;
* malformed request headers fail only that stream (`BadRequestHeaders`);
* the connection window is a bound we choose, not purerpc's fixed 1 GiB;
* the client keeps `grpc-status-details-bin` (purerpc drops every grpc-* trailer).

And short paths for what every call does, each giving what h2, hpack and purerpc give on their
general paths (tests/test_rpc_fast_paths.py): header blocks that repeat are decoded once per
state of the HPACK table and fixed header pairs encoded once per state; a request's headers are
turned into text and parsed once per distinct header list; frames are read without copying the
buffer after each; a response's HEADERS and DATA frames are built here instead of through h2's
frame objects. Together they halve the protocol work of a unary call.

These touch purerpc internals, so the exact versions are pinned and checked here.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from typing import Any

import h2
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.stream
import hpack
import hpack.table
import hyperframe.exceptions
import hyperframe.frame
import purerpc
from h2.utilities import is_informational_response
from hpack import NeverIndexedHeaderTuple
from hpack.hpack import encode_integer
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived, RequestReceived, ResponseEnded, ResponseReceived
from purerpc.grpclib.exceptions import MessageTooLargeError, ProtocolError, UnsupportedMessageEncodingError
from purerpc.grpclib.headers import HeaderDict, b64decode
from purerpc.grpclib.status import StatusCode

if purerpc.__version__ != "0.8.0" or not h2.__version__.startswith("3."):
    raise ImportError(
        f"aria_trio.rpc is written against purerpc 0.8.0 and h2 3.x internals; found purerpc "
        f"{purerpc.__version__} and h2 {h2.__version__} (reinstall with the pinned versions)"
    )

# Encodings a request may use. Responses are never compressed.
ACCEPT_ENCODING = "identity,deflate,gzip"
SUPPORTED_ENCODINGS = frozenset({None, "identity", "deflate", "gzip"})


@dataclasses.dataclass
class StreamReset:
    """The peer sent RST_STREAM: it no longer wants the call."""

    stream_id: int
    error_code: int


@dataclasses.dataclass
class StreamFailed:
    """A message of this stream could not be read; only this call fails."""

    stream_id: int
    code: StatusCode
    message: str


@dataclasses.dataclass
class BadRequestHeaders:
    """The request headers are not a valid gRPC request; only this stream is refused."""

    stream_id: int
    reason: str


class _MessageReadBuffer(MessageReadBuffer):  # type: ignore[misc]
    def decompress(self, data: bytes) -> bytes:
        encoding = self._message_encoding
        if encoding not in ("gzip", "deflate"):
            raise UnsupportedMessageEncodingError(f"unsupported message encoding: {encoding}")
        # gzip is RFC 1952 (wbits=31); "deflate" in gRPC is the zlib format (wbits=15).
        d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        limit = self._max_message_length
        out = d.decompress(data, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise MessageTooLargeError(f"decompressed message larger than the maximum of {limit} bytes")
        return out


def _read_failure(exc: Exception) -> tuple[StatusCode, str]:
    if isinstance(exc, MessageTooLargeError):
        return StatusCode.RESOURCE_EXHAUSTED, str(exc).replace("Received message", "message")
    if isinstance(exc, UnsupportedMessageEncodingError):
        return StatusCode.UNIMPLEMENTED, str(exc)
    return StatusCode.INTERNAL, "could not decompress the request message"


class _VersionedHeaderTable(hpack.table.HeaderTable):  # type: ignore[misc]
    """A header table that counts its changes: a header block coded against one state of the table
    means the same thing for as long as that state lasts, so its coding can be reused."""

    def __init__(self) -> None:
        self.version = 0
        super().__init__()

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return int(self._maxsize)

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        hpack.table.HeaderTable.maxsize.fset(self, newmax)


class _IndexedHeaderTable(_VersionedHeaderTable):
    """hpack 3 (the series h2 3 needs) finds a header by scanning all 61 static entries, for
    every header of every message: about half of a unary call's CPU. Same answers, from dicts."""

    _STATIC_EXACT: dict[tuple[bytes, bytes], int] = {}
    _STATIC_NAME: dict[bytes, int] = {}
    for _i, (_n, _v) in enumerate(hpack.table.HeaderTable.STATIC_TABLE, start=1):
        _STATIC_EXACT.setdefault((_n, _v), _i)
        _STATIC_NAME.setdefault(_n, _i)
    del _i, _n, _v

    def search(self, name: bytes, value: bytes) -> tuple[int, bytes, bytes | None] | None:
        index = self._STATIC_EXACT.get((name, value))
        if index is not None:
            return index, name, value
        index = self._STATIC_NAME.get(name)
        partial = None if index is None else (index, name, None)
        offset = hpack.table.HeaderTable.STATIC_TABLE_LENGTH + 1
        for i, (n, v) in enumerate(self.dynamic_entries):
            if n == name:
                if v == value:
                    return i + offset, n, v
                if partial is None:
                    partial = (i + offset, n, None)
        return partial


class _PlainEncoder(hpack.Encoder):  # type: ignore[misc]
    """hpack's encoder, made cheap for the headers every call sends alike.

    Values go out as literals, not Huffman-coded: hpack's pure-Python Huffman coder costs more per
    call than the bytes it saves are worth on a Unix socket. And the coding of a plain (name,
    value) pair is kept while the dynamic table stays as it is: `:status 200`, the content type and
    `grpc-status 0` then cost a dict lookup each. Sensitive headers (NeverIndexedHeaderTuple: the
    request id, messages, details) differ per call and are always coded afresh."""

    # At the cap the cache starts over; a server sends a handful of fixed pairs, and a long value
    # (custom metadata) is coded every time: at most 64 x 256 bytes per connection.
    CACHE_HEADERS = 64
    CACHE_HEADER_BYTES = 256

    def __init__(self) -> None:
        super().__init__()
        self.header_table = _IndexedHeaderTable()
        self._cache: dict[tuple[Any, Any], bytes] = {}
        self._cache_version = 0

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        table = self.header_table
        if table.resized or isinstance(headers, dict):
            self._cache.clear()
            encoded: bytes = super().encode(headers, huffman=False)
            self._cache_version = table.version
            return encoded
        cache = self._cache
        if table.version != self._cache_version:
            cache.clear()
            self._cache_version = table.version
        parts = []
        for header in headers:
            if type(header) is NeverIndexedHeaderTuple:
                parts.append(_never_indexed(header))
                continue
            plain = type(header) is tuple and len(header) == 2
            if plain and (hit := cache.get(header)) is not None:
                parts.append(hit)
                continue
            before = table.version
            encoded = super().encode((header,), huffman=False)
            if table.version != before:  # the pair went into the table: every index moved
                cache.clear()
                self._cache_version = table.version
            elif plain and len(encoded) <= self.CACHE_HEADER_BYTES:
                if len(cache) >= self.CACHE_HEADERS:
                    cache.clear()
                cache[header] = encoded
            parts.append(encoded)
        return b"".join(parts)


def _never_indexed(header: Any) -> bytes:
    """RFC 7541 6.2.3, the name as a literal too (always valid, whatever the table holds): what
    hpack would send for a sensitive header, without its general path."""
    name, value = (x.encode() if isinstance(x, str) else bytes(x) for x in header)
    return b"".join((b"\x10", encode_integer(len(name), 7), name, encode_integer(len(value), 7), value))


class _CachingDecoder(hpack.Decoder):  # type: ignore[misc]
    """hpack's decoder, remembering the header blocks that left the dynamic table as it was.

    Once a client's headers are in the table, it sends the same few bytes of indexes on every
    call of a method; while the table (and the header list limit) stays the same, the same bytes
    decode to the same headers, so they are looked up instead of decoded again."""

    # At the cap the cache starts over; larger blocks are decoded every time. Each kept block
    # decodes to at most the header list limit (8 KiB as purerpc sets it): ~150 KiB per connection
    # at worst, a few hundred bytes in practice (a client sends one block per method it calls).
    CACHE_BLOCKS = 16
    CACHE_BLOCK_BYTES = 1024

    def __init__(self) -> None:
        super().__init__()
        self.header_table = _VersionedHeaderTable()
        self._cache: dict[tuple[bytes, bool], tuple[Any, ...]] = {}
        self._cache_state: tuple[int, int] = (0, 0)

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        state = (self.header_table.version, self.max_header_list_size)
        if state != self._cache_state:
            self._cache.clear()
            self._cache_state = state
        key = (bytes(data), raw)
        hit = self._cache.get(key)
        if hit is not None:
            return list(hit)
        headers: list[Any] = super().decode(data, raw)
        if self.header_table.version == state[0] and len(key[0]) <= self.CACHE_BLOCK_BYTES:
            if len(self._cache) >= self.CACHE_BLOCKS:
                self._cache.clear()
            self._cache[key] = tuple(headers)
        return headers


_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9  # HTTP/2 frame types (RFC 9113 6)
_END_STREAM, _END_HEADERS = 0x1, 0x4  # and flags
_FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits, as 16 + 8), type, flags, stream id


def _frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


class _FrameBuffer(h2.frame_buffer.FrameBuffer):  # type: ignore[misc]
    """h2's frame reader, with the frame header read by one struct call, a frame's body parsed
    from a view instead of a copy, and consumed frames skipped by an offset: h2 copied the rest
    of the buffer after every frame (a 256 KiB read of 16 KiB frames copied about 2 MiB). An
    oversized frame is refused as soon as its header is in, not after its body."""

    data: bytes

    def __init__(self, server: bool = False) -> None:
        super().__init__(server)
        self._pos = 0

    def add_data(self, data: bytes) -> None:
        if self._pos:
            self.data = self.data[self._pos :]
            self._pos = 0
        super().add_data(data)

    def next(self) -> Any:
        while True:
            data, pos = self.data, self._pos
            if len(data) - pos < 9:
                raise StopIteration
            high, low, kind, flag_byte, stream_id = _FRAME_HEADER.unpack_from(data, pos)
            length = (high << 8) + low
            stream_id &= 0x7FFFFFFF
            frame_class = hyperframe.frame.FRAMES.get(kind)
            try:
                if frame_class is None:
                    frame = hyperframe.frame.ExtensionFrame(type=kind, stream_id=stream_id)
                else:
                    frame = frame_class(stream_id)
            except ValueError as exc:  # a stream id the frame type cannot have
                raise h2.exceptions.ProtocolError(f"Invalid frame header received: {exc}") from None
            self._validate_frame_length(length)
            end = pos + 9 + length
            if len(data) < end:
                raise StopIteration
            frame.parse_flags(flag_byte)
            try:
                frame.parse_body(memoryview(data)[pos + 9 : end])
            except hyperframe.exceptions.InvalidFrameError:
                raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from None
            self._pos = end
            frame = self._update_header_buffer(frame)
            if frame is not None:  # else the middle of a header block, or a frame to skip
                return frame


class _GracefulH2Connection(h2.connection.H2Connection):  # type: ignore[misc]
    """h2 3.x with two fixes to its reading of the peer's frames (h2 4 is not supported by
    purerpc), a faster frame reader, and a short path for the frames a response is made of."""

    # How many closed streams h2 remembers (to tell a late frame on a stream it reset from a
    # protocol error). h2's 65,536 is ~7 MiB per long-lived connection, reached after as many
    # calls (the soak benchmark saw the runtime grow by it); frames still in flight concern only
    # the last few streams. A frame on one forgotten is answered RST_STREAM(STREAM_CLOSED).
    MAX_CLOSED_STREAMS = 1024

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.incoming_buffer = _FrameBuffer(server=not config.client_side)

    # The two methods that send a unary call's response, without h2's frame objects: the same
    # checks and state changes, then the frame bytes built here. Anything unusual (a stream h2
    # does not hold, padding, priority, informational headers) takes h2's own path.

    def send_headers(
        self,
        stream_id: int,
        headers: Any,
        end_stream: bool = False,
        priority_weight: Any = None,
        priority_depends_on: Any = None,
        priority_exclusive: Any = None,
    ) -> None:
        stream = self.streams.get(stream_id)
        if (
            stream is None
            or self.config.client_side
            or priority_weight is not None
            or priority_depends_on is not None
            or priority_exclusive is not None
            or (headers and headers[0][0] in (":status", b":status") and is_informational_response(headers))
        ):
            super().send_headers(
                stream_id, headers, end_stream, priority_weight, priority_depends_on, priority_exclusive
            )
            return
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        stream.state_machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
        block = self.encoder.encode(headers)
        flags = _END_HEADERS
        if end_stream:
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            flags |= _END_STREAM
        elif stream.state_machine.trailers_sent:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        limit = self.max_outbound_frame_size
        if len(block) <= limit:
            self._data_to_send += _frame_header(len(block), _HEADERS, flags, stream_id) + block
            return
        # Larger than a frame: HEADERS, then CONTINUATION frames, END_HEADERS on the last one.
        chunks = [block[i : i + limit] for i in range(0, len(block), limit)]
        for n, chunk in enumerate(chunks):
            kind = _HEADERS if n == 0 else _CONTINUATION
            bits = (flags & _END_STREAM if n == 0 else 0) | (_END_HEADERS if n == len(chunks) - 1 else 0)
            self._data_to_send += _frame_header(len(chunk), kind, bits, stream_id) + chunk

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False, pad_length: Any = None) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or pad_length is not None:
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        size = len(data)
        window = min(self.outbound_flow_control_window, stream.outbound_flow_control_window)
        if size > window:
            raise h2.exceptions.FlowControlError(f"Cannot send {size} bytes, flow control window is {window}.")
        if size > self.max_outbound_frame_size:
            raise h2.exceptions.FrameTooLargeError(
                f"Cannot send frame size {size}, max frame size is {self.max_outbound_frame_size}"
            )
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
        stream.state_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
        flags = 0
        if end_stream:
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            flags = _END_STREAM
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._data_to_send += _frame_header(size, _DATA, flags, stream_id) + data

    def _receive_window_update_frame(self, frame: Any) -> Any:
        # RFC 9113 6.9: a WINDOW_UPDATE may arrive for a stream that is already closed, and must
        # not be treated as an error. h2 3.x raises once it has forgotten the stream, which
        # killed the connection as soon as calls overlapped.
        try:
            return super()._receive_window_update_frame(frame)
        except h2.exceptions.StreamClosedError:
            return [], []

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> Any:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _GrpcStream
        return stream

    def _receive_goaway_frame(self, frame: Any) -> Any:
        # h2 3.x treats any GOAWAY it receives as the end: it closes its state machine and throws
        # away our queued frames, so calls still in flight cannot finish. A GOAWAY with NO_ERROR
        # only means "no new streams": report it and let both sides finish what they started.
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class _GrpcStream(h2.stream.H2Stream):  # type: ignore[misc]
    """h2's stream, without its content-length check: gRPC frames its messages itself and sends
    no content-length; in h2 3.x a bad one (`-5`, `x`) was an error of the whole connection, which
    one caller's malformed request must not be (RFC 9113 makes it a stream error at most)."""

    def _initialize_content_length(self, headers: Any) -> None:
        self._expected_content_length = None


@dataclasses.dataclass
class GoAway:
    """The peer will take no stream above `last_stream_id`."""

    last_stream_id: int
    error_code: int


class _Connection(GRPCConnection):  # type: ignore[misc]
    """Behaviour shared by both ends."""

    def __init__(self, config: GRPCConfiguration, *, max_concurrent_streams: int, connection_window: int):
        # purerpc reads MAX_CONCURRENT_STREAMS from the class while building its settings.
        self.MAX_CONCURRENT_STREAMS = max_concurrent_streams
        self._connection_window = connection_window
        self._handlers: dict[type, Any] = {}
        self.settings_seen = False  # the peer's first SETTINGS came: its handshake is done
        super().__init__(config)
        self.h2_connection = _GracefulH2Connection(
            h2.config.H2Configuration(
                client_side=config.client_side,
                # Received headers stay bytes: the server turns a request's headers into text once
                # per distinct header list (ServerConnection), not once per call.
                header_encoding=None,
                # Its one job is joining cookie headers, which gRPC has none of.
                normalize_inbound_headers=False,
                # The headers we send are built here, lower-case and well-formed (custom metadata
                # passes purerpc's sanitize_headers): checking them again is wasted work.
                validate_outbound_headers=False,
                # h2's generic HTTP checks of received headers cost about a tenth of a unary call.
                # What gRPC needs of them (method, scheme, path, te, content-type, timeout) purerpc
                # checks when it parses the request, and any header block it cannot parse fails
                # that stream alone (BadRequestHeaders); framing and HPACK are still fully checked.
                validate_inbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2_connection.encoder = _PlainEncoder()
        decoder = _CachingDecoder()
        decoder.max_header_list_size = self.h2_connection.decoder.max_header_list_size
        self.h2_connection.decoder = decoder
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()

    def receive_data(self, data: bytes) -> list[Any]:
        """purerpc's, with a lookup by event type instead of a chain of isinstance per event."""
        out: list[Any] = []
        handlers = self._handlers
        for event in self.h2_connection.receive_data(data):
            kind = type(event)
            handler = handlers.get(kind) if kind in handlers else self._handler_for(kind)
            if handler is not None:
                out.extend(handler(event))
        return out

    def _handler_for(self, kind: type) -> Any:
        """The handler purerpc's isinstance chain picks for events of this type, remembered."""
        ev = h2.events
        chain = (
            (ev.RequestReceived, self._request_received),
            (ev.ResponseReceived, self._response_received),
            (ev.TrailersReceived, self._trailers_received),
            (ev.InformationalResponseReceived, self._informational_response_received),
            (ev.DataReceived, self._data_received),
            (ev.WindowUpdated, self._window_updated),
            (ev.RemoteSettingsChanged, self._remote_settings_changed),
            (ev.PingAcknowledged, self._ping_acknowledged),
            (ev.StreamEnded, self._stream_ended),
            (ev.StreamReset, self._stream_reset),
            (ev.PushedStreamReceived, self._push_stream_received),
            (ev.SettingsAcknowledged, self._settings_acknowledged),
            (ev.PriorityUpdated, self._priority_updated),
            (ev.ConnectionTerminated, self._connection_terminated),
            (ev.AlternativeServiceAvailable, self._alternative_service_available),
            (ev.UnknownFrameReceived, self._unknown_frame_received),
        )
        handler = next((method for base, method in chain if issubclass(kind, base)), None)
        self._handlers[kind] = handler  # bounded by h2's event classes
        return handler

    def _remote_settings_changed(self, event: h2.events.RemoteSettingsChanged) -> list[Any]:
        self.settings_seen = True
        return super()._remote_settings_changed(event)  # type: ignore[no-any-return]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[Any]:
        return [GoAway(event.last_stream_id or 0, int(event.error_code or 0))]

    def initiate_connection(self) -> None:
        self.h2_connection.initiate_connection()
        # h2's default connection window is 64 KiB; the per-stream windows are 2x the largest
        # message. Credit comes back only as handlers consume messages, so this bounds what one
        # connection can make us buffer in all.
        extra = self._connection_window - self.h2_connection.inbound_flow_control_window
        if extra > 0:
            self.h2_connection.increment_flow_control_window(extra)

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [StreamReset(event.stream_id, int(event.error_code or 0))]

    def _data_received(self, event: h2.events.DataReceived) -> list[Any]:
        sid = event.stream_id
        buffer = self.message_read_buffers.get(sid)
        if buffer is None:
            # The call is already finished here: drop the data but return its credit.
            self.h2_connection.acknowledge_received_data(event.flow_controlled_length, sid)
            return []
        try:
            buffer.data_received(event.data, event.flow_controlled_length)
            messages = buffer.read_all_complete_messages_flowcontrol()
        except (ProtocolError, zlib.error) as exc:
            del self.message_read_buffers[sid]
            self.h2_connection.acknowledge_received_data(event.flow_controlled_length, sid)
            return [StreamFailed(sid, *_read_failure(exc))]
        return [MessageReceived(sid, data, length) for data, length in messages]


class ServerConnection(_Connection):
    # A client sends the same header list for every call of a method (deadlines and metadata
    # aside): its parse is kept, keyed by the headers as received, and copied for each stream.
    REQUEST_CACHE = 16  # header lists; at the cap the cache starts over
    REQUEST_CACHE_BYTES = 1024  # longer header lists are parsed every time (so: < 40 KiB kept)

    def __init__(self, config: GRPCConfiguration, *, max_concurrent_streams: int, connection_window: int):
        super().__init__(config, max_concurrent_streams=max_concurrent_streams, connection_window=connection_window)
        self._requests: dict[tuple[Any, ...], RequestReceived] = {}

    def _request_received(self, event: h2.events.RequestReceived) -> list[Any]:
        sid = event.stream_id
        if event.stream_ended:
            return [BadRequestHeaders(sid, "request ended before any message was sent")]
        key = tuple(event.headers)
        parsed = self._requests.get(key)
        if parsed is None:
            try:
                parsed = RequestReceived.parse_from_stream_id_and_headers_destructive(0, HeaderDict(_text(key)))
            except Exception as exc:  # e.g. a repeated :path arrives as a list: refuse the stream
                return [BadRequestHeaders(sid, str(exc) or type(exc).__name__)]
            if sum(len(name) + len(value) for name, value in key) <= self.REQUEST_CACHE_BYTES:
                if len(self._requests) >= self.REQUEST_CACHE:
                    self._requests.clear()
                self._requests[key] = parsed
        request = RequestReceived.__new__(RequestReceived)
        request.__dict__.update(parsed.__dict__)  # its values are strings, tuples and a timedelta
        request.stream_id = sid
        self.message_read_buffers[sid] = _MessageReadBuffer(request.message_encoding, self.config.max_message_length)
        return [request]


class ClientConnection(_Connection):
    def _response_received(self, event: h2.events.ResponseReceived) -> list[Any]:
        try:
            headers = HeaderDict(_text(event.headers))
            details = headers.pop("grpc-status-details-bin", None)
            received = ResponseReceived.parse_from_stream_id_and_headers_destructive(event.stream_id, headers)
            if not event.stream_ended:
                self.message_read_buffers[event.stream_id] = _MessageReadBuffer(
                    received.message_encoding, self.config.max_message_length
                )
                return [received]
            # Trailers-Only: the status and the custom trailers came in the one HEADERS frame.
            ended = ResponseEnded.parse_from_stream_id_and_headers_destructive(event.stream_id, headers)
        except (ProtocolError, KeyError, ValueError) as exc:
            return [StreamFailed(event.stream_id, StatusCode.INTERNAL, f"malformed response headers: {exc}")]
        ended.custom_metadata = received.custom_metadata + ended.custom_metadata
        ended.status_details_bin = _details(details)
        return [received, ended]

    def _trailers_received(self, event: h2.events.TrailersReceived) -> list[Any]:
        try:
            headers = HeaderDict(_text(event.headers))
            details = headers.pop("grpc-status-details-bin", None)
            ended = ResponseEnded.parse_from_stream_id_and_headers_destructive(event.stream_id, headers)
        except (ProtocolError, KeyError, ValueError) as exc:
            return [StreamFailed(event.stream_id, StatusCode.INTERNAL, f"malformed response trailers: {exc}")]
        ended.status_details_bin = _details(details)
        return [ended]


def _text(headers: Any) -> list[tuple[str, str]]:
    """Received headers (bytes, as h2 hands them over) as text; UnicodeDecodeError if not UTF-8."""
    return [(name.decode(), value.decode()) for name, value in headers]


def _details(raw: Any) -> bytes | None:
    return b64decode(raw) if isinstance(raw, str) else None
