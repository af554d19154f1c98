"""A jitted traffic generator on the driver side of the in-tree front-end.

``Frontend`` (Python) sets the connection and the rings up; ``drive`` then runs in a nogil
numba loop that posts TX frames and RX buffers and reclaims used entries, so the front-end's
own cost per packet stays far below a back-end's and the back-end is the bottleneck. It works
against any vhost-user net back-end (vring net, DPDK's net_vhost).

Descriptor d (split) or buffer id d (packed) always owns buffer slot d; TX buffers hold the frame
(behind a zero virtio_net_hdr) from the start, so a TX post is ring bookkeeping only, as in testpmd
txonly. Packed rings are posted and collected in ring order, one descriptor per buffer, without
IN_ORDER (the front-end does not offer it), so every buffer comes back in a used element of its own.

With a rate, each TX ring gets a burst every ``period`` cycles (no more than the back-end takes):
two back-ends can then be compared at the same offered load, where their empty-poll shares
say which has more headroom (testpmd's virtio-user has no software rate limit).
"""
from __future__ import annotations

import threading
import time

import numpy as np
from numba import njit

from vring.frontend import NET_HDR, Frontend, PackedDriverRing
from vring.jit import inline_kernel, kernel
from vring.layout import (
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    USED_F_NO_NOTIFY,
)
from vring.ordering import (
    cycles,
    fence_seq_cst,
    load_i64_acquire,
    load_u16,
    load_u16_acquire,
    load_u32,
    store_u16,
    store_u16_release,
    store_u32,
    store_u64,
    sys_write,
)
from vring.packed import driver_must_kick

# ring table columns (packed: R_AVAIL / R_USED are the driver / device event areas, R_AVAIL_IDX /
# R_LAST_USED ring positions, with their wrap counters in R_AVAIL_WRAP / R_USED_WRAP)
(R_SIZE, R_DESC, R_AVAIL, R_USED, R_AVAIL_IDX, R_LAST_USED, R_NFREE, R_KICK_FD, R_EVENT_IDX, R_BUF_HVA,
 R_BUF_SIZE, R_TX, R_LEN, R_PENDING, R_NEXT, R_PACKED, R_AVAIL_WRAP, R_USED_WRAP, R_BUF_GPA) = range(19)
N_COLS = 19
# stats columns per ring
S_PACKETS, S_BYTES, S_KICKS, S_FULL = range(4)
MODES = ("txonly", "rxonly", "flowgen")


@inline_kernel
def _count_used(rings, free, stats, r, d, ln):
    """Buffer d came back used with ``ln`` bytes: free it and count it."""
    free[r, rings[r, R_NFREE]] = d
    rings[r, R_NFREE] += 1
    if rings[r, R_TX] == 0:
        # RX: count frames, not buffers (a mergeable frame spans num_buffers buffers)
        if rings[r, R_PENDING] == 0:
            nb = np.int64(load_u16(np.uint64(rings[r, R_BUF_HVA] + d * rings[r, R_BUF_SIZE] + 10)))
            rings[r, R_PENDING] = max(nb, 1)
            stats[r, S_PACKETS] += 1
        rings[r, R_PENDING] -= 1
        stats[r, S_BYTES] += ln
    else:
        stats[r, S_PACKETS] += 1
        stats[r, S_BYTES] += rings[r, R_LEN] - NET_HDR


@kernel
def _reclaim_packed(rings, free, stats, r):
    """Collect the used descriptors of packed ring r, in ring order; returns how many, or -1 if the
    back-end gave back a buffer id that is not in flight (or more than were posted)."""
    desc = np.uint64(rings[r, R_DESC])
    size = rings[r, R_SIZE]
    n = 0
    while rings[r, R_NFREE] < size:  # something is in flight
        p = rings[r, R_LAST_USED]
        e = desc + np.uint64(16 * p)
        f = np.int64(load_u16_acquire(e + np.uint64(14)))
        w = rings[r, R_USED_WRAP]
        if ((f & PACKED_DESC_F_AVAIL) != 0) != (w != 0) or ((f & PACKED_DESC_F_USED) != 0) != (w != 0):
            break
        d = np.int64(load_u16(e + np.uint64(12)))
        if d >= size:
            return -1
        _count_used(rings, free, stats, r, d, np.int64(load_u32(e + np.uint64(8))))
        n += 1
        p += 1
        if p == size:
            p = 0
            rings[r, R_USED_WRAP] ^= 1
        rings[r, R_LAST_USED] = p
    return n


@kernel
def _reclaim(rings, free, stats, r):
    """Collect used entries of ring r; returns entries reclaimed."""
    if rings[r, R_PACKED]:
        return _reclaim_packed(rings, free, stats, r)
    used = np.uint64(rings[r, R_USED])
    size = rings[r, R_SIZE]
    idx = np.int64(load_u16_acquire(used + np.uint64(2)))
    n = (idx - rings[r, R_LAST_USED]) & 0xFFFF
    if n > size:
        return -1  # the back-end published more than the ring holds
    for i in range(n):
        slot = (rings[r, R_LAST_USED] + i) & (size - 1)
        e = used + np.uint64(4 + 8 * slot)
        d = np.int64(load_u32(e))
        ln = np.int64(load_u32(e + np.uint64(4)))
        if d >= size:
            return -1
        _count_used(rings, free, stats, r, d, ln)
    rings[r, R_LAST_USED] = (rings[r, R_LAST_USED] + n) & 0xFFFF
    return n


@kernel
def _kick(rings, stats, r, one):
    if rings[r, R_KICK_FD] >= 0:
        sys_write(np.int32(rings[r, R_KICK_FD]), np.uint64(one.ctypes.data), np.uint64(8))
        stats[r, S_KICKS] += 1


@kernel
def _post_packed(rings, free, stats, r, n, one):
    """Post n buffers on packed ring r (its first descriptor's flags last) and kick if the
    back-end wants it."""
    size = rings[r, R_SIZE]
    desc = np.uint64(rings[r, R_DESC])
    write = 0 if rings[r, R_TX] else DESC_F_WRITE
    head = np.uint64(0)
    head_flags = np.uint16(0)
    for i in range(n):
        rings[r, R_NFREE] -= 1
        d = free[r, rings[r, R_NFREE]]
        p = rings[r, R_AVAIL_IDX]
        w = rings[r, R_AVAIL_WRAP]
        e = desc + np.uint64(16 * p)
        store_u64(e, np.uint64(rings[r, R_BUF_GPA] + d * rings[r, R_BUF_SIZE]))
        store_u32(e + np.uint64(8), np.uint32(rings[r, R_LEN]))
        store_u16(e + np.uint64(12), np.uint16(d))
        f = np.uint16(write | (PACKED_DESC_F_AVAIL if w else PACKED_DESC_F_USED))
        if i == 0:
            head, head_flags = e, f
        else:
            store_u16_release(e + np.uint64(14), f)
        p += 1
        if p == size:
            p = 0
            rings[r, R_AVAIL_WRAP] ^= 1
        rings[r, R_AVAIL_IDX] = p
    store_u16_release(head + np.uint64(14), head_flags)
    fence_seq_cst()  # our descriptors before the back-end's suppression fields
    ev = np.uint64(rings[r, R_USED])
    flags = load_u16_acquire(ev + np.uint64(2))
    off_wrap = load_u16(ev)
    if driver_must_kick(
        flags, off_wrap, rings[r, R_EVENT_IDX], rings[r, R_AVAIL_IDX], rings[r, R_AVAIL_WRAP], size, n
    ):
        _kick(rings, stats, r, one)
    return n


@kernel
def _post(rings, free, stats, r, burst, one):
    """Post up to ``burst`` buffers on ring r and kick if the back-end wants it."""
    size = rings[r, R_SIZE]
    n = min(burst, rings[r, R_NFREE])
    if n == 0:
        stats[r, S_FULL] += 1
        return 0
    if rings[r, R_PACKED]:
        return _post_packed(rings, free, stats, r, n, one)
    desc = np.uint64(rings[r, R_DESC])
    avail = np.uint64(rings[r, R_AVAIL])
    old = rings[r, R_AVAIL_IDX]
    for _ in range(n):
        rings[r, R_NFREE] -= 1
        d = free[r, rings[r, R_NFREE]]
        dd = desc + np.uint64(16 * d)
        store_u32(dd + np.uint64(8), np.uint32(rings[r, R_LEN]))
        store_u16(dd + np.uint64(12), np.uint16(0 if rings[r, R_TX] else DESC_F_WRITE))
        slot = rings[r, R_AVAIL_IDX] & (size - 1)
        store_u16(avail + np.uint64(4 + 2 * slot), np.uint16(d))
        rings[r, R_AVAIL_IDX] = (rings[r, R_AVAIL_IDX] + 1) & 0xFFFF
    new = rings[r, R_AVAIL_IDX]
    store_u16_release(avail + np.uint64(2), np.uint16(new))
    fence_seq_cst()  # our avail idx before the back-end's suppression fields
    used = np.uint64(rings[r, R_USED])
    if rings[r, R_EVENT_IDX]:
        ev = np.int64(load_u16_acquire(used + np.uint64(4 + 8 * size)))
        kick = ((new - ev - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
    else:
        kick = (load_u16_acquire(used) & USED_F_NO_NOTIFY) == 0
    if kick:
        _kick(rings, stats, r, one)
    return n


@njit(nogil=True, cache=True)
def drive(ctrl, rings, free, stats, burst, period):
    """Post and reclaim on every ring until ctrl[0] becomes 0; returns -1 if a back-end misbehaved.
    ``period``: cycles between one TX ring's bursts (0: post whenever there is room)."""
    one = np.ones(1, np.uint64)
    start = np.int64(cycles())
    for r in range(rings.shape[0]):
        rings[r, R_NEXT] = start  # each TX ring's schedule starts with this call's first round
    while load_i64_acquire(np.uint64(ctrl.ctypes.data)) == 1:
        now = np.int64(cycles()) if period > 0 else np.int64(0)
        for r in range(rings.shape[0]):
            if _reclaim(rings, free, stats, r) < 0:
                return -1
            if rings[r, R_TX]:
                if period == 0:
                    _post(rings, free, stats, r, burst, one)
                elif now >= rings[r, R_NEXT]:
                    _post(rings, free, stats, r, burst, one)
                    # on schedule; after a stall, catch up by one burst at most
                    rings[r, R_NEXT] = max(rings[r, R_NEXT] + period, now - period)
            elif rings[r, R_NFREE] >= burst:
                _post(rings, free, stats, r, burst, one)
    return 0


class Generator:
    """Drive a set-up ``Frontend`` in ``mode`` from a nogil thread."""

    def __init__(self, fes: Frontend | list[Frontend], mode: str = "flowgen", burst: int = 32,
                 frame_size: int = 64, rate: float = 0.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.fes = fes if isinstance(fes, list) else [fes]
        rings = []  # (frontend, ring, is_tx): one nogil loop drives the rings of every front-end
        for fe in self.fes:
            for pair in range(len(fe.rings) // 2):
                if mode in ("rxonly", "flowgen"):
                    rings.append((fe, fe.rx(pair), False))
                if mode in ("txonly", "flowgen"):
                    rings.append((fe, fe.tx(pair), True))
        self.rings = np.zeros((len(rings), N_COLS), np.int64)
        self.free = np.zeros((len(rings), max(fe.queue_size for fe in self.fes)), np.int64)
        self.stats = np.zeros((len(rings), 4), np.int64)
        self.tx_rows = [i for i, (_, _, tx) in enumerate(rings) if tx]
        self.rx_rows = [i for i, (_, _, tx) in enumerate(rings) if not tx]
        body = np.frombuffer((bytes(range(256)) * (frame_size // 256 + 1))[:frame_size], np.uint8).copy()
        body[0:6] = 0xFF  # broadcast: any switch floods it
        body[6:12] = (2, 0, 0, 0, 0, 1)
        for i, (fe, ring, tx) in enumerate(rings):
            ring.take_used()
            base = fe.uaddr + ring.buf_off
            self.rings[i] = 0
            t = self.rings[i]
            t[R_SIZE], t[R_DESC] = ring.size, fe.uaddr + ring.desc_off
            t[R_AVAIL], t[R_USED] = fe.uaddr + ring.avail_off, fe.uaddr + ring.used_off
            t[R_PACKED] = int(isinstance(ring, PackedDriverRing))
            if t[R_PACKED]:
                t[R_AVAIL_IDX], t[R_LAST_USED] = ring.avail_idx, ring.used_idx
                t[R_AVAIL_WRAP], t[R_USED_WRAP] = ring.avail_wrap, ring.used_wrap
            else:
                t[R_AVAIL_IDX], t[R_LAST_USED] = ring.avail_idx, ring.last_used
            t[R_BUF_GPA] = ring.buf_gpa(0)
            t[R_KICK_FD], t[R_EVENT_IDX] = ring.kick_fd, ring.event_idx
            t[R_BUF_HVA], t[R_BUF_SIZE], t[R_TX] = base, ring.buf_size, int(tx)
            t[R_LEN] = NET_HDR + frame_size if tx else ring.buf_size
            # only descriptors not already posted are ours to post
            t[R_NFREE] = len(ring.free)
            self.free[i, : len(ring.free)] = ring.free
            for d in range(ring.size):
                if not t[R_PACKED]:  # (a packed post writes its descriptor whole)
                    ring.desc[d] = (ring.buf_gpa(d), t[R_LEN], 0 if tx else DESC_F_WRITE, 0)
                if tx:
                    ring.buf(d)[:NET_HDR] = 0
                    ring.buf(d)[NET_HDR : NET_HDR + frame_size] = body
            ring.set_interrupts(False)  # we poll
        self.burst = burst
        self.period = 0  # rate (Mpps per TX ring) as cycles between bursts
        if rate > 0:
            from vring.ordering_calibrate import ns_per_cycle

            self.period = max(1, round(burst / rate * 1e3 / ns_per_cycle()))
        self.ctrl = np.zeros(1, np.int64)
        # compile now (ctrl 0: returns at once)
        drive(self.ctrl, self.rings, self.free, self.stats, np.int64(burst), np.int64(self.period))
        self.result = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.ctrl[0] = 1
        self._thread = threading.Thread(target=self._run, name="generator", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.result = drive(self.ctrl, self.rings, self.free, self.stats, np.int64(self.burst), np.int64(self.period))

    def stop(self) -> None:
        self.ctrl[0] = 0
        if self._thread is not None:
            self._thread.join()

    def totals(self) -> dict[str, int]:
        s = self.stats
        return {
            "tx_packets": int(sum(s[i, S_PACKETS] for i in self.tx_rows)),
            "rx_packets": int(sum(s[i, S_PACKETS] for i in self.rx_rows)),
            "rx_bytes": int(sum(s[i, S_BYTES] for i in self.rx_rows)),
            "kicks": int(s[:, S_KICKS].sum()),
        }


def run(fe: Frontend | list[Frontend], mode: str, seconds: float, burst: int = 32, frame_size: int = 64,
        report=None, rate: float = 0.0) -> dict[str, float]:
    """Generate for ``seconds`` (``rate``: Mpps per TX ring, 0: unpaced); calls report(dict) each
    second; returns the totals and rates."""
    from vring.ordering_calibrate import cycles_now

    g = Generator(fe, mode, burst, frame_size, rate)
    c0 = int(cycles_now())
    g.start()
    t0 = last = time.monotonic()
    prev = g.totals()
    try:
        while time.monotonic() - t0 < seconds:
            time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
            now = time.monotonic()
            cur = g.totals()
            if report is not None:
                dt = now - last
                report({"tx_mpps": (cur["tx_packets"] - prev["tx_packets"]) / dt / 1e6,
                        "rx_mpps": (cur["rx_packets"] - prev["rx_packets"]) / dt / 1e6, **cur})
            prev, last = cur, now
    finally:
        g.stop()
    cyc = int(cycles_now()) - c0
    elapsed = time.monotonic() - t0
    out = g.totals()
    if g.result < 0:
        raise RuntimeError("the back-end published an invalid used ring")
    # cycles and period: the schedule's own clock, what a paced run's bursts can be checked against
    return {**out, "seconds": elapsed, "cycles": cyc, "period": g.period, "tx_mpps": out["tx_packets"] / elapsed / 1e6,
            "rx_mpps": out["rx_packets"] / elapsed / 1e6}
