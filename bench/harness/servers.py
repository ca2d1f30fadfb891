"""
The servers a benchmark measures: a C{twistd -n jobworker} of this checkout
(L{JobworkerServer}) with a development PKI, and the OpenSSH reference
(L{SshServer}); and the L{Context} every benchmark is handed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.harness.cgroups import ServerCgroup
from bench.harness.processes import (
    BenchError,
    Timing,
    Workspace,
    check,
    free_port,
    run_timed,
    stop_process,
    tail,
    wait_listening,
)
from bench.harness.results import say
from bench.harness.settings import CLIENTS, REPO, SSHD, VENV_BIN, Settings


class JobworkerServer:
    """
    A C{twistd -n jobworker} of this checkout on 127.0.0.1, with its own state
    directory under the workspace.
    """

    def __init__(
        self, workspace: Workspace, certs: str, name: str, *extra: str, state_root: str | None = None, state_dir: str | None = None
    ) -> None:
        """
        @param state_dir: an existing state directory to start with (the
            records a benchmark made); else a new one, under C{state_root}
            if given.
        """
        self.workspace = workspace
        self.certs = certs
        self.name = name
        self.port = free_port()
        if state_dir is not None:
            self.state_dir = state_dir
        elif state_root is None:
            self.state_dir = workspace.path(f"state-{name}")
            os.makedirs(self.state_dir)
        else:
            self.state_dir = tempfile.mkdtemp(prefix=f"jobworker-bench-state-{name}-", dir=state_root)
            workspace.directories.append(self.state_dir)
        self.log_path = workspace.path(f"server-{name}.log")
        command = [
            os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "jobworker",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--ca", os.path.join(certs, "ca.pem"),
            "--cert", os.path.join(certs, "server.pem"),
            "--key", os.path.join(certs, "server.key"),
            "--state-dir", self.state_dir,
            "--grace", "3",
            *extra,
        ]  # fmt: skip
        self.args = command
        self.cgroup = ServerCgroup(f"jobworker-bench-{os.getpid()}-{name}")
        workspace.cgroups.append(self.cgroup)
        began = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = workspace.spawn(self.cgroup.wrap(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        wait_listening(self.port, self.process, f"jobworker server {name}", self.log_path, interval=0.005)
        self._wait_serving(certs)
        # From the spawn until a TLS handshake completes: twistd binds the
        # port before the services start, but the reactor, which does the
        # handshake, runs only once the job manager has loaded every record.
        self.startup_s = time.perf_counter() - began
        self.env = dict(os.environ)
        self.env.update(
            JOBWORKER_SERVER=f"127.0.0.1:{self.port}",
            JOBWORKER_CA=os.path.join(certs, "ca.pem"),
            JOBWORKER_CERT=os.path.join(certs, "admin.pem"),
            JOBWORKER_KEY=os.path.join(certs, "admin.key"),
        )

    def _wait_serving(self, certs: str, timeout: float = 60.0) -> None:
        context = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
        context.check_hostname = False
        context.load_cert_chain(os.path.join(certs, "admin.pem"), os.path.join(certs, "admin.key"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
                    with context.wrap_socket(raw) as tls:
                        tls.do_handshake()
                return
            except (OSError, ssl.SSLError) as exc:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise BenchError(f"jobworker server {self.name} never completed a TLS handshake: {exc}\n{tail(self.log_path)}") from None
                time.sleep(0.005)

    @property
    def pid(self) -> int:
        return self.process.pid

    def jobcli(self, *args: str) -> list[str]:
        return [os.path.join(VENV_BIN, "jobcli"), *args]

    def run(self, *args: str) -> Timing:
        return run_timed(self.jobcli(*args), env=self.env, capture=True)

    def clients(self, *args: str, timeout: float = 600) -> Any:
        """
        Run C{bench/clients.py ARGS} against this server; its JSON answer.
        """
        result = subprocess.run(
            [os.path.join(VENV_BIN, "python"), CLIENTS, *args],
            env=self.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise BenchError(f"clients.py {args[0]} exited {result.returncode}: {result.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(result.stdout)

    def clients_command(self, *args: str) -> list[str]:
        return [os.path.join(VENV_BIN, "python"), CLIENTS, *args]

    def start_job(self, *argv: str) -> str:
        timing = check(self.run("start", "--", *argv), "jobcli start")
        return timing.stdout.decode().strip()

    def status(self, job_id: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(check(self.run("status", "--json", job_id), "jobcli status").stdout)
        return document

    def prune(self) -> None:
        self.clients("prune")

    def stop(self) -> None:
        stop_process(self.process)
        for problem in self.cgroup.remove():
            say(f"bench: could not remove cgroup {problem}")
        if self.cgroup in self.workspace.cgroups:
            self.workspace.cgroups.remove(self.cgroup)

    def cgroup_driver(self) -> str:
        match = re.search(r"cgroup (\S+) driver, controllers: (\S*)", tail(self.log_path, 1 << 20))
        return f"{match.group(1)} ({match.group(2)})" if match else "none"


def make_pki(workspace: Workspace) -> str:
    certs = workspace.path("certs")
    subprocess.run(
        [os.path.join(VENV_BIN, "jobworker-pki"), "dev", certs], check=True, stdout=subprocess.DEVNULL
    )
    return certs


# -- OpenSSH ------------------------------------------------------------------


def ensure_sshd() -> str:
    """
    Install openssh-server if /usr/sbin/sshd is missing; say what was done.
    """
    if os.path.exists(SSHD):
        return "present"
    say("bench: installing openssh-server (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "openssh-server"]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    if not os.path.exists(SSHD):
        raise BenchError("openssh-server installed but /usr/sbin/sshd is missing")
    return "installed by the benchmark"


class SshServer:
    """
    An sshd of our own on 127.0.0.1: own host key, own client key, own
    configuration; root may log in with the key only.
    """

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.installed = ensure_sshd()
        directory = workspace.path("ssh")
        os.makedirs(directory, mode=0o700)
        self.host_key = os.path.join(directory, "host_ed25519")
        self.client_key = os.path.join(directory, "client_ed25519")
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True, stdout=subprocess.DEVNULL)
        authorized = os.path.join(directory, "authorized_keys")
        shutil.copyfile(self.client_key + ".pub", authorized)
        os.chmod(authorized, 0o600)
        self.port = free_port()
        config = os.path.join(directory, "sshd_config")
        with open(config, "w") as handle:
            handle.write(
                f"ListenAddress 127.0.0.1:{self.port}\n"
                f"HostKey {self.host_key}\n"
                f"PidFile {os.path.join(directory, 'sshd.pid')}\n"
                f"AuthorizedKeysFile {authorized}\n"
                "PermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                # The workspace lives under /tmp (mode 1777), which sshd's
                # StrictModes would refuse for the authorized_keys path.
                "StrictModes no\n"
            )
        # sshd insists on its privilege-separation directory.
        self.made_run_dir = False
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)
            self.made_run_dir = True
        self.log_path = os.path.join(directory, "sshd.log")
        self.process = workspace.spawn(
            [SSHD, "-D", "-f", config, "-E", self.log_path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        wait_listening(self.port, self.process, "sshd", self.log_path)

    def command(self, *remote: str, options: Sequence[str] = ()) -> list[str]:
        return [
            "ssh", "-p", str(self.port), "-i", self.client_key,
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=no", "-o", "ControlPath=none",
            *options, "root@127.0.0.1", *remote,
        ]  # fmt: skip

    def negotiated(self) -> dict[str, str]:
        """
        What C{ssh -v} reports for one connection: key exchange, cipher, MAC.
        """
        command = self.command("true")
        command[command.index("LogLevel=ERROR")] = "LogLevel=DEBUG1"
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        text = result.stderr.decode(errors="replace")
        found = {}
        match = re.search(r"kex: algorithm: (\S+)", text)
        if match:
            found["kex"] = match.group(1)
        match = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", text)
        if match:
            found["cipher"] = match.group(1)
            found["mac"] = match.group(2)
        match = re.search(r"kex: host key algorithm: (\S+)", text)
        if match:
            found["host_key"] = match.group(1)
        return found

    def stop(self) -> None:
        stop_process(self.process)
        if self.made_run_dir:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass


# -- what a benchmark gets ----------------------------------------------------


@dataclass
class Context:
    settings: Settings
    workspace: Workspace
    certs: str
    ssh: SshServer
    environment: dict[str, Any] = field(default_factory=dict[str, Any])

    def server(self, name: str, *extra: str, state_root: str | None = None, state_dir: str | None = None) -> JobworkerServer:
        return JobworkerServer(self.workspace, self.certs, name, *extra, state_root=state_root, state_dir=state_dir)
