"""
The per-job isolation helper: a small stdlib-only program that puts one job
into its cgroups and namespaces, drops privileges and execs the command.

The server runs it by path, never imports it for this::

    python -I -S /path/to/jobworker/host/isolate.py CONFIG_JSON

(or with C{-} for CONFIG_JSON and the configuration written to stdin) or,
faster, runs the bytecode that L{compiled_helper} returns the same way, with
fd 0, 1 and 2 connected to the job's stdin, stdout and stderr, and the
write end of a status pipe inherited as fd 3.  The server must spawn it from a
long-lived thread (the reactor thread): the helper asks the kernel to kill it
with SIGKILL when the spawning *thread* exits.

Design
======

Process tree of an isolated job (C{"isolate": true})::

    server
      └─ outer     the server's direct child; in the server's PID namespace
           └─ init     PID 1 of a new PID namespace; new mount (and network) ns
                └─ command   the job's program, in a session of its own
                     └─ ...  anything the command starts

  - B{outer} exists because unshare(CLONE_NEWPID) does not move the caller
    into the new namespace, only its next child.  It is the process the
    server spawned, so the server's SIGTERM goes to it; it forwards SIGTERM,
    SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to init and exits with init's
    exit code.  It closes fd 3 at once, so the status pipe reaches EOF exactly
    when init (the only writer) is gone.
    Outer also does the namespace set-up that needs no PID namespace, before
    it forks: the mounts (a read-only host for a uid of its own, the hidden
    paths, the private C{/tmp}, C{/var/tmp} and C{/dev/shm}, a fresh
    C{/sys}; all in the job's mount namespace, made private first, so none
    ever appears in the host's and all go when the namespace's last process
    ends) and loopback.
  - B{init} must be a process of its own because PID 1 of a namespace has
    duties no ordinary command fulfils: orphans are reparented to it and it
    must reap them, and the kernel drops signals to it that it has no handler
    for.  It mounts a fresh C{/proc} (which must be done from inside the new
    PID namespace to show only it), brings up loopback, starts the command,
    reports its fate on fd 3, forwards signals to the command's process group,
    and when the command ends kills everything else in the namespace, so that
    no background process outlives its job.
  - The B{command} drops privileges itself, after init has done the
    privileged set-up.  Whether its execve() worked is learnt through a
    close-on-exec pipe: EOF with no data means the exec succeeded.

A direct job (C{"isolate": false}) has no outer and no init: the helper execs
the command in place, so the server's child is the command itself, and fd 3
is made close-on-exec, so EOF without a C{failed} line means "started".

Every process joins the job's cgroups before anything else, so the
command's very first instruction already runs under the job's limits.  Note
that outer and init count against a C{pids} limit (2 processes).

Supervised jobs (C{"supervise": true}, what the server runs for every
isolated job) have no outer and no init: one process, the job's
B{supervisor} (L{Supervisor}; the server's side is
L{jobworker.jobs.supervisor}), is PID 1 of the job's PID namespace (the
zygote forks it into a new one, L{fork_pid_one}; a helper the server
started itself forks itself into one, L{become_pid_one}), and does what
outer and init do between them (L{run_supervisor}), then stays until the
job has ended and its end is recorded::

    server ─ socket ─ supervisor   PID 1 of a new PID namespace; outside the
                        │          job's cgroups; no parent-death signal
                        └─ command   joins the job's cgroups first thing
                             └─ ...

It does not join the job's cgroups (the command does, through
C{cgroup.procs} files the supervisor opened before the mounts hid them:
only the command and what it starts count against a C{pids} limit, and a
kill of the cgroup leaves the supervisor to read the job's last output),
it has no parent-death signal (it outlives a server that dies; the job
dies with it, as a PID namespace does with its PID 1), and fd 3 is a
socket that carries frames (L{contract.frame}) rather than status lines.
It inherits, besides fds 0-3, the read ends of the job's stdout and stderr
pipes (4, 5: nobody else holds them), a listening socket (6) a later
server connects to, and the empty backlog and end files (7, 8), all made
by the server: the supervisor runs in the job's mount namespace, where the
state directory is hidden.  One process per job rather than two halves
what a running job costs (both were forks of the zygote, each with its
own copy of the pages it wrote).

Signals sent before the forwarding handlers exist must not be lost: the
forwarded signals are blocked before init is forked and unblocked only once
the process has somewhere to forward them to.  A blocked signal sent to
init stays pending even though PID 1 otherwise discards signals it has no
handler for.

Start-up time and memory are paid once per job, so the helper imports as
little as it can: C{posix}, C{_signal} and C{_json}'s scanner rather than
C{os}, C{signal} and C{json}, whose Python wrappers pull in C{enum}, C{re}
and more, and C{_ctypes}, the C core of C{ctypes}, for unshare(2), mount(2)
and prctl(2), which Python 3.11 lacks.  The cyclic garbage collector is
disabled: outer and init share their memory copy-on-write after the fork,
and a collection would copy every page it traverses.  Even so, outer and
init of a running job hold about 3.3 MiB of memory that no other process
shares when run from L{compiled_helper}'s bytecode (4.6 MiB from source),
nearly all of it the Python interpreter's own start-up state
(C{tests/host/test_isolate.py} measures it).  A supervisor forked by the
zygote holds about 0.9 MiB (C{tests/host/test_supervisor.py}): the zygote
has loaded everything it uses (C{_ctypes} and the C library's binding
among it, ~0.4 MiB a job otherwise), and the job's set-up is done by the
command's child, whose copies go at its execve().

Configuration (argv[1], a JSON object, or "-" to read it from stdin)
====================================================================

  - C{argv}: non-empty list of str.  argv[0] without a slash is looked up in
    the job's C{PATH} (default C{/bin:/usr/bin}), like execvpe(3), except
    that a file without C{#!} is not handed to C{/bin/sh}.
  - C{env}: object str -> str, the command's complete environment (default
    empty: nothing is inherited from the server).
  - C{cwd}: str, the directory to run in, entered after dropping privileges
    (default C{"/"}).
  - C{uid}, C{gid}: int or null (default null: keep the current user or
    group).  If either is set, supplementary groups are dropped, then the gid
    and then the uid are set.
  - C{cgroup_procs}: list of str, paths of C{cgroup.procs} files to write the
    helper's pid into (default empty).
  - C{isolate}: bool (default true): new PID, mount, IPC and network
    namespaces.
  - C{network}: C{"none"} (default: a new network namespace with only
    loopback, up) or C{"host"}.  Only isolated jobs get a namespace: without
    C{isolate} the job always has the host's network, and a server that
    must honour a client's C{"none"} has to refuse such a job itself.
  - C{no_new_privs}: bool (default true): set PR_SET_NO_NEW_PRIVS for the
    command.
  - C{session_keyring}: bool (default true): give the command a new, empty
    session keyring (keyrings(7)) before it drops privileges, rather than
    the server's: a job must not read or write keys of the server's, nor
    of other jobs, which would otherwise inherit the same one.  (Keyrings
    are in no namespace.)  Skipped where the kernel has no keyrings or
    keyctl(2) is filtered (ENOSYS, EPERM): then a job has none either.
  - C{clear_user_keyrings}: bool (default false): for a uid of the job's
    own: once the command runs as it, empty that uid's user, user-session
    and persistent keyrings, which outlive every process of the uid (the
    kernel keeps them for the uid, not for a process), so that a job never
    finds keys that an earlier job with the same uid left there (one
    that an earlier job made unreachable to its uid stays so, for this
    job too).  Never for a named user: those keys are the user's.
  - C{scratch_bytes}: int (default 0: none): isolated jobs only: give each
    of C{/tmp}, C{/var/tmp} and C{/dev/shm} that exists a fresh directory
    (mode 1777) of one new tmpfs (nosuid, nodev) of at most this many bytes
    for all three together, so the job's scratch files are its own and go
    with its mount namespace.  Its pages are charged to the memory cgroup of
    the process that writes them, that is to the job's.
  - C{private_sys}: bool (default false): isolated jobs with their own
    network namespace only: mount a fresh read-only sysfs on C{/sys}, which
    shows that namespace's interfaces only (and hides the host's cgroup
    hierarchies mounted below C{/sys}).
  - C{read_only_root}: bool (default false): isolated jobs only: make every
    mount the job inherits from the host read-only (mount_setattr(2) with
    C{AT_RECURSIVE}), so that the only places it can write are its own
    scratch mounts; for a uid of its own, whose files elsewhere a later job
    with the same uid could read.
  - C{hide}: list of absolute paths (default empty): isolated jobs only: made
    unreachable inside the job's mount namespace, as systemd's
    C{InaccessiblePaths=} does: a directory is covered by an empty
    read-only tmpfs of mode 000, a file by a bind mount of
    C{inaccessible_file}.  A path that does not exist is skipped.
  - C{inaccessible_file}: str or null: an empty regular file owned by root,
    the source of the bind mounts over hidden files (its mode is set to 000
    before each use); needed only when C{hide} names a file.

Unknown keys are refused, so that a misspelt option is not silently lost.

Status pipe (fd 3)
==================

ASCII lines, each ended by C{"\\n"}, at most 4096 bytes (so each write is
atomic), one per event:

  - C{started}: isolated jobs only: the command's execve() succeeded (or
    its process was killed just before, which the next line then says).
  - C{failed <kind> <errno> <message>}: the command never ran.  C{<errno>}
    is the decimal errno value (0 when the failure was not an OS error);
    C{<message>} is free text without newlines, e.g. C{chdir /nope: No such
    file or directory}.  C{<kind>} is one of:
      - C{not_found}: execve() failed with ENOENT or ENOTDIR; exit code 127.
      - C{not_executable}: execve() failed otherwise (EACCES, ENOEXEC, EISDIR,
        EPERM, E2BIG...); exit code 126.
      - C{setup}: a step before execve() failed (config, cgroup join, unshare,
        mount, loopback, user, chdir); exit code 125.
  - C{exit <code>}: isolated jobs only: the command exited with C{<code>}.
  - C{signal <n>}: isolated jobs only: the command was killed by signal
    C{<n>}.

A job writes either C{failed} alone, or C{started} followed by one C{exit} or
C{signal} line (isolated), or nothing at all (direct: the exec closed fd 3).
Lines after a C{failed}, C{exit} or C{signal} line never come.

The helper's own exit status mirrors the command's: its exit code, or for an
isolated command killed by signal N, exit code 128+N (PID 1 cannot kill
itself with a signal), so the status line, not the exit status, tells a
command that exited with 128+N from one that was killed.  If the status pipe
ends with no final line, the helper itself was killed (for instance by the
cgroup's OOM killer or the server's SIGKILL).

Why it is one module of over 400 lines: it is one program, run by path
with C{python -I -S} in the job's process before the command; it imports
only the standard library and its sibling L{jobworker.host.contract} (by
path, not through the package), and every job pays for each module it
loads, so everything the helper does between fork and exec lives here.
"""

from __future__ import annotations

import errno
import gc
import sys

# isort: split
# The C modules, not os.py and signal.py: those wrappers import posixpath,
# stat, _collections_abc and enum, which cost every job milliseconds and
# memory.
import _signal
import posix

# Recorded before anything slow, to notice a server that died before the
# parent-death signal was armed.
_PARENT_PID = posix.getppid()

# The contract with the server (configuration keys, status words, exit
# codes), shared with it.  Run as a program the helper is no part of a
# package, and -I keeps its own directory off sys.path: the sibling file is
# found by putting that directory there for this one import.
if __package__:
    from jobworker.host.contract import (
        ACK,
        BACKLOG_FD,
        CLOSED,
        CONFIG_DEFAULTS,
        CONFIG_KEYS,
        END,
        END_FD,
        EXIT,
        EXIT_CODES,
        EXIT_NOT_EXECUTABLE,
        EXIT_NOT_FOUND,
        EXIT_SETUP_FAILED,
        FAILED,
        FORWARDED_SIGNALS,
        HELLO,
        LINE,
        LISTEN_FD,
        MAX_STATUS_LINE,
        NETWORK_HOST,
        NETWORK_NONE,
        NOT_EXECUTABLE,
        NOT_FOUND,
        SEND_SIGNAL,
        SETUP,
        SIGNAL,
        STARTED,
        STATUS_FD,
        STDERR_READ_FD,
        STDOUT_READ_FD,
        SUPERVISOR_FORMAT,
        TIMEOUT,
        ZYGOTE_FDS,
        data_header,
        frame,
        split_frames,
    )
else:
    sys.path.insert(0, __file__.rpartition("/")[0] or ".")
    try:
        from contract import (  # type: ignore[import-not-found,no-redef]
            ACK,
            BACKLOG_FD,
            CLOSED,
            CONFIG_DEFAULTS,
            CONFIG_KEYS,
            END,
            END_FD,
            EXIT,
            EXIT_CODES,
            EXIT_NOT_EXECUTABLE,
            EXIT_NOT_FOUND,
            EXIT_SETUP_FAILED,
            FAILED,
            FORWARDED_SIGNALS,
            HELLO,
            LINE,
            LISTEN_FD,
            MAX_STATUS_LINE,
            NETWORK_HOST,
            NETWORK_NONE,
            NOT_EXECUTABLE,
            NOT_FOUND,
            SEND_SIGNAL,
            SETUP,
            SIGNAL,
            STARTED,
            STATUS_FD,
            STDERR_READ_FD,
            STDOUT_READ_FD,
            SUPERVISOR_FORMAT,
            TIMEOUT,
            ZYGOTE_FDS,
            data_header,
            frame,
            split_frames,
        )
    finally:
        del sys.path[0]

__all__ = [
    "CONFIG_KEYS",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "EXIT_SETUP_FAILED",
    "FORWARDED_SIGNALS",
    "MAX_STATUS_LINE",
    "STATUS_FD",
    "JobConfig",
    "StartError",
    "compiled_helper",
    "main",
    "parse_config",
]

# Python ignores these at start-up; a command expects them at their default.
_PYTHON_IGNORED_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ)

# execvp(3)'s search path when the environment has no PATH.
DEFAULT_PATH = "/bin:/usr/bin"

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# <linux/mount.h>
MS_NOSUID = 2
MS_NODEV = 4
MS_RDONLY = 1
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 0x4000
MS_PRIVATE = 0x40000
# <linux/mount.h>, <fcntl.h>, the syscall number (the same on every
# architecture since 5.12).
SYS_MOUNT_SETATTR = 442
MOUNT_ATTR_RDONLY = 0x1
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
SIZEOF_MOUNT_ATTR = 32
# Where a job gets a private tmpfs (C{scratch_bytes}).
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# Inodes per byte of a scratch tmpfs: one per 4 KiB, at least 1024.  Each
# inode costs the kernel about 1 KiB that a byte limit does not count.
SCRATCH_BYTES_PER_INODE = 4096
MIN_SCRATCH_INODES = 1024
# <linux/sockios.h>, <net/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
SIZEOF_IFREQ = 40
AF_INET = 2
SOCK_DGRAM = 2
SOCK_CLOEXEC = 0o2000000
# <dlfcn.h>
RTLD_NOW = 2
# <linux/keyctl.h>.  keyctl(2) predates the common syscall table, so its
# number depends on the architecture (uname -m).
SYS_KEYCTL = {
    "x86_64": 250,
    "aarch64": 219,
    "riscv64": 219,
    "ppc64le": 271,
    "ppc64": 271,
    "s390x": 280,
    "i686": 288,
    "i386": 288,
    "armv7l": 311,
    "armv6l": 311,
}
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_SETPERM = 5
KEYCTL_CLEAR = 7
KEYCTL_UNLINK = 9
KEYCTL_GET_PERSISTENT = 22
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5
# The permissions the kernel gives a uid's new user keyrings: all but
# setattr to their possessor, all to their user (KEY_POS_* | KEY_USR_*).
USER_KEYRING_PERM = 0x1F3F0000


class StartError(Exception):
    """
    The command could not be started; reported as a C{failed} status line.
    """

    def __init__(self, kind: str, error: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = error
        self.message = message

    @classmethod
    def from_os_error(cls, kind: str, what: str, error: OSError) -> StartError:
        code = error.errno or 0
        return cls(kind, code, f"{what}: {posix.strerror(code)}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]

    def status_fields(self) -> str:
        """
        C{"<kind> <errno> <message>"}, the message made single-line.
        """
        message = self.message.replace("\n", " ").replace("\r", " ")
        return f"{self.kind} {self.errno} {message}"


class JobConfig:
    """
    The validated CONFIG_JSON; see the module docstring for the keys.
    """

    __slots__ = CONFIG_KEYS

    def __init__(self, raw: object) -> None:
        if not isinstance(raw, dict):
            raise _bad_config("not a JSON object")
        unknown = set(raw) - set(CONFIG_KEYS)
        if unknown:
            raise _bad_config(f"unknown keys {sorted(unknown)}")
        self.argv = raw.get("argv")
        if not (
            isinstance(self.argv, list)
            and self.argv
            and all(isinstance(a, str) and "\0" not in a for a in self.argv)
        ):
            raise _bad_config("argv must be a non-empty list of strings")
        self.env = raw.get("env", CONFIG_DEFAULTS["env"])
        if not isinstance(self.env, dict) or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and k
            and "=" not in k
            and "\0" not in k + v
            for k, v in self.env.items()
        ):
            raise _bad_config("env must map names to strings")
        self.cwd = raw.get("cwd", CONFIG_DEFAULTS["cwd"])
        if not isinstance(self.cwd, str) or not self.cwd or "\0" in self.cwd:
            raise _bad_config("cwd must be a path")
        self.uid = _optional_id(raw, "uid")
        self.gid = _optional_id(raw, "gid")
        self.cgroup_procs = raw.get("cgroup_procs", CONFIG_DEFAULTS["cgroup_procs"])
        if not isinstance(self.cgroup_procs, list) or not all(
            isinstance(p, str) for p in self.cgroup_procs
        ):
            raise _bad_config("cgroup_procs must be a list of paths")
        self.isolate = _flag(raw, "isolate")
        self.network = raw.get("network", CONFIG_DEFAULTS["network"])
        if self.network not in (NETWORK_NONE, NETWORK_HOST):
            raise _bad_config("network must be 'none' or 'host'")
        self.no_new_privs = _flag(raw, "no_new_privs")
        self.session_keyring = _flag(raw, "session_keyring")
        self.clear_user_keyrings = _flag(raw, "clear_user_keyrings")
        self.scratch_bytes = _optional_id(raw, "scratch_bytes") or CONFIG_DEFAULTS["scratch_bytes"]
        self.private_sys = _flag(raw, "private_sys")
        self.read_only_root = _flag(raw, "read_only_root")
        self.hide = raw.get("hide", CONFIG_DEFAULTS["hide"])
        if not isinstance(self.hide, list) or not all(
            isinstance(p, str) and p.startswith("/") and "\0" not in p for p in self.hide
        ):
            raise _bad_config("hide must be a list of absolute paths")
        self.inaccessible_file = raw.get("inaccessible_file", CONFIG_DEFAULTS["inaccessible_file"])
        if self.inaccessible_file is not None and not (
            isinstance(self.inaccessible_file, str) and self.inaccessible_file.startswith("/")
        ):
            raise _bad_config("inaccessible_file must be an absolute path or null")
        self.supervise = _flag(raw, "supervise")
        if self.supervise and not self.isolate:
            raise _bad_config("supervise needs isolate")
        self.timeout_ms = _optional_id(raw, "timeout_ms") or 0
        grace_ms = _optional_id(raw, "grace_ms")
        self.grace_ms: int = CONFIG_DEFAULTS["grace_ms"] if grace_ms is None else grace_ms
        retention = _optional_id(raw, "retention")
        self.retention: int = CONFIG_DEFAULTS["retention"] if retention is None else retention


def _bad_config(reason: str) -> StartError:
    return StartError(SETUP, errno.EINVAL, f"bad config: {reason}")


def _optional_id(raw: dict[str, object], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad_config(f"{key} must be a non-negative integer or null")
    return value


def _flag(raw: dict[str, object], key: str) -> bool:
    value = raw.get(key, CONFIG_DEFAULTS[key])
    if not isinstance(value, bool):
        raise _bad_config(f"{key} must be true or false")
    return value


class _JSONContext:
    """
    The settings C{_json.make_scanner} reads; the same as C{json.loads}'.
    """

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def parse_config(text: str) -> JobConfig:
    """
    Parse and validate CONFIG_JSON.

    Uses the C scanner behind C{json.loads} directly: importing C{json}
    would import C{re} and C{enum} too, several milliseconds per job.  The
    scanner can only describe a syntax error once C{json.decoder} is
    imported, so malformed input is parsed again by C{json.loads} for its
    message; that slow path is a bug in the server anyway.
    """
    try:
        from _json import make_scanner

        text = text.strip(" \t\n\r")
        # _json's scanner reads these settings off any object; typeshed
        # wants a JSONDecoder, which would import json.decoder.
        raw, end = make_scanner(_JSONContext())(text, 0)  # type: ignore[arg-type]
        if end != len(text):
            raise ValueError(f"extra data at character {end}")
    except Exception:
        from json import loads

        try:
            raw = loads(text)
        except ValueError as e:
            raise _bad_config(f"not JSON ({e})") from None
    return JobConfig(raw)


_c_library = None


def c_call(name: str, *args: int | bytes | None) -> int:
    """
    Call the C library's function C{name} and return its C{int} result;
    -1 raises C{OSError} with C{errno}.

    Integers are passed as C{unsigned long}: every one here is a flag word
    or a prctl(2) argument, which the kernel reads as a whole register;
    C{bytes} as C{char *} and C{None} as C{NULL}.

    Bound through C{_ctypes}, the C core of C{ctypes}: the C{ctypes}
    package imports C{os}, C{struct} and its own Python code, about
    0.35 MiB and 2.5 ms per job (CPython 3.11).  Loaded on first use, so
    that importing this module, for its constants or its path, stays cheap.
    """
    global _c_library
    if _c_library is None:
        import _ctypes

        # typeshed makes _SimpleCData generic; at run time (3.11) it cannot
        # be subscripted.
        class CInt(_ctypes._SimpleCData):  # type: ignore[type-arg]
            _type_ = "i"

        class CULong(_ctypes._SimpleCData):  # type: ignore[type-arg]  # as CInt
            _type_ = "L"

        class CFunction(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = CInt

        class Library:
            # dlopen(NULL): the program itself, which links the C library.
            _handle = _ctypes.dlopen(None, RTLD_NOW)  # type: ignore[arg-type]  # NULL is allowed

        _c_library = (CFunction, Library, CULong, _ctypes.get_errno)
    function_type, library, ulong, get_errno = _c_library
    # A (name, object with a _handle) pair, which typeshed does not describe.
    function = function_type((name, library))  # type: ignore[arg-type]
    result: int = function(*(ulong(a) if isinstance(a, int) else a for a in args))
    if result == -1:
        code = get_errno()
        raise OSError(code, posix.strerror(code))
    return result


def prctl(option: int, arg: int) -> None:
    """
    prctl(2) with one argument, the others zero as the kernel requires.
    """
    c_call("prctl", option, arg, 0, 0, 0)


def die_with_parent(check_parent: bool = True) -> None:
    """
    Arm SIGKILL for when the spawning thread exits, and exit now if the
    parent is already gone (when C{check_parent}).

    Must be called again after a change of credentials, which disarms it.
    Init cannot check: its parent lies outside its PID namespace, where
    getppid() is always 0; a server that dies in the microseconds between
    init's fork and this call leaves the job to the server's clean-up of
    its cgroups on the next start.
    """
    try:
        prctl(PR_SET_PDEATHSIG, _signal.SIGKILL)
    except OSError as e:
        raise StartError.from_os_error(SETUP, "prctl PDEATHSIG", e) from None
    if check_parent and posix.getppid() != _PARENT_PID:
        posix._exit(EXIT_SETUP_FAILED)


def new_session() -> None:
    """
    Lead a new session and process group, so that the job can be signalled
    as a group and is out of reach of the server's terminal.
    """
    try:
        posix.setsid()
    except OSError as e:
        # Already a session leader: the spawner did it for us.
        if posix.getsid(0) != posix.getpid():
            raise StartError.from_os_error(SETUP, "setsid", e) from None


# fd 3 is a supervisor's socket (see report).
_framed = False


def report(line: str) -> None:
    """
    Write one status line to fd 3.

    A server that stopped listening is not an error for the job: the write is
    dropped.
    """
    data = line.encode("ascii", "backslashreplace")[: MAX_STATUS_LINE - 1]
    try:
        if _framed:
            # A supervised helper before its supervisor runs: fd 3 is the
            # socket, which carries frames.
            posix.write(STATUS_FD, frame(LINE, data))
        else:
            posix.write(STATUS_FD, data + b"\n")
    except OSError:
        pass


def join_cgroups(procs_files: list[str]) -> None:
    """
    Move this process into each cgroup, so its descendants start inside.
    """
    join_cgroup_files(open_cgroups(procs_files))


def open_cgroups(procs_files: list[str]) -> list[tuple[str, int]]:
    """
    Open each C{cgroup.procs} file for writing (before the mounts of the
    job's namespace hide the host's cgroup file systems).
    """
    opened: list[tuple[str, int]] = []
    for path in procs_files:
        try:
            opened.append((path, posix.open(path, posix.O_WRONLY | posix.O_CLOEXEC)))
        except OSError as e:
            for _, fd in opened:
                posix.close(fd)
            raise StartError.from_os_error(SETUP, f"cgroup join {path}", e) from None
    return opened


def join_cgroup_files(opened: list[tuple[str, int]], pid: int = 0) -> None:
    """
    Move process C{pid} (default 0: this one) into the cgroup of each open
    C{cgroup.procs} file, and close them.  A pid is read in the writer's
    PID namespace (where init is 1).
    """
    try:
        for path, fd in opened:
            try:
                posix.write(fd, b"%d" % pid)
            except OSError as e:
                raise StartError.from_os_error(SETUP, f"cgroup join {path}", e) from None
    finally:
        for _, fd in opened:
            posix.close(fd)


def unshare(network: str, pid: bool = True) -> None:
    """
    New mount and IPC namespaces, a new PID namespace (for our next child)
    unless C{pid} is false (a supervisor is PID 1 of one already) and,
    unless the job shares the host's network, a new network namespace.

    The IPC namespace keeps System V IPC objects and POSIX message queues
    private to the job and frees them when it ends (systemd's C{RemoveIPC=}).
    """
    flags = CLONE_NEWNS | CLONE_NEWIPC | (CLONE_NEWPID if pid else 0)
    if network == NETWORK_NONE:
        flags |= CLONE_NEWNET
    try:
        c_call("unshare", flags)
    except OSError as e:
        raise StartError.from_os_error(SETUP, "unshare", e) from None


def make_mounts_private() -> None:
    """
    Stop mount events propagating between the job's mount namespace and
    the host's, both ways: a mount inside must never appear outside.
    """
    try:
        c_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    except OSError as e:
        raise StartError.from_os_error(SETUP, "make / private", e) from None


def _mount(source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None, what: str) -> None:
    try:
        c_call("mount", source, target.encode(), fstype, flags, data)
    except OSError as e:
        raise StartError.from_os_error(SETUP, f"{what} {target}", e) from None


def _is_directory(path: str) -> bool | None:
    """
    True for a directory, False for anything else, None if C{path} is missing.
    """
    try:
        mode = posix.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StartError.from_os_error(SETUP, f"stat {path}", e) from None
    return (mode & 0o170000) == 0o040000


def make_root_read_only() -> None:
    """
    Make every mount of the job's namespace read-only, in one call.

    mount_setattr(2) (Linux 5.12) is the only way to do it recursively and
    atomically; without it the job is refused rather than given a writable
    host.
    """
    attr = MOUNT_ATTR_RDONLY.to_bytes(8, sys.byteorder) + bytes(SIZEOF_MOUNT_ATTR - 8)
    try:
        c_call("syscall", SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, attr, SIZEOF_MOUNT_ATTR)
    except OSError as e:
        raise StartError.from_os_error(SETUP, "make / read-only (mount_setattr)", e) from None


def mount_scratch(size: int) -> None:
    """
    One fresh tmpfs of C{size} bytes, shared by every scratch directory
    that exists: each gets a directory of its own on it (mode 1777), bound
    over it.  One file system rather than one each, so that C{size} bounds
    them together: the most a job can put in memory this way.

    The tmpfs is mounted first on the last scratch directory, where the
    directories are made; that one's own bind goes on top of it last.
    """
    targets = [path for path in SCRATCH_DIRS if _is_directory(path)]
    if not targets:
        return
    stage = targets[-1]
    inodes = max(MIN_SCRATCH_INODES, size // SCRATCH_BYTES_PER_INODE)
    data = b"mode=0755,size=%d,nr_inodes=%d" % (size, inodes)
    _mount(b"tmpfs", stage, b"tmpfs", MS_NOSUID | MS_NODEV, data, "mount tmpfs on")
    sources = []
    for path in targets:
        source = stage + "/" + path.strip("/").replace("/", "-")
        try:
            posix.mkdir(source, 0o700)
            # chmod, not mkdir's mode: the umask would take the sticky bit's
            # neighbours away.
            posix.chmod(source, 0o1777)
        except OSError as e:
            raise StartError.from_os_error(SETUP, f"mkdir {source}", e) from None
        sources.append(source)
    for path, source in zip(targets, sources, strict=True):
        _mount(source.encode(), path, None, MS_BIND, None, "bind scratch on")


def mount_sys() -> None:
    """
    A fresh, read-only sysfs on C{/sys}: it shows the network namespace of
    its mounter, the job's.
    """
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    _mount(b"sysfs", "/sys", b"sysfs", flags, None, "mount sysfs on")


def hide_paths(paths: list[str], inaccessible_file: str | None) -> None:
    """
    Cover each path: files first, with a bind mount of an empty mode-000
    file, then directories, with an empty read-only tmpfs of mode 000 (so a
    hidden file inside a hidden directory is covered twice, harmlessly).
    """
    kinds = [(path, _is_directory(path)) for path in paths]
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    for path, is_directory in kinds:
        if is_directory is False:
            if inaccessible_file is None:
                raise StartError(SETUP, errno.EINVAL, "bad config: no inaccessible_file to hide files with")
            _mount(inaccessible_file.encode(), path, None, MS_BIND, None, "hide")
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None, "hide")
    for path, is_directory in kinds:
        if is_directory:
            _mount(b"tmpfs", path, b"tmpfs", MS_RDONLY | flags, b"mode=000,size=4k,nr_inodes=16", "hide")


def _check_inaccessible_file(path: str | None) -> None:
    """
    Make sure the source of the bind mounts over hidden files is an empty
    regular file of root's with mode 000, and make its mode so if someone
    loosened it (a C{chmod -R} of the state dir): its mode is what a job
    sees in place of the hidden file's.
    """
    if path is None:
        return
    try:
        info = posix.stat(path, follow_symlinks=False)
        if (info.st_mode & 0o170000) != 0o100000 or info.st_uid != 0 or info.st_size != 0:
            raise StartError(SETUP, errno.EINVAL, f"{path} is not an empty regular file of root's")
        if info.st_mode & 0o7777:
            posix.chmod(path, 0)
    except OSError as e:
        raise StartError.from_os_error(SETUP, f"inaccessible file {path}", e) from None


def mount_proc() -> None:
    """
    Mount a C{/proc} that shows only the job's PID namespace.

    Runs in init (or the supervisor, PID 1 itself): a proc mount shows the
    PID namespace of its mounter.
    """
    try:
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        c_call("mount", b"proc", b"/proc", b"proc", flags, None)
    except OSError as e:
        raise StartError.from_os_error(SETUP, "mount /proc", e) from None


def bring_up_loopback() -> None:
    """
    Set IFF_UP on C{lo}; a new network namespace starts with it down.

    Through ioctl(2) on a throw-away socket, as C{ip link set lo up} does,
    without needing an C{ip} binary on the host.
    """
    import fcntl

    # struct ifreq: the name, then (in a union) the flags, a native short.
    request = bytearray(SIZEOF_IFREQ)
    request[:2] = b"lo"
    flags = slice(IFNAMSIZ, IFNAMSIZ + 2)
    fd = -1
    try:
        fd = c_call("socket", AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)
        fcntl.ioctl(fd, SIOCGIFFLAGS, request, True)
        up = int.from_bytes(request[flags], sys.byteorder) | IFF_UP
        request[flags] = up.to_bytes(2, sys.byteorder)
        fcntl.ioctl(fd, SIOCSIFFLAGS, request, True)
    except OSError as e:
        raise StartError.from_os_error(SETUP, "bring up lo", e) from None
    finally:
        if fd >= 0:
            posix.close(fd)


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """
    Become C{uid}:C{gid} with no supplementary groups; C{None} keeps the
    current id.  Groups first: once the uid changes, we may no longer.
    """
    try:
        if uid is not None or gid is not None:
            posix.setgroups([])
        if gid is not None:
            posix.setgid(gid)
        if uid is not None:
            posix.setuid(uid)
    except OSError as e:
        raise StartError.from_os_error(SETUP, f"set user {uid}:{gid}", e) from None


def keyctl(operation: int, *args: int | bytes | None) -> int:
    """
    keyctl(2); C{OSError} on failure (ENOSYS on an architecture whose
    syscall number L{SYS_KEYCTL} does not know).
    """
    number = SYS_KEYCTL.get(posix.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, posix.strerror(errno.ENOSYS))
    return c_call("syscall", number, operation, *args)


# keyctl(2) refused as a whole: no keyrings in the kernel, or a seccomp
# filter or LSM that forbids them; a job then cannot use any either.
_NO_KEYRINGS = (errno.ENOSYS, errno.EPERM)

# A keyring that this process may not use: an earlier job of its uid took
# the permissions off it (or revoked it).
_UNREACHABLE_KEYRING = (errno.EACCES, errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED)


def join_new_session_keyring() -> bool:
    """
    Replace the inherited session keyring with a new anonymous one; False
    if this kernel offers no keyrings to us.

    Done before privileges are dropped, so that the keyring (owned by the
    server's user, possessed by the job alone) costs the job's uid none of
    its key quota, which an earlier job with the same uid may have used up.
    """
    try:
        keyctl(KEYCTL_JOIN_SESSION_KEYRING, None)
    except OSError as e:
        if e.errno in _NO_KEYRINGS:
            return False
        raise StartError.from_os_error(SETUP, "new session keyring", e) from None
    return True


def clear_user_keyrings() -> None:
    """
    Empty the current uid's user, user-session and persistent keyrings.

    An earlier job of the uid may have taken the permissions off them, as
    their owner may.  Those a keyring's owner may put back are put back
    first; a keyring that still cannot be cleared is one this job cannot
    reach either (the kernel looks up a uid's user and user-session
    keyrings together, and refuses both if either refuses it), so nothing
    in it can leak to the job and it is left as it is: refusing the job
    would let one job make its uid unusable until the host reboots.
    """
    for ring, what in (
        (KEY_SPEC_USER_KEYRING, "user keyring"),
        (KEY_SPEC_USER_SESSION_KEYRING, "user session keyring"),
    ):
        try:
            keyctl(KEYCTL_SETPERM, ring, USER_KEYRING_PERM)
        except OSError:
            pass  # the clear says whether it matters
        if not _clear_keyring(ring, what):
            return
    try:
        # Linked into the session keyring to be reached at all (-1: the
        # current uid's).  Its owner cannot change its permissions.
        persistent = keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_SESSION_KEYRING)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, *_NO_KEYRINGS, *_UNREACHABLE_KEYRING):
            return  # no persistent keyrings here, or none this job can reach
        raise StartError.from_os_error(SETUP, "persistent keyring", e) from None
    if _clear_keyring(persistent, "persistent keyring"):
        try:
            keyctl(KEYCTL_UNLINK, persistent, KEY_SPEC_SESSION_KEYRING)
        except OSError as e:
            raise StartError.from_os_error(SETUP, "unlink persistent keyring", e) from None


def _clear_keyring(ring: int, what: str) -> bool:
    """
    KEYCTL_CLEAR C{ring}; False if this process has no keyrings at all.
    """
    try:
        keyctl(KEYCTL_CLEAR, ring)
    except OSError as e:
        if e.errno in _NO_KEYRINGS:
            return False
        if e.errno not in _UNREACHABLE_KEYRING:
            raise StartError.from_os_error(SETUP, f"clear {what}", e) from None
    return True


def prepare_command(config: JobConfig) -> None:
    """
    The steps, common to both modes, between the privileged set-up and
    execve(): keyrings, user, no_new_privs, directory, clean signal state.
    """
    keyrings = join_new_session_keyring() if config.session_keyring else True
    drop_privileges(config.uid, config.gid)
    if config.clear_user_keyrings and keyrings:
        clear_user_keyrings()
    if config.no_new_privs:
        try:
            prctl(PR_SET_NO_NEW_PRIVS, 1)
        except OSError as e:
            raise StartError.from_os_error(SETUP, "prctl NO_NEW_PRIVS", e) from None
    try:
        posix.chdir(config.cwd)
    except OSError as e:
        raise StartError.from_os_error(SETUP, f"chdir {config.cwd}", e) from None
    # Handlers are reset by execve() but ignored dispositions and the
    # signal mask are inherited.
    for signum in FORWARDED_SIGNALS + _PYTHON_IGNORED_SIGNALS:
        _signal.signal(signum, _signal.SIG_DFL)


def close_fds(keep: int) -> None:
    """
    Close every file descriptor but stdio and C{keep}, so the command
    inherits nothing of the server's or the helper's.

    Lists C{/proc/self/fd} rather than calling C{os.closerange()}, which,
    where close_range(2) is missing (Linux before 5.9), calls close(2) on
    every number up to its bound.
    """
    try:
        names = posix.listdir("/proc/self/fd")
    except OSError as e:
        raise StartError.from_os_error(SETUP, "list /proc/self/fd", e) from None
    for name in names:
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                posix.close(fd)
            except OSError:
                # The descriptor listdir() itself used, closed already.
                pass


def exec_command(argv: list[str], env: dict[str, str]) -> None:
    """
    execve() the command, searching the job's PATH like execvpe(3); returns
    only by raising C{StartError}.

    As in execvp(3), a candidate that exists but cannot be run does not stop
    the search, but is what gets reported if nothing else is found.
    """
    name = argv[0]
    if "/" in name:
        candidates = [name]
    else:
        path = env.get("PATH", DEFAULT_PATH)
        candidates = [f"{d or '.'}/{name}" for d in path.split(":")]
    denied: OSError | None = None
    missing: OSError | None = None
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
    for candidate in candidates:
        try:
            posix.execve(candidate, argv, env)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                missing = e
            elif e.errno == errno.EACCES:
                denied = e
            else:
                raise StartError.from_os_error(
                    NOT_EXECUTABLE, f"exec {name}", e
                ) from None
    if denied is not None:
        raise StartError.from_os_error(NOT_EXECUTABLE, f"exec {name}", denied)
    assert missing is not None
    raise StartError.from_os_error(NOT_FOUND, f"exec {name}", missing)


def run_direct(config: JobConfig) -> None:
    """
    Become the command; on failure report it and exit 125, 126 or 127.
    """
    try:
        prepare_command(config)
        # A uid change disarms the parent-death signal.
        die_with_parent()
        close_fds(keep=STATUS_FD)
        posix.set_inheritable(STATUS_FD, False)
        exec_command(config.argv, config.env)  # type: ignore[arg-type]  # validated: list[str]
    except StartError as e:
        fail(e)


def fail(error: StartError) -> None:
    report(f"{FAILED} {error.status_fields()}")
    posix._exit(error.exit_code)


def run_command(config: JobConfig, exec_pipe: int, joined: int = -1) -> None:
    """
    The command child of init (or of a supervisor: then it enters the
    job's namespaces first, L{enter_job}, and C{joined} is the pipe on which
    the supervisor says it has moved it into the job's cgroups): set up,
    close everything but stdio and the exec pipe, exec.  A failure is
    written to the exec pipe for its parent.
    """
    code = EXIT_SETUP_FAILED
    try:
        if joined >= 0:
            enter_job(config, joined)
        new_session()
        prepare_command(config)
        close_fds(keep=exec_pipe)
        exec_command(config.argv, config.env)  # type: ignore[arg-type]  # validated: list[str]
    except StartError as e:
        code = e.exit_code
        _write_all(exec_pipe, e.status_fields().encode("ascii", "backslashreplace"))
    except BaseException as e:
        _write_all(exec_pipe, f"setup 0 internal error: {e!r}".encode("ascii", "backslashreplace"))
    finally:
        posix._exit(code)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[posix.write(fd, data) :]
    except OSError:
        pass


_forward_target = 0


def _forward_signal(signum: int, frame: object) -> None:
    """
    Send C{signum} on to C{_forward_target}: a pid, or a negative process
    group id (whose group may not exist yet, hence the fall-back).
    """
    target = _forward_target
    if not target:
        return
    try:
        posix.kill(target, signum)
    except ProcessLookupError:
        if target < 0:
            try:
                posix.kill(-target, signum)
            except OSError:
                pass
    except OSError:
        pass


def _install_forwarding() -> None:
    for signum in FORWARDED_SIGNALS:
        _signal.signal(signum, _forward_signal)


def run_init(config: JobConfig) -> None:
    """
    PID 1 of the job's namespace; never returns.
    """
    global _forward_target
    code = EXIT_SETUP_FAILED
    try:
        # Init keeps its own session so that a signal to outer's process
        # group reaches the job once (through outer), not twice.
        new_session()
        die_with_parent(check_parent=False)
        _install_forwarding()
        mount_proc()
        read_end, write_end = posix.pipe()
        command = posix.fork()
        if command == 0:
            posix.close(read_end)
            run_command(config, write_end)
        posix.close(write_end)
        # The command calls setsid(), but may not have yet.
        _forward_target = -command
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        failure = _read_all(read_end)
        posix.close(read_end)
        if failure:
            report(f"{FAILED} {failure.decode('ascii', 'replace')}")
        else:
            report(STARTED)
        status = _reap_until(command)
        _forward_target = 0
        if not failure:
            if posix.WIFSIGNALED(status):
                report(f"{SIGNAL} {posix.WTERMSIG(status)}")
            else:
                report(f"{EXIT} {posix.waitstatus_to_exitcode(status)}")
        code = _exit_code(status)
        _kill_namespace()
    except StartError as e:
        report(f"{FAILED} {e.status_fields()}")
        code = e.exit_code
    except BaseException as e:
        report(f"{FAILED} {SETUP} 0 internal error: {e!r}")
    finally:
        posix._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := posix.read(fd, MAX_STATUS_LINE):
        chunks.append(chunk)
    return b"".join(chunks)


def _reap_until(pid: int) -> int:
    """
    Reap children (orphans included) until C{pid} exits; its wait status.
    """
    while True:
        reaped, status = posix.waitpid(-1, 0)
        if reaped == pid:
            return status


def _exit_code(status: int) -> int:
    if posix.WIFSIGNALED(status):
        return 128 + posix.WTERMSIG(status)
    return posix.waitstatus_to_exitcode(status)


def _kill_namespace() -> None:
    """
    Kill and reap every other process in the namespace.

    The kernel would kill them when init exits anyway; doing it here means
    that they are all gone by the time outer reports the job's end.
    """
    try:
        posix.kill(-1, _signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            posix.waitpid(-1, 0)
        except ChildProcessError:
            return


def run_outer(config: JobConfig) -> None:
    """
    Unshare, fork init, then wait for it and exit as it did; never returns.
    """
    global _forward_target
    if config.hide:
        # While the host's file system is still writable to us.
        _check_inaccessible_file(config.inaccessible_file)
    unshare(config.network)
    # Outer is in the new mount and network namespaces already.  Whatever
    # can be done here rather than in init is done before the fork, while
    # the memory it touches is still one copy, not two.
    set_up_namespaces(config)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, FORWARDED_SIGNALS)
    _install_forwarding()
    try:
        init = posix.fork()
    except OSError as e:
        raise StartError.from_os_error(SETUP, "fork", e) from None
    if init == 0:
        run_init(config)
    _forward_target = init
    posix.close(STATUS_FD)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    _, status = posix.waitpid(init, 0)
    _exit_as(status)


def _exit_as(status: int) -> None:
    """
    Exit as the child whose wait status is C{status} did; never returns.
    """
    if posix.WIFSIGNALED(status):
        signum = posix.WTERMSIG(status)
        # Die the same way, but without leaving a core file of the helper.
        prctl(PR_SET_DUMPABLE, 0)
        if signum != _signal.SIGKILL:
            _signal.signal(signum, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [signum])
        posix.kill(posix.getpid(), signum)
    posix._exit(_exit_code(status))


def set_up_namespaces(config: JobConfig) -> None:
    """
    The mounts of the job's mount namespace (made private first, so none
    ever appears in the host's) and its loopback.
    """
    make_mounts_private()
    if config.read_only_root:
        make_root_read_only()
    # Hidden paths first: the source of the bind mounts over hidden files
    # may lie in a directory that a scratch mount is about to cover.
    hide_paths(config.hide, config.inaccessible_file)
    if config.scratch_bytes:
        mount_scratch(config.scratch_bytes)
    if config.network == NETWORK_NONE:
        bring_up_loopback()
        if config.private_sys:
            mount_sys()


def become_pid_one() -> None:
    """
    Go on as PID 1 of a new PID namespace: unshare one and fork into it;
    the parent waits and exits as the child did.  Only for a helper the
    server started itself: the zygote forks its children into their
    namespaces (L{fork_pid_one}), and a supervisor is one process.
    """
    try:
        c_call("unshare", CLONE_NEWPID)
        child = posix.fork()
    except OSError as e:
        raise StartError.from_os_error(SETUP, "unshare/fork a PID namespace", e) from None
    if child:
        # Every descriptor is the child's alone: the status socket and the
        # job's pipes reach EOF when it and the job are gone.
        close_fds(keep=-1)
        for fd in (0, 1, 2):
            posix.close(fd)
        _exit_as(posix.waitpid(child, 0)[1])


def fork_pid_one(home: int) -> int:
    """
    fork(), the child as PID 1 of a new PID namespace; C{home} is an open
    C{/proc/self/ns/pid}, to return to for the next fork.  A namespace
    that cannot be made leaves the child in ours (it tries again itself,
    and reports why it cannot).
    """
    try:
        c_call("unshare", CLONE_NEWPID)
    except OSError:
        return posix.fork()
    try:
        return posix.fork()
    finally:
        if posix.getpid() != 1:
            c_call("setns", home, CLONE_NEWPID)


def run_supervisor(config: JobConfig) -> None:
    """
    A supervised job's helper, PID 1 of the job's PID namespace: start the
    command and supervise it (L{Supervisor}); never returns.
    """
    global _forward_target
    # Our pid as the host (and a server) sees it: /proc is the host's.
    host_pid = int(posix.readlink("/proc/self"))
    cgroups = open_cgroups(config.cgroup_procs)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, FORWARDED_SIGNALS)
    _install_forwarding()
    read_end, write_end = posix.pipe()
    joined_read, joined_write = posix.pipe()
    try:
        command = posix.fork()
    except OSError as e:
        raise StartError.from_os_error(SETUP, "fork", e) from None
    if command == 0:
        posix.close(read_end)
        posix.close(joined_write)
        for _, fd in cgroups:
            posix.close(fd)
        run_command(config, write_end, joined_read)
    posix.close(write_end)
    posix.close(joined_read)
    # The command calls setsid(), but may not have yet.
    _forward_target = -command
    # Into the job's cgroups while it sets up its namespaces: a move into a
    # cgroup v1 hierarchy can wait a whole RCU grace period (~10 ms).
    failure = ""
    try:
        join_cgroup_files(cgroups, command)
    except StartError as e:
        # The command sees EOF and exits; this says why.
        failure = e.status_fields()
    else:
        # (A command that failed already says why on the exec pipe.)
        _write_all(joined_write, b"j")
    posix.close(joined_write)
    # The job's stdout and stderr: only the job holds their write ends, so
    # the pipes reach EOF when it is gone.
    null = posix.open("/dev/null", posix.O_RDWR)
    posix.dup2(null, 1)
    posix.dup2(null, 2)
    posix.close(null)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    failure = _read_all(read_end).decode("ascii", "replace") or failure
    posix.close(read_end)
    line = f"{FAILED} {failure}" if failure else STARTED
    Supervisor(config, host_pid, command, line).run()


def enter_job(config: JobConfig, joined: int) -> None:
    """
    In a supervisor's command child (PID 2 of the job's PID namespace):
    new mount, IPC and network namespaces set up for the job and a C{/proc}
    of its PID namespace; then wait until the supervisor has moved it into
    the job's cgroups (C{joined}: a byte, or EOF if it could not).

    All of it here rather than in the supervisor, which stays in the
    host's mount and network namespaces: the memory this work writes is
    the child's, gone at its execve(), where in the supervisor it would be
    held for the job's whole life.  The limits hold from the command's
    first instruction; the set-up's own memory is not charged to the job.
    """
    if config.hide:
        # While the host's file system is still writable to us.
        _check_inaccessible_file(config.inaccessible_file)
    unshare(config.network, pid=False)
    set_up_namespaces(config)
    mount_proc()
    if posix.read(joined, 1) != b"j":
        # The supervisor reports why.
        posix._exit(EXIT_SETUP_FAILED)
    posix.close(joined)


# -- the supervisor (isolated jobs with "supervise") ---------------------------

# The most output a supervisor holds that no server has acknowledged: past
# it, it stops reading the job's pipes until a server catches up (the job
# then waits on its pipe, as it would on a slow server).  Held in the
# supervisor's memory, charged to the server's cgroup, per busy job.
WINDOW_BYTES = 4 << 20
# One read of a job's pipe (the server's own reads were this size).
READ_BYTES = 256 << 10
# After the command ended: how long to wait for the pipes' EOF (a process
# outside the job could hold a write end), and for a connected server to
# acknowledge the last output before it is written to the backlog instead.
EOF_GRACE_S = 2.0
ACK_WAIT_S = 5.0
# While no server is connected, after a read that did not fill READ_BYTES:
# how long to let the pipes fill before the next read.  A job writing in
# small pieces would otherwise cost a read and a write of the backlog per
# piece, and a supervisor that falls behind makes the job wait on its pipe
# (which holds 1 MiB: 7 ms of output at 150 MB/s).
BACKLOG_PAUSE_S = 0.002
_POLLIN = 0x001
_POLLOUT = 0x004
_POLLERR = 0x008
_POLLHUP = 0x010


def _json(value: object) -> str:
    """
    JSON of dicts, lists, str, int, bool and None (json.dumps would import
    re and enum into every supervisor).
    """
    from _json import encode_basestring_ascii

    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ",".join(encode_basestring_ascii(key) + ":" + _json(item) for key, item in value.items()) + "}"


class Supervisor:
    """
    The helper of a supervised job once the command runs, PID 1 of its PID
    namespace: the job's supervisor until it has ended and its end is
    recorded.

    It holds the only read ends of the job's stdout and stderr pipes and
    relays what it reads, with its offset, to the connected server, keeping
    each chunk until the server acknowledges that it has stored it; while
    no server is connected (the server died, or left the job for the next
    one) it appends the chunks to the backlog file instead, so the job never
    waits on a server that is not there.  It tells the command's fate in
    status lines, forwards the signals a server sends, stops the job at its
    timeout (counted from its start, whoever runs the server), reaps the
    orphans of the namespace (as its PID 1) and, once the command has
    ended, kills what is left of the job, writes its end record and tells
    the server.  A server connects on the listening socket; the first one
    is fd 3, a socketpair.
    """

    def __init__(self, config: JobConfig, host_pid: int, command: int, first_line: str) -> None:
        import _socket
        import select
        import time

        self._time = time
        self.config = config
        self.host_pid = host_pid
        self.command = command
        self.first_line = first_line  # started, or failed
        self.listen = _socket.socket(fileno=LISTEN_FD)
        self.listen.setblocking(False)
        self.conn: int | None = STATUS_FD
        self.incoming = bytearray()
        self.outgoing: list[bytes] = []  # queued for the connection
        self.outgoing_bytes = 0
        self.pipes = {STDOUT_READ_FD: 1, STDERR_READ_FD: 2}
        for fd in self.pipes:
            posix.set_blocking(fd, False)
        posix.set_blocking(STATUS_FD, False)
        self.offset = 0  # of the next output byte
        self.window: list[tuple[int, int, bytes]] = []  # (offset, fd, data), not acknowledged
        self.window_bytes = 0
        self.acked = 0
        self.backlog_position = 0  # bytes in the backlog file
        self.backlog_range: list[int] | None = None  # [first offset, end offset] it holds
        self.backlog_failed = False
        self.dropped = 0  # bytes never stored: past the retention, or a full disk
        self.lines: list[str] = []
        self.started_at = 0  # microseconds since the epoch
        self.deadline: float | None = None  # the timeout's SIGTERM
        self.kill_at: float | None = None  # the timeout's SIGKILL
        self.timed_out = False
        self.command_end: tuple[int, int] | None = None  # (exit code, signal)
        self.eof_by: float | None = None
        self.ended_at = 0
        self.end_sent = False
        self.ack_by: float | None = None
        self.read_at: float | None = None  # no pipe reads before (see BACKLOG_PAUSE_S)
        self.poller = select.poll()
        wake_read, wake_write = posix.pipe()
        posix.set_blocking(wake_read, False)
        posix.set_blocking(wake_write, False)
        self.wake = wake_read
        _signal.set_wakeup_fd(wake_write)
        _signal.signal(_signal.SIGCHLD, _ignore)
        # A server that vanished must not kill us with SIGPIPE.
        _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """
        Supervise until the job has ended and its end is written and told;
        never returns.
        """
        self._send(frame(HELLO, self._hello()))
        self._line(self.first_line)
        # A command that ended before the SIGCHLD wake-up was set.
        self._reap()
        while not self._done():
            self._poll()
        self._finish()

    def _done(self) -> bool:
        if not self.end_sent:
            return False
        if self.conn is None:
            return True
        if self.acked >= self.offset and not self.outgoing:
            return True
        return self._time.monotonic() >= (self.ack_by or 0)

    def _poll(self) -> None:
        poller = self.poller
        watched = {self.wake: _POLLIN, self.listen.fileno(): _POLLIN}
        if self.conn is not None:
            watched[self.conn] = _POLLIN | (_POLLOUT if self.outgoing else 0)
        if self._reading():
            for fd in self.pipes:
                watched[fd] = _POLLIN
        for fd, events in watched.items():
            poller.register(fd, events)
        try:
            ready = poller.poll(self._timeout_ms())
        finally:
            for fd in watched:
                poller.unregister(fd)
        for fd, events in ready:
            if fd == self.wake:
                self._drain_wake()
            elif fd == self.listen.fileno():
                self._accept()
            elif fd == self.conn:
                if events & _POLLOUT:
                    self._flush()
                if events & (_POLLIN | _POLLERR | _POLLHUP) and self.conn == fd:
                    self._read_conn()
            elif fd in self.pipes:
                self._read_pipe(fd)
        self._reap()
        self._run_timers()

    def _reading(self) -> bool:
        if not self.pipes:
            return False
        if self.conn is None:
            if self.read_at is not None:
                if self._time.monotonic() < self.read_at:
                    return False
                self.read_at = None
            return True
        return self.window_bytes < WINDOW_BYTES and self.outgoing_bytes < READ_BYTES

    def _timeout_ms(self) -> int:
        now = self._time.monotonic()
        times = [t for t in (self.deadline, self.kill_at, self.eof_by, self.ack_by, self.read_at) if t is not None]
        if not times:
            return -1
        return max(0, int((min(times) - now) * 1000) + 1)

    # -- the command and its output ---------------------------------------------------

    def _drain_wake(self) -> None:
        try:
            while posix.read(self.wake, 512):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        """
        Reap what has ended: the command, and orphans of the namespace.
        """
        while True:
            try:
                pid, status = posix.waitpid(-1, posix.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.command:
                self._command_ended(status)

    def _command_ended(self, status: int) -> None:
        """
        The command has ended: tell how, and end the rest of the job (as
        init did; they are all gone by the time the job's end is told).
        """
        global _forward_target
        _forward_target = 0
        if posix.WIFSIGNALED(status):
            word, number, code, signum = SIGNAL, posix.WTERMSIG(status), -1, posix.WTERMSIG(status)
        else:
            code, signum = posix.waitstatus_to_exitcode(status), 0
            word, number = EXIT, code
        if not self.first_line.startswith(FAILED):
            self._line(f"{word} {number}")
        _kill_namespace()
        self.command_end = (code, signum)
        self.deadline = self.kill_at = None
        self.eof_by = self._time.monotonic() + EOF_GRACE_S

    def _line(self, line: str) -> None:
        if line.startswith(STARTED):
            self.started_at = self._time.time_ns() // 1000
            if self.config.timeout_ms:
                self.deadline = self._time.monotonic() + self.config.timeout_ms / 1000
        self.lines.append(line)
        self._send(frame(LINE, line.encode("ascii", "replace")))

    def _read_pipe(self, fd: int) -> None:
        try:
            data = posix.read(fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            posix.close(fd)
            del self.pipes[fd]
            return
        stream = self.pipes[fd]
        offset = self.offset
        self.offset += len(data)
        if self.conn is not None:
            self.window.append((offset, stream, data))
            self.window_bytes += len(data)
            self._send(data_header(stream, offset, len(data)), data)
        else:
            self._to_backlog(offset, stream, data)
            if len(data) < READ_BYTES and self.command_end is None:
                self.read_at = self._time.monotonic() + BACKLOG_PAUSE_S

    def _output_ended(self) -> bool:
        if self.command_end is None:
            return False
        if self.pipes and self._time.monotonic() < (self.eof_by or 0):
            return False
        for fd in list(self.pipes):
            # A process outside the job holds a write end: its output after
            # the job's end is not the job's.
            self._read_pipe(fd)
            if fd in self.pipes:
                posix.close(fd)
                del self.pipes[fd]
        return True

    # -- timers ----------------------------------------------------------------------------

    def _run_timers(self) -> None:
        now = self._time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self.timed_out = True
            self._line(TIMEOUT)
            self._signal(_signal.SIGTERM)
            self.kill_at = now + self.config.grace_ms / 1000
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self._signal(_signal.SIGKILL)
        if not self.end_sent and self._output_ended():
            self._end()

    def _signal(self, signum: int) -> None:
        """
        Forward C{signum} to the command's process group; SIGKILL goes to
        every process of the namespace (but us).
        """
        if self.command_end is not None:
            return
        if signum == _signal.SIGKILL:
            try:
                posix.kill(-1, signum)
            except OSError:
                pass
        else:
            _forward_signal(signum, None)

    def _end(self) -> None:
        """
        The job has ended and its output is read: record it, tell the server.
        """
        assert self.command_end is not None
        self.ended_at = self._time.time_ns() // 1000
        self.exit = self.command_end
        record = _json(dict(self._state(), format=SUPERVISOR_FORMAT)) + "\n"
        try:
            posix.pwrite(END_FD, record.encode("ascii"), 0)
        except OSError:
            pass  # the server learns it from the END frame; a later one reads it as lost
        self._send(frame(CLOSED, b""))
        self._send(frame(END, b"%d %d" % self.exit))
        self.end_sent = True
        self.ack_by = self._time.monotonic() + ACK_WAIT_S

    def _state(self) -> dict[str, object]:
        exit = getattr(self, "exit", None)
        return {
            "pid": self.host_pid,
            "lines": self.lines,
            "offset": self.offset,
            "backlog": self.backlog_range,
            "dropped": self.dropped,
            "started_at": self.started_at,
            "timed_out": self.timed_out,
            "ended": exit is not None,
            "exit": list(exit) if exit is not None else None,
            "ended_at": self.ended_at,
        }

    def _hello(self) -> bytes:
        return _json(dict(self._state(), format=SUPERVISOR_FORMAT)).encode("ascii")

    def _finish(self) -> None:
        if self.window:
            self._disconnect()
        if self.conn is not None:
            self._hang_up()
        # Synced once the server has hung up: it records the end itself, and
        # only a crash of the host, which ends the server too, needs these
        # on disk.  Before, the server would wait for the disk (an fsync is
        # a journal commit) to learn that the job has ended.
        for fd in (END_FD, BACKLOG_FD):
            try:
                posix.fsync(fd)
            except OSError:
                pass
        code, signum = self.exit
        posix._exit(128 + signum if signum else code)

    # -- the server ------------------------------------------------------------------------

    def _send(self, *pieces: bytes) -> None:
        if self.conn is None:
            return
        self.outgoing.extend(pieces)
        self.outgoing_bytes += sum(map(len, pieces))
        self._flush()

    def _flush(self) -> None:
        conn = self.conn
        while self.outgoing and conn is not None:
            try:
                written = posix.writev(conn, self.outgoing[:64])
            except BlockingIOError:
                return
            except OSError:
                self._disconnect()
                return
            self.outgoing_bytes -= written
            while written:
                first = self.outgoing[0]
                if written >= len(first):
                    written -= len(first)
                    self.outgoing.pop(0)
                else:
                    self.outgoing[0] = first[written:]
                    written = 0

    def _hang_up(self) -> None:
        """
        Close the connection only once the server has read everything and
        closed its end: a socket closed with unread data (a signal or an
        acknowledgement the server sent meanwhile) is reset, and the
        server's reading of the frames before it (the job's end) with it.
        """
        import _socket

        conn = self.conn
        assert conn is not None
        sock = _socket.socket(fileno=posix.dup(conn))
        try:
            sock.shutdown(_socket.SHUT_WR)
            sock.settimeout(ACK_WAIT_S)
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass
        finally:
            sock.close()
            posix.close(conn)
            self.conn = None

    def _read_conn(self) -> None:
        conn = self.conn
        assert conn is not None
        try:
            data = posix.read(conn, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect()
            return
        self.incoming += data
        try:
            frames, used = split_frames(self.incoming)
        except ValueError:
            self._disconnect()
            return
        del self.incoming[:used]
        for kind, payload in frames:
            if kind == ACK and len(payload) == 8:
                self._acked(int.from_bytes(payload, "big"))
            elif kind == SEND_SIGNAL and len(payload) == 1:
                self._signal(payload[0])

    def _acked(self, offset: int) -> None:
        self.acked = max(self.acked, offset)
        window = self.window
        drop = 0
        while drop < len(window) and window[drop][0] + len(window[drop][2]) <= self.acked:
            self.window_bytes -= len(window[drop][2])
            drop += 1
        del window[:drop]
        if self.backlog_range is not None and self.acked >= self.backlog_range[1]:
            try:
                posix.ftruncate(BACKLOG_FD, 0)
            except OSError:
                pass
            self.backlog_position = 0
            self.backlog_range = None

    def _disconnect(self) -> None:
        """
        The server is gone (or left): what it did not acknowledge goes to
        the backlog, and so does all output until the next one connects.
        """
        if self.conn is not None:
            try:
                posix.close(self.conn)
            except OSError:
                pass
            self.conn = None
        self.outgoing = []
        self.outgoing_bytes = 0
        self.incoming = bytearray()
        window, self.window = self.window, []
        self.window_bytes = 0
        for offset, stream, data in window:
            self._to_backlog(offset, stream, data)

    def _accept(self) -> None:
        try:
            fd, _ = self.listen._accept()  # type: ignore[attr-defined]  # the C socket's own accept
        except OSError:
            return
        if self.conn is not None:
            # A new server while one seems connected: the old one is dead
            # (two servers never share a state directory).
            self._disconnect()
        posix.set_blocking(fd, False)
        posix.set_inheritable(fd, False)
        self.conn = fd
        self.acked = 0
        self._send(frame(HELLO, self._hello()))
        if self.end_sent:
            self._send(frame(CLOSED, b""))
            self._send(frame(END, b"%d %d" % self.exit))
            self.ack_by = self._time.monotonic() + ACK_WAIT_S

    def _to_backlog(self, offset: int, stream: int, data: bytes) -> None:
        """
        Append one chunk to the backlog file; past the retention, or when
        the disk is full, it is dropped (the server sees the gap in the
        offsets).
        """
        room = self.config.retention - offset
        if room < len(data):
            self.dropped += len(data) - max(0, room)
            if room <= 0:
                return
            data = data[:room]
        record = data_header(stream, offset, len(data)) + data
        try:
            written = posix.pwrite(BACKLOG_FD, record, self.backlog_position)
            if written != len(record):
                raise OSError(errno.ENOSPC, "short write")
        except OSError:
            try:
                posix.ftruncate(BACKLOG_FD, self.backlog_position)
            except OSError:
                pass
            self.dropped += len(data)
            return
        self.backlog_position += len(record)
        if self.backlog_range is None:
            self.backlog_range = [offset, offset + len(data)]
        else:
            self.backlog_range[1] = offset + len(data)


def _ignore(signum: int, frame: object) -> None:
    pass


def compiled_helper(directory: str | None = None) -> str:
    """
    Compile this module and return the path of its bytecode, for the server
    to run in place of the source: C{python -I -S PATH CONFIG_JSON}.

    Python compiles a script named on its command line afresh on every run
    and never caches it; for this module that costs each job about 8 ms of
    start-up and over 1 MiB of memory held by each supervisor.  The server
    calls this once, at start-up, in its own process (it imports
    C{importlib} and C{py_compile}, which the helper must not).

    The bytecode goes into C{directory}, else into the module's
    C{__pycache__}, next to that of the contract (C{contract.pyc}), which
    the helper imports as its sibling.  Where either cannot be written, the
    source's path is returned: it does the same, only slower.
    """
    import importlib.util
    import os
    import py_compile

    if directory is None:
        target = importlib.util.cache_from_source(__file__)
    else:
        target = os.path.join(directory, "isolate.pyc")
    contract_source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "contract.py")
    import marshal

    contract_target = os.path.join(os.path.dirname(target), "contract.pyc")
    for source, cfile in ((contract_source, contract_target), (__file__, target)):
        # Into a new file, checked, then renamed: on a full disk py_compile
        # can leave a truncated file (its write is not checked for a short
        # count), and every job would fail "Bad code object in .pyc file".
        fresh = cfile + ".new"
        try:
            py_compile.compile(source, cfile=fresh, doraise=True)
            with open(fresh, "rb") as handle:
                marshal.loads(handle.read()[16:])
            os.replace(fresh, cfile)
        except (OSError, ValueError, EOFError, TypeError):
            try:
                os.unlink(fresh)
            except OSError:
                pass
            return __file__
    return target


def read_stdin_config() -> str:
    """
    Read the configuration from fd 0 to its end, then put /dev/null there
    for the command.  The server passes large configurations this way: one
    argv string may not exceed 128 KiB (MAX_ARG_STRLEN), and a job's own
    argv and environment may be larger.
    """
    chunks = []
    while True:
        chunk = posix.read(0, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    null = posix.open("/dev/null", posix.O_RDONLY)
    posix.dup2(null, 0)
    posix.close(null)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_config("configuration on stdin is not UTF-8") from None


# -- the zygote -------------------------------------------------------------------------

# Where the zygote keeps its own socket, out of the way of the numbers a
# job's descriptors take (0-8), and where a child parks what it received
# before putting each in its place.
_ZYGOTE_SOCKET_FD = 250
_PARKED_FD = 260
# A request's configuration is at most a few hundred KiB (argv and env are
# capped by the server); a longer length is a broken server.
_MAX_REQUEST = 16 << 20


def run_zygote() -> None:
    """
    C{python -I -S isolate.py --zygote}: started once by the server, with
    a unix stream socket as fd 3; it forks the supervisor of each job it is
    asked for, so that a job pays neither the interpreter's start-up nor
    its memory (a fork shares both with the zygote until written).

    A request: an 8-byte length with the descriptors of L{ZYGOTE_FDS}
    attached (SCM_RIGHTS), then that many bytes of configuration.  The
    zygote answers nothing: a supervisor speaks for itself on the
    socketpair it gets, and one that never does (a fork that failed) is
    an EOF there.  It dies with the server (a parent-death signal); the
    supervisors it forked do not.
    """
    import _socket

    gc.disable()
    die_with_parent()
    posix.dup2(STATUS_FD, _ZYGOTE_SOCKET_FD)
    posix.close(STATUS_FD)
    control = _socket.socket(fileno=_ZYGOTE_SOCKET_FD)
    # Load now what every supervisor would otherwise load after its fork.
    import fcntl  # noqa: F401
    import select  # noqa: F401
    import time  # noqa: F401
    from _json import encode_basestring_ascii, make_scanner  # noqa: F401

    # And bind the C library (loading _ctypes and libffi, making its
    # classes): each supervisor would otherwise pay ~0.4 MiB for it.
    c_call("getpid")

    # Each supervisor is PID 1 of a PID namespace of its own (see
    # fork_pid_one), the zygote's child.
    home = posix.open("/proc/self/ns/pid", posix.O_RDONLY | posix.O_CLOEXEC)
    # Its children are the supervisors; each is reaped as it ends.
    _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)
    space = _socket.CMSG_SPACE(4 * len(ZYGOTE_FDS))
    while True:
        try:
            header, ancillary, _, _ = control.recvmsg(8, space)
        except InterruptedError:
            continue
        if not header:
            posix._exit(0)
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [int.from_bytes(data[i : i + 4], "little", signed=True) for i in range(0, len(data) - 3, 4)]
        while len(header) < 8:
            more = control.recv(8 - len(header))
            if not more:
                posix._exit(0)
            header += more
        length = int.from_bytes(header, "big")
        if length > _MAX_REQUEST:
            posix._exit(EXIT_SETUP_FAILED)
        pieces = []
        got = 0
        while got < length:
            piece = control.recv(min(length - got, 1 << 20))
            if not piece:
                posix._exit(0)
            pieces.append(piece)
            got += len(piece)
        if len(fds) == len(ZYGOTE_FDS):
            try:
                child = fork_pid_one(home)
            except OSError:
                child = -1
            if child == 0:
                _zygote_child(b"".join(pieces), fds)
        for fd in fds:
            posix.close(fd)


def _zygote_child(config: bytes, fds: list[int]) -> None:
    """
    A supervisor forked by the zygote: put its descriptors in place and
    run as a helper started with this configuration; never returns.
    """
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    posix.close(_ZYGOTE_SOCKET_FD)
    for index, fd in enumerate(fds):
        posix.dup2(fd, _PARKED_FD + index)
        posix.close(fd)
    for index, target in enumerate(ZYGOTE_FDS):
        posix.dup2(_PARKED_FD + index, target)
        posix.close(_PARKED_FD + index)
    null = posix.open("/dev/null", posix.O_RDONLY)
    posix.dup2(null, 0)
    posix.close(null)
    try:
        text = config.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    run_helper(text)


def main(argv: list[str]) -> None:
    """
    Run the job described by C{argv[1]} (or stdin, for C{-}); never
    returns, never prints.  C{--zygote}: see L{run_zygote}.
    """
    if argv[1:] == ["--zygote"]:
        run_zygote()
    if len(argv) != 2:
        run_helper(None)
    if argv[1] != "-":
        run_helper(argv[1])
    try:
        text = read_stdin_config()
    except StartError as e:
        fail(e)
    run_helper(text)


def run_helper(text: str | None) -> None:
    """
    Run the job that the configuration C{text} describes (None: no usable
    one was given); never returns.
    """
    gc.disable()
    try:
        posix.get_inheritable(STATUS_FD)
    except OSError:
        # Without it nothing could be reported, and the fds the helper opens
        # could take its number.  The one message the helper ever prints.
        posix.write(2, b"isolate.py: the status pipe, fd 3, is not open\n")
        posix._exit(EXIT_SETUP_FAILED)
    try:
        if text is None:
            raise _bad_config("usage: isolate.py CONFIG_JSON|-")
        config = parse_config(text)
        if config.supervise:
            # The supervisor outlives the server that started it (it is
            # what keeps the job when that server dies): no parent-death
            # signal, and no cgroup of the job's (the command joins them).
            global _framed
            _framed = True
            if posix.getpid() != 1:
                become_pid_one()
            new_session()
            run_supervisor(config)
        join_cgroups(config.cgroup_procs)
        die_with_parent()
        new_session()
        if config.isolate:
            run_outer(config)
        else:
            run_direct(config)
    except StartError as e:
        fail(e)
    except BaseException as e:
        report(f"{FAILED} {SETUP} 0 internal error: {e!r}")
    posix._exit(EXIT_SETUP_FAILED)


if __name__ == "__main__":
    main(sys.argv)
