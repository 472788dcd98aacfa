"""HTTP/2 frames (RFC 9113 4, 6) as bytes: the reader of the peer's frames, and the header of ours.

h2 3 reads frames through hyperframe, copying the rest of its buffer after every frame it takes
(a 256 KiB read of 16 KiB frames copied about 2 MiB), and writes them through hyperframe's frame
objects. `FrameBuffer` reads the same frames without the copies (tests/test_rpc_fast_paths.py
checks it against h2's own reader); `frame_header` and the constants let http2.py write a
response's HEADERS and DATA frames as bytes.

`FrameBuffer` uses h2 3 internals (`_validate_frame_length`, `_update_header_buffer`); the
versions are pinned and checked in protocol.py, which every import of aria_trio.rpc goes through.
"""

from __future__ import annotations

import struct

import h2.exceptions
import h2.frame_buffer
import hyperframe.exceptions
import hyperframe.frame

DATA, HEADERS, CONTINUATION = 0x0, 0x1, 0x9  # frame types (RFC 9113 6)
END_STREAM, END_HEADERS = 0x1, 0x4  # and flags
_FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits, as 16 + 8), type, flags, stream id


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """The 9 bytes that go before a frame's body."""
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


class FrameBuffer(h2.frame_buffer.FrameBuffer):  # type: ignore[misc]
    """h2's frame reader, with the frame header read by one struct call, a frame's body parsed
    from a view instead of a copy, and consumed frames skipped by an offset: h2 copied the rest
    of the buffer after every frame. An oversized frame is refused as soon as its header is in,
    not after its body."""

    data: bytes

    def __init__(self, server: bool = False) -> None:
        super().__init__(server)
        self._pos = 0

    def add_data(self, data: bytes) -> None:
        if self._pos:
            self.data = self.data[self._pos :]
            self._pos = 0
        super().add_data(data)

    def next(self) -> hyperframe.frame.Frame:
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
