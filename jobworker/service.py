"""
The C{twistd jobworker} service: options and the service tree.

    MultiService
      +- JobManager                   stops every job on shutdown, and waits
      +- StreamServerEndpointService  any endpoint string, wrapped in TLS
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from jobworker.jobs import JobManager, JobManagerConfig
from jobworker.limits import LimitError, Limits, host_caps, parse_count, parse_cpu, parse_duration, parse_size
from jobworker.server import ServerFactory, ServerLimits
from jobworker.uids import DEFAULT_FIRST_UID, DEFAULT_LAST_UID, parse_uid_range

__all__ = ["Options", "makeService"]

log = Logger()

_LIMIT_OPTIONS = [
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
        ["listen", "l", "tcp:8443", "Endpoint to listen on (any Twisted server endpoint string)."],
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
        ["server-name", None, "", "Name announced to clients (default: the host name)."],
    ] + [
        [f"default-{name}", None, "1024" if name == "pids" else None, f"Default job limit: {text}."]
        for name, _, _, text in _LIMIT_OPTIONS
    ] + [
        [f"max-{name}", None, None, f"Most a non-admin job may ask for: {text}, or none for no cap." + _CAP_DEFAULTS.get(name, "")]
        for name, _, _, text in _LIMIT_OPTIONS
    ]

    optFlags = [
        ["no-isolation", None, "Run jobs without PID, mount, IPC and network namespaces (and without private /tmp, /sys and hidden paths)."],
        ["no-private-sys", None, "Let jobs see the host's /sys instead of a read-only one of their own."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["hide-paths"] = []

    def opt_hide_path(self, path: str) -> None:
        """
        A path jobs must not reach (repeatable), besides the state dir, the TLS key and its directory, which are always hidden.
        """
        self["hide-paths"].append(os.path.abspath(path))

    def postOptions(self) -> None:
        try:
            self["default-limits"] = self._limits("default")
            self["caps"] = self._caps()
            if self["tmp-size"] is None:
                self["tmp-bytes"] = host_memory_bytes() // TMP_SIZE_FRACTION
            elif self["tmp-size"].strip().lower() == "none":
                self["tmp-bytes"] = 0
            else:
                self["tmp-bytes"] = parse_size(self["tmp-size"], what="tmp-size")
            self["retention-bytes"] = parse_size(self["retention"], what="retention")
            self["ring-bytes"] = parse_size(self["ring-size"], what="ring-size")
        except LimitError as exc:
            raise usage.UsageError(str(exc)) from None
        try:
            self["job-uid-range"] = parse_uid_range(self["job-uids"])
        except ValueError as exc:
            raise usage.UsageError(f"--job-uids: {exc}") from None
        for name in ("grace", "handshake-timeout", "idle-timeout", "keepalive-interval"):
            try:
                self[name] = float(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a number of seconds") from None
            # NaN and infinity pass float() but no timer takes them (a NaN
            # keep-alive interval broke every connection at its hello).
            if not math.isfinite(self[name]) or self[name] < 0:
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a finite, non-negative number of seconds")
        for name in ("handshake-timeout", "idle-timeout"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be above 0 seconds")
        for name in ("max-jobs-per-identity", "max-finished-jobs"):
            try:
                self[name] = int(self[name])
            except ValueError:
                raise usage.UsageError(f"--{name}: {self[name]!r} is not a whole number") from None
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
        for name, field, parse, _ in _LIMIT_OPTIONS:
            text = self[f"max-{name}"]
            if text is None:
                values[field] = getattr(derived, field)
            elif text.strip().lower() != "none":
                values[field] = parse(text)
        return Limits(**values)

    def _limits(self, prefix: str) -> Limits:
        values = {}
        for name, field, parse, _ in _LIMIT_OPTIONS:
            text = self[f"{prefix}-{name}"]
            if text:
                values[field] = parse(text)
        return Limits(**values)


def _cgroup_driver(choice: str, prefix: str) -> Any:
    if choice == "none":
        return None
    from jobworker.cgroups import detect

    try:
        driver = detect(prefix=prefix, version=None if choice == "auto" else choice)
    except ValueError as exc:
        raise SystemExit(f"jobworker: --cgroup-prefix: {exc}") from None
    if driver is None:
        if choice != "auto":
            raise SystemExit(f"jobworker: --cgroups {choice}: no usable cgroup hierarchy on this host")
        return None
    if choice != "auto" and driver.name != choice:
        raise SystemExit(f"jobworker: --cgroups {choice}: this host has cgroup {driver.name}")
    return driver


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from jobworker.tls import BulkTLSMemoryBIOFactory, server_tls_options

    privileged = os.geteuid() == 0
    isolate = not options["no-isolation"]
    if isolate and not privileged:
        log.warn("not running as root: jobs run without namespaces, as the server's own user")
        isolate = False
    config = JobManagerConfig(
        state_dir=options["state-dir"],
        isolate=isolate,
        job_user=options["job-user"] if privileged else None,
        job_uids=options["job-uid-range"] if privileged else None,
        scratch_bytes=options["tmp-bytes"],
        private_sys=not options["no-private-sys"],
        hidden_paths=secret_paths(options["key"], options["hide-paths"]),
        default_limits=options["default-limits"],
        caps=options["caps"],
        default_grace_s=options["grace"],
        max_jobs_per_identity=options["max-jobs-per-identity"],
        max_finished_jobs=options["max-finished-jobs"],
        ring_size=options["ring-bytes"],
        retention=options["retention-bytes"],
    )
    log.info(
        "jobs run as {who}; caps for non-admins: {caps}",
        who=(
            f"uids {config.job_uids}, one each" if config.job_user is None and config.job_uids is not None
            else config.job_user or "the server's own user"
        ),
        caps=", ".join(f"{name}={value}" for name, value in vars(config.caps).items() if value) or "none",
    )
    driver = _cgroup_driver(options["cgroups"], options["cgroup-prefix"]) if privileged else None
    if driver is not None:
        log.info(
            "cgroup {name} driver, controllers: {controllers}, job cgroups under {base}",
            name=driver.name,
            base=driver.base_description,
            controllers=",".join(sorted(driver.controllers)),
        )
    else:
        log.warn("no cgroup driver: resource limits will be refused")
    tls = server_tls_options(options["ca"], options["cert"], options["key"])
    manager = JobManager(reactor, config, cgroup_driver=driver)
    limits = ServerLimits(
        handshake_timeout_s=options["handshake-timeout"],
        idle_timeout_s=options["idle-timeout"],
        keepalive_interval_s=options["keepalive-interval"],
    )
    factory = ServerFactory(
        manager, reactor, server_name=options["server-name"] or os.uname().nodename, limits=limits
    )
    top = MultiService()
    manager.setServiceParent(top)
    endpoint = serverFromString(reactor, options["listen"])
    listener = StreamServerEndpointService(endpoint, BulkTLSMemoryBIOFactory(tls, False, factory))
    listener._raiseSynchronously = True
    listener.setServiceParent(top)
    return top
