"""
The server: the C{twistd jobworker} service and its options (L{jobworker.server.service}) and the
Twisted protocol that serves one client connection (L{jobworker.server.connection}).
"""
