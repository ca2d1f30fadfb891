"""
The C{twistd jobworker} service: start-up checks and the service tree.
Its options and the configuration file live in L{jobworker.server.options}
(re-exported here: twistd's plugin finds C{Options} and C{makeService} in
this module).

    JobworkerService (MultiService)     start-up checks; the JSON log option
      +- JobManager                     stops every job on shutdown, and waits
                                        (with --live-restore: leaves them running)
      +- _Listener, one per --listen    any endpoint string, wrapped in TLS

Errors an operator can act on
=============================

Everything that can be checked before the reactor runs is checked in
L{makeService} or while the listeners bind (L{_Listener}), and reported as
L{StartupError}: one line on standard error naming the option, exit status
1, no traceback.  Command-line usage errors stay twistd's (the usage text,
then the error).
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError

import jobworker
from jobworker.jobs.manager import JobManager, JobManagerConfig
from jobworker.jobs.store import StateFormatTooNew, check_state_format
from jobworker.limits import LIMIT_CONTROLLERS, Limits
from jobworker.logs import Logger
from jobworker.server.factory import ServerFactory, ServerLimits
from jobworker.server.options import (
    CONFIG_PATH,
    LIMIT_OPTIONS,
    Options,
    StartupError,
    host_cpus,
    host_memory_bytes,
    secret_paths,
)
from jobworker.server.reaping import install_reaper

__all__ = ["CONFIG_PATH", "Options", "StartupError", "host_cpus", "host_memory_bytes", "makeService", "secret_paths"]

log = Logger()


def _cgroup_driver(choice: str, prefix: str) -> Any:
    if choice == "none":
        return None
    from jobworker.host.cgroups import detect

    try:
        driver = detect(prefix=prefix, version=None if choice == "auto" else choice)
    except ValueError as exc:
        raise StartupError(f"--cgroup-prefix: {exc}") from None
    if driver is None:
        if choice != "auto":
            raise StartupError(f"--cgroups {choice}: no usable cgroup hierarchy on this host")
        return None
    if choice != "auto" and driver.name != choice:
        raise StartupError(f"--cgroups {choice}: this host has cgroup {driver.name}")
    return driver


def _check_controllers(driver: Any, default_limits: Limits, explicit: frozenset[str]) -> None:
    """
    Refuse to start when a default limit the operator set (C{explicit}
    names the options set on the command line or in the config file) needs
    a controller this server does not have: it would silently not hold.
    Built-in defaults that cannot be enforced are dropped with a warning
    instead, as the job manager does.
    """
    available = driver.controllers if driver is not None else frozenset()
    for name, field, _, _ in LIMIT_OPTIONS:
        controller = LIMIT_CONTROLLERS.get(field)
        if controller is None or not getattr(default_limits, field) or f"default-{name}" not in explicit:
            continue
        if controller not in available:
            where = f"cgroup {driver.name}" if driver is not None else "no cgroup driver"
            raise StartupError(
                f"--default-{name}: needs the {controller} cgroup controller, which this server does not have "
                f"({where}; controllers: {', '.join(sorted(available)) or 'none'})"
            )


def _check_tls_files(ca: str, cert: str, key: str) -> Any:
    """
    Build the server's TLS settings, naming the option whose file is wrong.
    """
    from jobworker.credentials import CredentialError, read_certificates
    from jobworker.tls import server_tls_options

    for option, path in (("--ca", ca), ("--cert", cert)):
        try:
            read_certificates(path)
        except CredentialError as exc:
            raise StartupError(f"{option}: {exc}") from None
    try:
        return server_tls_options(ca, cert, key)
    except CredentialError as exc:
        raise StartupError(f"--key: {exc}") from None
    except Exception as exc:  # OpenSSL refusing what cryptography read
        raise StartupError(f"--cert/--key: cannot use {cert} with {key}: {exc}") from None


def _check_state_dir(state_dir: str) -> None:
    """
    The state dir must exist (or be made), be writable, and not be in use
    by another server.  The lock taken here is let go at once: the job
    store takes its own when the service starts.  Checking now turns a
    traceback from the reactor's start-up into one line.
    """
    where = f"--state-dir {state_dir}"
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"{where}: cannot create it: {exc.strerror}") from None
    if not os.path.isdir(state_dir):
        raise StartupError(f"{where}: not a directory")
    try:
        with tempfile.TemporaryFile(dir=state_dir):
            pass
    except OSError as exc:
        raise StartupError(f"{where}: cannot write in it: {exc.strerror}") from None
    lock_path = os.path.join(state_dir, "lock")
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"{where}: cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StartupError(f"{where}: another jobworker server is using it (it holds {lock_path})") from None
    finally:
        os.close(descriptor)
    try:
        check_state_format(state_dir)
    except StateFormatTooNew as exc:
        raise StartupError(f"{where}: {exc}") from None


def _fail_after_logging_began(message: str) -> None:
    """
    Stop start-up once twistd has begun logging: it has replaced
    C{sys.stderr} with its log by then, so the line goes to the real
    standard error and, through the exit, to the log as well.
    """
    error = StartupError(message)
    if sys.stderr is not sys.__stderr__ and sys.__stderr__ is not None:
        sys.__stderr__.write(f"{error.code}\n")
        sys.__stderr__.flush()
    raise error


class _Listener(StreamServerEndpointService):
    """
    One C{--listen} endpoint.  Binds synchronously while the service starts
    (as root, before twistd drops privileges), so that a port in use stops
    the server with one line naming the endpoint.
    """

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]  # Twisted's application services, unannotated
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]  # Twisted's application services, unannotated
        except CannotListenError as exc:
            cause = exc.socketError.strerror if getattr(exc.socketError, "strerror", None) else exc.socketError
            _fail_after_logging_began(f"--listen {self.description}: cannot listen: {cause}")
        except OSError as exc:
            _fail_after_logging_began(f"--listen {self.description}: cannot listen: {exc.strerror or exc}")
        except Exception as exc:
            # systemd: without LISTEN_FDS, for instance.
            _fail_after_logging_began(f"--listen {self.description}: cannot listen: {exc}")
        waiting = self._waitingForPort
        assert waiting is not None, "privilegedStartService has set it"
        waiting.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        log.info("listening on {endpoint} ({address})", endpoint=self.description, address=str(port.getHost()))
        return port


class JobworkerService(MultiService):
    """
    The service tree's top: the job manager and the listeners.  When
    twistd adds it to its application, it sets the JSON log observer if
    C{--log-format json} asks for one (twistd takes an application's
    L{ILogObserver} component as its log).
    """

    def __init__(
        self, log_format: str = "text", log_file: str | None = None, rotate_bytes: int = 10 << 20, keep: int = 10
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's application services, unannotated
        self.log_format = log_format
        self.log_file = log_file
        self.rotate_bytes = rotate_bytes
        self.keep = keep

    def setServiceParent(self, parent: Any) -> Any:
        if self.log_format == "json" and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            from jobworker.logs import json_observer

            parent.setComponent(ILogObserver, json_observer(_log_stream(self.log_file, self.rotate_bytes, self.keep)))
        return super().setServiceParent(parent)  # type: ignore[no-untyped-call]  # Twisted's application services, unannotated


def _log_stream(path: str | None, rotate_bytes: int, keep: int) -> Any:
    """
    Where twistd's log goes: standard output for C{None} or C{"-"}, else a
    file rotated by Twisted's L{LogFile} at C{rotate_bytes}, with at most
    C{keep} rotated files kept (C{--log-rotate-size}, C{--log-keep}).
    """
    if path in (None, "", "-"):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(path, rotateLength=rotate_bytes, maxRotatedFiles=keep)


class LogFileBounds(Service):
    """
    Bound the log file that C{twistd --logfile} (or a daemon's default
    C{twistd.log}) writes: rotate it at C{rotate_bytes} and keep at most
    C{keep} rotated files.  twistd makes that file with Twisted's defaults,
    rotation at 1 MB and every rotated file kept for ever, and offers no
    option to change them; so when the service starts (twistd's logging has
    begun by then) this finds the C{LogFile} behind the global log
    observers and sets its two limits, and deletes rotated files beyond
    C{keep} left by earlier runs.  Logging to stdout (C{-n}, under systemd:
    journald rotates and rate-limits) or syslog needs none of this.
    """

    def __init__(self, rotate_bytes: int, keep: int) -> None:
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.bounded: list[Any] = []

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's application services, unannotated
        from twisted.python.logfile import LogFile

        for log_file in _log_files():
            if not isinstance(log_file, LogFile):
                continue  # a DailyLogFile: rotated by date, not ours to change
            log_file.rotateLength = self.rotate_bytes
            log_file.maxRotatedFiles = self.keep
            for number in log_file.listLogs():
                if number > self.keep:
                    try:
                        os.remove(f"{log_file.path}.{number}")
                    except OSError as exc:
                        log.warn("could not remove an old log file: {error}", error=exc)
            self.bounded.append(log_file)
            log.info(
                "log file {path}: rotated at {size} bytes, {keep} rotated files kept",
                path=log_file.path,
                size=self.rotate_bytes,
                keep=self.keep,
            )


def _log_files() -> list[Any]:
    """
    The log files the global log observers write to, as far as they can be
    seen: twistd's is a C{textFileLogObserver(LogFile)} (a
    C{twisted.logger.FileLogObserver} that keeps its file as C{_outFile});
    a legacy C{twisted.python.log.FileLogObserver} wrapped for the new
    system keeps the file's C{write}.
    """
    from twisted.logger import globalLogPublisher
    from twisted.python.logfile import BaseLogFile

    found: list[Any] = []
    for observer in list(getattr(globalLogPublisher, "_observers", ())):
        candidates = [getattr(observer, "_outFile", None)]
        legacy = getattr(getattr(observer, "legacyObserver", None), "__self__", None)
        candidates.append(getattr(getattr(legacy, "write", None), "__self__", None))
        found.extend(candidate for candidate in candidates if isinstance(candidate, BaseLogFile))
    return found


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from jobworker.tls import BulkTLSMemoryBIOFactory

    log.info(
        "jobworker {version} starting (config {config})",
        version=jobworker.__version__,
        config=options["config"] or "none",
    )
    # A SIGCHLD reaps the helpers that ended, not a waitpid per running job.
    install_reaper()
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
        live_restore=bool(options["live-restore"]),
    )
    log.info(
        "jobs run as {who}; caps for non-admins: {caps}",
        who=(
            f"uids {config.job_uids}, one each" if config.job_user is None and config.job_uids is not None
            else config.job_user or "the server's own user"
        ),
        caps=", ".join(f"{name}={value}" for name, value in vars(config.caps).items() if value) or "none",
    )
    if config.live_restore:
        log.info("live restore: a clean stop leaves running jobs running for the next server")
    tls = _check_tls_files(options["ca"], options["cert"], options["key"])
    _check_state_dir(options["state-dir"])
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
    _check_controllers(driver, options["default-limits"], getattr(options, "explicit", frozenset()))
    manager = JobManager(reactor, config, cgroup_driver=driver)
    # Records of running jobs are written off the reactor's thread: a stop
    # of hundreds of jobs held every client up while each synced its file.
    manager.store.write_behind(lambda function: reactor.callFromThread(function))
    limits = ServerLimits(
        handshake_timeout_s=options["handshake-timeout"],
        idle_timeout_s=options["idle-timeout"],
        keepalive_interval_s=options["keepalive-interval"],
        frame_timeout_s=options["frame-timeout"],
        max_connections=options["max-connections"],
        max_connections_per_identity=options["max-connections-per-identity"],
        max_streams_per_identity=options["max-followers-per-identity"],
        max_partial_bytes_per_identity=options["max-unfinished-bytes"],
        audit_burst=options["audit-burst"],
        audit_interval_s=options["audit-interval"],
    )
    factory = ServerFactory(
        manager, reactor, server_name=options["server-name"] or os.uname().nodename, limits=limits
    )
    # Its "Starting factory <object>" lines say nothing an operator can use
    # (the listeners are logged above) and carry an object no JSON holds.
    factory.noisy = False
    twistd = getattr(options, "parent", None)
    log_file = twistd.get("logfile") if twistd is not None else None
    if twistd is not None and not log_file and not twistd.get("nodaemon"):
        log_file = "twistd.log"  # where twistd itself logs when it daemonizes
    top = JobworkerService(options["log-format"], log_file, options["log-rotate-bytes"], options["log-keep"])
    LogFileBounds(options["log-rotate-bytes"], options["log-keep"]).setServiceParent(top)  # type: ignore[no-untyped-call]  # Twisted's application services, unannotated
    manager.setServiceParent(top)  # type: ignore[no-untyped-call]  # Twisted's application services, unannotated
    for description in options["listen"]:
        try:
            endpoint = serverFromString(reactor, description)
        except (IndexError, KeyError) as exc:
            if description.startswith("systemd:"):
                raise StartupError(
                    f"--listen {description}: systemd passed no such socket (LISTEN_FDS, LISTEN_FDNAMES; "
                    "start the server through its .socket unit)"
                ) from None
            raise StartupError(f"--listen {description}: not an endpoint: {exc!r}") from None
        except (ValueError, TypeError) as exc:
            raise StartupError(f"--listen {description}: not an endpoint: {exc}") from None
        _Listener(description, endpoint, BulkTLSMemoryBIOFactory(tls, False, factory)).setServiceParent(top)  # type: ignore[no-untyped-call]  # Twisted's application services, unannotated
    return top
