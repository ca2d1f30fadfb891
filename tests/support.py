"""
Helpers shared by the test modules.
"""

from __future__ import annotations

import os

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


# -- a real server, for end-to-end tests ---------------------------------------

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        result = subprocess.run(
            [str(BIN / "jobcli"), *args],
            env=self.env(identity),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
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
        from jobworker.clienttls import client_ssl_context

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


def start_server(
    certs: Path,
    state_dir: Path,
    *args: str,
    port: int | None = None,
    user: str | None = None,
    wrapper: list[str] | None = None,
) -> RunningServer:
    """
    Start a server and wait until it accepts connections (at most 20 s).

    With C{user}, the server runs as that user (via C{setpriv}, so the test
    process must be root): the state dir and the certificates must be
    usable by it.  C{wrapper} is a command line that the server's command
    line is appended to (it must exec it), to start it in some state.
    """
    port = port or free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
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
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(REPO))
    server = RunningServer(certs, state_dir, port, process, log_path, list(args))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise AssertionError(f"server did not listen within 20 s:\n{server.log()}")
