#!/usr/bin/env python3
"""
Try the systemd unit's sandboxing options one by one, under a real systemd.

    python3 contrib/systemd/try-hardening.py [--guest-module PATH] [--timeout S]

The development machines run no systemd, so this boots the pure cgroup v2
guest of C{.ci/guest.py} (its kernel, initramfs and 9p view of this host's
file system) and runs this host's C{/lib/systemd/systemd} in it, as pid 1 of
a PID namespace (as C{systemd-nspawn} would).  A oneshot unit then starts
the server under C{contrib/systemd/jobworker.service} as shipped, and once
more for each option the unit leaves out, with that option added; each time
it runs the probes below and records what they did.  The table goes to
standard output.

Probes (each a C{jobcli} command against the server the unit started):

  - C{limits}: a user's job with a 64 MiB memory and a 50-pid limit (a
    delegated cgroup, namespaces, a uid of its own);
  - C{root-writes-usr}: an admin's job as root writing a file under /usr;
  - C{ping-socket}: an admin's host-network job opening a packet socket.

Standard library only; needs what C{.ci/guest.py} needs (qemu, as root).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(ROOT, "contrib", "systemd", "jobworker.service")

# Each option the shipped unit leaves out, as a line added to [Service].
LEFT_OUT = [
    "PrivateNetwork=yes",
    "ProtectSystem=full",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "ProtectControlGroups=yes",
    "ProtectKernelTunables=yes",
    "ProtectProc=invisible",
    "PrivateDevices=yes",
    "NoNewPrivileges=yes",
    "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SETUID CAP_SETGID CAP_KILL CAP_NET_ADMIN CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER",
    "RestrictNamespaces=yes",
    "SystemCallFilter=@system-service",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "MemoryDenyWriteExecute=yes",
]

PROBES = {
    "limits": ["run", "--memory", "64M", "--pids", "50", "--", "sh", "-c", "echo ok"],
    "root-writes-usr": ["run", "--user", "root", "--", "sh", "-c", "touch /usr/local/.jw-probe && rm /usr/local/.jw-probe && echo ok"],
    "ping-socket": ["run", "--user", "root", "--network", "host", "--", "python3", "-c",
                    "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW); print('ok')"],
}


def _guest_module(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("jobworker_guest", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trial_script(results: str, variants: list[str] | None = None) -> str:
    """
    What the oneshot unit runs inside the guest: one server per variant
    (C{"shipped"}: the unit as it is; otherwise the unit plus that line).
    The shipped unit is also stopped with a job running, and started again,
    to see the job recorded as stopped by the server's shutdown (the server
    stops its jobs itself: KillMode=process has systemd signal it alone).
    """
    venv = os.path.join(ROOT, ".venv", "bin")
    unit_text = open(UNIT).read().replace("/opt/jobworker/bin/twistd", f"{venv}/twistd")
    probes = "\n".join(
        f"probe {shlex.quote(name)} {shlex.join(command)}" for name, command in PROBES.items()
    )
    if variants is None:
        variants = ["shipped"] + LEFT_OUT
    lines = [
        "#!/bin/sh",
        "set -u",
        f"R={results}",
        f"export PATH={venv}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "mkdir -p -m 0700 /etc/jobworker; mkdir -p /tmp/pki",
        f"{venv}/jobworker-pki dev /tmp/pki >/dev/null",
        "cp /tmp/pki/ca.pem /tmp/pki/server.pem /tmp/pki/server.key /etc/jobworker/",
        "cat > /etc/jobworker/jobworker.toml <<'EOF'",
        'listen = ["tcp:8443:interface=127.0.0.1"]',
        'ca = "/etc/jobworker/ca.pem"',
        'cert = "/etc/jobworker/server.pem"',
        'key = "/etc/jobworker/server.key"',
        "grace = 2",
        "EOF",
        "export JOBWORKER_SERVER=127.0.0.1:8443 JOBWORKER_CA=/tmp/pki/ca.pem",
        "export JOBWORKER_CERT=/tmp/pki/admin.pem JOBWORKER_KEY=/tmp/pki/admin.key",
        "probe() { name=$1; shift; out=$(timeout 60 jobcli \"$@\" 2>&1); rc=$?;",
        "  if [ $rc = 0 ] && [ \"$out\" = ok ]; then echo \"$variant|$name|ok\" >> $R/table;",
        "  else echo \"$variant|$name|FAILED rc=$rc: $(echo \"$out\" | tail -1 | cut -c1-160)\" >> $R/table; fi; }",
        "n=0",
    ]
    for variant in variants:
        extra = "" if variant == "shipped" else variant
        lines += [
            f"variant={shlex.quote(variant)}",
            "n=$((n+1))",
            "cat > /etc/systemd/system/jobworker.service <<'EOF'",
            unit_text.replace("[Service]\n", "[Service]\n" + (extra + "\n" if extra else "")
                              + f"StandardOutput=append:{results}/server.log\nStandardError=append:{results}/server.log\n", 1),
            "EOF",
            "echo \"=== $variant\" >> $R/server.log",
            "systemctl daemon-reload",
            "systemctl reset-failed jobworker.service 2>/dev/null",
            "systemctl start jobworker.service",
            "up=no; for i in $(seq 1 120); do if jobcli whoami >/dev/null 2>&1; then up=yes; break; fi;"
            " if ! systemctl is-active -q jobworker.service; then break; fi; sleep 0.5; done",
            "if [ $up = yes ]; then",
            probes,
            "else echo \"$variant|server|FAILED to start: $(systemctl show -p Result --value jobworker.service)\" >> $R/table; fi",
        ]
        if variant == "shipped":
            lines += [
                "if [ $up = yes ]; then",
                "  id=$(jobcli start -- sleep 300)",
                "  sleep 1; systemctl stop jobworker.service; systemctl start jobworker.service",
                "  for i in $(seq 1 120); do jobcli whoami >/dev/null 2>&1 && break; sleep 0.5; done",
                "  st=$(jobcli status \"$id\" 2>&1 | grep -E '^(state|stopped by):' | tr -s ' ' | tr '\\n' ' ')",
                "  left=$(pgrep -x sleep | wc -l)",
                "  echo \"$variant|stop-with-a-job|$st; sleep processes left: $left\" >> $R/table",
                "fi",
            ]
        lines += ["systemctl stop jobworker.service"]
    lines += ["echo done > $R/finished", "systemctl poweroff"]
    return "\n".join(lines) + "\n"


def _job_script(results: str) -> str:
    """
    The guest's job: install the trial unit, then run systemd as pid 1 of
    a new PID namespace with it as the unit to start.
    """
    return f"""set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /etc/systemd/system
cat > /etc/systemd/system/jobworker-trial.service <<'EOF'
[Unit]
Description=try the jobworker unit's sandboxing options
After=basic.target
[Service]
Type=oneshot
ExecStart=/bin/sh {results}/trial.sh
StandardOutput=journal+console
EOF
cat > /etc/systemd/system/jobworker-trial.target <<'EOF'
[Unit]
Description=the trial alone
Requires=basic.target jobworker-trial.service
After=basic.target jobworker-trial.service
AllowIsolate=yes
EOF
echo "starting systemd $(/lib/systemd/systemd --version | head -1)"
export container=jobworker-guest
unshare --pid --fork --mount-proc /lib/systemd/systemd --system --unit=jobworker-trial.target --log-target=console --log-level=warning
echo "systemd exited $?"
echo 0 > {results}/rc
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guest-module", default=os.path.join(ROOT, ".ci", "guest.py"),
                        help="the guest builder (default .ci/guest.py of this checkout)")
    parser.add_argument("--timeout", type=float, default=1500)
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    parser.add_argument("--variant", action="append", help="only these (\"shipped\" or a line of LEFT_OUT); repeatable")
    options = parser.parse_args(argv)
    guest = _guest_module(options.guest_module)
    run_directory = tempfile.mkdtemp(prefix="jobworker-hardening-")
    try:
        apt = guest.Apt()
        guest.ensure_tools(apt)
        cache = guest.cache_directory()
        kernel = guest.ensure_kernel(apt, cache)
        initramfs = guest.ensure_initramfs(kernel, cache)
        disk = os.path.join(run_directory, "disk.raw")
        guest.make_disk(disk)
        results = os.path.join(run_directory, "results")
        os.mkdir(results)
        inside = guest.RESULTS_IN_GUEST
        with open(os.path.join(results, "job.sh"), "w") as handle:
            handle.write(_job_script(inside))
        with open(os.path.join(results, "trial.sh"), "w") as handle:
            handle.write(_trial_script(inside, options.variant))
        began = time.monotonic()
        code, accel = guest.boot(options.accel, kernel, initramfs, disk, results, cache, options.timeout)
        print(f"try-hardening: guest ran {time.monotonic() - began:.0f} s ({accel}), qemu exited {code}")
        table = os.path.join(results, "table")
        if not os.path.exists(table):
            print("try-hardening: no results; see the console above and", os.path.join(results, "server.log"))
            shutil.copy(os.path.join(results, "server.log"), "/tmp/jobworker-hardening-server.log") if os.path.exists(
                os.path.join(results, "server.log")) else None
            return 3
        rows: dict[str, dict[str, str]] = {}
        for line in open(table):
            variant, probe, verdict = line.rstrip("\n").split("|", 2)
            rows.setdefault(variant, {})[probe] = verdict
        names = ["server", *PROBES, "stop-with-a-job"]
        print("| unit | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for variant, verdicts in rows.items():
            started = "FAILED" not in verdicts.get("server", "")
            cells = [verdicts.get("server", "started" if started else "")] + [
                verdicts.get(p, "") for p in [*PROBES, "stop-with-a-job"]
            ]
            print(f"| {variant} | " + " | ".join(cells) + " |")
        if os.path.exists(os.path.join(results, "server.log")):
            shutil.copy(os.path.join(results, "server.log"), "/tmp/jobworker-hardening-server.log")
        return 0 if os.path.exists(os.path.join(results, "finished")) else 1
    finally:
        shutil.rmtree(run_directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
