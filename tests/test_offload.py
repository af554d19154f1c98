"""devices.offload: checksum completion and TCP segmentation against a pure-Python reference, and
hostile virtio_net_hdr / frame headers. The hostile cases run again under NUMBA_BOUNDSCHECK=1 in a
fresh process with a fresh cache (as tests/test_split.py does for the ring kernels)."""
from __future__ import annotations

import os
import random
import struct
import time

import dpkt
import numpy as np
import pytest
from boundscheck import check_boundscheck_on, run_under_boundscheck
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.offload import (
    BAD_CSUM_RANGE,
    BAD_GSO_SIZE,
    BAD_GSO_TYPE,
    BAD_L3,
    BAD_L4,
    BAD_TOO_BIG,
    FRAME_MAX,
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    MAX_GSO_SEGS,
    OFF_CSUM,
    OFF_ECN,
    OFF_TSO4,
    OFF_TSO6,
    complete_csum,
    gso_plan,
    make_segment,
    needs,
)
from vring.frontend import Frontend
from vring.protocol import F

COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAC = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"


# ------------------------------------------------------------------ the reference
def ref_sum(data: bytes, acc: int = 0) -> int:
    """RFC 1071 ones'-complement sum, folded to 16 bits (not inverted)."""
    if len(data) % 2:
        data += b"\0"
    for (w,) in struct.iter_unpack("!H", data):
        acc += w
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


def pseudo(ip, tcp_len: int) -> bytes:
    if isinstance(ip, dpkt.ip6.IP6):
        return ip.src + ip.dst + struct.pack("!IxxxB", tcp_len, 6)
    return ip.src + ip.dst + struct.pack("!xBH", 6, tcp_len)


def tcp_frame(payload: bytes, v6: bool, flags: int, seq: int, vlan: bool = False, ip_id: int = 7,
              opts: bytes = b"") -> bytes:
    """An Ethernet/IP/TCP super-frame as a driver sends it for TSO: IP lengths for the whole
    payload, the TCP checksum field holding only the pseudo-header sum (as Linux leaves it)."""
    tcp = dpkt.tcp.TCP(sport=40000, dport=5001, seq=seq, ack=1234, flags=flags, win=500, opts=opts, data=payload)
    tcp.off = (20 + len(opts)) // 4
    if v6:
        ip = dpkt.ip6.IP6(src=bytes(range(16)), dst=bytes(range(16, 32)), nxt=6, hlim=64, data=tcp)
        ip.plen = len(bytes(tcp))
        et = 0x86DD
    else:
        ip = dpkt.ip.IP(src=b"\x0a\x00\x00\x01", dst=b"\x0a\x00\x00\x02", p=6, id=ip_id, ttl=64, data=tcp)
        ip.len = min(20 + len(bytes(tcp)), 0xFFFF)
        et = 0x0800
    raw = bytearray(bytes(ip))
    l4 = 40 if v6 else 20
    struct.pack_into("!H", raw, l4 + 16, ref_sum(pseudo(ip, len(raw) - l4)))
    head = MAC + (b"\x81\x00\x00\x05" if vlan else b"") + struct.pack("!H", et)
    return head + bytes(raw)


def segment_all(frame: bytes, gso_type: int, mss: int):
    buf = np.zeros(FRAME_MAX, np.uint8)
    buf[: len(frame)] = np.frombuffer(frame, np.uint8)
    out = np.zeros(FRAME_MAX, np.uint8)
    nseg, l3, l4, hdrs, v6 = gso_plan(buf, len(frame), gso_type, mss, out.shape[0])
    if nseg < 0:
        return nseg, []
    segs = []
    for i in range(nseg):
        n = make_segment(buf, len(frame), l3, l4, hdrs, v6, mss, i, nseg, out)
        segs.append(out[:n].tobytes())
    assert buf[: len(frame)].tobytes() == frame  # the super-frame is only read
    return nseg, segs


def check_segments(frame: bytes, segs: list[bytes], mss: int, vlan: bool):
    """Every segment valid (lengths, checksums, sequence, flags); payloads reassemble the original."""
    l2 = 18 if vlan else 14
    orig = dpkt.ethernet.Ethernet(frame[:12] + frame[l2 - 2:])
    oip, otcp = orig.data, orig.data.data
    v6 = isinstance(oip, dpkt.ip6.IP6)
    payload = b""
    for i, s in enumerate(segs):
        assert s[:l2] == frame[:l2]  # L2 header (and VLAN tag) copied
        ip_raw = s[l2:]
        if v6:
            ip = dpkt.ip6.IP6(ip_raw)
            assert ip.plen == len(ip_raw) - 40
            ihl = 40
        else:
            ip = dpkt.ip.IP(ip_raw)
            ihl = ip.hl * 4
            assert ip.len == len(ip_raw)
            assert ip.id == (oip.id + i) & 0xFFFF
            assert ref_sum(ip_raw[:ihl]) == 0xFFFF, f"segment {i}: bad IPv4 header checksum"
        tcp_raw = ip_raw[ihl:]
        assert ref_sum(tcp_raw, ref_sum(pseudo(ip, len(tcp_raw)))) == 0xFFFF, f"segment {i}: bad TCP checksum"
        tcp = dpkt.tcp.TCP(tcp_raw)
        assert tcp.seq == (otcp.seq + i * mss) & 0xFFFFFFFF
        assert tcp.opts == otcp.opts and tcp.ack == otcp.ack and tcp.win == otcp.win
        last, first = i == len(segs) - 1, i == 0
        want = otcp.flags
        if not last:
            want &= ~(dpkt.tcp.TH_FIN | dpkt.tcp.TH_PUSH)
        if not first:
            want &= ~dpkt.tcp.TH_CWR
        assert tcp.flags == want, (i, tcp.flags, want)
        assert len(tcp.data) == mss or (last and 0 < len(tcp.data) <= mss) or len(segs) == 1
        payload += tcp.data
    assert payload == otcp.data


# ------------------------------------------------------------------ checksums
@settings(max_examples=300, **COMMON)
@given(st.binary(min_size=1, max_size=3000), st.data())
def test_complete_csum_matches_reference(data, d):
    flen = len(data)
    start = d.draw(st.integers(0, flen - 1))
    if flen - start < 2:
        return
    offset = d.draw(st.integers(0, flen - start - 2))
    buf = np.zeros(flen + 8, np.uint8)
    buf[:flen] = np.frombuffer(data, np.uint8)
    assert complete_csum(buf, flen, start, offset) == 0
    got = bytes(buf[:flen])
    # the reference: field left as the driver wrote it (the partial sum), summed from start, inverted
    c = 0xFFFF - ref_sum(data[start:])
    if c == 0 and offset == 6:
        c = 0xFFFF
    want = bytearray(data)
    struct.pack_into("!H", want, start + offset, c)
    assert got == bytes(want)
    assert bytes(buf[flen:]) == bytes(8)  # nothing written past the frame


@pytest.mark.parametrize("v6", [False, True])
def test_complete_csum_gives_the_real_tcp_checksum(v6):
    payload = random.Random(1).randbytes(1000)
    f = tcp_frame(payload, v6, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, 99)
    buf = np.frombuffer(f, np.uint8).copy()
    l4 = 14 + (40 if v6 else 20)
    assert complete_csum(buf, len(f), l4, 16) == 0
    ip = dpkt.ethernet.Ethernet(buf.tobytes()).data
    tcp_raw = bytes(buf[l4:])
    assert ref_sum(tcp_raw, ref_sum(pseudo(ip, len(tcp_raw)))) == 0xFFFF


def test_complete_csum_hostile_ranges_touch_nothing():
    buf = np.arange(64, dtype=np.uint8)
    before = buf.copy()
    for flen, start, off in [(64, 64, 0), (64, 63, 0), (64, 62, 1), (64, 0, 63), (64, 0xFFFF, 0xFFFF),
                             (64, 10, 0xFFFF), (65, 0, 0), (0, 0, 0), (1 << 40, 0, 0)]:
        assert complete_csum(buf, flen, start, off) == -BAD_CSUM_RANGE, (flen, start, off)
    assert (buf == before).all()
    assert complete_csum(buf, 64, 62, 0) == 0  # the last two bytes: the smallest valid case


def test_needs():
    assert needs(0, 0) == 0 and needs(2, 0) == 0  # DATA_VALID alone asks for nothing
    assert needs(1, 0) == OFF_CSUM
    assert needs(1, GSO_TCPV4) == OFF_CSUM | OFF_TSO4
    assert needs(1, GSO_TCPV6 | GSO_ECN) == OFF_CSUM | OFF_TSO6 | OFF_ECN
    assert needs(1, GSO_UDP) & 0x100 and needs(0, 9) & 0x100  # never passed as-is


# ------------------------------------------------------------------ segmentation
@settings(max_examples=150, **COMMON)
@given(st.integers(0, 20000), st.integers(1, 3000), st.booleans(), st.booleans(), st.integers(0, 0xFF),
       st.integers(0, 0xFFFFFFFF), st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]), st.randoms())
def test_segmentation_matches_reference(plen, mss, v6, vlan, flags, seq, opts, rnd):
    payload = rnd.randbytes(plen)
    f = tcp_frame(payload, v6, flags, seq, vlan=vlan, ip_id=rnd.randrange(0x10000), opts=opts)
    nseg, segs = segment_all(f, GSO_TCPV6 if v6 else GSO_TCPV4, mss)
    if -(-plen // mss) > MAX_GSO_SEGS:
        assert nseg == -BAD_GSO_SIZE
        return
    assert nseg == max(1, -(-plen // mss)) == len(segs)
    check_segments(f, segs, mss, vlan)


def test_segmentation_64k_linux_sized():
    """What a Linux guest sends: a 64 KiB super-frame at MSS 1448 (46 segments)."""
    payload = random.Random(2).randbytes(65535 - 20 - 32)
    f = tcp_frame(payload, False, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH | dpkt.tcp.TH_CWR, 0xFFFFFF00,
                  opts=b"\x01\x01\x08\x0a" + bytes(8))
    nseg, segs = segment_all(f, GSO_TCPV4 | GSO_ECN, 1448)
    assert nseg == 46
    check_segments(f, segs, 1448, False)


def _hostile_cases():
    good4 = tcp_frame(b"x" * 3000, False, 0x18, 1)
    good6 = tcp_frame(b"x" * 3000, True, 0x18, 1)

    def patch(f, at, val):
        b = bytearray(f)
        b[at] = val
        return bytes(b)

    return [
        ("gso_size 0", good4, GSO_TCPV4, 0, -BAD_GSO_SIZE),
        ("too many segments", good4, GSO_TCPV4, 1, -BAD_GSO_SIZE),
        ("segment over 64 KiB", good4, GSO_TCPV4, 0xFFFF, -BAD_GSO_SIZE),
        ("UDP (UFO) not offered", good4, GSO_UDP, 1000, -BAD_GSO_TYPE),
        ("unknown gso type", good4, 2, 1000, -BAD_GSO_TYPE),
        ("v4 frame as TCPV6", good4, GSO_TCPV6, 1000, -BAD_L3),
        ("v6 frame as TCPV4", good6, GSO_TCPV4, 1000, -BAD_L3),
        ("runt", good4[:13], GSO_TCPV4, 1000, -BAD_L3),
        ("IP header cut", good4[:30], GSO_TCPV4, 1000, -BAD_L3),
        ("IHL < 5", patch(good4, 14, 0x44), GSO_TCPV4, 1000, -BAD_L3),
        ("IHL past the frame", patch(good4, 14, 0x4F)[:70], GSO_TCPV4, 1000, -BAD_L3),
        ("not TCP", patch(good4, 23, 17), GSO_TCPV4, 1000, -BAD_L3),
        ("IP version 6 in a v4 frame", patch(good4, 14, 0x65), GSO_TCPV4, 1000, -BAD_L3),
        ("v6 extension header", patch(good6, 20, 0), GSO_TCPV6, 1000, -BAD_L3),
        ("TCP header cut", good4[:40], GSO_TCPV4, 1000, -BAD_L4),
        ("TCP doff < 5", patch(good4, 46, 0x40), GSO_TCPV4, 1000, -BAD_L4),
        ("TCP doff past the frame", patch(good4, 46, 0xF0)[:80], GSO_TCPV4, 1000, -BAD_L4),
        ("VLAN tags cut", MAC + b"\x81\x00\x00\x01\x81\x00", GSO_TCPV4, 1000, -BAD_L3),
        ("three VLAN tags", MAC + b"\x81\x00\x00\x01" * 3 + good4[12:], GSO_TCPV4, 1000, -BAD_L3),
    ]


def test_segmentation_hostile_headers():
    for name, f, gso, mss, expected in _hostile_cases():
        assert segment_all(f, gso, mss)[0] == expected, name
    buf = np.zeros(100, np.uint8)
    assert gso_plan(buf, 101, GSO_TCPV4, 10, 100)[0] == -BAD_TOO_BIG
    # make_segment refuses arguments no plan gives (a caller bug), writing nothing
    out = np.zeros(64, np.uint8)
    assert make_segment(buf, 100, 14, 34, 54, 0, 20, 0, 1, out) == -BAD_GSO_SIZE
    assert make_segment(buf, 100, 14, 34, 54, 0, 5, 3, 3, out) == -BAD_GSO_SIZE
    assert not out.any()


@settings(max_examples=300, **COMMON)
@given(st.binary(min_size=0, max_size=300), st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.data())
def _hostile_random(data, gso_type, mss, d):
    """Random bytes (with a plausible Ethernet/IP/TCP start half of the time) never make the kernels
    read or write outside the frame; whatever they plan segments into bounded output."""
    if d.draw(st.booleans()):
        base = bytearray(tcp_frame(data, gso_type & 0x7F == GSO_TCPV6, 0x18, 5))
        for _ in range(d.draw(st.integers(0, 6))):
            base[d.draw(st.integers(0, len(base) - 1))] = d.draw(st.integers(0, 255))
        data = bytes(base[: d.draw(st.integers(0, len(base)))])
    nseg, segs = segment_all(data, gso_type, mss)
    assert nseg < 0 or len(segs) == nseg
    buf = np.frombuffer(data + bytes(4), np.uint8).copy()
    r = complete_csum(buf, len(data), d.draw(st.integers(0, 0xFFFF)), d.draw(st.integers(0, 0xFFFF)))
    assert r in (0, -BAD_CSUM_RANGE)
    assert bytes(buf[len(data):]) == bytes(4)


def test_hostile_offload():
    """Directed and random hostile inputs; also run under NUMBA_BOUNDSCHECK=1 (below)."""
    check_boundscheck_on()
    test_complete_csum_hostile_ranges_touch_nothing()
    test_segmentation_hostile_headers()
    _hostile_random()


def test_no_out_of_bounds_under_numba_boundscheck(tmp_path):
    run_under_boundscheck(__file__, "test_hostile_offload", tmp_path)


# ------------------------------------------------------------------ through vring net, end to end
HOST_OFFLOADS = F.NET_CSUM | F.NET_HOST_TSO4 | F.NET_HOST_TSO6
GUEST_OFFLOADS = F.NET_GUEST_CSUM | F.NET_GUEST_TSO4 | F.NET_GUEST_TSO6
RX_BUF = 2048


def vnet_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


def send_raw(fe: Frontend, hdr: bytes, frame: bytes) -> None:
    t = fe.tx()
    t.take_used()
    t.add_buffer(hdr + frame)
    t.publish()


def send_split(fe: Frontend, data: bytes, cut: int) -> None:
    """One frame in a chain of two descriptors cut at ``cut`` (e.g. inside the virtio_net_hdr)."""
    t = fe.tx()
    t.take_used()
    d1, d2 = t.free[-1], t.free[-2]  # the slots add_chain takes next
    t.buf(d1)[:cut] = np.frombuffer(data[:cut], np.uint8)
    t.buf(d2)[: len(data) - cut] = np.frombuffer(data[cut:], np.uint8)
    t.add_chain([(t.buf_gpa(d1), cut, False), (t.buf_gpa(d2), len(data) - cut, False)])
    t.publish()


def post_rx(fe: Frontend) -> None:
    r = fe.rx()
    while r.free:
        r.add_buffer(writable=True, length=RX_BUF)  # small buffers: a super-frame must be merged
    r.publish()


def recv_raw(fe: Frontend, want: int, timeout: float = 20) -> list[tuple[bytes, bytes]]:
    """(virtio_net_hdr, frame) pairs delivered on RX, merged buffers joined."""
    r = fe.rx()
    out: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        used = r.take_used()
        i = 0
        while i < len(used):
            data = r.buf(used[i][0])[: used[i][1]].tobytes()
            nbuf = max(int.from_bytes(data[10:12], "little"), 1)
            for k in range(1, nbuf):
                data += r.buf(used[i + k][0])[: used[i + k][1]].tobytes()
            out.append((data[:12], data[12:]))
            i += nbuf
        if used:
            post_rx(fe)
        time.sleep(0.01)
    return out


def test_offloads_through_vring(vring_proc, sockdir):
    """Port 0's driver takes checksum and TSO offloads (GUEST_*), port 1's takes none.

    0 -> 1: vring completes a partial checksum and cuts IPv4 and IPv6 super-frames into segments;
    hostile headers are dropped and counted. 1 -> 0: the super-frame and its header go through as
    they are, merged over small RX buffers."""
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    v = vring_proc("net", "--socket", a, "--socket", b)
    v.wait_log("port=1 listening", 60)
    base = Frontend.DEFAULT_FEATURES | HOST_OFFLOADS
    fa = Frontend(a, queue_size=64, buf_size=65536, features=base | GUEST_OFFLOADS)
    fb = Frontend(b, queue_size=64, buf_size=65536, features=base)
    for fe in (fa, fb):
        fe.connect()
        fe.setup()
        post_rx(fe)
    assert fa.features & GUEST_OFFLOADS == GUEST_OFFLOADS and not fb.features & GUEST_OFFLOADS
    rnd = random.Random(5)

    # a partial checksum, completed for port 1
    f = tcp_frame(rnd.randbytes(1000), False, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, 7)
    send_raw(fa, vnet_hdr(flags=1, csum_start=34, csum_offset=16), f)
    (hdr, got), = recv_raw(fb, 1)
    assert hdr[:10] == bytes(10) and len(got) == len(f)
    assert got[:50] == f[:50] and got[52:] == f[52:]  # only the checksum field changed
    assert ref_sum(got[34:], ref_sum(pseudo(dpkt.ethernet.Ethernet(got).data, len(got) - 34))) == 0xFFFF

    # the same with the header cut after 5 bytes (ANY_LAYOUT): read across the pieces
    send_split(fa, vnet_hdr(flags=1, csum_start=34, csum_offset=16) + f, 5)
    (hdr, got2), = recv_raw(fb, 1)
    assert hdr[:10] == bytes(10) and got2 == got

    # IPv4 and IPv6 super-frames, segmented for port 1
    for v6, plen in ((False, 20000), (True, 9000)):
        f = tcp_frame(rnd.randbytes(plen), v6, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, 1000)
        l4 = 14 + (40 if v6 else 20)
        send_raw(fa, vnet_hdr(1, GSO_TCPV6 if v6 else GSO_TCPV4, l4 + 20, 1448, l4, 16), f)
        got = recv_raw(fb, -(-plen // 1448))
        assert len(got) == -(-plen // 1448) and all(h[:10] == bytes(10) for h, _ in got)
        check_segments(f, [s for _, s in got], 1448, False)

    # hostile headers: dropped and counted; the next frame still goes through
    f = tcp_frame(b"y" * 3000, False, 0x18, 1)
    send_raw(fa, vnet_hdr(1, GSO_TCPV4, 54, 0, 34, 16), f)  # gso_size 0
    send_raw(fa, vnet_hdr(1, 0, 0, 0, 34, 0xFFFF), f)  # csum_offset outside the frame
    send_raw(fa, vnet_hdr(1, GSO_UDP, 54, 1000, 34, 16), f)  # UFO: not offered
    send_raw(fa, vnet_hdr(), f)
    (hdr, got), = recv_raw(fb, 1)
    assert got == f

    # 1 -> 0: passed through, header and all
    f = tcp_frame(rnd.randbytes(30000), False, 0x18, 3)
    h = vnet_hdr(1, GSO_TCPV4, 54, 1448, 34, 16)
    send_raw(fb, h, f)
    (hdr, got), = recv_raw(fa, 1)
    assert hdr[:10] == h[:10] and got == f
    assert int.from_bytes(hdr[10:12], "little") == -(-(12 + len(f)) // RX_BUF)  # num_buffers

    fa.close()
    fb.close()
    assert v.stop() == 0
    log = v.log_text()
    line = next(x for x in log.splitlines() if x.startswith("offload:"))
    st = dict(kv.split("=") for kv in line.split()[1:])
    assert st == {"csum_passed": "0", "gso_passed": "1", "csum_completed": "2", "gso_segmented": "2",
                  "segments": str(-(-20000 // 1448) + -(-9000 // 1448)), "bad": "3"}, line
    c = v.port_counters()
    assert c[1]["rx_dropped"] == 3 and c[1]["errors"] == 0 and c[0]["errors"] == 0


def test_mtu_bounds_frames_not_super_frames(vring_proc, sockdir):
    """With an MTU set, a TCP super-frame (gso_type set) still goes through: its segments are what
    the MTU bounds. A plain frame over the MTU is dropped."""
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    v = vring_proc("net", "--socket", a, "--socket", b, "--mtu", "1500")
    v.wait_log("port=1 listening", 60)
    base = Frontend.DEFAULT_FEATURES | HOST_OFFLOADS
    fa = Frontend(a, queue_size=64, buf_size=65536, features=base | GUEST_OFFLOADS)
    fb = Frontend(b, queue_size=64, buf_size=65536, features=base | GUEST_OFFLOADS)
    for fe in (fa, fb):
        fe.connect()
        fe.setup()
        post_rx(fe)
    rnd = random.Random(6)
    big = tcp_frame(rnd.randbytes(3000), False, 0x18, 1)
    send_raw(fb, vnet_hdr(), big)  # 3054 bytes, no GSO: over the MTU
    f = tcp_frame(rnd.randbytes(30000), False, 0x18, 3)
    h = vnet_hdr(1, GSO_TCPV4, 54, 1448, 34, 16)
    send_raw(fb, h, f)
    (hdr, got), = recv_raw(fa, 1)
    assert hdr[:10] == h[:10] and got == f
    fa.close()
    fb.close()
    assert v.stop() == 0
    c = v.port_counters()
    assert c[1]["tx_dropped"] == 1 and c[0]["rx_packets"] == 1, c
