"""The in-tree front-end against ``vring net`` over a real socket: frames checked end to end,
mergeable buffers, chained and indirect descriptors, an absent peer, hostile input, leaks."""
from __future__ import annotations

import os
import struct
import time
import zlib

import numpy as np
import pytest
from peers import wait_until

from devices.net import HELD, SEQ_AT
from devices.net import test_frame as source_template
from vring import protocol as P
from vring.frontend import NET_HDR, Frontend
from vring.layout import DESC
from vring.protocol import F, Req


def frame(seq: int, size: int = 64) -> bytes:
    """Ethernet frame carrying a sequence number and a CRC of its payload."""
    body = bytes((seq + i) & 0xFF for i in range(size - 22))
    head = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5"  # dst, src, ethertype 0x88b5
    return head + struct.pack("<II", seq, zlib.crc32(body)) + body


def check(f: bytes) -> int:
    seq, crc = struct.unpack("<II", f[14:22])
    assert zlib.crc32(f[22:]) == crc, f"frame {seq} corrupted"
    return seq


def pump(tx: Frontend, rx: Frontend, n: int, size: int = 64, timeout: float = 20) -> list[int]:
    """Send n numbered frames from tx, collect them at rx; returns received sequence numbers."""
    got: list[int] = []
    sent = 0
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        # keep no more frames in flight than rx has buffers: vring holds what has no room only --hold-us
        room = rx.rx().size - (sent - len(got))
        if sent < n and room >= 32:
            sent += tx.send_frames([frame(s, size) for s in range(sent, min(n, sent + 32))])
        for f in rx.recv_frames():
            assert len(f) == size
            got.append(check(f))
        tx.tx().take_used()
    return got


def start(vring_proc, sockdir, *extra: str, sockets=("a",)):
    paths = [os.path.join(sockdir, f"{s}.sock") for s in sockets]
    args = ["net"]
    for p in paths:
        args += ["--socket", p]
    v = vring_proc(*args, *extra)
    v.wait_log(f"port={len(paths) - 1} listening", 60)
    return v, paths


def connect(path: str, **kw) -> Frontend:
    fe = Frontend(path, **kw)
    fe.connect()
    fe.setup()
    fe.post_rx()
    return fe


def test_loopback_frames_intact_and_in_order(vring_proc, sockdir):
    v, (a,) = start(vring_proc, sockdir)
    fe = connect(a)
    got = pump(fe, fe, 5000)
    assert got == list(range(5000))
    fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert c["tx_packets"] == 5000 and c["rx_packets"] == 5000 and c["errors"] == 0


def connect_mixed_rx(path: str, packed: bool) -> Frontend:
    """A front-end whose RX ring has HELD + 6 full buffers, 2 of 56 bytes (header + 44: a 64-byte
    frame takes both), and again: at burst 128 one batch holds HELD frames, copies them, holds 6
    more, then meets a frame for the general path. They take MIXED_RX_FRAMES frames."""
    fe = Frontend(path, packed=packed)
    fe.connect()
    fe.setup()
    assert fe.features & F.NET_MRG_RXBUF
    r = fe.rx()
    for _ in range(2):
        for _ in range(HELD + 6):
            r.add_buffer(writable=True)
        for _ in range(2):
            r.add_buffer(writable=True, length=56)
    r.publish()
    return fe


MIXED_RX_FRAMES = 2 * (HELD + 7)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_loopback_holds_common_frames_and_keeps_order(vring_proc, sockdir, packed):
    """At burst 128 the forward path holds the common frames (one buffer each side) and copies them
    together, HELD at most; a frame that needs two small RX buffers (the general path) comes
    between them. Every frame arrives intact, in the order sent."""
    v, (a,) = start(vring_proc, sockdir, "--burst", "128")
    fe = connect_mixed_rx(a, packed)
    n = MIXED_RX_FRAMES  # what those buffers take: nothing waits past the hold
    assert fe.send_frames([frame(s) for s in range(n)]) == n
    got: list[int] = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        for f in fe.recv_frames():
            assert len(f) == 64
            got.append(check(f))
    fe.close()
    assert v.stop() == 0
    assert got == list(range(n))
    c = v.port_counters()[0]
    assert c["tx_packets"] == c["rx_packets"] == n and c["rx_dropped"] == 0 and c["errors"] == 0


def test_xconnect_both_ways(vring_proc, sockdir):
    v, (a, b) = start(vring_proc, sockdir, sockets=("a", "b"))
    fa, fb = connect(a), connect(b)
    assert pump(fa, fb, 3000, size=1500) == list(range(3000))
    assert pump(fb, fa, 3000, size=60) == list(range(3000))
    fa.close()
    fb.close()
    assert v.stop() == 0
    c = v.port_counters()
    assert c[0]["tx_packets"] == 3000 and c[1]["rx_packets"] == 3000
    assert c[1]["tx_packets"] == 3000 and c[0]["rx_packets"] == 3000


def test_mergeable_rx_buffers_span_chains(vring_proc, sockdir):
    v, (a,) = start(vring_proc, sockdir)
    fe = connect(a, buf_size=1024)
    assert fe.features & F.NET_MRG_RXBUF
    got = pump(fe, fe, 200, size=1000)  # 12 + 1000 > 1024? no: fits; next size does not
    assert got == list(range(200))
    fe.tx().buf_size  # TX buffers are 1024 too: send big frames as two-descriptor chains
    t = fe.tx()
    big = frame(7, 3000)
    d0, d1, d2 = t.free[-1], t.free[-2], t.free[-3]
    data = bytes(NET_HDR) + big
    parts = [data[:1024], data[1024:2048], data[2048:]]
    for d, part in zip((d0, d1, d2), parts):
        t.buf(d)[: len(part)] = np.frombuffer(part, np.uint8)
    t.add_chain([(t.buf_gpa(d), len(part), False) for d, part in zip((d0, d1, d2), parts)])
    t.publish()
    deadline = time.monotonic() + 10
    r = fe.rx()
    used = []
    while not used and time.monotonic() < deadline:
        used = r.take_used()
    time.sleep(0.1)
    used += r.take_used()
    # 12 + 3000 bytes over 1024-byte RX buffers: 3 buffers, num_buffers = 3 in the first header
    assert [ln for _, ln in used] == [1024, 1024, 3012 - 2048]
    first = r.buf(used[0][0])[:NET_HDR].tobytes()
    assert int.from_bytes(first[10:12], "little") == 3
    joined = b"".join(r.buf(h)[:ln].tobytes() for h, ln in used)[NET_HDR:]
    assert check(joined) == 7 and joined == big
    fe.close()
    assert v.stop() == 0


def test_indirect_descriptors(vring_proc, sockdir):
    v, (a,) = start(vring_proc, sockdir)
    fe = connect(a)
    assert fe.features & F.RING_INDIRECT_DESC
    t = fe.tx()
    f = frame(42, 200)
    # an indirect table of 2 descriptors (header, frame) in the buffer of descriptor `slot`
    slot = t.free[-1]
    hdr_d, data_d = t.free[-2], t.free[-3]
    t.buf(hdr_d)[:NET_HDR] = 0
    t.buf(data_d)[: len(f)] = np.frombuffer(f, np.uint8)
    table = np.zeros(2, DESC)
    table[0] = (t.buf_gpa(hdr_d), NET_HDR, 1, 1)
    table[1] = (t.buf_gpa(data_d), len(f), 0, 0)
    t.buf(slot)[:32] = np.frombuffer(table.tobytes(), np.uint8)
    t.free.remove(hdr_d)
    t.free.remove(data_d)
    t.desc[slot] = (t.buf_gpa(slot), 32, 4, 0)  # VIRTQ_DESC_F_INDIRECT
    t.free.remove(slot)
    t.avail["ring"][t.avail_idx % t.size] = slot
    t.avail_idx += 1
    t.publish()
    deadline = time.monotonic() + 10
    got = []
    while not got and time.monotonic() < deadline:
        got = fe.recv_frames()
    assert got == [f]
    fe.close()
    assert v.stop() == 0


def test_absent_peer_drops_and_never_stalls(vring_proc, sockdir):
    v, (a, b) = start(vring_proc, sockdir, sockets=("a", "b"))
    fa = connect(a)
    sent = 0
    deadline = time.monotonic() + 10
    while sent < 2000 and time.monotonic() < deadline:
        sent += fa.send_frames([frame(s) for s in range(32)])
    # every frame was consumed (used) although nobody is on port b
    t = fa.tx()
    while len(t.free) < t.size and time.monotonic() < deadline:
        t.take_used()
    assert len(t.free) == t.size
    fa.close()
    assert v.stop() == 0
    c = v.port_counters()
    assert c[0]["tx_packets"] == sent and c[1]["rx_dropped"] == sent


def _in_flight(t) -> int:
    """Frames the back-end has not returned yet (after collecting what it has)."""
    t.take_used()
    return t.size - len(t.free)


def test_full_receiver_holds_frames_then_drops_after_the_hold(vring_proc, sockdir):
    """--hold-us: frames for an RX ring with no buffers wait in the TX ring (not consumed, not
    dropped) and go through once buffers are posted; a receiver full for longer than the hold
    gets them dropped, so a stalled guest cannot stall its sender for good."""
    v, (a,) = start(vring_proc, sockdir, "--hold-us", "1500000")  # 1.5 s
    fe = Frontend(a)
    fe.connect()
    fe.setup()  # RX ring ready, no buffers posted
    assert fe.send_frames([frame(s) for s in range(32)]) == 32
    time.sleep(0.5)
    t = fe.tx()
    assert _in_flight(t) == 32  # held: vring took none of them
    fe.post_rx()
    got: list[int] = []
    deadline = time.monotonic() + 10
    while len(got) < 32 and time.monotonic() < deadline:
        got += [check(f) for f in fe.recv_frames()]
    assert got == list(range(32))
    wait_until(lambda: _in_flight(t) == 0)
    fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert c["tx_packets"] == c["rx_packets"] == 32 and c["rx_dropped"] == 0
    assert c["rx_held"] > 0  # the wait is visible (vring stats, Prometheus vring_held_total)

    v, (a,) = start(vring_proc, sockdir, "--hold-us", "100000")  # 0.1 s, and buffers never posted
    fe = Frontend(a)
    fe.connect()
    fe.setup()
    t0 = time.monotonic()
    assert fe.send_frames([frame(s) for s in range(32)]) == 32
    t = fe.tx()
    wait_until(lambda: _in_flight(t) == 0)
    assert time.monotonic() - t0 >= 0.1  # held for the hold, then taken
    assert fe.send_frames([frame(s) for s in range(32)]) == 32
    wait_until(lambda: _in_flight(t) == 0)  # still full: dropped at once now
    fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert c["tx_packets"] == c["rx_dropped"] == 64 and c["rx_packets"] == 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_receiver_that_ran_dry_gets_frames_again_once_it_posts_a_batch(vring_proc, sockdir, packed):
    """After an RX ring ran out of buffers, held frames wait for 16 buffers to be posted again (a
    batch), not for the first one, but no longer than a sixteenth of --hold-us from the start of
    the hold: then the buffers posted so far take frames at once."""
    v, (a,) = start(vring_proc, sockdir, "--hold-us", "16000000")  # a refill wait of 1 s
    fe = Frontend(a, packed=packed)
    fe.connect()
    fe.setup()  # RX ring ready, no buffers posted
    assert fe.send_frames([frame(s) for s in range(32)]) == 32
    t = fe.tx()
    time.sleep(0.05)
    assert _in_flight(t) == 32  # the hold has begun
    fe.post_rx(3)
    time.sleep(0.3)
    assert _in_flight(t) == 32  # 3 buffers are not a batch yet
    fe.post_rx(13)
    wait_until(lambda: _in_flight(t) == 16, timeout=5)  # 16 are: as many frames go
    time.sleep(0.1)
    assert _in_flight(t) == 16  # and the ring is dry again
    time.sleep(1.1)  # past the refill wait of this hold
    fe.post_rx(2)
    wait_until(lambda: _in_flight(t) == 14, timeout=5)  # 2 buffers take 2 frames at once
    fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert c["tx_packets"] == c["rx_packets"] == 18 and c["rx_dropped"] == 0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_source_numbers_its_frames(vring_proc, sockdir, packed):
    """--mode source: every frame is the template carrying a running number (4 bytes little-endian
    after the IPv4 and UDP headers), in the order the buffers were posted, also when the number
    falls across two RX buffers, and when such a frame comes between frames that each fit one
    buffer (those the source holds back and copies together, HELD at most: burst 128 here)."""
    v, (a,) = start(vring_proc, sockdir, "--mode", "source", "--frame-size", "64", "--burst", "128")
    fe = connect_mixed_rx(a, packed)  # the number's last 2 bytes in the second of two small buffers
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(got) < 300 and time.monotonic() < deadline:
        got += fe.recv_frames()  # (reposted at full size: later frames are in one buffer each)
    fe.close()
    assert v.stop() == 0
    tpl = source_template(64).tobytes()
    assert len(got) >= 300 and all(len(f) == 64 and f[:SEQ_AT] == tpl[:SEQ_AT] and f[SEQ_AT + 4:] == tpl[SEQ_AT + 4:]
                                   for f in got)
    assert [int.from_bytes(f[SEQ_AT:SEQ_AT + 4], "little") for f in got] == list(range(len(got)))


def test_frame_needing_more_buffers_than_posted_waits_for_them(vring_proc, sockdir):
    """--hold-us with a frame that needs several mergeable RX buffers: while the receiver has some
    posted but too few for it, the frame stays in the TX ring (not dropped for want of the rest)
    and arrives whole once enough are posted; too few for longer than the hold, it is dropped and
    the buffers stay posted."""

    def post_small(fe: Frontend, n: int) -> None:
        r = fe.rx()
        for _ in range(n):
            r.add_buffer(writable=True, length=256)  # 6 of them take a 1500-byte frame and its header
        r.publish()

    v, (a,) = start(vring_proc, sockdir, "--hold-us", "1500000")  # 1.5 s
    fe = Frontend(a)
    fe.connect()
    fe.setup()
    assert fe.features & F.NET_MRG_RXBUF
    post_small(fe, 3)
    assert fe.send_frames([frame(5, size=1500)]) == 1
    time.sleep(0.5)
    t = fe.tx()
    assert _in_flight(t) == 1  # held: three buffers are not enough
    assert fe.rx().take_used() == []
    post_small(fe, 3)
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        got = fe.recv_frames()
    assert len(got) == 1 and len(got[0]) == 1500 and check(got[0]) == 5
    wait_until(lambda: _in_flight(t) == 0)
    fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert c["rx_packets"] == 1 and c["rx_dropped"] == 0 and c["rx_held"] > 0

    v, (a,) = start(vring_proc, sockdir, "--hold-us", "100000")  # 0.1 s, and never enough buffers
    fe = Frontend(a)
    fe.connect()
    fe.setup()
    post_small(fe, 3)
    t0 = time.monotonic()
    assert fe.send_frames([frame(6, size=1500)]) == 1
    t = fe.tx()
    wait_until(lambda: _in_flight(t) == 0)
    assert time.monotonic() - t0 >= 0.1  # held for the hold, then taken and dropped
    assert fe.rx().take_used() == []  # the three buffers were not used up by the dropped frame
    fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert c["tx_packets"] == c["rx_dropped"] == 1 and c["rx_packets"] == 0


def fds_and_maps(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum("memfd:" in line for line in f)
    return fds, maps


def test_hostile_messages_refused_and_other_port_keeps_serving(vring_proc, sockdir):
    v, (a, b) = start(vring_proc, sockdir, sockets=("a", "b"))
    time.sleep(0.5)
    pid = v.proc.pid
    base = fds_and_maps(pid)
    good = connect(b)
    assert pump(good, good, 10) == []  # xconnect: nothing comes back on b by itself
    bad = Frontend(a)
    bad.connect()
    bad.send(Req.SET_OWNER)
    bad.send(Req.GET_PROTOCOL_FEATURES)
    assert bad.recv()[0] == Req.GET_PROTOCOL_FEATURES
    bad.send(Req.SET_PROTOCOL_FEATURES, P.u64(P.PF.REPLY_ACK))
    bad.protocol_features = P.PF.REPLY_ACK
    # unknown request, unsupported request, wrong sizes, out-of-range index, bad sizes: failure acks
    assert bad.ack(77, b"") == 1
    assert bad.ack(Req.SET_LOG_FD, b"", (os.memfd_create("x"),)) == 1
    assert bad.ack(Req.SET_FEATURES, b"\x00" * 7) == 1
    assert bad.ack(Req.SET_FEATURES, P.u64(1 << 63)) == 1
    assert bad.ack(Req.SET_VRING_NUM, P.record(P.VRING_STATE, index=99, num=256)) == 1
    assert bad.ack(Req.SET_VRING_NUM, P.record(P.VRING_STATE, index=0, num=100)) == 1
    assert bad.ack(Req.SET_VRING_NUM, P.record(P.VRING_STATE, index=0, num=0)) == 1
    # a region whose fd is shorter than it claims (would SIGBUS), and too many fds
    short = os.memfd_create("short")
    os.ftruncate(short, 4096)
    reg = P.record(P.MEM_REGION, gpa=0, size=1 << 20, uaddr=0x7000_0000, mmap_offset=0)
    assert bad.ack(Req.SET_MEM_TABLE, P.mem_table(reg), (short,)) == 1
    assert bad.ack(Req.SET_MEM_TABLE, P.mem_table(reg), (short, short)) == 1
    os.close(short)
    # overlapping regions
    fd1 = os.memfd_create("r")
    os.ftruncate(fd1, 1 << 20)
    regs = np.concatenate([reg, reg])
    assert bad.ack(Req.SET_MEM_TABLE, P.mem_table(regs), (fd1, fd1)) == 1
    os.close(fd1)
    # the good port is still forwarding (to the absent port a: dropped, but consumed)
    n = good.send_frames([frame(i) for i in range(16)])
    deadline = time.monotonic() + 5
    while len(good.tx().free) < good.tx().size and time.monotonic() < deadline:
        good.tx().take_used()
    assert n == 16 and len(good.tx().free) == good.tx().size
    # a broken stream (bad version) closes that connection only
    bad.send(Req.GET_FEATURES, flags=0x2)
    with pytest.raises((ConnectionError, OSError)):
        bad.recv()
    bad.close()
    good.close()
    v.wait_log("port=1 front-end disconnected", 10)
    time.sleep(0.3)
    assert fds_and_maps(pid) == base, "fds or mappings left behind"
    assert v.stop() == 0


def test_hostile_ring_breaks_only_that_queue(vring_proc, sockdir):
    v, (a,) = start(vring_proc, sockdir, "--queues", "2")
    fe = connect(a, queue_pairs=2)
    # pair 0 works
    assert pump(fe, fe, 100) == list(range(100))
    # pair 1: the avail index jumps by more than the queue size
    t = fe.tx(1)
    t.avail["idx"] = (int(t.avail["idx"]) + t.size + 5) & 0xFFFF
    os.eventfd_write(t.kick_fd, 1)
    v.wait_log("vring=3 broken: avail idx moved by more than the queue size", 10)
    got = pump(fe, fe, 100)
    assert got == list(range(100))
    fe.close()
    assert v.stop() == 0


def test_generator_rate_caps_the_offered_load(vring_proc, sockdir):
    """--rate: a burst per period on each TX ring, so the load offered is the rate asked for
    (what bench/e2e.py --rate relies on to compare back-ends at the same load)."""
    from vring.generator import run

    v, (a,) = start(vring_proc, sockdir)
    fe = Frontend(a)
    fe.connect()
    fe.setup()
    res = run(fe, "flowgen", 2.0, burst=8, frame_size=64, rate=0.05)  # 50 000 frames/s
    fe.close()
    assert v.stop() == 0
    # on schedule by its own clock (the cycle counter): a burst per period from the first round on,
    # never ahead (a catch-up after a stall only takes back a missed burst)
    due = res["cycles"] / res["period"] + 1
    assert 0.5 * due * 8 < res["tx_packets"] <= due * 8
    # and that clock is the wall clock to the calibration's accuracy (50 ms, vring.ordering_calibrate)
    offered = 0.05e6 * res["seconds"]
    assert 0.5 * offered < res["tx_packets"] <= offered * 1.01
    # vring took what was offered: all of it reclaimed but what was in flight at the stop
    assert res["tx_packets"] <= v.port_counters()[0]["tx_packets"] <= res["tx_packets"] + 2 * 8


def test_pcap_capture_reads_back(vring_proc, sockdir):
    """--pcap writes a standard pcap per port with the frames in both directions (read with dpkt)."""
    import dpkt

    pattern = os.path.join(sockdir, "cap-{port}.pcap")
    v, (a, b) = start(vring_proc, sockdir, "--pcap", pattern, sockets=("a", "b"))
    fa, fb = connect(a), connect(b)
    assert pump(fa, fb, 50, size=100) == list(range(50))
    fa.close()
    fb.close()
    assert v.stop() == 0
    for port, path in ((0, pattern.format(port=0)), (1, pattern.format(port=1))):
        with open(path, "rb") as f:
            frames = [bytes(buf) for _, buf in dpkt.pcap.Reader(f)]
        assert len(frames) == 50, (port, len(frames))
        assert [check(x) for x in frames] == list(range(50))
        assert all(len(x) == 100 for x in frames)


def test_disabled_features_are_not_offered(vring_proc, sockdir):
    """--disable removes features from the offer; traffic still flows on what remains (no MRG_RXBUF)."""
    v, (a,) = start(vring_proc, sockdir, "--disable", "NET_MRG_RXBUF,ring_event_idx")
    fe = Frontend(a, features=Frontend.DEFAULT_FEATURES | F.RING_EVENT_IDX)
    fe.connect()
    assert not fe.u64(Req.GET_FEATURES) & (F.NET_MRG_RXBUF | F.RING_EVENT_IDX)
    fe.close()
    fe = connect(a)
    assert not fe.features & F.NET_MRG_RXBUF
    assert pump(fe, fe, 300, size=1400) == list(range(300))
    fe.close()
    assert v.stop() == 0
    assert "features NET_MRG_RXBUF" not in v.log_text()


def test_features_disabled_on_one_port(vring_proc, sockdir):
    """--disable PORT=FEATURES: port 1 is offered no packed rings and no mergeable buffers, port 0
    everything; frames still cross between the two differently negotiated ports."""
    v, (a, b) = start(vring_proc, sockdir, "--disable", "1=RING_PACKED,NET_MRG_RXBUF", "--disable", "RING_EVENT_IDX",
                      sockets=("a", "b"))
    offered = []
    for path in (a, b):
        fe = Frontend(path)
        fe.connect()
        offered.append(fe.u64(Req.GET_FEATURES))
        fe.close()
    assert offered[0] & F.RING_PACKED and offered[0] & F.NET_MRG_RXBUF
    assert not offered[1] & (F.RING_PACKED | F.NET_MRG_RXBUF)
    assert not (offered[0] | offered[1]) & F.RING_EVENT_IDX
    fa, fb = connect(a), connect(b)
    assert fa.features & F.NET_MRG_RXBUF and not fb.features & F.NET_MRG_RXBUF
    assert pump(fa, fb, 100, size=200) == list(range(100))
    assert pump(fb, fa, 100, size=200) == list(range(100))
    fa.close()
    fb.close()
    assert v.stop() == 0


def test_queue_pair_disabled_and_enabled_while_traffic_flows(vring_proc, sockdir):
    """SET_VRING_ENABLE 0 on pair 1 while pair 0 carries traffic: pair 1's frames wait in its TX
    ring (not taken, not lost); enabled again, they come back on pair 1, and pair 0 never stopped."""
    v, (a,) = start(vring_proc, sockdir, "--queues", "2")
    fe = connect(a, queue_pairs=2)
    fe.post_rx(pair=1)

    def on_pair1(n: int, timeout: float = 10) -> list[int]:
        got: list[int] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            got += [check(f) for f in fe.recv_frames(pair=1)]
            time.sleep(0.01)
        return got

    assert fe.send_frames([frame(s) for s in range(10)], pair=1) == 10
    assert on_pair1(10) == list(range(10))
    fe.tx(1).take_used()
    for index in (2, 3):  # pair 1: RX vring 2, TX vring 3
        assert fe.ack(Req.SET_VRING_ENABLE, P.record(P.VRING_STATE, index=index, num=0)) == 0
    assert fe.send_frames([frame(s) for s in range(10, 20)], pair=1) == 10
    assert pump(fe, fe, 200) == list(range(200))  # pair 0 keeps going meanwhile
    assert on_pair1(1, timeout=0.5) == [] and fe.tx(1).take_used() == []  # pair 1 took nothing
    for index in (2, 3):
        assert fe.ack(Req.SET_VRING_ENABLE, P.record(P.VRING_STATE, index=index, num=1)) == 0
    assert on_pair1(10) == list(range(10, 20))
    assert pump(fe, fe, 100) == list(range(100))
    fe.close()
    assert v.stop() == 0
    assert v.port_counters()[0]["errors"] == 0
