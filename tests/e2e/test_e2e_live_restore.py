"""
End-to-end tests of issue 16: running jobs outlive the server.  Real
servers (C{twistd jobworker}, root, namespaces, cgroups), real jobs; on CI
they fail where they cannot run.

What they rely on (the design of L{jobworker.host.isolate}): each isolated
job runs under a supervisor of its own, S, outside the job's cgroup and not
killed with the server; S holds the only read ends of the job's output
pipes, keeps reading them while no server runs (into the job's backlog in
the state directory), enforces the job's timeout, and writes the job's end
(C{jobs/<id>.end}).  The job record gets C{"supervisor": {"format": 2,
"pid": <S>}} once the job has started; the state directory's C{format}
file says C{{"format": 2}}.  A new server on the same state directory takes
the running jobs back; C{lost} remains for a job whose S died.

How the tests see what happens while no server runs: through the host's
C{/proc} (the job's processes carry a unique marker argument; C{wchar} in
C{/proc/<pid>/io} is the job's own count of the bytes it wrote), through
gate files the jobs wait for (in a directory outside C{/tmp}, which every
isolated job has its own of) and through the state directory.  Every test
ends with a check that no process of its jobs, no supervisor of theirs and
no cgroup of theirs is left (the C{rig} fixture).

Every test takes the C{layout} parameter, the host's cgroup layout
(C{[v1]}, C{[v2]}), so that a report says which driver ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_e2e_lifecycle import marker, processes_with
from tests.e2e.test_e2e_limits_isolation import OUTSIDE_TMP, job_cgroup_dirs
from tests.support import BIN, RunningServer, cgroup_layout, need, need_root, start_server

MiB = 1 << 20
# The state format the server writes and reads (jobworker.jobs.persistence).
STATE_FORMAT = 2
# A format no server of today reads: a "future" version's.
FUTURE_FORMAT = 99


@pytest.fixture(scope="module", autouse=True, params=[cgroup_layout()])
def layout(request) -> str:
    need_root()
    need(request.param != "none", "no usable cgroup hierarchy")
    return request.param


# -- processes on the host -------------------------------------------------------------


def process_identity(pid: int) -> tuple[int, int] | None:
    """
    C{(pid, start time in clock ticks)} of a live process, None when it is
    gone or a zombie: a pid alone may be reused (pid_max is 32768 here).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rpartition(b")")[2].split()
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return pid, int(fields[19])


def alive(identity: tuple[int, int] | None) -> bool:
    return identity is not None and process_identity(identity[0]) == identity


def written_bytes(pid: int) -> int:
    """
    The bytes the process C{pid} has written so far (C{wchar}: every byte
    its write(2) calls took, counted by the kernel, whoever reads them).
    """
    try:
        with open(f"/proc/{pid}/io") as file:
            for line in file:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError as exc:
        raise AssertionError(f"cannot read /proc/{pid}/io (the job's process is gone?): {exc}") from None
    raise AssertionError(f"no wchar in /proc/{pid}/io")


def poll(condition, timeout: float, what: str | Callable[[], str], interval: float = 0.02) -> Any:
    """
    Call C{condition()} until it returns something true (returned), for at
    most C{timeout} seconds; then fail, saying C{what} was waited for (a
    function: what it returns then).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what if isinstance(what, str) else what()}")
        time.sleep(interval)


def sha256_of(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while block := file.read(4 * MiB):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


# -- the rig: servers on one state dir, gates, and nothing left behind --------------------


class Rig:
    """
    Servers started one after another on one state directory (each stopped,
    or killed, by the test or at its end), the jobs' gate files, and what
    the end-of-test check looks for: the jobs' marker arguments, their
    supervisors (and other processes) by identity, their cgroups by id.
    """

    def __init__(self, certs: Path, tmp_path: Path) -> None:
        self.certs = certs
        self.state = tmp_path / "state"
        self.servers: list[RunningServer] = []
        self.markers: list[str] = []
        self.job_ids: list[str] = []
        self.processes: list[tuple[int, int]] = []
        # Outside /tmp (a job has its own); readable by a job's own uid.
        self.gates = Path(tempfile.mkdtemp(prefix="jobworker-gates-", dir=OUTSIDE_TMP))
        self.gates.chmod(0o755)

    # -- servers and jobs --

    def start(self, *args: str) -> RunningServer:
        server = start_server(self.certs, self.state, "--grace", "1", *args)
        self.servers.append(server)
        return server

    def marker(self) -> str:
        made = marker()
        self.markers.append(made)
        return made

    def gate(self, name: str) -> str:
        return str(self.gates / name)

    def open_gate(self, name: str) -> None:
        path = self.gates / name
        path.touch()
        path.chmod(0o644)

    def start_job(self, server: RunningServer, *args: str) -> str:
        """
        C{jobcli start ARGS} as admin; the job's id, once it runs.
        """
        result = server.jobcli("start", *args)
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.decode().strip()
        self.job_ids.append(job_id)
        return job_id

    def record(self, job_id: str) -> dict:
        return json.loads((self.state / "jobs" / f"{job_id}.json").read_text())

    def supervisor(self, job_id: str, timeout: float = 10) -> tuple[int, int]:
        """
        The identity of the job's supervisor S, from its record (written
        once the job has started), remembered for the end-of-test check.
        """
        def found() -> dict | None:
            # The first record names the supervisor with pid 0 (not known
            # yet); its pid comes once the job has started.
            entry = self.record(job_id).get("supervisor")
            return entry if entry and entry.get("pid") else None

        try:
            entry = poll(found, timeout, f"job {job_id}: a supervisor in its record")
        except AssertionError:
            raise AssertionError(f"job {job_id}: its record names no supervisor: {self.record(job_id)}") from None
        assert entry["format"] == STATE_FORMAT, entry
        identity = process_identity(entry["pid"])
        assert identity is not None, f"job {job_id}: its supervisor {entry['pid']} is not running"
        self.processes.append(identity)
        return identity

    def job_processes(self, argument: str, count: int = 1, timeout: float = 10) -> list[tuple[int, int]]:
        """
        The identities of the (at least C{count}) processes that have
        C{argument}, once there are that many.
        """
        def found() -> list[int]:
            pids = processes_with(argument)
            return pids if len(pids) >= count else []

        pids = poll(found, timeout, f"{count} processes with {argument}")
        identities = [identity for identity in map(process_identity, pids) if identity is not None]
        self.processes.extend(identities)
        return identities

    def command_process(self, argument: str, program: str, timeout: float = 10) -> int:
        """
        The pid of the one process that runs C{program} with C{argument}
        (the job's command, not whatever else may carry its arguments).
        """
        def found() -> list[int]:
            return [pid for pid in processes_with(argument) if _program(pid).startswith(program)]

        (pid,) = poll(found, timeout, f"a {program} process with {argument}")
        identity = process_identity(pid)
        assert identity is not None
        self.processes.append(identity)
        return pid

    # -- nothing left behind --

    def leftovers(self) -> list[str]:
        found = [f"process {pid} ({argument})" for argument in self.markers for pid in processes_with(argument)]
        found += [f"process {pid}" for pid, start in self.processes if alive((pid, start))]
        found += [f"cgroup {path}" for job_id in self.job_ids for path in job_cgroup_dirs(job_id)]
        return found

    def clean_up(self) -> list[str]:
        for server in self.servers:
            server.stop()
        try:
            poll(lambda: not self.leftovers(), 10, "nothing left", interval=0.1)
            left = []
        except AssertionError:
            left = self.leftovers()
        # Whatever is left is this test's own: end it, so that it does not
        # outlive the run.
        for argument in self.markers:
            for pid in processes_with(argument):
                _kill(pid)
        for identity in self.processes:
            if alive(identity):
                _kill(identity[0])
        for job_id in self.job_ids:
            for path in job_cgroup_dirs(job_id):
                try:
                    for member in Path(path, "cgroup.procs").read_text().split():
                        _kill(int(member))
                    time.sleep(0.2)
                    os.rmdir(path)
                except OSError:
                    pass
        shutil.rmtree(self.gates, ignore_errors=True)
        return left


def _program(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return os.path.basename(file.read().split(b"\0")[0].decode(errors="replace"))
    except OSError:
        return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def rig(certs, tmp_path) -> Iterator[Rig]:
    made = Rig(certs, tmp_path)
    yield made
    left = made.clean_up()
    assert not left, f"left behind after the test: {left}"


def status(server: RunningServer, job_id: str) -> dict:
    return json.loads(server.jobcli("status", "--json", job_id, check=True).stdout)


def output_bytes(server: RunningServer, job_id: str) -> int:
    with closing(server.client("admin")) as client:
        return client.status(uuid.UUID(job_id)).output_bytes


def kill_server(server: RunningServer) -> None:
    server.process.kill()
    server.process.wait()


# -- 200 MiB, kill -9 of the server mid-way, a follower that reconnects -----------------------

CHUNK = 64 * 1024
CHUNKS = 3200  # 200 MiB

# The job's output: chunk i is i (8 bytes, big-endian) and a fixed block
# derived from the seed, so a chunk lost, doubled or moved changes the
# digest as surely as a byte.  Shared by the job and the test.
PATTERN = '''
import hashlib

def chunks(seed, count, size):
    block = hashlib.shake_256(seed.encode()).digest(size)
    for index in range(count):
        yield index.to_bytes(8, "big") + block[8:]
'''

# argv: MARKER SEED COUNT PACED GATE_INDEX GATE: the first PACED chunks with
# a 1 ms pause after each (~60 MiB/s at most), the rest as fast as it can;
# before chunk GATE_INDEX, wait until the file GATE exists; exit 3 once all
# is written.
WRITER = PATTERN + '''
import os, sys, time

seed, count, paced, gate_index, gate = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
for index, chunk in enumerate(chunks(seed, count, CHUNK_SIZE)):
    if index < paced:
        time.sleep(0.001)
    if index == gate_index:
        while not os.path.exists(gate):
            time.sleep(0.01)
    view = memoryview(chunk)
    while view:
        view = view[os.write(1, view):]
sys.exit(3)
'''.replace("CHUNK_SIZE", str(CHUNK))


def expected_output(seed: str) -> str:
    namespace: dict[str, Any] = {}
    exec(PATTERN, namespace)
    digest = hashlib.sha256()
    for chunk in namespace["chunks"](seed, CHUNKS, CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def test_200_mib_with_a_follower_across_a_kill_of_the_server(rig, tmp_path):
    """
    A job writes 200 MiB: its first 100 MiB paced (at most ~60 MiB/s), the
    next 60 MiB as fast as it can, then it waits for a gate, opened once
    the next server runs, and writes the last 40 MiB.  The first server is
    killed (C{kill -9}) while the job writes its paced part, with output in
    flight, so the job writes over 100 MiB while no server runs: a hundred
    times a pipe's buffer (a job whose output is not drained while the
    server is down blocks within one).  A follower attached to the first
    server loses its connection at the kill and reconnects to the next with
    C{--since-offset} the bytes it had; what it wrote in all, and a fresh
    C{logs} from offset 0, are the job's exact output (sha256), and both
    end with its exit code.
    """
    argument, seed = rig.marker(), f"seed-{uuid.uuid4()}"
    expected = expected_output(seed)
    first = rig.start()
    job_id = rig.start_job(
        first, "--", "python3", "-c", WRITER, argument, seed, str(CHUNKS),
        str(100 * MiB // CHUNK), str(160 * MiB // CHUNK), rig.gate("back"),
    )
    writer = rig.command_process(argument, "python3")
    followed = tmp_path / "followed"
    with open(followed, "wb") as sink:
        follower = subprocess.Popen([str(BIN / "jobcli"), "logs", "-f", job_id], stdout=sink,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=first.env())
    try:
        poll(lambda: output_bytes(first, job_id) >= 20 * MiB, 60, "the first 20 MiB at the server", interval=0.05)
        poll(lambda: followed.stat().st_size > 0, 20, "the follower's first bytes")
        at_kill = written_bytes(writer)
        kill_server(first)
        follower.wait(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    if at_kill >= 100 * MiB:
        pytest.fail(f"the job had written {at_kill / MiB:.0f} MiB when the server was killed, past its paced part")
    assert process_identity(writer) is not None, "the job did not outlive the server"
    had = followed.stat().st_size
    assert 0 < had <= written_bytes(writer), had
    poll(lambda: written_bytes(writer) >= 160 * MiB, 60,
         lambda: f"the job writing {(160 * MiB - at_kill) / MiB:.0f} MiB while no server runs "
                 f"(it wrote {(written_bytes(writer) - at_kill) / MiB:.1f} MiB: blocked?)")

    second = rig.start()
    with open(followed, "ab") as sink:
        follower = subprocess.Popen(
            [str(BIN / "jobcli"), "logs", "-f", "--since-offset", str(had), job_id],
            stdout=sink, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=second.env(),
        )
    try:
        rig.open_gate("back")
        code = follower.wait(timeout=120)
        errors = follower.stderr.read().decode(errors="replace")
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert code == 3, errors
    assert sha256_of(followed) == (expected, CHUNKS * CHUNK), "the follower's output is not the job's"

    fresh = tmp_path / "fresh"
    with open(fresh, "wb") as sink:
        done = subprocess.run([str(BIN / "jobcli"), "logs", job_id], stdout=sink, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=second.env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert sha256_of(fresh) == (expected, CHUNKS * CHUNK), "logs from 0 is not the job's output"
    final = status(second, job_id)
    assert (final["state"], final["exit_code"], final["output_bytes"]) == ("exited", 3, CHUNKS * CHUNK), final
    assert second.jobcli("wait", job_id).returncode == 3
    assert "Traceback" not in second.log()


# -- the write rate with the server down --------------------------------------------------------

# argv: MARKER.  Writes 1 KiB blocks to its stdout as fast as it can, for
# ever.  Run under --cpu 0.1: the cap, not the reader of its output, sets its
# pace (~110 MiB/s here, against today's server), so ~1 GiB passes in the
# 10 s the server is down.  Without a cap it wrote 64 KiB blocks at 3 GiB/s:
# 30 GiB on the disk in those 10 s, were its supervisor that fast.
FAST_WRITER = "import os\nblock = b'x' * 1024\nwhile True:\n    os.write(1, block)\n"
FAST_WRITER_CPU = "0.1"


def write_rate(pid: int, seconds: float) -> float:
    """
    Bytes per second the process C{pid} writes over the next C{seconds}.
    """
    began, before = time.monotonic(), written_bytes(pid)
    time.sleep(seconds)
    return (written_bytes(pid) - before) / (time.monotonic() - began)


def test_a_job_writes_as_fast_with_the_server_down_as_up(rig):
    """
    A job writes to its stdout as fast as it can within its CPU limit (see
    L{FAST_WRITER}); its write rate is its own count of bytes written
    (C{wchar} of its process, read by the test from the host's C{/proc}: it
    does not depend on the server, up or down), over 2 s with the server up,
    then over the 5 s after the server was killed (C{kill -9}), then over
    2 s under the next server.  The rate while down must be at least 0.9
    times the rate while the first server ran: a job whose output waits in
    its pipe for a server blocks within 1 MiB, and one whose output is
    drained more slowly than it writes is held to that pace.  (Spools are
    capped with C{--retention 32M}: a gigabyte passes.)
    """
    argument = rig.marker()
    first = rig.start("--retention", "32M")
    job_id = rig.start_job(first, "--cpu", FAST_WRITER_CPU, "--", "python3", "-c", FAST_WRITER, argument)
    writer = rig.command_process(argument, "python3")
    poll(lambda: written_bytes(writer) > 4 * MiB, 10, "the job's first 4 MiB")
    time.sleep(0.5)  # past the start's transient
    up = write_rate(writer, 2.0)
    kill_server(first)
    down = write_rate(writer, 5.0)
    second = rig.start("--retention", "32M")
    after = write_rate(writer, 2.0)
    assert status(second, job_id)["state"] == "running"
    print(f"figure: write rate, server up {up / MiB:.0f} MiB/s, down {down / MiB:.0f} MiB/s "
          f"({down / up:.2f}x), up again {after / MiB:.0f} MiB/s")
    assert second.jobcli("stop", "--force", job_id, timeout=60).returncode == 0
    assert status(second, job_id)["state"] == "stopped"
    assert down >= 0.9 * up, f"server down: {down / MiB:.1f} MiB/s, up: {up / MiB:.1f} MiB/s"
    assert second.jobcli("rm", job_id).returncode == 0


# -- jobs that end while no server runs ---------------------------------------------------------


def test_jobs_that_end_while_no_server_runs_have_their_true_final_state(rig):
    """
    Three jobs end while no server runs: one exits with 7 (after some CPU
    work), one is killed by the OOM killer at its 32 MiB limit, one runs past
    its 2 s timeout (counted from its own start: no server runs when it
    expires).  Each ends after the kill (the first two wait for a gate
    opened then; the third was started just before it); the test waits
    until each has ended and its end is written (C{jobs/<id>.end}) before
    the next server starts.  That server reports each one's true end:
    C{exited} 7, C{oom}, C{timeout}, with usage frozen at the end.
    """
    exiting, hungry, slow = rig.marker(), rig.marker(), rig.marker()
    first = rig.start()
    work = 'while [ ! -e "$1" ]; do sleep 0.02; done; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 7'
    exit_id = rig.start_job(first, "--", "sh", "-c", work, "sh", rig.gate("down"), exiting)
    grow = ("import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)\n"
            "hold = []\nwhile True: hold.append(bytearray(1 << 20))\n")
    oom_id = rig.start_job(first, "--memory", "32M", "--", "python3", "-c", grow, rig.gate("down"), hungry)
    for job_id in (exit_id, oom_id):
        rig.supervisor(job_id)
    timeout_id = rig.start_job(first, "--timeout", "2s", "--", "sleep", slow)
    kill_server(first)
    killed_at = time.time()
    # Killed at once: the server may not have saved the supervisor in the
    # job's record yet (a new server finds S by the job's socket anyway).
    if "supervisor" in rig.record(timeout_id):
        rig.supervisor(timeout_id)
    rig.open_gate("down")
    ends = [rig.state / "jobs" / f"{job_id}.end" for job_id in (exit_id, oom_id, timeout_id)]
    poll(lambda: all(end.exists() for end in ends), 20, "the three jobs' ends written while no server runs")
    poll(lambda: not any(processes_with(argument) for argument in (exiting, hungry, slow)), 10,
         "the three jobs' processes gone")

    second = rig.start()
    exited, oom, timed_out = (status(second, job_id) for job_id in (exit_id, oom_id, timeout_id))
    if timed_out["started_at"] + 2.0 <= killed_at:
        pytest.fail("the timed job's timeout expired before the server was killed (a loaded machine): nothing tested")
    assert (exited["state"], exited["exit_code"]) == ("exited", 7), exited
    assert exited["usage"]["cpu_usec"] > 0 and exited["usage"]["memory_peak_bytes"] > 0, exited
    assert oom["state"] == "oom", oom
    assert oom["usage"]["memory_peak_bytes"] >= 24 * MiB, oom
    assert timed_out["state"] == "timeout" and timed_out["error"], timed_out
    # From the job's start: it ended while no server ran, 2 s after it began.
    assert 1.8 <= timed_out["ended_at"] - timed_out["started_at"] < 6, timed_out
    assert [second.jobcli("wait", job_id).returncode for job_id in (exit_id, oom_id, timeout_id)] == [
        7, 128 + signal.SIGKILL, 128 + signal.SIGTERM,
    ]
    poll(lambda: not any(map(job_cgroup_dirs, (exit_id, oom_id, timeout_id))), 10, "the three jobs' cgroups removed")


# -- --live-restore --------------------------------------------------------------------------------


def test_live_restore_leaves_jobs_running_across_a_clean_stop(rig):
    """
    With C{--live-restore}, SIGTERM stops the server and leaves its running
    job running; the job's output meanwhile is kept, and the next server
    (started without the option) has the job running: status, list, logs
    and stop work on it, and the stop ends every process of the job.
    (Without the option a clean stop stops every job:
    C{test_e2e_lifecycle.py::test_sigterm_stops_running_jobs_and_the_server_exits}.)
    """
    argument = rig.marker()
    first = rig.start("--live-restore")
    script = 'echo before; while [ ! -e "$1" ]; do sleep 0.02; done; echo during; sleep "$2" & exec sleep "$2"'
    job_id = rig.start_job(first, "--", "sh", "-c", script, "sh", rig.gate("down"), argument)
    rig.supervisor(job_id)
    poll(lambda: output_bytes(first, job_id) >= len(b"before\n"), 10, "the job's first line at the server")
    first.process.send_signal(signal.SIGTERM)
    try:
        code = first.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit within 20 s of SIGTERM")
    assert code in (0, -signal.SIGTERM), first.log()[-3000:]
    assert "Traceback" not in first.log(), first.log()[-3000:]
    assert processes_with(argument), "the job did not outlive a --live-restore stop"
    rig.open_gate("down")

    second = rig.start()
    poll(lambda: output_bytes(second, job_id) >= len(b"before\nduring\n"), 10, "the line written with no server")
    processes = rig.job_processes(argument, count=2)  # sh's sleep in the background, and the one it became
    assert status(second, job_id)["state"] == "running"
    listed = {job["id"]: job["state"] for job in json.loads(second.jobcli("list", "--json", check=True).stdout)}
    assert listed.get(job_id) == "running", listed
    assert second.jobcli("logs", job_id, check=True).stdout == b"before\nduring\n"
    assert second.jobcli("stop", "--grace", "1", job_id, timeout=30).returncode == 0
    final = status(second, job_id)
    assert (final["state"], final["signal"]) == ("stopped", signal.SIGTERM), final
    # The stop of a job taken back still ends every process of it.
    poll(lambda: not any(map(alive, processes)), 5, "the stopped job's processes gone")


# -- a future state format -------------------------------------------------------------------------


def finished_job_state(rig: Rig) -> str:
    """
    Run a job to its end under a server on the rig's state dir, then stop
    that server: the state dir now holds a real finished job's files.
    """
    server = rig.start()
    job_id = rig.start_job(server, "--", "true")
    assert server.jobcli("wait", job_id).returncode == 0
    assert server.stop() in (0, -signal.SIGTERM)
    return job_id


def test_a_job_of_a_future_state_format_is_left_running_and_untouched(rig):
    """
    A job record whose supervisor speaks state format 99 (crafted from a
    real record: running, its supervisor a C{sleep} the test started) is not
    this server's to take: it is not listed nor found, its record is left
    byte for byte, its "supervisor" keeps running (also through a clean
    stop of the server), and the log says why.
    """
    done = finished_job_state(rig)
    argument = rig.marker()
    sleeper = subprocess.Popen(["sleep", argument])
    try:
        crafted = str(uuid.uuid4())
        record = rig.record(done)
        record["status"].update(id=crafted, state="running", exit_code=None, signal=None, ended_at=None)
        record["supervisor"] = {"format": FUTURE_FORMAT, "pid": sleeper.pid}
        path = rig.state / "jobs" / f"{crafted}.json"
        path.write_text(json.dumps(record))
        content = path.read_bytes()

        server = rig.start()
        said = (f"job {crafted}: its supervisor uses state format {FUTURE_FORMAT}, "
                f"this server speaks {STATE_FORMAT}; left running and untouched")
        poll(lambda: said in server.log(), 10, f"the log line {said!r}")
        listed = [job["id"] for job in json.loads(server.jobcli("list", "--json", check=True).stdout)]
        assert listed == [done], listed
        assert server.jobcli("status", crafted).returncode == 1
        assert sleeper.poll() is None, "the server killed the future format's job"
        assert path.read_bytes() == content, "the server changed the future format's record"
        assert server.stop() in (0, -signal.SIGTERM)
        assert sleeper.poll() is None, "the server's stop killed the future format's job"
        assert path.read_bytes() == content, "the server's stop changed the future format's record"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_state_dir_of_a_future_format_is_refused_and_left_as_it_is(rig):
    """
    A state directory whose C{format} file says 99: the server does not
    start, says why on its output, and changes no file there.
    """
    finished_job_state(rig)
    (rig.state / "format").write_text(json.dumps({"format": FUTURE_FORMAT}) + "\n")

    def files() -> dict[str, bytes]:
        return {str(path.relative_to(rig.state)): path.read_bytes() for path in sorted(rig.state.rglob("*"))
                if path.is_file()}

    before = files()
    with pytest.raises(AssertionError) as refused:
        rig.start()
    said = f"is in format {FUTURE_FORMAT}; this server reads formats up to {STATE_FORMAT}"
    assert "server exited with" in str(refused.value), refused.value
    assert said in str(refused.value) and "state directory" in str(refused.value), refused.value
    assert files() == before


# -- lost: the job's supervisor died ---------------------------------------------------------------


def test_a_job_whose_supervisor_is_killed_is_lost_and_nothing_of_it_is_left(rig):
    """
    C{kill -9} of a job's supervisor S: the kernel ends the job's PID
    namespace with it, so every process of the job is gone, and the job is
    C{lost}, its cgroup removed: told by the running server (it sees S's
    socket close), or by the next one when S died while no server ran.
    """
    first = rig.start()
    running_killed, down_killed = rig.marker(), rig.marker()
    script = 'sleep "$1" & exec sleep "$1"'
    under_server = rig.start_job(first, "--", "sh", "-c", script, "sh", running_killed)
    processes = rig.job_processes(running_killed, count=2)
    supervisor = rig.supervisor(under_server)
    os.kill(supervisor[0], signal.SIGKILL)
    poll(lambda: status(first, under_server)["state"] == "lost", 10, "the running server marking the job lost")
    assert status(first, under_server)["error"]
    poll(lambda: not any(map(alive, [supervisor, *processes])), 5, "the job's processes gone with its supervisor")
    poll(lambda: not job_cgroup_dirs(under_server), 10, "the lost job's cgroup removed")

    while_down = rig.start_job(first, "--", "sh", "-c", script, "sh", down_killed)
    processes = rig.job_processes(down_killed, count=2)
    supervisor = rig.supervisor(while_down)
    kill_server(first)
    assert all(map(alive, [supervisor, *processes])), "the job did not outlive the server"
    os.kill(supervisor[0], signal.SIGKILL)
    poll(lambda: not any(map(alive, [supervisor, *processes])), 5, "the job's processes gone with its supervisor")

    second = rig.start()
    assert status(second, while_down)["state"] == "lost"
    assert status(second, under_server)["state"] == "lost"
    poll(lambda: not job_cgroup_dirs(while_down), 10, "the lost job's cgroup removed by the next server")
    assert second.jobcli("run", "--", "true", timeout=30).returncode == 0
