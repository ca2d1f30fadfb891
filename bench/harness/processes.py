"""
The workspace (a temporary directory and every long-lived process started
in it), commands run to their end with their wall and CPU times, and
waiting for a server to listen.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.harness.cgroups import ServerCgroup
from bench.harness.results import say


class BenchError(Exception):
    """
    The benchmark could not measure what it should (as opposed to a goal
    being missed, which is a result).
    """


@dataclass
class Timing:
    wall_s: float
    user_s: float
    sys_s: float
    returncode: int
    stdout: bytes = b""
    minor_faults: int = 0


class Workspace:
    """
    The temporary directory and every long-lived process started in it;
    L{close} stops them all.
    """

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="jobworker-bench-")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.cgroups: list[ServerCgroup] = []
        self.directories: list[str] = []  # outside root, removed with it

    def path(self, *names: str) -> str:
        return os.path.join(self.root, *names)

    def spawn(self, command: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(list(command), **options)
        self.processes.append(process)
        return process

    def close(self) -> None:
        # Newest first: followers before servers, servers before sshd.
        for process in reversed(self.processes):
            stop_process(process)
        self.processes.clear()
        for cgroup in self.cgroups:
            for problem in cgroup.remove():
                say(f"bench: could not remove cgroup {problem}")
        self.cgroups.clear()
        for directory in [*self.directories, self.root]:
            shutil.rmtree(directory, ignore_errors=True)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_timed(command: Sequence[str], *, env: dict[str, Any] | None = None, capture: bool = False, stdin: Any = subprocess.DEVNULL) -> Timing:
    """
    Run C{command} to its end; wall time, and the CPU time of the process
    and of every child it waited for (from wait4(2)).  Output goes to
    /dev/null unless C{capture}.
    """
    began = time.perf_counter()
    process = subprocess.Popen(
        list(command),
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
    )
    out = err = b""
    if capture:
        out, err = _read_both(process)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    timing = Timing(wall, usage.ru_utime, usage.ru_stime, process.returncode, out, usage.ru_minflt)
    if capture and process.returncode != 0:
        timing.stdout = out + b"\n[stderr] " + err
    return timing


def _read_both(process: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read()))  # type: ignore[union-attr]  # capture: a pipe
    reader.start()
    out = process.stdout.read()  # type: ignore[union-attr]  # capture: a pipe
    reader.join()
    process.stdout.close()  # type: ignore[union-attr]  # capture: a pipe
    process.stderr.close()  # type: ignore[union-attr]  # capture: a pipe
    return out, errors[0]


def check(timing: Timing, what: str, expect_stdout: bytes | None = None) -> Timing:
    if timing.returncode != 0:
        raise BenchError(f"{what} exited with {timing.returncode}: {timing.stdout[-2000:].decode(errors='replace')}")
    if expect_stdout is not None and timing.stdout != expect_stdout:
        raise BenchError(f"{what} printed {timing.stdout[:200]!r}, expected {expect_stdout!r}")
    return timing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(
    port: int, process: subprocess.Popen[bytes], what: str, log_path: str, timeout: float = 30.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode}:\n{tail(log_path)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(interval)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{tail(log_path)}")


def tail(path: str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""
