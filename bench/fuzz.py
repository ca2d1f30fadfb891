"""
The long fuzz run: the frame decoder and the server's connection state
machine against hundreds of thousands of inputs (the CI run,
C{tests/unit/test_fuzz.py} and C{tests/e2e/test_fuzz_live.py}, feed a few thousand).

    .venv/bin/python bench/fuzz.py                      # 100,000 + 100,000 + 20,000 inputs
    .venv/bin/python bench/fuzz.py --core 10000 --protocol 10000 --live 2000 --seed 7

Three targets (see C{tests/fuzzing.py} for the inputs and what counts as a
crash): the sans-IO core, the real C{ServerProtocol} in memory with a
stand-in job manager, and a real C{twistd jobworker} over TLS after a valid
hello (no isolation, no cgroups: the protocol is what is tested; run as any
user).  For each: inputs, crashes, tracebacks, protocol errors by code,
inputs per second and memory growth (this process for the first two, the
server's RSS for the live one, sampled before and after, and after a pause
in which the server frees what the connections held).  Exits 1 if anything
undocumented came out.  Results also go to C{bench/results/fuzz.json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fuzzing import CoreTarget, FuzzReport, LiveTarget, ProtocolTarget, run, run_parallel  # noqa: E402


def _isolation() -> list[str]:
    """
    As root the server runs jobs in namespaces, as it would in production
    (the starts that the fuzzer makes mostly fail: no such command); as
    anyone else it must run them without.
    """
    import os

    return [] if os.geteuid() == 0 else ["--no-isolation"]


def rss_kib(pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def show(name: str, report: FuzzReport, seconds: float, growth: dict[str, int]) -> dict[str, Any]:
    row = {
        "target": name,
        "inputs": report.inputs,
        "crashes": report.crashes,
        "tracebacks": report.tracebacks,
        "protocol_errors": report.protocol_errors,
        "messages": report.messages,
        "inputs_per_s": round(report.inputs / seconds) if seconds else None,
        "codes": dict(sorted(report.codes.items())),
        **growth,
        "examples": [(data.hex(), what) for data, what in report.examples],
    }
    print(
        f"{name:16} {report.inputs:>8} inputs {report.crashes:>4} crashes {report.tracebacks:>4} tracebacks"
        f" {report.protocol_errors:>8} protocol errors  {row['inputs_per_s']}/s  "
        + "  ".join(f"{key} {value} KiB" for key, value in growth.items())
    )
    print(f"{'':16} codes: {row['codes']}")
    for data, what in report.examples:
        print(f"{'':16} CRASH on {data[:64].hex()}...: {what.strip() if not data else what.strip().splitlines()[-1]}")
    return row


def live(count: int, seed: int, threads: int) -> tuple[FuzzReport, float, dict[str, int], str]:
    from jobworker.blocking.tls import client_ssl_context
    from tests.support import make_pki, start_server

    with tempfile.TemporaryDirectory(prefix="jobworker-fuzz-") as scratch:
        directory = Path(scratch)
        certs = make_pki(directory / "certs")
        server = start_server(
            certs, directory / "state", *_isolation(), "--cgroups", "none", "--frame-timeout", "1",
            "--max-finished-jobs", "50", "--audit-rate-limit", "0",
        )
        try:
            pid = str(server.process.pid)
            context = client_ssl_context(certs / "ca.pem", certs / "alice.pem", certs / "alice.key")
            with server.client("alice") as client:
                client.list()
            before = rss_kib(pid)
            started = time.monotonic()
            report, targets = run_parallel(lambda: LiveTarget("127.0.0.1", server.port, context), count, seed, threads)
            for target in targets:
                target.close()
            seconds = time.monotonic() - started
            during = rss_kib(pid)
            time.sleep(5)
            after = rss_kib(pid)
            alive = server.alive()
            with server.client("alice") as client:
                client.list()
            log = server.log()
        finally:
            server.stop()
    tracebacks = log.count("Traceback") + log.count("Unhandled Error")
    report.tracebacks += tracebacks
    if tracebacks:
        at = max(log.find("Traceback"), log.find("Unhandled Error"))
        report.crash(b"", "tracebacks in the server's log:\n" + log[max(0, at - 1500) : at + 2500])
    if not alive:
        report.crash(b"", "the server died")
    growth = {"server_rss_growth_end": during - before, "server_rss_growth_5s_later": after - before}
    return report, seconds, growth, f"{sum(target.connections for target in targets)} connections, {threads} at a time"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", type=int, default=100_000, help="inputs for the sans-IO core")
    parser.add_argument("--protocol", type=int, default=100_000, help="inputs for the in-memory server protocol")
    parser.add_argument("--live", type=int, default=20_000, help="inputs for a live server over TLS")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=16, help="live connections fed at once")
    args = parser.parse_args()
    rows = []
    if args.core:
        before, started = rss_kib(), time.monotonic()
        report = run(CoreTarget(), args.core, seed=args.seed)
        rows.append(show("sans-IO core", report, time.monotonic() - started, {"rss_growth": rss_kib() - before}))
    if args.protocol:
        target = ProtocolTarget()
        before, started = rss_kib(), time.monotonic()
        try:
            report = run(target, args.protocol, seed=args.seed + 1)
        finally:
            target.close()
        rows.append(show("server protocol", report, time.monotonic() - started, {"rss_growth": rss_kib() - before}))
    if args.live:
        report, seconds, growth, note = live(args.live, args.seed + 2, args.threads)
        rows.append(show("live server", report, seconds, growth))
        print(f"{'':16} ({note})")
    total = sum(row["inputs"] for row in rows)
    bad = sum(row["crashes"] + row["tracebacks"] for row in rows)
    print(f"total: {total} inputs, {bad} crashes or tracebacks")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "fuzz.json").write_text(json.dumps({"seed": args.seed, "targets": rows}, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
