"""
Splitting a byte stream into frames, with the size limit checked first.
"""

from __future__ import annotations

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.protocol.wire import HEADER_SIZE

__all__ = ["FrameBuffer"]


class FrameBuffer:
    """
    Accumulate received bytes and hand out complete frames.

    Memory is bounded by C{max_frame_size} plus one read: the length prefix
    is checked against the maximum as soon as its four bytes are here, before
    any of the body is kept, so a peer announcing a 4 GiB frame is refused
    without our allocating it (the same rule as h2's frame buffer).
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    def __len__(self) -> int:
        return len(self._buffer)

    def receive(self, data: bytes) -> list[tuple[int, bytes]]:
        """
        Add C{data}; return every frame now complete as (type, body) pairs.

        @raise ProtocolError: a frame's length is 0 or above the maximum.
        """
        buffer = self._buffer
        buffer += data
        frames = []
        position = 0
        end = len(buffer)
        while end - position >= HEADER_SIZE:
            length = int.from_bytes(buffer[position : position + HEADER_SIZE], "big")
            if length == 0:
                raise ProtocolError("frame of length 0 (it must hold a type byte)")
            if length > self.max_frame_size:
                raise ProtocolError(
                    f"frame of {length} bytes is larger than the maximum of {self.max_frame_size}",
                    ErrorCode.FRAME_TOO_LARGE,
                )
            frame_end = position + HEADER_SIZE + length
            if frame_end > end:
                break
            # One copy, straight from the buffer into the body's bytes.
            with memoryview(buffer) as view:
                body = bytes(view[position + HEADER_SIZE + 1 : frame_end])
            frames.append((buffer[position + HEADER_SIZE], body))
            position = frame_end
        if position:
            del buffer[:position]
        return frames
