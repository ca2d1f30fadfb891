"""
The contract between the server and its per-job isolation helper
(L{jobworker.host.isolate}), in one place: the helper's configuration keys,
the words of its status lines, the kinds of start failure and the exit codes
125, 126 and 127 that go with them, the status pipe's descriptor and line
size, and the signals it forwards.

Both sides import this module: the server as C{jobworker.host.contract}, the
helper, which runs as a program of its own (C{python -I -S isolate.py}), as
its sibling file C{contract.py} (or C{contract.pyc} next to the helper's
bytecode, see L{jobworker.host.isolate.compiled_helper}).  So it imports
nothing, not even the standard library: every job pays for the helper's
imports.  It is pure data (no I/O), so the protocol layer may import it too.

The formats themselves are described in the helper's docstring.
"""

from __future__ import annotations  # the annotations below are never evaluated

# mypy takes any TYPE_CHECKING as true; importing typing would cost each job.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The descriptor of the status pipe the helper inherits (write end).
STATUS_FD = 3

# PIPE_BUF: a longer write to the status pipe could interleave with another.
MAX_STATUS_LINE = 4096

# -- status lines (fd 3), first word -----------------------------------------

STARTED = "started"  # isolated: the command's execve() worked
FAILED = "failed"  # "failed <kind> <errno> <message>": the command never ran
EXIT = "exit"  # "exit <code>": isolated: the command exited
SIGNAL = "signal"  # "signal <n>": isolated: a signal killed the command
PID = "pid"  # informational; the server ignores it
TIMEOUT = "timeout"  # supervised: the supervisor stopped the job at its timeout

# -- kinds of start failure, and the exit code of each -----------------------

# Plain strings, not an Enum: importing enum would cost every job
# milliseconds.
SETUP = "setup"  # a step before execve() failed
NOT_EXECUTABLE = "not_executable"  # execve() failed, not ENOENT/ENOTDIR
NOT_FOUND = "not_found"  # execve() failed with ENOENT or ENOTDIR

# As a shell (and docker, systemd-run) reports them.
EXIT_SETUP_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

EXIT_CODES = {
    SETUP: EXIT_SETUP_FAILED,
    NOT_EXECUTABLE: EXIT_NOT_EXECUTABLE,
    NOT_FOUND: EXIT_NOT_FOUND,
}

# -- signals -------------------------------------------------------------------

# The signals the helper catches and forwards to the command's process
# group (Linux numbers, as the wire carries them): SIGTERM, SIGINT, SIGHUP,
# SIGQUIT, SIGUSR1, SIGUSR2.  The server sends only these (a signal request,
# a stop's SIGTERM); SIGKILL goes to the whole cgroup instead.
FORWARDED_SIGNALS = (15, 2, 1, 3, 10, 12)

# -- configuration (a JSON object) ---------------------------------------------

# Every key the helper accepts, with the value it takes when the key is
# missing; "argv" has none (it is required).  The helper refuses any other
# key, so that a misspelt option is not silently lost.
CONFIG_DEFAULTS: dict[str, Any] = {
    "argv": None,
    "env": {},
    "cwd": "/",
    "uid": None,
    "gid": None,
    "cgroup_procs": [],
    "isolate": True,
    "network": "none",
    "no_new_privs": True,
    "session_keyring": True,
    "clear_user_keyrings": False,
    "scratch_bytes": 0,
    "private_sys": False,
    "read_only_root": False,
    "hide": [],
    "inaccessible_file": None,
    # Isolated jobs only: the helper is the job's supervisor, PID 1 of its
    # PID namespace (the frames below, on fd 3 and on the listening
    # socket); see jobworker.host.isolate.
    "supervise": False,
    "timeout_ms": 0,  # supervised: stop the job this long after it started; 0: never
    "grace_ms": 10000,  # supervised: SIGKILL this long after the timeout's SIGTERM
    "retention": 1 << 30,  # supervised: output kept in the backlog while no server runs
}
CONFIG_KEYS = tuple(CONFIG_DEFAULTS)

# The values of "network".
NETWORK_NONE = "none"
NETWORK_HOST = "host"


def helper_config(**settings: object) -> dict[str, object]:
    """
    The helper's configuration with C{settings}, as a dict for JSON; a key
    the helper does not know raises C{KeyError} here, in the server, rather
    than failing every job.
    """
    unknown = [key for key in settings if key not in CONFIG_DEFAULTS]
    if unknown:
        raise KeyError(f"not a key of the helper's configuration: {', '.join(sorted(unknown))}")
    return dict(settings)


# -- the supervisor's socket ---------------------------------------------------
#
# A supervised job's helper (its supervisor) talks to a server over a
# stream socket: fd 3 (a socketpair with the server that started it) and the
# connections it accepts on the listening socket a later server connects to.
# Frames: a 1-byte kind, a 4-byte big-endian payload length, the payload.

# The descriptors a supervisor inherits besides 0-3.
STDOUT_READ_FD = 4  # the read end of the job's stdout pipe
STDERR_READ_FD = 5  # ... of its stderr pipe
LISTEN_FD = 6  # a bound, listening unix stream socket (STATE/run/<id>.sock)
BACKLOG_FD = 7  # STATE/jobs/<id>.backlog, empty: output read while no server is connected
END_FD = 8  # STATE/jobs/<id>.end, empty: the job's end, written once it ended
SUPERVISOR_FDS = (STDOUT_READ_FD, STDERR_READ_FD, LISTEN_FD, BACKLOG_FD, END_FD)
# The descriptors each request to the zygote carries, in this order: fds
# 1-8 of the supervisor it forks (see jobworker.host.isolate.run_zygote).
ZYGOTE_FDS = (1, 2, STATUS_FD, *SUPERVISOR_FDS)

# The state format the supervisor speaks (its hello, its end record, the
# backlog's frames); a server takes back only supervisors of a format it knows.
SUPERVISOR_FORMAT = 2

FRAME_HEADER = 5
# The largest payload: a data frame of 256 KiB of output plus its 9 bytes,
# with room to spare; a larger length is a broken peer.
MAX_FRAME = 1 << 20

# Supervisor -> server.
HELLO = 0x48  # "H": JSON: format, pid, lines, offset, backlog, ended, ...
LINE = 0x4C  # "L": one status line (as on the status pipe)
DATA = 0x44  # "D": fd (1 byte), offset (8 bytes), output bytes
CLOSED = 0x43  # "C": the job's output ended (both pipes at EOF)
END = 0x58  # "X": "<exit code> <signal>" of the job's init, as a helper's end; last frame
# Server -> supervisor.
ACK = 0x41  # "A": offset (8 bytes): output below it is stored by the server
SEND_SIGNAL = 0x53  # "S": signal number (1 byte): forward it; SIGKILL kills the job


def frame(kind: int, payload: bytes) -> bytes:
    return bytes((kind,)) + len(payload).to_bytes(4, "big") + payload


def data_header(fd: int, offset: int, length: int) -> bytes:
    """
    The frame header and the fd and offset of a data frame of C{length}
    output bytes (which follow it).
    """
    return bytes((DATA,)) + (9 + length).to_bytes(4, "big") + bytes((fd,)) + offset.to_bytes(8, "big")


def split_frames(buffer: bytes | bytearray, start: int = 0) -> tuple[list[tuple[int, bytes]], int]:
    """
    The whole frames in C{buffer} from C{start}, as (kind, payload), and
    the position after the last of them.

    @raise ValueError: a length over L{MAX_FRAME}.
    """
    frames = []
    position = start
    size = len(buffer)
    while size - position >= FRAME_HEADER:
        length = int.from_bytes(buffer[position + 1 : position + FRAME_HEADER], "big")
        if length > MAX_FRAME:
            raise ValueError(f"frame of {length} bytes (at most {MAX_FRAME})")
        end = position + FRAME_HEADER + length
        if end > size:
            break
        frames.append((buffer[position], bytes(buffer[position + FRAME_HEADER : end])))
        position = end
    return frames, position


def parse_data(payload: bytes) -> tuple[int, int, bytes]:
    """
    A data frame's (fd, offset, bytes).

    @raise ValueError: too short, or not fd 1 or 2.
    """
    if len(payload) < 9 or payload[0] not in (1, 2):
        raise ValueError("bad data frame")
    return payload[0], int.from_bytes(payload[1:9], "big"), payload[9:]
