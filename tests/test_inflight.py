"""In-flight descriptor tracking (GET/SET_INFLIGHT_FD): the kernels, the recovery, a killed ``vring net``.

What is proven (split rings; vring tracks no packed ring):
- per queue, across a SIGKILL and restart of vring: every chain the driver made available is
  completed exactly once, none lost and none completed twice (each TX head the front-end posts
  comes back in the used ring once per posting); chains in flight at the kill are resubmitted
  in counter order, and a last batch that reached the used ring before the kill is not
  resubmitted (the spec's last_batch_head / used_idx reconciliation);
- end to end in loopback (TX ring -> RX ring, two used indexes that can't be written
  atomically): no frame is ever delivered twice; a frame can be lost only if it belonged to
  the one batch in progress when vring died and the kill came after that batch's TX used
  index was stored and before its RX used index was (so at most a burst per kill);
- a hostile inflight area or description (wrong sizes, fds that aren't files, garbage
  versions, flags, counters and links) gets a failed reply or a logged reset, never a crash,
  hang or leaked fd / mapping.
"""
from __future__ import annotations

import fcntl
import os
import random
import signal
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_protocol import fds_and_maps, make_fd
from test_net import check, frame

from vring import inflight as I
from vring import protocol as P
from vring.frontend import GPA_BASE, NET_HDR, Frontend
from vring.layout import new_qstate
from vring.memory import MAX_REGIONS
from vring.protocol import PF, F, Req
from vring.ring import begin, cursor, pop, publish, put_used, rollback
from vring.split import MAX_SEGS

QSIZE = 64


def views(region: np.ndarray, size: int = QSIZE):
    return region[: I.HEADER_SIZE].view(I.HEADER)[0], region[I.HEADER_SIZE : I.HEADER_SIZE + 16 * size].view(
        I.DESC_STATE)


# ------------------------------------------------------------------------------------------
# the kernels: marked at pop, unmarked at rollback, linked and cleared at publish


class KernelRig:
    """The in-tree front-end's memory and TX ring (no socket), one qstate row tracking it."""

    def __init__(self):
        self.fe = Frontend("/nonexistent", queue_size=QSIZE)
        self.regions = np.zeros((1, MAX_REGIONS, 4), np.uint64)
        self.regions[0, 0] = (GPA_BASE, self.fe.mem_size, self.fe.uaddr, self.fe.uaddr)
        self.qs = new_qstate(1)
        self.area = np.zeros(I.queue_bytes(QSIZE), np.uint8)
        I.reset(self.area, QSIZE, 0)
        r = self.ring = self.fe.tx()
        q = self.qs[0]
        q["size"], q["mem"], q["ready"] = QSIZE, 0, 1
        q["desc"], q["avail"], q["used"] = (self.fe.uaddr + o for o in (r.desc_off, r.avail_off, r.used_off))
        q["inflight"] = self.area.ctypes.data
        self.hva = np.zeros(MAX_SEGS, np.uint64)
        self.len = np.zeros(MAX_SEGS, np.uint64)

    def post(self, n: int) -> list[int]:
        heads = [self.ring.add_buffer(bytes(NET_HDR + 60)) for _ in range(n)]
        self.ring.publish()
        return heads

    def pop(self) -> int:
        m, _, head, _ = pop(self.qs, 0, self.regions, 0, self.hva, self.len, 0)
        assert m > 0
        return head


def test_kernels_mark_unmark_link_and_clear():
    k = KernelRig()
    head, desc = views(k.area)
    heads = k.post(6)
    assert begin(k.qs, 0, 64) == 6
    c0 = cursor(k.qs, 0)
    got = [k.pop() for _ in range(4)]
    assert got == heads[:4]
    assert list(np.flatnonzero(desc["inflight"])) == sorted(got)
    assert [int(desc[h]["counter"]) for h in got] == [1, 2, 3, 4]  # popping order
    rollback(k.qs, 0, c0 + (2 << 17))  # keep the first two, give back the next two
    assert sorted(np.flatnonzero(desc["inflight"])) == sorted(got[:2])
    for h in got[:2]:
        put_used(k.qs, 0, h, 0, 1)
    publish(k.qs, 0)
    assert not desc["inflight"].any()
    assert int(head["used_idx"]) == 2 == int(k.ring.used["idx"])
    # the last-batch list: last_batch_head is the batch's last head, linked back to its first
    assert int(head["last_batch_head"]) == got[1] and int(desc[got[1]]["next"]) == got[0]
    # the rolled-back chains come again, next in counter order
    assert begin(k.qs, 0, 64) == 4
    assert [k.pop(), k.pop()] == heads[2:4]
    assert [int(desc[h]["counter"]) for h in heads[2:4]] == [5, 6]
    k.fe.close()


# ------------------------------------------------------------------------------------------
# recover(): the reconciliation at ring start, directed and hostile


def region_with(inflight_heads=(), used_idx=0, area_used=None, batch=()):
    """A region after some traffic: ``inflight_heads`` marked in this order, ``batch`` the last
    batch's heads (linked, flags still set), the area's used_idx ``area_used``."""
    r = np.zeros(I.queue_bytes(QSIZE), np.uint8)
    I.reset(r, QSIZE, used_idx if area_used is None else area_used)
    head, desc = views(r)
    for c, h in enumerate(inflight_heads, 100):
        desc[h]["inflight"], desc[h]["counter"] = 1, c
    prev = None
    for h in batch:
        desc[h]["inflight"] = 1
        if prev is not None:
            desc[h]["next"] = prev
        prev = h
    if batch:
        head["last_batch_head"] = batch[-1]
    return r


def avail_from(used_idx: int, heads) -> tuple[np.ndarray, int]:
    ring = np.zeros(QSIZE, np.uint16)
    for i, h in enumerate(heads):
        ring[(used_idx + i) % QSIZE] = h
    return ring, (used_idx + len(heads)) & 0xFFFF


def test_recover_resubmits_in_counter_order_and_skips_a_published_last_batch():
    used = 0xFFFE  # the window wraps the u16 indexes
    ring, aidx = avail_from(used, [9, 4, 30, 7])
    r = region_with(inflight_heads=[9, 4, 30], used_idx=used, area_used=(used - 2) & 0xFFFF, batch=[11, 12])
    n, problem = I.recover(r, QSIZE, used, ring, aidx)
    assert (n, problem) == (3, "")
    head, desc = views(r)
    assert not desc["inflight"].any() and int(head["used_idx"]) == used


def test_recover_fresh_area_is_initialised():
    r = np.zeros(I.queue_bytes(QSIZE), np.uint8)
    assert I.recover(r, QSIZE, 5, np.zeros(QSIZE, np.uint16), 5) == (0, "")
    head, _ = views(r)
    assert (int(head["version"]), int(head["desc_num"]), int(head["used_idx"])) == (1, QSIZE, 5)


@pytest.mark.parametrize("case", ["version", "desc_num", "flag_value", "batch_too_long", "batch_link", "order",
                                  "not_available", "more_than_available"])
def test_recover_refuses_inconsistent_areas(case):
    ring, aidx = avail_from(0, [1, 2, 3])
    r = region_with(inflight_heads=[1, 2], used_idx=0)
    head, desc = views(r)
    if case == "version":
        head["version"] = 2
    elif case == "desc_num":
        head["desc_num"] = QSIZE * 2
    elif case == "flag_value":
        desc[5]["inflight"] = 7
    elif case == "batch_too_long":
        head["used_idx"] = 0x8000
    elif case == "batch_link":
        head["used_idx"] = 0xFFFF
        head["last_batch_head"] = 0xFFFF
    elif case == "order":
        desc[1]["counter"] = 1 << 63
    elif case == "not_available":
        desc[40]["inflight"] = 1
    elif case == "more_than_available":
        desc[3]["inflight"], desc[3]["counter"], desc[4]["inflight"], desc[4]["counter"] = 1, 200, 1, 201
    n, problem = I.recover(r, QSIZE, 0, ring, aidx)
    assert n == 0 and problem
    head, desc = views(r)
    assert int(head["version"]) == 1 and not desc["inflight"].any()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(min_size=I.queue_bytes(QSIZE), max_size=I.queue_bytes(QSIZE)),
       used=st.integers(0, 0xFFFF), ready=st.integers(0, QSIZE + 3), seed=st.integers(0, 2**32 - 1))
def test_recover_any_bytes(raw, used, ready, seed):
    """Whatever the front-end left in the area: no exception, n <= chains available, then nothing in flight."""
    r = np.frombuffer(bytearray(raw), np.uint8)
    ring = np.random.default_rng(seed).integers(0, 1 << 16, QSIZE, dtype=np.uint16)
    n, _ = I.recover(r, QSIZE, used, ring, (used + ready) & 0xFFFF)
    head, desc = views(r)
    assert 0 <= n <= min(ready, QSIZE)
    assert int(head["version"]) == 1 and int(head["desc_num"]) == QSIZE and int(head["used_idx"]) == used
    assert not desc["inflight"].any()


def test_attach_and_create_validate():
    area, fd = I.create(2, QSIZE, 2)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)  # the front-end can't pull the memory from under us
        a2 = I.attach(fd, area.size, 0, 2, QSIZE, 2)
        a2.close()
        bad = [(area.size - 1, 0, 2, QSIZE), (area.size, 64, 2, QSIZE), (area.size, 1 << 63, 2, QSIZE),
               (area.size, 0, 3, QSIZE), (area.size, 0, 0, QSIZE), (area.size, 0, 2, 48), (area.size, 0, 2, 0)]
        for size, off, nq, qs in bad:
            with pytest.raises(I.InflightError):
                I.attach(fd, size, off, nq, qs, 2)
        for kind in ("eventfd", "pipe", "devnull", "dir", "socket"):
            other = make_fd(kind)
            try:
                with pytest.raises(I.InflightError):
                    I.attach(other, area.size, 0, 2, QSIZE, 2)
            finally:
                os.close(other)
    finally:
        area.close()
        os.close(fd)


# ------------------------------------------------------------------------------------------
# a live vring: killed and restarted under the in-tree front-end


def start(vring_proc, path: str):
    v = vring_proc("net", "--socket", path, "--burst", "32")
    v.wait_log("port=0 listening", 60)
    return v


def new_frontend(path: str) -> Frontend:
    fe = Frontend(path, queue_size=256, inflight=True)
    fe.connect(timeout=60)
    fe.setup()
    assert fe.protocol_features & PF.INFLIGHT_SHMFD and fe.inflight_fd >= 0
    fe.post_rx()
    return fe


class Traffic:
    """Numbered frames posted on TX, their heads tracked: each must come back exactly once."""

    def __init__(self, fe: Frontend):
        self.fe = fe
        self.seq = 0
        self.outstanding: dict[int, int] = {}  # TX head -> seq
        self.completed = 0
        self.received: list[int] = []

    def send(self, n: int) -> int:
        t = self.fe.tx()
        self.drain()
        k = 0
        while k < n and t.free:
            h = t.add_buffer(bytes(NET_HDR) + frame(self.seq))
            assert h not in self.outstanding
            self.outstanding[h] = self.seq
            self.seq += 1
            k += 1
        t.publish()
        return k

    def drain(self) -> None:
        for h, _ in self.fe.tx().take_used():
            assert h in self.outstanding, f"TX head {h} completed twice (or never posted)"
            del self.outstanding[h]
            self.completed += 1
        self.received += [check(f) for f in self.fe.recv_frames()]

    def settle(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while (self.outstanding or len(self.received) < self.completed) and time.monotonic() < deadline:
            self.drain()
            time.sleep(0.005)
        self.drain()


def test_inflight_chains_resubmitted_after_a_kill(vring_proc, sockdir):
    """The state a kill mid-batch leaves, made on purpose: TX and RX chains marked in flight
    (popped, never completed) and a TX last batch in the used ring whose flags were not cleared
    yet. The restarted vring resubmits exactly the chains in flight, each frame arrives once."""
    path = os.path.join(sockdir, "a.sock")
    v = start(vring_proc, path)
    fe = new_frontend(path)
    tr = Traffic(fe)
    tr.send(40)
    tr.settle()
    assert tr.received == list(range(40)) and not tr.outstanding
    v.stop(signal.SIGKILL)
    tx, rx = fe.tx(), fe.rx()
    used = int(tx.used["idx"])
    last = [int(tx.used["ring"][(used - 2 + i) % 256]["id"]) for i in range(2)]
    for h in last:  # the driver reuses other descriptors first (nothing could have popped these since)
        tx.free.remove(h)
        tx.free.insert(0, h)
    tr.send(8)  # posted while no back-end runs: a dead back-end had popped the first 5
    thead, tdesc = views(fe.inflight_region(1), 256)
    for i in range(5):
        h = int(tx.avail["ring"][(used + i) % 256])
        tdesc[h]["inflight"], tdesc[h]["counter"] = 1, 1000 + i
    # the last TX batch (2 chains) reached the used ring, its flags were still set at the kill
    for h in last:
        tdesc[h]["inflight"] = 1
    tdesc[last[1]]["next"] = last[0]
    thead["last_batch_head"], thead["used_idx"] = last[1], (used - 2) & 0xFFFF
    # and the first 3 RX buffers had been popped for a delivery that never completed
    rhead, rdesc = views(fe.inflight_region(0), 256)
    rused = int(rx.used["idx"])
    for i in range(3):
        h = int(rx.avail["ring"][(rused + i) % 256])
        rdesc[h]["inflight"], rdesc[h]["counter"] = 1, 50 + i
    del thead, tdesc, rhead, rdesc
    v2 = start(vring_proc, path)
    fe.reconnect()
    tr.settle()
    assert tr.received == list(range(48)), tr.received[38:]
    assert not tr.outstanding and tr.completed == 48
    log = v2.log_text()
    assert "vring 1: 5 chain(s) were in flight: resubmitted in counter order" in log, log[-3000:]
    assert "vring 0: 3 chain(s) were in flight: resubmitted in counter order" in log, log[-3000:]
    # a front-end that marks a chain that is not next in the avail ring: logged, ignored, no harm
    v2.stop(signal.SIGKILL)
    _, tdesc = views(fe.inflight_region(1), 256)
    tdesc[int(tx.used["ring"][(int(tx.used["idx"]) - 1) % 256]["id"])]["inflight"] = 1
    del tdesc
    v3 = start(vring_proc, path)
    fe.reconnect()
    tr.send(10)
    tr.settle()
    assert tr.received == list(range(58)) and not tr.outstanding
    assert "area ignored, resuming at the used index" in v3.log_text()
    fe.close()
    assert v3.stop() == 0
    assert "Traceback" not in v3.log_text() + v2.log_text()


def test_vring_killed_mid_traffic_exactly_once_per_descriptor(vring_proc, sockdir):
    """vring SIGKILLed 3 times at random moments under loopback traffic; each time restarted
    and the front-end reconnects with SET_INFLIGHT_FD: every TX chain completed exactly once,
    no frame duplicated, and frames lost only from the one batch in progress at each kill."""
    path = os.path.join(sockdir, "a.sock")
    v = start(vring_proc, path)
    fe = new_frontend(path)
    tr = Traffic(fe)
    rnd = random.Random(os.environ.get("VRING_TEST_SEED", "inflight"))
    kills = 3
    restarted = []
    for k in range(kills + 1):
        deadline = time.monotonic() + (rnd.uniform(0.3, 1.0) if k < kills else 1.0)
        while time.monotonic() < deadline:
            # no more frames in flight than RX buffers (vring drops what finds no room)
            if 256 - (tr.seq - len(tr.received)) >= 64:
                tr.send(64)
            tr.drain()
        if k == kills:
            break
        v.stop(signal.SIGKILL)
        tr.drain()  # what vring published before it died
        v = start(vring_proc, path)
        restarted.append(v)
        fe.reconnect()
    tr.settle()
    assert not tr.outstanding, f"{len(tr.outstanding)} TX chains never completed"
    assert tr.completed == tr.seq
    assert len(set(tr.received)) == len(tr.received), "a frame was delivered twice"
    lost = sorted(set(range(tr.seq)) - set(tr.received))
    assert len(lost) <= 32 * kills, lost
    mid_batch = sum("were in flight: resubmitted" in r.log_text() for r in restarted)
    print(f"\n{tr.seq} frames over {kills} kills ({mid_batch} of them mid-batch: chains in flight resubmitted): "
          f"{len(tr.received)} delivered once, {len(lost)} lost (from the batch in progress at a kill), none twice")
    fe.close()
    assert v.stop() == 0
    assert "Traceback" not in v.log_text()


def set_inflight(fe: Frontend, kind: str, fsize: int, **description) -> int:
    """SET_INFLIGHT_FD with a fresh fd of ``kind``; the back-end's REPLY_ACK status."""
    fd = make_fd(kind, fsize)
    try:
        return fe.ack(Req.SET_INFLIGHT_FD, P.record(P.INFLIGHT, **description), (fd,))
    finally:
        os.close(fd)


def test_hostile_inflight_messages(vring_proc, sockdir):
    """Bad descriptions and fds: failed replies (no area); vring keeps serving and leaks nothing."""
    path = os.path.join(sockdir, "a.sock")
    v = start(vring_proc, path)
    good = new_frontend(path)  # for the baseline: one full connection came and went
    good.close()
    time.sleep(0.3)
    base = fds_and_maps(v.proc.pid)
    fe = Frontend(path, queue_size=64, inflight=True)
    fe.connect()
    fe.setup()
    size = 2 * I.queue_bytes(64)
    cases = [  # (mmap_size, mmap_offset, num_queues, queue_size, fd kind, fd size)
        (size - 1, 0, 2, 64, "memfd", size), (size, 0, 2, 64, "memfd", size - 1), (size, 4096, 2, 64, "memfd", size),
        (size, (1 << 64) - 16, 2, 64, "memfd", size), (size, 0, 0, 64, "memfd", size),
        (size, 0, 3, 64, "memfd", size), (size, 0, 2, 48, "memfd", size), (size, 0, 2, 0, "memfd", size),
        (size, 0, 2, 64, "eventfd", 0), (size, 0, 2, 64, "pipe", 0), (size, 0, 2, 64, "dir", 0),
        (size, 0, 2, 64, "socket", 0), (size, 0, 2, 64, "rofile", 0),
    ]
    for ms, off, nq, qs, kind, fsize in cases:
        status = set_inflight(fe, kind, fsize, mmap_size=ms, mmap_offset=off, num_queues=nq, queue_size=qs)
        assert status != 0, (ms, off, nq, qs, kind)
    for nq, qs in ((0, 64), (300, 64), (2, 3), (2, 0), (2, 65535)):
        fe.send(Req.GET_INFLIGHT_FD, P.record(P.INFLIGHT, num_queues=nq, queue_size=qs))
        req, _, body, fds = fe.recv_fds()
        assert req == Req.GET_INFLIGHT_FD and not fds and int(np.frombuffer(body, P.INFLIGHT)[0]["mmap_size"]) == 0
    # a good area, then garbage written into it under traffic, then a restart of the rings
    fe.post_rx()
    tr = Traffic(fe)
    tr.send(20)
    tr.settle()
    rng = np.random.default_rng(1)
    for _ in range(3):
        for i in (0, 1):
            fe.inflight_region(i)[:] = rng.integers(0, 256, I.queue_bytes(64), dtype=np.uint8)
        tr.send(20)
        tr.settle()
        fe.reconnect()
    tr.send(20)
    tr.settle()
    assert len(set(tr.received)) == len(tr.received) and not tr.outstanding
    fe.close()
    # without INFLIGHT_SHMFD negotiated both requests are refused
    plain = Frontend(path, queue_size=64)
    plain.connect()
    plain.setup()
    assert set_inflight(plain, "memfd", size, mmap_size=size, num_queues=2, queue_size=64) != 0
    plain.close()
    # packed rings are not tracked: GET gives no area, SET is refused
    pk = Frontend(path, queue_size=64)
    pk.connect()
    pk.send(Req.SET_OWNER)
    pk.send(Req.SET_PROTOCOL_FEATURES, P.u64(int(PF.REPLY_ACK | PF.INFLIGHT_SHMFD)))
    pk.protocol_features = PF.REPLY_ACK | PF.INFLIGHT_SHMFD
    pk._set(Req.SET_FEATURES, P.u64(int(F.VERSION_1 | F.RING_PACKED | F.PROTOCOL_FEATURES)))
    pk.get_inflight_fd()
    assert pk.inflight_fd < 0
    assert set_inflight(pk, "memfd", size, mmap_size=size, num_queues=2, queue_size=64) != 0
    pk.close()
    deadline = time.monotonic() + 5
    while fds_and_maps(v.proc.pid) != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fds_and_maps(v.proc.pid) == base, v.log_text()[-2000:]
    assert v.proc.poll() is None
    assert v.stop() == 0
    assert "Traceback" not in v.log_text()
