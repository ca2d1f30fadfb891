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
