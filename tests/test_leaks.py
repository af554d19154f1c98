"""No leaks across front-end lifetimes: 200 connect / set-up / traffic / disconnect cycles.

Both socket roles (vring listens; ``vring net --client`` connects to a listening Python
front-end), clean disconnects and killed front-ends (a forked child running the in-tree
Frontend, SIGKILLed while it is sending). After the cycles vring's open fds and memfd mappings
are exactly where they were after the first cycle, and its resident memory has grown by less
than RSS_TOLERANCE. The figures are printed (``pytest -s``).

Cycle counts: VRING_LEAK_CYCLES (default 200) split 60/40 between the server and the client
role; a third of each are killed front-ends. The client role costs ~0.5 s per cycle (vring
waits RETRY_S before reconnecting), so it gets fewer cycles.
"""
from __future__ import annotations

import os
import signal
import socket
import time

from test_net import check, frame

from vring.frontend import Frontend

CYCLES = int(os.environ.get("VRING_LEAK_CYCLES", "200"))
RSS_TOLERANCE = 8 << 20


def snapshot(pid: int) -> dict[str, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        lines = f.readlines()
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return {"fds": fds, "memfd_maps": sum("memfd:" in x for x in lines), "maps": len(lines), "rss": rss}


def loop_frames(fe: Frontend, seq: int, n: int = 8) -> None:
    assert fe.send_frames([frame(seq + i) for i in range(n)]) == n
    got: list[int] = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got += [check(f) for f in fe.recv_frames()]
    assert got == list(range(seq, seq + n))


def run_frontend(fe: Frontend, seq: int) -> None:
    fe.setup()
    fe.post_rx()
    loop_frames(fe, seq)


def killed_frontend(make_fe, seq: int) -> None:
    """Fork a child that sets up a front-end, proves traffic, then keeps sending until SIGKILLed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            fe = make_fe()
            run_frontend(fe, seq)
            os.write(w, b"k")
            i = seq
            while True:  # chains in flight when the kill comes
                fe.send_frames([frame(i)])
                fe.recv_frames()
                fe.tx().take_used()
                i += 1
                time.sleep(0.001)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    try:
        ok = os.read(r, 1)
        time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert ok == b"k", "the child front-end failed before it was killed"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


class Disconnects:
    """Counts vring's "front-end disconnected" log lines, to wait for each cycle's end."""

    def __init__(self, v, port: int = 0):
        self.v, self.needle, self.seen = v, f"port={port} front-end disconnected", 0

    def wait_next(self, timeout: float = 10) -> None:
        self.seen += 1
        deadline = time.monotonic() + timeout
        while self.v.log_text().count(self.needle) < self.seen:
            assert time.monotonic() < deadline, f"no disconnect #{self.seen}:\n{self.v.log_text()[-2000:]}"
            assert self.v.proc.poll() is None, self.v.log_text()[-3000:]
            time.sleep(0.005)


def check_flat(v, name: str, base: dict, cycles: int, t0: float) -> None:
    time.sleep(0.2)
    end = snapshot(v.proc.pid)
    print(f"\n{name}: {cycles} cycles in {time.monotonic() - t0:.1f} s; after the first cycle {base}, "
          f"at the end {end}; deltas fds={end['fds'] - base['fds']} "
          f"memfd_maps={end['memfd_maps'] - base['memfd_maps']} "
          f"maps={end['maps'] - base['maps']} rss={(end['rss'] - base['rss']) / 1024:.0f} KiB")
    assert end["fds"] == base["fds"], (base, end)
    assert end["memfd_maps"] == base["memfd_maps"] == 0, (base, end)
    assert end["rss"] - base["rss"] < RSS_TOLERANCE, (base, end)
    assert v.stop() == 0
    log = v.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def plan(total: int) -> list[bool]:
    """True = killed front-end: every third cycle."""
    return [i % 3 == 2 for i in range(total)]


def test_cycles_vring_server(vring_proc, sockdir):
    path = os.path.join(sockdir, "a.sock")
    v = vring_proc("net", "--mode", "loopback", "--socket", path)
    v.wait_log("port=0 listening", 60)
    disc = Disconnects(v)
    n = max(3, CYCLES * 6 // 10)
    t0 = time.monotonic()
    base = None
    for i, killed in enumerate(plan(n)):
        if killed:
            killed_frontend(lambda: _connected(path), 1000 * i)
        else:
            fe = _connected(path)
            try:
                run_frontend(fe, 1000 * i)
            finally:
                fe.close()
        disc.wait_next()
        if base is None:
            time.sleep(0.2)
            base = snapshot(v.proc.pid)
    check_flat(v, "vring server", base, n, t0)


def _connected(path: str) -> Frontend:
    fe = Frontend(path, queue_size=64)
    fe.connect()
    return fe


def test_cycles_vring_client(vring_proc, sockdir):
    path = os.path.join(sockdir, "fe.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    lst.settimeout(30)
    v = vring_proc("net", "--client", "--mode", "loopback", "--socket", path)
    disc = Disconnects(v)
    n = max(3, CYCLES - CYCLES * 6 // 10)
    t0 = time.monotonic()
    base = None
    try:
        for i, killed in enumerate(plan(n)):
            conn, _ = lst.accept()
            conn.settimeout(10)

            def accepted(conn=conn) -> Frontend:
                fe = Frontend(path, queue_size=64)
                fe.sock = conn
                return fe

            if killed:
                killed_frontend(accepted, 1000 * i)  # the child has its own copy of conn
                conn.close()
            else:
                fe = accepted()
                try:
                    run_frontend(fe, 1000 * i)
                finally:
                    fe.close()
            disc.wait_next()
            if base is None:
                time.sleep(0.2)
                base = snapshot(v.proc.pid)
    finally:
        lst.close()
    check_flat(v, "vring client", base, n, t0)


def test_refused_second_connection_leaks_nothing(vring_proc, sockdir):
    """A second front-end on a busy port is refused; its connection is closed, nothing stays."""
    path = os.path.join(sockdir, "a.sock")
    v = vring_proc("net", "--mode", "loopback", "--socket", path)
    v.wait_log("port=0 listening", 60)
    fe = _connected(path)
    run_frontend(fe, 0)
    time.sleep(0.1)
    base = snapshot(v.proc.pid)
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.settimeout(5)
        assert s.recv(1) == b""
        s.close()
    loop_frames(fe, 100)
    assert snapshot(v.proc.pid)["fds"] == base["fds"]
    fe.close()
    assert v.stop() == 0
