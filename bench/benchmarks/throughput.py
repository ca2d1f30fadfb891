"""
C{throughput}: a job writing 1 GiB to stdout, received by C{jobcli run} and
by C{jobcli start} + C{jobcli logs -f}, beside C{ssh} (and, for context, a
server with its state on tmpfs, C{ssh -c aes128-gcm} and a raw pipe).
Goal: jobworker/ssh ≥ 1.5.  With C{--py-spy}, one more run is profiled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.harness.proc import proc_children_cpu_s, proc_cpu_split
from bench.harness.processes import BenchError, Timing, check, run_timed
from bench.harness.results import Row, interleaved, mbps, median
from bench.harness.servers import Context, JobworkerServer
from bench.harness.settings import RESULTS, GiB, size_arg, size_label


def tmpfs_with_room(size: int) -> str | None:
    """
    /dev/shm if it is a tmpfs with room for C{size} bytes and some more.
    """
    try:
        with open("/proc/self/mounts") as handle:
            if not any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in handle):
                return None
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stats.f_bavail * stats.f_frsize > 2 * size else None


def bench_throughput(ctx: Context) -> tuple[list[Row], dict[str, Any]]:
    size = ctx.settings.throughput_bytes
    head = ["head", "-c", size_arg(size), "/dev/zero"]
    details: dict[str, list[dict[str, Any]]] = {}
    servers: list[JobworkerServer] = []

    def record(name: str, timing: Timing, cpu: dict[str, float]) -> float:
        entry = {"wall_s": timing.wall_s, "mb_per_s": mbps(size, timing.wall_s), "client_cpu_s": timing.user_s + timing.sys_s, "client_user_s": timing.user_s, "client_sys_s": timing.sys_s, "client_minor_faults": timing.minor_faults, **cpu}
        details.setdefault(name, []).append(entry)
        return mbps(size, timing.wall_s)

    def server_cpu(server: JobworkerServer) -> tuple[float, float, int, float]:
        return (*proc_cpu_split(server.pid), proc_children_cpu_s(server.pid))

    def server_delta(before: tuple[float, ...], after: tuple[float, ...]) -> dict[str, float]:
        user, system, faults, jobs = (b - a for a, b in zip(before, after))
        return {"server_cpu_s": user + system, "server_user_s": user, "server_sys_s": system, "server_minor_faults": faults, "job_cpu_s": jobs}

    def jobcli_run(server: JobworkerServer, name: str) -> Callable[[], float]:
        def measure() -> float:
            before = server_cpu(server)
            timing = check(run_timed(server.jobcli("run", "--", *head), env=server.env), f"jobcli run ({server.name})")
            after = server_cpu(server)
            server.prune()
            return record(name, timing, server_delta(before, after))

        return measure

    def jobcli_logs(server: JobworkerServer) -> Callable[[], float]:
        def measure() -> float:
            before = server_cpu(server)
            began = time.perf_counter()
            job_id = server.start_job(*head)
            logs = check(run_timed(server.jobcli("logs", "-f", job_id), env=server.env), "jobcli logs -f")
            timing = Timing(time.perf_counter() - began, logs.user_s, logs.sys_s, 0, minor_faults=logs.minor_faults)
            after = server_cpu(server)
            output = server.status(job_id)["output_bytes"]
            if output != size:
                raise BenchError(f"the job wrote {output} bytes, expected {size}")
            server.prune()
            return record("jobcli start + logs -f", timing, server_delta(before, after))

        return measure

    def ssh(name: str, options: Sequence[str] = ()) -> Callable[[], float]:
        def measure() -> float:
            sshd = proc_children_cpu_s(ctx.ssh.process.pid)
            timing = check(run_timed(ctx.ssh.command(" ".join(head), options=options)), name)
            # The session process is reaped by the listening sshd just after
            # the client sees the end; give it that moment.
            time.sleep(0.05)
            return record(name, timing, {"server_cpu_s": proc_children_cpu_s(ctx.ssh.process.pid) - sshd})

        return measure

    def pipe() -> float:
        return record("raw pipe", check(run_timed(["sh", "-c", f"{' '.join(head)} | cat > /dev/null"]), "raw pipe"), {})

    try:
        server = ctx.server("throughput")
        servers.append(server)
        variants = {
            "jobcli run": jobcli_run(server, "jobcli run"),
            "jobcli start + logs -f": jobcli_logs(server),
        }
        tmpfs = tmpfs_with_room(size)
        if tmpfs:
            on_tmpfs = ctx.server("throughput-tmpfs", state_root=tmpfs)
            servers.append(on_tmpfs)
            variants["jobcli run, state on tmpfs"] = jobcli_run(on_tmpfs, "jobcli run, state on tmpfs")
        variants["ssh"] = ssh("ssh")
        variants["ssh -c aes128-gcm"] = ssh("ssh -c aes128-gcm", ("-c", "aes128-gcm@openssh.com"))
        variants["raw pipe"] = pipe
        speeds = interleaved(ctx.settings.throughput_runs, variants, warmup=0)
        profile = profile_throughput(ctx, server, head) if ctx.settings.py_spy else None
    finally:
        for server in servers:
            server.stop()
    medians = {name: median(values) for name, values in speeds.items()}
    cpu_per_gib: dict[str, dict[str, float]] = {
        name: {key: median([run[key] for run in runs]) * GiB / size for key in ("client_cpu_s", "client_user_s", "client_sys_s", "server_cpu_s", "server_user_s", "server_sys_s", "job_cpu_s") if key in runs[0]}
        for name, runs in details.items()
    }
    ratio = medians["jobcli run"] / medians["ssh"]
    label = f"{size_label(size)} of stdout"
    cipher = ctx.environment.get("ssh_cipher", "?")

    logs_ratio = medians["jobcli start + logs -f"] / medians["ssh"]

    def vs(name: str, reference: str, measure: str) -> Row:
        return Row("throughput", f"{label}: {measure}, MB/s", f"{medians[name]:.0f}", f"{medians[reference]:.0f}", f"{medians[name] / medians[reference]:.2f}", "(info)")

    def cpu_text(name: str) -> str:
        parts = cpu_per_gib[name]
        text = []
        for side in ("client", "server"):
            if f"{side}_cpu_s" in parts:
                system = f" (sys {parts[f'{side}_sys_s']:.2f})" if f"{side}_sys_s" in parts else ""
                text.append(f"{parts[f'{side}_cpu_s']:.2f}{system}")
        if "job_cpu_s" in parts:
            text.append(f"{parts['job_cpu_s']:.2f}")
        return " + ".join(text)

    rows = [
        Row("throughput", f"{label}: `jobcli run` vs `ssh` ({cipher}), MB/s", f"{medians['jobcli run']:.0f}", f"{medians['ssh']:.0f}", f"{ratio:.2f}", "≥ 1.5", ratio >= 1.5),
        # The issue's own wording: the output received by `jobcli logs -f`.
        # Both rows carry the goal; `jobcli run` is the stricter (one process).
        Row("throughput", f"{label}: `jobcli start` + `logs -f` vs `ssh`, MB/s", f"{medians['jobcli start + logs -f']:.0f}", f"{medians['ssh']:.0f}", f"{logs_ratio:.2f}", "≥ 1.5", logs_ratio >= 1.5),
    ]
    if "jobcli run, state on tmpfs" in medians:
        rows.append(vs("jobcli run, state on tmpfs", "ssh", "`jobcli run`, server's state dir on tmpfs, vs `ssh`"))
    rows += [
        vs("jobcli run", "ssh -c aes128-gcm", "`jobcli run` vs `ssh -c aes128-gcm@openssh.com`"),
        vs("jobcli run", "raw pipe", "`jobcli run` vs raw pipe `head | cat`"),
        Row("throughput", "CPU s per GiB, client + server (+ job for jobworker): `jobcli run` vs `ssh`", cpu_text("jobcli run"), cpu_text("ssh"), "", "(info)"),
    ]
    document = {"bytes": size, "mb_per_s": speeds, "median_mb_per_s": medians, "ratio_vs_ssh": ratio, "cpu_s_per_gib": cpu_per_gib, "runs": details, "profile": profile}
    return rows, document


def profile_throughput(ctx: Context, server: JobworkerServer, head: list[str]) -> dict[str, Any]:
    """
    One more, unrecorded C{jobcli run} with py-spy sampling both the server
    and the client; collapsed stacks go to results/, the hottest frames into
    the JSON.
    """
    py_spy = ctx.settings.py_spy
    assert py_spy is not None
    os.makedirs(RESULTS, exist_ok=True)
    outputs = {"server": os.path.join(RESULTS, "throughput-server.pyspy.txt"), "client": os.path.join(RESULTS, "throughput-client.pyspy.txt")}
    record = [py_spy, "record", "--nonblocking", "--rate", "200", "--format", "raw", "--duration", "120"]
    server_spy = subprocess.Popen(record + ["--pid", str(server.pid), "-o", outputs["server"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    client = subprocess.Popen(server.jobcli("run", "--", *head), env=server.env, stdout=subprocess.DEVNULL)
    client_spy = subprocess.Popen(record + ["--pid", str(client.pid), "-o", outputs["client"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client.wait()
    client_spy.wait(60)
    server_spy.send_signal(signal.SIGINT)  # py-spy writes its output on ^C
    server_spy.wait(60)
    server.prune()
    return {side: hottest_frames(path) for side, path in outputs.items()}


def hottest_frames(path: str, top: int = 12) -> dict[str, Any]:
    """
    From py-spy's collapsed stacks: the share of samples in which each
    function is the innermost Python frame ("self"), the most first.
    """
    counts: dict[str, int] = {}
    total = 0
    try:
        with open(path) as handle:
            for line in handle:
                stack, _, number = line.rstrip("\n").rpartition(" ")
                if not number.isdigit():
                    continue
                leaf = stack.split(";")[-1]
                counts[leaf] = counts.get(leaf, 0) + int(number)
                total += int(number)
    except OSError as exc:
        return {"error": str(exc)}
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return {"samples": total, "self": [{"frame": frame, "share": round(count / total, 3)} for frame, count in ranked]}
