"""Guest memory: the front-end's regions, each mapped once and seen as a numpy array.

Threat model: every region (gpa, size, uaddr, mmap_offset) and every fd comes from an
untrusted front-end. A region is mapped only after checking that its fd is large enough
(a short fd would SIGBUS us on access), that it doesn't wrap the address space and that it
doesn't overlap another region. Translations return contiguous pieces and refuse anything
that isn't wholly inside mapped memory.

The kernels see a small uint64 table (one row per region: gpa, size, uaddr, hva); an empty
row has size 0. The table lives in the device's shared ``regions`` array and is only changed
while the data plane is paused.
"""
from __future__ import annotations

import logging
import mmap
import os
import stat
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

MAX_REGIONS = 32  # slots per port (GET_MAX_MEM_SLOTS)
R_GPA, R_SIZE, R_UADDR, R_HVA = range(4)
U64_MAX = (1 << 64) - 1


class MemoryError_(Exception):
    """A region or an address the front-end gave can't be used."""


@dataclass
class Region:
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    fd: int
    mm: mmap.mmap
    array: np.ndarray = field(repr=False)  # uint8 view of exactly this region

    @property
    def hva(self) -> int:
        return int(self.array.ctypes.data)


def _check_fits(gpa: int, size: int, uaddr: int, offset: int) -> None:
    if size == 0:
        raise MemoryError_("region of size 0")
    for name, start in (("gpa", gpa), ("uaddr", uaddr), ("mmap_offset", offset)):
        if size - 1 > U64_MAX - start:
            raise MemoryError_(f"region {name}={start:#x} + size={size:#x} wraps around")


class GuestMemory:
    """The mapped regions of one front-end, and the row block of the kernels' region table."""

    def __init__(self, table: np.ndarray | None = None):
        self.table = table if table is not None else np.zeros((MAX_REGIONS, 4), dtype=np.uint64)
        assert self.table.shape == (MAX_REGIONS, 4) and self.table.dtype == np.uint64
        self.regions: list[Region] = []

    # ---- changing the table (data plane paused by the caller) ----
    def add(self, gpa: int, size: int, uaddr: int, mmap_offset: int, fd: int) -> Region:
        """Map one region; takes ownership of ``fd`` (closed on failure too)."""
        try:
            _check_fits(gpa, size, uaddr, mmap_offset)
            if len(self.regions) >= MAX_REGIONS:
                raise MemoryError_(f"more than {MAX_REGIONS} regions")
            for r in self.regions:
                if gpa < r.gpa + r.size and r.gpa < gpa + size:
                    raise MemoryError_(f"region gpa={gpa:#x} overlaps gpa={r.gpa:#x}")
                if uaddr < r.uaddr + r.size and r.uaddr < uaddr + size:
                    raise MemoryError_(f"region uaddr={uaddr:#x} overlaps uaddr={r.uaddr:#x}")
            st = os.fstat(fd)
            # A regular/memfd/hugetlbfs file must really hold offset+size bytes, or access SIGBUSes.
            if not stat.S_ISREG(st.st_mode):
                raise MemoryError_("region fd is not a file")
            if st.st_size < mmap_offset + size:
                raise MemoryError_(
                    f"region fd holds {st.st_size:#x} bytes, region needs {mmap_offset + size:#x}"
                )
            try:
                mm = mmap.mmap(fd, mmap_offset + size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, OverflowError) as e:
                raise MemoryError_(f"mmap failed: {e}") from None
        except BaseException:
            os.close(fd)
            raise
        array = np.frombuffer(mm, dtype=np.uint8, count=size, offset=mmap_offset)
        region = Region(gpa, size, uaddr, mmap_offset, fd, mm, array)
        self.regions.append(region)
        self._rebuild()
        return region

    def remove(self, gpa: int, size: int, uaddr: int) -> bool:
        """Unmap the region with these coordinates; False if there is none."""
        for r in self.regions:
            if (r.gpa, r.size, r.uaddr) == (gpa, size, uaddr):
                self.regions.remove(r)
                self._rebuild()
                _release(r)
                return True
        return False

    def clear(self) -> None:
        """Unmap every region and close every fd."""
        regions, self.regions = self.regions, []
        self._rebuild()
        for r in regions:
            _release(r)

    def _rebuild(self) -> None:
        self.table[:] = 0
        for i, r in enumerate(self.regions):
            self.table[i] = (r.gpa, r.size, r.uaddr, r.hva)

    # ---- translation ----
    def uaddr_to_hva(self, uaddr: int, length: int) -> int:
        """Host address of front-end virtual range [uaddr, uaddr+length), which must lie in one region."""
        for r in self.regions:
            off = uaddr - r.uaddr
            if 0 <= off < r.size and length <= r.size - off:
                return r.hva + off
        raise MemoryError_(f"front-end address {uaddr:#x}+{length:#x} is not inside one region")

    def uaddr_to_gpa(self, uaddr: int) -> int | None:
        """Guest-physical address of front-end virtual address ``uaddr``, or None if unmapped."""
        for r in self.regions:
            if 0 <= uaddr - r.uaddr < r.size:
                return r.gpa + (uaddr - r.uaddr)
        return None

    def gpa_pieces(self, gpa: int, length: int) -> list[tuple[Region, int, int]]:
        """Guest-physical range as contiguous (region, offset, length) pieces; raises if any byte is unmapped."""
        pieces = []
        while length > 0:
            for r in self.regions:
                off = gpa - r.gpa
                if 0 <= off < r.size:
                    n = min(length, r.size - off)
                    pieces.append((r, off, n))
                    gpa += n
                    length -= n
                    break
            else:
                raise MemoryError_(f"guest address {gpa:#x} is not mapped")
        return pieces

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of guest bytes (for tests and inspection, never the data plane)."""
        return b"".join(r.array[o : o + n].tobytes() for r, o, n in self.gpa_pieces(gpa, length))

    def __len__(self) -> int:
        return len(self.regions)


def _release(r: Region) -> None:
    r.array = None  # type: ignore[assignment]  # drop the view before closing the map
    try:
        r.mm.close()
    finally:
        os.close(r.fd)
