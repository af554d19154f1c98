"""Dirty-page logging for live migration (vhost-user SET_LOG_BASE, VHOST_F_LOG_ALL).

While the front-end migrates a guest it copies guest memory page by page and re-copies the
pages that changed meanwhile. Pages changed by the guest's CPUs it sees itself; pages we write
(RX buffers, used rings, packed descriptors) it learns from a shared bitmap, one bit per 4 KiB
guest-physical page (bit ``gpa >> 12``, as DPDK's ``vhost_log_page`` and libvhost-user's
``vu_log_page``). We set bits after the write, with an atomic OR: the front-end reads and
clears the bitmap concurrently.

Threat model: the log's fd, size and offset come from the untrusted front-end. The log is
mapped only if its fd really holds ``offset + size`` bytes; kernels bound every bit by
``log_size`` (a log too small for guest memory loses bits and counts ``log_miss``, it never
writes past the map). Logging state is in each queue's record (``log_base`` 0 = off), so
the data plane pays one predictable branch per batch or frame while logging is off.
"""
from __future__ import annotations

import logging
import mmap
import os
import stat

import numpy as np

from vring.jit import kernel
from vring.ordering import atomic_or_u8

log = logging.getLogger(__name__)

PAGE_SHIFT = 12  # VHOST_LOG_PAGE: one bit per 4 KiB
MAX_LOG = 1 << 30  # bytes: a bitmap for 32 TiB of guest memory; larger is a hostile size


class LogError(Exception):
    """The front-end's log can't be used."""


class DirtyLog:
    """One front-end's dirty bitmap: its fd mapped once (shared), seen from ``offset`` for ``size`` bytes."""

    def __init__(self, fd: int, size: int, offset: int):
        """Takes ownership of ``fd``: it is closed here in every case (the mapping keeps the memory)."""
        try:
            if size == 0 or size > MAX_LOG:
                raise LogError(f"log size {size:#x} not in 1..{MAX_LOG:#x}")
            if offset > MAX_LOG:
                raise LogError(f"log offset {offset:#x} too large")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LogError("log fd is not a file")
            if st.st_size < offset + size:  # a short file would SIGBUS us on access
                raise LogError(f"log fd holds {st.st_size:#x} bytes, the log needs {offset + size:#x}")
            try:
                self.mm = mmap.mmap(fd, offset + size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, OverflowError) as e:
                raise LogError(f"mmap failed: {e}") from None
        finally:
            os.close(fd)
        self.size = size
        self.offset = offset
        self.array: np.ndarray | None = np.frombuffer(self.mm, np.uint8, size, offset)

    @property
    def hva(self) -> int:
        assert self.array is not None
        return int(self.array.ctypes.data)

    def covers(self, gpa_end: int) -> bool:
        """Whether every page below guest-physical ``gpa_end`` has a bit."""
        pages = (gpa_end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        return (pages + 7) // 8 <= self.size

    def close(self) -> None:
        """Unmap (the data plane must be paused and no longer point at it)."""
        self.array = None  # drop the view before closing the map
        self.mm.close()


# ---- kernels ----
@kernel
def log_gpa(qs, q, gpa, length):
    """Mark the pages of guest range [gpa, gpa+length) dirty in queue q's log (no-op while off)."""
    base = qs[q]["log_base"]
    if base == 0 or length == 0:
        return
    gpa = np.uint64(gpa)
    first = gpa >> np.uint64(PAGE_SHIFT)
    last = (gpa + (np.uint64(length) - np.uint64(1))) >> np.uint64(PAGE_SHIFT)
    size = qs[q]["log_size"]
    page = first
    while page <= last:
        byte = page >> np.uint64(3)
        if byte >= size:
            qs[q]["log_miss"] += 1  # a log too small for guest memory: never write past it
            return
        atomic_or_u8(base + byte, np.uint8(1 << (page & np.uint64(7))))
        page += np.uint64(1)


@kernel
def log_hva(qs, q, regions, hva, length):
    """Log a write at host address ``hva`` (inside one region of the queue's table): back to a guest address."""
    mem = qs[q]["mem"]
    hva = np.uint64(hva)
    for r in range(regions.shape[1]):
        size = regions[mem, r, 1]
        if size == 0:
            break
        h = regions[mem, r, 3]
        if hva >= h and hva - h < size:
            log_gpa(qs, q, regions[mem, r, 0] + (hva - h), length)
            return
    qs[q]["log_miss"] += 1


@kernel
def log_pieces(qs, q, regions, d_hva, d_len, nbytes):
    """Log the first ``nbytes`` written through the pieces d_* (each inside one region, as translated)."""
    nbytes = np.uint64(nbytes)
    i = 0
    while nbytes > 0 and i < d_hva.shape[0]:
        k = min(d_len[i], nbytes)
        log_hva(qs, q, regions, d_hva[i], k)
        nbytes -= k
        i += 1


@kernel
def log_ring(qs, q, offset, length):
    """A write at byte ``offset`` of the ring part logged through ``log_used``."""
    if qs[q]["log_ring"]:
        log_gpa(qs, q, qs[q]["log_used"] + np.uint64(offset), length)


@kernel
def log_split_used(qs, q, old_idx, count):
    """``count`` used elements written from used index ``old_idx`` (two pieces on wrap), and the used idx."""
    if not qs[q]["log_ring"]:
        return
    size = np.int64(qs[q]["size"])
    slot = np.int64(old_idx) & (size - 1)
    n1 = min(np.int64(count), size - slot)
    log_ring(qs, q, 4 + 8 * slot, 8 * n1)
    if count > n1:
        log_ring(qs, q, 4, 8 * (np.int64(count) - n1))
    log_ring(qs, q, 2, 2)


@kernel
def log_packed_used(qs, q, old_idx, new_idx, count):
    """Packed: descriptors old_idx..new_idx (mod size) were written back (ids, lengths, flags)."""
    if not qs[q]["log_ring"] or count == 0:
        return
    size = np.int64(qs[q]["size"])
    n = (np.int64(new_idx) - np.int64(old_idx)) % size
    if n == 0:
        n = size  # a whole ring's worth
    first = min(n, size - np.int64(old_idx))
    log_gpa(qs, q, qs[q]["log_desc"] + np.uint64(16 * np.int64(old_idx)), 16 * first)
    if n > first:
        log_gpa(qs, q, qs[q]["log_desc"], 16 * (n - first))
