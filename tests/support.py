"""
Helpers shared by the test modules.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def on_ci() -> bool:
    """
    True when the suite runs under CI, where every test must be able to run.
    """
    return bool(os.environ.get("CI"))


def need(condition: bool, reason: str) -> None:
    """
    Go on only if C{condition} holds.

    Privileged tests (root, cgroups, namespaces) call this first.  On CI,
    where the machine is known to provide all of these, a missing capability
    is a failure: a test that silently skips there proves nothing.
    Elsewhere the test is skipped and the reason printed.
    """
    if condition:
        return
    if on_ci():
        pytest.fail(f"cannot run on CI: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")


def cgroup_layout() -> str:
    """
    The cgroup layout of this host as the service sees it: C{"v2"} (pure
    cgroup v2), C{"v1"} (v1 or hybrid), or C{"none"}.  Privileged tests put
    it in their ids (C{[v1]}, C{[v2]}) so that every report says which
    driver ran; it only reads /proc, so it is safe at collection time.
    """
    from jobworker.host.cgroups import detect

    try:
        driver = detect()
    except Exception:
        return "none"
    return driver.name if driver is not None else "none"


def backing_disk(path: str) -> str | None:
    """
    The whole-disk name (as in /sys/block) of the device holding C{path},
    C{None} for a filesystem without one (tmpfs, overlay, btrfs subvolume):
    where an io limit test must write for the limit to apply.
    """
    number = os.stat(path).st_dev
    sysfs = f"/sys/dev/block/{os.major(number)}:{os.minor(number)}"
    if not os.path.exists(sysfs):
        return None
    device = os.path.realpath(sysfs)
    if os.path.exists(os.path.join(device, "partition")):
        device = os.path.dirname(device)
    return os.path.basename(device)


# -- a real server, for end-to-end tests ---------------------------------------

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# How RunningServer.jobcli runs jobcli: as a new process of the installed
# script ("real"), or as jobcli's main() in a child forked from the test
# process ("fork", L{jobcli_in_a_fork}), which skips the interpreter's
# start-up and imports: 0.25 s a run here, 4-8 s under the CI guest's
# emulation.  JOBWORKER_TEST_JOBCLI=fork or =real in the environment
# chooses for every test (the CI guest sets fork: its tests are there for
# the cgroup v2 driver).  Else tests/conftest.py chooses per test: real
# for the tests marked real_jobcli, which are about jobcli as a program
# (the jobcli modules, the smoke and deployment tests), fork for the rest,
# which drive the server with it.
JOBCLI_MODE = "JOBWORKER_TEST_JOBCLI"
_forked_jobcli = [False]


def fork_jobcli(forked: bool) -> None:
    """
    Whether L{RunningServer.jobcli} runs jobcli in a fork from now on, when
    the environment does not choose (see L{JOBCLI_MODE}).
    """
    _forked_jobcli[0] = forked


def jobcli_forks() -> bool:
    mode = os.environ.get(JOBCLI_MODE, "")
    return mode == "fork" or (mode != "real" and _forked_jobcli[0])


def jobcli_in_a_fork(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """
    C{jobcli ARGS} as L{subprocess.run} would run it (stdin from
    /dev/null, stdout and stderr captured as bytes, the exit status of
    C{sys.exit(main())}), but in a forked child of this process, whose
    imports it reuses.
    """
    import selectors
    import signal
    import traceback

    import jobworker.blocking.tls  # noqa: F401 (imported once, here, not in every child)
    import jobworker.cli

    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.close(out_read)
            os.close(err_read)
            null = os.open(os.devnull, os.O_RDONLY)
            for fd, target in ((null, 0), (out_write, 1), (err_write, 2)):
                os.dup2(fd, target)
                os.close(fd)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.environ.clear()
            os.environ.update(env)
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
            sys.argv = [str(BIN / "jobcli"), *args]
            code = jobworker.cli.main(args)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code & 0xFF)
    os.close(out_write)
    os.close(err_write)
    captured = {out_read: bytearray(), err_read: bytearray()}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for fd in captured:
            selector.register(fd, selectors.EVENT_READ)
        try:
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise subprocess.TimeoutExpired(["jobcli", *args], timeout, bytes(captured[out_read]), bytes(captured[err_read]))
                for key, _ in selector.select(left):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        captured[key.fd] += chunk
                    else:
                        selector.unregister(key.fd)
        finally:
            os.close(out_read)
            os.close(err_read)
    _, wait_status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(
        ["jobcli", *args], os.waitstatus_to_exitcode(wait_status), bytes(captured[out_read]), bytes(captured[err_read])
    )


@dataclass
class RunningServer:
    """
    A C{twistd -n jobworker} subprocess listening on 127.0.0.1.
    """

    certs: Path
    state_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    args: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, identity: str = "admin") -> dict:
        env = dict(os.environ)
        env.update(
            JOBWORKER_SERVER=self.address,
            JOBWORKER_CA=str(self.certs / "ca.pem"),
            JOBWORKER_CERT=str(self.certs / f"{identity}.pem"),
            JOBWORKER_KEY=str(self.certs / f"{identity}.key"),
        )
        return env

    def jobcli(self, *args: str, identity: str = "admin", timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        """
        Run C{jobcli ARGS} as C{identity}; stdout and stderr as bytes.
        """
        if jobcli_forks():
            result = jobcli_in_a_fork(list(args), self.env(identity), timeout)
        else:
            result = subprocess.run(
                [str(BIN / "jobcli"), *args],
                env=self.env(identity),
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )
        if check and result.returncode != 0:
            raise AssertionError(f"jobcli {args} exited {result.returncode}: {result.stderr.decode()}")
        return result

    def client(self, identity: str = "admin"):
        """
        A connected L{jobworker.blocking.BlockingClient} as C{identity}.
        """
        from jobworker.blocking import BlockingClient
        from jobworker.blocking.tls import client_ssl_context

        context = client_ssl_context(self.certs / "ca.pem", self.certs / f"{identity}.pem", self.certs / f"{identity}.key")
        client = BlockingClient(("127.0.0.1", self.port), context)
        client.connect()
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def make_pki(directory: Path) -> Path:
    from jobworker.pki import make_client_cert, make_dev_pki

    make_dev_pki(directory)
    # An identity without a role: every operation must be denied.
    make_client_cert(directory, directory / "ca.pem", directory / "ca.key", "nobody-in-particular", None, name="norole")
    make_client_cert(directory, directory / "ca.pem", directory / "ca.key", "mallory", "superuser", name="badrole")
    return directory


def _joiner(procs_files: list[str]):
    def join() -> None:
        pid = str(os.getpid()).encode()
        for path in procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return join


# Seconds.  A server listens within 2 s here, but within 15-25 s in the
# emulated cgroup v2 guest of .ci/guest.py on a loaded machine (Python's
# imports over 9p); this only bounds a server that never comes up.
SERVER_START_TIMEOUT = 60


# The real paths of the state dirs that servers of this test run used.  A
# server names its cgroup subtree after its state dir (the default
# --cgroup-prefix, jobworker-<hash>); a test that kills a server and does
# not restart one on the same state dir leaves that subtree behind, and
# remove_leftover_cgroups() takes it away at the end of the run.
STATE_DIRS: set[str] = set()


def remove_leftover_cgroups() -> list[str]:
    """
    Remove the empty cgroup subtrees left by this run's servers (see
    L{STATE_DIRS}), deepest first; return those that still hold a process
    (a real leak, left for someone to look at).
    """
    import hashlib

    names = {"jobworker-" + hashlib.sha256(path.encode()).hexdigest()[:10] for path in STATE_DIRS}
    kept = []
    for top, directories, _ in os.walk("/sys/fs/cgroup"):
        for name in [d for d in directories if d in names]:
            directories.remove(name)  # not walked into by the search
            for below, _, _ in sorted(os.walk(os.path.join(top, name)), key=lambda entry: -len(entry[0])):
                try:
                    os.rmdir(below)
                except OSError:
                    kept.append(below)
    return kept


def start_server(
    certs: Path,
    state_dir: Path,
    *args: str,
    port: int | None = None,
    user: str | None = None,
    wrapper: list[str] | None = None,
    cgroup_procs: Sequence[str] = (),
) -> RunningServer:
    """
    Start a server and wait until it accepts connections (at most
    L{SERVER_START_TIMEOUT}).

    With C{user}, the server runs as that user (via C{setpriv}, so the test
    process must be root): the state dir and the certificates must be
    usable by it.  C{wrapper} is a command line that the server's command
    line is appended to (it must exec it), to start it in some state.

    @param cgroup_procs: C{cgroup.procs} files the server joins before it
        runs (as systemd places a unit's process), instead of starting in
        the tests' own cgroup.
    """
    port = port or free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
    STATE_DIRS.add(os.path.realpath(state_dir))
    log_path = state_dir.parent / f"server-{port}.log"
    prefix = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={_primary_group(user)}", "--clear-groups", "--"]
    prefix = [*(wrapper or []), *prefix]
    command = [
        *prefix,
        str(BIN / "twistd"), "-n", "--pidfile=", "jobworker",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--ca", str(certs / "ca.pem"), "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
        # Each state dir gets its own cgroup subtree (the server derives the
        # prefix from it), so servers of one test run never touch each
        # other's jobs, and a restart on the same state dir cleans up what
        # a killed server left.
        "--state-dir", str(state_dir), "--grace", "3", *args,
    ]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            preexec_fn=_joiner(list(cgroup_procs)) if cgroup_procs else None,
        )
    server = RunningServer(certs, state_dir, port, process, log_path, list(args))
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise AssertionError(f"server did not listen within {SERVER_START_TIMEOUT} s:\n{server.log()}")


def one_turn(clock: Any) -> int:
    """
    Run one turn of a reactor on a fake clock (L{twisted.internet.task.Clock}):
    the delayed calls due now, not those they make (C{Clock.advance} runs
    those too, as if the reactor never polled between).

    @return: how many calls ran.
    """
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in sorted(due, key=lambda call: call.getTime()):
        if call.active():
            func, args, kw = call.func, call.args, call.kw
            call.cancel()  # (it forgets its function)
            func(*args, **kw)
    return len(due)
