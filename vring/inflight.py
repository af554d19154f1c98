"""In-flight descriptor tracking (vhost-user "Inflight I/O tracking", GET/SET_INFLIGHT_FD), split rings.

The back-end keeps, in a shared memfd the front-end holds on to across a back-end crash, one
region per queue: a 16-byte header (features, version, desc_num, last_batch_head, used_idx)
and one 16-byte DescStateSplit per descriptor (inflight u8, padding, next u16, counter u64).
A head is marked in flight with a fresh counter when it is popped and cleared once its used
element is published; the ``next`` list and ``used_idx`` tell a restarted back-end whether the
last batch reached the used ring before the crash.

vring completes every chain it pops, in order, within the batch that popped it (a tentative
RX pop it cannot fill is rolled back and unmarked). So the chains in flight are always the
avail ring's entries from the used index on, in counter order, and resubmitting them means
resuming at the used index: ``recover`` checks that the area says exactly that before
relying on it. Packed rings are not tracked (the front-end gets no area; see session).

Threat model: the area is shared with the untrusted front-end, which may write anything into
it at any time. The control plane validates sizes, version, flags, list links and counters
before using them (a bad area is logged and re-initialised, never followed); the kernels only
ever write to it, at offsets bounded by the queue size checked when the ring started.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat

import numpy as np

from vring.jit import kernel
from vring.layout import MAX_QUEUE_SIZE
from vring.ordering import fence_release, load_u32, store_u8, store_u16, store_u16_release, store_u64

log = logging.getLogger(__name__)

HEADER = np.dtype([("features", "<u8"), ("version", "<u2"), ("desc_num", "<u2"), ("last_batch_head", "<u2"),
                   ("used_idx", "<u2")])
DESC_STATE = np.dtype([("inflight", "u1"), ("padding", "5u1"), ("next", "<u2"), ("counter", "<u8")])
HEADER_SIZE = 16
DESC_STATE_SIZE = 16
VERSION = 1
ALIGN = 64  # per-queue regions start on a cache line (as libvhost-user lays them out)
H_LAST_BATCH_HEAD, H_USED_IDX = 12, 14  # header offsets the kernels write
MAX_QUEUES = 256  # vrings per port we accept in an inflight description


class InflightError(Exception):
    """An inflight description or fd the front-end sent can't be used."""


def queue_bytes(queue_size: int) -> int:
    """Bytes of one queue's region (header + DescStateSplit array, rounded up to ALIGN)."""
    return -(-(HEADER_SIZE + DESC_STATE_SIZE * queue_size) // ALIGN) * ALIGN


def check_description(num_queues: int, queue_size: int, max_queues: int) -> int:
    """Validate (num_queues, queue_size) of an inflight description; returns the area's size."""
    if not 1 <= num_queues <= min(max_queues, MAX_QUEUES):
        raise InflightError(f"num_queues {num_queues} not in 1..{min(max_queues, MAX_QUEUES)}")
    if not (1 <= queue_size <= MAX_QUEUE_SIZE and queue_size & (queue_size - 1) == 0):
        raise InflightError(f"queue_size {queue_size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
    return num_queues * queue_bytes(queue_size)


class Area:
    """One mapped inflight area: ``num_queues`` regions of ``queue_size`` descriptors."""

    def __init__(self, mm: mmap.mmap, offset: int, num_queues: int, queue_size: int):
        self.mm = mm
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.size = num_queues * queue_bytes(queue_size)
        self.array: np.ndarray | None = np.frombuffer(mm, np.uint8, self.size, offset)

    def region(self, index: int) -> np.ndarray:
        """The uint8 bytes of queue ``index``'s region."""
        assert self.array is not None
        n = queue_bytes(self.queue_size)
        return self.array[index * n : (index + 1) * n]

    def addr(self, index: int) -> int:
        return int(self.region(index).ctypes.data)

    def close(self) -> None:
        """Unmap. A numpy view still alive here would be a leak: let BufferError propagate."""
        self.array = None
        self.mm.close()


def create(num_queues: int, queue_size: int, max_queues: int) -> tuple[Area, int]:
    """A new zeroed area in a sealed memfd (GET_INFLIGHT_FD); returns it and the fd to send."""
    size = check_description(num_queues, queue_size, max_queues)
    fd = os.memfd_create("vring-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)  # zero-filled: version 0 = not initialised yet
        # the front-end can't shrink it under our mapping (SIGBUS) nor change its seals
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return Area(mm, 0, num_queues, queue_size), fd


def attach(fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int, max_queues: int) -> Area:
    """Map the area the front-end sent back (SET_INFLIGHT_FD). ``fd`` stays the caller's."""
    need = check_description(num_queues, queue_size, max_queues)
    if mmap_size < need:
        raise InflightError(f"mmap_size {mmap_size} < {need} needed for {num_queues} x {queue_size}")
    if mmap_size > need:
        mmap_size = need  # we only ever touch what the description covers
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InflightError("inflight fd is not a file")
    if mmap_offset > st.st_size or st.st_size - mmap_offset < mmap_size:
        raise InflightError(f"inflight fd holds {st.st_size} bytes, area needs {mmap_offset}+{mmap_size}")
    try:
        # map from 0 and slice at the offset (any offset, no page alignment needed)
        mm = mmap.mmap(fd, mmap_offset + mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as e:
        raise InflightError(f"mmap failed: {e}") from None
    return Area(mm, mmap_offset, num_queues, queue_size)


# ---- control plane: a queue's region at ring start (data plane paused) ----


def _views(region: np.ndarray, size: int) -> tuple[np.void, np.ndarray]:
    head = region[:HEADER_SIZE].view(HEADER)[0]
    desc = region[HEADER_SIZE : HEADER_SIZE + DESC_STATE_SIZE * size].view(DESC_STATE)
    return head, desc


def reset(region: np.ndarray, size: int, used_idx: int) -> None:
    """(Re-)initialise a queue's region: version 1, nothing in flight, at ``used_idx``."""
    region[:] = 0
    head, _ = _views(region, size)
    head["version"] = VERSION
    head["desc_num"] = size
    head["used_idx"] = used_idx


def recover(region: np.ndarray, size: int, used_idx: int, avail: np.ndarray, avail_idx: int) -> tuple[int, str]:
    """Reconcile a queue's region with its ring when the ring starts.

    ``used_idx``: the used ring's idx; ``avail``: the avail ring's entries, ``avail_idx`` its idx.
    Returns (chains in flight, what was wrong with the region or ""). The chains are resubmitted by
    resuming at ``used_idx``: they are the next ``n`` avail entries, in counter order (checked).
    Afterwards the region says nothing is in flight; the data plane marks them again as it pops.
    """
    head, desc = _views(region, size)
    version, desc_num = int(head["version"]), int(head["desc_num"])
    if version == 0:  # a fresh area
        reset(region, size, used_idx)
        return 0, ""
    if version != VERSION or desc_num != size:
        reset(region, size, used_idx)
        return 0, f"inflight region has version {version} desc_num {desc_num} (want {VERSION}, {size}): reset"
    flags = desc["inflight"]
    if np.any(flags > 1):
        reset(region, size, used_idx)
        return 0, "inflight region has inflight flags other than 0/1: reset"
    # the last batch: its used elements reached the ring (used idx moved) but the crash came
    # before its flags were cleared; its heads are linked from last_batch_head through next
    batch = (used_idx - int(head["used_idx"])) & 0xFFFF
    if batch:
        if batch > size:
            reset(region, size, used_idx)
            return 0, f"inflight used_idx {int(head['used_idx'])} is {batch} behind the ring's {used_idx}: reset"
        i = int(head["last_batch_head"])
        for _ in range(batch):
            if i >= size:
                reset(region, size, used_idx)
                return 0, f"inflight last-batch list links to {i} (queue size {size}): reset"
            desc[i]["inflight"] = 0
            i = int(desc[i]["next"])
        head["used_idx"] = used_idx
    heads = np.flatnonzero(desc["inflight"])
    n = len(heads)
    msg = ""
    if n:
        # counters are front-end-writable: they only order; a stable sort breaks ties by index
        order = heads[np.argsort(desc["counter"][heads], kind="stable")]
        ready = (avail_idx - used_idx) & 0xFFFF
        expect = avail[(used_idx + np.arange(min(n, ready))) & (size - 1)]
        if n > ready or not np.array_equal(order, expect):
            msg = (f"{n} chain(s) marked in flight are not the avail entries after used idx {used_idx} "
                   f"in counter order: area ignored, resuming at the used index")
            n = 0
        # clear the newest first: a crash now leaves a prefix in flight, still consistent
        for h in order[::-1]:
            desc[h]["inflight"] = 0
    return n, msg


# ---- data plane (a queue's region address in qstate "inflight", 0 when not tracked) ----


@kernel
def mark(qs, q, head):
    """Popped ``head`` (already checked < queue size): counter, then the flag."""
    d = qs[q]["inflight"] + np.uint64(HEADER_SIZE + DESC_STATE_SIZE * np.int64(head))
    c = qs[q]["inflight_counter"] + np.uint64(1)
    qs[q]["inflight_counter"] = c
    store_u64(d + np.uint64(8), c)
    fence_release()  # the counter before the flag (a crash in between leaves it unmarked)
    store_u8(d, np.uint8(1))


@kernel
def unmark(qs, q, head):
    """A tentative pop rolled back: ``head`` (checked < queue size) is no longer in flight."""
    store_u8(qs[q]["inflight"] + np.uint64(HEADER_SIZE + DESC_STATE_SIZE * np.int64(head)), np.uint8(0))


@kernel
def link_batch(qs, q, n):
    """Before the used idx store: link the ``n`` pending used heads into the last-batch list."""
    a = qs[q]["inflight"]
    size = np.int64(qs[q]["size"])
    used = qs[q]["used"]
    prev = np.int64(-1)
    for k in range(n):
        slot = (np.int64(qs[q]["used_idx"]) + k) & (size - 1)
        h = np.int64(load_u32(used + np.uint64(4 + 8 * slot)))
        if h >= size:
            continue  # the driver scribbled over our used element: nothing of ours to link
        if prev >= 0:
            store_u16(a + np.uint64(HEADER_SIZE + DESC_STATE_SIZE * h + 6), np.uint16(prev))
        prev = h
    if prev >= 0:
        store_u16(a + np.uint64(H_LAST_BATCH_HEAD), np.uint16(prev))
    fence_release()  # the list before the used idx that makes it "the last batch"


@kernel
def clear_batch(qs, q, n):
    """After the used idx store: clear the flags of the ``n`` heads just published, then used_idx."""
    a = qs[q]["inflight"]
    size = np.int64(qs[q]["size"])
    used = qs[q]["used"]
    new = np.int64(qs[q]["used_idx"])
    for k in range(n):
        slot = (new - n + k) & (size - 1)
        h = np.int64(load_u32(used + np.uint64(4 + 8 * slot)))
        if h < size:
            store_u8(a + np.uint64(HEADER_SIZE + DESC_STATE_SIZE * h), np.uint8(0))
    store_u16_release(a + np.uint64(H_USED_IDX), np.uint16(new))
