"""
How long each end takes to notice that the other vanished (SIGSTOP: no
FIN, no RST, the kernel still ACKs), with keep-alive at 1 s on both ends:
C{jobcli wait} against a stopped server, and the server against a stopped
C{jobcli wait}.  Three runs.

    .venv/bin/python bench/keepalive_detection.py .
"""
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

repo = pathlib.Path(sys.argv[1]); sys.path.insert(0, str(repo)); os.chdir(repo)
from tests.support import BIN, make_pki, start_server

tmp = pathlib.Path(tempfile.mkdtemp(prefix="h3ka")); certs = make_pki(tmp / "certs")
for run in range(3):
    server = start_server(certs, tmp / f"state{run}", "--keepalive-interval", "1")
    try:
        job = server.client().start(["sleep", "60"])
        p = subprocess.Popen([str(BIN / "jobcli"), "--keepalive", "1", "wait", str(job)], env=server.env(), stderr=subprocess.PIPE)
        while server.log().count("connection from") < 2: time.sleep(0.02)
        time.sleep(0.3)
        os.kill(server.process.pid, signal.SIGSTOP); t = time.monotonic()
        err = p.communicate(timeout=30)[1]; code = p.returncode
        client_s = time.monotonic() - t
        os.kill(server.process.pid, signal.SIGCONT)
        p = subprocess.Popen([str(BIN / "jobcli"), "--keepalive", "0", "wait", str(job)], env=server.env(), stderr=subprocess.PIPE)
        while server.log().count("connection from") < 3: time.sleep(0.02)
        time.sleep(0.3)
        p.send_signal(signal.SIGSTOP); t = time.monotonic()
        while "no answer to a keep-alive ping" not in server.log(): time.sleep(0.02)
        server_s = time.monotonic() - t
        p.send_signal(signal.SIGCONT); p.communicate(timeout=30)
        print(f"run {run}: jobcli noticed the stopped server after {client_s:.2f} s (exit {code}; {err.decode().strip()[:90]}); "
              f"server noticed the stopped jobcli after {server_s:.2f} s (bound: 2 x 1 s after the last bytes)")
    finally:
        server.stop()
