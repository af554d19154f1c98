"""QEMU Linux guests (TCG) with ``vhost-user-vsock-pci`` on ``vring vsock``.

The guest's /init (tests/qemu/init) runs socat on AF_VSOCK and prints RESULT lines; the host
side is plain unix sockets, as users of vhost-device-vsock script it:

- host -> guest: CONNECT to a guest echo listener, several MiB both ways, bytes verified; a port
  the guest doesn't serve closes the host connection; 64 concurrent connections;
- guest -> host: the guest connects to CID 2 and streams several MiB to a host echo listener on
  ``<uds-path>_<port>``; a port nobody serves fails fast; 64 concurrent connections;
- two guests in one vring process reach each other by CID when they share a group; a third in
  another group is refused;
- after every connection is closed, vring holds no connection, buffer or fd.

vring is pinned to CPU 1, the guests to CPU 0.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time

import pytest
from peers import QemuGuest, VhostUserVsock, require_peer

pytestmark = pytest.mark.peer

VRING_CPU = "1"
GUEST_CPUS = [0]
VRING_OPTS = ("-v",) if os.environ.get("VRING_TEST_DEBUG") else ()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _counters(v) -> dict[int, dict[str, str]]:
    out = {}
    for line in v.log_text().splitlines():
        m = re.match(r"port (\d+) \(cid \d+\): (.*)", line)
        if m:
            out[int(m.group(1))] = dict(kv.split("=", 1) for kv in m.group(2).split())
    return out


def _start_vring(vring_proc, sockdir, specs):
    args = [*VRING_OPTS, "vsock"]
    for cid, groups in specs:
        args += ["--vm", f"guest-cid={cid},socket={sockdir}/vh{cid}.sock,uds-path={sockdir}/vm{cid}.vsock,"
                         f"groups={groups}"]
    v = vring_proc(*args, cpus=VRING_CPU)
    v.wait_log(f"port={len(specs) - 1} listening", 60)
    return v


def _guest(peers, sockdir, cid, params):
    return peers.add(QemuGuest([VhostUserVsock(f"{sockdir}/vh{cid}.sock")], name=f"g{cid}", workdir=sockdir,
                               params=params, cpus=GUEST_CPUS, hard_timeout=120))


def _host_connect(uds: str, port: int, timeout: float = 20) -> tuple[socket.socket | None, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(uds)
    s.sendall(b"CONNECT %d\n" % port)
    line = b""
    try:
        while not line.endswith(b"\n"):
            c = s.recv(1)
            if not c:
                break
            line += c
    except (ConnectionResetError, TimeoutError):
        pass
    if not line.startswith(b"OK "):
        s.close()
        return None, line
    return s, line


def _echo_roundtrip(s: socket.socket, data: bytes) -> bytes:
    """Send data (a writer thread), half-close, read everything back until EOF."""
    err = []

    def writer():
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=writer)
    t.start()
    got = bytearray()
    while True:
        b = s.recv(1 << 16)
        if not b:
            break
        got += b
    t.join()
    assert not err, err
    return bytes(got)


class EchoServer:
    """A host listener on ``<uds-path>_<port>`` echoing every connection; counts and errors."""

    def __init__(self, path: str):
        self.path = path
        self.lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lst.bind(path)
        self.lst.listen(128)
        self.lst.settimeout(0.2)
        self.stopping = False
        self.done = 0
        self.bytes = 0
        self.threads: list[threading.Thread] = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stopping:
            try:
                c, _ = self.lst.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, c):
        c.settimeout(60)
        n = 0
        try:
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                c.sendall(b)
                n += len(b)
        except OSError:
            pass
        finally:
            c.close()
        self.bytes += n
        self.done += 1

    def close(self):
        self.stopping = True
        self.t.join(2)
        self.lst.close()
        os.unlink(self.path)


def _settled(v, before: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = _fds(v.proc.pid)
        if n <= before or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def test_host_to_guest(sockdir, peers, vring_proc):
    """Guest listens (socat echo); the host CONNECTs: 4 MiB verified, a refused port, 64 at once."""
    require_peer("qemu")
    t0 = time.monotonic()
    v = _start_vring(vring_proc, sockdir, [(3, "default")])
    g = _guest(peers, sockdir, 3, {"vsock_listen": 1234, "wait": 120})
    g.wait_result(r"^vsock listening", 60)
    uds = f"{sockdir}/vm3.vsock"
    base_fds = _fds(v.proc.pid)
    # several MiB through one connection, both ways
    s, line = _host_connect(uds, 1234)
    assert s is not None, (line, v.log_text()[-3000:])
    data = os.urandom(4 << 20)
    t1 = time.monotonic()
    got = _echo_roundtrip(s, data)
    dt = time.monotonic() - t1
    s.close()
    assert len(got) == len(data) and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    print(f"\nhost->guest echo 4 MiB each way in {dt:.1f} s ({2 * 4 / dt:.1f} MiB/s under TCG)")
    # a port nobody listens on in the guest: the host connection is closed, quickly
    t1 = time.monotonic()
    s, line = _host_connect(uds, 4321)
    assert s is None and line == b"", line
    assert time.monotonic() - t1 < 5
    # 64 concurrent connections
    socks = []
    for _ in range(64):
        s, line = _host_connect(uds, 1234, timeout=60)
        assert s is not None, line
        socks.append(s)
    msgs = [os.urandom(8192 + i) for i in range(64)]
    results: list[bytes | None] = [None] * 64

    def run(i):
        results[i] = _echo_roundtrip(socks[i], msgs[i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert all(results[i] == msgs[i] for i in range(64))
    for s in socks:
        s.close()
    # a host closing mid-stream: vring forgets the connection
    s, line = _host_connect(uds, 1234)
    s.sendall(os.urandom(1 << 20)[:200_000])
    s.close()
    after = _settled(v, base_fds)
    assert after <= base_fds, f"fds {base_fds} -> {after}"
    g.stop()
    assert v.stop() == 0
    c = _counters(v)[0]
    assert c["connections"] == "0" and c["buffered"] == "0" and c["errors"] == "0", c
    assert "Traceback" not in v.log_text()
    print(f"vring {c}\ntotal {time.monotonic() - t0:.1f} s")
    if VRING_OPTS:
        print("\n".join(ln for ln in v.log_text().splitlines() if "no connection" in ln)[-3000:])


def test_guest_to_host(sockdir, peers, vring_proc):
    """The guest connects to CID 2: 4 MiB echoed by a host listener, a refused port, 64 at once."""
    require_peer("qemu")
    t0 = time.monotonic()
    v = _start_vring(vring_proc, sockdir, [(3, "default")])
    echo = EchoServer(f"{sockdir}/vm3.vsock_5000")
    try:
        g = _guest(peers, sockdir, 3, {"vsock_connect": "2:5000:4096", "vsock_refuse": "2:5999",
                                       "vsock_many": "2:5000:64:16"})
        m = g.wait_result(r"^vsock echo (ok|fail)", 90)
        assert m.group(1) == "ok", g.log_tail()
        m = g.wait_result(r"^vsock refused (ok|fail) .* after (\d+) s", 30)
        assert m.group(1) == "ok" and int(m.group(2)) <= 3, g.log_tail()
        m = g.wait_result(r"^vsock many (ok|fail) (\d+)/(\d+)", 60)
        assert m.group(1) == "ok", g.log_tail()
        g.wait_result(r"^done", 20)
        assert echo.done == 65 and echo.bytes == (4096 + 64 * 16) * 1024
    finally:
        echo.close()
    g.stop()
    assert v.stop() == 0
    c = _counters(v)[0]
    assert c["connections"] == "0" and c["buffered"] == "0" and c["errors"] == "0", c
    assert c["refused"] == "1", c
    print(f"\nvring {c}\ntotal {time.monotonic() - t0:.1f} s")


def test_two_guests_by_group(sockdir, peers, vring_proc):
    """cid 3 and 4 share group a: 4 connects to 3 and echoes 1 MiB; cid 5 (group b) is refused."""
    require_peer("qemu")
    t0 = time.monotonic()
    v = _start_vring(vring_proc, sockdir, [(3, "a"), (4, "a+x"), (5, "b")])
    g3 = _guest(peers, sockdir, 3, {"vsock_listen": 1234, "wait": 120})
    g3.wait_result(r"^vsock listening", 60)
    g4 = _guest(peers, sockdir, 4, {"vsock_connect": "3:1234:1024"})
    g5 = _guest(peers, sockdir, 5, {"vsock_refuse": "3:1234"})
    m = g4.wait_result(r"^vsock echo (ok|fail)", 90)
    assert m.group(1) == "ok", g4.log_tail()
    m = g5.wait_result(r"^vsock refused (ok|fail) .* after (\d+) s", 60)
    assert m.group(1) == "ok" and int(m.group(2)) <= 3, g5.log_tail()
    for g in (g4, g5, g3):
        g.stop()
    assert v.stop() == 0
    c = _counters(v)
    assert all(c[p]["errors"] == "0" and c[p]["connections"] == "0" for p in c), c
    assert c[1].get("relayed") and c[0].get("relayed"), c  # 4 -> 3 and 3 -> 4
    assert c[2]["bad_dst_cid"] == "1", c  # 5 -> 3: not a sibling
    print(f"\nvring {c}\ntotal {time.monotonic() - t0:.1f} s")
