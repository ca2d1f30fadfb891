"""
The real supervisor (L{jobworker.host.isolate.Supervisor}) run as the server
runs it, with this test playing the server over its socket: its frames, its
backlog while no server is connected, a new server's hello, signals, its own
timeout, and the descriptors the command does not get.  Root: namespaces.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobworker.host import contract
from jobworker.host.isolate import compiled_helper
from jobworker.jobs.helper import ISOLATE_SCRIPT
from tests.host.test_isolate import job_only_memory
from tests.support import need, need_root


class Supervised:
    """
    One supervised job and the test's end of its socket.
    """

    def __init__(self, tmp_path: Path, script: str, **config: object) -> None:
        need_root()
        need(os.path.exists("/proc/self/ns/pid"), "needs PID namespaces")
        self.dir = tmp_path
        self.path = str(tmp_path / "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(4)
        self.sock, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        backlog = os.open(tmp_path / "backlog", os.O_RDWR | os.O_CREAT, 0o600)
        end = os.open(tmp_path / "end", os.O_RDWR | os.O_CREAT, 0o600)
        fds = {1: out_w, 2: err_w, 3: theirs.fileno(), 4: out_r, 5: err_r, 6: listener.fileno(), 7: backlog, 8: end}
        high = {target: os.dup(fd) for target, fd in fds.items()}

        def place() -> None:
            for target, fd in high.items():
                os.dup2(fd, target)

        full = dict(argv=["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin"}, isolate=True, supervise=True,
                    grace_ms=500, **config)
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", ISOLATE_SCRIPT, json.dumps(full)],
            preexec_fn=place, close_fds=False, stdin=subprocess.DEVNULL,
        )
        for fd in [*high.values(), out_r, out_w, err_r, err_w, backlog, end]:
            os.close(fd)
        theirs.close()
        listener.close()
        self.buffer = bytearray()
        self.output = bytearray()
        self.offset = 0
        self.lines: list[str] = []
        self.hello: dict | None = None
        self.end: bytes | None = None
        self.closed = False

    def read(self, until, *, ack: bool = True, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while not until():
            assert time.monotonic() < deadline, (self.lines, len(self.output), self.end)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                # As the server does: the supervisor's hang-up waits for our
                # end to close (else for ACK_WAIT_S) before it exits.
                self.closed = True
                self.sock.close()
                return
            self.buffer += data
            frames, used = contract.split_frames(self.buffer)
            del self.buffer[:used]
            for kind, payload in frames:
                if kind == contract.HELLO:
                    self.hello = json.loads(payload)
                elif kind == contract.LINE:
                    self.lines.append(payload.decode())
                elif kind == contract.DATA:
                    fd, offset, data = contract.parse_data(payload)
                    assert offset == self.offset, (offset, self.offset)
                    self.offset += len(data)
                    self.output += data
                    if ack:
                        self.sock.sendall(contract.frame(contract.ACK, self.offset.to_bytes(8, "big")))
                elif kind == contract.END:
                    self.end = payload

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
        self.buffer = bytearray()
        self.hello = None

    def finish(self) -> int:
        self.read(lambda: self.closed)
        return self.process.wait(10)


@pytest.fixture
def jobs():
    made: list[Supervised] = []
    yield made
    for job in made:
        if job.process.poll() is None:
            job.process.kill()
            job.process.wait()


def test_output_lines_and_end_come_as_frames_and_the_end_is_recorded(tmp_path, jobs):
    job = Supervised(tmp_path, "echo out; echo err >&2; exit 7")
    jobs.append(job)
    assert job.finish() == 7
    assert job.hello is not None and job.hello["format"] == contract.SUPERVISOR_FORMAT
    # The supervisor's pid as the host sees it (it is PID 1 of its own namespace).
    assert job.hello["pid"] > 1 and job.hello["pid"] != os.getpid()
    assert sorted(job.output.split()) == [b"err", b"out"]
    assert job.lines == ["started", "exit 7"]
    assert job.end == b"7 0"
    record = json.loads((tmp_path / "end").read_text())
    assert record["ended"] and record["exit"] == [7, 0] and record["offset"] == 8 and record["lines"] == job.lines


def test_the_command_gets_no_descriptor_of_the_supervisor(tmp_path, jobs):
    job = Supervised(tmp_path, "ls /proc/self/fd")
    jobs.append(job)
    assert job.finish() == 0
    # ls's own directory descriptor is the fourth.
    assert sorted(int(name) for name in job.output.split()) == [0, 1, 2, 3]


def test_output_while_no_server_is_connected_goes_to_the_backlog_and_a_new_server_gets_it(tmp_path, jobs):
    gate = tmp_path / "gate"
    script = f"head -c 3000000 /dev/zero; while [ ! -e {gate} ]; do sleep 0.05; done; echo tail"
    job = Supervised(tmp_path, script)
    jobs.append(job)
    job.read(lambda: job.offset >= 100_000)
    had = job.offset
    job.sock.close()  # the server dies: what it did not acknowledge is kept
    # Until the backlog holds the 3 MB (it starts where the supervisor had
    # seen acknowledgements, which may be before what we had).
    deadline = time.monotonic() + 10
    while _backlog_end(tmp_path / "backlog") < 3_000_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    job.reconnect()
    job.read(lambda: job.hello is not None, ack=False)
    start, end = job.hello["backlog"]
    assert start <= had and end == 3_000_000 == job.hello["offset"]
    frames, _ = contract.split_frames((tmp_path / "backlog").read_bytes())
    backlog = [contract.parse_data(payload) for _, payload in frames]
    assert backlog[0][1] == start and sum(len(data) for _, _, data in backlog) == end - start
    assert all(data == b"\0" * len(data) for _, _, data in backlog)
    # Acknowledging past its end empties it.
    job.sock.sendall(contract.frame(contract.ACK, end.to_bytes(8, "big")))
    job.offset = end
    gate.touch()
    assert job.finish() == 0
    assert bytes(job.output).endswith(b"tail\n")
    assert (tmp_path / "backlog").stat().st_size == 0


def test_a_job_that_ends_while_no_server_is_connected_leaves_its_end_and_backlog(tmp_path, jobs):
    job = Supervised(tmp_path, "sleep 0.3; echo late; exit 3")
    jobs.append(job)
    job.read(lambda: "started" in job.lines)
    job.sock.close()
    assert job.process.wait(10) == 3  # it ends once its end is recorded
    record = json.loads((tmp_path / "end").read_text())
    assert record["exit"] == [3, 0] and record["backlog"] == [0, 5]
    frames, _ = contract.split_frames((tmp_path / "backlog").read_bytes())
    assert [contract.parse_data(payload) for _, payload in frames] == [(1, 0, b"late\n")]


def test_signals_are_forwarded_and_sigkill_kills_the_job(tmp_path, jobs):
    job = Supervised(tmp_path, "trap 'echo term' TERM; while :; do sleep 0.05; done")
    jobs.append(job)
    job.read(lambda: "started" in job.lines)
    time.sleep(0.2)  # the trap is set
    job.sock.sendall(contract.frame(contract.SEND_SIGNAL, bytes((15,))))
    job.read(lambda: b"term" in job.output)
    job.sock.sendall(contract.frame(contract.SEND_SIGNAL, bytes((9,))))
    job.finish()
    assert job.end is not None and job.end.split()[1] == b"9"


def test_the_supervisor_stops_the_job_at_its_timeout_from_its_start(tmp_path, jobs):
    job = Supervised(tmp_path, "trap '' TERM; sleep 30", timeout_ms=300)
    jobs.append(job)
    began = time.monotonic()
    job.read(lambda: "started" in job.lines)
    job.sock.close()  # no server needed for it
    job.process.wait(10)
    took = time.monotonic() - began
    record = json.loads((tmp_path / "end").read_text())
    assert record["timed_out"] and "timeout" in record["lines"]
    assert record["exit"][1] == 9  # TERM ignored: SIGKILL after the grace of 0.5 s
    assert 0.7 < took < 5, took


class Zygote:
    """
    The real zygote, with this test as its server.
    """

    def __init__(self, helper: str = ISOLATE_SCRIPT) -> None:
        need_root()
        need(os.path.exists("/proc/self/ns/pid"), "needs PID namespaces")
        self.sock, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", helper, "--zygote"],
            preexec_fn=lambda: os.dup2(theirs.fileno(), 3), close_fds=False, stdin=subprocess.DEVNULL,
        )
        theirs.close()

    def job(self, directory: Path, script: str) -> Supervised:
        """
        Ask for one supervised job; the test's end of its socket, once the
        command has started.
        """
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(directory / "s.sock"))
        listener.listen(4)
        server_end, supervisor_end = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        backlog = os.open(directory / "backlog", os.O_RDWR | os.O_CREAT, 0o600)
        end = os.open(directory / "end", os.O_RDWR | os.O_CREAT, 0o600)
        config = json.dumps(dict(argv=["/bin/sh", "-c", script], isolate=True, supervise=True,
                                 env={"PATH": "/usr/bin:/bin"})).encode()
        fds = [out_w, err_w, supervisor_end.fileno(), out_r, err_r, listener.fileno(), backlog, end]
        self.sock.sendmsg([len(config).to_bytes(8, "big")], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        self.sock.sendall(config)
        for fd in (out_w, err_w, out_r, err_r, backlog, end):
            os.close(fd)
        supervisor_end.close()
        listener.close()
        job = Supervised.__new__(Supervised)
        job.sock, job.buffer, job.output, job.offset, job.lines = server_end, bytearray(), bytearray(), 0, []
        job.hello, job.end, job.closed = None, None, False
        job.read(lambda: "started" in job.lines)
        return job

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def zygote(tmp_path_factory):
    # Its bytecode, as the server runs it (see compiled_helper).
    made = Zygote(compiled_helper(str(tmp_path_factory.mktemp("helper"))))
    yield made
    made.close()


def test_the_zygote_forks_supervisors_that_outlive_it(tmp_path, zygote):
    """
    The zygote forks a supervisor per request; killing the zygote leaves
    the running job alone, and a request to a dead zygote fails (the
    server then starts a new one: L{jobworker.jobs.supervisor.Zygote}).
    """
    job = zygote.job(tmp_path, "sleep 0.5; echo got")
    supervisor_pid = job.hello["pid"]
    assert open(f"/proc/{supervisor_pid}/stat").read().split()[3] == str(zygote.process.pid)
    zygote.process.kill()
    zygote.process.wait()
    time.sleep(0.2)
    assert os.path.exists(f"/proc/{supervisor_pid}"), "the supervisor died with the zygote"
    # The job goes on to its end, and says so.
    job.read(lambda: job.closed)
    assert job.lines[-1] == "exit 0" and bytes(job.output) == b"got\n"
    with pytest.raises(OSError):
        zygote.sock.sendmsg([b"\0" * 8])
        zygote.sock.sendmsg([b"\0" * 8])


# The service aims at 1 MiB per running job (issue 17); the supervisor's share.
SUPERVISOR_MEMORY_BUDGET = 1 << 20


def test_a_job_has_one_supervising_process_outside_its_namespaces_and_small(tmp_path, zygote):
    """
    The supervisor is PID 1 of the job's PID namespace and the command its
    child (no init between them); the supervisor stays in the host's mount
    and network namespaces (the command's are the job's), and the memory
    that only it holds stays within its budget.
    """
    need(os.path.exists("/proc/kpagecount"), "needs /proc/kpagecount")
    job = zygote.job(tmp_path, "exec sleep 30")
    supervisor = job.hello["pid"]
    assert _nspid(supervisor) == [supervisor, 1]
    children = open(f"/proc/{supervisor}/task/{supervisor}/children").read().split()
    assert len(children) == 1
    command = int(children[0])
    deadline = time.monotonic() + 5
    while open(f"/proc/{command}/comm").read().strip() != "sleep":  # sh execs it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _nspid(command)[1:] == [2]
    for kind in ("mnt", "net"):
        ours = os.readlink(f"/proc/self/ns/{kind}")
        assert os.readlink(f"/proc/{supervisor}/ns/{kind}") == ours
        assert os.readlink(f"/proc/{command}/ns/{kind}") != ours
    used = job_only_memory([supervisor])
    assert used <= SUPERVISOR_MEMORY_BUDGET, f"{used / 2**20:.2f} MiB"
    job.sock.sendall(contract.frame(contract.SEND_SIGNAL, bytes((9,))))
    job.read(lambda: job.closed)
    assert job.lines[-1] == "signal 9"


def test_a_cgroup_that_cannot_be_joined_fails_the_start_and_the_command_never_runs(tmp_path, jobs):
    """
    The supervisor moves the command into the job's cgroups while it sets
    up: a move that fails is the start's failure, and the command never
    runs.
    """
    ran = tmp_path / "ran"
    # Opens for writing; every write fails with ENOSPC.
    job = Supervised(tmp_path, f"touch {ran}", cgroup_procs=["/dev/full"])
    jobs.append(job)
    assert job.finish() == contract.EXIT_SETUP_FAILED
    assert job.lines == [f"failed setup {errno.ENOSPC} cgroup join /dev/full: {os.strerror(errno.ENOSPC)}"]
    assert not ran.exists()


def _nspid(pid: int) -> list[int]:
    """
    A process's pid in each PID namespace it is in, the host's first.
    """
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("NSpid:"):
            return [int(n) for n in line.split()[1:]]
    raise AssertionError("no NSpid line")


def _backlog_end(path: Path) -> int:
    """
    The output offset just past the last whole chunk of a backlog file.
    """
    frames, _ = contract.split_frames(path.read_bytes())
    chunks = [contract.parse_data(payload) for _, payload in frames]
    return max((offset + len(data) for _, offset, data in chunks), default=0)
