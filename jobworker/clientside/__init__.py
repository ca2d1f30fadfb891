"""
What both clients share, below both of them: the Twisted client
(L{jobworker.client}) and the blocking one (L{jobworker.blocking}) are peers
and import from neither each other nor anything above; both import from
here.

Nothing here touches the reactor, a socket or (but for reading the config
file) the file system, and nothing imports Twisted, pyOpenSSL or
C{cryptography}: C{jobcli} loads this package and must start fast.

  - L{jobworker.clientside.jobref}: what a caller may pass as a job id.
  - L{jobworker.clientside.address}: a server's address, C{HOST:PORT} or
    C{unix:PATH}.
  - L{jobworker.clientside.config}: which server and credentials a client
    uses (flags, the environment, the config file), as C{jobcli} and both
    clients' C{from_config}/C{connect_configured} resolve them.
"""
