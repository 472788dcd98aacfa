"""HTTP/2 for a long-running gRPC daemon: h2 3's connection and stream, fixed and made cheap.

purerpc 0.8.0 needs h2 3 (it does not support h2 4), whose reading of the peer's frames lets one
peer end or bloat a whole connection: a WINDOW_UPDATE for a stream already closed, a GOAWAY that
only means "no new streams" and a malformed content-length each killed the connection, and it
remembers 65,536 closed streams. And a unary call's response is two or three frames that h2
builds through hyperframe's objects. `GracefulH2Connection` and `GrpcStream` fix the first (each
fix says why); the second are built as bytes (frames.py) after h2's own checks and state changes,
and tests/test_rpc_fast_paths.py compares the result with h2's, frame by frame. The protocol
engine (protocol.py) runs one per connection, with hpack.py's coders.

These override h2 3 internals; the versions are pinned and checked in protocol.py, which every
import of aria_trio.rpc goes through.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream
import hyperframe.frame
from h2.utilities import is_informational_response

from aria_trio.rpc.frames import CONTINUATION, DATA, END_HEADERS, END_STREAM, HEADERS, FrameBuffer, frame_header
from aria_trio.rpc.hpack import Header

# What h2 returns for a frame it has read: the frames to send in answer, and the events.
Received: TypeAlias = tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]


class GracefulH2Connection(h2.connection.H2Connection):  # type: ignore[misc]
    """h2 3.x with two fixes to its reading of the peer's frames, a bound on what it remembers, a
    faster frame reader, and a short path for the frames a response is made of."""

    # How many closed streams h2 remembers (to tell a late frame on a stream it reset from a
    # protocol error). h2's 65,536 is ~7 MiB per long-lived connection, reached after as many
    # calls (the soak benchmark saw the runtime grow by it); frames still in flight concern only
    # the last few streams. A frame on one forgotten is answered RST_STREAM(STREAM_CLOSED).
    MAX_CLOSED_STREAMS = 1024
    _data_to_send: bytearray

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.incoming_buffer = FrameBuffer(server=not config.client_side)

    # The two methods that send a unary call's response, without h2's frame objects: the same
    # checks and state changes, then the frame bytes built here. Anything unusual (a stream h2
    # does not hold, padding, priority, informational headers) takes h2's own path.

    def send_headers(
        self,
        stream_id: int,
        headers: Sequence[Header],
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
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
        flags = END_HEADERS
        if end_stream:
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            flags |= END_STREAM
        elif stream.state_machine.trailers_sent:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        limit = self.max_outbound_frame_size
        if len(block) <= limit:
            self._data_to_send += frame_header(len(block), HEADERS, flags, stream_id) + block
            return
        # Larger than a frame: HEADERS, then CONTINUATION frames, END_HEADERS on the last one.
        chunks = [block[i : i + limit] for i in range(0, len(block), limit)]
        for n, chunk in enumerate(chunks):
            kind = HEADERS if n == 0 else CONTINUATION
            bits = (flags & END_STREAM if n == 0 else 0) | (END_HEADERS if n == len(chunks) - 1 else 0)
            self._data_to_send += frame_header(len(chunk), kind, bits, stream_id) + chunk

    def data_to_send(self, amount: int | None = None) -> bytes | bytearray:
        """All that is queued, without h2's copy of it into a bytes object: the buffer itself is
        handed over (the caller only sends it) and a fresh one starts."""
        if amount is not None:
            return super().data_to_send(amount)  # type: ignore[no-any-return]
        data = self._data_to_send
        self._data_to_send = bytearray()
        return data

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: int | None = None,
        *,
        prefix: bytes = b"",
    ) -> None:
        """A DATA frame of `prefix` then `data` (a gRPC message's 5-byte prefix and the message,
        without first joining them); `data` may be a view (of a message sent in several frames).
        Each is copied once, into the buffer of what is to send."""
        stream = self.streams.get(stream_id)
        if stream is None or pad_length is not None:
            super().send_data(stream_id, prefix + data if prefix else data, end_stream, pad_length)
            return
        size = len(prefix) + len(data)
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
            flags = END_STREAM
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._data_to_send += frame_header(size, DATA, flags, stream_id)
        if prefix:
            self._data_to_send += prefix
        self._data_to_send += data

    def _receive_window_update_frame(self, frame: hyperframe.frame.WindowUpdateFrame) -> Received:
        # RFC 9113 6.9: a WINDOW_UPDATE may arrive for a stream that is already closed, and must
        # not be treated as an error. h2 3.x raises once it has forgotten the stream, which
        # killed the connection as soon as calls overlapped.
        try:
            received: Received = super()._receive_window_update_frame(frame)
        except h2.exceptions.StreamClosedError:
            return [], []
        return received

    def _begin_new_stream(self, stream_id: int, allowed_ids: h2.connection.AllowedStreamIDs) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = GrpcStream
        return stream

    def _receive_goaway_frame(self, frame: hyperframe.frame.GoAwayFrame) -> Received:
        # h2 3.x treats any GOAWAY it receives as the end: it closes its state machine and throws
        # away our queued frames, so calls still in flight cannot finish. A GOAWAY with NO_ERROR
        # only means "no new streams": report it and let both sides finish what they started.
        if frame.error_code != 0:
            received: Received = super()._receive_goaway_frame(frame)
            return received
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class GrpcStream(h2.stream.H2Stream):  # type: ignore[misc]
    """h2's stream, without its content-length check: gRPC frames its messages itself and sends
    no content-length; in h2 3.x a bad one (`-5`, `x`) was an error of the whole connection, which
    one caller's malformed request must not be (RFC 9113 makes it a stream error at most)."""

    def _initialize_content_length(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self._expected_content_length = None
