"""Split-ring kernels (vring.split) against a short pure-Python model, hostile tables, ring indexes.

Guest memory is a handful of numpy arrays standing in for mapped regions: their addresses are
the hvas in the region table the kernels get. walk_chain never touches buffer bytes, only
descriptor tables, so a region can be big (3 GiB, lazily zero-filled) to reach the 4 GiB chain
limit without using memory.
"""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
from boundscheck import check_boundscheck_on, run_under_boundscheck
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vring.layout import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    SHADOW,
    avail_dtype,
    new_qstate,
    used_dtype,
)
from vring.memory import MAX_REGIONS
from vring.ring import avail_ahead as ring_avail_ahead
from vring.ring import begin as ring_begin
from vring.ring import peek_one as ring_peek_one
from vring.ring import pop as ring_pop
from vring.ring import take_one as ring_take_one
from vring.split import (
    BROKEN_ADDRESS,
    BROKEN_AVAIL_JUMP,
    BROKEN_CHAIN_LEN,
    BROKEN_CHAIN_LOOP,
    BROKEN_DIRECTION,
    BROKEN_HEAD_RANGE,
    BROKEN_INDIRECT_LEN,
    BROKEN_INDIRECT_NESTED,
    BROKEN_INDIRECT_NEXT,
    BROKEN_NEXT_RANGE,
    BROKEN_TOO_MANY_SEGS,
    MAX_INDIRECT,
    MAX_SEGS,
    avail_count,
    avail_head,
    flush_used,
    need_call,
    publish_used,
    put_used,
    set_kicks,
    translate,
    translate_one,
    walk_chain,
)

N, W, I = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT  # noqa: E741 (short names keep the chain tables legible)
U64 = 2**64
SENTINEL = 0xDEADBEEFDEADBEEF
GUARD = 4  # extra seg slots past the capacity the kernel sees; must stay untouched


# ---------------------------------------------------------------------------------------------
# Guest memory: regions backed by numpy arrays
# ---------------------------------------------------------------------------------------------
class Reg:
    def __init__(self, gpa: int, size: int):
        self.gpa, self.size = gpa, size
        self.array = np.zeros(size, np.uint8)  # large ones are lazily zero-filled pages
        self.hva = int(self.array.ctypes.data)

    @property
    def end(self) -> int:
        return self.gpa + self.size


R0 = Reg(0x10000, 0x1000)
R1 = Reg(0x11000, 0x1000)  # contiguous with R0 in gpa, elsewhere in host memory
R2 = Reg(0x20000, 0x1000)  # after a gap
BIG = Reg(0x1_0000_0000, 0xC000_0000)  # 3 GiB, only its first/last 64 KiB are ever written
TOP = Reg(U64 - 0x1000, 0x1000)  # ends exactly at 2**64 (the control plane allows that)
GHOST = Reg(0x30000, 0x1000)  # in a row after the empty row: must be ignored
ACTIVE = [R0, R1, R2, BIG, TOP]
BACKED = [*ACTIVE, GHOST]
BIG_WRITABLE = 0x10000  # bytes at each end of BIG that tests may write (and that get re-zeroed)

# Port 0 is empty, port 1 holds the layout: qstate mem=1 must select it.
REGIONS = np.zeros((2, MAX_REGIONS, 4), np.uint64)
for _i, _r in enumerate(ACTIVE):
    REGIONS[1, _i] = (_r.gpa, _r.size, 0x7F00_0000_0000 + _r.gpa % 2**40, _r.hva)
REGIONS[1, len(ACTIVE) + 1] = (GHOST.gpa, GHOST.size, 0, GHOST.hva)  # row len(ACTIVE) stays empty
PORT = 1

MAIN_GPA = R2.gpa + 0x800  # the queue's own descriptor table (<= 16 entries here)
MAIN_HVA = R2.hva + 0x800


def gwrite(gpa: int, data: bytes) -> None:
    """Write guest bytes (through the backing arrays, ghost included)."""
    while data:
        for r in BACKED:
            if r.gpa <= gpa < r.end:
                off = gpa - r.gpa
                k = min(len(data), r.size - off)
                if r is BIG:
                    assert off + k <= BIG_WRITABLE or off >= BIG.size - BIG_WRITABLE
                r.array[off : off + k] = np.frombuffer(data[:k], np.uint8)
                gpa, data = gpa + k, data[k:]
                break
        else:
            raise AssertionError(f"test bug: gpa {gpa:#x} not backed")


def reset_memory() -> None:
    for r in (R0, R1, R2, TOP, GHOST):
        r.array[:] = 0
    BIG.array[:BIG_WRITABLE] = 0
    BIG.array[-BIG_WRITABLE:] = 0


def pack(descs) -> bytes:
    return b"".join(struct.pack("<QIHH", a % U64, ln, fl, nx) for a, ln, fl, nx in descs)


# ---------------------------------------------------------------------------------------------
# Reference model of walk_chain (same check order as split.py, Python ints: no wraparound)
# ---------------------------------------------------------------------------------------------
def active_rows(regions, mem):
    rows = []
    for gpa, size, _uaddr, hva in regions[mem].tolist():
        if size == 0:
            break
        rows.append((gpa, size, hva))
    return rows


def ref_translate(rows, gpa, length, room):
    """Pieces of [gpa, gpa+length) or -code; ``room`` = free seg slots."""
    pieces = []
    while length > 0:
        for base, size, hva in rows:
            if base <= gpa < base + size:
                if len(pieces) >= room:
                    return -BROKEN_TOO_MANY_SEGS
                k = min(length, base + size - gpa)
                pieces.append((hva + gpa - base, k))
                gpa, length = gpa + k, length - k
                break
        else:
            return -BROKEN_ADDRESS
    return pieces


def ref_translate_one(rows, gpa, length):
    for base, size, hva in rows:
        if base <= gpa and gpa + length <= base + size:
            return hva + gpa - base
    return None


def ref_walk(rows, table, size, head, writable, room):
    """(pieces, total) or a positive BROKEN_* code."""
    budget, tsize, indirect, idx, total, pieces = size, size, False, head, 0, []
    while True:
        if budget == 0:
            return BROKEN_CHAIN_LOOP
        budget -= 1
        addr, ln, fl, nx = struct.unpack("<QIHH", ctypes.string_at(table + 16 * idx, 16))
        if fl & I:
            if indirect:
                return BROKEN_INDIRECT_NESTED
            if fl & N:
                return BROKEN_INDIRECT_NEXT
            if ln == 0 or ln % 16 or ln // 16 > MAX_INDIRECT:
                return BROKEN_INDIRECT_LEN
            table = ref_translate_one(rows, addr, ln)
            if table is None:
                return BROKEN_ADDRESS
            tsize = budget = ln // 16
            indirect, idx = True, 0
            continue
        if bool(fl & W) != bool(writable):
            return BROKEN_DIRECTION
        if ln:
            p = ref_translate(rows, addr, ln, room - len(pieces))
            if isinstance(p, int):
                return -p
            pieces += p
            total += ln
            if total > 0xFFFFFFFF:
                return BROKEN_CHAIN_LEN
        if not fl & N:
            return pieces, total
        if nx >= tsize:
            return BROKEN_NEXT_RANGE
        idx = nx


# ---------------------------------------------------------------------------------------------
# Running the kernel
# ---------------------------------------------------------------------------------------------
def make_qs(size, desc=MAIN_HVA, avail=0, used=0, mem=PORT):
    qs = new_qstate(1)
    qs[0]["size"], qs[0]["desc"], qs[0]["avail"], qs[0]["used"], qs[0]["mem"] = size, desc, avail, used, mem
    return qs


def kernel_walk(size, head, writable, cap=MAX_SEGS, n0=0, regions=REGIONS, mem=PORT):
    """walk_chain on the table at MAIN_HVA; (pieces, total) or a positive code. Checks the seg arrays."""
    qs = make_qs(size, mem=mem)
    seg_hva = np.full(cap + GUARD, SENTINEL, np.uint64)
    seg_len = np.full(cap + GUARD, SENTINEL, np.uint64)
    n, total = walk_chain(qs, 0, regions, head, writable, seg_hva[:cap], seg_len[:cap], n0)
    n, total = int(n), int(total)
    assert (seg_hva[cap:] == SENTINEL).all() and (seg_len[cap:] == SENTINEL).all(), "wrote past the seg arrays"
    assert (seg_hva[:n0] == SENTINEL).all() and (seg_len[:n0] == SENTINEL).all(), "wrote before n0"
    if n < 0:
        assert total == 0
        return -n
    assert n0 <= n <= cap
    pieces = list(zip(seg_hva[n0:n].tolist(), seg_len[n0:n].tolist()))
    assert sum(ln for _, ln in pieces) == total
    return pieces, total


def walk_both(size, head=0, writable=0, cap=MAX_SEGS, n0=0, regions=REGIONS, mem=PORT):
    k = kernel_walk(size, head, writable, cap, n0, regions, mem)
    r = ref_walk(active_rows(regions, mem), MAIN_HVA, size, head, writable, cap - n0)
    assert k == r
    for piece_hva, piece_len in (k[0] if isinstance(k, tuple) else []):
        assert piece_len > 0
        assert any(b.hva <= piece_hva and piece_hva + piece_len <= b.hva + b.size for b in ACTIVE), (
            f"piece {piece_hva:#x}+{piece_len:#x} outside mapped memory"
        )
    return k


def chain(main, tables=None, size=None, **kw):
    """Lay out the main table (and indirect tables {gpa: descs}), walk it with both."""
    reset_memory()
    for gpa, descs in (tables or {}).items():
        gwrite(gpa, pack(descs))
    gwrite(MAIN_GPA, pack(main))
    return walk_both(size or len(main), **kw)


def at(r: Reg, off: int = 0) -> int:
    return r.hva + off


# ---------------------------------------------------------------------------------------------
# 1. Directed walk_chain cases: kernel == reference == expected
# ---------------------------------------------------------------------------------------------
T = R0.gpa + 0x100  # an indirect table's gpa
DIRECTED = {
    # plain buffers
    "one buffer": ([(R0.gpa + 8, 100, 0, 0)], {}, {}, ([(at(R0, 8), 100)], 100)),
    "write buffer": ([(R2.gpa, 1, W, 0)], {}, {"writable": 1}, ([(at(R2), 1)], 1)),
    "span contiguous gpa": ([(R1.gpa - 4, 10, 0, 0)], {}, {}, ([(at(R0, 0xFFC), 4), (at(R1), 6)], 10)),
    "ends at region end": ([(R1.end - 5, 5, 0, 0)], {}, {}, ([(at(R1, 0xFFB), 5)], 5)),
    "one byte into gap": ([(R1.end - 5, 6, 0, 0)], {}, {}, BROKEN_ADDRESS),
    "before first region": ([(R0.gpa - 1, 1, 0, 0)], {}, {}, BROKEN_ADDRESS),
    "len 0 anywhere": ([(U64 - 1, 0, 0, 0)], {}, {}, ([], 0)),
    "ghost row ignored": ([(GHOST.gpa, 1, 0, 0)], {}, {}, BROKEN_ADDRESS),
    "top of memory": ([(U64 - 3, 3, 0, 0)], {}, {}, ([(at(TOP, 0xFFD), 3)], 3)),
    "past 2**64": ([(U64 - 3, 4, 0, 0)], {}, {}, BROKEN_ADDRESS),
    "whole u32 len": ([(BIG.gpa, 0xFFFFFFFF, 0, 0)], {}, {}, BROKEN_ADDRESS),  # BIG is 3 GiB
    "3 GiB buffer": ([(BIG.gpa, 0xC000_0000, 0, 0)], {}, {}, ([(at(BIG), 0xC000_0000)], 0xC000_0000)),
    "unknown flag bits ignored": ([(R0.gpa, 1, 0xFFF8, 0)], {}, {}, ([(at(R0), 1)], 1)),
    # chains and budget
    "full-length chain": (
        [(R0.gpa, 1, N, 1), (R0.gpa + 1, 1, N, 2), (R0.gpa + 2, 1, N, 3), (R2.gpa, 2, 0, 0)],
        {}, {}, ([(at(R0), 1), (at(R0, 1), 1), (at(R0, 2), 1), (at(R2), 2)], 5),
    ),
    "self loop": ([(R0.gpa, 1, N, 0), (0, 0, 0, 0)], {}, {}, BROKEN_CHAIN_LOOP),
    "loop via len-0 descs": ([(0, 0, N, 1), (0, 0, N, 0)], {}, {}, BROKEN_CHAIN_LOOP),
    "next == size": ([(R0.gpa, 1, N, 2), (0, 0, 0, 0)], {}, {}, BROKEN_NEXT_RANGE),
    "next 0xffff": ([(R0.gpa, 1, N, 0xFFFF)], {}, {}, BROKEN_NEXT_RANGE),
    "head not first": ([(0, 0, 0, 0), (R0.gpa, 3, 0, 0)], {}, {"head": 1}, ([(at(R0), 3)], 3)),
    # direction
    "read desc on write queue": ([(R0.gpa, 1, 0, 0)], {}, {"writable": 1}, BROKEN_DIRECTION),
    "write desc on read queue": ([(R0.gpa, 1, W, 0)], {}, {}, BROKEN_DIRECTION),
    "mixed chain": ([(R0.gpa, 1, N, 1), (R0.gpa, 1, W, 0)], {}, {}, BROKEN_DIRECTION),
    "direction before address": ([(GHOST.gpa, 1, W, 0)], {}, {}, BROKEN_DIRECTION),
    "direction of len 0": ([(0, 0, W, 0)], {}, {}, BROKEN_DIRECTION),
    "address before next range": ([(GHOST.gpa, 1, N, 9)], {}, {}, BROKEN_ADDRESS),
    # 4 GiB limit
    "total exactly u32 max": (
        [(BIG.gpa, 0x8000_0000, N, 1), (BIG.gpa, 0x7FFF_FFFF, 0, 0)], {}, {},
        ([(at(BIG), 0x8000_0000), (at(BIG), 0x7FFF_FFFF)], 0xFFFF_FFFF),
    ),
    "total 4 GiB": ([(BIG.gpa, 0x8000_0000, N, 1), (BIG.gpa, 0x8000_0000, 0, 0)], {}, {}, BROKEN_CHAIN_LEN),
    "chain len before next range": (
        [(BIG.gpa, 0x8000_0000, N, 1), (BIG.gpa, 0x8000_0000, N, 7)], {}, {}, BROKEN_CHAIN_LEN,
    ),
    # segment capacity
    "no room, mapped": ([(R0.gpa, 1, 0, 0)], {}, {"cap": 2, "n0": 2}, BROKEN_TOO_MANY_SEGS),
    "no room, unmapped": ([(GHOST.gpa, 1, 0, 0)], {}, {"cap": 2, "n0": 2}, BROKEN_ADDRESS),
    "no room, len 0": ([(R0.gpa, 0, 0, 0)], {}, {"cap": 2, "n0": 2}, ([], 0)),
    "last slot": ([(R0.gpa, 1, 0, 0)], {}, {"cap": 3, "n0": 2}, ([(at(R0), 1)], 1)),
    "span needs two slots": ([(R1.gpa - 1, 2, 0, 0)], {}, {"cap": 3, "n0": 2}, BROKEN_TOO_MANY_SEGS),
    "room then unmapped": ([(R1.end - 1, 2, 0, 0)], {}, {"cap": 3, "n0": 2}, BROKEN_ADDRESS),
    # indirect
    "indirect": (
        [(T, 48, I, 0)],
        {T: [(R0.gpa, 1, N, 2), (0, 0, 0, 0), (R2.gpa, 7, 0, 0)]}, {},
        ([(at(R0), 1), (at(R2), 7)], 8),
    ),
    "indirect WRITE flag ignored": (
        [(T, 16, I | W, 0)], {T: [(R0.gpa, 4, 0, 0)]}, {}, ([(at(R0), 4)], 4),
    ),
    "direct then indirect": (
        [(R2.gpa, 2, N, 1), (T, 16, I, 0)], {T: [(R0.gpa, 4, 0, 0)]}, {}, ([(at(R2), 2), (at(R0), 4)], 6),
    ),
    "indirect table is the main table": ([(MAIN_GPA, 16, I, 0)], {}, {}, BROKEN_INDIRECT_NESTED),
    "nested": ([(T, 16, I, 0)], {T: [(T, 16, I, 0)]}, {}, BROKEN_INDIRECT_NESTED),
    "nested before INDIRECT|NEXT": ([(T, 16, I, 0)], {T: [(T, 0, I | N, 0)]}, {}, BROKEN_INDIRECT_NESTED),
    "INDIRECT|NEXT": ([(T, 16, I | N, 0)], {T: [(R0.gpa, 1, 0, 0)]}, {}, BROKEN_INDIRECT_NEXT),
    "INDIRECT|NEXT before len": ([(GHOST.gpa, 0, I | N, 0)], {}, {}, BROKEN_INDIRECT_NEXT),
    "indirect len 0": ([(T, 0, I, 0)], {}, {}, BROKEN_INDIRECT_LEN),
    "indirect len 24": ([(T, 24, I, 0)], {}, {}, BROKEN_INDIRECT_LEN),
    "indirect len 1025 entries": ([(BIG.gpa, 16 * 1025, I, 0)], {}, {}, BROKEN_INDIRECT_LEN),
    "indirect len before address": ([(GHOST.gpa, 17, I, 0)], {}, {}, BROKEN_INDIRECT_LEN),
    "indirect 1024 entries": ([(BIG.gpa, 16 * 1024, I, 0)], {}, {}, ([], 0)),  # zeroed: one len-0 entry
    "indirect straddles regions": ([(R1.gpa - 16, 32, I, 0)], {}, {}, BROKEN_ADDRESS),
    "indirect past 2**64": ([(U64 - 16, 32, I, 0)], {}, {}, BROKEN_ADDRESS),
    "indirect at 2**64 - 16": ([(U64 - 16, 16, I, 0)], {U64 - 16: [(R0.gpa, 2, 0, 0)]}, {}, ([(at(R0), 2)], 2)),
    "indirect in ghost": ([(GHOST.gpa, 16, I, 0)], {}, {}, BROKEN_ADDRESS),
    "indirect next >= entries": (
        [(T, 32, I, 0), (0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)],
        {T: [(R0.gpa, 1, N, 2), (0, 0, 0, 0)]}, {}, BROKEN_NEXT_RANGE,
    ),
    "indirect loop": (
        [(T, 32, I, 0), (0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)],
        {T: [(R0.gpa, 1, N, 1), (R0.gpa, 1, N, 0)]}, {}, BROKEN_CHAIN_LOOP,
    ),
    "indirect chain uses all entries": (
        [(T, 32, I, 0)], {T: [(R0.gpa, 1, N, 1), (R0.gpa, 1, 0, 0)]}, {}, ([(at(R0), 1), (at(R0), 1)], 2),
    ),
    "indirect unaligned table": ([(T + 3, 16, I, 0)], {T + 3: [(R0.gpa, 5, 0, 0)]}, {}, ([(at(R0), 5)], 5)),
    "indirect direction": ([(T, 16, I, 0)], {T: [(R0.gpa, 5, 0, 0)]}, {"writable": 1}, BROKEN_DIRECTION),
}


@pytest.mark.parametrize("name", list(DIRECTED))
def test_walk_chain_directed(name):
    main, tables, kw, expected = DIRECTED[name]
    assert chain(main, tables, **kw) == expected


def test_walk_chain_port_selection():
    reset_memory()
    gwrite(MAIN_GPA, pack([(R0.gpa, 8, 0, 0)]))
    assert walk_both(1, mem=1) == ([(at(R0), 8)], 8)
    assert walk_both(1, mem=0) == BROKEN_ADDRESS  # port 0's table is empty


def test_walk_chain_appends_after_n0():
    reset_memory()
    gwrite(MAIN_GPA, pack([(R1.gpa - 1, 2, N, 1), (R2.gpa, 3, 0, 0)]))
    assert walk_both(2, cap=8, n0=5) == ([(at(R0, 0xFFF), 1), (at(R1), 1), (at(R2), 3)], 5)


def test_walk_chain_max_segs():
    """1024 one-byte entries fill MAX_SEGS exactly; one more piece is refused."""
    assert MAX_INDIRECT == 1024 and MAX_SEGS == 1024
    entries = [(R0.gpa + i % 0x1000, 1, N, i + 1) for i in range(1023)] + [(R0.gpa, 1, 0, 0)]
    ok = chain([(BIG.gpa, 16 * 1024, I, 0)], {BIG.gpa: entries})
    assert len(ok[0]) == 1024 and ok[1] == 1024
    entries[0] = (R1.gpa - 1, 2, N, 1)  # spans R0/R1: 1025 pieces
    assert chain([(BIG.gpa, 16 * 1024, I, 0)], {BIG.gpa: entries}) == BROKEN_TOO_MANY_SEGS


def test_translate_and_translate_one():
    out_hva = np.zeros(4, np.uint64)
    out_len = np.zeros(4, np.uint64)
    assert translate(REGIONS, PORT, R1.gpa - 2, 6, out_hva, out_len, 1) == 3
    assert out_hva[1:3].tolist() == [at(R0, 0xFFE), at(R1)] and out_len[1:3].tolist() == [2, 4]
    assert translate(REGIONS, PORT, R1.gpa - 2, 6, out_hva, out_len, 3) == -BROKEN_TOO_MANY_SEGS
    assert translate(REGIONS, PORT, R1.end - 2, 6, out_hva, out_len, 0) == -BROKEN_ADDRESS
    assert translate(REGIONS, PORT, GHOST.gpa, 1, out_hva, out_len, 0) == -BROKEN_ADDRESS
    assert translate(REGIONS, PORT, 12345, 0, out_hva, out_len, 2) == 2
    assert translate_one(REGIONS, PORT, R0.gpa, 0x1000) == at(R0)
    assert translate_one(REGIONS, PORT, R0.gpa + 1, 0x1000) == 0  # contiguous gpa is not enough
    assert translate_one(REGIONS, PORT, np.uint64(U64 - 16), 16) == at(TOP, 0xFF0)
    assert translate_one(REGIONS, PORT, np.uint64(U64 - 16), 17) == 0
    assert translate_one(REGIONS, PORT, GHOST.gpa, 1) == 0
    assert translate_one(REGIONS, 0, R0.gpa, 1) == 0


# A front-end may register a region ending exactly at 2**64 (memory._check_fits allows it) and
# one at gpa 0. translate's `gpa += k` then wraps from 2**64 to 0 and carries on in the region at
# 0, so a buffer that runs past the top of the address space is accepted. GuestMemory.gpa_pieces
# (Python ints) refuses the same buffer. The pieces still lie in mapped memory: not a memory
# safety hole, but the kernel accepts a buffer that does not exist.
WRAP_REGIONS = np.zeros((1, MAX_REGIONS, 4), np.uint64)
WRAP_REGIONS[0, 0] = (TOP.gpa, TOP.size, 0, TOP.hva)
WRAP_REGIONS[0, 1] = (0, R0.size, 0x1000, R0.hva)


def test_translate_refuses_buffer_wrapping_past_2_64():
    out_hva = np.zeros(4, np.uint64)
    out_len = np.zeros(4, np.uint64)
    assert translate(WRAP_REGIONS, 0, np.uint64(U64 - 8), 16, out_hva, out_len, 0) == -BROKEN_ADDRESS


def test_walk_chain_refuses_buffer_wrapping_past_2_64():
    reset_memory()
    gwrite(MAIN_GPA, pack([(U64 - 8, 16, 0, 0)]))
    # kernel: ([(TOP.hva + 0xff8, 8), (R0.hva, 8)], 16); model and GuestMemory: no such buffer
    assert walk_both(1, regions=WRAP_REGIONS, mem=0) == BROKEN_ADDRESS


# ---------------------------------------------------------------------------------------------
# 2. Hypothesis: random and hostile tables, kernel == model, pieces inside mapped memory
# ---------------------------------------------------------------------------------------------
EDGES = sorted({r.gpa for r in BACKED} | {r.end % U64 for r in BACKED} | {MAIN_GPA, U64 - 0x10000})


def _inside(r: Reg):
    return st.integers(r.gpa, r.end - 1)


GPAS = st.one_of(
    st.sampled_from([R0, R1, R2, TOP]).flatmap(_inside),
    st.integers(BIG.gpa, BIG.gpa + 0x10000) | st.integers(BIG.end - 0x10000, BIG.end - 1),
    st.builds(lambda e, d: (e + d) % U64, st.sampled_from(EDGES), st.integers(-40, 40)),
    st.integers(0, U64 - 1),
    st.integers(U64 - 64, U64 - 1),
)
LENS = st.one_of(
    st.just(0),
    st.integers(1, 40),
    st.integers(1, 0x2100),
    st.sampled_from([0x7FFF_FFFF, 0x8000_0000, 0x8000_0001, 0xBFFF_0000, 0xC000_0000, 0xFFFF_FFFF]),
    st.integers(0, 0xFFFF_FFFF),
)
IND_LENS = st.one_of(
    st.integers(0, 12).map(lambda k: 16 * k),
    st.integers(0, 0x40),
    st.sampled_from([16 * MAX_INDIRECT, 16 * MAX_INDIRECT + 16, 0xFFFF_FFF0]),
)
FLAGS = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
BUFFERS = [
    st.tuples(GPAS, LENS),
    st.tuples(st.integers(BIG.gpa, BIG.gpa + 0x4000_0000), st.integers(0x4000_0000, 0xFFFF_FFFF)),  # 4 GiB
    st.tuples(st.sampled_from([R0, R1, R2, TOP]).flatmap(_inside), st.integers(0, 0x100)),  # mostly fine
]


@st.composite
def descriptor(draw, tsize, tables, writable):
    """A descriptor, valid-looking for a ``writable`` queue often enough to build long chains."""
    w = W if writable else 0
    fl = draw(st.sampled_from([w, w | N, w | N, w | N, I, I | W]) if draw(st.integers(0, 3)) else FLAGS)
    if fl & I and tables and draw(st.booleans()):
        gpa, k = draw(st.sampled_from(tables))
        ln = 16 * k if draw(st.booleans()) else draw(IND_LENS)
    elif fl & I:
        gpa, ln = draw(GPAS), draw(IND_LENS)
    else:
        gpa, ln = draw(BUFFERS[min(draw(st.integers(0, 3)), 2)])
    nx = draw(st.integers(0, tsize - 1) if draw(st.integers(0, 3)) else st.integers(0, 0xFFFF))
    return gpa, ln, fl, nx


@st.composite
def table_place(draw, k):
    """Where an indirect table of k entries goes: anywhere its bytes can be written."""
    nb = 16 * k
    return draw(
        st.one_of(
            st.sampled_from([R0, R1, R2, TOP, GHOST]).flatmap(lambda r: st.integers(r.gpa, r.end - nb)),
            st.integers(R1.gpa - nb + 1, R1.gpa - 1),  # straddles R0/R1
            st.integers(BIG.gpa, BIG.gpa + BIG_WRITABLE - nb),
            st.integers(BIG.end - BIG_WRITABLE, BIG.end - nb),
        )
    )


@st.composite
def scenario(draw):
    size = draw(st.integers(1, 16))
    tables = []
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.integers(1, 8))
        tables.append((draw(table_place(k)), k))
    targets = [*tables, (MAIN_GPA, size)]
    writable = draw(st.integers(0, 1))
    contents = [[draw(descriptor(k, targets, writable)) for _ in range(k)] for _, k in tables]
    main = [draw(descriptor(size, targets, writable)) for _ in range(size)]
    head = draw(st.integers(0, size - 1))
    cap = draw(st.integers(1, 10) | st.just(MAX_SEGS))
    n0 = draw(st.integers(0, min(cap, 3)))
    return tables, contents, main, head, writable, cap, n0


def check_scenario(sc):
    tables, contents, main, head, writable, cap, n0 = sc
    reset_memory()
    for (gpa, _), descs in zip(tables, contents):
        gwrite(gpa, pack(descs))
    gwrite(MAIN_GPA, pack(main))
    r = walk_both(len(main), head, writable, cap, n0)
    event(f"pieces={min(len(r[0]), 3)}" if isinstance(r, tuple) else f"broken={r}")


COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=1200, **COMMON)
@given(scenario())
def test_walk_chain_matches_reference(sc):
    check_scenario(sc)


# ---------------------------------------------------------------------------------------------
# 3. Ring indexes: avail_count, avail_head, put_used/publish_used, need_call, set_kicks
# ---------------------------------------------------------------------------------------------
class Ring:
    """Avail and used rings of one queue in numpy memory, viewed with the layout dtypes."""

    def __init__(self, size, last_avail=0, used_idx=0, event_idx=0):
        self.avail = np.zeros(1, avail_dtype(size))
        self.used = np.zeros(1, used_dtype(size))
        self.qs = make_qs(size, avail=self.avail.ctypes.data, used=self.used.ctypes.data)
        self.qs[0]["last_avail_idx"] = last_avail
        self.qs[0]["used_idx"] = used_idx
        self.qs[0]["event_idx"] = event_idx

    @property
    def q(self):
        return self.qs[0]


@pytest.mark.parametrize(
    ("size", "last", "idx", "expected"),
    [
        (16, 0, 0, 0),
        (16, 0, 16, 16),
        (16, 0, 17, -BROKEN_AVAIL_JUMP),
        (16, 65530, 3, 9),  # u16 wrap
        (16, 65530, 65530 + 16 - 65536, 16),
        (16, 65530, 65530 + 17 - 65536, -BROKEN_AVAIL_JUMP),
        (16, 5, 4, -BROKEN_AVAIL_JUMP),  # idx went backwards
        (256, 100, 100 + 256, 256),
        (1, 65535, 0, 1),
        (1, 65535, 1, -BROKEN_AVAIL_JUMP),
        (32768, 0, 32769, -BROKEN_AVAIL_JUMP),
        (32768, 40000, 40000 + 32768 - 65536, 32768),
    ],
)
def test_avail_count(size, last, idx, expected):
    r = Ring(size, last_avail=last)
    r.avail["idx"] = idx % 65536
    assert avail_count(r.qs, 0) == expected


@settings(max_examples=300, **COMMON)
@given(st.sampled_from([1, 2, 4, 16, 256]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_avail_count_property(size, last, idx):
    r = Ring(size, last_avail=last)
    r.avail["idx"] = idx
    d = (idx - last) % 65536
    assert avail_count(r.qs, 0) == (d if d <= size else -BROKEN_AVAIL_JUMP)


@pytest.mark.parametrize(
    ("size", "last", "idx"), [(16, 0, 0), (16, 0, 16), (16, 65530, 3), (16, 0, 17), (1, 65535, 0)]
)
def test_ring_avail_ahead(size, last, idx):
    """net's refill check on a split ring: k chains are available from the next one on exactly
    when avail_count says so (never after a broken index)."""
    r = Ring(size, last_avail=last)
    r.avail["idx"] = idx % 65536
    n = avail_count(r.qs, 0)
    ks = range(1, size + 1)
    assert [bool(ring_avail_ahead(r.qs, 0, k)) for k in ks] == [k <= n for k in ks]


def test_avail_head():
    r = Ring(8, last_avail=65534)
    r.avail["ring"][0] = [0, 7, 8, 0xFFFF, 3, 2, 1, 6]
    # slot = (65534 + i) & 7: i=0 -> 6, 1 -> 7, 2 -> 0, 3 -> 1, 4 -> 2, 5 -> 3
    assert [avail_head(r.qs, 0, i) for i in range(6)] == [1, 6, 0, 7, -BROKEN_HEAD_RANGE, -BROKEN_HEAD_RANGE]
    # i past the pending count wraps inside the ring, never outside it
    assert avail_head(r.qs, 0, 8) == 1 and avail_head(r.qs, 0, 65536 + 3) == 7


def test_put_used_and_publish_used_wrap():
    r = Ring(4, last_avail=65535, used_idx=65534)
    r.used["flags"] = 0x5A5A
    r.used["avail_event"] = 0xA5A5
    r.used["ring"][0, 1] = (0xEEEE, 0xEEEE)  # slot 1 is not written below
    for i, (head, ln) in enumerate([(3, 100), (0, 0xFFFF_FFFF), (2, 0)]):
        put_used(r.qs, 0, i, head, ln)
    assert r.used["idx"][0] == 0  # nothing published yet
    ring = r.used["ring"][0]
    assert ring["len"].tolist() == [0, 0xEEEE, 0, 0]  # nor written: the batch waits in the shadow
    publish_used(r.qs, 0, 3, 3)
    assert ring["id"].tolist() == [2, 0xEEEE, 3, 0] and ring["len"].tolist() == [0, 0xEEEE, 100, 0xFFFF_FFFF]
    assert r.used["idx"][0] == 1 and r.q["used_idx"] == 1 and r.q["last_avail_idx"] == 2
    assert r.used["flags"][0] == 0x5A5A and r.used["avail_event"][0] == 0xA5A5
    # popped without used (dropped chains): index unchanged in the ring
    r.used["idx"] = 0x1234
    publish_used(r.qs, 0, 2, 0)
    assert r.used["idx"][0] == 0x1234 and r.q["used_idx"] == 1 and r.q["last_avail_idx"] == 4
    # put_used's slot follows used_idx: the next element goes to slot 1
    put_used(r.qs, 0, 0, 1, 42)
    flush_used(r.qs, 0)
    assert tuple(r.used["ring"][0, 1]) == (1, 42) and r.used["idx"][0] == 0x1234


def test_peek_one_sees_chains_added_during_a_batch():
    """ring.peek_one (the common frame's path) reads the avail index again once the count
    ``begin`` took is used up, as ``pop`` does: a chain the driver adds mid-batch takes the same
    path as the first, and a jump past the queue size stops both."""
    reset_memory()
    gwrite(MAIN_GPA, pack([(R0.gpa, 64, 0, 0), (R0.gpa + 128, 100, 0, 0)]))
    r = Ring(8, last_avail=65535)
    r.avail["ring"][0, 7] = 0  # the slot of index 65535
    r.avail["idx"] = 0
    assert ring_begin(r.qs, 0, 32) == 1
    assert ring_peek_one(r.qs, 0, REGIONS, 0, 64) == (at(R0), 64, 0)
    ring_take_one(r.qs, 0, 0)
    assert ring_peek_one(r.qs, 0, REGIONS, 0, 64)[0] == 0  # nothing more yet
    r.avail["ring"][0, 0] = 1  # the driver adds a chain
    r.avail["idx"] = 1
    assert ring_peek_one(r.qs, 0, REGIONS, 0, 64) == (at(R0, 128), 100, 1)
    assert r.q["avail_cache"] == 2 and r.q["t_count"] == 1  # nothing taken by looking
    ring_take_one(r.qs, 0, 1)
    r.avail["idx"] = 20  # more than the queue holds
    assert ring_peek_one(r.qs, 0, REGIONS, 0, 64)[0] == 0
    seg = np.zeros(4, np.uint64)
    assert ring_pop(r.qs, 0, REGIONS, 0, seg, seg.copy(), 0)[0] == -BROKEN_AVAIL_JUMP


def test_batch_longer_than_the_shadow():
    """Elements past SHADOW go to the ring as they come, the first SHADOW at publish: all land."""
    n = SHADOW + 20
    r = Ring(128, used_idx=100)
    for i in range(n):
        put_used(r.qs, 0, i, i, 1000 + i)
    ring = r.used["ring"][0]
    slots = [(100 + i) % 128 for i in range(n)]
    assert [int(ring["len"][s]) for s in slots] == [0] * SHADOW + [1000 + i for i in range(SHADOW, n)]
    publish_used(r.qs, 0, n, n)
    assert [tuple(map(int, ring[s])) for s in slots] == [(i, 1000 + i) for i in range(n)]
    assert r.used["idx"][0] == (100 + n) & 0xFFFF and r.q["sh_n"] == 0


@pytest.mark.parametrize(
    ("flags", "expected"), [(0, True), (1, False), (0xFFFF, False), (0xFFFE, True)]
)
def test_need_call_without_event_idx(flags, expected):
    r = Ring(8, used_idx=3)
    r.avail["flags"] = flags
    r.avail["used_event"] = 3  # ignored without EVENT_IDX
    assert need_call(r.qs, 0) is expected
    assert r.q["signalled_valid"] == 0


def vring_need_event(event, new, old):
    return (new - event - 1) % 65536 < (new - old) % 65536


@pytest.mark.parametrize(
    ("old", "new", "event", "expected"),
    [
        (5, 10, 7, True),
        (5, 10, 9, True),
        (5, 10, 5, True),
        (5, 10, 10, False),
        (5, 10, 4, False),
        (5, 5, 5, False),
        (65534, 2, 65535, True),
        (65534, 2, 1, True),
        (65534, 2, 2, False),
        (65534, 2, 65533, False),
    ],
)
def test_need_call_event_idx(old, new, event, expected):
    assert vring_need_event(event, new, old) is expected
    r = Ring(8, used_idx=new, event_idx=1)
    r.q["signalled_used"], r.q["signalled_valid"] = old, 1
    r.avail["used_event"] = event
    r.avail["flags"] = 1  # NO_INTERRUPT is ignored with EVENT_IDX
    assert need_call(r.qs, 0) is expected
    assert r.q["signalled_used"] == new and r.q["signalled_valid"] == 1


@settings(max_examples=300, **COMMON)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from([1, 4, 256]))
def test_need_call_event_idx_property(old, new, event, size):
    r = Ring(size, used_idx=new, event_idx=1)
    r.q["signalled_used"], r.q["signalled_valid"] = old, 1
    r.avail["used_event"] = event
    assert need_call(r.qs, 0) is vring_need_event(event, new, old)


def test_need_call_event_idx_first_call_always_signals():
    r = Ring(8, used_idx=4, event_idx=1)
    r.avail["used_event"] = 4  # would say "no" were there a previous signal at 3
    assert need_call(r.qs, 0) is True
    assert r.q["signalled_used"] == 4 and r.q["signalled_valid"] == 1
    assert need_call(r.qs, 0) is False  # nothing new since


@pytest.mark.parametrize("event_idx", [0, 1])
@pytest.mark.parametrize("last", [0, 7, 65535])
def test_set_kicks(event_idx, last):
    r = Ring(8, last_avail=last, event_idx=event_idx)
    r.used["idx"] = 0x1111
    r.used["ring"][0]["id"] = 0x2222
    r.used["avail_event"] = 0x3333
    set_kicks(r.qs, 0, 0)
    assert r.used["flags"][0] == 1 and r.q["kicks_on"] == 0
    assert r.used["avail_event"][0] == ((last - 1) % 65536 if event_idx else 0x3333)
    set_kicks(r.qs, 0, 1)
    assert r.used["flags"][0] == 0 and r.q["kicks_on"] == 1
    assert r.used["avail_event"][0] == (last if event_idx else 0x3333)
    assert r.used["idx"][0] == 0x1111 and (r.used["ring"][0]["id"] == 0x2222).all()
    assert r.avail.tobytes() == bytes(r.avail.nbytes)  # the driver's ring is never written


# ---------------------------------------------------------------------------------------------
# 4. The same hostile inputs with NUMBA_BOUNDSCHECK=1 in a fresh process and a fresh cache
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, **COMMON)
@given(scenario())
def _hostile_random(sc):
    check_scenario(sc)


def test_hostile_subset():
    """Directed hostile cases, random tables, ring kernels at u16/u32 extremes.

    Also run by test_no_out_of_bounds_under_numba_boundscheck in a process with NUMBA_BOUNDSCHECK=1.
    """
    check_boundscheck_on()
    for name in DIRECTED:
        main, tables, kw, expected = DIRECTED[name]
        assert chain(main, tables, **kw) == expected
    test_walk_chain_max_segs()
    _hostile_random()
    r = Ring(4, last_avail=0xFFFF, used_idx=0xFFFF, event_idx=1)
    r.avail["idx"], r.avail["ring"] = 0xFFFF, 0xFFFF
    assert avail_count(r.qs, 0) == 0 and avail_head(r.qs, 0, 0xFFFF) == -BROKEN_HEAD_RANGE
    put_used(r.qs, 0, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)
    publish_used(r.qs, 0, 0xFFFF, 0xFFFF)
    assert r.used["idx"][0] == 0xFFFE and need_call(r.qs, 0) is True
    set_kicks(r.qs, 0, 0)
    assert r.used["avail_event"][0] == 0xFFFD


def test_no_out_of_bounds_under_numba_boundscheck(tmp_path):
    run_under_boundscheck(__file__, "test_hostile_subset", tmp_path)
