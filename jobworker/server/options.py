"""
The options of C{twistd jobworker}: the command line, the configuration
file, and their checks (L{Options}); every value is checked here, before
anything is started (L{jobworker.server.service} does the checks that need
the host: cgroups, TLS files, the state directory).

Configuration file
==================

Every option of L{Options} is also a key of the TOML file named by
C{--config} (default L{CONFIG_PATH}, read only if it exists): the key is the
long option's name (C{state-dir = "/var/lib/jobworker"}), a flag takes
C{true} or C{false}, and a repeatable option (C{listen}) takes a list.  The
value goes through the very code the command line's does (the option's
coerce function, then L{Options.postOptions}), so an option added to the
tables below is a configuration key at once, with the same checks.  An
option given on the command line wins over the file's key; for a
repeatable option the command line's values replace the file's list.
"""

from __future__ import annotations

import getopt
import hashlib
import math
import os
import re
import sys
import tomllib
from collections.abc import Sequence

from twisted.python import usage

import jobworker
from jobworker.host.uids import DEFAULT_FIRST_UID, DEFAULT_LAST_UID, parse_uid_range
from jobworker.limits import LimitError, Limits, host_caps, parse_count, parse_cpu, parse_duration, parse_size

__all__ = [
    "CONFIG_PATH",
    "LIMIT_OPTIONS",
    "Options",
    "StartupError",
    "host_cpus",
    "host_memory_bytes",
    "secret_paths",
]


# Read when no --config is given, if it exists (like sshd's and dockerd's).
CONFIG_PATH = "/etc/jobworker/jobworker.toml"

# Options that are no server setting, so no configuration key.
_NOT_CONFIG_KEYS = frozenset({"config", "help", "version"})


class StartupError(SystemExit):
    """
    The server cannot start: the message, one line naming the option and
    the cause, is printed on standard error and the process exits with
    status 1 (as any C{SystemExit} with a text does), without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"jobworker: {message}")


LIMIT_OPTIONS = [
    # (option suffix, Limits field, parser, help)
    ("cpu", "cpu_millicores", parse_cpu, "CPU cores, e.g. 0.5"),
    ("memory", "memory_bytes", parse_size, "memory, e.g. 512M"),
    ("io-read-bps", "io_read_bps", parse_size, "disk read bytes/s, e.g. 50M"),
    ("io-write-bps", "io_write_bps", parse_size, "disk write bytes/s, e.g. 50M"),
    ("pids", "pids", parse_count, "processes and threads"),
    ("timeout", "timeout_ms", parse_duration, "run time, e.g. 1h"),
]



_CAP_DEFAULTS = {
    "cpu": " Default: half the CPUs, at least one.",
    "memory": " Default: half the memory.",
    "pids": " Default: 4096.",
}

# A tenth of the memory for a job's /tmp, /var/tmp and /dev/shm together: a
# job whose memory is not limited (an admin's) cannot fill the host's RAM
# through them.
TMP_SIZE_FRACTION = 10


# Directories too widely used to hide from jobs, even when the server's key
# lies in one: then only the key file itself is hidden.
SHARED_DIRECTORIES = frozenset(
    ["/", "/etc", "/etc/ssl", "/etc/pki", "/usr", "/usr/local", "/var", "/var/lib", "/opt", "/srv",
     "/home", "/run", "/tmp", "/var/tmp", "/mnt", "/media"]
)


def secret_paths(key: str, extra: list[str]) -> tuple[str, ...]:
    """
    What jobs must not reach besides the state dir: the TLS key, the
    directory it lies in (a development PKI keeps the CA's and the clients'
    keys beside it) unless that is one of L{SHARED_DIRECTORIES}, and the
    operator's C{--hide-path}s.
    """
    key = os.path.realpath(key)
    paths = [key]
    directory = os.path.dirname(key)
    if directory not in SHARED_DIRECTORIES:
        paths.append(directory)
    return tuple(dict.fromkeys([*paths, *(os.path.realpath(p) for p in extra)]))


def host_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_cpus() -> int:
    return len(os.sched_getaffinity(0))


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the jobworker server: runs jobs for clients authenticated by mutual TLS."

    optParameters = [
        ["config", "c", None, f"TOML file of options (default {CONFIG_PATH}, if it exists); the command line overrides it."],
        ["ca", None, "certs/ca.pem", "CA certificate that client certificates must chain to."],
        ["cert", None, "certs/server.pem", "Server certificate (PEM)."],
        ["key", None, "certs/server.key", "Server private key (PEM)."],
        ["state-dir", None, None, "Job records and output spools (default /var/lib/jobworker as root, else ./state)."],
        ["retention", None, "1G", "Output kept on disk per job; beyond it, followers see an explicit gap."],
        ["ring-size", None, "4M", "Recent output kept in memory per running job."],
        ["job-user", None, None, "Run every job as this one user (unless an admin asks for another) instead of each as a uid of its own from --job-uids."],
        ["job-uids", None, f"{DEFAULT_FIRST_UID}-{DEFAULT_LAST_UID}", "Range of uids given to jobs, one each, FIRST-LAST (as root, without --job-user). Servers on one host may share a range (each claims its uids in /run/jobworker/uids)."],
        ["tmp-size", None, None, "Size of a job's private /tmp, /var/tmp and /dev/shm together (one tmpfs; its pages count against the job's memory limit), e.g. 1G, or none to give jobs the host's (default: a tenth of the memory)."],
        ["cgroups", None, "auto", "cgroup driver: auto, v1, v2 or none (no resource limits)."],
        ["cgroup-prefix", None, None, "Directory, below the server's own cgroup, for the job cgroups (default: jobworker-<hash of the state dir>, one per server)."],
        ["grace", None, "10", "Seconds between SIGTERM and SIGKILL when the server stops jobs."],
        ["max-jobs-per-identity", None, "256", "Running jobs one identity may have at once."],
        ["max-finished-jobs", None, "1000", "Finished jobs kept; the oldest beyond this are removed."],
        ["handshake-timeout", None, "10", "Seconds a client has to finish TLS and the hello."],
        ["idle-timeout", None, "300", "Seconds a connection may stay idle (no pending request, no open stream) before it is closed."],
        ["keepalive-interval", None, "30", "Seconds of silence from a client before it is pinged; a client that does not answer within as long again is disconnected. 0: no keep-alive."],
        ["frame-timeout", None, "30", "Seconds one frame may take to arrive from its first byte."],
        ["max-connections", None, "512", "Connections open at once, in total; beyond it new ones are closed before TLS."],
        ["max-connections-per-identity", None, "128", "Connections one identity may hold; beyond it: GoAway TOO_MANY_CONNECTIONS."],
        ["max-unfinished-frames-per-identity", None, "32M", "Bytes of incomplete frames one identity may have buffered on all its connections."],
        ["max-followers-per-identity", None, "256", "Output streams one identity may have open, on all its connections."],
        ["audit-rate-limit", None, "1000/10", "Audit lines per identity per seconds (N/S); the rest are counted in a summary line. 0 for no limit."],
        ["log-rotate-size", None, "10M", "With twistd --logfile: rotate the log file at this size."],
        ["log-keep", None, "10", "With twistd --logfile: rotated log files kept; older ones are deleted."],
        ["server-name", None, "", "Name announced to clients (default: the host name)."],
        ["log-format", None, "text", "twistd's log: text, or json (one JSON object per line; with twist, use its own --log-format)."],
    ] + [
        [f"default-{name}", None, "1024" if name == "pids" else None, f"Default job limit: {text}."]
        for name, _, _, text in LIMIT_OPTIONS
    ] + [
        [f"max-{name}", None, None, f"Most a non-admin job may ask for: {text}, or none for no cap." + _CAP_DEFAULTS.get(name, "")]
        for name, _, _, text in LIMIT_OPTIONS
    ]

    optFlags = [
        ["no-isolation", None, "Run jobs without PID, mount, IPC and network namespaces (and without private /tmp, /sys and hidden paths)."],
        ["no-private-sys", None, "Let jobs see the host's /sys instead of a read-only one of their own."],
        ["live-restore", None, "On a clean stop (SIGTERM), leave running jobs running for the next server on this state dir (for upgrades and configuration changes) instead of stopping them. Under systemd it needs KillMode=process."],
    ]

    # Options that may be given more than once, each use adding one value;
    # as configuration keys they take a list.
    repeatable = frozenset({"listen", "hide-path"})

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's usage.Options, unannotated
        self["listen"] = []
        self["hide-paths"] = []
        # Configuration keys read, each with the file it came from, so that
        # an error found later names the key rather than an option the
        # operator never typed.
        self._from_config: dict[str, str] = {}
        self.explicit: frozenset[str] = frozenset()

    def opt_listen(self, endpoint: str) -> None:
        """
        Endpoint to listen on, any Twisted server endpoint string: tcp:8443,
        tcp:8443:interface=10.0.0.5, unix:/run/jobworker/jobworker.sock,
        systemd:domain=INET:index=0 (socket activation). Repeatable: the
        server listens on each. Default tcp:8443.
        """
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_version(self) -> None:
        """
        Print the jobworker version and exit.
        """
        print(f"jobworker {jobworker.__version__}")
        sys.exit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Read the configuration file, then the command line over it (see the
        module docstring).

        @raise StartupError: the file cannot be read, is not TOML, or has an
            unknown key or a bad value; one line naming the key.
        """
        if options is None:
            options = sys.argv[1:]
        options = list(options)
        try:
            given, _ = getopt.getopt(options, self.shortOpt, self.longOpt)
        except getopt.error as exc:
            raise usage.UsageError(str(exc)) from None
        on_command_line = set()
        config_path, explicit = CONFIG_PATH, False
        for option, value in given:
            name = self.synonyms.get(option.lstrip("-"), option.lstrip("-"))
            on_command_line.add(name)
            if name == "config":
                config_path, explicit = value, True
        if config_path and (explicit or os.path.exists(config_path)):
            self._read_config(config_path, skip=on_command_line)
        # What the operator set, as opposed to the built-in defaults.
        self.explicit = frozenset(on_command_line | set(self._from_config))
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]  # Twisted's, unannotated
        except usage.UsageError as exc:
            for key, path in self._from_config.items():
                if re.search(rf"--{re.escape(key)}(?![\w-])", str(exc)):
                    raise StartupError(f"{path}: key {key!r}: {exc}") from None
            raise

    def _read_config(self, path: str, skip: set[str]) -> None:
        try:
            with open(path, "rb") as file:
                table = tomllib.load(file)
        except OSError as exc:
            raise StartupError(f"--config {path}: cannot read it: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise StartupError(f"--config {path}: not valid TOML: {exc}") from None
        self["config"] = path
        parameters = {name[:-1] for name in self.longOpt if name.endswith("=")}
        flags = {name for name in self.longOpt if not name.endswith("=")}
        for key, value in table.items():
            if key in _NOT_CONFIG_KEYS or (key not in parameters and key not in flags):
                raise StartupError(f"{path}: unknown key {key!r} (the keys are the long options of twistd jobworker --help)")
            if key in skip:
                continue  # the command line wins
            self._from_config[key] = path
            where = f"{path}: key {key!r}"
            if key in flags:
                if not isinstance(value, bool):
                    raise StartupError(f"{where}: {value!r} is not true or false")
                if value:
                    self._dispatch[key](key, "")
                continue
            values = value if key in self.repeatable and isinstance(value, list) else [value]
            for item in values:
                allowed = (str,) if key in self.repeatable else (str, int, float)
                if isinstance(item, bool) or not isinstance(item, allowed):
                    kind = "a list of texts" if key in self.repeatable else "a text or a number"
                    raise StartupError(f"{where}: {item!r} is not {kind}")
                handler = self._dispatch[key]
                try:
                    if isinstance(handler, usage.CoerceParameter):
                        handler.dispatch(key, str(item))
                    else:
                        handler(key, str(item))
                except usage.UsageError as exc:
                    raise StartupError(f"{where}: {exc}") from None

    def opt_hide_path(self, path: str) -> None:
        """
        A path jobs must not reach (repeatable), besides the state dir, the TLS key and its directory, which are always hidden.
        """
        self["hide-paths"].append(os.path.abspath(path))

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = ["tcp:8443"]
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format: {self['log-format']!r} is not text or json")
        try:
            self["default-limits"] = self._limits("default")
            self["caps"] = self._caps()
            if self["tmp-size"] is None:
                self["tmp-bytes"] = host_memory_bytes() // TMP_SIZE_FRACTION
            elif self["tmp-size"].strip().lower() == "none":
                self["tmp-bytes"] = 0
            else:
                self["tmp-bytes"] = parse_size(self["tmp-size"], what="--tmp-size")
            self["retention-bytes"] = parse_size(self["retention"], what="--retention")
            self["ring-bytes"] = parse_size(self["ring-size"], what="--ring-size")
        except LimitError as exc:
            raise usage.UsageError(str(exc)) from None
        try:
            self["job-uid-range"] = parse_uid_range(self["job-uids"])
        except ValueError as exc:
            raise usage.UsageError(f"--job-uids: {exc}") from None
        for name in ("grace", "handshake-timeout", "idle-timeout", "keepalive-interval", "frame-timeout"):
            try:
                self[name] = float(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a number of seconds") from None
            # NaN and infinity pass float() but no timer takes them (a NaN
            # keep-alive interval broke every connection at its hello).
            if not math.isfinite(self[name]) or self[name] < 0:
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a finite, non-negative number of seconds")
        for name in ("handshake-timeout", "idle-timeout", "frame-timeout"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be above 0 seconds")
        for name in (
            "max-jobs-per-identity",
            "max-finished-jobs",
            "max-connections",
            "max-connections-per-identity",
            "max-followers-per-identity",
        ):
            try:
                self[name] = int(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a whole number") from None
        self["audit-burst"], self["audit-interval"] = _rate(self["audit-rate-limit"])
        try:
            self["max-unfinished-bytes"] = parse_size(self["max-unfinished-frames-per-identity"], what="max-unfinished-frames-per-identity")
        except LimitError as exc:
            raise usage.UsageError(str(exc)) from None
        try:
            self["log-rotate-bytes"] = parse_size(self["log-rotate-size"], what="log-rotate-size")
            self["log-keep"] = int(self["log-keep"])
        except (LimitError, ValueError) as exc:
            raise usage.UsageError(f"--log-rotate-size/--log-keep: {exc}") from None
        if self["log-keep"] < 1 or self["log-rotate-bytes"] < 4096:
            raise usage.UsageError("--log-keep must be at least 1 and --log-rotate-size at least 4K")
        if self["cgroups"] not in ("auto", "v1", "v2", "none"):
            raise usage.UsageError("--cgroups must be auto, v1, v2 or none")
        if self["state-dir"] is None:
            self["state-dir"] = "/var/lib/jobworker" if os.geteuid() == 0 else os.path.abspath("state")
        if self["cgroup-prefix"] is None:
            # Two servers started in one cgroup must never share a subtree:
            # each one's start-up clean-up would kill the other's jobs.  The
            # state dir already names one server (it is locked), so the
            # prefix follows it.
            digest = hashlib.sha256(os.path.realpath(self["state-dir"]).encode()).hexdigest()[:10]
            self["cgroup-prefix"] = f"jobworker-{digest}"

    def _caps(self) -> Limits:
        """
        The --max-* options; where one is not given, the cap derived from
        the machine (L{host_caps}); C{none} for no cap.
        """
        derived = host_caps(host_memory_bytes(), host_cpus())
        values = {}
        for name, field, parse, _ in LIMIT_OPTIONS:
            text = self[f"max-{name}"]
            if text is None:
                values[field] = getattr(derived, field)
            elif text.strip().lower() != "none":
                try:
                    values[field] = parse(text)
                except LimitError as exc:
                    raise LimitError(f"--max-{name}: {exc}") from None
        return Limits(**values)

    def _limits(self, prefix: str) -> Limits:
        values = {}
        for name, field, parse, _ in LIMIT_OPTIONS:
            text = self[f"{prefix}-{name}"]
            if text:
                try:
                    values[field] = parse(text)
                except LimitError as exc:
                    raise LimitError(f"--{prefix}-{name}: {exc}") from None
        return Limits(**values)


def _rate(text: str) -> tuple[int, float]:
    """
    Parse C{--audit-rate-limit}: C{N/SECONDS}, or C{0} for no limit.
    """
    if text.strip() == "0":
        return 0, 1.0
    count, slash, seconds = text.partition("/")
    try:
        burst, interval = int(count), float(seconds) if slash else 0.0
    except ValueError:
        burst, interval = -1, 0.0
    if burst < 1 or interval <= 0:
        raise usage.UsageError(f"--audit-rate-limit: {text!r} is not N/SECONDS (e.g. 1000/10) or 0")
    return burst, interval
