"""
The server, one concern per module (imports point down this list):

  - L{jobworker.server.transport}: the TCP transport under TLS, tuned for
    streaming.
  - L{jobworker.server.streams}: output streams, what one turn sends, and
    the push producer that serves a connection's streams fairly.
  - L{jobworker.server.timers}: a connection's frame, idle and keep-alive
    timers.
  - L{jobworker.server.requests}: what each request is answered, and its
    audit line.
  - L{jobworker.server.connection}: one client connection
    (L{ServerProtocol <jobworker.server.connection.ServerProtocol>}).
  - L{jobworker.server.factory}: what all connections share: their limits,
    counts by identity, the audit rate limit.
  - L{jobworker.server.service}: the C{twistd jobworker} service, its
    options and its start-up checks.

TLS for the server and the Twisted client is L{jobworker.tls} (one policy
for both ends; its docstring says why it is not split).
"""
