"""
Benchmark clients built on L{jobworker.blocking.BlockingClient}.

C{bench/run.py} is standard-library only; whatever needs the jobworker
package runs here, under the repository's virtualenv
(C{.venv/bin/python bench/clients.py COMMAND ...}).  Credentials and the
server address come from the same environment variables as C{jobcli}
(C{JOBWORKER_SERVER}, C{JOBWORKER_CA}, C{JOBWORKER_CERT}, C{JOBWORKER_KEY}).
Every command prints one JSON document on stdout.

Commands:

    tls-info                    the TLS version and cipher the server picks
    start --count N -- ARGV     start N jobs on one connection; their ids
    running ID...               wait until every job is running (or ended)
    stop ID...                  stop every job at once (SIGKILL), wait for all
    prune                       forget every finished job (frees its spool)
    follow --streams N ID       N concurrent followers of ID from offset 0,
                                one connection and one thread each; the
                                SHA-256 of every follower's output
    stall --window BYTES        a follower that never reads: see cmd_stall
    start-wait --count N -- ARGV  start and wait for N jobs one after another;
                                the seconds of each
    start-many --count N -- ARGV  start N jobs on one connection; their ids
                                and the seconds it took
    status-latency --count N ID   N status calls one after another; seconds each
    stop-all [--probe ID] ID... SIGKILL every job at once and wait for all;
                                meanwhile a second connection asks for the
                                status of ID again and again (seconds each)
    list-timing --pages N       the first page of 100, N times (seconds each),
                                then the whole list, as pages that fit a frame
    make-records --count N DIR  N finished job records (with output) in the
                                state directory DIR, as a server writes them
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
import uuid
from typing import Any

from jobworker.blocking import BlockingClient, parse_address
from jobworker.blocking.tls import client_ssl_context
from jobworker.protocol import messages as m


def _client(timeout: float | None = 120.0) -> BlockingClient:
    env = os.environ
    context = client_ssl_context(env["JOBWORKER_CA"], env["JOBWORKER_CERT"], env["JOBWORKER_KEY"])
    client = BlockingClient(parse_address(env["JOBWORKER_SERVER"]), context, timeout=timeout)
    client.connect()
    return client


def _emit(document: object) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def cmd_tls_info(args: argparse.Namespace) -> None:
    client = _client()
    try:
        sock = client._sock  # the only way to ask the live socket
        assert sock is not None
        cipher = sock.cipher()
        assert cipher is not None, "the handshake is done"
        name, version, bits = cipher
        _emit({"version": sock.version(), "cipher": name, "bits": bits, "server_name": client.hello.server_name if client.hello else ""})
    finally:
        client.close()


def cmd_start(args: argparse.Namespace) -> None:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    ids = []
    with _client() as client:
        for _ in range(args.count):
            ids.append(str(client.start(argv)))
    _emit(ids)


def cmd_running(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    with _client() as client:
        pending = [uuid.UUID(text) for text in args.ids]
        while pending:
            pending = [job_id for job_id in pending if client.status(job_id).state is m.JobState.STARTING]
            if pending and time.monotonic() > deadline:
                raise SystemExit(f"clients.py: {len(pending)} jobs still starting after {args.timeout} s")
            if pending:
                time.sleep(0.05)
        states = {str(job_id): client.status(job_id).state.label for job_id in map(uuid.UUID, args.ids)}
    _emit(states)


def cmd_stop(args: argparse.Namespace) -> None:
    job_ids = [uuid.UUID(text) for text in args.ids]
    with _client() as client:
        for job_id in job_ids:
            if not client.status(job_id).state.is_final:
                client.stop(job_id, force=True)
        states = {str(job_id): client.wait(job_id).state.label for job_id in job_ids}
    _emit(states)


def cmd_prune(args: argparse.Namespace) -> None:
    removed = 0
    with _client() as client:
        for job in client.list():
            if job.state.is_final:
                client.remove(job.job_id)
                removed += 1
    _emit({"removed": removed})


def _follow_one(job_id: uuid.UUID, window: int, result: dict[str, Any]) -> None:
    digest = hashlib.sha256()
    received = 0
    began = time.monotonic()
    try:
        with _client() as client:
            result["connected_s"] = time.monotonic() - began
            for message in client.follow(job_id, window=window):
                if isinstance(message, m.Output):
                    if "first_byte_s" not in result:
                        result["first_byte_s"] = time.monotonic() - began
                    digest.update(message.data)
                    received += len(message.data)
                elif isinstance(message, m.Gap):
                    result["gaps"] = result.get("gaps", 0) + message.length
                elif isinstance(message, m.EndOfStream):
                    result["end"] = message.reason.name.lower()
                    result["state"] = message.status.state.label
    except Exception as exc:  # reported per follower, judged by run.py
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["bytes"] = received
    result["sha256"] = digest.hexdigest()
    result["elapsed_s"] = time.monotonic() - began


def cmd_follow(args: argparse.Namespace) -> None:
    job_id = uuid.UUID(args.job_id)
    results: list[dict[str, Any]] = [{} for _ in range(args.streams)]
    threads = [
        threading.Thread(target=_follow_one, args=(job_id, args.window, result), daemon=True)
        for result in results
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _emit(results)


def cmd_stall(args: argparse.Namespace) -> None:
    """
    Connect, print C{{"ready": true}}, read a job id from stdin, ask to
    follow it with a window of C{--window} bytes, wait for the server's OK,
    print C{{"following": ID}}, and then never read the socket again: sleep
    until stdin reaches EOF (the driver closes it once the job has ended).
    """
    client = _client(timeout=None)
    try:
        _emit({"ready": True})
        job_id = uuid.UUID(sys.stdin.readline().strip())
        stream_id = client.conn.next_stream_id()
        client.request(m.FollowRequest(client.conn.next_request_id(), job_id, stream_id, 0, args.window, True))
        _emit({"following": str(job_id), "window": args.window})
        sys.stdin.read()
    finally:
        client.close()


def _argv(args: argparse.Namespace) -> list[str]:
    return list(args.argv[1:] if args.argv[:1] == ["--"] else args.argv)


def cmd_start_wait(args: argparse.Namespace) -> None:
    argv = _argv(args)
    seconds = []
    with _client() as client:
        for _ in range(args.count):
            began = time.perf_counter()
            job_id = client.start(argv)
            status = client.wait(job_id)
            seconds.append(time.perf_counter() - began)
            if status.state is not m.JobState.EXITED or status.exit_code != 0:
                raise SystemExit(f"clients.py: job {job_id} ended {status.state.label} {status.exit_code}: {status.error}")
    _emit({"seconds": seconds})


def cmd_start_many(args: argparse.Namespace) -> None:
    argv = _argv(args)
    with _client() as client:
        began = time.perf_counter()
        ids = [str(client.start(argv)) for _ in range(args.count)]
        elapsed = time.perf_counter() - began
    _emit({"ids": ids, "seconds": elapsed})


def cmd_status_latency(args: argparse.Namespace) -> None:
    job_id = uuid.UUID(args.job_id)
    seconds = []
    with _client() as client:
        client.status(job_id)
        for _ in range(args.count):
            began = time.perf_counter()
            client.status(job_id)
            seconds.append(time.perf_counter() - began)
    _emit({"seconds": seconds})


def _probe(job_id: uuid.UUID, stop: threading.Event, seconds: list[float]) -> None:
    with _client() as client:
        while not stop.is_set():
            began = time.perf_counter()
            client.status(job_id)
            seconds.append(time.perf_counter() - began)
            time.sleep(0.002)


def cmd_stop_all(args: argparse.Namespace) -> None:
    job_ids = [uuid.UUID(text) for text in args.ids]
    probe_seconds: list[float] = []
    done = threading.Event()
    probe = None
    if args.probe:
        probe = threading.Thread(target=_probe, args=(uuid.UUID(args.probe), done, probe_seconds), daemon=True)
        probe.start()
        time.sleep(0.2)  # connected and answering before the stops begin
    with _client(timeout=600) as client:
        began = time.perf_counter()
        for job_id in job_ids:
            client.stop(job_id, force=True)
        sent = time.perf_counter() - began
        states = [client.wait(job_id).state.label for job_id in job_ids]
        elapsed = time.perf_counter() - began
    done.set()
    if probe is not None:
        probe.join()
    counts = {state: states.count(state) for state in sorted(set(states))}
    _emit({"seconds": elapsed, "requests_s": sent, "states": sorted(set(states)), "counts": counts, "probe_seconds": probe_seconds})


def cmd_list_timing(args: argparse.Namespace) -> None:
    pages = []
    with _client() as client:
        for _ in range(args.pages):
            began = time.perf_counter()
            response = client.request(m.ListRequest(client.conn.next_request_id(), max_jobs=100))
            pages.append(time.perf_counter() - began)
            assert isinstance(response, m.ListResponse) and len(response.jobs) == min(100, args.expect)
        began = time.perf_counter()
        count = sum(1 for _ in client.iter_jobs())
        whole = time.perf_counter() - began
    _emit({"page_seconds": pages, "jobs": count, "list_seconds": whole})


def cmd_make_records(args: argparse.Namespace) -> None:
    from jobworker.records import status_to_dict

    jobs = os.path.join(args.state_dir, "jobs")
    os.makedirs(jobs, mode=0o700, exist_ok=True)
    began = time.time() - args.count
    output = b"line of output\n"
    spool = bytes([1]) + len(output).to_bytes(8, "big") + output  # one stdout record (jobworker.output.log)
    for number in range(args.count):
        job_id = uuid.uuid4()
        created = int((began + number) * 1e6)
        status = m.JobStatus(
            job_id, "admin", ("sh", "-c", f"echo job {number}"), m.JobState.EXITED, exit_code=0,
            created_at=created, started_at=created + 5_000, ended_at=created + 20_000,
            output_bytes=len(output), workdir="/", uid=61184 + number % 1000, labels=(("shard", str(number % 16)),),
        )  # fmt: skip
        with open(os.path.join(jobs, f"{job_id}.json"), "w") as handle:
            json.dump({"status": status_to_dict(status), "env": [["PATH", "/usr/bin:/bin"]]}, handle)
        with open(os.path.join(jobs, f"{job_id}.out"), "wb") as handle:
            handle.write(spool)
    _emit({"records": args.count})


def main() -> None:
    parser = argparse.ArgumentParser(prog="clients.py")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tls-info").set_defaults(run=cmd_tls_info)
    start = commands.add_parser("start")
    start.add_argument("--count", type=int, default=1)
    start.add_argument("argv", nargs=argparse.REMAINDER)
    start.set_defaults(run=cmd_start)
    running = commands.add_parser("running")
    running.add_argument("--timeout", type=float, default=60.0)
    running.add_argument("ids", nargs="+")
    running.set_defaults(run=cmd_running)
    stop = commands.add_parser("stop")
    stop.add_argument("ids", nargs="+")
    stop.set_defaults(run=cmd_stop)
    commands.add_parser("prune").set_defaults(run=cmd_prune)
    follow = commands.add_parser("follow")
    follow.add_argument("--streams", type=int, default=1)
    follow.add_argument("--window", type=int, default=8 << 20)
    follow.add_argument("job_id")
    follow.set_defaults(run=cmd_follow)
    stall = commands.add_parser("stall")
    stall.add_argument("--window", type=int, default=64 << 10)
    stall.set_defaults(run=cmd_stall)
    start_wait = commands.add_parser("start-wait")
    start_wait.add_argument("--count", type=int, default=1)
    start_wait.add_argument("argv", nargs=argparse.REMAINDER)
    start_wait.set_defaults(run=cmd_start_wait)
    start_many = commands.add_parser("start-many")
    start_many.add_argument("--count", type=int, default=1)
    start_many.add_argument("argv", nargs=argparse.REMAINDER)
    start_many.set_defaults(run=cmd_start_many)
    status_latency = commands.add_parser("status-latency")
    status_latency.add_argument("--count", type=int, default=50)
    status_latency.add_argument("job_id")
    status_latency.set_defaults(run=cmd_status_latency)
    stop_all = commands.add_parser("stop-all")
    stop_all.add_argument("--probe")
    stop_all.add_argument("ids", nargs="+")
    stop_all.set_defaults(run=cmd_stop_all)
    list_timing = commands.add_parser("list-timing")
    list_timing.add_argument("--pages", type=int, default=20)
    list_timing.add_argument("--expect", type=int, default=100)
    list_timing.set_defaults(run=cmd_list_timing)
    make_records = commands.add_parser("make-records")
    make_records.add_argument("--count", type=int, default=1000)
    make_records.add_argument("state_dir")
    make_records.set_defaults(run=cmd_make_records)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
