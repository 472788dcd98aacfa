"""purerpc's sans-io gRPC protocol engine, made safe for a long-running daemon.

purerpc 0.8.0 splits into a protocol layer (`grpclib.connection.GRPCConnection`: HTTP/2 through
h2, gRPC framing, headers) and an anyio socket layer (`GRPCSocket`, `ConnectionHandler`). We keep
the protocol layer and drive it from our own Trio loops (server.py, client.py), so none of the
socket layer's defects (see research/purerpc.md) apply. This module holds the protocol engine of
each end (`ServerConnection`, `ClientConnection`) and the events it adds to purerpc's; the
subclasses here fix the protocol layer's remaining defects without monkeypatching:

* a peer's RST_STREAM becomes a `StreamReset` event (purerpc drops it);
* an oversized, badly compressed or undecodable message fails only its own call
  (`StreamFailed`) instead of killing the connection, and its flow-control credit is returned;
* DATA for a call we already finished is acknowledged and dropped instead of raising KeyError;
* gzip is decoded as gzip (purerpc used zlib framing), and decompressed size is capped;
* malformed request headers fail only that stream (`BadRequestHeaders`);
* the connection window is a bound we choose, not purerpc's fixed 1 GiB;
* the client keeps `grpc-status-details-bin` (purerpc drops every grpc-* trailer).

Below it, each connection runs h2 with its own fixes (http2.py), a frame reader and writer that
do not copy (frames.py), and HPACK coders that remember what repeats (hpack.py). Together with the
short paths here (an event goes to its handler by one dict lookup; a request's headers are turned
into text and parsed once per distinct header list) they halve the protocol work of a unary call,
each giving what h2, hpack and purerpc give on their general paths (tests/test_rpc_fast_paths.py).

All of these touch purerpc and h2 internals, so the exact versions are pinned and checked here
(every import of aria_trio.rpc goes through this module: client.py and server.py import it).
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import TypeAlias

import h2
import h2.config
import h2.events
import purerpc
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import Event as PurerpcEvent
from purerpc.grpclib.events import MessageReceived, RequestReceived, ResponseEnded, ResponseReceived
from purerpc.grpclib.exceptions import MessageTooLargeError, ProtocolError, UnsupportedMessageEncodingError
from purerpc.grpclib.headers import HeaderDict, b64decode
from purerpc.grpclib.status import StatusCode

from aria_trio.rpc.hpack import CachingDecoder, PlainEncoder
from aria_trio.rpc.http2 import GracefulH2Connection

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


@dataclasses.dataclass
class GoAway:
    """The peer will take no stream above `last_stream_id`."""

    last_stream_id: int
    error_code: int


# What the protocol engine hands its loop: purerpc's events and ours.
Event: TypeAlias = PurerpcEvent | StreamReset | StreamFailed | BadRequestHeaders | GoAway
Handler: TypeAlias = Callable[[h2.events.Event], list[Event]]  # purerpc's handler of one type of h2 event


class _MessageReadBuffer(MessageReadBuffer):  # type: ignore[misc]
    """A stream's gRPC messages (gRPC's framing: a flag byte, a 4-byte length, the message) out
    of its DATA payloads, which come as views of the frames as read (frames.py).

    Each message is copied once, when its last byte is in (purerpc copied each payload into a
    deque, then sliced and joined it again per message). Bounds: a message whose declared length
    is above the maximum fails its stream as soon as its 5-byte prefix is in (nothing of it is
    kept); a compressed one fails when it inflates past the maximum. What waits here is at most
    one message's worth of views (and the reads they belong to, at most 4x their size: a smaller
    piece is copied), which the stream's window bounds.

    A message's flow-controlled length is its 5 + length bytes plus the padding of the frames
    that carried it (credited with the message in progress), so acknowledging every message
    returns every byte of credit, as purerpc's buffer did."""

    def __init__(self, message_encoding: str | None = None, max_message_length: int = 4 * 1024 * 1024) -> None:
        super().__init__(message_encoding, max_message_length)
        self._parts: list[memoryview | bytes] = []  # the pieces of what is being read: a prefix, or a message
        self._have = 0  # their bytes
        self._need = 5  # the bytes of what is being read: 5 for a prefix, else the message's length
        self._in_message = False  # reading a message (its prefix is in)
        self._credit = 0  # flow-controlled bytes of the message in progress, so far

    def data_received(self, data: bytes | memoryview, flow_controlled_length: int | None = None) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        size = len(view)
        credit = size if flow_controlled_length is None else flow_controlled_length
        self._credit += credit - size  # the frame's padding, if any
        pos = 0
        while pos < size or (self._in_message and self._need == 0):
            take = min(self._need - self._have, size - pos)
            if take:
                self._parts.append(view[pos : pos + take])
                self._have += take
                self._credit += take
                pos += take
            if self._have < self._need:
                last = self._parts[-1] if self._parts else None
                if isinstance(last, memoryview) and 4 * len(last) < len(last.obj):  # type: ignore[arg-type]
                    # A small piece waiting for the rest of its message would pin its whole read
                    # (a 256 KiB read for a 5-byte prefix, on each of 1024 streams): copied, so
                    # what waits pins at most 4x its own size, which the windows bound.
                    self._parts[-1] = last.tobytes()
                return
            parts, self._parts, self._have = self._parts, [], 0
            if not self._in_message:
                prefix = parts[0] if len(parts) == 1 else b"".join(parts)
                self._compressed_flag, length = struct.unpack(">?I", prefix)
                if length > self._max_message_length:
                    raise MessageTooLargeError(
                        f"Received message larger than max: {length} > {self._max_message_length}"
                    )
                self._in_message, self._need = True, length
                continue
            message = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
            if self._compressed_flag:
                message = self.decompress(message)
            self._messages.append((message, self._credit))
            self._in_message, self._need, self._credit = False, 5, 0

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


class _Connection(GRPCConnection):  # type: ignore[misc]
    """Behaviour shared by both ends."""

    def __init__(self, config: GRPCConfiguration, *, max_concurrent_streams: int, connection_window: int):
        # purerpc reads MAX_CONCURRENT_STREAMS from the class while building its settings.
        self.MAX_CONCURRENT_STREAMS = max_concurrent_streams
        self._connection_window = connection_window
        self._handlers: dict[type[h2.events.Event], Handler | None] = {}
        self.settings_seen = False  # the peer's first SETTINGS came: its handshake is done
        super().__init__(config)
        self.h2_connection: GracefulH2Connection = GracefulH2Connection(
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
        self.h2_connection.encoder = PlainEncoder()
        decoder = CachingDecoder()
        decoder.max_header_list_size = self.h2_connection.decoder.max_header_list_size
        self.h2_connection.decoder = decoder
        self.h2_connection.clear_outbound_data_buffer()
        self._set_h2_connection_local_settings()

    def receive_data(self, data: bytes) -> list[Event]:
        """purerpc's, with a lookup by event type instead of a chain of isinstance per event."""
        out: list[Event] = []
        handlers = self._handlers
        for event in self.h2_connection.receive_data(data):
            kind = type(event)
            handler = handlers.get(kind) if kind in handlers else self._handler_for(kind)
            if handler is not None:
                out.extend(handler(event))
        return out

    def _handler_for(self, kind: type[h2.events.Event]) -> Handler | None:
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

    def _remote_settings_changed(self, event: h2.events.RemoteSettingsChanged) -> list[Event]:
        self.settings_seen = True
        return super()._remote_settings_changed(event)  # type: ignore[no-any-return]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[Event]:
        return [GoAway(event.last_stream_id or 0, int(event.error_code or 0))]

    def initiate_connection(self) -> None:
        self.h2_connection.initiate_connection()
        # h2's default connection window is 64 KiB; the per-stream windows are 2x the largest
        # message. Credit comes back only as handlers consume messages, so this bounds what one
        # connection can make us buffer in all.
        extra = self._connection_window - self.h2_connection.inbound_flow_control_window
        if extra > 0:
            self.h2_connection.increment_flow_control_window(extra)

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Event]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [StreamReset(event.stream_id, int(event.error_code or 0))]

    def _data_received(self, event: h2.events.DataReceived) -> list[Event]:
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
    """The server's end: a request's headers parsed once per header list, and refused alone if bad."""

    # A client sends the same header list for every call of a method (deadlines and metadata
    # aside): its parse is kept, keyed by the headers as received, and copied for each stream.
    REQUEST_CACHE = 16  # header lists; at the cap the cache starts over
    REQUEST_CACHE_BYTES = 1024  # longer header lists are parsed every time (so: < 40 KiB kept)

    def __init__(self, config: GRPCConfiguration, *, max_concurrent_streams: int, connection_window: int):
        super().__init__(config, max_concurrent_streams=max_concurrent_streams, connection_window=connection_window)
        self._requests: dict[tuple[tuple[bytes, bytes], ...], RequestReceived] = {}

    def _request_received(self, event: h2.events.RequestReceived) -> list[Event]:
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
    """The client's end: the status details kept, and a Trailers-Only response's trailers too."""

    def _response_received(self, event: h2.events.ResponseReceived) -> list[Event]:
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

    def _trailers_received(self, event: h2.events.TrailersReceived) -> list[Event]:
        try:
            headers = HeaderDict(_text(event.headers))
            details = headers.pop("grpc-status-details-bin", None)
            ended = ResponseEnded.parse_from_stream_id_and_headers_destructive(event.stream_id, headers)
        except (ProtocolError, KeyError, ValueError) as exc:
            return [StreamFailed(event.stream_id, StatusCode.INTERNAL, f"malformed response trailers: {exc}")]
        ended.status_details_bin = _details(details)
        return [ended]


def _text(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Received headers (bytes, as h2 hands them over) as text; UnicodeDecodeError if not UTF-8."""
    return [(name.decode(), value.decode()) for name, value in headers]


def _details(raw: object) -> bytes | None:
    return b64decode(raw) if isinstance(raw, str) else None
