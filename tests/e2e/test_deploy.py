"""
Deploying and operating the server (issue 14): a server started from a
config file alone, several listeners (TCP on two interfaces, TCP and a UNIX
socket), C{jobcli} over a UNIX socket, start-up errors an operator can act
on, JSON logs, versions.

Every test here runs a real C{twistd jobworker} (or C{twist jobworker})
process on loopback addresses and UNIX sockets in a temporary directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import jobworker
from tests.support import BIN, REPO, free_port, need, need_root

# About jobcli as a program: it runs as one (tests/support.py, JOBCLI_MODE).
pytestmark = pytest.mark.real_jobcli


def _tls_args(certs: Path) -> list[str]:
    return ["--ca", str(certs / "ca.pem"), "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key")]


def _reachable(target: str) -> bool:
    """
    C{target} is C{HOST:PORT}, C{[V6]:PORT} or C{unix:PATH}.
    """
    try:
        if target.startswith("unix:"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(target[5:])
        else:
            host, _, port = target.rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
        return True
    except OSError:
        return False


class Server:
    """
    A server process started with exactly the arguments given.
    """

    def __init__(self, command: list[str], log_path: Path, targets: list[str]) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(REPO))
        deadline = time.monotonic() + 30
        while not all(_reachable(target) for target in targets):
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not listen on {targets} within 30 s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def jobcli(certs: Path, server: str, *args: str, identity: str = "admin") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "jobcli"), "--server", server, "--ca", str(certs / "ca.pem"),
         "--cert", str(certs / f"{identity}.pem"), "--key", str(certs / f"{identity}.key"), *args],
        capture_output=True, stdin=subprocess.DEVNULL, timeout=60, text=True,
        env={key: value for key, value in os.environ.items() if not key.startswith("JOBWORKER_")},
    )


def twistd(*args: str) -> list[str]:
    return [str(BIN / "twistd"), "-n", "--pidfile=", "jobworker", *args]


# -- a config file alone, several listeners ------------------------------------


def test_server_from_a_config_file_alone_serves_every_listener_it_names(certs, tmp_path):
    v4, v6 = free_port(), free_port()
    sock = tmp_path / "jobworker.sock"
    config = tmp_path / "jobworker.toml"
    config.write_text(
        "listen = [\n"
        f'  "tcp:{v4}:interface=127.0.0.1",\n'
        f'  "tcp6:{v6}:interface=\\\\:\\\\:1",\n'
        f'  "unix:{sock}:mode=600",\n'
        "]\n"
        f'ca = "{certs / "ca.pem"}"\ncert = "{certs / "server.pem"}"\nkey = "{certs / "server.key"}"\n'
        f'state-dir = "{tmp_path / "state"}"\nserver-name = "from-the-config"\ngrace = 2\n'
    )
    server = Server(twistd("--config", str(config)), tmp_path / "server.log",
                    [f"127.0.0.1:{v4}", f"[::1]:{v6}", f"unix:{sock}"])
    try:
        for address in (f"127.0.0.1:{v4}", f"[::1]:{v6}", f"unix:{sock}"):
            result = jobcli(certs, address, "whoami", identity="alice")
            assert result.returncode == 0, (address, result.stderr)
            # whoami shows the server's version, from its ServerHello.
            assert result.stdout == f"alice (user) on from-the-config (jobworker {jobworker.__version__})\n", result.stdout
        # A job started over one listener is seen over the others.
        started = jobcli(certs, f"unix:{sock}", "run", "--", "echo", "over a unix socket")
        assert started.returncode == 0, started.stderr
        assert started.stdout == "over a unix socket\n"
        listing = jobcli(certs, f"127.0.0.1:{v4}", "list")
        assert "echo over a unix socket" in listing.stdout
        log = server.log()
        for endpoint in (f"tcp:{v4}:interface=127.0.0.1", f"unix:{sock}:mode=600"):
            assert f"listening on {endpoint}" in log, log
        assert f"config {config}" in log
    finally:
        # twistd ends by the signal it was stopped with (systemd counts a
        # SIGTERM death as a clean stop).
        assert server.stop() in (0, -15), server.log()
    assert not sock.exists()  # the UNIX socket is removed on a clean stop


def test_listen_is_repeatable_on_the_command_line(certs, tmp_path):
    port = free_port()
    sock = tmp_path / "s.sock"
    server = Server(
        twistd(*_tls_args(certs), "--state-dir", str(tmp_path / "state"),
               "--listen", f"tcp:{port}:interface=127.0.0.1", "-l", f"unix:{sock}"),
        tmp_path / "server.log", [f"127.0.0.1:{port}", f"unix:{sock}"],
    )
    try:
        for address in (f"127.0.0.1:{port}", f"unix:{sock}"):
            result = jobcli(certs, address, "run", "--", "echo", address)
            assert (result.returncode, result.stdout) == (0, f"{address}\n"), result.stderr
    finally:
        server.stop()


def test_the_command_line_overrides_the_config_file(certs, tmp_path):
    config_port, cli_port = free_port(), free_port()
    config = tmp_path / "jobworker.toml"
    config.write_text(f'listen = ["tcp:{config_port}:interface=127.0.0.1"]\nserver-name = "config"\n')
    server = Server(
        twistd("--config", str(config), *_tls_args(certs), "--state-dir", str(tmp_path / "state"),
               "--listen", f"tcp:{cli_port}:interface=127.0.0.1", "--server-name", "command-line"),
        tmp_path / "server.log", [f"127.0.0.1:{cli_port}"],
    )
    try:
        assert not _reachable(f"127.0.0.1:{config_port}")
        result = jobcli(certs, f"127.0.0.1:{cli_port}", "whoami")
        assert "on command-line" in result.stdout, result.stderr
    finally:
        server.stop()


# -- errors an operator can act on ----------------------------------------------


def _refused(command: list[str], **popen) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            cwd=str(REPO), **popen)
    assert result.returncode != 0, result
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jobworker: "), lines
    return result


def test_an_unknown_config_key_stops_the_server_with_one_line(certs, tmp_path):
    config = tmp_path / "jobworker.toml"
    config.write_text('listen = ["tcp:0"]\nmax-jobz = 3\n')
    result = _refused(twistd("--config", str(config), *_tls_args(certs), "--state-dir", str(tmp_path / "state")))
    assert f"{config}: unknown key 'max-jobz'" in result.stderr


def test_a_bad_config_value_stops_the_server_with_one_line(certs, tmp_path):
    config = tmp_path / "jobworker.toml"
    config.write_text('retention = "a lot"\n')
    result = _refused(twistd("--config", str(config), *_tls_args(certs), "--state-dir", str(tmp_path / "state")))
    assert "key 'retention'" in result.stderr and "'a lot' is not a size" in result.stderr


def _base(certs: Path, tmp_path: Path, **replace: str) -> list[str]:
    options = {"ca": str(certs / "ca.pem"), "cert": str(certs / "server.pem"), "key": str(certs / "server.key"),
               "state-dir": str(tmp_path / "state"), "listen": f"tcp:{free_port()}:interface=127.0.0.1"}
    options.update(replace)
    return twistd(*[item for name, value in options.items() for item in (f"--{name}", value)])


def test_startup_error_missing_certificate(certs, tmp_path):
    result = _refused(_base(certs, tmp_path, cert=str(tmp_path / "absent.pem")))
    assert "--cert: cannot read" in result.stderr and "absent.pem: No such file" in result.stderr


def test_startup_error_missing_ca(certs, tmp_path):
    result = _refused(_base(certs, tmp_path, ca=str(tmp_path / "absent.pem")))
    assert "--ca: cannot read" in result.stderr


def test_startup_error_key_does_not_match_the_certificate(certs, tmp_path):
    result = _refused(_base(certs, tmp_path, key=str(certs / "admin.key")))
    assert "--key:" in result.stderr and "is not the private key of" in result.stderr


def test_startup_error_port_in_use(certs, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        result = _refused(_base(certs, tmp_path, listen=endpoint))
    assert f"--listen {endpoint}: cannot listen: Address already in use" in result.stderr


def test_startup_error_not_an_endpoint(certs, tmp_path):
    result = _refused(_base(certs, tmp_path, listen="carrier-pigeon:1"))
    assert "--listen carrier-pigeon:1: not an endpoint" in result.stderr


def test_startup_error_state_dir_locked(certs, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    descriptor = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        result = _refused(_base(certs, tmp_path))
    finally:
        os.close(descriptor)
    assert f"--state-dir {state}: another jobworker server is using it" in result.stderr


def test_startup_error_state_dir_not_a_directory(certs, tmp_path):
    (tmp_path / "file").write_text("")
    result = _refused(_base(certs, tmp_path, **{"state-dir": str(tmp_path / "file" / "state")}))
    assert "--state-dir" in result.stderr and "Not a directory" in result.stderr


def test_startup_error_state_dir_not_writable(certs):
    """
    A server running as C{nobody} with a state dir only root may write.
    (In a directory of its own under /tmp: pytest's is root-only.)
    """
    need_root()
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="jobworker-test-"))
    try:
        os.chmod(base, 0o755)
        readable = base / "certs"
        readable.mkdir(mode=0o755)
        for name in ("ca.pem", "server.pem", "server.key"):
            (readable / name).write_bytes((certs / name).read_bytes())
            os.chmod(readable / name, 0o644)
        state = base / "state"
        state.mkdir(mode=0o755)
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] + _base(readable, base)
        result = _refused(command)
        assert f"--state-dir {state}: cannot write in it: Permission denied" in result.stderr
    finally:
        shutil.rmtree(base)


def test_startup_error_missing_cgroup_controller(certs, tmp_path):
    """
    A default limit the operator set that no controller can enforce stops
    the server (a built-in default would only be dropped with a warning).
    """
    command = _base(certs, tmp_path) + ["--cgroups", "none", "--default-memory", "64M"]
    result = _refused(command)
    assert "--default-memory: needs the memory cgroup controller" in result.stderr


def test_startup_error_missing_cgroup_controller_on_this_host(certs, tmp_path):
    """
    On a hybrid host, the cgroup2 mount has no controllers: asking for v2
    with a default pids limit is refused at start-up, naming the option.
    """
    need_root()
    from jobworker.host.cgroups import detect

    v2 = detect(version="v2")
    if v2 is not None and "pids" in v2.controllers:
        pytest.skip("this host's cgroup v2 has the pids controller (a pure v2 host)")
    command = _base(certs, tmp_path) + ["--cgroups", "v2", "--default-pids", "100"]
    result = _refused(command)
    assert "--default-pids" in result.stderr and ("pids cgroup controller" in result.stderr or "--cgroups v2" in result.stderr)


# -- logs -------------------------------------------------------------------------


def _json_events(text: str) -> list[dict]:
    """
    Every line must be one JSON object (twist starts each with a record
    separator, twistd --log-format json writes plain JSON Lines).
    """
    return [json.loads(line.lstrip("\x1e")) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("runner", ["twistd", "twist"])
def test_json_logs_carry_the_job_id_as_text(runner, certs, tmp_path):
    port = free_port()
    args = [*_tls_args(certs), "--state-dir", str(tmp_path / "state"), "--listen", f"tcp:{port}:interface=127.0.0.1"]
    if runner == "twistd":
        command = twistd("--log-format", "json", *args)
    else:
        command = [str(BIN / "twist"), "--log-format=json", "jobworker", *args]
    server = Server(command, tmp_path / "server.log", [f"127.0.0.1:{port}"])
    try:
        started = jobcli(certs, f"127.0.0.1:{port}", "start", "--", "true")
        assert started.returncode == 0, started.stderr
        job_id = started.stdout.strip()
        assert jobcli(certs, f"127.0.0.1:{port}", "wait", job_id).returncode == 0
    finally:
        server.stop()
    events = _json_events(server.log())
    assert events, server.log()
    about_job = [event for event in events if event.get("job_id") == job_id]
    assert len(about_job) >= 2, [event.get("log_format") for event in events]  # start and end at least
    for event in events:
        for key, value in event.items():
            if runner == "twist" and (key.startswith("log_") or not event["log_namespace"].startswith("jobworker")):
                # twist's own observer: its bookkeeping (log_logger is an
                # object) and Twisted's own events are Twisted's.
                continue
            assert value != {"unpersistable": True}, (key, event)
    version = [event for event in events if event.get("version") == jobworker.__version__]
    assert version, "the start-up event carries the version"


# -- versions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        (["jobcli", "--version"], f"jobcli {jobworker.__version__}"),
        (["jobworker-pki", "--version"], f"jobworker-pki {jobworker.__version__}"),
        (["twistd", "jobworker", "--version"], f"jobworker {jobworker.__version__}"),
    ],
)
def test_version(command, expected):
    result = subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_the_package_version_is_the_metadata_version():
    from importlib.metadata import version

    assert version("jobworker") == jobworker.__version__


# -- systemd ------------------------------------------------------------------------

UNITS = REPO / "contrib" / "systemd"


def _need_systemd_tool(name: str) -> str:
    """
    The path of a tool of Debian's C{systemd} package, installed (as root,
    with apt-get) if missing; on CI a tool that cannot be had is a failure.
    """
    found = shutil.which(name)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        found = shutil.which(name)
    need(found is not None, f"needs {name} (Debian package systemd)")
    assert found is not None  # need() did not return otherwise
    return found


def _unit_for_this_checkout(directory: Path) -> Path:
    """
    The shipped units, with ExecStart pointing at this checkout's twistd, so
    that verify also checks the command exists.
    """
    for name in ("jobworker.service", "jobworker.socket"):
        text = (UNITS / name).read_text().replace("/opt/jobworker/bin/twistd", str(BIN / "twistd"))
        (directory / name).write_text(text)
    return directory / "jobworker.service"


def test_systemd_units_verify(tmp_path):
    analyze = _need_systemd_tool("systemd-analyze")
    service = _unit_for_this_checkout(tmp_path)
    result = subprocess.run([analyze, "verify", "--man=no", str(service), str(tmp_path / "jobworker.socket")],
                            capture_output=True, text=True, timeout=120)
    # verify exits 0 on a misspelt key or a bad value and only warns: any
    # output at all is a defect of the unit.
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result.stdout + result.stderr
    # It can fail: a misspelt key is reported.
    broken = tmp_path / "broken.service"
    broken.write_text(service.read_text().replace("Delegate=yes", "Delegat=yes"))
    result = subprocess.run([analyze, "verify", "--man=no", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert "Unknown key 'Delegat'" in result.stderr


def _unit_settings(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_systemd_unit_matches_what_the_service_does(tmp_path):
    settings = _unit_settings(UNITS / "jobworker.service")
    assert settings["Delegate"] == "yes"
    # The server stops every job itself on SIGTERM (or, with live-restore,
    # leaves them to the next server): systemd signals it alone, and kills
    # no job when the server has exited (a crash, a live-restore stop).
    assert settings["KillMode"] == "process"
    from jobworker.server.service import Options

    grace = float(Options().defaults["grace"])
    assert float(settings["TimeoutStopSec"]) > grace + 5
    # Its command line is one the server accepts, and the config it names is
    # the documented default.
    command = settings["ExecStart"].split()
    assert command[1:5] == ["--nodaemon", "--pidfile=", "jobworker", "--config"]
    from jobworker.server.service import CONFIG_PATH

    assert command[5] == CONFIG_PATH
    # Every left-out option is named with its reason.
    text = (UNITS / "jobworker.service").read_text()
    for option in ("ProtectSystem", "ProtectHome", "CapabilityBoundingSet", "SystemCallFilter",
                   "RestrictNamespaces", "PrivateDevices", "ProtectControlGroups", "MemoryDenyWriteExecute",
                   "RestrictAddressFamilies", "PrivateNetwork"):
        assert f"# {option}=" in text, option
        assert option not in settings, option
    for option in ("NoNewPrivileges", "ProtectKernelTunables", "ProtectProc", "PrivateTmp"):
        assert option in settings, option


def test_socket_activation(certs, tmp_path):
    """
    The server on a socket systemd passes it (systemd-socket-activate does
    what a .socket unit does: bind, then start the server on the first
    connection with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES set).
    """
    activate = _need_systemd_tool("systemd-socket-activate")
    port = free_port()
    command = [activate, "-l", f"127.0.0.1:{port}", "--fdname=jobworker", *twistd(
        *_tls_args(certs), "--state-dir", str(tmp_path / "state"), "--listen", "systemd:domain=INET:name=jobworker")]
    log_path = tmp_path / "server.log"
    server = Server(command, log_path, [f"127.0.0.1:{port}"])
    try:
        # The first connection is the one that starts the server.
        first = jobcli(certs, f"127.0.0.1:{port}", "run", "--", "echo", "activated")
        assert (first.returncode, first.stdout) == (0, "activated\n"), first.stderr + server.log()
        assert jobcli(certs, f"127.0.0.1:{port}", "whoami").returncode == 0
        assert "listening on systemd:domain=INET:name=jobworker" in server.log()
    finally:
        server.stop()


def test_systemd_endpoint_without_systemd_is_one_line(certs, tmp_path):
    result = _refused(_base(certs, tmp_path, listen="systemd:domain=INET:index=0"))
    assert "systemd passed no such socket" in result.stderr


def test_the_hardening_trial_script_is_valid_shell(tmp_path):
    """
    contrib/systemd/try-hardening.py runs only where qemu can boot the
    guest (minutes); here its generated scripts are checked for syntax and
    for covering every option the unit says it leaves out.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("try_hardening", UNITS / "try-hardening.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in (("trial.sh", module._trial_script("/results")), ("job.sh", module._job_script("/results"))):
        (tmp_path / name).write_text(text)
        checked = subprocess.run(["sh", "-n", str(tmp_path / name)], stderr=subprocess.PIPE, text=True)
        assert checked.returncode == 0, (name, checked.stderr)
    unit = (UNITS / "jobworker.service").read_text()
    left_out = {line.split("=")[0][2:] for line in unit.splitlines() if line.startswith("# ") and "=" in line.split()[1]}
    tried = {option.split("=")[0] for option in module.LEFT_OUT}
    assert left_out - tried <= {"ProcSubset", "IPAddressDeny", "OOMScoreAdjust", "UMask"}, left_out - tried
