"""Live-migration support against ``vring net`` / ``vring switch`` over a real socket, with the
in-tree front-end: the dirty log (SET_LOG_BASE + VHOST_F_LOG_ALL) gets exactly the pages vring
wrote (RX buffers, used rings) and nothing while logging is off; hostile logs are refused
without leaking fds or mappings; SEND_RARP puts a RARP frame where the port's frames go."""
from __future__ import annotations

import mmap
import os
import time

import numpy as np
from test_hostile_protocol import fds_and_maps
from test_net import check, connect, frame, pump, start

from vring import protocol as P
from vring.frontend import GPA_BASE, NET_HDR, Frontend
from vring.protocol import PF, F, Req

PAGE = 4096
FEATURES = Frontend.DEFAULT_FEATURES
PROTOCOL = Frontend.DEFAULT_PROTOCOL | PF.LOG_SHMFD | PF.RARP
MAC = bytes.fromhex("525400123456")


def new_log(fe: Frontend) -> tuple[int, mmap.mmap, int]:
    """A memfd dirty log covering fe's guest memory: (fd, map, size)."""
    size = ((fe.gpa(fe.mem_size) // PAGE) + 7) // 8
    fd = os.memfd_create("vring-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED), size


def dirty_pages(mm: mmap.mmap) -> set[int]:
    bits = np.unpackbits(np.frombuffer(mm, np.uint8), bitorder="little")
    return {int(p) for p in np.flatnonzero(bits)}


def set_logging(fe: Frontend, on: bool) -> None:
    """What QEMU does when migration starts/ends: LOG_ALL in the features, F_LOG + used-ring GPA per ring."""
    fe._set(Req.SET_FEATURES, P.u64(fe.features | (F.LOG_ALL if on else 0)))
    for r in fe.rings:
        fe._set(Req.SET_VRING_ADDR, P.record(
            P.VRING_ADDR, index=r.index, flags=P.VRING_F_LOG if on else 0, desc=fe.uaddr + r.desc_off,
            used=fe.uaddr + r.used_off, avail=fe.uaddr + r.avail_off, log=fe.gpa(r.used_off) if on else 0))


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def test_dirty_log_has_exactly_the_pages_vring_wrote(vring_proc, sockdir):
    v, (a,) = start(vring_proc, sockdir, "--mode", "loopback")
    fe = Frontend(a, features=FEATURES, protocol_features=PROTOCOL)
    fe.connect()
    fe.setup()
    assert fe.protocol_features & PF.LOG_SHMFD
    assert fe.u64(Req.GET_FEATURES) & F.LOG_ALL
    fd, mm, size = new_log(fe)
    assert np.frombuffer(fe.call(Req.SET_LOG_BASE, P.record(P.LOG, size=size, offset=0), (fd,)), "<u8")[0] == 0
    os.close(fd)  # vring holds its own mapping
    fe.post_rx()
    rx, tx = fe.rx(), fe.tx()

    # logging off (no LOG_ALL yet): traffic sets no bit
    assert pump(fe, fe, 200) == list(range(200))
    assert dirty_pages(mm) == set()

    # logging on: every RX buffer written (header + frame) and both used rings, nothing else
    set_logging(fe, True)
    rx.take_used()
    expect = pages(fe.gpa(rx.used_off), 6 + 8 * rx.size) | pages(fe.gpa(tx.used_off), 6 + 8 * tx.size)
    sent = 0
    got = []
    while len(got) < 300:
        if sent < 300 and rx.size - (sent - len(got)) >= 32:  # no more in flight than RX buffers
            sent += fe.send_frames([frame(s, 100 + s) for s in range(sent, min(300, sent + 32))])
        for head, ln in rx.take_used():
            got.append(check(rx.buf(head)[NET_HDR:ln].tobytes()))
            assert ln == NET_HDR + 100 + got[-1]
            expect |= pages(rx.buf_gpa(head), ln)
            rx.add_buffer(writable=True)
        rx.publish()
        tx.take_used()
    assert got == list(range(300))
    seen = dirty_pages(mm)
    assert seen == expect, (sorted(seen - expect)[:10], sorted(expect - seen)[:10])

    # logging off again: the bitmap stays clear
    set_logging(fe, False)
    mm[:] = bytes(size)
    assert pump(fe, fe, 200) == list(range(200))
    assert dirty_pages(mm) == set()
    fe.close()
    mm.close()
    assert v.stop() == 0
    assert "Traceback" not in v.log_text()


def test_hostile_log_base_refused_without_leaks(vring_proc, sockdir):
    v, (a, b) = start(vring_proc, sockdir, "--mode", "loopback", sockets=("a", "b"))
    good = connect(b)
    base = fds_and_maps(v.proc.pid)

    def memfd(n: int) -> int:
        fd = os.memfd_create("hostile-log", os.MFD_CLOEXEC)
        os.ftruncate(fd, n)
        return fd

    def attempt(size: int, offset: int, fd: int | None) -> bytes | None:
        fe = Frontend(a, features=FEATURES, protocol_features=PROTOCOL)
        fe.connect()
        fe.setup()
        try:
            fe.send(Req.SET_LOG_BASE, P.record(P.LOG, size=size, offset=offset), () if fd is None else (fd,))
            fe.sock.settimeout(10)
            try:
                return fe.recv()[2]
            except ConnectionError:
                return None  # refused: a reply-expecting request that failed closes the connection
        finally:
            if fd is not None:
                os.close(fd)
            fe.close()

    need = ((GPA_BASE + (64 << 20)) // PAGE + 7) // 8  # covers the front-end's memory
    cases = {
        "short fd": (need, 0, memfd(need // 2)),
        "offset past the end": (need, 1 << 40, memfd(need)),
        "huge size": (1 << 62, 0, memfd(need)),
        "size + offset wraps": ((1 << 64) - 4096, 8192, memfd(need)),
        "not a file": (need, 0, os.eventfd(0, os.EFD_CLOEXEC)),
        "log too small for memory": (16, 0, memfd(16)),
        "no fd": (need, 0, None),
    }
    for name, (size, offset, fd) in cases.items():
        assert attempt(size, offset, fd) is None, name
        deadline = time.monotonic() + 10
        while fds_and_maps(v.proc.pid) != base and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fds_and_maps(v.proc.pid) == base, (name, v.log_text()[-2000:])
    # a good log replaced by another one, then the front-end leaves: both unmapped, nothing kept
    fe = Frontend(a, features=FEATURES, protocol_features=PROTOCOL)
    fe.connect()
    fe.setup()
    for _ in range(2):
        fd, mm, size = new_log(fe)
        assert fe.call(Req.SET_LOG_BASE, P.record(P.LOG, size=size, offset=0), (fd,)) == bytes(8)
        os.close(fd)
        mm.close()
    fe.close()
    deadline = time.monotonic() + 10
    while fds_and_maps(v.proc.pid) != base and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fds_and_maps(v.proc.pid) == base, v.log_text()[-2000:]
    assert pump(good, good, 100) == list(range(100))  # the other port never noticed
    good.close()
    assert v.stop() == 0
    assert "Traceback" not in v.log_text()


def rarp_check(f: bytes) -> None:
    assert f[:6] == b"\xff" * 6 and f[6:12] == MAC and f[12:14] == b"\x80\x35", f[:14].hex()
    assert f[20:22] == b"\x00\x03" and f[22:28] == MAC  # reverse request, sender = the guest


def recv_some(fe: Frontend, n: int = 1) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(out) < n and time.monotonic() < deadline:
        out += fe.recv_frames()
        time.sleep(0.005)
    return out


def test_send_rarp_xconnect(vring_proc, sockdir):
    v, (a, b) = start(vring_proc, sockdir, sockets=("a", "b"))
    fa = connect(a, features=FEATURES, protocol_features=PROTOCOL)
    fb = connect(b)
    fa._set(Req.SEND_RARP, MAC + bytes(2))
    (f,) = recv_some(fb)
    rarp_check(f)
    fa.close()
    fb.close()
    assert v.stop() == 0
    assert "announced 52:54:00:12:34:56" in v.log_text()


def test_send_rarp_switch_learns_and_floods(vring_proc, sockdir):
    paths = [os.path.join(sockdir, f"{s}.sock") for s in "abc"]
    v = vring_proc("switch", *[a for p in paths for a in ("--socket", p)])
    v.wait_log("port=2 listening", 60)
    fa, fb, fc = (connect(p, features=FEATURES, protocol_features=PROTOCOL) for p in paths)
    fa._set(Req.SEND_RARP, MAC + bytes(2))
    for fe in (fb, fc):  # flooded to every other port
        (f,) = recv_some(fe)
        rarp_check(f)
    # learned on port a: a unicast frame to the MAC from c goes to a only
    uni = MAC + bytes.fromhex("020000000003") + b"\x88\xb5" + bytes(50)
    fc.send_frames([uni])
    (f,) = recv_some(fa)
    assert f == uni
    for fe in (fa, fb, fc):
        fe.close()
    assert v.stop() == 0
    counters = v.port_counters()
    assert counters[1]["rx_packets"] == 1 and counters[2]["rx_packets"] == 1 and counters[0]["rx_packets"] == 1


def test_packed_ring_writes_are_logged_at_page_granularity():
    """Packed rings (the in-tree front-end drives split rings only): a scripted driver posts RX
    buffers, the net kernels deliver frames into them, and the log gets exactly the buffer pages
    and the descriptor-ring pages whose descriptors were written back (the ring straddles a page)."""
    from devices.capture import empty as no_capture
    from devices.net import inject
    from vring.layout import COUNTER_NAMES, DESC_F_WRITE, PACKED_DESC, PACKED_DESC_F_AVAIL, new_qstate
    from vring.memory import MAX_REGIONS, GuestMemory

    gpa, size = 0x2_0000_0000, 8
    desc_off = PAGE - 2 * 16  # descriptors 0-1 on page 0, 2-7 on page 1
    fd = os.memfd_create("packed-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    mm = mmap.mmap(fd, 1 << 20, flags=mmap.MAP_SHARED)
    regions = np.zeros((1, MAX_REGIONS, 4), np.uint64)
    gm = GuestMemory(regions[0])
    r = gm.add(gpa, 1 << 20, 0x7F00_0000_0000, 0, os.dup(fd))
    os.close(fd)
    ring = np.frombuffer(mm, PACKED_DESC, size, desc_off)
    for i in range(size):  # buffer i on its own page 16 + i, all available (driver wrap 1)
        ring[i]["addr"], ring[i]["len"], ring[i]["id"] = gpa + (16 + i) * PAGE, 2048, i
        ring[i]["flags"] = DESC_F_WRITE | PACKED_DESC_F_AVAIL
    qs = new_qstate(1)
    q = qs[0]
    q["size"], q["ready"], q["packed"], q["hdr_len"], q["mrg_rxbuf"] = size, 1, 1, NET_HDR, 1
    q["desc"], q["avail"], q["used"] = r.hva + desc_off, r.hva + 0x3000, r.hva + 0x3004
    q["avail_wrap"] = q["used_wrap"] = 1
    log = np.zeros((gpa >> 15) + 64, np.uint8)  # a bit per page up to the region's end and beyond
    q["log_base"], q["log_size"], q["log_ring"] = log.ctypes.data, len(log), 1
    q["log_used"], q["log_desc"] = gpa + 0x3004, gpa + desc_off
    counters = np.zeros((1, len(COUNTER_NAMES)), np.uint64)
    frame = np.arange(60, dtype=np.uint8)
    base_page = gpa // PAGE

    def dirty() -> set[int]:
        return {int(p) - base_page for p in np.flatnonzero(np.unpackbits(log, bitorder="little"))}

    assert inject(qs, counters, regions, 0, frame, no_capture()) == 1
    assert dirty() == {0, 16} and int(q["log_miss"]) == 0  # descriptor 0 written back, buffer 0 filled
    assert bytes(mm[16 * PAGE + NET_HDR:16 * PAGE + NET_HDR + 60]) == frame.tobytes()
    log[:] = 0
    for _ in range(3):
        assert inject(qs, counters, regions, 0, frame, no_capture()) == 1
    assert dirty() == {0, 1, 17, 18, 19}  # descriptors 1 (page 0) and 2-3 (page 1)
    log[:] = 0
    q["log_size"] = 8  # a log too small for this memory: nothing written past it, the misses counted
    assert inject(qs, counters, regions, 0, frame, no_capture()) == 1
    assert not log.any() and int(q["log_miss"]) > 0
    q["log_base"], q["log_miss"] = 0, 0  # logging off: nothing marked
    assert inject(qs, counters, regions, 0, frame, no_capture()) == 1
    assert not log.any() and int(q["log_miss"]) == 0
    ring = None
    gm.clear()
    mm.close()
