"""
The server's side of the isolation helper (L{jobworker.host.isolate}): its
configuration for one job, its start, and its status pipe.

The contract itself (keys, status words, exit codes) is
L{jobworker.host.contract}; this module only speaks it.  Twisted glue: the
reactor is passed in.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.python.failure import Failure

from jobworker.errors import ErrorCode, RequestError
from jobworker.host import contract
from jobworker.jobs.lifecycle import Event
from jobworker.jobs.pipes import output_pipe
from jobworker.jobs.spec import JobSpec
from jobworker.logs import Logger
from jobworker.protocol.messages import Network

__all__ = [
    "DEFAULT_ENV",
    "ISOLATE_SCRIPT",
    "HelperEvents",
    "HelperProtocol",
    "HelperSettings",
    "StatusLine",
    "helper_config",
    "parse_status_line",
    "spawn_helper",
]

log = Logger()

# The helper's source (the server runs its bytecode once compiled, see
# jobworker.host.isolate.compiled_helper).
ISOLATE_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "host", "isolate.py")

# Under the job's own variables: what a login would give it.
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class HelperSettings:
    """
    The server's settings every job's helper gets.

    @ivar isolate: own PID, mount, IPC and network namespaces.
    @ivar scratch_bytes: the size of an isolated job's private tmpfs; 0: none.
    @ivar private_sys: an isolated job gets its own read-only C{/sys}.
    @ivar hidden_paths: resolved paths made unreachable inside the job.
    @ivar inaccessible_file: the empty mode-000 file bound over hidden files.
    """

    isolate: bool = True
    scratch_bytes: int = 0
    private_sys: bool = True
    hidden_paths: tuple[str, ...] = ()
    inaccessible_file: str | None = None


def helper_config(spec: JobSpec, settings: HelperSettings, dynamic_uid: int | None) -> tuple[dict[str, object], int]:
    """
    The helper's configuration for one job (its cgroups still to add), and
    the uid the command will run as.

    @param dynamic_uid: the job's uid of its own, or None to run it as
        C{spec.user}, looked up in the user database.
    @raise RequestError: C{START_FAILED}: no such user.
    """
    isolate = settings.isolate
    scratch = settings.scratch_bytes if isolate else 0
    uid: int | None
    gid: int | None
    if dynamic_uid is not None:
        uid = gid = runs_as = dynamic_uid
        # The only place such a job can write (see read_only_root).
        home = "/tmp" if scratch else "/"
    else:
        try:
            entry = pwd.getpwnam(spec.user)
        except KeyError:
            raise RequestError(f"no such user: {spec.user}", ErrorCode.START_FAILED) from None
        uid, gid = entry.pw_uid, entry.pw_gid
        runs_as = entry.pw_uid
        if uid == os.getuid() and gid == os.getgid():
            uid = gid = None
        home = entry.pw_dir or "/"
    env = dict(DEFAULT_ENV, HOME=home)
    env.update(dict(spec.env))
    config = contract.helper_config(
        argv=list(spec.argv),
        env=env,
        cwd=spec.workdir,
        uid=uid,
        gid=gid,
        cgroup_procs=[],
        isolate=isolate,
        network=contract.NETWORK_HOST if spec.network is Network.HOST else contract.NETWORK_NONE,
        no_new_privs=True,
        # Keyrings are in no namespace: without these a job could read the
        # server's session keyring and what other jobs put there, and find
        # keys that an earlier job with its uid left behind.  Not for a
        # server without root: its jobs run as its own user, who may reach
        # its keyrings anyway, and each keyring would cost that user one of
        # its 200 keys (keyrings(7) quota).
        session_keyring=os.geteuid() == 0,
        clear_user_keyrings=dynamic_uid is not None,
    )
    if isolate:
        config.update(
            contract.helper_config(
                scratch_bytes=scratch,
                private_sys=settings.private_sys,
                # A uid of its own can write only where everyone can: keep it
                # out of the host's shared places, where a later job with the
                # same uid (or any job) could read what it left.
                read_only_root=dynamic_uid is not None,
                hide=list(settings.hidden_paths),
                inaccessible_file=settings.inaccessible_file,
            )
        )
    return config, runs_as


@dataclass(frozen=True)
class StatusLine:
    """
    One line of the helper's status pipe, parsed: the life-cycle event it
    is (None: informational), with the failure's (kind, message) or the
    command's end as (word, number).
    """

    line: str
    event: Event | None
    failure: tuple[str, str] | None = None
    final: tuple[str, int] | None = None


def parse_status_line(line: str) -> StatusLine:
    """
    @raise ValueError: not a line of the contract.
    """
    word, _, rest = line.partition(" ")
    if word == contract.STARTED:
        return StatusLine(line, Event.STARTED)
    if word == contract.FAILED:
        kind, _, detail = rest.partition(" ")
        _errno, _, message = detail.partition(" ")
        return StatusLine(line, Event.FAILED_LINE, failure=(kind, message or detail))
    if word in (contract.EXIT, contract.SIGNAL):
        return StatusLine(line, Event.FINAL_LINE, final=(word, int(rest)))
    if word == contract.PID:
        return StatusLine(line, None)
    raise ValueError(f"unknown status line {line!r}")


class HelperEvents(Protocol):
    """
    What the helper's process protocol tells (a L{jobworker.jobs.job.Job}).
    """

    def helper_status(self, status: StatusLine) -> None: ...

    def helper_status_closed(self) -> None: ...

    def helper_ended(self, exit_code: int | None, signum: int | None) -> None: ...


class HelperProtocol(protocol.ProcessProtocol):
    """
    Receives the helper's status lines (fd 3) and its end.
    """

    def __init__(self, events: HelperEvents, job_id: uuid.UUID) -> None:
        self.events = events
        self.job_id = job_id
        self._status = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != contract.STATUS_FD:
            return
        self._status += data
        while b"\n" in self._status:
            line, self._status = self._status.split(b"\n", 1)
            text = line.decode("utf-8", "replace")
            try:
                status = parse_status_line(text)
            except ValueError:
                log.warn("job {job_id}: bad status line {line!r}", job_id=self.job_id, line=text)
                continue
            self.events.helper_status(status)
        # A status line is short; a helper writing megabytes without a
        # newline is broken, and must not make us hold them.
        if len(self._status) > contract.MAX_STATUS_LINE:
            self._status = b""

    def childConnectionLost(self, fd: int) -> None:
        if fd == contract.STATUS_FD:
            self.events.helper_status_closed()

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.events.helper_ended(getattr(value, "exitCode", None), getattr(value, "signal", None))


def spawn_helper(
    reactor: Any, helper_path: str, events: HelperEvents, config: dict[str, object], job_id: uuid.UUID
) -> tuple[Any, dict[int, int]]:
    """
    Start the helper for one job: its process transport, and the read ends
    of the job's stdout (1) and stderr (2), which the caller then owns.

    @raise OSError: the pipes or the process could not be made (nothing is
        left open then).
    """
    stdout_r, stdout_w = output_pipe()
    stderr_r, stderr_w = output_pipe()
    try:
        transport = reactor.spawnProcess(
            HelperProtocol(events, job_id),
            sys.executable,
            # The configuration goes through stdin (the helper then puts
            # /dev/null there): argv could not carry a 256 KiB command.
            [sys.executable, "-I", "-S", helper_path, "-"],
            env={},
            path="/",
            childFDs={0: "w", 1: stdout_w, 2: stderr_w, contract.STATUS_FD: "r"},
        )
        transport.write(json.dumps(config).encode())
        transport.closeStdin()
    except BaseException:
        for fd in (stdout_r, stderr_r):
            os.close(fd)
        raise
    finally:
        for fd in (stdout_w, stderr_w):
            os.close(fd)
    return transport, {1: stdout_r, 2: stderr_r}
