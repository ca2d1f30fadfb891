"""
The sans-IO state machine of one jobworker connection.

Design rules (the spec in C{protocol-spec/README.md} is normative):

 1. No I/O.  C{receive_data(bytes)} returns the messages that arrived;
    C{send(message)} returns the bytes to write.  The Twisted server, the
    Twisted client and the blocking CLI drive the same object.
 2. The server speaks first: its L{ServerHello} is the first frame on the
    connection.  The client sends L{ClientHello} only after reading it, and
    nothing else before its own hello.  Any other order is a
    L{ProtocolError}.
 3. Two tiers of errors.  Anything that makes the byte stream
    untrustworthy (malformed frame, oversized length, unknown type, a
    message in the wrong direction or the wrong state, a reused stream id,
    a window overflow) raises L{ProtocolError}: the owner sends C{GoAway}
    (see L{goaway}) and closes.  Everything about one request (unknown job,
    denied) is the application's to answer with an C{ErrorResponse}; the
    state machine only checks that request ids are not reused while pending.
 4. Every request gets exactly one response: a specific one, C{OkResponse},
    or C{ErrorResponse}.  A C{FollowRequest} is answered with C{OkResponse}
    when its stream opens; the stream then carries C{Output}/C{Gap} frames
    and ends with one C{EndOfStream}.
 5. Output is flow controlled per stream (L{jobworker.protocol.flow}); the
    server may not send more data on a stream than its window allows, and
    must split output to fit the client's maximum frame size.
 6. Requests are tracked one at a time as they are handed out.
    L{receive_data} decodes everything it is given at once; a server uses
    L{feed} and L{next_message} instead, so that a request is "pending"
    only from the moment its owner sees it: the server's pending-request
    cap then counts what it has dispatched and not answered, never the
    requests behind it in the same read (spec section 13).
 7. A status never fails to be sent for its size: a C{StatusResponse} or
    C{EndOfStream} whose status does not fit the peer's maximum frame goes
    out with the status abridged (L{m.abridge}).
 8. Versions: the server's hello names the highest version it speaks; the
    client answers with the highest version both speak (spec section 5.4),
    and every frame after the hellos is encoded and decoded in that
    version's layout.

Why it is one module of over 400 lines: it is one state machine,
L{Connection}, whose states, streams, windows and pending requests are
checked together on every frame; split, the rules above would be spread
over modules that all reach into the same state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import replace
from enum import Enum
from itertools import count

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.protocol import messages as m
from jobworker.protocol.flow import MAX_WINDOW, ReceiveWindow, SendWindow
from jobworker.protocol.framing import FrameBuffer
from jobworker.protocol.wire import (
    MAX_FRAME_LIMIT,
    OUTPUT_HEAD_SIZE,
    decode_body,
    encode_message,
    encode_output_head,
    encode_time_mark,
)

__all__ = ["Role", "Connection", "FrameTooLarge", "DEFAULT_MAX_FRAME_SIZE", "MIN_FRAME_SIZE"]

# 1 MiB per frame by default: large enough for a 64 KiB output chunk with
# room to spare and for a list of a few thousand jobs, small enough that a
# hostile peer cannot make us buffer much.
DEFAULT_MAX_FRAME_SIZE = 1 << 20
# The least a peer may announce.  A response that does not fit the peer's
# maximum is refused by send() (FrameTooLarge), and the server answers the
# request with an error instead; clients should announce 1 MiB.
MIN_FRAME_SIZE = 16 << 10


class FrameTooLarge(ValueError):
    """
    A message would not fit in one frame of the peer's maximum size.
    """



class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class _State(Enum):
    AWAIT_HELLO = "await-hello"  # our hello and/or the peer's not yet exchanged
    OPEN = "open"
    CLOSED = "closed"


_CLIENT_SENDS = frozenset(
    {
        m.ClientHello,
        m.GoAway,
        m.Ping,
        m.Pong,
        m.WindowUpdate,
        m.CancelStream,
        *m.REQUEST_TYPES,
    }
)
_SERVER_SENDS = frozenset(
    {
        m.ServerHello,
        m.GoAway,
        m.Ping,
        m.Pong,
        m.StartResponse,
        m.StatusResponse,
        m.ListResponse,
        m.OkResponse,
        m.ErrorResponse,
        m.Output,
        m.Gap,
        m.EndOfStream,
        m.TimeMark,
    }
)
_RESPONSES = (m.StartResponse, m.StatusResponse, m.ListResponse, m.OkResponse, m.ErrorResponse)


class Connection:
    """
    One end of a connection.

    @ivar peer_max_frame_size: the largest frame the peer accepts, from its
        hello; the server splits output to fit.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        versions: Collection[int] = m.SUPPORTED_VERSIONS,
    ) -> None:
        """
        @param versions: the protocol versions this end speaks: by default
            every one this implementation speaks; fewer to play an older
            peer (in tests).
        """
        if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame_size must be in [{MIN_FRAME_SIZE}, {MAX_FRAME_LIMIT}]")
        if not versions or not set(versions) <= m.SUPPORTED_VERSIONS:
            raise ValueError(f"versions must be some of {sorted(m.SUPPORTED_VERSIONS)}")
        self.versions = frozenset(versions)
        self.role = role
        self.max_frame_size = max_frame_size
        self.peer_max_frame_size = MIN_FRAME_SIZE
        self.peer_hello: m.ServerHello | m.ClientHello | None = None
        # The version this connection speaks: the server's own until the
        # client's hello confirms it; the client's once the server's hello
        # has arrived (the highest both speak).  Frames are encoded and
        # decoded in its layout.
        self.version = max(self.versions)
        # Frames split off by feed() and not yet decoded by next_message().
        self._undecoded: deque[tuple[int, bytes | memoryview]] = deque()
        self._state = _State.AWAIT_HELLO
        self._hello_sent = False
        self._frames = FrameBuffer(max_frame_size)
        self._sends = _SERVER_SENDS if role is Role.SERVER else _CLIENT_SENDS
        self._receives = _CLIENT_SENDS if role is Role.SERVER else _SERVER_SENDS
        # Request ids awaiting their one response (server: received; client: sent).
        self._pending: dict[int, type[m.Message]] = {}
        # Follow requests awaiting their answer, request id -> [stream id, window].
        # The window is a list so credit granted before the stream opens
        # (a WindowUpdate sent right behind its FollowRequest) is kept.
        self._pending_follows: dict[int, list[int]] = {}
        self._send_windows: dict[int, SendWindow] = {}
        self._receive_windows: dict[int, ReceiveWindow] = {}
        self._request_ids = count(1)
        self._stream_ids = count(1)

    # -- queries -------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state is _State.OPEN

    @property
    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def receive_buffered(self) -> int:
        """
        Bytes received of a frame not yet complete (0 on a frame boundary).
        """
        return len(self._frames)

    @property
    def frames_waiting(self) -> bool:
        """
        Whether frames fed in wait for L{next_message}.
        """
        return bool(self._undecoded) and self._state is not _State.CLOSED

    def discard_received(self) -> None:
        """
        Drop the bytes of an incomplete frame and the frames not yet decoded
        (the connection is closing: nothing more will be decoded).
        """
        self._frames.close()
        self._undecoded.clear()

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def is_pending(self, request_id: int) -> bool:
        """
        Whether C{request_id} still awaits its one response.
        """
        return request_id in self._pending

    @property
    def open_streams(self) -> frozenset[int]:
        windows = self._send_windows if self.role is Role.SERVER else self._receive_windows
        return frozenset(windows)

    def send_window(self, stream_id: int) -> int:
        """
        Bytes of output the server may still send on C{stream_id}.
        """
        return self._send_windows[stream_id].available

    def max_output_chunk(self) -> int:
        """
        The most output data bytes one C{Output} frame to the peer may carry.
        """
        return self.peer_max_frame_size - 1 - OUTPUT_HEAD_SIZE

    def next_request_id(self) -> int:
        return next(self._request_ids) & 0xFFFFFFFF

    def next_stream_id(self) -> int:
        return next(self._stream_ids) & 0xFFFFFFFF

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> list[m.Message]:
        """
        Feed bytes from the peer; return the messages they complete.

        @raise ProtocolError: the peer broke the protocol.  The connection is
            then closed; send L{goaway} and drop the transport.
        """
        self.feed(data)
        messages: list[m.Message] = []
        while True:
            message = self.next_message()
            if message is None:
                return messages
            messages.append(message)

    def feed(self, data: bytes | memoryview) -> None:
        """
        Take bytes from the peer; L{next_message} hands out what they
        complete, one message at a time.  C{data} must stay unchanged until
        L{next_message} has returned C{None}: frames are kept as views of it.

        @raise ProtocolError: a frame's length is 0 or above our maximum.
        """
        if self._state is _State.CLOSED:
            return
        try:
            self._undecoded.extend(self._frames.receive(data))
        except ProtocolError:
            self._state = _State.CLOSED
            self._undecoded.clear()
            raise

    def next_message(self) -> m.Message | None:
        """
        Decode the next complete frame fed in, and apply it to the state;
        C{None} when none is left (or the connection is closed).

        @raise ProtocolError: the peer broke the protocol.  The connection is
            then closed; send L{goaway} and drop the transport.
        """
        if self._state is _State.CLOSED or not self._undecoded:
            self._undecoded.clear()
            return None
        kind, body = self._undecoded.popleft()
        try:
            return self._received(decode_body(kind, body, self.version))
        except ProtocolError:
            self._state = _State.CLOSED
            self._undecoded.clear()
            raise

    def _received(self, message: m.Message) -> m.Message:
        kind = type(message)
        if kind not in self._receives:
            raise ProtocolError(f"{kind.__name__} may not be sent by a {self._peer_role()}")
        if self.peer_hello is None:
            expected = m.ServerHello if self.role is Role.CLIENT else m.ClientHello
            if kind is m.GoAway:
                self._state = _State.CLOSED
                return message
            if kind is not expected:
                raise ProtocolError(f"expected {expected.__name__} first, got {kind.__name__}")
            return self._received_hello(message)  # type: ignore[arg-type]  # kind is a hello; no narrowing via type()
        if kind in (m.ServerHello, m.ClientHello):
            raise ProtocolError("a second hello")
        if self.role is Role.SERVER and not self.is_open:
            raise ProtocolError(f"{kind.__name__} before the hello exchange ended")
        if kind is m.GoAway:
            self._state = _State.CLOSED
        elif kind in (m.Ping, m.Pong):
            # Only an open connection pings: a client's core is open once it
            # has sent its own hello too.
            if not self.is_open:
                raise ProtocolError(f"{kind.__name__} before the hello exchange ended")
        elif self.role is Role.SERVER:
            self._server_received(message)
        else:
            self._client_received(message)
        return message

    def _received_hello(self, hello: m.ServerHello | m.ClientHello) -> m.Message:
        speaks = ", ".join(str(v) for v in sorted(self.versions))
        if self.role is Role.CLIENT:
            # The server names the highest version it speaks; we take the
            # highest of ours that is not above it.
            common = [v for v in self.versions if v <= hello.version]
            if not common:
                raise ProtocolError(
                    f"the server speaks protocol version {hello.version} at most; this client speaks {speaks}",
                    ErrorCode.UNSUPPORTED_VERSION,
                )
            self.version = max(common)
        elif hello.version not in self.versions or hello.version > self.version:
            raise ProtocolError(
                f"protocol version {hello.version} is not supported (this server speaks {speaks})",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        else:
            self.version = hello.version
        if not MIN_FRAME_SIZE <= hello.max_frame_size <= MAX_FRAME_LIMIT:
            raise ProtocolError(f"max_frame_size {hello.max_frame_size} out of range")
        self.peer_hello = hello
        self.peer_max_frame_size = hello.max_frame_size
        if self._hello_sent:
            self._state = _State.OPEN
        return hello

    def _server_received(self, message: m.Message) -> None:
        if isinstance(message, m.REQUEST_TYPES):
            if isinstance(message, m.FollowRequest):
                SendWindow(message.window)  # validates the initial window
            self._track_request(message, ProtocolError)
        elif isinstance(message, m.WindowUpdate):
            window = self._send_windows.get(message.stream_id)
            # An update may cross the stream's end on the wire; that is not
            # an error, only a late message.
            if window is not None:
                window.grant(message.increment)
                return
            for pending in self._pending_follows.values():
                if pending[0] == message.stream_id:
                    SendWindow(pending[1]).grant(message.increment)  # validates
                    pending[1] += message.increment

    def _client_received(self, message: m.Message) -> None:
        if isinstance(message, _RESPONSES):
            request_id = message.request_id
            if self._pending.pop(request_id, None) is None:
                raise ProtocolError(f"response to request {request_id}, which is not pending")
            follow = self._pending_follows.pop(request_id, None)
            if follow is not None and isinstance(message, m.OkResponse):
                stream_id, credit = follow
                self._receive_windows[stream_id] = ReceiveWindow(credit)
        elif isinstance(message, (m.Output, m.Gap, m.TimeMark)):
            window = self._receive_windows.get(message.stream_id)
            if window is None:
                raise ProtocolError(f"output on stream {message.stream_id}, which is not open")
            if isinstance(message, m.Output):
                window.received(len(message.data))
        elif isinstance(message, m.EndOfStream):
            if self._receive_windows.pop(message.stream_id, None) is None:
                raise ProtocolError(f"end of stream {message.stream_id}, which is not open")

    def _track_request(self, message: m.Message, error: type[Exception]) -> None:
        """
        Record a request (received by a server, sent by a client) as pending,
        and a follow's stream as pending too.  A reused request id or stream
        id raises C{error}: L{ProtocolError} for the peer's, L{ValueError}
        for our own.
        """
        request_id = message.request_id  # type: ignore[attr-defined]  # callers pass requests only
        if request_id in self._pending:
            raise error(f"request id {request_id} reused while pending")
        if isinstance(message, m.FollowRequest):
            open_streams = self._send_windows if self.role is Role.SERVER else self._receive_windows
            pending_streams = {stream for stream, _ in self._pending_follows.values()}
            if message.stream_id in open_streams or message.stream_id in pending_streams:
                raise error(f"stream id {message.stream_id} already in use")
            self._pending_follows[request_id] = [message.stream_id, message.window]
        self._pending[request_id] = type(message)

    def _peer_role(self) -> str:
        return "client" if self.role is Role.SERVER else "server"

    # -- sending -------------------------------------------------------------

    def send(self, message: m.Message) -> bytes:
        """
        Encode C{message} for the peer, updating the connection's state.

        @raise ValueError: the message may not be sent now (a bug in the
            caller, never the peer's doing).
        """
        kind = type(message)
        if self._state is _State.CLOSED:
            raise ValueError("connection is closed")
        if kind not in self._sends:
            raise ValueError(f"a {self.role.value} does not send {kind.__name__}")
        if kind in (m.ServerHello, m.ClientHello):
            self._send_hello(message)  # type: ignore[arg-type]  # kind is a hello; no narrowing via type()
        elif kind is m.GoAway:
            self._state = _State.CLOSED
        elif not self.is_open:
            raise ValueError(f"{kind.__name__} before the hello exchange ended")
        frame = encode_message(message, self.version)
        if len(frame) - 4 > self.peer_max_frame_size and kind in (m.StatusResponse, m.EndOfStream):
            # type: ignore: kind is StatusResponse or EndOfStream, both with a
            # status; mypy does not narrow message through type(message).
            message = replace(message, status=m.abridge(message.status))  # type: ignore[type-var,attr-defined]
            frame = encode_message(message, self.version)
        if len(frame) - 4 > self.peer_max_frame_size and kind not in (m.ServerHello, m.ClientHello):
            raise FrameTooLarge(
                f"{kind.__name__} of {len(frame) - 4} bytes exceeds the peer's maximum frame of {self.peer_max_frame_size}"
            )
        if kind in (m.ServerHello, m.ClientHello, m.GoAway):
            pass
        elif kind in (m.Ping, m.Pong):
            pass  # no state beyond being open
        elif self.role is Role.SERVER:
            self._server_sends(message)
        else:
            self._client_sends(message)
        return frame

    def _send_hello(self, hello: m.ServerHello | m.ClientHello) -> None:
        if self._hello_sent:
            raise ValueError("hello already sent")
        if self.role is Role.CLIENT and self.peer_hello is None:
            raise ValueError("the client speaks only after the server's hello")
        if hello.max_frame_size != self.max_frame_size:
            raise ValueError("hello must announce this connection's max_frame_size")
        if hello.version != self.version:
            raise ValueError(f"hello must announce version {self.version}, the one this connection speaks")
        self._hello_sent = True
        if self.peer_hello is not None:
            self._state = _State.OPEN

    def _server_sends(self, message: m.Message) -> None:
        if isinstance(message, _RESPONSES):
            if self._pending.pop(message.request_id, None) is None:
                raise ValueError(f"request {message.request_id} is not pending")
            follow = self._pending_follows.pop(message.request_id, None)
            if follow is not None and isinstance(message, m.OkResponse):
                stream_id, credit = follow
                self._send_windows[stream_id] = SendWindow(credit)
        elif isinstance(message, m.Output):
            window = self._send_windows.get(message.stream_id)
            if window is None:
                raise ValueError(f"stream {message.stream_id} is not open")
            if len(message.data) > self.max_output_chunk():
                raise ValueError("output chunk larger than the peer's frame size")
            window.consume(len(message.data))
        elif isinstance(message, (m.Gap, m.TimeMark)):
            if message.stream_id not in self._send_windows:
                raise ValueError(f"stream {message.stream_id} is not open")
        elif isinstance(message, m.EndOfStream):
            if self._send_windows.pop(message.stream_id, None) is None:
                raise ValueError(f"stream {message.stream_id} is not open")

    def _client_sends(self, message: m.Message) -> None:
        if isinstance(message, m.REQUEST_TYPES):
            self._track_request(message, ValueError)
        elif isinstance(message, m.WindowUpdate):
            window = self._receive_windows.get(message.stream_id)
            pending = next((p for p in self._pending_follows.values() if p[0] == message.stream_id), None)
            current = window.outstanding if window is not None else pending[1] if pending is not None else 0
            if message.increment <= 0 or current + message.increment > MAX_WINDOW:
                raise ValueError(f"a window update of {message.increment} would leave the window out of range")
            if window is not None:
                window.granted(message.increment)
            elif pending is not None:
                pending[1] += message.increment

    def send_output(self, stream_id: int, fd: int, offset: int, data: bytes | memoryview) -> bytes:
        """
        Encode one C{Output} frame: the hot path of the server, which skips
        building a message object.
        """
        return self.send_output_head(stream_id, fd, offset, len(data)) + data

    def send_output_head(self, stream_id: int, fd: int, offset: int, size: int) -> bytes:
        """
        As L{send_output}, for C{size} data bytes that the caller sends right
        after the returned head.
        """
        window = self._send_windows.get(stream_id)
        if window is None:
            raise ValueError(f"stream {stream_id} is not open")
        if size > self.max_output_chunk():
            raise ValueError("output chunk larger than the peer's frame size")
        window.consume(size)
        return encode_output_head(stream_id, fd, offset, size)

    def send_time_mark(self, stream_id: int, offset: int, time: int) -> bytes:
        """
        Encode one C{TimeMark} frame (not flow controlled), on the server's
        hot path beside L{send_output_head}.
        """
        if stream_id not in self._send_windows:
            raise ValueError(f"stream {stream_id} is not open")
        return encode_time_mark(stream_id, offset, time)

    def consumed(self, stream_id: int, size: int) -> bytes:
        """
        Client: the application processed C{size} bytes of C{stream_id}.

        @return: a C{WindowUpdate} frame to send, or C{b""}.
        """
        window = self._receive_windows.get(stream_id)
        if window is None:
            return b""
        increment = window.consumed(size)
        if not increment:
            return b""
        return encode_message(m.WindowUpdate(stream_id, increment))

    def goaway(self, error: ProtocolError) -> bytes:
        """
        The C{GoAway} frame that reports C{error} to the peer; closes.
        """
        self._state = _State.CLOSED
        return encode_message(m.GoAway(int(error.code), error.message[:1000]))
