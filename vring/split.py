"""Split virtqueue kernels (virtio 1.x §2.7): pop chains, publish used entries, notify.

Threat model: the descriptor table, the avail ring and every address and length in them
are written by an untrusted driver, concurrently with us. Each field is read once into a
local; every index is range-checked; every buffer address goes through the region table
(``translate``) before it is touched; every loop over guest data has a bound (queue size,
indirect table size, MAX_SEGS pieces). A violation returns a negative BROKEN_* code: the
caller marks the queue broken and stops touching it. Kernels never raise.

Ring addresses (qstate desc/avail/used) were validated by the control plane to lie wholly
inside mapped memory before ``ready`` was set.
"""
from __future__ import annotations

import numpy as np

from vring.jit import inline_kernel, kernel
from vring.layout import (
    C_CALLS,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    SHADOW,
)
from vring.ordering import (
    fence_seq_cst,
    load_u16,
    load_u16_acquire,
    load_u32,
    load_u64,
    store_u16,
    store_u16_release,
    store_u32,
    sys_write,
)

MAX_SEGS = 1024  # contiguous pieces one chain may map to
MAX_INDIRECT = 1024  # entries in one indirect table

EMPTY = -1000  # no chain available (not an error; below every -BROKEN_*)
BROKEN_AVAIL_JUMP = 1
BROKEN_HEAD_RANGE = 2
BROKEN_NEXT_RANGE = 3
BROKEN_CHAIN_LOOP = 4
BROKEN_ADDRESS = 5
BROKEN_INDIRECT_LEN = 6
BROKEN_INDIRECT_NESTED = 7
BROKEN_DIRECTION = 8
BROKEN_TOO_MANY_SEGS = 9
BROKEN_CHAIN_LEN = 10
BROKEN_INDIRECT_NEXT = 11
BROKEN_RING_ADDRESS = 100  # set by the control plane when a ring starts
BROKEN_RING_BASE = 101

BROKEN_REASONS = {
    BROKEN_AVAIL_JUMP: "avail idx moved by more than the queue size",
    BROKEN_HEAD_RANGE: "avail ring holds a head index >= queue size",
    BROKEN_NEXT_RANGE: "descriptor next index out of range",
    BROKEN_CHAIN_LOOP: "descriptor chain longer than its table (loop)",
    BROKEN_ADDRESS: "descriptor buffer outside guest memory",
    BROKEN_INDIRECT_LEN: "indirect table length is 0, not a multiple of 16, or too large",
    BROKEN_INDIRECT_NESTED: "indirect descriptor inside an indirect table",
    BROKEN_DIRECTION: "descriptor has the wrong WRITE flag for this queue",
    BROKEN_TOO_MANY_SEGS: "chain maps to too many memory pieces",
    BROKEN_CHAIN_LEN: "chain longer than 4 GiB",
    BROKEN_INDIRECT_NEXT: "descriptor has both INDIRECT and NEXT",
    BROKEN_RING_ADDRESS: "ring addresses outside guest memory or misaligned",
    BROKEN_RING_BASE: "ring base index beyond the queue size",
}

U1 = np.uint64(1)
U16 = np.uint64(0xFFFF)


@inline_kernel
def translate(regions, mem, gpa, length, out_hva, out_len, n):
    """Append the pieces of guest range [gpa, gpa+length) to out_*[n:]; new n, or -BROKEN_*."""
    gpa = np.uint64(gpa)
    length = np.uint64(length)
    nreg = regions.shape[1]
    while length > 0:
        found = False
        for r in range(nreg):
            size = regions[mem, r, 1]
            if size == 0:
                break  # rows are packed: the first empty row ends the table
            base = regions[mem, r, 0]
            if gpa >= base and gpa - base < size:
                off = gpa - base
                k = min(length, size - off)
                if n >= out_hva.shape[0]:
                    return -BROKEN_TOO_MANY_SEGS
                out_hva[n] = regions[mem, r, 3] + off
                out_len[n] = k
                n += 1
                gpa += k
                length -= k
                if gpa == 0 and length > 0:
                    return -BROKEN_ADDRESS  # ran past 2**64: gpa wrapped to 0
                found = True
                break
        if not found:
            return -BROKEN_ADDRESS
    return n


@kernel
def translate_one(regions, mem, gpa, length):
    """Host address of [gpa, gpa+length) if it lies in one region, else 0."""
    gpa = np.uint64(gpa)
    length = np.uint64(length)
    for r in range(regions.shape[1]):
        size = regions[mem, r, 1]
        if size == 0:
            break
        base = regions[mem, r, 0]
        if gpa >= base and gpa - base < size and length <= size - (gpa - base):
            return regions[mem, r, 3] + (gpa - base)
    return np.uint64(0)


@inline_kernel
def walk_chain(qs, q, regions, head, writable, seg_hva, seg_len, n):
    """Map the chain starting at ``head`` into seg_*[n:].

    ``writable``: 1 if every descriptor must be device-writable, 0 if every one must be
    device-readable. Returns (new n, total bytes), or (-BROKEN_*, 0).
    All index arithmetic stays in int64 (mixing u64 and i64 makes numba use floats).
    """
    size = np.int64(qs[q]["size"])
    mem = qs[q]["mem"]
    table = qs[q]["desc"]
    table_size = size
    budget = size  # §2.7.5.3.1: a chain has at most queue-size descriptors (loops end here)
    indirect = False
    idx = np.int64(head)
    total = np.uint64(0)
    while True:
        if budget == 0:
            return -BROKEN_CHAIN_LOOP, np.uint64(0)
        budget -= 1
        d = table + np.uint64(16 * idx)
        addr = load_u64(d)
        ln = np.int64(load_u32(d + np.uint64(8)))
        fl = load_u16(d + np.uint64(12))
        nx = np.int64(load_u16(d + np.uint64(14)))
        if fl & DESC_F_INDIRECT:
            # §2.7.5.3.1: no nesting, no NEXT together with INDIRECT, len a multiple of 16
            if indirect:
                return -BROKEN_INDIRECT_NESTED, np.uint64(0)
            if fl & DESC_F_NEXT:
                return -BROKEN_INDIRECT_NEXT, np.uint64(0)
            if ln == 0 or ln % 16 != 0 or ln // 16 > MAX_INDIRECT:
                return -BROKEN_INDIRECT_LEN, np.uint64(0)
            t = translate_one(regions, mem, addr, np.uint64(ln))
            if t == 0:
                return -BROKEN_ADDRESS, np.uint64(0)
            table = t
            table_size = ln // 16
            budget = table_size
            indirect = True
            idx = np.int64(0)
            continue
        if ((fl & DESC_F_WRITE) != 0) != (writable != 0):
            return -BROKEN_DIRECTION, np.uint64(0)
        if ln > 0:
            n = translate(regions, mem, addr, np.uint64(ln), seg_hva, seg_len, n)
            if n < 0:
                return n, np.uint64(0)
            total += np.uint64(ln)
            if total > np.uint64(0xFFFFFFFF):
                return -BROKEN_CHAIN_LEN, np.uint64(0)
        if not (fl & DESC_F_NEXT):
            return n, total
        if nx >= table_size:
            return -BROKEN_NEXT_RANGE, np.uint64(0)
        idx = nx


@inline_kernel
def avail_count(qs, q):
    """Chains the driver has made available and we haven't popped, or -BROKEN_AVAIL_JUMP."""
    avail = qs[q]["avail"]
    idx = np.int64(load_u16_acquire(avail + np.uint64(2)))
    n = (idx - np.int64(qs[q]["last_avail_idx"])) & 0xFFFF
    if n > np.int64(qs[q]["size"]):
        return -BROKEN_AVAIL_JUMP
    return n


@inline_kernel
def avail_head(qs, q, i):
    """Head index of the i-th unpopped chain, or -BROKEN_HEAD_RANGE."""
    size = np.int64(qs[q]["size"])
    slot = (np.int64(qs[q]["last_avail_idx"]) + i) & (size - 1)
    h = np.int64(load_u16(qs[q]["avail"] + np.uint64(4 + 2 * slot)))
    if h >= size:
        return -BROKEN_HEAD_RANGE
    return h


@inline_kernel
def next_head(qs, q):
    """The head of the batch's next chain: the ``t_count``-th unpopped one. Once the count
    ``begin`` took is used up, the avail index is read again (the driver may have added chains
    since). Returns the head, EMPTY, or -BROKEN_*."""
    t = np.int64(qs[q]["t_count"])
    if t >= np.int64(qs[q]["avail_cache"]):
        a = avail_count(qs, q)
        if a < 0:
            return a
        qs[q]["avail_cache"] = a
        if t >= a:
            return EMPTY
    return avail_head(qs, q, t)


@inline_kernel
def one_direct(d, fl, writable, need, regions, mem):
    """The buffer of descriptor ``d`` (its flags ``fl`` loaded once by the caller, so every test
    sees one value) if it is a chain of its own, direct, of the given direction, at least ``need``
    bytes long and inside one region: (host address, length), or host address 0. Both formats'
    ``peek_one``; the descriptor's address and length are at the same offsets in both."""
    if fl & (DESC_F_NEXT | DESC_F_INDIRECT | DESC_F_WRITE) != (DESC_F_WRITE if writable else 0):
        return np.uint64(0), np.uint64(0)
    ln = np.uint64(load_u32(d + np.uint64(8)))
    if ln < need:
        return np.uint64(0), np.uint64(0)
    return translate_one(regions, mem, load_u64(d), ln), ln


@inline_kernel
def peek_one(qs, q, regions, writable, need):
    """packed.peek_one for a split ring: the batch's next chain if it is one direct descriptor of
    the given direction, at least ``need`` bytes long, inside one region. Returns (host address,
    length, head), or host address 0 (none available, or unusual: ``pop`` decides). Nothing moves
    until ring.take_one."""
    head = next_head(qs, q)
    if head < 0:
        return np.uint64(0), np.uint64(0), 0
    d = qs[q]["desc"] + np.uint64(16 * head)
    hva, ln = one_direct(d, load_u16(d + np.uint64(12)), writable, need, regions, qs[q]["mem"])
    return hva, ln, head


@inline_kernel
def _store_used(qs, q, i, head, length):
    """Write the i-th pending used element into its slot of the used ring (not yet published)."""
    slot = (np.int64(qs[q]["used_idx"]) + i) & (np.int64(qs[q]["size"]) - 1)
    e = qs[q]["used"] + np.uint64(4 + 8 * slot)
    store_u32(e, np.uint32(head))
    store_u32(e + np.uint64(4), np.uint32(length))


@inline_kernel
def put_used(qs, q, i, head, length):
    """The i-th pending used element, written to the ring by ``flush_used`` (published later by
    ``publish_used``). The first SHADOW wait in the queue state: written one by one between the
    frames' copies, they would compete for the used ring's lines with a driver still reading the
    last batch's elements there (as DPDK's vhost, they go to the ring together at publish).
    ``sh_id`` is u16 (packed's buffer ids): a head from ``pop`` is < size <= 32768."""
    if i < SHADOW:
        qs[q]["sh_id"][i] = np.uint16(head)
        qs[q]["sh_len"][i] = np.uint32(length)
        qs[q]["sh_n"] = i + 1
        return
    _store_used(qs, q, i, head, length)


@inline_kernel
def flush_used(qs, q):
    """Write the used elements kept by ``put_used`` into the ring (not yet published)."""
    for i in range(qs[q]["sh_n"]):
        _store_used(qs, q, i, qs[q]["sh_id"][i], qs[q]["sh_len"][i])
    qs[q]["sh_n"] = 0


@inline_kernel
def publish_used(qs, q, popped, used):
    """Advance last_avail_idx by ``popped`` and publish ``used`` pending used elements.

    The release store orders the used elements before the index (§2.7.8: fill, then flush).
    """
    flush_used(qs, q)
    qs[q]["last_avail_idx"] = (qs[q]["last_avail_idx"] + popped) & 0xFFFF
    if used > 0:
        new = (qs[q]["used_idx"] + used) & 0xFFFF
        qs[q]["used_idx"] = new
        store_u16_release(qs[q]["used"] + np.uint64(2), np.uint16(new))


@inline_kernel
def need_call(qs, q):
    """Whether the driver wants an interrupt for what we just published (§2.7.7, EVENT_IDX §2.7.10)."""
    fence_seq_cst()  # our used idx store before reading the driver's flags/used_event
    return wants_call(qs, q)


@inline_kernel
def wants_call(qs, q):
    """``need_call`` after the caller's own fence (one fence for several rings' publishes)."""
    new = np.int64(qs[q]["used_idx"])
    if qs[q]["event_idx"]:
        old = np.int64(qs[q]["signalled_used"])
        valid = qs[q]["signalled_valid"]
        qs[q]["signalled_used"] = new
        qs[q]["signalled_valid"] = 1
        if not valid:
            return True
        ev = np.int64(load_u16_acquire(qs[q]["avail"] + np.uint64(4 + 2 * np.int64(qs[q]["size"]))))
        return ((new - ev - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
    return (load_u16_acquire(qs[q]["avail"]) & 1) == 0  # VRING_AVAIL_F_NO_INTERRUPT


@kernel
def call(qs, q, counters, one):
    """Signal the driver through the call eventfd if it wants it."""
    if need_call(qs, q):
        fd = qs[q]["call_fd"]
        if fd >= 0:
            sys_write(np.int32(fd), np.uint64(one.ctypes.data), np.uint64(8))
            counters[q, C_CALLS] += 1


@kernel
def set_kicks(qs, q, on):
    """Ask the driver to kick us (on) or not to (off): used flags and, with EVENT_IDX, avail_event."""
    used = qs[q]["used"]
    store_u16(used, np.uint16(0 if on else 1))  # VRING_USED_F_NO_NOTIFY
    if qs[q]["event_idx"]:
        la = np.int64(qs[q]["last_avail_idx"])
        # on: kick at the next chain; off: the event index sits just behind us, so no kick soon
        ev = la if on else (la - 1) & 0xFFFF
        store_u16(used + np.uint64(4 + 8 * np.int64(qs[q]["size"])), np.uint16(ev))
    qs[q]["kicks_on"] = 1 if on else 0
