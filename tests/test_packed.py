"""Packed-ring kernels (vring.packed) against a short pure-Python model of virtio 1.2 §2.8.

The model pops chains (AVAIL/USED flag bits against the wrap counter, NEXT chains, indirect
tables, the buffer id of a chain's last descriptor), writes used elements in order (id and
len first, flags last, the batch's first element last of all; the position advances by the
chain's descriptor count and the wrap counter flips at the end of the ring) and decides
notifications (driver event suppression). Hypothesis builds random and hostile rings in the
guest memory of tests/test_split.py (same regions, region table and descriptor strategies) and
runs whole batches through both; after every step the kernel's results, its queue state and
every byte of guest memory must equal the model's. The hostile part runs again in a fresh
process with NUMBA_BOUNDSCHECK=1 and a fresh cache.
"""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
from boundscheck import check_boundscheck_on, run_under_boundscheck
from hypothesis import event, given, settings
from hypothesis import strategies as st

# Guest memory (regions backed by numpy arrays), its region table and the descriptor strategies
# are the split tests'; the descriptor table of the queue under test sits at MAIN_GPA in both.
from test_split import (
    ACTIVE,
    BIG,
    BIG_WRITABLE,
    BUFFERS,
    COMMON,
    GHOST,
    GUARD,
    MAIN_GPA,
    MAIN_HVA,
    PORT,
    R0,
    R1,
    R2,
    REGIONS,
    SENTINEL,
    TOP,
    U64,
    I,
    N,
    W,
    active_rows,
    at,
    descriptor,
    gwrite,
    make_qs,
    ref_translate,
    ref_translate_one,
    reset_memory,
    table_place,
)

from vring import packed as P
from vring.layout import (
    EVENT_SUPPRESS,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    SHADOW,
)
from vring.ring import avail_ahead as ring_avail_ahead
from vring.split import (
    BROKEN_ADDRESS,
    BROKEN_CHAIN_LEN,
    BROKEN_CHAIN_LOOP,
    BROKEN_DIRECTION,
    BROKEN_INDIRECT_LEN,
    BROKEN_INDIRECT_NESTED,
    BROKEN_INDIRECT_NEXT,
    BROKEN_TOO_MANY_SEGS,
    MAX_INDIRECT,
    MAX_SEGS,
)

AV, US = PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED
EMPTY = "empty"
SMALL = (R0, R1, R2, TOP, GHOST)  # regions compared byte for byte after every kernel call


def avail_bits(wrap: int) -> int:
    """§2.8.1: available in lap ``wrap`` means AVAIL == wrap and USED != wrap."""
    return AV if wrap else US


def used_bits(wrap: int, length: int = 0) -> int:
    """Flags of a used descriptor: AVAIL == USED == wrap; WRITE when the device wrote data (spec "Write Flag")."""
    return (AV | US if wrap else 0) | (W if length else 0)


def ppack(descs) -> bytes:
    """Packed descriptors (addr, len, id, flags)."""
    return b"".join(struct.pack("<QIHH", a % U64, ln, bid, fl) for a, ln, bid, fl in descs)


def read_desc(hva: int, i: int) -> tuple[int, int, int, int]:
    return struct.unpack("<QIHH", ctypes.string_at(hva + 16 * i, 16))


# ---------------------------------------------------------------------------------------------
# The model (Python ints, no wraparound; same check order as packed.py so broken codes compare)
# ---------------------------------------------------------------------------------------------
def ref_pop(rows, size, idx, wrap, writable, room):
    """EMPTY, a positive BROKEN_* code, or (pieces, total, buffer id, ndesc, new idx, new wrap)."""
    if not _is_avail(read_desc(MAIN_HVA, idx)[3], wrap):
        return EMPTY
    pieces, total, ndesc = [], 0, 0
    while True:
        if ndesc >= size:
            return BROKEN_CHAIN_LOOP  # a list is at most queue-size descriptors (Scatter-Gather Support)
        addr, ln, bid, fl = read_desc(MAIN_HVA, idx)  # the id of the list's last one counts (Next Flag)
        ndesc += 1
        idx, wrap = (0, wrap ^ 1) if idx + 1 == size else (idx + 1, wrap)
        if fl & I:
            if fl & N:
                return BROKEN_INDIRECT_NEXT
            if ln == 0 or ln % 16 or ln // 16 > MAX_INDIRECT:
                return BROKEN_INDIRECT_LEN
            table = ref_translate_one(rows, addr, ln)
            if table is None:
                return BROKEN_ADDRESS
            # Indirect Flag: entries are used in order (their NEXT and id ignored); WRITE of the
            # descriptor pointing at the table is ignored, each entry's own WRITE counts
            entries = [read_desc(table, i) for i in range(ln // 16)]
        else:
            entries = [(addr, ln, bid, fl)]
        for a, n, _, f in entries:
            if f & I:
                return BROKEN_INDIRECT_NESTED
            if bool(f & W) != bool(writable):
                return BROKEN_DIRECTION
            if n:
                p = ref_translate(rows, a, n, room - len(pieces))
                if isinstance(p, int):
                    return -p
                pieces += p
                total += n
                if total > 0xFFFFFFFF:
                    return BROKEN_CHAIN_LEN
        if not fl & N:
            return pieces, total, bid, ndesc, idx, wrap


def _is_avail(fl, wrap):
    return bool(fl & AV) == bool(wrap) and bool(fl & US) != bool(wrap)


def ref_begin(size, idx, wrap):
    """Descriptors available from (idx, wrap) on, at most packed.SCAN (begin's prefetch hint)."""
    n = 0
    while n < min(P.SCAN, size) and _is_avail(read_desc(MAIN_HVA, idx)[3], wrap):
        n += 1
        idx, wrap = (0, wrap ^ 1) if idx + 1 == size else (idx + 1, wrap)
    return n


class Model:
    """Queue state and the guest memory we expect (a copy of the small regions and BIG's ends)."""

    def __init__(self, size, la, aw, ui, uw):
        self.size = size
        self.la, self.aw, self.ui, self.uw = la, aw, ui, uw  # committed positions
        self.t = (la, aw)  # popped, not yet committed
        self.u = (ui, uw)
        self.u_count = 0
        self.head = None  # (offset in R2, flags) of the batch's first used element
        self.shadow = []  # used elements not yet written: (position, id, len, flags)
        self.mem = {id(r): r.array.copy() for r in SMALL}
        self.big = (BIG.array[:BIG_WRITABLE].copy(), BIG.array[-BIG_WRITABLE:].copy())

    def store(self, off_in_main, fmt, value):
        o = MAIN_GPA - R2.gpa + off_in_main
        b = struct.pack(fmt, value)
        self.mem[id(R2)][o : o + len(b)] = np.frombuffer(b, np.uint8)

    def begin(self):
        self.t, self.u, self.u_count, self.head = (self.la, self.aw), (self.ui, self.uw), 0, None
        self.shadow = []
        return ref_begin(self.size, self.la, self.aw)

    def pop(self, writable, room):
        r = ref_pop(active_rows(REGIONS, PORT), self.size, *self.t, writable, room)
        if isinstance(r, tuple):
            self.t = r[4], r[5]
        return r

    def put_used(self, bid, length, ndesc):
        """Kept back (the kernel's shadow) until publish, or until SHADOW elements wait."""
        idx, wrap = self.u
        if len(self.shadow) == SHADOW:
            self.flush()
        self.shadow.append((idx, bid, length, used_bits(wrap, length)))
        if self.u_count == 0:
            self.head = (16 * idx + 14, used_bits(wrap, length))  # the batch's first flags go last
        self.u_count += 1
        idx += ndesc
        self.u = (idx - self.size, wrap ^ 1) if idx >= self.size else (idx, wrap)

    def flush(self):
        for idx, bid, length, flags in self.shadow:
            self.store(16 * idx + 8, "<I", length)  # len and id first
            self.store(16 * idx + 12, "<H", bid)
            if 16 * idx + 14 != self.head[0]:
                self.store(16 * idx + 14, "<H", flags)
        self.shadow = []

    def publish(self):
        if self.u_count:
            self.flush()
            self.store(self.head[0], "<H", self.head[1])
            self.ui, self.uw = self.u
        self.la, self.aw = self.t
        self.u_count = 0

    def check_memory(self):
        for r in SMALL:
            diff = np.flatnonzero(r.array != self.mem[id(r)])
            assert diff.size == 0, f"unexpected guest write at gpa {r.gpa + int(diff[0]):#x}"
        assert (BIG.array[:BIG_WRITABLE] == self.big[0]).all() and (BIG.array[-BIG_WRITABLE:] == self.big[1]).all()

    def check_state(self, qs, committed_only=False):
        q = qs[0]
        assert (int(q["last_avail_idx"]), int(q["avail_wrap"])) == (self.la, self.aw)
        assert (int(q["used_idx"]), int(q["used_wrap"])) == (self.ui, self.uw)
        if not committed_only:
            assert (int(q["t_idx"]), int(q["t_wrap"])) == self.t
            assert (int(q["u_idx"]), int(q["u_wrap"])) == self.u
            assert int(q["u_count"]) == self.u_count


# ---------------------------------------------------------------------------------------------
# The kernels on a queue whose descriptor table is at MAIN_GPA
# ---------------------------------------------------------------------------------------------
def packed_qs(size, la=0, aw=1, ui=0, uw=1, driver=0, device=0, event_idx=0):
    """A packed queue's state record; both wrap counters start at 1 on a fresh ring (§2.8.1)."""
    qs = make_qs(size, avail=driver, used=device)
    q = qs[0]
    q["packed"], q["last_avail_idx"], q["avail_wrap"], q["used_idx"], q["used_wrap"] = 1, la, aw, ui, uw
    q["event_idx"] = event_idx
    return qs


def kernel_pop(qs, writable, cap, n0):
    """pop into seg arrays of capacity ``cap`` after ``n0`` used slots; results as the model gives them."""
    seg_hva = np.full(cap + GUARD, SENTINEL, np.uint64)
    seg_len = np.full(cap + GUARD, SENTINEL, np.uint64)
    n, total, bid, ndesc = P.pop(qs, 0, REGIONS, writable, seg_hva[:cap], seg_len[:cap], n0)
    n, total, bid, ndesc = int(n), int(total), int(bid), int(ndesc)
    assert (seg_hva[cap:] == SENTINEL).all() and (seg_len[cap:] == SENTINEL).all(), "wrote past the seg arrays"
    assert (seg_hva[:n0] == SENTINEL).all() and (seg_len[:n0] == SENTINEL).all(), "wrote before n0"
    if n == P.EMPTY:
        return EMPTY
    if n < 0:
        return -n
    assert n0 <= n <= cap
    pieces = list(zip(seg_hva[n0:n].tolist(), seg_len[n0:n].tolist(), strict=True))
    assert sum(ln for _, ln in pieces) == total
    for hva, ln in pieces:
        assert ln > 0 and any(r.hva <= hva and hva + ln <= r.hva + r.size for r in ACTIVE), "piece outside memory"
    q = qs[0]
    return pieces, total, bid, ndesc, int(q["t_idx"]), int(q["t_wrap"])


def run_batches(size, state, batches, writable, cap=MAX_SEGS, n0=0):
    """Run ``batches`` [(pops, [used lengths])] through kernel and model from ``state``; results seen."""
    qs = packed_qs(size, *state)
    m = Model(size, *state)
    seen = []
    for pops, lengths in batches:
        assert P.begin(qs, 0) == m.begin()
        m.check_state(qs)
        broken = False
        for j in range(pops):
            t_before = (int(qs[0]["t_idx"]), int(qs[0]["t_wrap"]), int(qs[0]["t_count"]))
            k = kernel_pop(qs, writable, cap, n0)
            r = m.pop(writable, cap - n0)
            assert k == r
            seen.append(r if not isinstance(r, tuple) else r[:4])
            if not isinstance(r, tuple):
                # nothing taken: the position stays (a broken queue is not touched again)
                assert (int(qs[0]["t_idx"]), int(qs[0]["t_wrap"]), int(qs[0]["t_count"])) == t_before
                broken = r != EMPTY
                break
            assert int(qs[0]["t_count"]) == t_before[2] + r[3]
            P.put_used(qs, 0, r[2], lengths[j % len(lengths)], r[3])
            m.put_used(r[2], lengths[j % len(lengths)], r[3])
            m.check_state(qs)
            m.check_memory()  # nothing written before publish (but a full shadow's elements)
        P.publish(qs, 0)
        m.publish()
        m.check_state(qs, committed_only=True)
        m.check_memory()
        if broken:
            break
    return seen


def ring(main, tables=None, **kw):
    """Lay out the descriptor table (and indirect tables {gpa: packed descs}); pop one chain with both."""
    reset_memory()
    for gpa, descs in (tables or {}).items():
        gwrite(gpa, ppack(descs))
    gwrite(MAIN_GPA, ppack(main))
    state = kw.pop("state", (0, 1, 0, 1))
    seen = run_batches(len(main), state, [(kw.pop("pops", 1), [7])], kw.pop("writable", 0), **kw)
    return seen[0] if len(seen) == 1 else seen


# ---------------------------------------------------------------------------------------------
# 1. Directed cases: kernel == model == expected (wrap counter 1, position 0 unless said)
# ---------------------------------------------------------------------------------------------
A1 = AV  # available in lap 1
T = R0.gpa + 0x100  # an indirect table's gpa
DIRECTED = {
    # availability
    "one buffer": ([(R0.gpa + 8, 100, 5, A1)], {}, {}, ([(at(R0, 8), 100)], 100, 5, 1)),
    "never made available": ([(R0.gpa, 1, 0, 0)], {}, {}, EMPTY),
    "used, not yet re-posted": ([(R0.gpa, 1, 0, AV | US)], {}, {}, EMPTY),
    "lap-0 bits in lap 1": ([(R0.gpa, 1, 0, US)], {}, {}, EMPTY),
    "lap-0 available": ([(R0.gpa, 1, 0, US)], {}, {"state": (0, 0, 0, 0)}, ([(at(R0), 1)], 1, 0, 1)),
    "unknown flag bits ignored": ([(R0.gpa, 1, 3, A1 | 0x7F78)], {}, {}, ([(at(R0), 1)], 1, 3, 1)),
    "write buffer": ([(R2.gpa, 1, 9, A1 | W)], {}, {"writable": 1}, ([(at(R2), 1)], 1, 9, 1)),
    "zero length": ([(U64 - 1, 0, 4, A1)], {}, {}, ([], 0, 4, 1)),
    # chains
    "chain id from last": (
        [(R0.gpa, 1, 100, A1 | N), (R0.gpa + 1, 2, 101, A1 | N), (R2.gpa, 3, 7, A1)], {}, {},
        ([(at(R0), 1), (at(R0, 1), 2), (at(R2), 3)], 6, 7, 3),
    ),
    "chain wraps the ring": (
        [(R0.gpa, 3, 0, US), (R0.gpa + 1, 1, 0, A1 | N), (R0.gpa + 2, 2, 8, A1 | N)], {},
        {"state": (1, 1, 1, 1)}, ([(at(R0, 1), 1), (at(R0, 2), 2), (at(R0), 3)], 6, 0, 3),
    ),
    "chain of queue size": ([(R0.gpa, 1, 0, A1 | N)] * 3 + [(R0.gpa, 1, 2, A1)], {}, {},
                            ([(at(R0), 1)] * 4, 4, 2, 4)),
    "chain longer than the queue": ([(R0.gpa, 1, 0, A1 | N)] * 4, {}, {}, BROKEN_CHAIN_LOOP),
    "loop of len-0 descs": ([(0, 0, 0, A1 | N)], {}, {}, BROKEN_CHAIN_LOOP),
    "non-head flags not checked": ([(R0.gpa, 1, 0, A1 | N), (R0.gpa, 1, 6, 0)], {}, {},
                                   ([(at(R0), 1), (at(R0), 1)], 2, 6, 2)),
    # addresses and lengths
    "span contiguous gpa": ([(R1.gpa - 4, 10, 0, A1)], {}, {}, ([(at(R0, 0xFFC), 4), (at(R1), 6)], 10, 0, 1)),
    "one byte into gap": ([(R1.end - 5, 6, 0, A1)], {}, {}, BROKEN_ADDRESS),
    "ghost row ignored": ([(GHOST.gpa, 1, 0, A1)], {}, {}, BROKEN_ADDRESS),
    "past 2**64": ([(U64 - 3, 4, 0, A1)], {}, {}, BROKEN_ADDRESS),
    "top of memory": ([(U64 - 3, 3, 0, A1)], {}, {}, ([(at(TOP, 0xFFD), 3)], 3, 0, 1)),
    "total exactly u32 max": ([(BIG.gpa, 0x8000_0000, 0, A1 | N), (BIG.gpa, 0x7FFF_FFFF, 1, A1)], {}, {},
                              ([(at(BIG), 0x8000_0000), (at(BIG), 0x7FFF_FFFF)], 0xFFFF_FFFF, 1, 2)),
    "total 4 GiB": ([(BIG.gpa, 0x8000_0000, 0, A1 | N), (BIG.gpa, 0x8000_0000, 1, A1)], {}, {}, BROKEN_CHAIN_LEN),
    "no room for a piece": ([(R0.gpa, 1, 0, A1)], {}, {"cap": 2, "n0": 2}, BROKEN_TOO_MANY_SEGS),
    # direction
    "read desc on write queue": ([(R0.gpa, 1, 0, A1)], {}, {"writable": 1}, BROKEN_DIRECTION),
    "write desc on read queue": ([(R0.gpa, 1, 0, A1 | W)], {}, {}, BROKEN_DIRECTION),
    "direction of len 0": ([(0, 0, 0, A1 | W)], {}, {}, BROKEN_DIRECTION),
    # indirect
    "indirect": ([(T, 32, 3, A1 | I)], {T: [(R0.gpa, 1, 0, N), (R2.gpa, 7, 0, 0)]}, {},
                 ([(at(R0), 1), (at(R2), 7)], 8, 3, 1)),
    "indirect WRITE flag ignored": ([(T, 16, 3, A1 | I | W)], {T: [(R0.gpa, 4, 0, 0)]}, {}, ([(at(R0), 4)], 4, 3, 1)),
    "indirect entry NEXT/id ignored": ([(T, 32, 3, A1 | I)], {T: [(R0.gpa, 1, 9, N), (R0.gpa, 1, 9, N)]}, {},
                                       ([(at(R0), 1), (at(R0), 1)], 2, 3, 1)),
    "chain then indirect": ([(R2.gpa, 2, 0, A1 | N), (T, 16, 4, A1 | I)], {T: [(R0.gpa, 4, 0, 0)]}, {},
                            ([(at(R2), 2), (at(R0), 4)], 6, 4, 2)),
    "INDIRECT|NEXT": ([(T, 16, 0, A1 | I | N), (R0.gpa, 1, 0, A1)], {T: [(R0.gpa, 1, 0, 0)]}, {},
                      BROKEN_INDIRECT_NEXT),
    "nested": ([(T, 16, 0, A1 | I)], {T: [(T, 16, 0, I)]}, {}, BROKEN_INDIRECT_NESTED),
    "table is the ring": ([(MAIN_GPA, 16, 0, A1 | I)], {}, {}, BROKEN_INDIRECT_NESTED),
    "indirect len 0": ([(T, 0, 0, A1 | I)], {}, {}, BROKEN_INDIRECT_LEN),
    "indirect len 24": ([(T, 24, 0, A1 | I)], {}, {}, BROKEN_INDIRECT_LEN),
    "indirect 1025 entries": ([(BIG.gpa, 16 * 1025, 0, A1 | I)], {}, {}, BROKEN_INDIRECT_LEN),
    "indirect 1024 entries": ([(BIG.gpa, 16 * 1024, 0, A1 | I)], {}, {}, ([], 0, 0, 1)),  # zeroed: len 0 each
    "indirect straddles regions": ([(R1.gpa - 16, 32, 0, A1 | I)], {}, {}, BROKEN_ADDRESS),
    "indirect past 2**64": ([(U64 - 16, 32, 0, A1 | I)], {}, {}, BROKEN_ADDRESS),
    "indirect in ghost": ([(GHOST.gpa, 16, 0, A1 | I)], {}, {}, BROKEN_ADDRESS),
    "indirect misaligned": ([(T + 3, 16, 0, A1 | I)], {T + 3: [(R0.gpa, 5, 0, 0)]}, {}, ([(at(R0), 5)], 5, 0, 1)),
    "indirect entry direction": ([(T, 16, 0, A1 | I)], {T: [(R0.gpa, 5, 0, 0)]}, {"writable": 1}, BROKEN_DIRECTION),
    "indirect 4 GiB": ([(T, 32, 0, A1 | I)], {T: [(BIG.gpa, 0x8000_0000, 0, 0)] * 2}, {}, BROKEN_CHAIN_LEN),
    "indirect piece outside": ([(T, 16, 0, A1 | I)], {T: [(R1.end - 1, 2, 0, 0)]}, {}, BROKEN_ADDRESS),
}


@pytest.mark.parametrize("name", list(DIRECTED))
def test_pop_directed(name):
    main, tables, kw, expected = DIRECTED[name]
    assert ring(main, tables, **kw) == expected


def test_pop_max_segs():
    """An indirect table of 1024 one-byte entries fills MAX_SEGS exactly; one more piece is refused."""
    entries = [(R0.gpa + i, 1, 0, 0) for i in range(1024)]
    ok = ring([(BIG.gpa, 16 * 1024, 0, A1 | I)], {BIG.gpa: entries})
    assert len(ok[0]) == MAX_SEGS and ok[1] == 1024
    entries[0] = (R1.gpa - 1, 2, 0, 0)  # spans R0/R1: 1025 pieces
    assert ring([(BIG.gpa, 16 * 1024, 0, A1 | I)], {BIG.gpa: entries}) == BROKEN_TOO_MANY_SEGS


def test_batch_publish_order_and_wrap():
    """Three chains (1, 2 and 1 descriptors) from position 2 of a 4-entry ring in lap 1.

    Used elements land at 2, 3 and 1 (the position advances by each chain's descriptor count and
    wraps to lap 0), all at publish (the shadow), each one's id and length before its flags and the
    first element's flags last, so the driver never sees part of a batch (as in "Multi-buffer
    requests"). WRITE marks the elements with data written (len > 0)."""
    reset_memory()
    main = [(R0.gpa, 3, 30, US), (R0.gpa, 4, 31, US), (R0.gpa, 1, 10, A1), (R0.gpa, 2, 20, A1 | N)]
    gwrite(MAIN_GPA, ppack(main))
    qs = packed_qs(4, la=2, aw=1, ui=2, uw=1)
    flags = lambda: [read_desc(MAIN_HVA, i)[3] for i in range(4)]  # noqa: E731
    assert P.begin(qs, 0) == 4
    got = [kernel_pop(qs, 0, 8, 0) for _ in range(3)]
    assert [g[2:4] for g in got] == [(10, 1), (30, 2), (31, 1)]  # ids of each chain's last descriptor
    assert kernel_pop(qs, 0, 8, 0) == EMPTY
    for g, ln in zip(got, (100, 0, 300), strict=True):
        P.put_used(qs, 0, g[2], ln, g[3])
    assert [read_desc(MAIN_HVA, i) for i in range(4)] == main  # nothing written yet
    assert qs[0]["last_avail_idx"] == 2 and qs[0]["used_idx"] == 2  # nothing committed
    P.publish(qs, 0)
    descs = [read_desc(MAIN_HVA, i) for i in range(4)]
    assert [(d[1], d[2]) for d in descs] == [(3, 30), (300, 31), (100, 10), (0, 30)]
    assert flags() == [US, W, AV | US | W, AV | US]  # 2 the head, 3 used in lap 1, 1 in lap 0
    q = qs[0]
    assert (q["last_avail_idx"], q["avail_wrap"], q["used_idx"], q["used_wrap"]) == (2, 0, 2, 0)


@pytest.mark.parametrize(
    ("lengths", "written", "flags_before"),
    [((0, 0, 0), {2: (0, 31)}, [US, US, A1, A1 | N]),  # all three folded into the head
     ((0, 0, 300), {2: (0, 30), 1: (300, 31)}, [US, W, A1, A1 | N])],  # data written: its own element
)
def test_in_order_folds_zero_length_elements(lengths, written, flags_before):
    """With IN_ORDER a batch's zero-length used elements (a TX ring's) become one: the head takes
    the last folded buffer id and the others are skipped (§2.8.9 "In-order"); the used position
    still advances by every chain's descriptors. An element with data is written on its own."""
    reset_memory()
    main = [(R0.gpa, 3, 30, US), (R0.gpa, 4, 31, US), (R0.gpa, 1, 10, A1), (R0.gpa, 2, 20, A1 | N)]
    gwrite(MAIN_GPA, ppack(main))
    qs = packed_qs(4, la=2, aw=1, ui=2, uw=1)
    qs[0]["in_order"] = 1
    flags = lambda: [read_desc(MAIN_HVA, i)[3] for i in range(4)]  # noqa: E731
    P.begin(qs, 0)
    got = [kernel_pop(qs, 0, 8, 0) for _ in range(3)]
    for g, ln in zip(got, lengths, strict=True):
        P.put_used(qs, 0, g[2], ln, g[3])
    assert [read_desc(MAIN_HVA, i) for i in range(4)] == main  # nothing written before publish
    P.publish(qs, 0)
    descs = [read_desc(MAIN_HVA, i) for i in range(4)]
    expect = [(d[1], d[2]) for d in main]
    for i, v in written.items():
        expect[i] = v
    assert [(d[1], d[2]) for d in descs] == expect
    after = list(flags_before)
    after[2] = AV | US
    assert flags() == after
    q = qs[0]
    assert (q["last_avail_idx"], q["avail_wrap"], q["used_idx"], q["used_wrap"]) == (2, 0, 2, 0)



def test_batch_longer_than_the_shadow():
    """A batch of more used elements than the shadow holds writes the first SHADOW when the next
    one comes (the batch's first flags still last, at publish), as the model does."""
    size = SHADOW + 20
    reset_memory()
    gwrite(MAIN_GPA, ppack([(R0.gpa + i, 1, i, A1) for i in range(size)]))
    seen = run_batches(size, (0, 1, 0, 1), [(SHADOW + 10, [5])], 0)
    assert [s[2] for s in seen] == list(range(SHADOW + 10))
    flags = [read_desc(MAIN_HVA, i)[3] for i in range(size)]
    assert flags == [AV | US | W] * (SHADOW + 10) + [A1] * 10


def make_available(size, la, aw, navail):
    """A main ring of ``size`` descriptors, ``navail`` of them available from ``la`` on for the
    driver wrap counter ``aw`` (flipped past the ring's end), the rest not."""
    reset_memory()
    main = [(R0.gpa, 1, 0, 0)] * size
    for i in range(navail):
        p = (la + i) % size
        main[p] = (R0.gpa, 1, 0, avail_bits(aw if p >= la else aw ^ 1))
    gwrite(MAIN_GPA, ppack(main))


@pytest.mark.parametrize(
    ("size", "la", "aw", "navail", "expected"),
    [(100, 0, 1, 100, P.SCAN), (100, 90, 1, 100, P.SCAN), (100, 90, 0, 12, 12), (64, 10, 1, 64, 64),
     (5, 3, 0, 5, 5), (5, 3, 1, 2, 2), (1, 0, 1, 1, 1), (1, 0, 0, 0, 0), (100, 50, 0, 0, 0)],
)
def test_begin_counts_available_descriptors(size, la, aw, navail, expected):
    """begin's prefetch hint: descriptors available from the next one on, across the ring's end
    (the wrap counter flips there), never more than SCAN or one lap."""
    make_available(size, la, aw, navail)
    qs = packed_qs(size, la=la, aw=aw, ui=(la + 1) % size, uw=aw)
    qs[0]["t_idx"], qs[0]["u_count"] = 7, 3  # left over from a batch: begin starts afresh
    assert P.begin(qs, 0) == expected
    q = qs[0]
    assert (q["t_idx"], q["t_wrap"], q["t_count"]) == (la, aw, 0)
    assert (q["u_idx"], q["u_wrap"], q["u_count"]) == ((la + 1) % size, aw, 0)


@pytest.mark.parametrize(
    ("size", "la", "aw", "navail"),
    [(100, 90, 0, 12), (64, 10, 1, 64), (16, 0, 1, 16), (5, 3, 1, 2), (1, 0, 1, 1), (1, 0, 0, 0)],
)
def test_avail_ahead_looks_at_the_kth_descriptor(size, la, aw, navail):
    """net's refill check (ring.avail_ahead on a packed ring): the k-th descriptor from the next
    one is available exactly when k are, across the ring's end (the wrap counter flips there)."""
    make_available(size, la, aw, navail)
    qs = packed_qs(size, la=la, aw=aw, ui=la, uw=aw)
    ks = range(1, size + 1)
    assert [bool(ring_avail_ahead(qs, 0, k)) for k in ks] == [k <= navail for k in ks]


def test_publish_without_used_elements_commits_pops_only():
    reset_memory()
    gwrite(MAIN_GPA, ppack([(R0.gpa, 1, 0, A1), (R0.gpa, 1, 1, A1)]))
    qs = packed_qs(2)
    P.begin(qs, 0)
    kernel_pop(qs, 0, 8, 0)
    before = bytes(R2.array)
    P.publish(qs, 0)
    assert bytes(R2.array) == before
    assert (qs[0]["last_avail_idx"], qs[0]["used_idx"], qs[0]["u_count"]) == (1, 0, 0)


# ---------------------------------------------------------------------------------------------
# 2. Hypothesis: random and hostile rings, whole batches, kernel == model, memory untouched
# ---------------------------------------------------------------------------------------------
@st.composite
def packed_desc(draw, tsize, targets, writable, tame):
    """(addr, len, id, flags): the split tests' hostile descriptor (its next becomes the buffer id),
    or, in a ``tame`` ring, mostly a well-formed one, so that chains and batches get long."""
    if tame and draw(st.integers(0, 4)):
        w = W if writable else 0
        gpa, ln = draw(BUFFERS[2])
        return gpa, ln, draw(st.integers(0, 0xFFFF)), draw(st.sampled_from([w, w, w | N]))
    a, ln, fl, nx = draw(descriptor(tsize, targets, writable))
    return a, ln, nx, fl


@st.composite
def packed_scenario(draw):
    size = draw(st.integers(1, 16))
    la, aw = draw(st.integers(0, size - 1)), draw(st.integers(0, 1))
    ui, uw = draw(st.integers(0, size - 1)), draw(st.integers(0, 1))
    tame = draw(st.booleans())
    tables = []
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.integers(1, 8))
        tables.append((draw(table_place(k)), k))
    targets = [*tables, (MAIN_GPA, size)]
    writable = draw(st.integers(0, 1))
    contents = [[draw(packed_desc(k, targets, writable, tame)) for _ in range(k)] for _, k in tables]
    main = []
    for p in range(size):
        a, ln, bid, fl = draw(packed_desc(size, targets, writable, tame))
        lap = aw if p >= la else aw ^ 1  # the driver's wrap counter at position p
        how = draw(st.sampled_from(["avail"] * (16 if tame else 4) + ["used", "stale", "raw"]))
        bits = {"avail": avail_bits(lap), "used": used_bits(lap), "stale": avail_bits(lap ^ 1)}.get(how)
        main.append((a, ln, bid, fl if bits is None else (fl & ~(AV | US)) | bits))
    lengths = draw(st.lists(st.integers(0, 0xFFFF_FFFF), min_size=1, max_size=3))
    batches = draw(st.lists(st.tuples(st.integers(1, size + 1), st.just(lengths)), min_size=1, max_size=3))
    cap = draw(st.integers(1, 10) | st.just(MAX_SEGS))
    n0 = draw(st.integers(0, min(cap, 3)))
    return (la, aw, ui, uw), tables, contents, main, batches, writable, cap, n0


def check_packed_scenario(sc):
    state, tables, contents, main, batches, writable, cap, n0 = sc
    reset_memory()
    for (gpa, _), descs in zip(tables, contents, strict=True):
        gwrite(gpa, ppack(descs))
    gwrite(MAIN_GPA, ppack(main))
    seen = run_batches(len(main), state, batches, writable, cap, n0)
    last = seen[-1] if seen else None
    event("no pop" if last is None else f"chains={sum(isinstance(s, tuple) for s in seen)} "
          f"end={'ok' if isinstance(last, tuple) else last}")


@settings(max_examples=500, **COMMON)
@given(packed_scenario())
def test_packed_batches_match_model(sc):
    check_packed_scenario(sc)


# ---------------------------------------------------------------------------------------------
# 3. Notifications: driver event suppression (§2.8.10 and the structure format) and device event suppression
# ---------------------------------------------------------------------------------------------
class Events:
    """A packed queue's two event suppression areas in numpy memory (no descriptor table needed)."""

    def __init__(self, size, ui=0, uw=1, event_idx=1):
        self.driver = np.zeros(1, EVENT_SUPPRESS)
        self.device = np.zeros(1, EVENT_SUPPRESS)
        self.qs = packed_qs(size, ui=ui, uw=uw, driver=self.driver.ctypes.data, device=self.device.ctypes.data,
                            event_idx=event_idx)

    def need_call(self, flags, off_wrap, pos, wrap):
        self.driver["flags"], self.driver["off_wrap"] = flags, off_wrap
        self.qs[0]["used_idx"], self.qs[0]["used_wrap"] = pos, wrap
        return bool(P.need_call(self.qs, 0))


def dpdk_need_call(st_, size, flags, off_wrap, new, wrap, event_idx):
    """DPDK's vhost_vring_call_packed (QEMU's virtio_packed_should_notify is the same): ``st_`` = [old, valid].

    The last signalled position is updated on every call with EVENT_IDX, whatever the flags."""
    flags &= 3
    if not event_idx:
        return flags != RING_EVENT_FLAGS_DISABLE
    old, valid = st_
    st_[:] = [new, True]
    if flags != RING_EVENT_FLAGS_DESC:
        return flags != RING_EVENT_FLAGS_DISABLE
    if not valid:
        return True
    off = off_wrap & 0x7FFF
    if new <= old:
        old -= size
    if wrap != off_wrap >> 15:
        off -= size
    return (new - off - 1) % 65536 < (new - old) % 65536


def spec_event_hit(size, first, last, off_wrap):
    """§2.8.10: did the device write the used descriptor at (off, wrap) among used positions
    [first, last) (linear counts, lap parity giving the wrap counter, lap 0 = wrap 1)?"""
    off, w = off_wrap & 0x7FFF, off_wrap >> 15
    return any(pos % size == off and 1 - (pos // size) % 2 == w for pos in range(first, last))


@pytest.mark.parametrize(("flags", "expected"), [(0, True), (1, False), (2, True), (3, True), (0xFFFD, False)])
@pytest.mark.parametrize("event_idx", [0, 1])
def test_need_call_flags(flags, expected, event_idx):
    """ENABLE calls, DISABLE never; DESC without EVENT_IDX is a plain enable; 2 reserved bits only."""
    e = Events(8, event_idx=event_idx)
    assert e.need_call(flags, 0x8000 | 5, 3, 1) is expected  # first call with EVENT_IDX: no history yet


@st.composite
def event_steps(draw):
    size = draw(st.sampled_from([1, 2, 3, 8, 256, 32768]))
    start = draw(st.integers(0, 2 * size - 1))  # linear position: lap parity gives the wrap counter
    steps = []
    for _ in range(draw(st.integers(1, 12))):
        adv = draw(st.integers(1, size) if draw(st.integers(0, 3)) else st.sampled_from([1, size]))
        flags = draw(st.sampled_from([RING_EVENT_FLAGS_DESC] * 3 + [RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE]))
        if draw(st.integers(0, 4)):
            off_wrap = draw(st.integers(0, size - 1)) | (draw(st.integers(0, 1)) << 15)
        else:
            off_wrap = draw(st.integers(0, 0xFFFF))  # hostile: an offset past the ring
        steps.append((adv, flags, off_wrap))
    return size, start, steps


@settings(max_examples=400, **COMMON)
@given(event_steps())
def test_need_call_event_idx_matches_spec(sc):
    """With EVENT_IDX, a sequence of batches (1..size used descriptors each) and driver settings:
    the kernel calls exactly when the DPDK/QEMU formula does, and for a valid event offset exactly
    when the descriptor the driver named was written since the previous check."""
    size, pos, steps = sc
    e = Events(size, ui=pos % size, uw=1 - (pos // size) % 2)
    ref = [0, False]
    for i, (adv, flags, off_wrap) in enumerate(steps):
        first, pos = pos, pos + adv
        new, wrap = pos % size, 1 - (pos // size) % 2
        got = e.need_call(flags, off_wrap, new, wrap)
        assert got is dpdk_need_call(ref, size, flags, off_wrap, new, wrap, 1)
        if i > 0 and flags == RING_EVENT_FLAGS_DESC and (off_wrap & 0x7FFF) < size:
            assert got is spec_event_hit(size, first, pos, off_wrap)
        assert e.qs[0]["signalled_used"] == new and e.qs[0]["signalled_valid"] == 1


@pytest.mark.parametrize("event_idx", [0, 1])
def test_set_kicks(event_idx):
    e = Events(8, event_idx=event_idx)
    e.device["off_wrap"] = 0x1234
    P.set_kicks(e.qs, 0, 0)
    assert e.device["flags"][0] == RING_EVENT_FLAGS_DISABLE and e.qs[0]["kicks_on"] == 0
    P.set_kicks(e.qs, 0, 1)
    assert e.device["flags"][0] == RING_EVENT_FLAGS_ENABLE and e.qs[0]["kicks_on"] == 1
    assert e.device["off_wrap"][0] == 0x1234 and e.driver.tobytes() == bytes(4)  # the driver's area untouched


@settings(max_examples=400, **COMMON)
@given(st.sampled_from([1, 2, 3, 8, 256, 32768]), st.data())
def test_driver_must_kick_matches_spec(size, data):
    """The driver's side (our front-end and generator): with EVENT_IDX and DESC, a batch of n
    posted descriptors kicks exactly when it holds the position the device named, in either lap
    of the wrap counter and across a wrap; without them, flags alone decide."""
    first = data.draw(st.integers(0, 4 * size - 1))  # linear position: lap parity gives the wrap counter
    n = data.draw(st.integers(1, size))
    last = first + n
    avail_idx, avail_wrap = last % size, 1 - (last // size) % 2
    off_wrap = data.draw(st.integers(0, size - 1)) | (data.draw(st.integers(0, 1)) << 15)
    got = P.driver_must_kick(RING_EVENT_FLAGS_DESC, off_wrap, 1, avail_idx, avail_wrap, size, n)
    assert got is spec_event_hit(size, first, last, off_wrap)
    for flags, kick in ((RING_EVENT_FLAGS_ENABLE, True), (RING_EVENT_FLAGS_DISABLE, False), (3, True)):
        assert P.driver_must_kick(flags, off_wrap, 1, avail_idx, avail_wrap, size, n) is kick
    assert P.driver_must_kick(RING_EVENT_FLAGS_DESC, off_wrap, 0, avail_idx, avail_wrap, size, n) is True


# ---------------------------------------------------------------------------------------------
# 4. The same hostile inputs with NUMBA_BOUNDSCHECK=1 in a fresh process and a fresh cache
# ---------------------------------------------------------------------------------------------


@settings(max_examples=120, **COMMON)
@given(packed_scenario())
def _hostile_random(sc):
    check_packed_scenario(sc)


@settings(max_examples=60, **COMMON)
@given(event_steps())
def _events_random(sc):
    test_need_call_event_idx_matches_spec.hypothesis.inner_test(sc)


def test_hostile_subset():
    """Directed cases, random hostile rings and batches, event suppression at the extremes.

    Also run by test_no_out_of_bounds_under_numba_boundscheck in a process with NUMBA_BOUNDSCHECK=1."""
    check_boundscheck_on()
    for name in DIRECTED:
        main, tables, kw, expected = DIRECTED[name]
        assert ring(main, tables, **kw) == expected
    test_pop_max_segs()
    test_batch_publish_order_and_wrap()
    _hostile_random()
    _events_random()
    e = Events(32768, ui=32767, uw=0)
    assert e.need_call(RING_EVENT_FLAGS_DESC, 0xFFFF, 32767, 0) is True
    assert e.need_call(RING_EVENT_FLAGS_DESC, 0xFFFF, 0, 1) is False


def test_no_out_of_bounds_under_numba_boundscheck(tmp_path):
    run_under_boundscheck(__file__, "test_hostile_subset", tmp_path)
