"""Benchmark of ``vring vsock``: stream throughput both ways, connection setup rate, per-connection cost.

    /tmp/venv/bin/python bench/vsock_bench.py --quick      # < 1 min
    /tmp/venv/bin/python bench/vsock_bench.py              # full sweep (~3 min)
    /tmp/venv/bin/python bench/vsock_bench.py --profile    # + py-spy of vring during 64 KiB streams

``python -m vring vsock`` runs as a child pinned to CPU ``--be-cpu`` (default 1). This process, pinned
to ``--fe-cpu`` (default 0), is both the guest (a lean driver on ``vring.frontend.Frontend``'s memory
and rings: descriptor d owns buffer slot d, payload pre-filled once, only the 44-byte header written
per packet, a kick per batch) and the host side (non-blocking unix sockets: ``CONNECT <port>`` to the
uds path, a listener on ``<uds>_<port>``), all in one single-threaded poll loop.

The guest behaves like Linux's virtio-vsock driver where it matters to the device: it grants
``--guest-buf-alloc`` (256 KiB, Linux's default) of credit and returns consumed bytes with
CREDIT_UPDATE once half of it is consumed; it never sends beyond the credit the device granted
(vring's ``--tx-buffer-size``); it packetises writes into <= 64 KiB packets; it answers a
SHUTDOWN with SHUTDOWN(RCV|SEND). Its receive buffers hold 64 KiB + header (``--rx-buf``;
Linux posts 4 KiB ones, measured as a separate row in the full run).

Cost = CPU time of the whole vring process (all threads, /proc/PID/task/*/schedstat) divided by
packets / bytes / connections over the measured interval; vring_cpu = its share of one core.
Results: bench/results/vsock.json, bench/results/vsock_throughput.png.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from devices.vsock_proto import (  # noqa: E402
    HDR,
    HDR_LEN,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    TYPE_STREAM,
)
from vring.frontend import Frontend  # noqa: E402
from vring.layout import DESC_F_WRITE  # noqa: E402
from vring.protocol import PF, F  # noqa: E402

MAX_PKT = 64 * 1024
CID = 3
HOST_CID = 2
KIB = 1024


# ------------------------------------------------------------------------------------------------
# the guest: a lean virtio-vsock driver


class Ring:
    """Driver side of one split ring on a Frontend's memory; descriptor d always owns buffer slot d."""

    def __init__(self, fe: Frontend, index: int, desc_len: int, writable: bool):
        r = fe.rings[index]
        n = self.size = r.size
        self.mask = n - 1
        mv = memoryview(fe.mm)
        self.avail = mv[r.avail_off : r.avail_off + 4 + 2 * n].cast("H")  # flags, idx, ring[n]
        self.used16 = mv[r.used_off : r.used_off + 4].cast("H")  # flags, idx
        self.used32 = mv[r.used_off + 4 : r.used_off + 4 + 8 * n].cast("I")  # (id, len)[n]
        self.desc32 = mv[r.desc_off : r.desc_off + 16 * n].cast("I")
        for d in range(n):
            r.desc[d] = (r.buf_gpa(d), desc_len, DESC_F_WRITE if writable else 0, 0)
        self.off = [r.buf_off + d * r.buf_size for d in range(n)]
        self.free = collections.deque(range(n))
        self.avail_idx = 0
        self.last_used = 0
        self.kick_fd = r.kick_fd
        self.dirty = False
        self.kicks = 0
        self.reaped = 0  # used entries seen (packets, for the receive ring)

    def push(self, d: int, length: int | None = None) -> None:
        if length is not None:
            self.desc32[4 * d + 2] = length
        self.avail[2 + (self.avail_idx & self.mask)] = d
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.dirty = True

    def publish(self) -> None:
        if self.dirty:
            self.avail[1] = self.avail_idx
            os.eventfd_write(self.kick_fd, 1)  # always: a syscall also orders the idx store before the flag load
            self.kicks += 1
            self.dirty = False

    def reap(self) -> list[tuple[int, int]]:
        idx = self.used16[1]
        out = []
        u = self.used32
        last = self.last_used
        while last != idx:
            i = (last & self.mask) * 2
            out.append((u[i], u[i + 1]))
            last = (last + 1) & 0xFFFF
        self.last_used = last
        self.reaped += len(out)
        return out

    def release(self) -> None:
        for v in (self.avail, self.used16, self.used32, self.desc32):
            v.release()


class GConn:
    __slots__ = (
        "buf_alloc",
        "fwd_cnt",
        "fwd_told",
        "gport",
        "hport",
        "peer_alloc",
        "peer_fwd",
        "rx",
        "shut",
        "state",
        "tx",
    )

    def __init__(self, gport: int, hport: int, buf_alloc: int):
        self.gport, self.hport = gport, hport
        self.state = "connecting"
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0  # bytes we received and "consumed" at once
        self.fwd_told = 0
        self.rx = 0
        self.tx = 0  # bytes we sent
        self.peer_alloc = 0
        self.peer_fwd = 0
        self.shut = False

    def credit(self) -> int:
        return self.peer_alloc - ((self.tx - self.peer_fwd) & 0xFFFFFFFF)


class Guest:
    def __init__(self, path: str, queue_size: int, rx_buf: int, buf_alloc: int):
        slot = max(rx_buf, HDR_LEN + MAX_PKT)
        self.fe = Frontend(path, nvrings=3, queue_size=queue_size, buf_size=slot,
                           features=F.VERSION_1 | F.PROTOCOL_FEATURES,
                           protocol_features=PF.REPLY_ACK | PF.CONFIG | PF.STATUS)
        self.fe.connect()
        self.fe.setup()
        self.mm = self.fe.mm
        self.rx = Ring(self.fe, 0, rx_buf, True)
        self.tx = Ring(self.fe, 1, HDR_LEN, False)
        self.ev = Ring(self.fe, 2, 8, True)
        self.rx_len = rx_buf
        self.buf_alloc = buf_alloc
        pattern = bytes(range(256)) * (slot // 256 + 1)
        for off in self.tx.off:  # payload pre-filled once: per packet only the header is written
            self.mm[off + HDR_LEN : off + slot] = pattern[: slot - HDR_LEN]
        while self.rx.free:
            self.rx.push(self.rx.free.popleft())
        self.rx.publish()
        for _ in range(4):
            self.ev.push(self.ev.free.popleft())
        self.ev.publish()
        self.conns: dict[tuple[int, int], GConn] = {}  # (guest port, host port)
        self.listen: set[int] = set()  # guest ports accepting host CONNECTs
        self.next_port = 20000
        self.backlog: collections.deque = collections.deque()
        self.stats = collections.Counter()

    # -- sending --
    def _tx_slot(self) -> int | None:
        if not self.tx.free:
            for d, _ in self.tx.reap():
                self.tx.free.append(d)
            if not self.tx.free:
                return None
        return self.tx.free.popleft()

    def send(self, op: int, sport: int, dport: int, ln: int = 0, flags: int = 0, c: GConn | None = None) -> bool:
        if self.backlog:
            if ln:
                return False  # data waits behind queued control packets
            self.backlog.append((op, sport, dport, flags, c))
            return True
        d = self._tx_slot()
        if d is None:
            self.stats["tx_full"] += 1
            if ln:
                return False
            self.backlog.append((op, sport, dport, flags, c))  # control is never dropped (sent at flush)
            return True
        self._send_now(d, op, sport, dport, flags, c, ln)
        return True

    def _send_now(self, d: int, op: int, sport: int, dport: int, flags: int, c: GConn | None, ln: int = 0) -> None:
        buf_alloc, fwd = (c.buf_alloc, c.fwd_cnt & 0xFFFFFFFF) if c is not None else (self.buf_alloc, 0)
        HDR.pack_into(self.mm, self.tx.off[d], CID, HOST_CID, sport, dport, ln, TYPE_STREAM, op, flags,
                      buf_alloc, fwd)
        if c is not None:
            c.fwd_told = c.fwd_cnt
        self.tx.push(d, HDR_LEN + ln)

    def connect(self, hport: int) -> GConn:
        gport = self.next_port
        self.next_port += 1
        c = GConn(gport, hport, self.buf_alloc)
        self.conns[(gport, hport)] = c
        self.send(OP_REQUEST, gport, hport, c=c)
        return c

    def write(self, c: GConn, n: int) -> int:
        """Send up to n bytes on c as one packet (bounded by 64 KiB and the credit); returns bytes sent."""
        k = min(n, MAX_PKT, c.credit())
        if k <= 0 or not self.send(OP_RW, c.gport, c.hport, k, c=c):
            return 0
        c.tx += k
        return k

    def close(self, c: GConn) -> None:
        if not c.shut:
            c.shut = True
            self.send(OP_SHUTDOWN, c.gport, c.hport, flags=3, c=c)

    # -- receiving --
    def poll(self) -> int:
        """Handle received packets (control answered here); returns payload bytes received."""
        used = self.rx.reap()
        if not used:
            return 0
        got = 0
        mm, conns, off = self.mm, self.conns, self.rx.off
        for d, _ln in used:
            (_sc, _dc, sport, dport, ln, _t, op, _fl, buf_alloc, fwd_cnt) = HDR.unpack_from(mm, off[d])
            self.rx.push(d, self.rx_len)
            key = (dport, sport)
            c = conns.get(key)
            if op == OP_RW:
                if c is None:
                    self.stats["rw_no_conn"] += 1
                    continue
                c.rx += ln
                c.fwd_cnt += ln
                got += ln
                c.peer_alloc, c.peer_fwd = buf_alloc, fwd_cnt
                if c.fwd_cnt - c.fwd_told >= c.buf_alloc // 2:
                    self.send(OP_CREDIT_UPDATE, dport, sport, c=c)
            elif op == OP_REQUEST:
                if dport in self.listen and c is None:
                    c = GConn(dport, sport, self.buf_alloc)
                    c.peer_alloc, c.peer_fwd, c.state = buf_alloc, fwd_cnt, "established"
                    conns[key] = c
                    self.send(OP_RESPONSE, dport, sport, c=c)
                else:
                    self.send(OP_RST, dport, sport)
            elif c is None:
                if op != OP_RST:
                    self.send(OP_RST, dport, sport)
            elif op == OP_RESPONSE:
                c.state = "established"
                c.peer_alloc, c.peer_fwd = buf_alloc, fwd_cnt
                self.stats["responses"] += 1
            elif op == OP_CREDIT_UPDATE:
                c.peer_alloc, c.peer_fwd = buf_alloc, fwd_cnt
            elif op == OP_CREDIT_REQUEST:
                self.send(OP_CREDIT_UPDATE, dport, sport, c=c)
            elif op == OP_SHUTDOWN:
                c.peer_alloc, c.peer_fwd = buf_alloc, fwd_cnt
                self.close(c)
            elif op == OP_RST:
                del conns[key]
                self.stats["rst"] += 1
        self.rx.publish()
        return got

    def flush(self) -> None:
        while self.backlog:
            d = self._tx_slot()
            if d is None:
                break
            op, sport, dport, flags, c = self.backlog.popleft()
            self._send_now(d, op, sport, dport, flags, c)
        self.tx.publish()
        self.rx.publish()

    def shutdown(self) -> None:
        for r in (self.rx, self.tx, self.ev):
            r.release()
        self.fe.close()


# ------------------------------------------------------------------------------------------------
# the vring child and its CPU time


class Vring:
    def __init__(self, tmp: str, cpu: int, tx_buffer: int, queue_size: int, log_path: str):
        self.uds = os.path.join(tmp, "vm3.vsock")
        self.sock = os.path.join(tmp, "vh3.sock")
        cmd = ["taskset", "-c", str(cpu), sys.executable, "-m", "vring", "vsock", "--guest-cid", str(CID),
               "--uds-path", self.uds, "--socket", self.sock, "--tx-buffer-size", str(tx_buffer),
               "--queue-size", str(max(queue_size, 1024)), "--cpus", str(cpu)]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vring vsock did not start (see {log_path})")
            time.sleep(0.05)
        self.pid = self.proc.pid

    def cpu_ns(self) -> int:
        tot = 0
        for t in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{t}/schedstat") as f:
                    tot += int(f.read().split()[0])
            except OSError:
                pass
        return tot

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def foreign_cpu_ns(pids: set[int]) -> int:
    """CPU time of every process but ours (the machine is shared): /proc/stat total busy minus ours."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v) - v[3] - v[4]) * 10**9 // os.sysconf("SC_CLK_TCK")
    ours = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read().rsplit(")", 1)[1].split()
            ours += (int(s[11]) + int(s[12])) * 10**9 // os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return busy - ours


class Meter:
    """Wall time, vring CPU, this process's CPU and everybody else's over an interval."""

    def __init__(self, vr: Vring):
        self.vr = vr

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.v0 = self.vr.cpu_ns()
        self.p0 = time.process_time_ns()
        self.f0 = foreign_cpu_ns({os.getpid(), self.vr.pid})
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.vring_ns = self.vr.cpu_ns() - self.v0
        self.guest_ns = time.process_time_ns() - self.p0
        self.foreign_ns = foreign_cpu_ns({os.getpid(), self.vr.pid}) - self.f0

    def row(self) -> dict:
        return {"seconds": round(self.wall, 3), "vring_cpu": round(self.vring_ns / 1e9 / self.wall, 3),
                "guest_host_cpu": round(self.guest_ns / 1e9 / self.wall, 3),
                "foreign_cpu": round(max(0, self.foreign_ns) / 1e9 / self.wall, 3)}


# ------------------------------------------------------------------------------------------------
# host side helpers


def host_open(vr: Vring, g: Guest, n: int, gport: int) -> list[tuple[socket.socket, GConn]]:
    """n host -> guest connections to guest port gport (CONNECT / OK), established."""
    g.listen.add(gport)
    out = []
    pending: dict[socket.socket, bytes] = {}
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(vr.uds)
        s.sendall(b"CONNECT %d\n" % gport)
        s.setblocking(False)
        socks.append(s)
        pending[s] = b""
    deadline = time.monotonic() + 30
    while pending:
        g.poll()
        g.flush()
        for s in list(pending):
            try:
                b = s.recv(32)
            except BlockingIOError:
                continue
            pending[s] += b
            if pending[s].endswith(b"\n"):
                hport = int(pending.pop(s).split()[1])
                out.append((s, g.conns[(gport, hport)]))
        if time.monotonic() > deadline:
            raise TimeoutError("host CONNECTs not answered")
    return out


def guest_open(g: Guest, lst: socket.socket, n: int, hport: int) -> list[tuple[socket.socket, GConn]]:
    """n guest -> host connections to <uds>_<hport>, established; host side accepted."""
    cs = [g.connect(hport) for _ in range(n)]
    g.flush()
    acc = []
    deadline = time.monotonic() + 30
    while len(acc) < n or any(c.state != "established" for c in cs):
        g.poll()
        g.flush()
        try:
            s, _ = lst.accept()
            s.setblocking(False)
            acc.append(s)
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("guest connects not answered")
    return list(zip(acc, cs, strict=False))  # accept order = REQUEST order (one device thread connects in order)


def close_all(g: Guest, pairs: list[tuple[socket.socket, GConn]]) -> None:
    for s, _ in pairs:
        s.close()
    deadline = time.monotonic() + 20
    while g.conns and time.monotonic() < deadline:
        g.poll()
        for c in list(g.conns.values()):
            if c.state == "established":
                g.close(c)
        g.flush()
        time.sleep(0.0005)
    if g.conns:
        print(f"  warning: {len(g.conns)} guest connections still open", file=sys.stderr)
        g.conns.clear()


# ------------------------------------------------------------------------------------------------
# the measurements


def stream_h2g(vr: Vring, g: Guest, n: int, wsize: int, seconds: float, warm: float) -> dict:
    """n host -> guest streams; the host writes wsize chunks, the guest consumes at once."""
    pairs = host_open(vr, g, n, 1234)
    chunk = memoryview(bytes(range(256)) * (wsize // 256))
    sel = selectors.DefaultSelector()
    for s, _c in pairs:
        sel.register(s, selectors.EVENT_WRITE)
    got = 0
    t_end_warm = time.monotonic() + warm
    meter = None
    m_got = 0
    rx_pkts = 0
    while True:
        now = time.monotonic()
        if meter is None and now >= t_end_warm:
            meter = Meter(vr).__enter__()
            m_got = got
            rx0 = rx_pkts
            t_end = now + seconds
        if meter is not None and now >= t_end:
            break
        for key, _ in sel.select(0):
            try:
                key.fileobj.send(chunk)
            except BlockingIOError:
                pass
        got += g.poll()
        rx_pkts = g.rx.reaped
        g.flush()
    meter.__exit__()
    sel.close()
    close_all(g, pairs)
    byts = got - m_got
    pk = rx_pkts - rx0
    return {"dir": "h2g", "conns": n, "write": wsize, "bytes": byts, "packets": pk,
            "MBps": round(byts / meter.wall / 1e6, 1), "pkt_payload_avg": round(byts / max(pk, 1)),
            "vring_us_per_pkt": round(meter.vring_ns / 1e3 / max(pk, 1), 2),
            "vring_ms_per_GB": round(meter.vring_ns / 1e6 / max(byts / 1e9, 1e-9), 1), **meter.row()}


def stream_g2h(vr: Vring, g: Guest, lst: socket.socket, n: int, wsize: int, seconds: float, warm: float) -> dict:
    """n guest -> host streams; the guest writes wsize (packets <= 64 KiB, within credit), the host reads."""
    pairs = guest_open(g, lst, n, 5000)
    sel = selectors.DefaultSelector()
    for s, _c in pairs:
        sel.register(s, selectors.EVENT_READ)
    buf = bytearray(1 << 20)
    conns = [c for _s, c in pairs]
    left = {id(c): wsize for c in conns}  # bytes left of the current application write
    got = 0
    pkts = 0
    meter = None
    t_end_warm = time.monotonic() + warm
    while True:
        now = time.monotonic()
        if meter is None and now >= t_end_warm:
            meter = Meter(vr).__enter__()
            m_got, m_pkts = got, pkts
            t_end = now + seconds
        if meter is not None and now >= t_end:
            break
        g.poll()
        for c in conns:
            for _ in range(8):
                k = g.write(c, left[id(c)])
                if not k:
                    break
                pkts += 1
                left[id(c)] -= k
                if left[id(c)] == 0:
                    left[id(c)] = wsize
        g.flush()
        for key, _ in sel.select(0):
            s = key.fileobj
            for _ in range(4):
                try:
                    r = s.recv_into(buf)
                except BlockingIOError:
                    break
                got += r
                if r < len(buf):
                    break
    meter.__exit__()
    sel.close()
    close_all(g, pairs)
    byts, pk = got - m_got, pkts - m_pkts
    return {"dir": "g2h", "conns": n, "write": wsize, "bytes": byts, "packets": pk,
            "MBps": round(byts / meter.wall / 1e6, 1), "pkt_payload_avg": round(byts / max(pk, 1)),
            "vring_us_per_pkt": round(meter.vring_ns / 1e3 / max(pk, 1), 2),
            "vring_ms_per_GB": round(meter.vring_ns / 1e6 / max(byts / 1e9, 1e-9), 1), **meter.row()}


def setup_h2g(vr: Vring, g: Guest, inflight: int, seconds: float, warm: float) -> dict:
    """Connection cycles host -> guest: connect, CONNECT, OK, host close, guest SHUTDOWN, RST."""
    g.listen.add(4321)
    sel = selectors.DefaultSelector()
    live = 0
    done = 0
    meter = None
    t_end_warm = time.monotonic() + warm
    line = b"CONNECT 4321\n"
    while True:
        now = time.monotonic()
        if meter is None and now >= t_end_warm:
            meter = Meter(vr).__enter__()
            m_done = done
            t_end = now + seconds
        if meter is not None and now >= t_end:
            break
        while live < inflight:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.connect(vr.uds)
                s.send(line)
            except (BlockingIOError, InterruptedError):
                s.close()
                break
            sel.register(s, selectors.EVENT_READ)
            live += 1
        g.poll()
        g.flush()
        for key, _ in sel.select(0):
            s = key.fileobj
            try:
                b = s.recv(32)
            except BlockingIOError:
                continue
            if b.startswith(b"OK"):
                done += 1
            sel.unregister(s)
            s.close()
            live -= 1
    meter.__exit__()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    close_all(g, [])
    n = done - m_done
    return {"kind": "setup_h2g", "inflight": inflight, "connections": n, "conn_per_s": round(n / meter.wall),
            "vring_us_per_conn": round(meter.vring_ns / 1e3 / max(n, 1), 1), **meter.row()}


def setup_g2h(vr: Vring, g: Guest, lst: socket.socket, inflight: int, seconds: float, warm: float) -> dict:
    """Connection cycles guest -> host: REQUEST, host accept, RESPONSE, guest SHUTDOWN, RST, host EOF."""
    sel = selectors.DefaultSelector()
    sel.register(lst, selectors.EVENT_READ)
    meter = None
    t_end_warm = time.monotonic() + warm
    resp0 = g.stats["responses"]
    open_: list[GConn] = []
    while True:
        now = time.monotonic()
        if meter is None and now >= t_end_warm:
            meter = Meter(vr).__enter__()
            m_done = g.stats["responses"]
            t_end = now + seconds
        if meter is not None and now >= t_end:
            break
        while len(open_) < inflight and len(g.conns) < inflight * 2 + 8:
            open_.append(g.connect(6000))
        g.flush()
        g.poll()
        keep = []
        for c in open_:
            if c.state == "established":
                g.close(c)
            elif (c.gport, c.hport) in g.conns:
                keep.append(c)
        open_ = keep
        g.flush()
        for key, _ in sel.select(0):
            s = key.fileobj
            if s is lst:
                for _ in range(64):
                    try:
                        a, _ = lst.accept()
                    except BlockingIOError:
                        break
                    a.setblocking(False)
                    sel.register(a, selectors.EVENT_READ)
            else:
                try:
                    b = s.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    b = b""
                if not b:
                    sel.unregister(s)
                    s.close()
    meter.__exit__()
    n = g.stats["responses"] - m_done
    del resp0
    for key in list(sel.get_map().values()):
        if key.fileobj is not lst:
            key.fileobj.close()
    sel.close()
    close_all(g, [])
    return {"kind": "setup_g2h", "inflight": inflight, "connections": n, "conn_per_s": round(n / meter.wall),
            "vring_us_per_conn": round(meter.vring_ns / 1e3 / max(n, 1), 1), **meter.row()}


# ------------------------------------------------------------------------------------------------


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axs[0]
    for d, mk in (("h2g", "o-"), ("g2h", "s--")):
        for txb in sorted({r["tx_buffer"] for r in res["streams"]}):
            rows = [r for r in res["streams"] if r["dir"] == d and r["tx_buffer"] == txb and r["conns"] == 1
                    and r["rx_buf"] == res["config"]["rx_buf"]]
            if not rows:
                continue
            by = collections.defaultdict(list)
            for r in rows:
                by[r["write"]].append(r["MBps"])
            xs = sorted(by)
            med = [sorted(by[x])[len(by[x]) // 2] for x in xs]
            lo = [min(by[x]) for x in xs]
            hi = [max(by[x]) for x in xs]
            ax.errorbar([x // KIB for x in xs], med, yerr=[[m - a for m, a in zip(med, lo, strict=True)],
                                                           [b - m for m, b in zip(med, hi, strict=True)]],
                        fmt=mk, capsize=3, label=f"{d}, tx-buffer {txb // KIB} KiB")
    ax.axhline(1000, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("write size (KiB)")
    ax.set_ylabel("MB/s (one stream)")
    ax.set_title("stream throughput, 1 connection")
    ax.legend(fontsize=7)
    ax = axs[1]
    for d, mk in (("h2g", "o-"), ("g2h", "s--")):
        rows = [r for r in res["multi"] if r["dir"] == d]
        if rows:
            ax.plot([r["conns"] for r in rows], [r["vring_us_per_pkt"] for r in rows], mk, label=f"{d} µs/packet")
            ax.plot([r["conns"] for r in rows], [r["MBps"] / 100 for r in rows], mk, alpha=0.4,
                    label=f"{d} aggregate MB/s ÷ 100")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams (64 KiB writes)")
    ax.set_title("per-packet vring CPU vs connections")
    ax.legend(fontsize=7)
    ax = axs[2]
    for kind, mk in (("setup_h2g", "o-"), ("setup_g2h", "s--")):
        rows = [r for r in res["setup"] if r["kind"] == kind]
        if rows:
            ax.plot([r["inflight"] for r in rows], [r["vring_us_per_conn"] for r in rows], mk,
                    label=f"{kind} vring µs/conn")
            ax.plot([r["inflight"] for r in rows], [r["conn_per_s"] / 100 for r in rows], mk, alpha=0.4,
                    label=f"{kind} conn/s ÷ 100")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("connections in flight")
    ax.set_title("connection setup + teardown")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a < 1 minute subset")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per point")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--writes", default=None, help="write sizes in KiB (comma list)")
    ap.add_argument("--conns", default=None, help="concurrency levels (comma list)")
    ap.add_argument("--tx-buffers", default=None, help="vring --tx-buffer-size values in KiB (comma list)")
    ap.add_argument("--rx-buf", type=int, default=HDR_LEN + MAX_PKT, help="guest receive buffer bytes")
    ap.add_argument("--guest-buf-alloc", type=int, default=256 * KIB)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--be-cpu", type=int, default=1)
    ap.add_argument("--fe-cpu", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="py-spy vring during 64 KiB streams (both ways)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    q = a.quick
    seconds = a.seconds or (1.0 if q else 2.5)
    reps = a.reps or (1 if q else 3)
    writes = [int(x) * KIB for x in (a.writes or ("4,64,256" if q else "4,16,64,256")).split(",")]
    conns = [int(x) for x in (a.conns or ("1,64,256" if q else "1,16,64,256")).split(",")]
    txbufs = [int(x) * KIB for x in (a.tx_buffers or ("256" if q else "64,256")).split(",")]
    warm = 0.3
    os.makedirs(a.out, exist_ok=True)
    os.sched_setaffinity(0, {a.fe_cpu})
    tmp = tempfile.mkdtemp(prefix="vsb")
    log_path = os.path.join(a.out, "vsock_vring.log")
    open(log_path, "wb").close()
    res = {"config": {"quick": q, "seconds": seconds, "reps": reps, "rx_buf": a.rx_buf,
                      "guest_buf_alloc": a.guest_buf_alloc, "queue_size": a.queue_size, "be_cpu": a.be_cpu,
                      "fe_cpu": a.fe_cpu, "tx_buffers": txbufs, "host": os.uname().nodename,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
           "streams": [], "multi": [], "setup": [], "profile": {}}
    t_start = time.monotonic()

    def show(r):
        keys = [k for k in ("dir", "kind", "conns", "inflight", "write", "tx_buffer", "rx_buf", "MBps", "conn_per_s",
                            "pkt_payload_avg", "vring_us_per_pkt", "vring_us_per_conn", "vring_ms_per_GB",
                            "vring_cpu", "guest_host_cpu", "foreign_cpu") if k in r]
        print("  " + " ".join(f"{k}={r[k]}" for k in keys), flush=True)

    try:
        for ti, txb in enumerate(txbufs):
            vr = Vring(tmp, a.be_cpu, txb, a.queue_size, log_path)
            g = Guest(vr.sock, a.queue_size, a.rx_buf, a.guest_buf_alloc)
            lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lst.bind(vr.uds + "_5000")
            lst.listen(4096)
            lst.setblocking(False)
            lst6 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lst6.bind(vr.uds + "_6000")
            lst6.listen(4096)
            lst6.setblocking(False)
            try:
                print(f"vring vsock --tx-buffer-size {txb} (pid {vr.pid}, cpu {a.be_cpu}); guest+host cpu {a.fe_cpu}",
                      flush=True)
                # one stream, each write size, both directions; reps interleaved
                for rep in range(reps):
                    for w in writes:
                        for d in ("h2g", "g2h"):
                            r = (stream_h2g(vr, g, 1, w, seconds, warm) if d == "h2g"
                                 else stream_g2h(vr, g, lst, 1, w, seconds, warm))
                            r.update(tx_buffer=txb, rx_buf=a.rx_buf, rep=rep)
                            res["streams"].append(r)
                            show(r)
                if ti == len(txbufs) - 1:
                    if not q:  # Linux-sized receive buffers (4 KiB payload), host -> guest
                        g.rx_len = HDR_LEN + 4096
                        for rep in range(reps):
                            r = stream_h2g(vr, g, 1, 64 * KIB, seconds, 1.0)
                            r.update(tx_buffer=txb, rx_buf=g.rx_len, rep=rep)
                            res["streams"].append(r)
                            show(r)
                        g.rx_len = a.rx_buf
                        stream_h2g(vr, g, 1, 64 * KIB, 0.2, 1.0)  # big buffers back in the ring
                    for n in conns:
                        for d in ("h2g", "g2h"):
                            r = (stream_h2g(vr, g, n, 64 * KIB, seconds, warm) if d == "h2g"
                                 else stream_g2h(vr, g, lst, n, 64 * KIB, seconds, warm))
                            r.update(tx_buffer=txb, rx_buf=a.rx_buf)
                            res["multi"].append(r)
                            show(r)
                    for n in conns:
                        for kind in ("setup_h2g", "setup_g2h"):
                            r = (setup_h2g(vr, g, n, seconds, warm) if kind == "setup_h2g"
                                 else setup_g2h(vr, g, lst6, n, seconds, warm))
                            r.update(tx_buffer=txb)
                            res["setup"].append(r)
                            show(r)
                    if a.profile and shutil.which("py-spy", path=os.path.dirname(sys.executable) + ":" +
                                                  os.environ.get("PATH", "")):
                        res["profile"] = profile(vr, g, lst, a.out)
            finally:
                g.shutdown()
                lst.close()
                lst6.close()
                for p in (vr.uds + "_5000", vr.uds + "_6000"):
                    if os.path.exists(p):
                        os.unlink(p)
                vr.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["config"]["wall_s"] = round(time.monotonic() - t_start, 1)
    with open(os.path.join(a.out, "vsock.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.join(a.out, "vsock_throughput.png"))
    print(f"wrote {a.out}/vsock.json and vsock_throughput.png in {res['config']['wall_s']} s")
    return 0


def profile(vr: Vring, g: Guest, lst: socket.socket, out: str) -> dict:
    """py-spy (native frames off, 'raw' collapsed stacks) of vring during a 64 KiB stream each way:
    self time per function, top 15."""
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", ""))
    summary = {}
    for d in ("h2g", "g2h"):
        raw = os.path.join(out, f"vsock_profile_{d}.txt")
        p = subprocess.Popen([spy, "record", "-p", str(vr.pid), "-d", "4", "-r", "250", "-f", "raw", "-o", raw,
                              "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        r = (stream_h2g(vr, g, 1, 64 * KIB, 3.0, 0.2) if d == "h2g" else stream_g2h(vr, g, lst, 1, 64 * KIB, 3.0, 0.2))
        p.wait(30)
        selfc: collections.Counter = collections.Counter()
        incl: collections.Counter = collections.Counter()
        lines: collections.Counter = collections.Counter()
        total = 0
        with open(raw) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                frames = stack.split(";")
                if not any("vsock_loop" in fr for fr in frames):
                    continue  # the control-plane thread
                total += int(n)
                names = [fr.split(" (")[0] for fr in frames]
                selfc[names[-1]] += int(n)
                lines[frames[-1]] += int(n)
                for nm in set(names):
                    incl[nm] += int(n)
        busy = total / (250 * 4)
        top = lambda c: [(k, round(100 * v / max(total, 1), 1)) for k, v in c.most_common(15)]  # noqa: E731
        summary[d] = {"MBps": r["MBps"], "samples": total, "busy_share": round(busy, 2), "self_top": top(selfc),
                      "inclusive_top": top(incl), "lines_top": top(lines)}
        print(f"  profile {d}: {r['MBps']} MB/s, {total} samples (data-plane thread on-CPU ~{busy:.0%})")
        for title, key in (("self", "self_top"), ("inclusive", "inclusive_top"), ("lines", "lines_top")):
            print(f"   {title}:")
            for fr, pct in summary[d][key][:12]:
                print(f"    {pct:5.1f}%  {fr}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
