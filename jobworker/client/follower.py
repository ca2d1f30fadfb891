"""
A follow of the Twisted client: one output stream of a job, delivered to
the embedder's callbacks with flow control (L{Follower}).

Credit for a chunk is given back only after the embedder's output callback
has returned, so a slow callback slows that one stream down on the server,
never the connection or the job.  L{Follower.pause} stops callbacks and
credit altogether.  A follower talks to its connection only through
L{StreamChannel}.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.protocol import messages as m

__all__ = ["Follower", "GapCallback", "OutputCallback", "OutputReceiver", "StreamChannel", "TimeMarkCallback"]


class StreamChannel(TypingProtocol):
    """
    What a L{Follower} may do on its connection.
    """

    def send(self, message: m.Message) -> None:
        """
        Send C{message} (a C{CancelStream}), unless the connection has ended.
        """

    def grant(self, stream_id: int, size: int) -> None:
        """
        C{size} bytes of the stream were consumed: give the server credit.
        """

    def forget(self, stream_id: int) -> None:
        """
        The stream is over for this client: drop what arrives on it.
        """


class OutputReceiver(TypingProtocol):
    """
    What L{JobworkerClientProtocol.follow} may deliver output to, instead
    of a plain callable.
    """

    def output(self, fd: int, data: bytes) -> None:
        """
        C{data} of the job's output, from C{fd} 1 (stdout) or 2 (stderr).
        """

    def gap(self, offset: int, length: int) -> None:
        """
        C{length} bytes from C{offset} were dropped by the server's
        retention limit and will never be delivered.
        """

    # Optional, for follows with timestamps=True:
    #   def time_mark(self, offset: int, time: float) -> None:
    #       the output from C{offset} on (up to the next mark) was read by
    #       the server at C{time} (seconds since the epoch); called before
    #       the output that holds byte C{offset} is delivered.


OutputCallback = Callable[[int, bytes], None]
GapCallback = Callable[[int, int], None]
# (offset, seconds since the epoch): see OutputReceiver's time_mark.
TimeMarkCallback = Callable[[int, float], None]


@implementer(IPushProducer)
class Follower:
    """
    One output stream of a job, opened by L{JobworkerClientProtocol.follow}.

    It is also an L{IPushProducer}, so an embedder writing the output to a
    transport may register it there and let the transport pause it.

    @ivar job_id: the job followed.
    @ivar stream_id: the stream's id on the connection.
    @ivar done: fires with the job's L{JobStatus} of the C{EndOfStream}
        record, after every byte before it has been delivered; fails with
        L{RequestError} when the server refuses the follow (unknown job,
        denied), with L{ClientConnectionLost} when the connection ends
        first, and with the exception of the output or gap callback if one
        raises (the stream is then cancelled).  Cancelling it cancels the
        stream.
    @ivar offset: the absolute byte offset of the next byte not yet
        delivered: pass it as C{offset} to a new follow to resume after a
        lost connection without losing or repeating output.
    @ivar end_reason: why the stream ended (L{EndReason}), once it has.
    """

    def __init__(
        self,
        channel: StreamChannel,
        job_id: uuid.UUID,
        stream_id: int,
        offset: int,
        output: OutputCallback,
        gap: GapCallback | None,
        time_mark: TimeMarkCallback | None = None,
    ) -> None:
        self.job_id = job_id
        # Seconds since the epoch when the server read the output at
        # `offset` (the last TimeMark received); None without timestamps, or
        # when the server does not know (output spooled before version 3).
        self.time: float | None = None
        self._time_mark = time_mark
        self.stream_id = stream_id
        self.offset = offset
        self.end_reason: m.EndReason | None = None
        self.done: defer.Deferred[m.JobStatus] = defer.Deferred(self._done_cancelled)
        self._channel = channel
        self._output = output
        self._gap = gap
        self._open = False  # the server accepted the follow
        self._finished = False  # EndOfStream handled, or failed
        self._cancelled = False  # no more callbacks; CancelStream sent or due
        self._paused = False
        self._draining = False
        # Messages that arrived while paused, in order; at most the window
        # of output bytes, since the server may not send more without credit.
        self._held: deque[m.Output | m.Gap | m.EndOfStream | m.TimeMark] = deque()
        # Bytes processed while paused, granted back on resume.
        self._ungranted = 0

    def __repr__(self) -> str:
        return f"<Follower job={self.job_id} stream={self.stream_id} offset={self.offset}>"

    # -- the embedder's controls -------------------------------------------------

    def pause(self) -> None:
        """
        Deliver nothing more and grant no more credit until L{resume}.

        The server stops sending on this stream once the window it already
        has is spent; what arrives meanwhile (at most the window) is held
        here and delivered, in order, on L{resume}.  C{done} does not fire
        while paused.
        """
        self._paused = True

    def resume(self) -> None:
        """
        Deliver what was held and grant credit again.
        """
        self._paused = False
        if self._draining:
            return  # called from a callback during the drain below; it goes on
        self._draining = True
        try:
            while self._held and not self._paused and not self._cancelled:
                self._handle(self._held.popleft())
        finally:
            self._draining = False
        if not self._paused and self._ungranted:
            ungranted, self._ungranted = self._ungranted, 0
            self._channel.grant(self.stream_id, ungranted)

    def cancel(self) -> None:
        """
        Stop following: no callback is called any more, and C{CancelStream}
        is sent (once the server has opened the stream, if it has not yet).
        C{done} fires with the job's status when the server confirms, with
        L{end_reason} L{EndReason.CANCELLED} (or C{JOB_ENDED} if the end
        crossed the cancellation on the wire).
        """
        if self._finished or self._cancelled:
            return
        self._cancelled = True
        held, self._held = self._held, deque()
        end = [message for message in held if isinstance(message, m.EndOfStream)]
        if end:
            # The server has ended the stream already; nothing to cancel.
            self._end(end[0])
        elif self._open:
            self._channel.send(m.CancelStream(self.stream_id))

    def _done_cancelled(self, done: defer.Deferred[m.JobStatus]) -> None:
        self.cancel()
        if not done.called:
            # done will fail with CancelledError; whatever the server sends
            # on this stream from now on is dropped.
            self._finished = True
            self._channel.forget(self.stream_id)

    # IPushProducer, in Twisted's names.
    def pauseProducing(self) -> None:
        self.pause()

    def resumeProducing(self) -> None:
        self.resume()

    def stopProducing(self) -> None:
        self.cancel()

    # -- driven by the connection (JobworkerClientProtocol) -------------------------

    def opened(self, _: object) -> None:
        """
        The server accepted the follow (called by the connection).
        """
        self._open = True
        if self._cancelled:
            self._channel.send(m.CancelStream(self.stream_id))

    def received(self, message: m.Output | m.Gap | m.EndOfStream | m.TimeMark) -> None:
        """
        A record of this stream arrived (called by the connection).
        """
        if self._finished:
            return
        if self._cancelled:
            # Output in flight when we cancelled is dropped; only the end counts.
            if isinstance(message, m.EndOfStream):
                self._end(message)
            return
        if self._paused or self._held:
            self._held.append(message)
            return
        self._handle(message)

    def _handle(self, message: m.Output | m.Gap | m.EndOfStream | m.TimeMark) -> None:
        if isinstance(message, m.EndOfStream):
            self._end(message)
            return
        try:
            if isinstance(message, m.TimeMark):
                self.time = message.time / 1e6
                if self._time_mark is not None:
                    self._time_mark(message.offset, message.time / 1e6)
                return
            if isinstance(message, m.Output):
                self._output(message.fd, message.data)
                self.offset = message.offset + len(message.data)
            else:
                if self._gap is not None:
                    self._gap(message.offset, message.length)
                self.offset = message.offset + message.length
        except Exception:
            self._callback_failed(Failure())
            return
        if isinstance(message, m.Output) and message.data:
            if self._paused:
                self._ungranted += len(message.data)
            else:
                self._channel.grant(self.stream_id, len(message.data))

    def _callback_failed(self, failure: Failure) -> None:
        # The embedder's exception goes to done, not to Twisted's
        # dataReceived, which would drop the whole connection for it.
        self._finished = self._cancelled = True
        self._held.clear()
        self._channel.forget(self.stream_id)
        # Output still in flight is dropped: the stream is no longer known.
        self._channel.send(m.CancelStream(self.stream_id))
        self.done.errback(failure)

    def _end(self, message: m.EndOfStream) -> None:
        self.end_reason = message.reason
        self._finished = True
        self._channel.forget(self.stream_id)
        self.done.callback(message.status)

    def failed(self, failure: Failure) -> None:
        """
        The follow was refused, or the connection ended (called by the
        connection).
        """
        self._held.clear()
        self._channel.forget(self.stream_id)
        if not self._finished:
            self._finished = True
            self.done.errback(failure)
