"""
Reaping children in time proportional to those that ended, not to those
that run.

On every SIGCHLD, Twisted's reactor calls
C{twisted.internet.process.reapAllProcesses}, which asks each process it
started, one C{waitpid(pid, WNOHANG)} each, whether it has ended.  With a
helper per running job that is O(running jobs) per ended job: stopping 500
jobs cost 125,000 C{waitpid} calls (0.44 s of the reactor's time for 200,
growing with the square), all on the reactor thread while other clients
wait.

L{reap_ended_processes} asks the kernel instead: C{waitid(P_ALL, WEXITED |
WNOHANG | WNOWAIT)} names one child that has ended without reaping it; its
Twisted process reaps it as before (C{reapProcess}, so the exit status and
C{processEnded} are Twisted's own), and the next is asked for, until none
is left.  A child that ended but is none of Twisted's (a C{subprocess} of
some library's, which reaps its own) stops the search, and Twisted's scan of
every process runs as before, once: nothing is ever reaped that Twisted
would not have reaped, and nothing is missed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet import process

__all__ = ["install_reaper", "reap_ended_processes"]


def reap_ended_processes(scan_all: Callable[[], None] | None = None) -> None:
    """
    Reap every ended child that Twisted started; see the module docstring.

    @param scan_all: what runs when an ended child is not Twisted's
        (Twisted's own C{reapAllProcesses} unless given).
    """
    handlers = process.reapProcessHandlers
    # Each turn reaps one child or ends the loop; the bound only guards
    # against a handler that does not reap its child.
    for _ in range(len(handlers) + 1):
        try:
            ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return  # no children at all
        if ended is None or ended.si_pid == 0:
            return  # none has ended
        handler = handlers.get(ended.si_pid)
        if handler is None:
            break
        handler.reapProcess()
        if handlers.get(ended.si_pid) is handler:
            break  # it did not reap (a race with its own reaping): scan
    (scan_all or _twisted_reap_all)()


_twisted_reap_all = process.reapAllProcesses


def install_reaper() -> None:
    """
    Make the reactor reap with L{reap_ended_processes} (process-wide: the
    reactor looks C{reapAllProcesses} up in L{twisted.internet.process}
    on every SIGCHLD).  Idempotent.
    """
    process.reapAllProcesses = reap_ended_processes
