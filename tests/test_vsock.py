"""``vring vsock`` driven by the in-tree front-end acting as the guest's virtio-vsock driver.

The device and its vhost-user server run in this process (a thread), so the tests can look at
its connection table; the host side is real unix sockets. Covered: config space, host -> guest
(CONNECT / OK), guest -> host (<uds>_<port>), refusals both ways, credit flow control both ways,
half-close and out-of-order shutdown, 64 concurrent connections, hostile packets (oversized
len, spoofed CID, unknown connections, RST storms, bad chains), sibling guests by group, and
no connection / fd left behind.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from devices.vsock import CONNECT_TIMEOUT_S, VmConfig, VsockDevice
from devices.vsock_proto import (
    HDR,
    HDR_LEN,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
)
from vring import protocol as P
from vring.frontend import Frontend
from vring.protocol import PF, F, Req
from vring.server import Server

BUF = 4096 + HDR_LEN  # Linux's receive buffers: 4 KiB of payload behind the header


class Pkt:
    __slots__ = (
        "buf_alloc",
        "data",
        "dst_cid",
        "dst_port",
        "flags",
        "fwd_cnt",
        "len",
        "op",
        "src_cid",
        "src_port",
        "type",
    )

    def __init__(self, raw: bytes):
        (self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op, self.flags,
         self.buf_alloc, self.fwd_cnt) = HDR.unpack_from(raw)
        self.data = raw[HDR_LEN : HDR_LEN + self.len]

    def __repr__(self):
        return (f"Pkt(op={self.op} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} len={self.len} "
                f"flags={self.flags} buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt})")


class Guest:
    """The driver side of a virtio-vsock device: rx (0), tx (1), event (2) rings over a Frontend."""

    def __init__(self, path: str, cid: int, queue_size: int = 128, buf_size: int = 16384, post: bool = True):
        self.cid = cid
        self.fe = Frontend(path, nvrings=3, queue_size=queue_size, buf_size=buf_size,
                           features=F.VERSION_1 | F.PROTOCOL_FEATURES,
                           protocol_features=PF.REPLY_ACK | PF.CONFIG | PF.STATUS)
        self.fe.connect()
        self.fe.setup()
        self.rx, self.tx, self.ev = self.fe.rings
        if post:
            self.post_rx()
        for _ in range(8):
            self.ev.add_buffer(writable=True, length=4)
        self.ev.publish()
        self.inbox: list[Pkt] = []

    def config_cid(self) -> int:
        body = self.fe.call(Req.GET_CONFIG, P.record(P.CONFIG_HEAD, offset=0, size=8, flags=0).tobytes() + bytes(8))
        return struct.unpack_from("<Q", body, 12)[0]

    def post_rx(self, n: int | None = None) -> None:
        k = len(self.rx.free) if n is None else min(n, len(self.rx.free))
        for _ in range(k):
            self.rx.add_buffer(writable=True, length=BUF)
        self.rx.publish()

    def send(self, op: int, src_port: int, dst_port: int, data: bytes = b"", *, dst_cid: int = 2,
             src_cid: int | None = None, flags: int = 0, buf_alloc: int = 262144, fwd_cnt: int = 0,
             ln: int | None = None, typ: int = TYPE_STREAM) -> None:
        self.tx.take_used()
        h = HDR.pack(self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port,
                     len(data) if ln is None else ln, typ, op, flags, buf_alloc, fwd_cnt)
        self.tx.add_buffer(h + data)
        self.tx.publish()

    def poll(self) -> list[Pkt]:
        out = []
        for head, ln in self.rx.take_used():
            assert ln >= HDR_LEN, ln
            out.append(Pkt(self.rx.buf(head)[:ln].tobytes()))
        if out:
            self.post_rx(len(out))
        self.inbox.extend(out)
        return out

    def wait(self, pred, timeout: float = 5.0) -> Pkt:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            for i, p in enumerate(self.inbox):
                if pred(p):
                    return self.inbox.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching packet; inbox {self.inbox}")
            time.sleep(0.002)

    def close(self) -> None:
        self.fe.close()


@pytest.fixture
def vsock(sockdir):
    """Start a VsockDevice for the given VmConfigs in this process; yields a factory."""
    started = []

    def start(*specs):
        vms = [VmConfig(cid, os.path.join(sockdir, f"vh{cid}.sock"), os.path.join(sockdir, f"vm{cid}.vsock"),
                        groups=groups, tx_buffer_size=txbuf) for cid, groups, txbuf in specs]
        dev = VsockDevice(vms)
        server = Server(dev, [v.socket for v in vms])
        dev.open()
        dev.start()
        server.open()
        t = threading.Thread(target=server.serve, daemon=True)
        t.start()
        started.append((dev, server, t))
        return dev

    yield start
    for dev, server, t in started:
        server.stopping = True
        t.join(5)
        server.close()
        dev.stop()


def one(vsock, txbuf=65536):
    dev = vsock((3, "default", txbuf))
    g = Guest(dev.vms[0].cfg.socket, 3)
    return dev, g


def snap(dev, cid=3) -> dict:
    with dev.paused():
        return dev.snapshot()[cid]


def host_connect(dev, port: int, vm: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(dev.vms[vm].cfg.uds_path)
    s.sendall(b"CONNECT %d\n" % port)
    return s


def read_line(s: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            break
        out += c
    return out


def accept_host(g: Guest, s: socket.socket, port: int, buf_alloc: int = 262144) -> tuple[int, int]:
    """The guest accepts a host CONNECT to ``port``; returns (host_port, guest_port)."""
    req = g.wait(lambda p: p.op == OP_REQUEST and p.dst_port == port)
    assert (req.src_cid, req.dst_cid, req.type) == (2, g.cid, TYPE_STREAM)
    g.send(OP_RESPONSE, port, req.src_port, dst_cid=2, buf_alloc=buf_alloc)
    assert read_line(s) == b"OK %d\n" % req.src_port
    return req.src_port, port


def settle(dev, pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = snap(dev)
        if pred(s):
            return s
        time.sleep(0.02)
    raise AssertionError(f"state not reached: {snap(dev)}")


def closed(s: socket.socket) -> bool:
    """The peer closed the connection (EOF, or a reset when it closed with our bytes unread)."""
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------


def test_config_and_features(vsock):
    dev, g = one(vsock)
    assert g.config_cid() == 3
    assert g.fe.features == F.VERSION_1 | F.PROTOCOL_FEATURES
    assert dev.features & (1 << 1)  # VIRTIO_VSOCK_F_SEQPACKET offered
    assert dev.protocol_features & PF.CONFIG
    g.close()


def test_host_to_guest_stream_both_ways(vsock):
    dev, g = one(vsock)
    s = host_connect(dev, 1234)
    hp, gp = accept_host(g, s, 1234)
    data = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    s.sendall(data)
    got = bytearray()
    fwd = 0
    while len(got) < len(data):
        p = g.wait(lambda p: p.op in (OP_RW, OP_CREDIT_REQUEST) and p.dst_port == gp)
        if p.op == OP_RW:
            assert p.len <= 4096 and (p.src_port, p.dst_port) == (hp, gp)
            got += p.data
            fwd += p.len
            # consume and tell the device (as Linux does when its free space runs low)
            g.send(OP_CREDIT_UPDATE, gp, hp, fwd_cnt=fwd)
    assert bytes(got) == data
    # guest -> host through the same connection
    back = data[:100_000]
    for i in range(0, len(back), 4096):
        g.send(OP_RW, gp, hp, back[i : i + 4096], fwd_cnt=fwd)
        if i % (32 * 4096) == 0:
            time.sleep(0.01)
    rec = bytearray()
    while len(rec) < len(back):
        rec += s.recv(65536)
    assert bytes(rec) == back
    # host half-closes: guest sees SHUTDOWN(SEND); guest closes fully: device resets, host sees EOF
    s.shutdown(socket.SHUT_WR)
    p = g.wait(lambda p: p.op == OP_SHUTDOWN)
    assert p.flags == SHUTDOWN_SEND
    g.send(OP_SHUTDOWN, gp, hp, flags=SHUTDOWN_RCV | SHUTDOWN_SEND, fwd_cnt=fwd)
    g.wait(lambda p: p.op == OP_RST and p.dst_port == gp)
    assert s.recv(10) == b""
    s.close()
    st = settle(dev, lambda s: s["connections"] == 0)
    assert st["errors"] == 0 and st["buffered"] == 0
    g.close()


def test_guest_to_host_and_half_close(vsock):
    dev, g = one(vsock)
    path = dev.vms[0].cfg.uds_path + "_5000"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(4)
    lst.settimeout(5)
    g.send(OP_REQUEST, 7000, 5000)
    p = g.wait(lambda p: p.dst_port == 7000)
    assert p.op == OP_RESPONSE and (p.src_cid, p.src_port, p.buf_alloc) == (2, 5000, 65536)
    c, _ = lst.accept()
    c.settimeout(5)
    payload = os.urandom(200_000)
    sent = 0
    peer_fwd = 0
    while sent < len(payload):
        # respect the credit the device gave us (buf_alloc 64 KiB, fwd_cnt from its packets)
        while sent - peer_fwd + 4096 > 65536:
            p = g.wait(lambda p: p.op == OP_CREDIT_UPDATE and p.dst_port == 7000)
            peer_fwd = p.fwd_cnt
        k = min(4096, len(payload) - sent)
        g.send(OP_RW, 7000, 5000, payload[sent : sent + k])
        sent += k
    g.send(OP_SHUTDOWN, 7000, 5000, flags=SHUTDOWN_SEND)
    rec = bytearray()
    while True:
        b = c.recv(65536)
        if not b:
            break
        rec += b
    assert bytes(rec) == payload  # guest's SHUTDOWN(SEND) became a half-close (EOF) on the host
    c.sendall(b"reply after half-close")
    c.close()
    p = g.wait(lambda p: p.op == OP_RW and p.dst_port == 7000)
    assert p.data == b"reply after half-close"
    g.wait(lambda p: p.op == OP_SHUTDOWN and p.dst_port == 7000)
    g.wait(lambda p: p.op == OP_RST and p.dst_port == 7000)  # both directions done: connection gone
    settle(dev, lambda s: s["connections"] == 0)
    lst.close()
    g.close()


def test_refused_both_ways(vsock):
    dev, g = one(vsock)
    # guest -> host port nobody listens on: RST
    g.send(OP_REQUEST, 7001, 4444)
    p = g.wait(lambda p: p.dst_port == 7001)
    assert p.op == OP_RST and p.src_port == 4444 and p.src_cid == 2
    # host -> guest port the guest refuses: the host connection is closed
    s = host_connect(dev, 99)
    req = g.wait(lambda p: p.op == OP_REQUEST and p.dst_port == 99)
    g.send(OP_RST, 99, req.src_port)
    assert s.recv(100) == b""
    s.close()
    # host -> guest, no answer at all: closed after the connect timeout
    s = host_connect(dev, 98)
    g.wait(lambda p: p.op == OP_REQUEST and p.dst_port == 98)
    t0 = time.monotonic()
    s.settimeout(CONNECT_TIMEOUT_S + 5)
    assert s.recv(100) == b""
    assert time.monotonic() - t0 < CONNECT_TIMEOUT_S + 2
    g.wait(lambda p: p.op == OP_RST and p.dst_port == 98)  # the guest is told too
    s.close()
    # malformed CONNECT lines
    for line in (b"CONNECT\n", b"connect 5\n", b"CONNECT -1\n", b"CONNECT 99999999999\n", b"X" * 100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(dev.vms[0].cfg.uds_path)
        s.sendall(line)
        assert closed(s)
        s.close()
    st = settle(dev, lambda s: s["connections"] == 0 and s["handshakes"] == 0)
    assert st["refused"] == 1 and st["connect_timeout"] == 1
    g.close()


def test_credit_host_to_guest_is_honoured(vsock):
    """The guest grants 8 KiB: the device sends no more until the guest reports consumption."""
    dev, g = one(vsock)
    s = host_connect(dev, 1300)
    hp, gp = accept_host(g, s, 1300, buf_alloc=8192)
    s.sendall(os.urandom(100_000))
    got = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for p in g.poll():
            if p.op == OP_RW:
                got += p.len
        time.sleep(0.01)
    assert got == 8192
    req = [p for p in g.inbox if p.op == OP_CREDIT_REQUEST]
    assert req, "the device asks for credit when it has none"
    g.inbox.clear()
    g.send(OP_CREDIT_UPDATE, gp, hp, buf_alloc=8192, fwd_cnt=8192)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for p in g.poll():
            if p.op == OP_RW:
                got += p.len
        time.sleep(0.01)
    assert got == 16384
    s.close()
    g.close()


def test_credit_guest_to_host_violation_resets(vsock):
    """A guest sending beyond the 16 KiB it was granted (the host isn't reading) gets a RST."""
    dev, g = one(vsock, txbuf=16384)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(dev.vms[0].cfg.uds_path + "_5001")
    lst.listen(1)
    g.send(OP_REQUEST, 7002, 5001)
    assert g.wait(lambda p: p.dst_port == 7002).op == OP_RESPONSE
    c, _ = lst.accept()
    # fill the unix socket's buffer first (the host never reads), then overrun the credit
    for _ in range(400):
        g.send(OP_RW, 7002, 5001, bytes(4096))
        time.sleep(0.0005)
        if any(p.op == OP_RST for p in g.poll()):
            break
    rst = [p for p in g.inbox if p.op == OP_RST and p.dst_port == 7002]
    assert rst, g.inbox[-5:]
    st = settle(dev, lambda s: s["connections"] == 0)
    assert st["credit_violation"] == 1 and st["buffered"] == 0
    c.close()
    lst.close()
    g.close()


def test_hostile_packets(vsock):
    dev, g = one(vsock)
    # len larger than the buffer: RST, nothing forwarded
    g.send(OP_RW, 1, 2, b"abc", ln=60000)
    assert g.wait(lambda p: p.dst_port == 1).op == OP_RST
    # spoofed source CID: dropped silently
    g.send(OP_REQUEST, 2, 5000, src_cid=77)
    # unknown destination CID (no sibling): RST from that CID
    g.send(OP_REQUEST, 3, 5000, dst_cid=9)
    p = g.wait(lambda p: p.dst_port == 3)
    assert p.op == OP_RST and p.src_cid == 9
    # packet for no connection: RST; unknown type; unknown op on no connection
    g.send(OP_RW, 4, 5000, b"x")
    g.send(OP_REQUEST, 5, 5000, typ=7)
    g.send(99, 6, 5000)
    for port in (4, 5, 6):
        assert g.wait(lambda p, port=port: p.dst_port == port).op == OP_RST
    # a storm of RSTs for nothing: never answered
    for i in range(300):
        g.send(OP_RST, 100 + (i % 50), 5000)
        if i % 60 == 0:
            time.sleep(0.01)
    time.sleep(0.3)
    g.poll()
    assert not [p for p in g.inbox if p.dst_port >= 100], g.inbox[:5]
    # a header cut short (chain of 20 bytes)
    g.tx.add_buffer(bytes(20))
    g.tx.publish()
    time.sleep(0.1)
    st = snap(dev)
    assert st["bad_src_cid"] == 1 and st["short_packets"] == 1 and st["connections"] == 0
    assert st["bad_len"] == 1 and st["bad_dst_cid"] == 1 and st["bad_type"] == 1
    # and the device still works
    s = host_connect(dev, 1400)
    accept_host(g, s, 1400)
    s.close()
    g.close()


def test_bad_chain_marks_queue_broken(vsock):
    dev, g = one(vsock)
    g.tx.add_chain([(0xDEAD_0000_0000, 64, False)])  # outside guest memory
    g.tx.publish()
    deadline = time.monotonic() + 5
    while not dev.qstate[dev.vms[0].tx]["broken"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.qstate[dev.vms[0].tx]["broken"]
    # the device's other rings and other guests keep working
    g2dev = vsock((4, "default", 65536))
    g2 = Guest(g2dev.vms[0].cfg.socket, 4, post=False)
    g2.rx.add_buffer(writable=True, length=8)  # a receive chain too short for a header
    g2.rx.publish()
    s = host_connect(g2dev, 1)
    deadline = time.monotonic() + 5
    while not g2dev.qstate[g2dev.vms[0].rx]["broken"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert g2dev.qstate[g2dev.vms[0].rx]["broken"]
    assert not g2.rx.take_used()
    s.close()
    g.close()
    g2.close()


def test_out_of_order_shutdown_and_rst_mid_stream(vsock):
    dev, g = one(vsock)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(dev.vms[0].cfg.uds_path + "_5002")
    lst.listen(4)
    lst.settimeout(5)
    # SHUTDOWN(RCV) first, then data still flows guest -> host, then SEND: RST and EOF on the host
    g.send(OP_REQUEST, 8000, 5002)
    assert g.wait(lambda p: p.dst_port == 8000).op == OP_RESPONSE
    c, _ = lst.accept()
    c.settimeout(5)
    g.send(OP_SHUTDOWN, 8000, 5002, flags=SHUTDOWN_RCV)
    g.send(OP_RW, 8000, 5002, b"still sending")
    assert c.recv(100) == b"still sending"
    c.sendall(b"nobody reads this")  # the guest said it won't receive: not delivered
    g.send(OP_SHUTDOWN, 8000, 5002, flags=SHUTDOWN_SEND)
    g.wait(lambda p: p.op == OP_RST and p.dst_port == 8000)
    assert not [p for p in g.inbox if p.op == OP_RW]
    assert closed(c)
    c.close()
    # data after the guest's SHUTDOWN(SEND): RST
    g.send(OP_REQUEST, 8001, 5002)
    assert g.wait(lambda p: p.dst_port == 8001).op == OP_RESPONSE
    c, _ = lst.accept()
    g.send(OP_SHUTDOWN, 8001, 5002, flags=SHUTDOWN_SEND)
    g.send(OP_RW, 8001, 5002, b"late")
    g.wait(lambda p: p.op == OP_RST and p.dst_port == 8001)
    c.close()
    # the guest resets mid-stream while the host is sending
    s = host_connect(dev, 1500)
    hp, gp = accept_host(g, s, 1500)
    s.sendall(os.urandom(50_000))
    g.send(OP_RST, gp, hp)
    s.settimeout(5)
    assert closed(s)
    s.close()
    # the host closes mid-stream while the guest is sending: RST once writes fail
    s = host_connect(dev, 1501)
    hp, gp = accept_host(g, s, 1501)
    s.close()
    g.wait(lambda p: p.op == OP_SHUTDOWN and p.dst_port == gp)
    for _ in range(4):
        g.send(OP_RW, gp, hp, b"x" * 1000)
    g.wait(lambda p: p.op == OP_RST and p.dst_port == gp)
    st = settle(dev, lambda s: s["connections"] == 0)
    assert st["buffered"] == 0
    lst.close()
    g.close()


def test_64_concurrent_connections_no_leaks(vsock):
    dev, g = one(vsock)
    base_fds = fd_count()
    n = 64
    socks = [host_connect(dev, 2000 + i) for i in range(n)]
    conns = {}
    for i, s in enumerate(socks):
        conns[i] = accept_host(g, s, 2000 + i)
    msgs = {i: os.urandom(3000 + i) for i in range(n)}
    for i, s in enumerate(socks):
        s.sendall(msgs[i])
    got = {i: bytearray() for i in range(n)}
    by_port = {gp: i for i, (hp, gp) in conns.items()}
    deadline = time.monotonic() + 10
    while any(len(got[i]) < len(msgs[i]) for i in range(n)) and time.monotonic() < deadline:
        for p in g.poll():
            if p.op == OP_RW:
                got[by_port[p.dst_port]] += p.data
        g.inbox.clear()
        time.sleep(0.005)
    assert all(bytes(got[i]) == msgs[i] for i in range(n))
    # the guest echoes each back
    for i, (hp, gp) in conns.items():
        g.send(OP_RW, gp, hp, msgs[i][:2000])
        if i % 16 == 15:
            time.sleep(0.01)
    for i, s in enumerate(socks):
        rec = b""
        while len(rec) < 2000:
            rec += s.recv(4096)
        assert rec == msgs[i][:2000]
    assert snap(dev)["connections"] == n
    for s in socks:
        s.close()
    # each host close reaches the guest as SHUTDOWN(SEND); the guest closes too and gets its RST
    for i, (hp, gp) in conns.items():
        g.wait(lambda p, gp=gp: p.op == OP_SHUTDOWN and p.dst_port == gp)
        g.send(OP_SHUTDOWN, gp, hp, flags=3)
        if i % 16 == 15:
            time.sleep(0.01)
    for _hp, gp in conns.values():
        g.wait(lambda p, gp=gp: p.op == OP_RST and p.dst_port == gp)
    st = settle(dev, lambda st: st["connections"] == 0)
    assert st["connections"] == 0 and st["buffered"] == 0 and st["handshakes"] == 0
    assert fd_count() <= base_fds
    g.close()


def test_siblings_by_group(vsock):
    dev = vsock((3, "a", 65536), (4, "a+b", 65536), (5, "c", 65536))
    g3 = Guest(dev.vms[0].cfg.socket, 3)
    g4 = Guest(dev.vms[1].cfg.socket, 4)
    g5 = Guest(dev.vms[2].cfg.socket, 5)
    # 3 -> 4 share group a: the request reaches guest 4 as sent
    g3.send(OP_REQUEST, 9000, 80, dst_cid=4)
    p = g4.wait(lambda p: p.op == OP_REQUEST)
    assert (p.src_cid, p.src_port, p.dst_cid, p.dst_port) == (3, 9000, 4, 80)
    g4.send(OP_RESPONSE, 80, 9000, dst_cid=3)
    assert g3.wait(lambda p: p.dst_port == 9000).op == OP_RESPONSE
    big = os.urandom(12_000)  # larger than one receive buffer: split by the device
    g3.send(OP_RW, 9000, 80, big, dst_cid=4)
    got = b""
    while len(got) < len(big):
        got += g4.wait(lambda p: p.op == OP_RW).data
    assert got == big
    # 3 -> 5: disjoint groups, refused
    g3.send(OP_REQUEST, 9001, 80, dst_cid=5)
    p = g3.wait(lambda p: p.dst_port == 9001)
    assert p.op == OP_RST and p.src_cid == 5
    time.sleep(0.1)
    assert not g5.poll()
    for g in (g3, g4, g5):
        g.close()


def test_frontend_disconnect_drops_connections(vsock):
    dev, g = one(vsock)
    s = host_connect(dev, 1600)
    accept_host(g, s, 1600)
    g.close()
    s.settimeout(5)
    assert s.recv(10) == b""
    st = settle(dev, lambda s: s["connections"] == 0)
    assert st["buffered"] == 0
    s.close()


def test_seqpacket_guest_to_host_keeps_boundaries(vsock):
    """With VIRTIO_VSOCK_F_SEQPACKET a guest SEQPACKET connect reaches a SOCK_SEQPACKET listener;
    records keep their boundaries both ways (EOM on each record toward the guest)."""
    dev = vsock((3, "default", 65536))
    g = Guest.__new__(Guest)
    g.cid = 3
    g.fe = Frontend(dev.vms[0].cfg.socket, nvrings=3, queue_size=64, buf_size=16384,
                    features=F.VERSION_1 | F.PROTOCOL_FEATURES | (1 << 1),
                    protocol_features=PF.REPLY_ACK | PF.CONFIG | PF.STATUS)
    g.fe.connect()
    g.fe.setup()
    g.rx, g.tx, g.ev = g.fe.rings
    g.inbox = []
    g.post_rx()
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lst.bind(dev.vms[0].cfg.uds_path + "_6000")
    lst.listen(1)
    lst.settimeout(5)
    g.send(OP_REQUEST, 7100, 6000, typ=2)
    p = g.wait(lambda p: p.dst_port == 7100)
    assert p.op == OP_RESPONSE and p.type == 2
    c, _ = lst.accept()
    c.settimeout(5)
    g.send(OP_RW, 7100, 6000, b"first record", typ=2, flags=1)
    g.send(OP_RW, 7100, 6000, b"second", typ=2, flags=1)
    assert c.recv(100) == b"first record"
    assert c.recv(100) == b"second"
    c.send(b"one")
    c.send(b"two two")
    a = g.wait(lambda p: p.op == OP_RW)
    b = g.wait(lambda p: p.op == OP_RW)
    assert (a.data, a.flags & 1, b.data, b.flags & 1) == (b"one", 1, b"two two", 1)
    big = os.urandom(10_000)  # more than one receive buffer: pieces, EOM on the last only
    c.send(big)
    parts = []
    while sum(len(x.data) for x in parts) < len(big):
        parts.append(g.wait(lambda p: p.op == OP_RW))
    assert b"".join(x.data for x in parts) == big
    assert [x.flags & 1 for x in parts] == [0] * (len(parts) - 1) + [1]
    # a STREAM request on a device without SEQPACKET negotiated is fine; a SEQPACKET one without it is refused
    c.close()
    lst.close()
    g.close()


def test_seqpacket_refused_when_not_negotiated(vsock):
    dev, g = one(vsock)
    g.send(OP_REQUEST, 7200, 6000, typ=2)
    p = g.wait(lambda p: p.dst_port == 7200)
    assert p.op == OP_RST
    assert snap(dev)["bad_type"] == 1
    g.close()


def test_transport_reset_after_backend_restart(sockdir):
    """A back-end that finds the rings already in use (it was restarted under a running driver)
    posts TRANSPORT_RESET on the event queue, so the guest drops its stale connections."""

    def serve():
        vm = VmConfig(3, os.path.join(sockdir, "vh3.sock"), os.path.join(sockdir, "vm3.vsock"))
        dev = VsockDevice([vm])
        server = Server(dev, [vm.socket])
        dev.open()
        dev.start()
        server.open()
        t = threading.Thread(target=server.serve, daemon=True)
        t.start()

        def stop():
            server.stopping = True
            t.join(5)
            server.close()
            dev.stop()

        return dev, stop

    dev, stop = serve()
    g = Guest(dev.vms[0].cfg.socket, 3)
    g.send(OP_REQUEST, 7300, 4444)
    assert g.wait(lambda p: p.dst_port == 7300).op == OP_RST
    time.sleep(0.1)
    assert not g.ev.take_used()  # a fresh start: no reset event
    stop()
    dev, stop = serve()
    try:
        g.fe.sock.close()
        g.fe.sock = None
        g.fe.connect()
        g.fe.setup()
        deadline = time.monotonic() + 5
        used = []
        while not used and time.monotonic() < deadline:
            used = g.ev.take_used()
            time.sleep(0.01)
        assert len(used) == 1 and used[0][1] == 4
        assert struct.unpack("<I", g.ev.buf(used[0][0])[:4].tobytes())[0] == 0  # TRANSPORT_RESET
        # and the device works on the resumed rings
        g.send(OP_REQUEST, 7301, 4444)
        assert g.wait(lambda p: p.dst_port == 7301).op == OP_RST
    finally:
        g.close()
        stop()


def test_cli_config_forms(tmp_path):
    from devices.vsock import load_config, parse_vm_arg
    from vring.cli import build_parser

    a = build_parser().parse_args(["vsock", "--guest-cid", "3", "--uds-path", "/tmp/u", "--socket", "/tmp/s",
                                   "--tx-buffer-size", "32768", "--groups", "a+b"])
    from devices.vsock import configs_from_args

    (c,) = configs_from_args(a)
    assert (c.guest_cid, c.uds_path, c.socket, c.tx_buffer_size, c.groups) == (3, "/tmp/u", "/tmp/s", 32768,
                                                                                 frozenset({"a", "b"}))
    c = parse_vm_arg("guest-cid=4,socket=/tmp/s4,uds-path=/tmp/u4,groups=g1,queue-size=256")
    assert (c.guest_cid, c.queue_size, c.groups) == (4, 256, frozenset({"g1"}))
    y = tmp_path / "vms.yaml"
    y.write_text("vms:\n  - guest_cid: 5\n    socket: /tmp/s5\n    uds_path: /tmp/u5\n    tx_buffer_size: 65536\n")
    (c,) = load_config(str(y))
    assert (c.guest_cid, c.groups) == (5, frozenset({"default"}))
    for bad in ("guest-cid=2,socket=/a,uds-path=/b", "guest-cid=3,socket=/a", "guest-cid=3,socket=/a,uds-path=/b,x=1",
                "guest-cid=3,socket=/a,uds-path=/b,queue-size=100", "guest-cid=x,socket=/a,uds-path=/b"):
        with pytest.raises(ValueError):
            parse_vm_arg(bad)
    with pytest.raises(ValueError):
        VsockDevice([VmConfig(3, "/a", "/b"), VmConfig(3, "/c", "/d")])
