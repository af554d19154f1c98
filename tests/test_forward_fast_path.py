"""The forward's own path for the common frame (devices.net._forward_one) against the general
path, on random and hostile rings.

``_forward_batch`` takes a frame through ``_forward_one`` when nothing is captured; a capture that
is on for another port (it records nothing here) sends every frame through the general path
(``pop``, ``_send``, ``_deliver``). Each run is one round of the data plane itself: ``net_loop``
(the kernel ``vring compile`` compiles) with one link, TX to RX, as a one-port loopback has it.
Hypothesis builds a TX and an RX ring, each split or packed, in one guest memory of two regions,
with frames of every shape (one descriptor, header apart, indirect, offload flags, runts, over the
MTU, WRITE on a TX descriptor, addresses outside or across the regions, not available, a split
head out of range) and RX buffers of every shape (short, chained, read-only, outside memory), and
runs one round both ways from the same starting state: the result, the queue state, the counters
and every byte of guest memory must be the same.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.capture import CTL_SIZE, K_NVQ, K_PORTS
from devices.capture import empty as no_capture
from devices.net import MODE_FORWARD, loop_scratch, net_loop
from vring.dataplane import BUSY_FRAMES, BUSY_SIZE, run_rounds
from vring.layout import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    N_COUNTERS,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DISABLE,
    new_qstate,
)
from vring.memory import MAX_REGIONS

RX, TX = 0, 1
GPA0, GPA1 = 0x100000, 0x110000  # two adjacent 64 KiB regions: a buffer may straddle them
REGION = 0x10000
TX_DESC, RX_DESC, EVENTS, INDIRECT, BUFS = 0x0, 0x400, 0x800, 0x1000, 0x2000  # offsets in region 0
SPLIT_RINGS = 0xC00  # a split ring's avail ring at +0x200 * row, its used ring 0x100 after it
SPLIT_BASE = 0xFFF8  # a split ring's free-running indexes start this far below 2**16: they wrap
NOWHERE = 0x9000000  # no region there


LINKS = np.array([[TX, RX, MODE_FORWARD]], np.int64)  # net_loop's arguments for that one link
ROWS = np.array([RX, TX], np.int64)
WATCH = np.array([TX], np.int64)
FRAME = np.zeros(64, np.uint8)  # the source mode's frame: no link here sources


def avail(wrap: int) -> int:
    return PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED


@st.composite
def tx_chain(draw, hl):
    """(descriptors, extra indirect table): one TX chain of some shape; descriptors (addr, len, flags)."""
    flen = draw(st.sampled_from([0, 14, 60, 64, 100, 127, 128, 129, 300, 1514]))
    kind = draw(st.sampled_from(["one"] * 6 + ["split", "indirect", "write", "nowhere", "runt", "straddle"]))
    if kind == "one":
        return [("buf", hl + flen, 0)], None
    if kind == "split":
        return [("buf", hl, DESC_F_NEXT), ("buf", flen, 0)], None
    if kind == "indirect":
        return [("table", 32, DESC_F_INDIRECT)], [("buf", hl, 0), ("buf", flen, 0)]
    if kind == "write":
        return [("buf", hl + flen, DESC_F_WRITE)], None
    if kind == "nowhere":
        return [("nowhere", hl + flen, 0)], None
    if kind == "runt":
        return [("buf", draw(st.integers(0, hl - 1)), 0)], None
    return [("straddle", hl + flen, 0)], None


@st.composite
def rx_chain(draw):
    kind = draw(st.sampled_from(["one"] * 6 + ["short", "chained", "readonly", "nowhere", "straddle"]))
    if kind == "one":
        return [("buf", draw(st.sampled_from([2048, 1526, 140, 76])), DESC_F_WRITE)]
    if kind == "short":
        return [("buf", draw(st.integers(0, 80)), DESC_F_WRITE)]
    if kind == "chained":
        return [("buf", 40, DESC_F_WRITE | DESC_F_NEXT), ("buf", 2048, DESC_F_WRITE)]
    if kind == "readonly":
        return [("buf", 2048, 0)]
    if kind == "nowhere":
        return [("nowhere", 2048, DESC_F_WRITE)]
    return [("straddle", 2048, DESC_F_WRITE)]


@st.composite
def scenario(draw):
    tx_packed, rx_packed = draw(st.booleans()), draw(st.booleans())
    # a split ring's size is a power of two
    size = draw(st.integers(2, 16) if tx_packed and rx_packed else st.sampled_from([2, 4, 8, 16]))
    hl_tx, hl_rx = draw(st.sampled_from([10, 12])), draw(st.sampled_from([10, 12]))
    return dict(
        size=size, hl_tx=hl_tx, hl_rx=hl_rx, tx_packed=tx_packed, rx_packed=rx_packed,
        bad_head_at=draw(st.sampled_from([None] * 4 + list(range(size)))),  # split: that chain's head >= size
        tx=[draw(tx_chain(hl_tx)) for _ in range(draw(st.integers(0, size)))],
        tx_hdr=[draw(st.sampled_from([0] * 6 + [0x0001, 0x0100, 0x0302, 0x00FE])) for _ in range(size)],
        rx=[draw(rx_chain()) for _ in range(draw(st.integers(0, size)))],
        tx_start=(draw(st.integers(0, size - 1)), draw(st.integers(0, 1))),
        rx_start=(draw(st.integers(0, size - 1)), draw(st.integers(0, 1))),
        mrg=draw(st.integers(0, 1)), in_order=draw(st.integers(0, 1)),
        max_frame=draw(st.sampled_from([0, 0, 64, 100, 1514])), burst=draw(st.integers(1, 20)),
        unavail_at=draw(st.integers(0, size)),  # TX slots from here on are left not available
    )


class Guest:
    """Two regions of one numpy buffer, the region table and the qstate of one TX and one RX ring
    (packed, or split with the avail and used rings at SPLIT_RINGS)."""

    def __init__(self, sc: dict):
        self.mem = np.zeros(2 * REGION, np.uint8)
        base = self.mem.ctypes.data
        self.regions = np.zeros((1, MAX_REGIONS, 4), np.uint64)
        self.regions[0, 0] = (GPA0, REGION, base, base)
        self.regions[0, 1] = (GPA1, REGION, base + REGION, base + REGION)
        self.qs = new_qstate(2)
        self.counters = np.zeros((2, N_COUNTERS), np.uint64)
        self.next_buf = {False: GPA0 + BUFS, True: GPA1 + 0x1000}  # TX buffers in region 0, RX in 1
        size = sc["size"]
        for row, off, hl, (idx, wrap), packed in ((TX, TX_DESC, sc["hl_tx"], sc["tx_start"], sc["tx_packed"]),
                                                  (RX, RX_DESC, sc["hl_rx"], sc["rx_start"], sc["rx_packed"])):
            q = self.qs[row]
            q["size"], q["desc"], q["hdr_len"], q["ready"], q["packed"] = size, base + off, hl, 1, packed
            q["in_order"] = sc["in_order"]
            if packed:
                q["avail"], q["used"] = base + EVENTS + 8 * row, base + EVENTS + 4 + 8 * row
                q["last_avail_idx"], q["avail_wrap"], q["used_idx"], q["used_wrap"] = idx, wrap, idx, wrap
                self.mem[EVENTS + 8 * row + 2] = RING_EVENT_FLAGS_DISABLE
            else:
                q["avail"], q["used"] = base + SPLIT_RINGS + 0x200 * row, base + SPLIT_RINGS + 0x200 * row + 0x100
                q["last_avail_idx"] = q["used_idx"] = (SPLIT_BASE + idx + size * wrap) & 0xFFFF
                self.mem[SPLIT_RINGS + 0x200 * row] = 1  # VRING_AVAIL_F_NO_INTERRUPT
        self.qs[RX]["mrg_rxbuf"] = sc["mrg"]
        self.qs[TX]["max_frame"] = sc["max_frame"]
        self._post(TX, TX_DESC, sc["tx"], sc, sc["tx_start"], sc["unavail_at"])
        self._post(RX, RX_DESC, [(c, None) for c in sc["rx"]], sc, sc["rx_start"], size)

    def _addr(self, where: str, ln: int, rx: bool) -> int:
        if where == "nowhere":
            return NOWHERE
        if where == "straddle":
            return GPA1 - max(ln // 2, 1)
        gpa = self.next_buf[rx]
        self.next_buf[rx] += (ln + 63) // 64 * 64 + 64
        assert self.next_buf[rx] < (GPA1 if rx else GPA0) + REGION - 2048  # clear of the straddling buffers
        return gpa

    def _fill(self, gpa: int, ln: int, hdr: int) -> None:
        off = gpa - GPA0
        self.mem[off : off + ln] = np.arange(off, off + ln, dtype=np.uint64).astype(np.uint8)  # payload to copy
        if ln >= 2:
            self.mem[off : off + 2] = np.frombuffer(struct.pack("<H", hdr), np.uint8)

    def _post(self, row, off, chains, sc, start, unavail_at):
        """Write the chains into the ring from ``start`` on; descriptors from slot ``unavail_at`` on
        are not made available (split: the chains they belong to)."""
        size = sc["size"]
        packed = sc["tx_packed" if row == TX else "rx_packed"]
        idx, wrap = start
        slot = 0
        heads = []  # split: the heads of the chains made available
        for ci, (descs, table) in enumerate(chains):
            head = idx
            for k, (where, ln, fl) in enumerate(descs):
                if slot == size:
                    break
                if where == "table":
                    gpa = GPA0 + INDIRECT + 32 * (ci % 64)
                    for j, (w2, l2, f2) in enumerate(table):
                        a2 = self._addr(w2, l2, False)
                        self._fill(a2, l2, sc["tx_hdr"][ci] if j == 0 else 0)
                        more = 0 if packed or j == len(table) - 1 else DESC_F_NEXT  # split tables link
                        self.mem[gpa - GPA0 + 16 * j : gpa - GPA0 + 16 * j + 16] = np.frombuffer(
                            struct.pack("<QIHH", a2, l2, *((0, f2) if packed else (f2 | more, j + 1))), np.uint8)
                else:
                    gpa = self._addr(where, ln, row == RX)
                    if where != "nowhere" and row == TX:
                        self._fill(gpa, ln, sc["tx_hdr"][ci] if k == 0 else 0)
                d = off + 16 * idx
                if packed:
                    bits = avail(wrap) if slot < unavail_at else avail(wrap ^ 1)
                    fields = (gpa, ln, 100 + ci, fl | bits)
                else:
                    fields = (gpa, ln, fl, (idx + 1) % size)
                self.mem[d : d + 16] = np.frombuffer(struct.pack("<QIHH", *fields), np.uint8)
                slot += 1
                idx += 1
                if idx == size:
                    idx, wrap = 0, wrap ^ 1
            else:  # the whole chain was written
                if slot <= unavail_at:
                    heads.append(size + 5 if ci == sc["bad_head_at"] else head)
                continue
            break
        if not packed:
            q = self.qs[row]
            ring = q["avail"] - self.mem.ctypes.data
            first = int(q["last_avail_idx"])
            for k, h in enumerate(heads):
                s = ring + 4 + 2 * ((first + k) % size)
                self.mem[s : s + 2] = np.frombuffer(struct.pack("<H", h), np.uint8)
            self.mem[ring + 2 : ring + 4] = np.frombuffer(struct.pack("<H", (first + len(heads)) & 0xFFFF), np.uint8)

    def run(self, burst: int, general: bool):
        cap, polls, busy = self.loop_arrays(burst, general)
        scratch = self.scratch = loop_scratch(len(WATCH), np.zeros(8, np.uint64))
        run_rounds(net_loop, 1, self.qs, self.counters, self.regions, LINKS, ROWS, WATCH, FRAME, burst, 0, polls,
                   busy, cap, scratch)
        return self.poll_result(polls, busy)

    @staticmethod
    def loop_arrays(burst: int, general: bool) -> tuple:
        """The loop's capture arrays and self-measurement (polls, busy) for one run. ``general``:
        capture on for a port that isn't here, which records nothing but sends every frame
        through the general path."""
        cap = no_capture()
        if general:
            cap = (np.zeros(CTL_SIZE, np.int64), cap[1], cap[2])
            cap[0][K_PORTS], cap[0][K_NVQ] = 1 << 5, 2
        return cap, np.zeros(burst + 1, np.int64), np.zeros(BUSY_SIZE, np.uint64)

    @staticmethod
    def poll_result(polls, busy) -> tuple[int, tuple]:
        """What the loop's self-measurement saw of the round's one poll: (frames moved, the poll
        counts by frames found; all 0 when the TX ring was not ready or broke)."""
        return int(busy[BUSY_FRAMES]), tuple(polls.tolist())

    def state(self):
        return self.mem.copy(), self.qs.copy(), self.counters.copy()

    def restore(self, st_) -> None:
        self.mem[:], self.qs[:], self.counters[:] = st_


def both_ways(g: Guest, burst: int) -> tuple:
    """One batch through the common frame's path, then from the same state through the general
    path; asserts the results, guest memory, queue state and counters are the same. Returns
    (result, state after the common path, state after the general path)."""
    start = g.state()
    fast = g.run(burst, general=False)
    after_fast = g.state()
    g.restore(start)
    general = g.run(burst, general=True)
    after = g.state()
    assert fast == general
    assert (after_fast[0] == after[0]).all(), "guest memory differs"
    for name in after[1].dtype.names:  # field by field: the padding between them isn't state
        assert (after_fast[1][name] == after[1][name]).all(), f"queue state differs: {name}"
    assert (after_fast[2] == after[2]).all(), "counters differ"
    return fast, after_fast, after


def check(sc: dict) -> tuple[int, int]:
    """Both ways; (frames moved, frames the RX ring received)."""
    fast, _, after = both_ways(Guest(sc), sc["burst"])
    return fast[0], int(after[2][RX, 0])


@settings(max_examples=400, deadline=None, database=None)
@given(scenario())
def test_common_frame_path_equals_the_general_path(sc):
    check(sc)


@pytest.mark.parametrize("tx_packed", [False, True], ids=["tx-split", "tx-packed"])
@pytest.mark.parametrize("rx_packed", [False, True], ids=["rx-split", "rx-packed"])
def test_the_common_frame_path_forwards_and_is_checked(tx_packed, rx_packed):
    """A plain case through both paths: 3 one-descriptor frames into 3 big RX buffers, delivered,
    so the equality above is not only ever about frames neither path moved; and on its own, the
    batch took the common path for all three (the general path's pieces, s_hva, stay unwritten)."""
    sc = dict(size=8, hl_tx=12, hl_rx=12, tx=[([("buf", 12 + 64, 0)], None)] * 3, tx_hdr=[0] * 8,
              rx=[[("buf", 2048, DESC_F_WRITE)]] * 3, tx_start=(6, 1), rx_start=(7, 0), mrg=1, in_order=1,
              max_frame=0, burst=32, unavail_at=8, tx_packed=tx_packed, rx_packed=rx_packed, bad_head_at=None)
    done, delivered = check(sc)
    assert done == 3 and delivered == 3
    g = Guest(sc)
    assert g.run(32, general=False) == (3, (0,) * 3 + (1,) + (0,) * 29)  # one poll that found 3 frames
    assert not g.scratch[3].any(), "a frame went through pop"
