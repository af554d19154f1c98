"""Guest memory: mapping checks, translation at region edges, and nothing left behind."""
from __future__ import annotations

import os

import pytest

from vring.memory import MAX_REGIONS, GuestMemory, MemoryError_


def memfd(size: int) -> int:
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    return fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_translation_edges_and_spanning():
    m = GuestMemory()
    m.add(0x1000, 0x1000, 0x7000, 0, memfd(0x1000))
    m.add(0x2000, 0x2000, 0x9000, 0x1000, memfd(0x3000))  # contiguous in gpa, mapped at an offset
    assert m.table[0, 1] == 0x1000 and m.table[2, 1] == 0
    # last byte of the first region, then spanning into the second
    p = m.gpa_pieces(0x1FFF, 2)
    assert [(r.gpa, o, n) for r, o, n in p] == [(0x1000, 0xFFF, 1), (0x2000, 0, 1)]
    with pytest.raises(MemoryError_):
        m.gpa_pieces(0x3FFF, 2)  # one byte past the end
    with pytest.raises(MemoryError_):
        m.gpa_pieces(0xFFF, 1)
    assert m.uaddr_to_hva(0x7000, 0x1000) == m.regions[0].hva
    with pytest.raises(MemoryError_):
        m.uaddr_to_hva(0x7001, 0x1000)  # one byte too far: rings must lie in one region
    with pytest.raises(MemoryError_):
        m.uaddr_to_hva(0x7FFF, 2)  # uaddr ranges are not contiguous across regions
    # data written through one view is what translation reads back
    m.regions[1].array[0:4] = [1, 2, 3, 4]
    assert m.read(0x1FFE, 6) == b"\x00\x00\x01\x02\x03\x04"
    m.clear()


def test_bad_regions_are_refused_and_their_fds_closed():
    m = GuestMemory()
    before = open_fds()
    with pytest.raises(MemoryError_, match="holds"):
        m.add(0, 0x10000, 0, 0, memfd(0x1000))  # fd shorter than the region: would SIGBUS
    with pytest.raises(MemoryError_, match="holds"):
        m.add(0, 0x1000, 0, 0x1000, memfd(0x1800))  # offset + size past the end
    with pytest.raises(MemoryError_, match="wraps"):
        m.add(2**64 - 0x1000, 0x2000, 0, 0, memfd(0x2000))
    with pytest.raises(MemoryError_, match="size 0"):
        m.add(0, 0, 0, 0, memfd(0x1000))
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(MemoryError_, match="not a file"):
        m.add(0, 0x1000, 0, 0, r)
    m.add(0, 0x2000, 0x10000, 0, memfd(0x2000))
    with pytest.raises(MemoryError_, match="overlaps"):
        m.add(0x1000, 0x2000, 0x40000, 0, memfd(0x2000))
    with pytest.raises(MemoryError_, match="overlaps"):
        m.add(0x8000, 0x2000, 0x11000, 0, memfd(0x2000))
    assert len(m) == 1
    m.clear()
    assert open_fds() == before
    assert not m.table.any()


def test_remove_and_slot_limit():
    m = GuestMemory()
    before = open_fds()
    for i in range(MAX_REGIONS):
        m.add(i * 0x1000, 0x1000, 0x100000 + i * 0x1000, 0, memfd(0x1000))
    with pytest.raises(MemoryError_, match="more than"):
        m.add(0x900000, 0x1000, 0x900000, 0, memfd(0x1000))
    assert m.remove(0x3000, 0x1000, 0x103000)
    assert not m.remove(0x3000, 0x1000, 0x103000)
    assert len(m) == MAX_REGIONS - 1 and m.table[MAX_REGIONS - 1, 1] == 0
    m.clear()
    assert open_fds() == before
