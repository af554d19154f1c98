"""Packet capture from inside the data plane to standard pcap files.

The data plane copies each captured frame (at most ``SNAPLEN`` bytes) into a shared byte ring
and appends a record; a Python thread drains both into one pcap file per port. One producer
(the data-plane loop), one consumer (the drain thread): the producer publishes its record
count with a release store, the consumer its progress likewise. When the rings are full the
frame is not captured and counted as dropped: capture never stalls forwarding. When capture
is off the data plane pays one branch per batch.
"""
from __future__ import annotations

import logging
import struct
import threading
import time

import numpy as np
from numba import njit

from vring.jit import kernel
from vring.ordering import copy_bytes, cycles, load_i64_acquire, store_i64_release
from vring.ordering_calibrate import ns_per_cycle

log = logging.getLogger(__name__)

SNAPLEN = 2048
BUF_BYTES = 8 << 20
N_RECORDS = 1 << 14
# control slots
K_PORTS, K_WRITTEN, K_READ, K_PROD_BYTES, K_CONS_BYTES, K_DROPPED, K_NVQ, K_LIMIT, K_CAPTURED = range(9)
CTL_SIZE = 16
MAX_PORTS = 64
# record columns
REC_PORT, REC_DIR, REC_CAPLEN, REC_LEN, REC_CYCLES, REC_OFF = range(6)
DIR_FROM_GUEST, DIR_TO_GUEST = 0, 1


@njit(cache=True)
def empty():
    """The capture arrays with capture off (what the data plane gets when --pcap isn't used)."""
    return np.zeros(CTL_SIZE, np.int64), np.zeros(1, np.uint8), np.zeros((1, 6), np.int64)


@kernel
def capture(ctl, buf, rec, row, direction, hva, lens, n, skip, flen):
    """Copy one frame (pieces hva/lens[:n], after ``skip`` header bytes) into the capture ring."""
    port = row // ctl[K_NVQ]
    if not (ctl[K_PORTS] >> port) & 1:
        return
    if ctl[K_LIMIT] > 0 and ctl[K_CAPTURED] >= ctl[K_LIMIT]:
        return
    base = np.uint64(ctl.ctypes.data)
    written = ctl[K_WRITTEN]
    read = load_i64_acquire(base + np.uint64(8 * K_READ))
    caplen = min(flen, SNAPLEN)
    size = buf.shape[0]
    pos = ctl[K_PROD_BYTES] % size
    waste = 0
    if pos + caplen > size:
        waste = size - pos  # frames are stored contiguously: skip the tail
        pos = 0
    cons = load_i64_acquire(base + np.uint64(8 * K_CONS_BYTES))
    if written - read >= rec.shape[0] or ctl[K_PROD_BYTES] + waste + caplen - cons > size:
        ctl[K_DROPPED] += 1
        return
    dst = np.uint64(buf.ctypes.data) + np.uint64(pos)
    left = np.uint64(caplen)
    sk = np.uint64(skip)
    for j in range(n):
        if left == 0:
            break
        ln = lens[j]
        if sk >= ln:
            sk -= ln
            continue
        k = min(ln - sk, left)
        copy_bytes(dst, hva[j] + sk, k)
        dst += k
        left -= k
        sk = np.uint64(0)
    r = written % rec.shape[0]
    rec[r, REC_PORT] = port
    rec[r, REC_DIR] = direction
    rec[r, REC_CAPLEN] = caplen
    rec[r, REC_LEN] = flen
    rec[r, REC_CYCLES] = np.int64(cycles())
    rec[r, REC_OFF] = pos
    ctl[K_PROD_BYTES] += waste + caplen
    ctl[K_CAPTURED] += 1
    store_i64_release(base + np.uint64(8 * K_WRITTEN), written + 1)


PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, SNAPLEN, 1)  # nanosecond pcap, Ethernet


class PcapDrain:
    """Owns the capture arrays of a device and writes them to one pcap file per captured port."""

    def __init__(self, paths: dict[int, str], nvq: int, limit: int = 0):
        if max(paths, default=0) >= MAX_PORTS:
            raise ValueError(f"capture supports ports 0..{MAX_PORTS - 1}")
        self.ctl = np.zeros(CTL_SIZE, np.int64)
        self.buf = np.zeros(BUF_BYTES, np.uint8)
        self.rec = np.zeros((N_RECORDS, 6), np.int64)
        self.ctl[K_NVQ] = nvq
        self.ctl[K_LIMIT] = limit
        self.files = {p: open(path, "wb") for p, path in paths.items()}
        for f in self.files.values():
            f.write(PCAP_HEADER)
        self._cyc0 = None
        self._wall0 = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pcap", daemon=True)
        self.written = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.ctl, self.buf, self.rec

    def start(self) -> None:
        from vring.ordering_calibrate import cycles_now

        self._ns = ns_per_cycle()
        self._cyc0, self._wall0 = int(cycles_now()), time.time_ns()
        mask = 0
        for p in self.files:
            mask |= 1 << p
        self.ctl[K_PORTS] = mask
        self._thread.start()

    def drain(self) -> int:
        """Write every record the data plane has published; returns how many."""
        written = int(self.ctl[K_WRITTEN])
        read = int(self.ctl[K_READ])
        cons = int(self.ctl[K_CONS_BYTES])
        for i in range(read, written):
            port, _, caplen, flen, cyc, off = (int(x) for x in self.rec[i % N_RECORDS])
            if off == 0 and cons % BUF_BYTES != 0:
                cons += BUF_BYTES - cons % BUF_BYTES  # the producer skipped the tail
            ts = self._wall0 + int((cyc - self._cyc0) * self._ns)
            f = self.files[port]
            f.write(struct.pack("<IIII", ts // 1_000_000_000, ts % 1_000_000_000, caplen, flen))
            f.write(self.buf[off : off + caplen].tobytes())
            cons += caplen
        # publish progress (the GIL-held numpy stores are plain; x86 keeps their order)
        self.ctl[K_CONS_BYTES] = cons
        self.ctl[K_READ] = written
        self.written += written - read
        return written - read

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.drain()

    def stop(self) -> None:
        self.ctl[K_PORTS] = 0
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.drain()
        for f in self.files.values():
            f.close()
        if self.ctl[K_DROPPED]:
            log.warning("pcap: %d frames not captured (capture buffer full)", self.ctl[K_DROPPED])
