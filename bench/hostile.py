"""
What a hostile tenant can make the server hold: for each attack, the
server's RSS before, during and after (5 s after the attacking clients have
gone), beside the documented bound, and the latency of a well-behaved
C{jobcli status} meanwhile.

    .venv/bin/python bench/hostile.py              # every attack, about 2 minutes
    .venv/bin/python bench/hostile.py --only unread trickle

Run as root on a development machine (the server isolates its jobs and
uses cgroups, as in production).  Each attack gets a fresh server
(C{twistd -n jobworker} on 127.0.0.1, its defaults except where noted) and
runs as the identity C{alice}; the well-behaved client is C{viewer}.

Attacks (the goal: at most 64 MiB of growth during any of them, and back to
the baseline +- 16 MiB within 5 s of the clients leaving):

  unread    4 connections each pipeline 1,000 StatusRequests for a job whose
            command is 250 KB, and never read (before the fix: +429 MB, and
            the memory stayed after the clients had gone).  Bound: per
            connection 512 KiB of unsent answers plus one answer.
  trickle   400 connections each send a frame announcing 1 MiB, all but
            200 bytes of it, then one byte a second (before: +614 MiB, held past the
            idle timeout).  Bound: 32 MiB of unfinished frames per identity
            (the connections beyond are closed), each for at most
            --frame-timeout (5 s here).
  followers 20 connections x 256 followers of a job writing a line every
            10 ms; the figure is the time of `jobcli run -- echo ok` as
            another identity (before: 2.8 s instead of 0.27).  Bound: 256
            followers per identity.
  audit     one connection sends StatusRequests for unknown jobs as fast as
            it can for 5 s; the figure is the server log's growth per
            second (before: about 360 KB/s).  Bound: 1,000 audit lines per
            identity per 10 s, and one summary line.

Results: a table on stdout and C{bench/results/hostile.json}.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobworker.blocking.tls import client_ssl_context  # noqa: E402
from jobworker.protocol import messages as m  # noqa: E402
from jobworker.protocol.connection import Connection, Role  # noqa: E402
from jobworker.protocol.wire import encode_message, frame_header  # noqa: E402
from tests.support import RunningServer, make_pki, start_server  # noqa: E402

MIB = 1 << 20


def rss(server: RunningServer) -> int:
    """
    The server's resident set, bytes.
    """
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RawClient:
    """
    A blocking TLS connection that has done the hello exchange and then
    sends whatever it is told, reading only when asked.
    """

    def __init__(self, server: RunningServer, identity: str = "alice") -> None:
        certs = server.certs
        context = client_ssl_context(certs / "ca.pem", certs / f"{identity}.pem", certs / f"{identity}.key")
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.conn = Connection(Role.CLIENT)
        self.refused: str | None = None
        while self.conn.peer_hello is None:
            data = self.sock.recv(65536)
            if not data:
                self.refused = "closed"
                return
            for message in self.conn.receive_data(data):
                if isinstance(message, m.GoAway):
                    self.refused = message.message
                    return
        self.sock.sendall(self.conn.send(m.ClientHello(m.PROTOCOL_VERSION, self.conn.max_frame_size)))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def status_latency(server: RunningServer, job_id: uuid.UUID, runs: int = 5) -> float:
    """
    The median wall time of `jobcli status ID` as the viewer, seconds.
    """
    times = []
    for _ in range(runs):
        started = time.monotonic()
        result = server.jobcli("status", str(job_id), identity="viewer", timeout=120)
        times.append(time.monotonic() - started)
        if result.returncode != 0:
            return float("nan")
    return statistics.median(times)


def run_latency(server: RunningServer, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        result = server.jobcli("run", "--", "echo", "ok", identity="admin", timeout=120)
        times.append(time.monotonic() - started)
        if result.returncode != 0:
            return float("nan")
    return statistics.median(times)


def measure(
    name: str,
    server: RunningServer,
    job_id: uuid.UUID,
    attack: Callable[[], Callable[[], None]],
    *,
    settle_s: float = 3.0,
    bound: str,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """
    Baseline, start the attack (it returns the function that ends it),
    measure during, end it, measure 5 s later.
    """
    time.sleep(1)
    baseline = rss(server)
    quiet_latency = status_latency(server, job_id)
    end = attack()
    time.sleep(settle_s)
    peak = rss(server)
    during_latency = status_latency(server, job_id)
    figures = extra() if extra else {}
    peak = max(peak, rss(server))
    end()
    ended = time.monotonic()
    samples = []
    while time.monotonic() - ended < 5:
        time.sleep(0.25)
        samples.append((round(time.monotonic() - ended, 2), rss(server)))
    after = samples[-1][1]
    back = next((at for at, value in samples if abs(value - baseline) <= 16 * MIB), None)
    row = {
        "attack": name,
        "baseline_mib": round(baseline / MIB, 1),
        "growth_during_mib": round((peak - baseline) / MIB, 1),
        "growth_5s_after_mib": round((after - baseline) / MIB, 1),
        "back_within_16_mib_after_s": back,
        "rss_after_mib": [(at, round((value - baseline) / MIB, 1)) for at, value in samples],
        "status_latency_quiet_s": round(quiet_latency, 3),
        "status_latency_during_s": round(during_latency, 3),
        "bound": bound,
        **figures,
        "server_alive": server.alive(),
    }
    print(
        f"{name:10} baseline {row['baseline_mib']:7.1f} MiB  during +{row['growth_during_mib']:6.1f} MiB"
        f"  5 s after +{row['growth_5s_after_mib']:6.1f} MiB (back after {back} s)  status {quiet_latency * 1000:6.0f} ms quiet,"
        f" {during_latency * 1000:6.0f} ms during  " + "  ".join(f"{k}={v}" for k, v in figures.items())
    )
    return row


def big_job(server: RunningServer) -> uuid.UUID:
    with server.client("alice") as client:
        argv = ["sh", "-c", "sleep 3600", *(["x" * 1000] * 250)]
        job_id: uuid.UUID = client.start(argv)
        return job_id


# -- the attacks --------------------------------------------------------------------


def attack_unread(server: RunningServer, job_id: uuid.UUID) -> Callable[[], None]:
    clients = []
    for _ in range(4):
        client = RawClient(server)
        batch = b"".join(encode_message(m.StatusRequest(client.conn.next_request_id(), job_id)) for _ in range(1000))
        client.sock.sendall(batch)
        clients.append(client)

    def end() -> None:
        for client in clients:
            client.close()

    return end


def attack_trickle(server: RunningServer, job_id: uuid.UUID, state: dict[str, Any]) -> Callable[[], None]:
    clients: list[RawClient] = []
    refused = 0
    body = b"\x00" * (MIB - 200)  # the frame stays incomplete: 200 bytes to go, one a second
    for _ in range(400):
        try:
            client = RawClient(server)
        except OSError:
            refused += 1
            continue
        if client.refused is not None:
            refused += 1
            client.close()
            continue
        try:
            client.sock.sendall(frame_header(MIB, 0x10) + body)
        except OSError:
            refused += 1
            continue
        clients.append(client)
    state["connections_refused"] = refused
    state["connections_held"] = len(clients)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for client in clients:
                try:
                    client.sock.send(b"\x00")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()

    def end() -> None:
        stop.set()
        thread.join()
        closed = 0
        for client in clients:
            client.sock.settimeout(0.01)
            try:
                if client.sock.recv(65536) in (b"",):
                    closed += 1
                else:
                    closed += 1  # a GoAway: the frame timeout
            except (TimeoutError, ssl.SSLWantReadError, OSError):
                pass
            client.close()
        state["closed_by_the_frame_timeout"] = closed

    return end


def attack_followers(server: RunningServer, chatty: uuid.UUID, state: dict[str, Any]) -> Callable[[], None]:
    clients = []
    ok = refused = 0
    for _ in range(20):
        client = RawClient(server)
        if client.refused is not None:
            continue
        batch = b"".join(
            encode_message(m.FollowRequest(client.conn.next_request_id(), chatty, client.conn.next_stream_id(), window=1 << 20))
            for _ in range(256)
        )
        client.sock.sendall(batch)
        clients.append(client)
    stop = threading.Event()

    def read(client: RawClient) -> None:
        nonlocal ok, refused
        client.sock.settimeout(0.5)
        frames = Connection(Role.SERVER)  # only its frame buffer is used
        while not stop.is_set():
            try:
                data = client.sock.recv(1 << 20)
            except (TimeoutError, OSError):
                continue
            if not data:
                return
            for kind, body in frames._frames.receive(data):
                if kind == m.OkResponse.TYPE:
                    ok += 1
                elif kind == m.ErrorResponse.TYPE:
                    refused += 1
                elif kind == m.Output.TYPE:
                    # Grant the credit back, as a follower does.
                    stream_id = int.from_bytes(bytes(body[:4]), "big")
                    try:
                        client.sock.sendall(encode_message(m.WindowUpdate(stream_id, len(body) - 13)))
                    except OSError:
                        return

    readers = [threading.Thread(target=read, args=(client,), daemon=True) for client in clients]
    for reader in readers:
        reader.start()

    def figures() -> None:
        state["follows_accepted"] = ok
        state["follows_refused"] = refused
        state["run_echo_ok_s"] = round(run_latency(server), 3)

    state["_figures"] = figures

    def end() -> None:
        stop.set()
        for reader in readers:
            reader.join()
        for client in clients:
            client.close()

    return end


def attack_audit(server: RunningServer, state: dict[str, Any]) -> Callable[[], None]:
    client = RawClient(server)
    stop = threading.Event()
    size_before = server.log_path.stat().st_size
    started = time.monotonic()
    sent = 0

    def flood() -> None:
        nonlocal sent
        client.sock.settimeout(1)
        while not stop.is_set():
            batch = b"".join(encode_message(m.StatusRequest(client.conn.next_request_id(), uuid.uuid4())) for _ in range(200))
            try:
                client.sock.sendall(batch)
                sent += 200
                client.sock.recv(1 << 20)
            except OSError:
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()

    def figures() -> None:
        time.sleep(max(0.0, 5 - (time.monotonic() - started)))
        seconds = time.monotonic() - started
        grown = server.log_path.stat().st_size - size_before
        state["requests_per_s"] = round(sent / seconds)
        state["log_bytes_per_s"] = round(grown / seconds)

    state["_figures"] = figures

    def end() -> None:
        stop.set()
        thread.join()
        client.close()

    return end


# -- driver --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=["unread", "trickle", "followers", "audit"])
    parser.add_argument(
        "--before",
        action="store_true",
        help="the server predates the bounds (run it with PYTHONPATH=<old checkout>): pass none of their options",
    )
    args = parser.parse_args()
    chosen = args.only or ["unread", "trickle", "followers", "audit"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="jobworker-hostile-") as scratch:
        directory = Path(scratch)
        certs = make_pki(directory / "certs")
        for name in chosen:
            options = ["--frame-timeout", "5"] if name == "trickle" and not args.before else []
            server = start_server(certs, directory / name / "state", *options)
            try:
                job_id = big_job(server)
                state: dict[str, Any] = {}
                if name == "unread":
                    row = measure(name, server, job_id, lambda: attack_unread(server, job_id),
                                  bound="512 KiB + one answer per connection")
                elif name == "trickle":
                    row = measure(name, server, job_id, lambda: attack_trickle(server, job_id, state), settle_s=2.0,
                                  bound="32 MiB of unfinished frames per identity, each for at most --frame-timeout",
                                  extra=lambda: {key: value for key, value in state.items() if not key.startswith("_")})
                    row.update({key: value for key, value in state.items() if not key.startswith("_")})
                elif name == "followers":
                    with server.client("alice") as client:
                        chatty = client.start(["sh", "-c", "while :; do echo line; sleep 0.01; done"])
                    row = measure(name, server, job_id, lambda: attack_followers(server, chatty, state),
                                  bound="256 followers per identity",
                                  extra=lambda: (state["_figures"](), {k: v for k, v in state.items() if not k.startswith("_")})[1])
                    row["run_echo_ok_quiet_s"] = round(run_latency(server), 3)
                else:
                    row = measure(name, server, job_id, lambda: attack_audit(server, state),
                                  bound="1000 audit lines per identity per 10 s, then a summary",
                                  extra=lambda: (state["_figures"](), {k: v for k, v in state.items() if not k.startswith("_")})[1])
                rows.append(row)
            finally:
                server.stop()
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / ("hostile-before.json" if args.before else "hostile.json")).write_text(json.dumps(rows, indent=2) + "\n")
    failed = [row["attack"] for row in rows if row["growth_during_mib"] > 64 or abs(row["growth_5s_after_mib"]) > 16 or not row["server_alive"]]
    print("goal (<= 64 MiB during, baseline +- 16 MiB 5 s after):", "met" if not failed else f"missed by {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
