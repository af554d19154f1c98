"""``vring switch`` (devices/switch.py): the MAC table kernels in-process, then three in-tree
front-ends on a running switch: flooding, learning, unicast seen only on its port, no hairpin,
ageing, chains that split the Ethernet header, and the MAC table in the stats."""
from __future__ import annotations

import os
import select
import struct
import time
from itertools import pairwise

import numpy as np
import pytest

from devices.switch import (
    PROBE,
    S_AGED,
    S_EVICTED,
    S_LEARNED,
    S_MOVED,
    frame_macs,
    learn,
    lookup,
    mac_int,
    mac_str,
)
from vring.control import ControlClient
from vring.frontend import NET_HDR, Frontend

A, B, C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
BCAST = "ff:ff:ff:ff:ff:ff"
MCAST = "01:00:5e:00:00:01"
QUIET_S = 0.3  # after the expected receiver got a frame, how long the others must stay silent


# ---- the MAC table kernels, in-process ----

def _table(size=64):
    return np.zeros(size, np.uint64), np.full(size, -1, np.int64), np.zeros(size, np.uint64), np.zeros(8, np.uint64)


def test_learn_lookup_move_and_age():
    k, p, s, st = _table()
    m = np.uint64(mac_int(A))
    assert lookup(k, p, s, m, np.uint64(100), np.uint64(0)) == -1
    learn(k, p, s, m, 2, np.uint64(100), np.uint64(50), st)
    assert lookup(k, p, s, m, np.uint64(120), np.uint64(50)) == 2
    learn(k, p, s, m, 1, np.uint64(130), np.uint64(50), st)  # the MAC moved to port 1
    assert lookup(k, p, s, m, np.uint64(140), np.uint64(50)) == 1
    assert (st[S_LEARNED], st[S_MOVED]) == (1, 1)
    assert lookup(k, p, s, m, np.uint64(181), np.uint64(50)) == -1  # 51 cycles unseen: aged out
    assert lookup(k, p, s, m, np.uint64(181), np.uint64(0)) == 1  # age 0: never ages
    learn(k, p, s, m, 0, np.uint64(200), np.uint64(50), st)  # relearned after ageing
    assert lookup(k, p, s, m, np.uint64(200), np.uint64(50)) == 0
    assert (st[S_LEARNED], st[S_AGED], len(np.flatnonzero(k))) == (2, 1, 1)
    assert lookup(k, p, s, np.uint64(mac_int(B)), np.uint64(200), np.uint64(50)) == -1


def test_table_full_evicts_oldest_and_keeps_one_entry_per_mac():
    k, p, s, st = _table(size=PROBE)  # one probe window: the whole table
    macs = [np.uint64(0x020000000100 + i) for i in range(PROBE + 3)]
    for t, m in enumerate(macs):
        learn(k, p, s, m, t % 3, np.uint64(10 + t), np.uint64(0), st)
    assert st[S_EVICTED] == 3 and st[S_LEARNED] == PROBE + 3
    for m in macs[:3]:
        assert lookup(k, p, s, m, np.uint64(100), np.uint64(0)) == -1  # the oldest went
    for t, m in enumerate(macs[3:], start=3):
        assert lookup(k, p, s, m, np.uint64(100), np.uint64(0)) == t % 3
    learn(k, p, s, macs[5], 2, np.uint64(200), np.uint64(0), st)  # known MAC: updated in place
    assert sorted(int(x) & ((1 << 48) - 1) for x in k) == sorted(int(m) for m in macs[3:])


def test_frame_macs_across_pieces():
    f = np.frombuffer(bytes(NET_HDR) + bytes.fromhex(B.replace(":", "") + A.replace(":", "")) + b"\x08\x00",
                      np.uint8).copy()
    base = np.uint64(f.ctypes.data)
    for cuts in ([], [12], [12, 15], [3, 12, 13, 17, 20]):
        edges = [0, *cuts, len(f)]
        hva = np.array([base + np.uint64(a) for a in edges[:-1]], np.uint64)
        ln = np.array([b - a for a, b in pairwise(edges)], np.uint64)
        d, s = frame_macs(hva, ln, len(ln), np.uint64(NET_HDR))
        assert (mac_str(int(d)), mac_str(int(s))) == (B, A), cuts


# ---- three front-ends on a running switch ----

def eth(dst: str, src: str, tag: int, size: int = 64) -> bytes:
    head = bytes.fromhex(dst.replace(":", "") + src.replace(":", "")) + b"\x88\xb5" + struct.pack("<I", tag)
    return head + bytes((tag + i) & 0xFF for i in range(size - len(head)))


def start(vring_proc, sockdir, *extra, n=3, packed=False):
    paths = [os.path.join(sockdir, f"{c}.sock") for c in "abcdefgh"[:n]]
    ctl = os.path.join(sockdir, "ctl")
    args = ["switch", "--control", ctl]
    for p in paths:
        args += ["--socket", p]
    v = vring_proc(*args, *extra)
    v.wait_log(f"port={n - 1} listening", 60)
    fes = []
    for p in paths:
        fe = Frontend(p, packed=packed)
        fe.connect()
        fe.setup()
        fe.post_rx()
        fes.append(fe)
    return v, fes, ctl


def recv_all(fes, want: dict[int, list[bytes]], timeout: float = 10) -> dict[int, list[bytes]]:
    """Collect frames on every front-end until each port in ``want`` has its frames, then QUIET_S more."""
    got: dict[int, list[bytes]] = {i: [] for i in range(len(fes))}
    deadline = time.monotonic() + timeout
    quiet_until = None
    while time.monotonic() < deadline:
        for i, fe in enumerate(fes):
            got[i] += fe.recv_frames()
            fe.tx().take_used()
        if quiet_until is None and all(len(got[i]) >= len(w) for i, w in want.items()):
            quiet_until = time.monotonic() + QUIET_S
        if quiet_until is not None and time.monotonic() > quiet_until:
            break
        time.sleep(0.005)
    return got


def send(fe, *frames):
    assert fe.send_frames(list(frames)) == len(frames)


def expect(fes, want: dict[int, list[bytes]]):
    """Exactly ``want`` arrives: those frames on those ports, nothing anywhere else."""
    got = recv_all(fes, want)
    assert got == {i: want.get(i, []) for i in range(len(fes))}


def close(v, fes, ports=None):
    for fe in fes:
        fe.close()
    for p in ports if ports is not None else range(len(fes)):
        v.wait_log(f"port={p} front-end disconnected", 20)  # vring notices each on its own time
    assert v.stop() == 0, v.log_text()[-3000:]
    log = v.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    return v.port_counters()


RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@RINGS
def test_flood_learn_unicast_only_on_its_port(vring_proc, sockdir, packed):
    v, (fa, fb, fc), ctl = start(vring_proc, sockdir, packed=packed)
    fes = [fa, fb, fc]
    # nothing learned yet: unknown unicast floods to every other port, never back to port 0
    f1 = eth(B, A, 1)
    send(fa, f1)
    expect(fes, {1: [f1], 2: [f1]})
    # A is now learned on port 0: B's reply goes to port 0 only (C never sees it)
    f2 = eth(A, B, 2)
    send(fb, f2)
    expect(fes, {0: [f2]})
    # B learned on port 1 from its reply: A -> B now reaches port 1 only
    f3 = [eth(B, A, 3 + i, size=60 + 100 * i) for i in range(10)]
    send(fa, *f3)
    expect(fes, {1: f3})
    # broadcast and multicast flood (and teach the switch C)
    f4, f5 = eth(BCAST, C, 4), eth(MCAST, C, 5)
    send(fc, f4, f5)
    expect(fes, {0: [f4, f5], 1: [f4, f5]})
    f6 = eth(C, A, 6)
    send(fa, f6)
    expect(fes, {2: [f6]})
    with ControlClient(ctl) as c:
        s = c.sample()
    table = {e["mac"]: e["port"] for e in s["mac_table"]}
    assert table == {A: 0, B: 1, C: 2}
    assert [p["counters"]["macs"] for p in s["ports"]] == [1, 1, 1]
    assert s["switch"]["learned"] == 3 and s["switch"]["flooded"] == 3 and s["switch"]["unicast"] == 12
    c = close(v, fes)
    assert [c[p]["tx_packets"] for p in range(3)] == [12, 1, 2]
    assert [c[p]["rx_packets"] for p in range(3)] == [3, 13, 2]
    assert all(c[p]["errors"] == 0 and c[p]["rx_dropped"] == 0 for p in range(3))
    # the front-ends left before vring stopped: their MACs went with them
    assert all(c[p]["macs"] == 0 for p in range(3)) and "\nmac " not in v.log_text()


def test_table_printed_at_exit(vring_proc, sockdir):
    """Stopped while front-ends are attached, vring prints the MAC table as it was."""
    v, fes, _ = start(vring_proc, sockdir)
    f1, f2 = eth(BCAST, A, 1), eth(BCAST, C, 2)
    send(fes[0], f1)
    expect(fes, {1: [f1], 2: [f1]})
    send(fes[2], f2)
    expect(fes, {0: [f2], 1: [f2]})
    assert v.stop() == 0
    log = v.log_text()
    assert f"mac {A} port=0 " in log and f"mac {C} port=2 " in log, log[-2000:]
    c = v.port_counters()
    assert [c[p]["macs"] for p in range(3)] == [1, 0, 1]
    for fe in fes:
        fe.close()


@RINGS
def test_no_hairpin(vring_proc, sockdir, packed):
    """A frame whose destination was learned on its own ingress port is filtered, not sent back."""
    v, fes, ctl = start(vring_proc, sockdir, packed=packed)
    fa = fes[0]
    f1 = eth(BCAST, B, 1)  # B (behind port 0, as A is) announces itself
    send(fa, f1)
    expect(fes, {1: [f1], 2: [f1]})
    send(fa, eth(B, A, 2), eth(B, A, 3))
    expect(fes, {})
    with ControlClient(ctl) as c:
        s = c.sample()
    assert s["switch"]["filtered"] == 2
    c = close(v, fes)
    assert c[0]["rx_packets"] == 0 and c[0]["tx_packets"] == 3


@pytest.mark.parametrize("mode", ["adaptive", "poll"])
def test_ageing_forgets_a_silent_mac(vring_proc, sockdir, mode):
    """Adaptive: the loop sleeps through the silence and re-reads its clock on waking; --poll:
    it never sleeps, and its clock moves every CLOCK_ROUNDS rounds."""
    v, fes, ctl = start(vring_proc, sockdir, "--age", "0.5", *(["--poll"] if mode == "poll" else []))
    fa, fb, _ = fes
    f1 = eth(BCAST, B, 1)
    send(fb, f1)
    expect(fes, {0: [f1], 2: [f1]})
    f2 = eth(B, A, 2)
    send(fa, f2)
    expect(fes, {1: [f2]})  # learned: port 1 only
    time.sleep(1.0)
    with ControlClient(ctl) as c:
        assert {e["mac"] for e in c.sample()["mac_table"]} == set()  # both aged out
    f3 = eth(B, A, 3)
    send(fa, f3)
    expect(fes, {1: [f3], 2: [f3]})  # B aged out: flooded again
    with ControlClient(ctl) as c:
        s = c.sample()
    assert {e["mac"]: e["port"] for e in s["mac_table"]} == {A: 0}
    close(v, fes)


@pytest.mark.parametrize("mode", ["adaptive", "poll"])
def test_every_driver_that_gets_used_buffers_is_signalled(vring_proc, sockdir, mode):
    """A batch's call decision is made at the start of the next round (ring.finish_later): the
    drivers still get their calls, the receivers' RX rings and the sender's TX ring, in both
    modes (adaptive goes to sleep after that round; --poll keeps polling)."""
    v, fes, ctl = start(vring_proc, sockdir, *(["--poll"] if mode == "poll" else []))
    f1 = eth(BCAST, A, 1)
    send(fes[0], f1)
    want = {fes[1].rx().call_fd, fes[2].rx().call_fd, fes[0].tx().call_fd}
    signalled: set[int] = set()
    deadline = time.monotonic() + 10
    while signalled != want and time.monotonic() < deadline:
        ready, _, _ = select.select(list(want - signalled), [], [], 0.5)
        signalled |= set(ready)
    assert signalled == want
    expect(fes, {1: [f1], 2: [f1]})
    with ControlClient(ctl) as c:
        q = {(r["port"], r["vring"]): r for r in c.sample()["queues"]}
    assert q[(1, 0)]["calls"] >= 1 and q[(2, 0)]["calls"] >= 1 and q[(0, 1)]["calls"] >= 1
    close(v, fes)


def test_header_split_over_descriptors(vring_proc, sockdir):
    """The Ethernet header spread over several TX descriptors is still switched on."""
    v, fes, _ = start(vring_proc, sockdir)
    fa, fb, _ = fes
    f0 = eth(BCAST, B, 0)
    send(fb, f0)
    expect(fes, {0: [f0], 2: [f0]})
    f = eth(B, A, 9, size=300)
    data = bytes(NET_HDR) + f
    t = fa.tx()
    cuts = [0, NET_HDR, NET_HDR + 4, NET_HDR + 9, len(data)]
    segs = []
    for lo, hi in pairwise(cuts):
        d = t.free[-1 - len(segs)]
        t.buf(d)[: hi - lo] = np.frombuffer(data[lo:hi], np.uint8)
        segs.append((t.buf_gpa(d), hi - lo, False))
    t.add_chain(segs)
    t.publish()
    expect(fes, {1: [f]})
    close(v, fes)


@RINGS
@pytest.mark.parametrize("n", [2, 5])
def test_every_port_floods_to_all_others(vring_proc, sockdir, n, packed):
    """Two ports: every frame has one destination (the common frame's own path, _switch_one);
    five: flooded frames go the general way."""
    v, fes, _ = start(vring_proc, sockdir, n=n, packed=packed)
    macs = [f"02:00:00:00:01:{i:02x}" for i in range(n)]
    for i, fe in enumerate(fes):
        f = eth(BCAST, macs[i], i)
        send(fe, f)
        expect(fes, {j: [f] for j in range(n) if j != i})
    # every MAC known now: each port reaches each other port alone
    for i, fe in enumerate(fes):
        for j in range(n):
            if j != i:
                f = eth(macs[j], macs[i], 100 * i + j)
                send(fe, f)
                expect(fes, {j: [f]})
    c = close(v, fes)
    for p in range(n):
        assert c[p]["rx_packets"] == 2 * (n - 1) and c[p]["errors"] == 0


def test_unknown_port_drop_is_counted_and_never_stalls(vring_proc, sockdir):
    """Port 2 never posts RX buffers: floods to it are dropped there, the others keep receiving."""
    paths = [os.path.join(sockdir, f"{c}.sock") for c in "abc"]
    v = vring_proc("switch", "--control", "none", *[a for p in paths for a in ("--socket", p)])
    v.wait_log("port=2 listening", 60)
    fes = []
    for i, p in enumerate(paths):
        fe = Frontend(p)
        fe.connect()
        fe.setup()
        if i < 2:
            fe.post_rx()
        fes.append(fe)
    frames = [eth(BCAST, A, i) for i in range(200)]
    for k in range(0, 200, 20):
        send(fes[0], *frames[k:k + 20])
        got = recv_all(fes[:2], {1: frames[k:k + 20]})
        assert got[1] == frames[k:k + 20]
    c = close(v, fes)
    assert c[1]["rx_packets"] == 200 and c[2]["rx_dropped"] == 200 and c[0]["tx_packets"] == 200



def test_disconnect_forgets_the_ports_macs(vring_proc, sockdir):
    """A front-end that goes away takes its MACs with it: frames for them flood again."""
    v, fes, ctl = start(vring_proc, sockdir)
    fa, fb, fc = fes
    f1, f2 = eth(BCAST, B, 1), eth(BCAST, C, 2)
    send(fb, f1)
    expect(fes, {0: [f1], 2: [f1]})
    send(fc, f2)
    expect(fes, {0: [f2], 1: [f2]})
    fb.close()
    deadline = time.monotonic() + 10
    with ControlClient(ctl) as c:
        while {e["mac"] for e in c.sample()["mac_table"]} != {C} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {e["mac"]: e["port"] for e in c.sample()["mac_table"]} == {C: 2}
    f3 = eth(B, A, 3)
    send(fa, f3)
    expect([fa, fc], {1: [f3]})  # unknown again: flooded (to C; B's port has no front-end)
    close(v, [fa, fc], ports=(0, 2))
