"""One interface over both ring formats, so devices never branch on split vs packed.

A batch on a queue: ``begin`` → ``pop`` chains (``cursor``/``rollback`` to undo tentative
pops) → ``put_used`` for each → ``publish``; then ``call`` if the driver wants an interrupt
(``finish`` does both). A polling loop uses ``finish_later`` and settles the calls of every ring
it serves with ``flush_calls`` at the start of its next round, behind one fence. Each function
dispatches on the queue's ``packed`` field to vring.split or vring.packed.
"""
from __future__ import annotations

import numpy as np

from vring import inflight as I
from vring import packed as P
from vring import split as S
from vring.dirtylog import log_packed_used, log_ring, log_split_used
from vring.jit import inline_kernel, kernel
from vring.layout import C_BATCHES, C_CALLS
from vring.ordering import fence_seq_cst, load_u16, load_u64, prefetch_read, prefetch_write, sys_write

EMPTY = S.EMPTY
# what prefetch_batch does with each chain's first buffer lines: the device reads them (TX chains
# it forwards), writes them (RX chains), or leaves them alone (a sink never reads the payload,
# and reading a line the driver is about to rewrite only makes the driver wait for it back)
BUF_READ, BUF_WRITE, BUF_NONE = 0, 1, 2


@inline_kernel
def begin(qs, q, limit):
    """Start a batch of up to ``limit`` chains; returns a hint of how many are available (>0), 0,
    or -BROKEN_*."""
    if qs[q]["packed"]:
        return P.begin_upto(qs, q, limit)
    n = S.avail_count(qs, q)
    qs[q]["t_count"] = 0
    qs[q]["u_count"] = 0
    qs[q]["sh_n"] = 0
    qs[q]["avail_cache"] = max(n, 0)
    return n


@inline_kernel
def avail_ahead(qs, q, k):
    """Whether ``k`` (1 <= k <= size) chains are available from the next one on (a hint: a packed
    ring's ``k``-th descriptor is looked at; a chain of several descriptors counts as several)."""
    if qs[q]["packed"]:
        return P.avail_ahead(qs, q, k)
    return S.avail_count(qs, q) >= k


@inline_kernel
def _took_split(qs, q, head):
    """Record a popped split chain: one more taken this batch, in flight if the driver tracks them."""
    qs[q]["t_count"] += 1
    if qs[q]["inflight"]:
        I.mark(qs, q, head)


@inline_kernel
def pop(qs, q, regions, writable, seg_hva, seg_len, n):
    """The next chain mapped into seg_*[n:]: (new n, total bytes, id, descriptors), (EMPTY, ...) or (-BROKEN_*, ...)."""
    if qs[q]["packed"]:
        return P.pop(qs, q, regions, writable, seg_hva, seg_len, n)
    head = S.next_head(qs, q)
    if head < 0:
        return head, np.uint64(0), 0, 0
    m, total = S.walk_chain(qs, q, regions, head, writable, seg_hva, seg_len, n)
    if m < 0:
        return m, total, 0, 0
    _took_split(qs, q, head)
    return m, total, head, 1


@inline_kernel
def peek_one(qs, q, regions, writable, need):
    """The next chain if it is the common kind (one direct descriptor of the given direction, at
    least ``need`` bytes, inside one region): (host address, length, id), or address 0 for ``pop``
    to decide. Nothing moves until ``take_one``."""
    if qs[q]["packed"]:
        return P.peek_one(qs, q, regions, writable, need)
    return S.peek_one(qs, q, regions, writable, need)


@inline_kernel
def take_one(qs, q, buf_id):
    """Pop the chain ``peek_one`` found (``buf_id``: the id it returned)."""
    if qs[q]["packed"]:
        P.take_one(qs, q)
    else:
        _took_split(qs, q, buf_id)


@inline_kernel
def cursor(qs, q):
    """The tentative pop position, for ``rollback``."""
    return (np.int64(qs[q]["t_count"]) << 17) | (np.int64(qs[q]["t_wrap"]) << 16) | np.int64(qs[q]["t_idx"])


@kernel
def rollback(qs, q, c):
    if qs[q]["inflight"]:  # split only: the chains popped since ``c`` are no longer in flight
        for t in range(c >> 17, np.int64(qs[q]["t_count"])):
            h = S.avail_head(qs, q, t)
            if h >= 0:
                I.unmark(qs, q, h)
    qs[q]["t_count"] = c >> 17
    qs[q]["t_wrap"] = (c >> 16) & 1
    qs[q]["t_idx"] = c & 0xFFFF


@inline_kernel
def put_used(qs, q, buf_id, length, ndesc):
    if qs[q]["packed"]:
        P.put_used(qs, q, buf_id, length, ndesc)
    else:
        S.put_used(qs, q, qs[q]["u_count"], buf_id, length)
        qs[q]["u_count"] += 1


@inline_kernel
def publish(qs, q):
    """Commit the batch: pops consumed, used elements visible to the driver (and logged, while migrating)."""
    old = qs[q]["used_idx"]
    used = qs[q]["u_count"]
    if qs[q]["packed"]:
        P.publish(qs, q)
        if qs[q]["log_base"] != 0:
            log_packed_used(qs, q, old, qs[q]["used_idx"], used)
    else:
        tracked = qs[q]["inflight"] != 0 and used > 0
        if tracked:
            S.flush_used(qs, q)  # link_batch reads the heads back from the ring
            I.link_batch(qs, q, used)
        S.publish_used(qs, q, qs[q]["t_count"], used)
        if tracked:
            I.clear_batch(qs, q, used)
        qs[q]["t_count"] = 0
        qs[q]["u_count"] = 0
        qs[q]["avail_cache"] = 0
        if qs[q]["log_base"] != 0 and used > 0:
            log_split_used(qs, q, old, used)


@inline_kernel
def _signal(qs, q, counters, one):
    """Write the call eventfd if the driver wants it; the caller has fenced after publishing."""
    want = P.wants_call(qs, q) if qs[q]["packed"] else S.wants_call(qs, q)
    if want:
        fd = qs[q]["call_fd"]
        if fd >= 0:
            sys_write(np.int32(fd), np.uint64(one.ctypes.data), np.uint64(8))
            counters[q, C_CALLS] += 1


@inline_kernel
def call(qs, q, counters, one):
    """Signal the driver through the call eventfd if it wants it."""
    fence_seq_cst()  # our used index (or flags) before the driver's suppression fields
    _signal(qs, q, counters, one)


@inline_kernel
def finish(qs, q, counters, one):
    """``publish`` the batch, then signal the driver if it got used elements and wants to know."""
    used = qs[q]["u_count"]
    publish(qs, q)
    if used > 0:
        call(qs, q, counters, one)
        counters[q, C_BATCHES] += 1


@inline_kernel
def finish_later(qs, q, counters):
    """``publish`` the batch and leave the call decision to ``flush_calls``, after the next fence.

    Deciding a call takes a fence (our used index before the driver's flags) and a read of the
    driver's flags line. Done at once, the fence waits for this batch's stores to reach the other
    core and the read misses; done just before the ring's next poll, the stores have drained and
    the flags share a line with the avail index that poll reads anyway: at burst 1, two misses a
    batch become one. The loop flushes before every poll round and before it returns or sleeps."""
    used = qs[q]["u_count"]
    publish(qs, q)
    if used > 0:
        qs[q]["call_pending"] = 1
        counters[q, C_BATCHES] += 1


@inline_kernel
def flush_calls(qs, rows, counters, one):
    """Signal the drivers of ``rows`` whose batches ``finish_later`` left undecided, behind one
    fence (none when nothing is pending)."""
    pending = False
    for i in range(rows.shape[0]):
        if qs[rows[i]]["call_pending"]:
            pending = True
    if not pending:
        return
    fence_seq_cst()  # every used index published before any driver's suppression fields are read
    for i in range(rows.shape[0]):
        q = rows[i]
        if qs[q]["call_pending"]:
            qs[q]["call_pending"] = 0
            if qs[q]["ready"] and not qs[q]["broken"]:
                _signal(qs, q, counters, one)


@kernel
def set_kicks(qs, q, on):
    if qs[q]["packed"]:
        P.set_kicks(qs, q, on)
        log_ring(qs, q, 2, 2)  # device event flags
    else:
        S.set_kicks(qs, q, on)
        log_ring(qs, q, 0, 2)  # used flags
        if qs[q]["event_idx"]:
            log_ring(qs, q, 4 + 8 * np.int64(qs[q]["size"]), 2)  # avail_event


@kernel
def has_work(qs, q):
    """Whether a chain is available (for the idle check); -BROKEN_* if the ring is broken."""
    if qs[q]["packed"]:
        return 1 if P.is_avail(qs, q, np.int64(qs[q]["last_avail_idx"]), np.int64(qs[q]["avail_wrap"])) else 0
    return S.avail_count(qs, q)


@inline_kernel
def prefetch_batch(qs, q, regions, n, buffers):
    """Pull the next ``n`` chains' descriptors, then their first buffer lines (``buffers``: BUF_*),
    into the cache.

    Issued together the misses overlap; walked one chain at a time they would queue up, one
    descriptor and one buffer per frame (the lines were last written by the driver's core).
    Only hints: nothing is validated here beyond staying inside the rings and guest memory.
    """
    size = np.int64(qs[q]["size"])
    desc = qs[q]["desc"]
    packed = qs[q]["packed"]
    n = min(n, size)
    first = np.int64(qs[q]["last_avail_idx"])  # a packed ring's size needn't be a power of two:
    idx = first  # its slots are counted with a wrap, not a division (2-3 % of the loop's samples)
    for i in range(n):
        if packed:
            # for writing: the used elements go into these same descriptors, so take the lines
            # exclusive at once rather than read-shared now and upgraded at put_used
            prefetch_write(desc + np.uint64(16 * idx))
            idx += 1
            if idx == size:
                idx = 0
        else:
            h = np.int64(load_u16(qs[q]["avail"] + np.uint64(4 + 2 * ((np.int64(qs[q]["last_avail_idx"]) + i)
                                                                        & (size - 1)))))
            if h < size:
                prefetch_read(desc + np.uint64(16 * h))
    mem = qs[q]["mem"]
    idx = first
    for i in range(n if buffers != BUF_NONE else 0):
        if packed:
            d = desc + np.uint64(16 * idx)
            idx += 1
            if idx == size:
                idx = 0
        else:
            h = np.int64(load_u16(qs[q]["avail"] + np.uint64(4 + 2 * ((np.int64(qs[q]["last_avail_idx"]) + i)
                                                                        & (size - 1)))))
            if h >= size:
                continue
            d = desc + np.uint64(16 * h)
        hva = S.translate_one(regions, mem, load_u64(d), np.uint64(1))
        if hva != 0:
            # a small frame plus its header usually straddles two lines
            if buffers == BUF_WRITE:
                # the data's lines are written. A header alone in its line is usually left as it is
                # (devices.net._deliver) and not prefetched at all: read-prefetching it took packed rx
                # behind testpmd from 31-37 down to 25-27 Mpps on the EPYC VM (tries/epyc_stop35.md)
                if (hva >> np.uint64(6)) == ((hva + np.uint64(qs[q]["hdr_len"])) >> np.uint64(6)):
                    prefetch_write(hva)
                prefetch_write(hva + np.uint64(63))
            else:
                prefetch_read(hva)
                prefetch_read(hva + np.uint64(63))
    if not packed:
        # the used elements this batch will write (the driver read those lines last)
        first = qs[q]["used"] + np.uint64(4 + 8 * (np.int64(qs[q]["used_idx"]) & (size - 1)))
        for k in range(0, 8 * n + 63, 64):
            prefetch_write(min(first + np.uint64(k), qs[q]["used"] + np.uint64(4 + 8 * (size - 1))))
