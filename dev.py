#!/usr/bin/env python3
"""
Set up and run jobworker on a fresh machine with nothing but python3.

    python3 dev.py serve [twistd jobworker options...]
        make .venv, install jobworker into it, create a development PKI in
        certs/ if there is none, and run `twistd -n jobworker` in the
        foreground

    python3 dev.py test [pytest options...]
        make .venv, install jobworker with its test dependencies, and run the
        whole test suite

    python3 dev.py lint [ruff options...]
        make .venv with the test and lint dependencies, then run ruff and
        mypy as pyproject.toml configures them; fails if either does

    python3 dev.py guest [--timeout S] [--accel auto|kvm|tcg] [pytest options...]
        make .venv as for test, then boot a pure cgroup v2 Linux guest under
        qemu and run the privileged suites in it as root with CI=true (see
        .ci/guest.py; it installs qemu-system-x86, busybox-static and
        e2fsprogs with apt-get when they are missing)

The install is editable (in "compat" mode, so that twistd finds the plugin
in twisted/plugins/ of this checkout): edits take effect without
reinstalling.  Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "bin")
STAMP = os.path.join(VENV, ".jobworker-installed")


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml"):
        with open(os.path.join(ROOT, name), "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def ensure_venv(extras: str) -> None:
    """
    Create the virtual environment and install jobworker (with C{extras},
    comma-separated),
    unless an install of the same packaging metadata with those extras (or
    more) is already there.  The stamp records the metadata's hash and the
    extras installed, so switching between serve ("") and test ("test")
    installs nothing; a reinstall keeps the extras already there.
    """
    _install(extras)
    compile_checkout()


def compile_checkout() -> None:
    """
    Byte-compile the checkout's own modules, as pip does those it installs:
    the install is editable, so nothing else writes their bytecode where
    C{PYTHONDONTWRITEBYTECODE} is set (as on this project's machines), and
    every C{jobcli} and server would compile them afresh (55 ms of a
    C{jobcli --help} of 370, measured; ten times that under the CI guest's
    emulation).  Only what changed is compiled again; a module edited since
    is compiled in memory, from its source, until the next run.
    """
    command = [os.path.join(BIN, "python"), "-m", "compileall", "-q", "jobworker", os.path.join("twisted", "plugins")]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def _install(extras: str) -> None:
    if not os.path.exists(os.path.join(BIN, "python")):
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = _fingerprint()
    installed = set()
    try:
        with open(STAMP) as handle:
            fingerprint, _, listed = handle.read().partition("\n")
        installed = set(filter(None, listed.split(",")))
        if fingerprint == wanted and set(filter(None, extras.split(","))) <= installed:
            return
    except FileNotFoundError:
        pass
    everything = ",".join(sorted(installed | set(filter(None, extras.split(",")))))
    print("dev.py: installing jobworker and its dependencies", flush=True)
    pip = [os.path.join(BIN, "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["--upgrade", "pip", "setuptools", "wheel"], check=True)
    target = f".[{everything}]" if everything else "."
    subprocess.run(pip + ["--config-settings", "editable_mode=compat", "-e", target], check=True, cwd=ROOT)
    with open(STAMP, "w") as handle:
        handle.write(f"{wanted}\n{everything}")


def serve(arguments: list[str]) -> int:
    ensure_venv("")
    certs = os.path.join(ROOT, "certs")
    if not os.path.exists(os.path.join(certs, "ca.pem")):
        print(f"dev.py: creating a development PKI in {certs}", flush=True)
        subprocess.run([os.path.join(BIN, "jobworker-pki"), "dev", certs], check=True)
    command = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "jobworker"]
    command += ["--ca", os.path.join(certs, "ca.pem"), "--cert", os.path.join(certs, "server.pem")]
    command += ["--key", os.path.join(certs, "server.key")]
    if not any(argument.startswith("--state-dir") for argument in arguments):
        # A development server keeps its jobs in the checkout, not in /var/lib.
        command += ["--state-dir", os.path.join(ROOT, "state")]
    command += arguments
    os.chdir(ROOT)
    os.execv(command[0], command)


def test(arguments: list[str]) -> int:
    ensure_venv("test")
    os.chdir(ROOT)
    command = [os.path.join(BIN, "python"), "-m", "pytest"] + arguments
    os.execv(command[0], command)


def lint(arguments: list[str]) -> int:
    # mypy reads tests/ too, so the test dependencies are needed as well.
    ensure_venv("lint,test")
    os.chdir(ROOT)
    status = 0
    for command in ([os.path.join(BIN, "ruff"), "check", *arguments], [os.path.join(BIN, "mypy")]):
        print(f"dev.py: {' '.join(command)}", flush=True)
        status = subprocess.run(command).returncode or status
    return status


def guest(arguments: list[str]) -> int:
    # The guest runs this checkout's .venv, shared read-only over 9p.
    ensure_venv("test")
    os.chdir(ROOT)
    command = [sys.executable, os.path.join(ROOT, ".ci", "guest.py")] + arguments
    os.execv(command[0], command)


COMMANDS = {"serve": serve, "test": test, "lint": lint, "guest": guest}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
