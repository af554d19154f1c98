"""Several devices in one ``vring run`` process stay isolated while one of them is fed garbage.

One process serves: two net devices (each a cross-connect of two ports) carrying DPDK testpmd
traffic (one testpmd, four virtio-user ports, flowgen), a vsock device (the in-tree guest driver
of tests/test_vsock.py, host side on a unix socket), and a fifth device, ``bad``, that gets:

1. a front-end that stalls mid-message over and over while bad's other port, testpmd and the
   vsock guest set up (nobody waits for it: vring buffers partial messages per connection);
2. hostile protocol messages (tests/test_hostile_protocol.py's helpers): bad memory tables, fds
   of the wrong kind, out-of-range indexes, unknown requests, too many fds, a bad MTU, a bad
   version and an oversized message;
3. hostile rings from the in-tree front-end: a descriptor loop on one port, an out-of-range head
   on the other; each queue is marked broken with its reason.

Throughout, the other devices' counters (read from their control sockets) keep growing: before,
during and after the garbage (counts compared, nothing timed). At the end vring is alive, every
connection is gone and its fds and memfd mappings are back to the baseline, and it exits cleanly.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

import pytest
from peers import Testpmd, require_peer
from test_hostile_protocol import fds_and_maps, make_fd, message_bytes, prepare, read_msg, send_raw, sync
from test_net import check, frame
from test_vsock import Guest, read_line

from devices.vsock_proto import OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM
from vring import protocol as P
from vring.control import ControlClient
from vring.frontend import Frontend
from vring.layout import DESC_F_NEXT
from vring.protocol import Req

pytestmark = pytest.mark.peer

CONFIG = """\
devices:
  - {{type: net, name: n1, sockets: [{d}/a1.sock, {d}/b1.sock], control: {d}/n1.ctl}}
  - {{type: net, name: n2, sockets: [{d}/a2.sock, {d}/b2.sock], control: {d}/n2.ctl}}
  - type: vsock
    name: vs
    vms: [{{guest_cid: 3, socket: {d}/v3.sock, uds_path: {d}/vm3.vsock}}]
  - {{type: net, name: bad, mode: loopback, sockets: [{d}/g0.sock, {d}/g1.sock], control: {d}/bad.ctl}}
"""


def counts(d: str) -> dict[str, int]:
    """Frames each port of n1 and n2 delivered to testpmd so far, from their control sockets."""
    out = {}
    for dev in ("n1", "n2"):
        with ControlClient(os.path.join(d, f"{dev}.ctl")) as c:
            for p in c.sample()["ports"]:
                out[f"{dev}.{p['port']}"] = p["counters"]["rx_packets"]
    return out


def grew(before: dict[str, int], after: dict[str, int]) -> bool:
    return all(after[k] > before[k] for k in before)


def wait_growth(d: str, before: dict[str, int], timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        now = counts(d)
        if grew(before, now) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


class Staller(threading.Thread):
    """Sends the first byte of a message and waits until vring drops the connection (after
    MSG_TIMEOUT_S), again and again."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path, self.stop, self.drops, self.sent = path, threading.Event(), 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(self.path)
                s.send(message_bytes(Req.GET_FEATURES, b"", P.VERSION)[:1])
                self.sent.set()
                while not self.stop.is_set():
                    if select.select([s], [], [], 0.1)[0]:
                        if s.recv(1) == b"":
                            self.drops += 1
                        break


def vsock_round_trip(d: str, g: Guest, port: int) -> None:
    """Host connects to the guest's port through vs's host side; one message each way."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(os.path.join(d, "vm3.vsock"))
        s.sendall(b"CONNECT %d\n" % port)
        req = g.wait(lambda p: p.op == OP_REQUEST and p.dst_port == port, 10)
        g.send(OP_RESPONSE, port, req.src_port, dst_cid=2)
        assert read_line(s) == b"OK %d\n" % req.src_port
        s.sendall(b"ping")
        assert g.wait(lambda p: p.op == OP_RW and p.dst_port == port, 10).data == b"ping"
        g.send(OP_RW, port, req.src_port, b"pong")
        assert s.recv(4) == b"pong"
    assert req.type == TYPE_STREAM


def hostile_protocol(path: str) -> list[str]:
    """Garbage on one connection; returns what vring did after each message ("reply", "none",
    "closed"). The connection is answered or closed, never left hanging."""
    fe = Frontend(path, queue_size=64)
    seen = []
    try:
        prepare(fe, 1)  # SET_OWNER, REPLY_ACK
        nr = P.VERSION | P.FLAG_NEED_REPLY
        reg = P.record(P.MEM_REGION, gpa=0, size=1 << 20, uaddr=0x7000_0000, mmap_offset=0)
        huge = P.record(P.MEM_REGION, gpa=0, size=1 << 63, uaddr=0x7000_0000, mmap_offset=0)
        cases = [
            (77, b"", [], nr),  # unknown request
            (Req.SET_MEM_TABLE, struct.pack("<II", 9, 0), [], nr),  # 9 regions claimed, none sent
            (Req.SET_MEM_TABLE, P.mem_table(reg), [("pipe", 0)], nr),  # not a memory fd
            (Req.SET_MEM_TABLE, P.mem_table(reg), [("memfd", 4096)], nr),  # shorter than the region
            (Req.SET_MEM_TABLE, P.mem_table(huge), [("memfd", 4096)], nr),  # 2^63 bytes
            (Req.SET_VRING_NUM, P.record(P.VRING_STATE, index=200, num=64).tobytes(), [], nr),
            (Req.SET_VRING_ADDR, P.record(P.VRING_ADDR, index=1, desc=1 << 60, used=8, avail=3).tobytes(), [], nr),
            (Req.SET_VRING_KICK, P.u64(0).tobytes(), [("socket", 0)], nr),  # not an eventfd
            (Req.SET_FEATURES, P.u64(1 << 62).tobytes(), [], nr),  # never offered
            (Req.SET_OWNER, b"", [("eventfd", 0)] * 8, nr),  # fds where none belong
            (Req.NET_SET_MTU, P.u64(10).tobytes(), [], nr),  # below 68 (and NET_MTU not negotiated)
            (Req.SET_VRING_BASE, b"\x01\x02\x03", [], nr),  # short payload
        ]
        for req, payload, fd_specs, flags in cases:
            fds = [make_fd(k, s) for k, s in fd_specs]
            try:
                ok = send_raw(fe.sock, message_bytes(req, payload, flags), fds)
            finally:
                for fd in fds:
                    os.close(fd)
            m = read_msg(fe.sock, 8.0) if ok else "closed"
            seen.append("reply" if isinstance(m, tuple) else m)
        assert sync(fe.sock) == "alive", seen
        send_raw(fe.sock, message_bytes(Req.GET_FEATURES, b"", 0x2), [])  # bad version: closes
        seen.append(read_msg(fe.sock, 8.0))
    finally:
        fe.close()
    # an oversized message on a fresh connection closes it as well
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        send_raw(s, struct.pack("<III", Req.SET_MEM_TABLE, 1, 1 << 20) + bytes(100), [])
        seen.append(read_msg(s, 8.0))
    finally:
        s.close()
    return seen


def hostile_ring(path: str, kind: str) -> Frontend:
    """A front-end that sets up properly, then puts a descriptor loop ("loop") or a head index
    beyond the queue size ("head") on its TX ring and kicks. Returned still connected."""
    fe = Frontend(path, queue_size=64)
    fe.connect()
    fe.setup()
    fe.post_rx()
    t = fe.tx()
    d = t.free.pop()
    if kind == "loop":
        t.desc[d] = (t.buf_gpa(d), 64, DESC_F_NEXT, d)  # next = itself
        head = d
    else:
        head = t.size + 7
    t.avail["ring"][t.avail_idx % t.size] = head
    t.avail_idx = (t.avail_idx + 1) & 0xFFFF
    t.avail["idx"] = t.avail_idx
    os.eventfd_write(t.kick_fd, 1)
    return fe


def broken(d: str) -> dict[tuple[int, int], str]:
    with ControlClient(os.path.join(d, "bad.ctl")) as c:
        return {(q["port"], q["vring"]): q["broken_reason"] for q in c.sample()["queues"] if q["broken"]}


def wait_broken(d: str, n: int, timeout: float = 20) -> dict[tuple[int, int], str]:
    deadline = time.monotonic() + timeout
    while len(b := broken(d)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return b


def test_garbage_on_one_device_leaves_the_others_running(sockdir, peers, vring_proc):
    require_peer("testpmd")
    d = sockdir
    cfg = os.path.join(d, "run.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(d=d))
    v = vring_proc("run", cfg)
    v.wait_log("vring run: 4 device(s)", 120)
    pid = v.proc.pid
    base = fds_and_maps(pid)

    # 1. a front-end stalls mid-message on bad's port 0 while the others set up
    staller = Staller(os.path.join(d, "g0.sock"))
    staller.start()
    assert staller.sent.wait(10)
    # bad's port 1 (same device, same control thread) sets up and loops frames meanwhile: its
    # messages are not queued behind the stalled one (which vring drops only after MSG_TIMEOUT_S)
    other = Frontend(os.path.join(d, "g1.sock"), queue_size=64)
    try:
        other.connect()
        other.setup()
        other.post_rx()
        assert other.send_frames([frame(i) for i in range(8)]) == 8
        got: list[bytes] = []
        while len(got) < 8:
            got += other.recv_frames()
        assert [check(f) for f in got] == list(range(8))
        assert staller.drops == 0, "port 1's set-up waited for the stalled port 0"
    finally:
        other.close()
    fe = peers.add(Testpmd([f"{d}/a1.sock", f"{d}/b1.sock", f"{d}/a2.sock", f"{d}/b2.sock"], "flowgen",
                           cpus=(0, 1), workdir=d, name="fe"))
    g = Guest(os.path.join(d, "v3.sock"), 3)
    try:
        assert g.config_cid() == 3
        fe.wait_forwarding(60)
        fe.wait_traffic(60, direction="rx")
        vsock_round_trip(d, g, 1000)
        deadline = time.monotonic() + 20
        while staller.drops < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert staller.drops >= 1 and staller.is_alive(), "the staller never held bad's control thread"
        staller.stop.set()
        staller.join(10)
        c0 = wait_growth(d, dict.fromkeys(["n1.0", "n1.1", "n2.0", "n2.1"], 0))

        # 2. hostile protocol messages on bad
        seen = hostile_protocol(os.path.join(d, "g0.sock"))
        assert seen[-2:] == ["closed", "closed"] and "timeout" not in seen, seen
        c1 = wait_growth(d, c0)
        assert grew(c0, c1), (c0, c1)

        # 3. hostile rings on bad's two ports
        loop = hostile_ring(os.path.join(d, "g1.sock"), "loop")
        head = hostile_ring(os.path.join(d, "g0.sock"), "head")
        try:
            b = wait_broken(d, 2)
            assert b == {(1, 1): "descriptor chain longer than its table (loop)",
                         (0, 1): "avail ring holds a head index >= queue size"}, b
            c2 = wait_growth(d, c1)
            assert grew(c1, c2), (c1, c2)
            vsock_round_trip(d, g, 1001)
        finally:
            loop.close()
            head.close()
        v.wait_log("dev=bad port=1 vring=1 broken: descriptor chain longer than its table (loop)", 10)
        v.wait_log("dev=bad port=0 vring=1 broken: avail ring holds a head index", 10)

        # after the garbage: still growing, vsock still answers
        c3 = wait_growth(d, c2)
        assert grew(c2, c3), (c2, c3)
        vsock_round_trip(d, g, 1002)
    finally:
        staller.stop.set()
        g.close()
        fs = fe.stop()
    assert v.proc.poll() is None, v.log_text()[-3000:]
    print(f"\nn1/n2 frames delivered: {c0} -> {c1} -> {c2} -> {c3}\ntestpmd {fs.ports}")
    for p in range(4):
        assert fs.ports[p]["rx_packets"] > 0 and fs.ports[p]["tx_packets"] > 0, fs.ports

    # every connection gone: fds and memfd mappings back to the baseline
    deadline = time.monotonic() + 15
    while fds_and_maps(pid) != base and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds_and_maps(pid) == base, (fds_and_maps(pid), base, v.log_text()[-3000:])
    assert v.stop() == 0
    log = v.log_text()
    assert "Traceback" not in log, log[-4000:]
    for dev in ("n1", "n2"):
        for p in (0, 1):
            line = next(x for x in log.splitlines() if x.startswith(f"{dev} port {p} "))
            assert " errors=0" in line, line


def test_run_config_errors(sockdir):
    """A bad file is refused at start with the entry and key named; nothing is left listening."""
    import subprocess
    import sys

    cases = {
        "devices: []\n": "expected a top-level 'devices' list",
        "devices:\n  - {type: net, sockets: [X/a.sock], bogus: 1}\n": "devices[0] (net): unknown key(s) bogus",
        "devices:\n  - {type: tap, sockets: [X/a.sock]}\n": "devices[0]: type must be one of",
        "devices:\n  - {type: net, sockets: [X/a.sock], mtu: 20}\n": "devices[0] (net): MTU must be 68..65535",
        "devices:\n  - {type: net, sockets: [X/a.sock]}\n  - {type: switch, sockets: [X/a.sock]}\n":
            "two ports share a socket path",
        "devices:\n  - {type: vsock, vms: [{guest_cid: 3}]}\n": "socket is required",
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for text, err in cases.items():
        cfg = os.path.join(sockdir, "bad.yaml")
        with open(cfg, "w") as f:
            f.write(text.replace("X", sockdir))
        r = subprocess.run([sys.executable, "-m", "vring", "run", cfg], capture_output=True, text=True, cwd=root,
                           timeout=120)
        assert r.returncode == 2 and err in r.stderr, (text, r.returncode, r.stderr[-2000:])
    assert not [n for n in os.listdir(sockdir) if n.endswith(".sock")]
