"""
jobworker: run Linux jobs for remote clients, with limits and isolation,
over mutual TLS.

C{__version__} is the one place the version is written; C{setup.cfg} reads
it from here, and the server, C{jobcli} and C{jobworker-pki} report it.
"""

__version__ = "0.1.0"
