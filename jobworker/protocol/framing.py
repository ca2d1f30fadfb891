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

    def receive(self, data: bytes | memoryview) -> list[tuple[int, bytes | memoryview]]:
        """
        Add C{data}; return every frame now complete as (type, body) pairs.

        A body may be a view of C{data}: it is valid until C{data} changes
        (the caller decodes it at once; a reused receive buffer stays put
        until then).  Only the bytes of an incomplete frame are kept, so a
        read that ends on a frame boundary is never copied here at all.

        @raise ProtocolError: a frame's length is 0 or above the maximum.
        """
        if self._buffer:
            # The start of a frame is waiting: complete it in our buffer.
            self._buffer += data
            with memoryview(self._buffer) as view:
                frames, position = self._split(view, copy=True)
            del self._buffer[:position]
            return frames
        view = data if isinstance(data, memoryview) else memoryview(data)
        frames, position = self._split(view, copy=False)
        if position < len(view):
            self._buffer += view[position:]
        return frames

    def _split(self, view: memoryview, copy: bool) -> tuple[list[tuple[int, bytes | memoryview]], int]:
        frames: list[tuple[int, bytes | memoryview]] = []
        position = 0
        end = len(view)
        while end - position >= HEADER_SIZE:
            length = int.from_bytes(view[position : position + HEADER_SIZE], "big")
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
            body = view[position + HEADER_SIZE + 1 : frame_end]
            # Our own buffer moves on after this call: its frames are copied.
            frames.append((view[position + HEADER_SIZE], bytes(body) if copy else body))
            position = frame_end
        return frames, position
