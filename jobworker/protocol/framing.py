"""
Splitting a byte stream into frames, with the size limit checked first.
"""

from __future__ import annotations

import mmap

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.protocol.wire import HEADER_SIZE

__all__ = ["FrameBuffer", "LARGE_FRAME"]

# An incomplete frame announcing more than this many bytes is received into
# a buffer of its own, mapped from the kernel (see FrameBuffer).  Only start
# requests with large commands and list responses come near it; 256 KiB is
# above every other message and above the 64 KiB output frames.
LARGE_FRAME = 256 << 10


class FrameBuffer:
    """
    Accumulate received bytes and hand out complete frames.

    Memory is bounded by C{max_frame_size} plus one read: the length prefix
    is checked against the maximum as soon as its four bytes are here, before
    any of the body is kept, so a peer announcing a 4 GiB frame is refused
    without our allocating it (the same rule as h2's frame buffer).

    Only what has arrived is held.  A large incomplete frame (above
    L{LARGE_FRAME}) goes into an anonymous memory map of its announced size:
    its pages are only made resident as the bytes arrive, and unmapped, back
    to the kernel, as soon as the frame is complete or the buffer dropped.
    A growing C{bytearray} would serve too, but the allocator keeps what it
    frees in its heap: dozens of hostile connections trickling 1 MiB frames
    would leave the server that much larger after they had gone.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        # The large frame being received: its map, its size (header
        # included) and how many of its bytes have arrived.
        self._large: mmap.mmap | None = None
        self._large_size = 0
        self._large_filled = 0

    def __len__(self) -> int:
        if self._large is not None:
            return self._large_filled
        return len(self._buffer)

    def close(self) -> None:
        """
        Drop what is buffered (the connection has ended).
        """
        self._buffer = bytearray()
        if self._large is not None:
            self._large.close()
            self._large = None

    def receive(self, data: bytes | memoryview) -> list[tuple[int, bytes | memoryview]]:
        """
        Add C{data}; return every frame now complete as (type, body) pairs.

        A body may be a view of C{data}: it is valid until C{data} changes
        (the caller decodes it at once; a reused receive buffer stays put
        until then).  Only the bytes of an incomplete frame are kept, so a
        read that ends on a frame boundary is never copied here at all.

        @raise ProtocolError: a frame's length is 0 or above the maximum.
        """
        if self._large is not None:
            return self._receive_large(data)
        if self._buffer:
            # The start of a frame is waiting: complete it in our buffer.
            self._buffer += data
            with memoryview(self._buffer) as view:
                frames, position = self._split(view, copy=True)
            del self._buffer[:position]
            self._maybe_large()
            return frames
        view = data if isinstance(data, memoryview) else memoryview(data)
        frames, position = self._split(view, copy=False)
        if position < len(view):
            self._buffer += view[position:]
            self._maybe_large()
        return frames

    def _maybe_large(self) -> None:
        """
        Move an incomplete frame announcing more than L{LARGE_FRAME} bytes
        from the shared buffer into a map of its own.
        """
        if len(self._buffer) < HEADER_SIZE:
            return
        size = HEADER_SIZE + int.from_bytes(self._buffer[:HEADER_SIZE], "big")
        if size <= LARGE_FRAME or size <= len(self._buffer):
            return
        self._large = mmap.mmap(-1, size)
        self._large[: len(self._buffer)] = self._buffer
        self._large_size = size
        self._large_filled = len(self._buffer)
        self._buffer = bytearray()

    def _receive_large(self, data: bytes | memoryview) -> list[tuple[int, bytes | memoryview]]:
        large = self._large
        assert large is not None
        view = data if isinstance(data, memoryview) else memoryview(data)
        take = min(self._large_size - self._large_filled, len(view))
        large[self._large_filled : self._large_filled + take] = view[:take]
        self._large_filled += take
        if self._large_filled < self._large_size:
            return []
        frame = (large[HEADER_SIZE], large[HEADER_SIZE + 1 : self._large_size])  # a copy: the map goes now
        large.close()
        self._large = None
        rest = view[take:]
        return [frame, *self.receive(rest)] if len(rest) else [frame]

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
