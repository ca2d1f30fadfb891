"""
A blocking client: the sans-IO L{Connection} over a plain socket and the
standard library's C{ssl} (through memory BIOs, see L{TLSChannel <jobworker.blocking.channel.TLSChannel>}).

This is what C{jobcli} uses: it needs no reactor, so a one-shot command
(C{jobcli status}) starts in a few tens of milliseconds.  Programs built on
Twisted use L{jobworker.client} instead; both speak through the same
protocol core.

Layout: L{jobworker.blocking.channel} (TLS over the socket through memory
BIOs), L{jobworker.blocking.tls} (the C{ssl} context, and what a TLS
failure means), L{jobworker.blocking.connection} (frames, keep-alive,
requests and follows), L{jobworker.blocking.client} (the operations).
Nothing here imports Twisted, pyOpenSSL or C{cryptography}.  Everything
public is re-exported here.

Time limits: C{timeout} bounds the connection's set-up (TCP, TLS and the
hello) and each write.  Reads have no time limit: a wait or a follow lasts
as long as its job, hours if need be.  A server that vanished is noticed by
keep-alive instead (L{jobworker.protocol.keepalive}): after
C{keepalive_interval} seconds without a byte from the server the client
pings it, and gives up (L{ConnectionFailed}) when the ping goes unanswered
for as long again.  Pings from the server are answered whenever the client
reads.
"""

from __future__ import annotations

from jobworker.blocking.channel import CIPHER_READ, TLSChannel
from jobworker.blocking.client import MAX_CANDIDATES, MIN_PREFIX, BlockingClient
from jobworker.blocking.connection import BlockingConnection, ConnectionFailed
from jobworker.blocking.tls import ClientTLSError, client_ssl_context, tls_failure_cause
from jobworker.clientside.address import UnixAddress, parse_address
from jobworker.clientside.jobref import JobRef, as_job_id
from jobworker.clientside.since import since_microseconds

__all__ = [
    "CIPHER_READ",
    "MAX_CANDIDATES",
    "MIN_PREFIX",
    "BlockingClient",
    "BlockingConnection",
    "ClientTLSError",
    "ConnectionFailed",
    "JobRef",
    "TLSChannel",
    "UnixAddress",
    "as_job_id",
    "client_ssl_context",
    "parse_address",
    "since_microseconds",
    "tls_failure_cause",
]
