"""
The embeddable Twisted client: L{Deferred}-returning requests and a
flow-controlled follow API, for Twisted programs that drive jobworker.

It is a thin layer over the sans-IO L{Connection}, the same core the server
and the blocking client (L{jobworker.blocking}) use; this module only moves
bytes between that core and a Twisted transport and turns responses into
fired L{Deferred}s.

    from twisted.internet import defer, task
    from jobworker.client import connect

    async def main(reactor):
        client = await connect(reactor, "jobs.example.org:8443",
                               ca="ca.pem", cert="alice.pem", key="alice.key")
        job_id = await client.start(["echo", "hi"])
        follower = client.follow(job_id, lambda fd, data: print(fd, data))
        status = await follower.done
        print(status.state.label, status.exit_code)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))

Design
======

Requests are answered in any order; each carries a request id, and a table
maps every id still unanswered to the L{Deferred} its caller holds (as in
Twisted AMP).  When the connection ends for any reason (the transport drops,
the server sends C{GoAway}, the server breaks the protocol, or we close it)
every pending L{Deferred} and every open follower fails with one
L{ClientConnectionLost}, so no caller waits forever.

No request has a time limit: a wait or a follow lasts as long as its job.
A server that vanished without closing the connection is noticed by
keep-alive (L{jobworker.protocol.keepalive}): after C{keepalive_interval}
seconds without a byte from the server the client pings it, and ends the
connection (every pending L{Deferred} fails with L{ClientConnectionLost},
code C{TIMEOUT}) when the ping goes unanswered for as long again.

Cancelling a request's L{Deferred} only stops waiting for it: the protocol
has no way to withdraw a request, and its answer, when it comes, is dropped.
Cancelling a follower's C{done} cancels its stream.

Output of a follow arrives on a stream whose window the client grants (see
L{jobworker.protocol.flow}): credit for a chunk is given back only after the
embedder's output callback has returned, so a slow callback slows that one
stream down on the server, never the connection or the job.
L{Follower.pause} stops callbacks and credit altogether.

Layout: L{jobworker.client.protocol} (one connection and its requests),
L{jobworker.client.follower} (a follow's stream), L{jobworker.client.errors}
(L{ClientConnectionLost}), L{jobworker.client.connect} (dialling, with TLS
from L{jobworker.tls}).  Everything public is re-exported here.
"""

from __future__ import annotations

from jobworker.client.connect import DEFAULT_CONNECT_TIMEOUT, connect, connect_configured
from jobworker.client.errors import ClientConnectionLost
from jobworker.client.follower import Follower, OutputReceiver
from jobworker.client.protocol import JobworkerClientProtocol
from jobworker.protocol.flow import DEFAULT_WINDOW

__all__ = [
    "ClientConnectionLost",
    "Follower",
    "connect_configured",
    "JobworkerClientProtocol",
    "OutputReceiver",
    "connect",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_WINDOW",
]
