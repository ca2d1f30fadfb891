"""
Test helpers for programs that embed L{jobworker.client}: a scripted server
in memory, so an embedder's tests need neither a network, nor a reactor, nor
a real jobworker server.

L{connected_pair} returns a client that has finished its hello exchange with
a L{FakeServer}.  The fake server is the real sans-IO server L{Connection}
over a L{StringTransport}: every frame either side sends is encoded and
checked by the same core the real server uses, so a test that passes here
exchanges only valid frames.  The test plays the server: it reads what the
client sent with L{FakeServer.receive} and answers with L{FakeServer.send}.
Everything happens synchronously, so results are read with
C{successResultOf}/C{failureResultOf} or by adding callbacks::

    import uuid
    from twisted.trial.unittest import SynchronousTestCase
    from jobworker.protocol import messages as m
    from jobworker.testing import connected_pair, job_status

    class JobRunnerTests(SynchronousTestCase):
        def test_reports_exit_code(self):
            client, server = connected_pair()
            job_id = uuid.uuid4()
            waiting = client.wait(job_id)
            [request] = server.receive()
            server.send(m.StatusResponse(request.request_id,
                                         job_status(job_id, exit_code=3)))
            self.assertEqual(self.successResultOf(waiting).exit_code, 3)

A follow is scripted the same way: answer the C{FollowRequest} with
C{OkResponse}, then send C{Output}, C{Gap} and C{EndOfStream} on its
C{stream_id}; L{FakeServer.receive} shows the C{WindowUpdate}s the client
grants in return, and the server's send window
(C{server.conn.send_window(stream_id)}) refuses output beyond the credit.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any, TypeVar

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure

from jobworker.client import JobworkerClientProtocol
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role

__all__ = ["FakeServer", "connected_pair", "job_status"]

_M = TypeVar("_M", bound=m.Message)


class FakeServer:
    """
    The server end of a connection to a L{JobworkerClientProtocol}, played
    by the test.

    @ivar conn: the server's sans-IO L{Connection}.
    @ivar transport: the client's transport: what the client writes is in
        C{transport.value()} until L{receive} takes it.
    @ivar client: the client protocol.
    """

    def __init__(self, client: JobworkerClientProtocol, *, versions: Collection[int] = m.SUPPORTED_VERSIONS) -> None:
        """
        @param versions: the protocol versions the server speaks (fewer
            than this implementation does to play an older server).
        """
        self.client = client
        self.conn = Connection(Role.SERVER, versions=versions)
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = client

    def receive(self) -> list[m.Message]:
        """
        Decode, with the server's core, everything the client has written
        since the last call.
        """
        data = self.transport.value()
        self.transport.clear()
        return self.conn.receive_data(data)

    def receive_one(self, kind: type[_M]) -> _M:
        """
        Receive exactly one message, of type C{kind}.
        """
        messages = self.receive()
        if len(messages) != 1 or not isinstance(messages[0], kind):
            raise AssertionError(f"expected one {kind.__name__}, the client sent {messages!r}")
        return messages[0]

    def send(self, *messages: m.Message) -> None:
        """
        Encode C{messages} with the server's core and deliver them to the
        client in one read.
        """
        self.client.dataReceived(b"".join(self.conn.send(message) for message in messages))

    def hello(self, *, identity: str = "alice", role: str = "user", server_name: str = "fake") -> None:
        """
        Send the server's hello and read the client's answer.
        """
        self.send(m.ServerHello(self.conn.version, self.conn.max_frame_size, server_name, identity, role))
        self.receive_one(m.ClientHello)

    def go_away(self, code: int, message: str) -> None:
        """
        Send C{GoAway}, as a server does before it closes the connection.
        """
        self.send(m.GoAway(code, message))

    def drop(self, reason: Exception | None = None) -> None:
        """
        The connection ends under the client (C{ConnectionDone} by default).
        """
        if self.transport.connected:
            self.transport.connected = False
            self.client.connectionLost(Failure(reason or ConnectionDone("the fake server dropped the connection")))


def connected_pair(
    *,
    identity: str = "alice",
    role: str = "user",
    server_versions: Collection[int] = m.SUPPORTED_VERSIONS,
    **client_options: Any,
) -> tuple[JobworkerClientProtocol, FakeServer]:
    """
    A client whose hello exchange with a L{FakeServer} has ended: its
    C{ready} has fired and requests may be made.

    @param identity: the identity the server's hello reports (the client
        certificate's CN).
    @param role: the role it reports (the certificate's OU).
    @param server_versions: the protocol versions the server speaks.
    @param client_options: for L{JobworkerClientProtocol}.
    """
    client = JobworkerClientProtocol(**client_options)
    server = FakeServer(client, versions=server_versions)
    client.makeConnection(server.transport)  # type: ignore[no-untyped-call]  # Twisted's, unannotated
    server.hello(identity=identity, role=role)
    return client, server


def job_status(
    job_id: uuid.UUID | None = None,
    *,
    owner: str = "alice",
    argv: tuple[str, ...] = ("true",),
    state: m.JobState = m.JobState.EXITED,
    **fields: Any,
) -> m.JobStatus:
    """
    A L{JobStatus} for a scripted response; by default a job of C{alice}'s
    that ran C{true} and exited with 0.
    """
    if state is m.JobState.EXITED:
        fields.setdefault("exit_code", 0)
    return m.JobStatus(job_id or uuid.uuid4(), owner, argv, state, **fields)
