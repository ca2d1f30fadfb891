"""
A job's life cycle as an explicit state machine: phases × events → next
phase, as h11 keeps a connection's (C{h11/_state.py}).  Pure: no reactor, no
I/O; L{jobworker.jobs.job.Job} fires the events and does the work each
transition asks for.

The phases are the server's view of the job's processes, finer than the
wire's L{JobState} (which a job's record and status carry)::

                 STARTED / EXEC_EOF
      STARTING ─────────────────────────> RUNNING
         │  FAILED_LINE                      │
         v                                   │
      START_FAILED                           │
         │ HELPER_ENDED      HELPER_ENDED    │   HELPER_ENDED (from STARTING too)
         └──────────────> DRAINING <─────────┘
                             │ OUTPUT_CLOSED: every output pipe at EOF
                             v
                          SETTLING   the final state decided; the cgroup goes
                             │ SETTLED
                             v
                           ENDED     waiters told; a job read from its record
                                     starts here

The status pipe's EOF means two things.  A direct job's helper becomes the
command, and its exec closes fd 3 (close-on-exec): EXEC_EOF, the command
runs (a direct helper killed before its exec closes it too, and cannot be
told apart: such a job counts as started and ends SIGNALED).  An isolated job's helper keeps fd 3 until it ends, and Twisted
reports the EOF of every pipe before the helper's end: STATUS_EOF says
nothing, and in STARTING it means the helper ended (OOM-killed, SIGKILLed)
before it could say "started" or "failed"; the job stays STARTING and its
HELPER_ENDED fails the start.

Every phase but SETTLING and ENDED takes STOP (a stop's reason and signals
are the job's data, not a phase: a job stopped while starting can still
start, and a helper that ends with no stop asked for is the common case) and
the helper's informational lines.  Any other pair is a bug in the caller and
raises L{IllegalTransition}; a status line that the helper's contract does
not allow where it came is refused with L{LifeCycle.allows} first and logged
by the job, never raised into the process protocol.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Event", "IllegalTransition", "LifeCycle", "Phase", "TRANSITIONS"]


class Phase(Enum):
    STARTING = "starting"  # the helper is spawned; the command not known to run
    RUNNING = "running"  # the command runs (or ran; its end not yet seen)
    START_FAILED = "start_failed"  # the helper said the command never ran
    DRAINING = "draining"  # the helper ended; the output pipes are not at EOF yet
    SETTLING = "settling"  # final state decided; cgroup removal under way
    ENDED = "ended"  # final; every waiter told

    @property
    def is_alive(self) -> bool:
        """
        The helper may still run (a stop or a signal has somewhere to go).
        """
        return self in (Phase.STARTING, Phase.RUNNING, Phase.START_FAILED)


class Event(Enum):
    STARTED = "started"  # status line "started"
    EXEC_EOF = "exec_eof"  # a direct job's fd 3 at EOF: its exec closed it (or its helper died)
    STATUS_EOF = "status_eof"  # an isolated job's fd 3 at EOF: its helper is ending
    FAILED_LINE = "failed_line"  # status line "failed <kind> <errno> <message>"
    FINAL_LINE = "final_line"  # status line "exit <code>" or "signal <n>"
    STOP = "stop"  # a stop was asked for (a client, the timeout, shutdown)
    HELPER_ENDED = "helper_ended"  # the helper process was reaped
    OUTPUT_CLOSED = "output_closed"  # the last output pipe closed, after HELPER_ENDED
    SETTLED = "settled"  # the cgroup is removed (or its removal failed)


_P, _E = Phase, Event

# (phase, event) -> next phase.  A pair that is missing is illegal.
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (_P.STARTING, _E.STARTED): _P.RUNNING,
    (_P.STARTING, _E.EXEC_EOF): _P.RUNNING,
    # No word from the helper before its end: HELPER_ENDED fails the start.
    (_P.STARTING, _E.STATUS_EOF): _P.STARTING,
    (_P.STARTING, _E.FAILED_LINE): _P.START_FAILED,
    (_P.STARTING, _E.STOP): _P.STARTING,
    (_P.STARTING, _E.HELPER_ENDED): _P.DRAINING,
    (_P.RUNNING, _E.FINAL_LINE): _P.RUNNING,
    (_P.RUNNING, _E.STATUS_EOF): _P.RUNNING,
    (_P.RUNNING, _E.STOP): _P.RUNNING,
    (_P.RUNNING, _E.HELPER_ENDED): _P.DRAINING,
    (_P.START_FAILED, _E.EXEC_EOF): _P.START_FAILED,
    (_P.START_FAILED, _E.STATUS_EOF): _P.START_FAILED,
    (_P.START_FAILED, _E.STOP): _P.START_FAILED,
    (_P.START_FAILED, _E.HELPER_ENDED): _P.DRAINING,
    (_P.DRAINING, _E.EXEC_EOF): _P.DRAINING,
    (_P.DRAINING, _E.STATUS_EOF): _P.DRAINING,
    (_P.DRAINING, _E.STOP): _P.DRAINING,
    (_P.DRAINING, _E.OUTPUT_CLOSED): _P.SETTLING,
    (_P.SETTLING, _E.SETTLED): _P.ENDED,
}


class IllegalTransition(Exception):
    """
    An event its phase does not take: a bug in the caller.
    """

    def __init__(self, phase: Phase, event: Event) -> None:
        super().__init__(f"a job in phase {phase.value} cannot take {event.value}")
        self.phase = phase
        self.event = event


class LifeCycle:
    """
    The phase of one job, moved only by L{fire}.
    """

    def __init__(self, phase: Phase = Phase.STARTING) -> None:
        self.phase = phase

    def allows(self, event: Event) -> bool:
        return (self.phase, event) in TRANSITIONS

    def fire(self, event: Event) -> Phase:
        """
        Take C{event}; the new phase.

        @raise IllegalTransition: the phase does not take C{event} (the
            phase stays as it was).
        """
        try:
            self.phase = TRANSITIONS[self.phase, event]
        except KeyError:
            raise IllegalTransition(self.phase, event) from None
        return self.phase

    def __repr__(self) -> str:
        return f"<LifeCycle {self.phase.value}>"
