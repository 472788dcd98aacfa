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
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8  # and flags
_FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits, as 16 + 8), type, flags, stream id


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """The 9 bytes that go before a frame's body."""
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


class FrameBuffer(h2.frame_buffer.FrameBuffer):  # type: ignore[misc]
    """h2's frame reader, with the frame header read by one struct call, a frame's body parsed
    from a view instead of a copy, and consumed frames skipped by an offset: h2 copied the rest
    of the buffer after every frame. An oversized frame is refused as soon as its header is in,
    not after its body.

    Reads that do not complete a frame wait in a list, and are joined once, when the frame they
    make is all in: h2 appended every read to the buffer (`data += read`), so a 400 KiB frame
    arriving in three reads was copied three times. A DATA frame's payload is not copied at all: it
    is a view of the bytes as read (`frame.data` is a memoryview), which the gRPC message buffer
    (protocol.py) copies once into its message. The views keep those reads alive until then, which
    the flow-control windows bound (per stream, 2x the largest message)."""

    data: bytes
    _preamble: bytes
    _preamble_len: int

    def __init__(self, server: bool = False) -> None:
        super().__init__(server)
        self._pos = 0
        self._parts: list[bytes] = []  # reads after `data`, not joined to it yet
        self._buffered = 0  # their bytes

    def add_data(self, data: bytes) -> None:
        if self._preamble_len:  # h2's check of the client's preface, on its first bytes only
            n = min(self._preamble_len, len(data))
            if self._preamble[:n] != data[:n]:
                raise h2.exceptions.ProtocolError("Invalid HTTP/2 preamble.")
            data = data[n:]
            self._preamble_len -= n
            self._preamble = self._preamble[n:]
        if data:
            if not isinstance(data, bytes):  # the views of DATA frames must not see it change
                data = bytes(data)
            self._parts.append(data)
            self._buffered += len(data)

    def _join(self, need: int) -> bool:
        """Make `data` hold at least `need` bytes from `_pos`, joining the reads waiting; False
        (and nothing copied) if there are not that many yet."""
        data, pos = self.data, self._pos
        have = len(data) - pos
        if have + self._buffered < need:
            return False
        if have == 0 and len(self._parts) == 1:
            self.data = self._parts[0]
        else:
            self.data = b"".join([memoryview(data)[pos:], *self._parts])
        self._pos = 0
        self._parts = []
        self._buffered = 0
        return True

    def next(self) -> hyperframe.frame.Frame:
        while True:
            data, pos = self.data, self._pos
            if len(data) - pos < 9:
                if not self._join(9):
                    raise StopIteration
                continue
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
                if not self._join(9 + length):
                    raise StopIteration
                continue
            frame.parse_flags(flag_byte)
            body = memoryview(data)[pos + 9 : end]
            if kind == DATA and not flag_byte & PADDED:
                frame.data = body  # hyperframe would copy it (`.tobytes()`)
                frame.body_len = length
            else:
                try:
                    frame.parse_body(body)
                except hyperframe.exceptions.InvalidFrameError:
                    raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from None
            self._pos = end
            frame = self._update_header_buffer(frame)
            if frame is not None:  # else the middle of a header block, or a frame to skip
                return frame
