"""Kernel micro-benchmarks: vring's ring kernels (split and packed) on synthetic rings, in one process.

The driver side is the in-tree ``Frontend`` used without a socket: it only provides memfd
guest memory and the ring layout. Each benchmark calls ONE jitted function that runs many
rounds (about BENCH_PACKETS packets) inside numba, so what is measured is the kernels, not
Python's dispatch (~450 ns per call, see /work/shared/NUMBA.md).

Kernels (ns/packet = time of one call / packets it moved):
  pop      avail_count + avail_head + walk_chain per chain, put_used, publish_used per batch (TX ring)
  push     put_used per chain + publish_used per batch (used ring only)
  notify   call() once per batch (the fence + suppression check; no eventfd: the driver polls)
  scatter  _copy_frame of one frame (12-byte header + frame) per packet: memcpy only, no ring work
  deliver  _deliver per frame into the RX ring (RX chain walk + header + copy + put_used) + publish
  forward  _forward_batch TX -> RX: everything the data plane does per batch, copy included

The driver's part is minimal and identical everywhere: descriptor d always owns buffer d, the
avail ring holds head i in slot i, chains come back in order, so re-posting a batch is one
release store of avail.idx (what an IN_ORDER driver amounts to).

Packed rings (``ring="packed"``: pop, push, deliver, forward): the same memory, descriptor d
still owns buffer d and chains come back in order, but the device's used elements overwrite the
descriptors' len/id/flags in place, so re-posting a batch rewrites len, id and flags (the new
wrap bits) of each of its descriptors, the first one's flags last. That driver does more work
per packet than split's single avail.idx store, and it runs in the timed loop like split's.
Run:

    /tmp/venv/bin/python -m pytest bench/test_kernels.py --benchmark-json=bench/results/kernels.raw.json
    /tmp/venv/bin/python bench/report.py bench/results/kernels.raw.json [more runs' JSON ...]

Environment: BENCH_PACKETS (default 100000 per call), BENCH_ROUNDS (default 5 timed calls),
BENCH_BATCHES / BENCH_SIZES (comma lists) to narrow the matrix.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from devices.capture import empty as no_capture
from devices.net import MODE_FORWARD, _copy_frame, _deliver, _forward_batch, loop_scratch, new_scratch
from devices.net import test_frame as make_frame
from vring import packed as P
from vring.dataplane import BUSY_SIZE, busy_ends
from vring.frontend import GPA_BASE, NET_HDR, Frontend
from vring.jit import kernel
from vring.layout import (
    AVAIL_F_NO_INTERRUPT,
    C_CALLS,
    C_DROPS,
    C_ERRORS,
    C_PACKETS,
    DESC_F_WRITE,
    N_COUNTERS,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DISABLE,
    new_qstate,
)
from vring.memory import MAX_REGIONS
from vring.ordering import store_u16, store_u16_release, store_u32
from vring.ring import begin, flush_calls, publish
from vring.split import MAX_SEGS, avail_count, avail_head, call, publish_used, put_used, walk_chain

QSIZE = 512  # room for the largest batch (256) with the ring never full
BUF_SIZE = 2048
RX, TX = 0, 1  # qstate rows, as the net layout (vring 2k = RX, 2k+1 = TX)


def _ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x]


BATCHES = _ints("BENCH_BATCHES", "1,2,4,8,16,32,64,128,256")
SIZES = _ints("BENCH_SIZES", "64,512,1500")
PACKETS = int(os.environ.get("BENCH_PACKETS", "100000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def rounds_for(batch: int) -> int:
    return max(1, -(-PACKETS // batch))


# ---------------------------------------------------------------- the rig: memory + rings + qstate
class Rig:
    """One Frontend's memory and rings (no socket), the region table and the qstate rows for them.

    ``packed``: the same memory laid out as packed rings: the descriptor table where the split one
    was, the driver event area at the avail ring's place (DISABLE: no interrupts wanted), the
    device's at the used ring's; every RX buffer posted, no TX buffer. ``drv`` is the packed
    driver's (next position, wrap counter) per ring."""

    def __init__(self, frame_size: int, qsize: int = QSIZE, packed: bool = False):
        self.frame_size = frame_size
        self.packed = packed
        self.drv = np.array([[0, 1], [0, 1]], np.int64)
        self.fe = fe = Frontend("/nonexistent", queue_pairs=1, queue_size=qsize, buf_size=BUF_SIZE)
        self.regions = np.zeros((1, MAX_REGIONS, 4), np.uint64)
        self.regions[0, 0] = (GPA_BASE, fe.mem_size, fe.uaddr, fe.uaddr)
        self.qs = new_qstate(2)
        self.counters = np.zeros((2, N_COUNTERS), np.uint64)
        self.one = np.ones(1, np.uint64)
        frame = make_frame(frame_size)
        slots = np.arange(qsize)
        for row, ring in ((RX, fe.rx()), (TX, fe.tx())):
            q = self.qs[row]
            q["size"] = qsize
            q["desc"] = fe.uaddr + ring.desc_off
            q["avail"] = fe.uaddr + ring.avail_off
            q["used"] = fe.uaddr + ring.used_off
            q["hdr_len"] = NET_HDR
            q["mrg_rxbuf"] = 1
            q["mem"] = 0
            q["call_fd"] = -1
            q["kick_fd"] = -1
            q["ready"] = 1
            tx = row == TX
            ring.desc["addr"] = GPA_BASE + ring.buf_off + slots * BUF_SIZE
            ring.desc["len"] = NET_HDR + frame_size if tx else BUF_SIZE
            ring.desc["flags"] = 0 if tx else DESC_F_WRITE
            ring.desc["next"] = 0
            ring.avail["ring"][:] = slots  # slot i holds head i, forever (chains come back in order)
            ring.avail["idx"] = 0
            ring.avail["flags"] = AVAIL_F_NO_INTERRUPT  # the driver polls: no interrupts wanted
            if tx:
                bufs = fe.mem[ring.buf_off : ring.buf_off + qsize * BUF_SIZE].reshape(qsize, BUF_SIZE)
                bufs[:, :NET_HDR] = 0
                bufs[:, NET_HDR : NET_HDR + frame_size] = frame
            if packed:
                q["packed"], q["avail_wrap"], q["used_wrap"] = 1, 1, 1  # §2.8.1: both counters start at 1
                pd = np.frombuffer(fe.mem, PACKED_DESC, qsize, ring.desc_off)
                pd["id"] = slots
                pd["flags"] = 0  # nothing available with wrap counter 1
                fe.mem[ring.avail_off : ring.avail_off + 4] = 0
                fe.mem[ring.used_off : ring.used_off + 4] = 0
                fe.mem[ring.avail_off + 2] = RING_EVENT_FLAGS_DISABLE  # driver event area: no interrupts
        if packed:
            _packed_post(self.qs, RX, self.drv, qsize, BUF_SIZE, DESC_F_WRITE)
        self.tx_buf_hva = np.uint64(fe.uaddr + fe.tx().buf_off)
        self.rx_buf_hva = np.uint64(fe.uaddr + fe.rx().buf_off)

    def close(self) -> None:
        del self.qs, self.regions
        self.fe.close()


@pytest.fixture
def rig_for():
    made: list[Rig] = []

    def make(size: int, ring: str = "split") -> Rig:
        r = Rig(size, packed=ring == "packed")
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# ---------------------------------------------------------------- jitted round loops
# Kernels, like the data plane's own batch functions: the ring kernels they call are inlined
# (vring.jit.inline_kernel), and inlined into a function with numba's reference counting on they
# would pay an atomic incref/decref per array use. So no allocation here: scratch comes from Python.
def seg_scratch() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(MAX_SEGS, np.uint64), np.zeros(MAX_SEGS, np.uint64)


@kernel
def _driver_post(qs, q, n):
    """Driver side: make ``n`` chains available beyond what the device has popped (one release store)."""
    store_u16_release(qs[q]["avail"] + np.uint64(2), np.uint16((np.int64(qs[q]["last_avail_idx"]) + n) & 0xFFFF))


@kernel
def _packed_post(qs, q, drv, n, ln, write):
    """Packed driver side: make the next ``n`` descriptors available again (descriptor d owns buffer d).

    The device's used elements overwrote len and id: write them back, then the flags with this
    lap's AVAIL/USED bits (§2.8.1), the first descriptor's last so the batch appears whole."""
    size = np.int64(qs[q]["size"])
    desc = qs[q]["desc"]
    pos = drv[q, 0]
    wrap = drv[q, 1]
    head = desc + np.uint64(16 * pos + 14)
    head_fl = np.uint16(0)
    for i in range(n):
        d = desc + np.uint64(16 * pos)
        store_u32(d + np.uint64(8), np.uint32(ln))
        store_u16(d + np.uint64(12), np.uint16(pos))
        fl = np.uint16(write | (PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED))
        if i == 0:
            head_fl = fl
        else:
            store_u16_release(d + np.uint64(14), fl)
        pos += 1
        if pos == size:
            pos = 0
            wrap ^= 1
    if n > 0:
        store_u16_release(head, head_fl)
    drv[q, 0] = pos
    drv[q, 1] = wrap


@kernel
def _tx_post(qs, drv, n, ln):
    """Make ``n`` more TX chains available (``ln`` bytes each)."""
    if qs[TX]["packed"]:
        _packed_post(qs, TX, drv, n, ln, 0)
    else:
        _driver_post(qs, TX, n)


@kernel
def _rx_post(qs, drv):
    """Give every RX buffer the device used back: split, one store of avail.idx a ring ahead of the
    device; packed, the descriptors from the device's used position up to a ring ahead."""
    size = np.int64(qs[RX]["size"])
    if qs[RX]["packed"]:
        # positions as counts modulo two laps (wrap counter 1 = even lap)
        used = np.int64(qs[RX]["used_idx"]) + size * (1 - np.int64(qs[RX]["used_wrap"]))
        posted = drv[RX, 0] + size * (1 - drv[RX, 1])
        _packed_post(qs, RX, drv, size - (posted - used) % (2 * size), BUF_SIZE, DESC_F_WRITE)
    else:
        _driver_post(qs, RX, size)


@kernel
def pop_rounds(qs, regions, rounds, batch, s_hva, s_len):
    """Pop ``batch`` TX chains per round and return them; bytes seen (or < 0 on a kernel error)."""
    total = 0
    for _ in range(rounds):
        _driver_post(qs, TX, batch)
        n = avail_count(qs, TX)
        if n < batch:
            return -1
        for i in range(batch):
            head = avail_head(qs, TX, i)
            if head < 0:
                return -2
            ns, ln = walk_chain(qs, TX, regions, head, 0, s_hva, s_len, 0)
            if ns < 0:
                return -3
            total += np.int64(ln)
            put_used(qs, TX, i, head, 0)
        publish_used(qs, TX, batch, batch)
    return total


@kernel
def pop_rounds_packed(qs, drv, regions, rounds, batch, tx_len, s_hva, s_len):
    """Packed pop: the driver posts ``batch`` TX chains; begin, pop + put_used each, publish."""
    total = 0
    for _ in range(rounds):
        _packed_post(qs, TX, drv, batch, tx_len, 0)
        if P.begin(qs, TX) < min(batch, P.SCAN):
            return -1
        for _i in range(batch):
            ns, ln, bid, nd = P.pop(qs, TX, regions, 0, s_hva, s_len, 0)
            if ns < 0:
                return -3
            total += np.int64(ln)
            P.put_used(qs, TX, bid, 0, nd)
        P.publish(qs, TX)
    return total


@kernel
def push_rounds_packed(qs, rounds, batch):
    """Packed push: begin (finds nothing available), put_used ``batch`` elements, publish."""
    size = np.int64(qs[TX]["size"])
    for _ in range(rounds):
        P.begin(qs, TX)
        base = np.int64(qs[TX]["used_idx"])
        for i in range(batch):
            P.put_used(qs, TX, (base + i) % size, 0, 1)
        P.publish(qs, TX)
    return np.int64(qs[TX]["used_idx"])


@kernel
def push_rounds(qs, rounds, batch):
    """put_used ``batch`` entries and publish them, per round; returns the used index."""
    mask = np.int64(qs[TX]["size"]) - 1
    for _ in range(rounds):
        base = np.int64(qs[TX]["used_idx"])
        for i in range(batch):
            put_used(qs, TX, i, (base + i) & mask, 0)
        publish_used(qs, TX, batch, batch)
    return np.int64(qs[TX]["used_idx"])


@kernel
def notify_rounds(qs, counters, one, rounds):
    """call() once per round (need_call's fence and flag check; the driver asked for no interrupts)."""
    for _ in range(rounds):
        call(qs, TX, counters, one)
    return np.int64(counters[TX, C_CALLS])


@kernel
def scatter_rounds(rounds, batch, src_base, dst_base, qsize, nbytes, c_hva, c_len, d_hva, d_len):
    """Copy one header+frame per packet from TX buffer slot k to RX buffer slot k."""
    c_len[0] = nbytes
    d_len[0] = np.uint64(2048)
    k = 0
    for _ in range(rounds):
        for _i in range(batch):
            off = np.uint64(k & (qsize - 1)) * np.uint64(2048)
            c_hva[0] = src_base + off
            d_hva[0] = dst_base + off
            _copy_frame(c_hva, c_len, 1, 0, d_hva, d_len, 0, nbytes)
            k += 1
    return k


@kernel
def deliver_rounds(qs, drv, regions, rounds, batch, src_base, qsize, flen, s_hva, s_len, sc):
    """_deliver ``batch`` frames (from TX buffer slots) into the RX ring per round, then publish.

    ``sc`` is the scratch tuple net_loop builds (``new_scratch``)."""
    hl = np.uint64(qs[RX]["hdr_len"])
    s_len[0] = hl + flen
    k = 0
    out = 0
    for _ in range(rounds):
        _rx_post(qs, drv)  # every RX buffer the device gave back is posted again
        begin(qs, RX, batch)
        for _i in range(batch):
            s_hva[0] = src_base + np.uint64(k & (qsize - 1)) * np.uint64(2048)
            k += 1
            r = _deliver(qs, regions, RX, s_hva, s_len, 1, hl, flen, sc, np.uint64(0), np.uint16(0))
            if r <= 0:
                return -1
            out += 1
        publish(qs, RX)
    return out


@kernel
def forward_rounds(qs, drv, counters, regions, rounds, batch, tx_len, scratch, cap, rows, busy):
    """_forward_batch TX -> RX once per round, the driver re-posting both rings, then the call
    decisions as net_loop settles them (``rows``: TX, RX); frames forwarded.

    ``scratch`` is what net_loop works in (``loop_scratch``)."""
    one, _buf, _pollfds, s_hva, s_len, sc, ob, held = scratch
    out = 0
    for _ in range(rounds):
        _tx_post(qs, drv, batch, tx_len)
        _rx_post(qs, drv)
        done = _forward_batch(qs, counters, regions, TX, RX, MODE_FORWARD, batch, 0, one, s_hva, s_len, sc, ob, cap,
                              busy, held)  # hold 0: the driver posts RX buffers for every frame anyway
        flush_calls(qs, rows, counters, one)
        busy_ends(busy)
        if done != batch:
            return -1
        out += done
    return out


# ---------------------------------------------------------------- benchmarks
def _bench(benchmark, kernel: str, batch: int, size: int, packets: int, fn, ring: str = "split"):
    fn()  # compile (or load from cache) and warm the rings outside the timing
    benchmark.group = f"{kernel}-{size}B"
    benchmark.extra_info.update(kernel=kernel, ring=ring, batch=batch, size=size, packets=packets)
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


params = pytest.mark.parametrize(("batch", "size"), [(b, s) for s in SIZES for b in BATCHES],
                                 ids=[f"b{b}-{s}B" for s in SIZES for b in BATCHES])
rings = pytest.mark.parametrize("ring", ["split", "packed"])


def last_rx(rig: Rig) -> tuple[int, int]:
    """(buffer id, length) of the last used element of the RX ring."""
    rx = rig.fe.rx()
    last = (int(rig.qs[RX]["used_idx"]) - 1) % QSIZE
    e = np.frombuffer(rig.fe.mem, PACKED_DESC, QSIZE, rx.desc_off)[last] if rig.packed else rx.used["ring"][last]
    return int(e["id"]), int(e["len"])


@rings
@params
def test_pop(benchmark, rig_for, batch, size, ring):
    rig = rig_for(size, ring)
    rounds = rounds_for(batch)
    if ring == "packed":
        fn = lambda: pop_rounds_packed(rig.qs, rig.drv, rig.regions, rounds, batch, NET_HDR + size,  # noqa: E731
                                       *seg_scratch())
    else:
        fn = lambda: pop_rounds(rig.qs, rig.regions, rounds, batch, *seg_scratch())  # noqa: E731
    got = _bench(benchmark, "pop", batch, size, rounds * batch, fn, ring)
    assert got == rounds * batch * (NET_HDR + size)


@rings
@params
def test_push(benchmark, rig_for, batch, size, ring):
    rig = rig_for(size, ring)
    rounds = rounds_for(batch)
    fn = push_rounds_packed if ring == "packed" else push_rounds
    got = _bench(benchmark, "push", batch, size, rounds * batch, lambda: fn(rig.qs, rounds, batch), ring)
    assert got >= 0


@params
def test_notify(benchmark, rig_for, batch, size):
    rig = rig_for(size)
    rounds = rounds_for(batch)
    _bench(benchmark, "notify", batch, size, rounds * batch,
           lambda: notify_rounds(rig.qs, rig.counters, rig.one, rounds))
    assert rig.counters[TX, C_CALLS] == 0  # no calls: the driver asked for none (and there is no call fd)


@params
def test_scatter(benchmark, rig_for, batch, size):
    rig = rig_for(size)
    rounds = rounds_for(batch)
    got = _bench(benchmark, "scatter", batch, size, rounds * batch,
                 lambda: scatter_rounds(rounds, batch, rig.tx_buf_hva, rig.rx_buf_hva, QSIZE, np.uint64(NET_HDR + size),
                                        *(np.zeros(1, np.uint64) for _ in range(4))))
    assert got == rounds * batch
    rx = rig.fe.rx()
    assert bytes(rig.fe.mem[rx.buf_off + NET_HDR : rx.buf_off + NET_HDR + size]) == make_frame(size).tobytes()


@rings
@params
def test_deliver(benchmark, rig_for, batch, size, ring):
    rig = rig_for(size, ring)
    rounds = rounds_for(batch)
    got = _bench(benchmark, "deliver", batch, size, rounds * batch,
                 lambda: deliver_rounds(rig.qs, rig.drv, rig.regions, rounds, batch, rig.tx_buf_hva, QSIZE,
                                        np.uint64(size), np.zeros(1, np.uint64), np.zeros(1, np.uint64),
                                        new_scratch()), ring)
    assert got == rounds * batch
    assert last_rx(rig)[1] == NET_HDR + size


@rings
@params
def test_forward(benchmark, rig_for, batch, size, ring):
    rig = rig_for(size, ring)
    rounds = rounds_for(batch)
    scratch, cap, rows = loop_scratch(0, np.zeros(8, np.uint64)), no_capture(), np.array([TX, RX], np.int64)
    busy = np.zeros(BUSY_SIZE, np.uint64)
    got = _bench(benchmark, "forward", batch, size, rounds * batch,
                 lambda: forward_rounds(rig.qs, rig.drv, rig.counters, rig.regions, rounds, batch, NET_HDR + size,
                                        scratch, cap, rows, busy),
                 ring)
    assert got == rounds * batch
    assert rig.counters[RX, C_DROPS] == 0 and rig.counters[TX, C_ERRORS] == 0
    assert rig.counters[RX, C_PACKETS] == rig.counters[TX, C_PACKETS]
    assert rig.counters[RX, C_CALLS] == 0 and rig.counters[TX, C_CALLS] == 0
    # the last frame delivered: virtio_net_hdr with num_buffers=1, then the frame
    head, ln = last_rx(rig)
    assert ln == NET_HDR + size
    buf = rig.fe.rx().buf(head)
    assert int(buf[10]) == 1 and bytes(buf[NET_HDR : NET_HDR + size]) == make_frame(size).tobytes()
