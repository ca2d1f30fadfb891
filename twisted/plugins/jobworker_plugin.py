"""
The C{twistd jobworker} plugin.  Lazy: C{twistd --help} does not import the
service.
"""

from twisted.application.service import ServiceMaker

jobworker = ServiceMaker(
    "jobworker",
    "jobworker.server.service",
    "Run Linux jobs for clients authenticated by mutual TLS.",
    "jobworker",
)
