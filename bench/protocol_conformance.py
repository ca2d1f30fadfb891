"""
Issue 10, sections 1 and 6, against a real server: a wait longer than the
client's read timeout, a client's GoAway, 129 waits and 300 follows in one
write, a 16 KiB client following a job with a 20 KB argv, a NUL in the
job user, and a list of five jobs with the largest argv.

    .venv/bin/python bench/protocol_conformance.py .          # this checkout
    PYTHONPATH=OLD .venv/bin/python bench/protocol_conformance.py OLD   # another one

(It speaks the checkout's own protocol version, so it runs against old and
new code alike.)
"""
import os
import pathlib
import socket
import sys
import tempfile
import time

repo = pathlib.Path(sys.argv[1]); sys.path.insert(0, str(repo)); os.chdir(repo)
from jobworker.blocking import BlockingClient, ConnectionFailed
from jobworker.blocking.tls import client_ssl_context
from jobworker.errors import ErrorCode, RequestError
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from tests.support import make_pki, start_server

tmp = pathlib.Path(tempfile.mkdtemp(prefix="h3demo")); certs = make_pki(tmp / "certs")
server = start_server(certs, tmp / "state")
ctx = client_ssl_context(certs / "ca.pem", certs / "admin.pem", certs / "admin.key")
def client(**kw):
    c = BlockingClient(("127.0.0.1", server.port), ctx, **kw); c.connect(); return c
class Raw:
    def __init__(self, max_frame=1 << 20):
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10), server_hostname="127.0.0.1")
        self.conn = Connection(Role.CLIENT, max_frame_size=max_frame); self.inbox = []
        self.read(1); self.send(m.ClientHello(m.PROTOCOL_VERSION, max_frame))
    def send(self, *ms): self.sock.sendall(b"".join(self.conn.send(x) for x in ms))
    def read(self, n, timeout=3):
        end = time.monotonic() + timeout
        while len(self.inbox) < n and time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try: d = self.sock.recv(1 << 20)
            except TimeoutError: break
            if not d: break
            self.inbox += self.conn.receive_data(d)
        got, self.inbox = self.inbox[:n], self.inbox[n:]; return got
try:
    c = client(timeout=1.0); job = c.start(["sh", "-c", "sleep 3; exit 7"])
    try: print("1. wait, read timeout 1 s, job silent 3 s:", c.wait(job).exit_code)
    except ConnectionFailed as e: print("1. wait, read timeout 1 s, job silent 3 s: FAILS:", e)
    r = Raw(); r.send(m.GoAway(100, "bye")); t = time.monotonic()
    r.sock.settimeout(3)
    try: data = r.sock.recv(100); print("2. GoAway: server closed after %.2f s, sent %r" % (time.monotonic() - t, data))
    except TimeoutError: print("2. GoAway: server still open after 3 s")
    sleeper = client().start(["sleep", "30"])
    r = Raw(); r.send(*(m.WaitRequest(i, sleeper) for i in range(1, 130)))
    print("3. 129 waits in one write, refused:", sorted(x.request_id for x in r.read(200, 2) if isinstance(x, m.ErrorResponse)))
    r = Raw(); r.send(*(m.FollowRequest(i, sleeper, i, window=0) for i in range(1, 301)))
    got = r.read(300, 3); print("3b. 300 follows: %d TOO_MANY_REQUESTS, %d TOO_MANY_STREAMS" % (
        sum(1 for x in got if isinstance(x, m.ErrorResponse) and x.code == ErrorCode.TOO_MANY_REQUESTS),
        sum(1 for x in got if isinstance(x, m.ErrorResponse) and x.code == ErrorCode.TOO_MANY_STREAMS)))
    r = Raw(16 << 10); r.send(m.StartRequest(1, ("sh", "-c", "exit 3", *("p" * 1000 for _ in range(20)))))
    [started] = r.read(1, 10); r.send(m.FollowRequest(2, started.job_id, 1))
    print("4. 16 KiB client, 20 KB argv, follow: got", [type(x).__name__ for x in r.read(3, 5)])
    try: client().start(["true"], user="no\0body"); print("5. user with NUL: started")
    except RequestError as e: print("5. user with NUL:", e.code.name, e.message)
    a = client(); argv = ["true", *("z" * 65000 for _ in range(4))]
    for j in [a.start(argv) for _ in range(5)]: a.wait(j)
    res = server.jobcli("list")
    print("6. jobcli list with 5 max-argv jobs: exit", res.returncode, res.stderr.decode().strip()[:150])
finally:
    server.stop()
    log = server.log()
    print("server log tracebacks:", log.count("Traceback"), "| Unhandled:", log.count("Unhandled"))
