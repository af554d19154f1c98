"""A vhost-user front-end (driver side) in Python: memfd guest memory, split or packed rings, buffers.

Used by the unit tests, ``vring demo``, the benchmarks and the notebooks. It plays the part
QEMU or DPDK's virtio-user play for real guests: it owns guest memory and the rings' layout,
posts buffers, kicks, and collects used entries. It also sends arbitrary (even malformed)
messages, for the hostile tests.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import socket
import time

import numpy as np

from vring import protocol as P
from vring.layout import (
    AVAIL_F_NO_INTERRUPT,
    DESC,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    USED_F_NO_NOTIFY,
    avail_bytes,
    avail_dtype,
    desc_bytes,
    used_bytes,
    used_dtype,
)
from vring.packed import driver_must_kick
from vring.protocol import PF, F, Req

GPA_BASE = 0x1_0000_0000  # guest-physical base of our memory (not identity: catches translation bugs)
NET_HDR = 12


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class DriverRing:
    """The driver side of one split ring whose descriptor d always owns buffer slot d."""

    def __init__(self, fe: Frontend, index: int, size: int, offset: int, buf_offset: int, buf_size: int):
        self.fe = fe
        self.index = index
        self.size = size
        self.buf_size = buf_size
        self.buf_off = buf_offset
        self.free = list(range(size))
        self._lay_out(offset)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.event_idx = False
        self.kicks = 0

    def _lay_out(self, offset: int) -> None:
        """The ring's parts from ``offset`` on in the front-end's memory, and its driver-side state."""
        size, m = self.size, self.fe.mem
        self.desc_off = offset
        self.avail_off = _align(offset + desc_bytes(size), 64)
        self.used_off = _align(self.avail_off + avail_bytes(size), 4096)
        self.end = self.used_off + used_bytes(size)
        self.desc = np.frombuffer(m, DESC, size, self.desc_off)
        self.avail = np.frombuffer(m, avail_dtype(size), 1, self.avail_off)[0]
        self.used = np.frombuffer(m, used_dtype(size), 1, self.used_off)[0]
        self.avail_idx = 0
        self.last_used = 0

    def buf_gpa(self, d: int) -> int:
        return self.fe.gpa(self.buf_off + d * self.buf_size)

    def buf(self, d: int) -> np.ndarray:
        o = self.buf_off + d * self.buf_size
        return self.fe.mem[o : o + self.buf_size]

    def add_chain(self, segs: list[tuple[int, int, bool]]) -> int:
        """Put a chain of (gpa, len, device_writable) descriptors in the avail ring (unpublished)."""
        if len(segs) > len(self.free):
            raise RuntimeError("ring full")
        ids = [self.free.pop() for _ in segs]
        for i, (gpa, ln, w) in enumerate(segs):
            last = i == len(segs) - 1
            self.desc[ids[i]] = (gpa, ln, (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT),
                                 0 if last else ids[i + 1])
        self.avail["ring"][self.avail_idx % self.size] = ids[0]
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return ids[0]

    def add_buffer(self, data: bytes | None = None, writable: bool = False, length: int | None = None) -> int:
        """One descriptor whose buffer is its own slot, filled with ``data`` (TX) or empty (RX)."""
        if not self.free:
            raise RuntimeError("ring full")
        d = self.free[-1]
        if data is not None:
            self.buf(d)[: len(data)] = np.frombuffer(data, np.uint8)
        n = length if length is not None else (len(data) if data is not None else self.buf_size)
        return self.add_chain([(self.buf_gpa(d), n, writable)])

    def publish(self) -> None:
        old = int(self.avail["idx"])
        self.avail["idx"] = self.avail_idx
        if self._need_kick(old, self.avail_idx):
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1

    def _need_kick(self, old: int, new: int) -> bool:
        if self.event_idx:
            ev = int(self.used["avail_event"])
            return ((new - ev - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not int(self.used["flags"]) & USED_F_NO_NOTIFY

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len); their descriptors go back to the free list."""
        out = []
        idx = int(self.used["idx"])
        while self.last_used != idx:
            e = self.used["ring"][self.last_used % self.size]
            head, ln = int(e["id"]), int(e["len"])
            out.append((head, ln))
            d = head
            for _ in range(self.size):
                self.free.append(d)
                if not int(self.desc[d]["flags"]) & DESC_F_NEXT:
                    break
                d = int(self.desc[d]["next"])
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_interrupts(self, on: bool) -> None:
        self.avail["flags"] = 0 if on else AVAIL_F_NO_INTERRUPT

    def base(self) -> int:
        """SET_VRING_BASE's value: where a back-end that can't tell us (it died) stopped, the used
        index (as QEMU does)."""
        return int(self.used["idx"])

    def addresses(self, uaddr: int) -> dict[str, int]:
        """SET_VRING_ADDR's desc / avail / used addresses."""
        return {"desc": uaddr + self.desc_off, "avail": uaddr + self.avail_off, "used": uaddr + self.used_off}

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            os.close(fd)


class PackedDriverRing(DriverRing):
    """The driver side of one packed ring (VIRTIO_F_RING_PACKED): descriptors are posted and
    used in ring order, each carrying the buffer id d that owns buffer slot d.

    ``avail_off`` and ``used_off`` are the driver's and the device's event suppression areas (what
    SET_VRING_ADDR's avail and used addresses point to for a packed ring), each on its own line."""

    def _lay_out(self, offset: int) -> None:
        size, m = self.size, self.fe.mem
        self.desc_off = offset
        self.avail_off = _align(offset + 16 * size, 64)  # driver event suppression
        self.used_off = self.avail_off + 64  # device event suppression
        self.end = self.used_off + 4
        self.desc = np.frombuffer(m, PACKED_DESC, size, self.desc_off)
        self.driver_event = np.frombuffer(m, "<u2", 2, self.avail_off)  # off_wrap, flags
        self.device_event = np.frombuffer(m, "<u2", 2, self.used_off)
        self.avail_idx, self.avail_wrap = 0, 1  # next position to post, and its wrap counter
        self.used_idx, self.used_wrap = 0, 1  # next position to collect
        self.pending: list[tuple[int, int]] = []  # (position, flags) posted, not yet published
        self.ndescs: dict[int, int] = {}  # buffer id -> descriptors of its chain

    def _avail_flags(self, w: int) -> int:
        return (PACKED_DESC_F_AVAIL if w else 0) | (0 if w else PACKED_DESC_F_USED)

    def add_chain(self, segs: list[tuple[int, int, bool]]) -> int:
        """Put a chain of (gpa, len, device_writable) descriptors in the ring (unpublished); the
        chain takes one buffer id, and as many ring positions as it has descriptors."""
        if not self.free or len(segs) > self.size - sum(self.ndescs.values()):
            raise RuntimeError("ring full")
        bid = self.free.pop()
        self.ndescs[bid] = len(segs)
        for i, (gpa, ln, w) in enumerate(segs):
            last = i == len(segs) - 1
            p = self.avail_idx
            self.desc[p]["addr"], self.desc[p]["len"], self.desc[p]["id"] = gpa, ln, bid
            self.pending.append((p, self._avail_flags(self.avail_wrap) | (DESC_F_WRITE if w else 0)
                                 | (0 if last else DESC_F_NEXT)))
            self.avail_idx += 1
            if self.avail_idx == self.size:
                self.avail_idx, self.avail_wrap = 0, self.avail_wrap ^ 1
        return bid

    def publish(self) -> None:
        if not self.pending:
            return
        # the first descriptor's flags last: the device sees the batch whole or not at all
        for p, f in self.pending[1:] + self.pending[:1]:
            self.desc[p]["flags"] = f
        n = len(self.pending)
        self.pending = []
        if self._need_kick(n):
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1

    def _need_kick(self, n: int) -> bool:
        off_wrap, flags = int(self.device_event[0]), int(self.device_event[1])
        return bool(driver_must_kick(flags, off_wrap, self.event_idx, self.avail_idx, self.avail_wrap, self.size, n))

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len); their buffer ids go back to the free list."""
        out = []
        for _ in range(self.size):
            f = int(self.desc[self.used_idx]["flags"])
            w = self.used_wrap
            if bool(f & PACKED_DESC_F_AVAIL) != bool(w) or bool(f & PACKED_DESC_F_USED) != bool(w):
                break
            bid, ln = int(self.desc[self.used_idx]["id"]), int(self.desc[self.used_idx]["len"])
            if bid not in self.ndescs:
                raise RuntimeError(f"the back-end used buffer id {bid}, which is not in flight")
            out.append((bid, ln))
            self.used_idx += self.ndescs.pop(bid)
            if self.used_idx >= self.size:
                self.used_idx, self.used_wrap = self.used_idx - self.size, self.used_wrap ^ 1
            self.free.append(bid)
        return out

    def set_interrupts(self, on: bool) -> None:
        self.driver_event[1] = RING_EVENT_FLAGS_ENABLE if on else RING_EVENT_FLAGS_DISABLE

    def base(self) -> int:
        """The used position and its wrap counter (bit 15): a packed back-end resumes there."""
        return self.used_idx | (self.used_wrap << 15)


class Frontend:
    """A vhost-user front-end with ``queue_pairs`` RX/TX pairs (net layout: vring 2k RX, 2k+1 TX)."""

    DEFAULT_FEATURES = F.VERSION_1 | F.NET_MRG_RXBUF | F.PROTOCOL_FEATURES | F.RING_INDIRECT_DESC
    DEFAULT_PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.STATUS

    def __init__(self, path: str, queue_pairs: int = 1, queue_size: int = 256, buf_size: int = 2048,
                 mem_size: int = 0, features: int | None = None, protocol_features: int | None = None,
                 nvrings: int | None = None, inflight: bool = False, packed: bool = False):
        self.path = path
        self.packed = packed
        self.nvrings = nvrings if nvrings is not None else 2 * queue_pairs
        self.queue_size = queue_size
        self.buf_size = buf_size
        ring_area = self.nvrings * _align(16 * queue_size + 8192 + 8 * queue_size, 4096)
        need = ring_area + self.nvrings * queue_size * buf_size + (1 << 20)
        self.mem_size = max(mem_size, _align(need, 1 << 21))
        self.want_features = int(features if features is not None else self.DEFAULT_FEATURES)
        self.want_protocol = int(protocol_features if protocol_features is not None else self.DEFAULT_PROTOCOL)
        if inflight:
            self.want_protocol |= PF.INFLIGHT_SHMFD
        if packed:
            self.want_features |= F.RING_PACKED
        # the back-end's inflight area (GET_INFLIGHT_FD), kept across reconnects as QEMU does for blk
        self.inflight_fd = -1
        self.inflight_desc: np.ndarray | None = None
        self.inflight_mm: mmap.mmap | None = None
        self.fd = os.memfd_create("vring-frontend", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.mem_size)
        self.mm = mmap.mmap(self.fd, self.mem_size, flags=mmap.MAP_SHARED)
        self.mem = np.frombuffer(self.mm, np.uint8)
        self.uaddr = int(self.mem.ctypes.data)
        self.rings: list[DriverRing] = []
        off = 0
        buf_off = ring_area
        ring_class = PackedDriverRing if packed else DriverRing
        for i in range(self.nvrings):
            r = ring_class(self, i, queue_size, off, buf_off, buf_size)
            self.rings.append(r)
            off = _align(r.end, 4096)
            buf_off += queue_size * buf_size
        self.sock: socket.socket | None = None
        self.features = 0
        self.protocol_features = 0

    # ---- addresses ----
    def gpa(self, offset: int) -> int:
        return GPA_BASE + offset

    def region(self) -> np.ndarray:
        return P.record(P.MEM_REGION, gpa=GPA_BASE, size=self.mem_size, uaddr=self.uaddr, mmap_offset=0)

    # ---- messages ----
    def connect(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.settimeout(10)
        self.sock = s

    def send(self, request: int, payload: bytes | np.ndarray = b"", fds: tuple[int, ...] = (),
             need_reply: bool = False, flags: int | None = None) -> None:
        msg = P.encode(request, payload, need_reply=need_reply)
        if flags is not None:
            msg = msg[:4] + int(flags).to_bytes(4, "little") + msg[8:]
        assert self.sock is not None
        if fds:
            socket.send_fds(self.sock, [msg], list(fds))
        else:
            self.sock.sendall(msg)

    def recv(self) -> tuple[int, int, bytes]:
        assert self.sock is not None
        head = self._exact(P.HEADER_SIZE)
        req, flags, size = P.decode_header(head)
        return req, flags, self._exact(size)

    def recv_fds(self) -> tuple[int, int, bytes, list[int]]:
        """A message that may carry fds (the header's first byte brings them)."""
        assert self.sock is not None
        head, fds, _, _ = socket.recv_fds(self.sock, P.HEADER_SIZE, P.MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        if not head:
            raise ConnectionError("back-end closed the connection")
        head += self._exact(P.HEADER_SIZE - len(head))
        req, flags, size = P.decode_header(head)
        return req, flags, self._exact(size), fds

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            c = self.sock.recv(n - len(buf))  # type: ignore[union-attr]
            if not c:
                raise ConnectionError("back-end closed the connection")
            buf += c
        return buf

    def call(self, request: int, payload: bytes | np.ndarray = b"", fds: tuple[int, ...] = ()) -> bytes:
        """A request with a reply of its own: returns the reply payload."""
        self.send(request, payload, fds)
        req, flags, body = self.recv()
        assert req == request and flags & P.FLAG_REPLY, (req, flags)
        return body

    def ack(self, request: int, payload: bytes | np.ndarray = b"", fds: tuple[int, ...] = ()) -> int:
        """A request sent with NEED_REPLY: returns the back-end's status (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        req, flags, body = self.recv()
        assert req == request, (req, request)
        return int(np.frombuffer(body, "<u8")[0])

    def _set(self, request: int, payload: bytes | np.ndarray = b"", fds: tuple[int, ...] = ()) -> None:
        if self.protocol_features & PF.REPLY_ACK:
            status = self.ack(request, payload, fds)
            if status:
                raise RuntimeError(f"{Req(request).name} failed ({status})")
        else:
            self.send(request, payload, fds)

    def u64(self, request: int) -> int:
        return int(np.frombuffer(self.call(request), "<u8")[0])

    # ---- set-up, in the order DPDK's virtio-user uses ----
    def setup(self) -> None:
        if self.sock is None:
            self.connect()
        self.send(Req.SET_OWNER)
        offered = self.u64(Req.GET_FEATURES)
        self.features = offered & self.want_features
        if self.packed and not self.features & F.RING_PACKED:
            raise RuntimeError("the back-end does not offer VIRTIO_F_RING_PACKED")
        if self.features & F.PROTOCOL_FEATURES:
            pf = self.u64(Req.GET_PROTOCOL_FEATURES) & self.want_protocol
            self.send(Req.SET_PROTOCOL_FEATURES, P.u64(pf))
            self.protocol_features = pf
        self._set(Req.SET_FEATURES, P.u64(self.features))
        if self.protocol_features & PF.INFLIGHT_SHMFD:
            # as QEMU's vhost-user-blk: get an area once, hand it back on every (re)connection
            if self.inflight_fd < 0:
                self.get_inflight_fd()
            if self.inflight_fd >= 0:
                self._set(Req.SET_INFLIGHT_FD, self.inflight_desc, (self.inflight_fd,))
        self._set(Req.SET_MEM_TABLE, P.mem_table(self.region()), (self.fd,))
        for r in self.rings:
            r.event_idx = bool(self.features & F.RING_EVENT_IDX)
            self._set(Req.SET_VRING_NUM, P.record(P.VRING_STATE, index=r.index, num=r.size))
            self._set(Req.SET_VRING_BASE, P.record(P.VRING_STATE, index=r.index, num=r.base()))
            self._set(Req.SET_VRING_ADDR, P.record(P.VRING_ADDR, index=r.index, **r.addresses(self.uaddr)))
            self._set(Req.SET_VRING_CALL, P.u64(r.index), (r.call_fd,))
            self._set(Req.SET_VRING_KICK, P.u64(r.index), (r.kick_fd,))
        if self.features & F.PROTOCOL_FEATURES:
            for r in self.rings:
                self._set(Req.SET_VRING_ENABLE, P.record(P.VRING_STATE, index=r.index, num=1))
        if self.protocol_features & PF.STATUS:
            # ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK: DPDK's back-end starts the device only now
            self._set(Req.SET_STATUS, P.u64(0xF))

    def get_inflight_fd(self) -> None:
        """GET_INFLIGHT_FD for every vring; keeps the fd and maps the area (mmap_size 0: none given)."""
        self.send(Req.GET_INFLIGHT_FD, P.record(P.INFLIGHT, num_queues=self.nvrings, queue_size=self.queue_size))
        req, flags, body, fds = self.recv_fds()
        assert req == Req.GET_INFLIGHT_FD and flags & P.FLAG_REPLY, (req, flags)
        d = np.frombuffer(body, P.INFLIGHT, 1).copy()
        size, offset = int(d[0]["mmap_size"]), int(d[0]["mmap_offset"])
        if size == 0 or not fds:
            for fd in fds:
                os.close(fd)
            return
        for fd in fds[1:]:
            os.close(fd)
        self.inflight_fd, self.inflight_desc = fds[0], d
        self.inflight_mm = mmap.mmap(self.inflight_fd, offset + size, flags=mmap.MAP_SHARED)

    def inflight_region(self, index: int) -> np.ndarray:
        """The bytes of vring ``index``'s region of the inflight area (for tests and inspection)."""
        from vring.inflight import queue_bytes

        assert self.inflight_mm is not None and self.inflight_desc is not None
        n = queue_bytes(self.queue_size)
        return np.frombuffer(self.inflight_mm, np.uint8, n, int(self.inflight_desc[0]["mmap_offset"]) + index * n)

    def reconnect(self, timeout: float = 30.0) -> None:
        """A new connection to a (restarted) back-end, rings and inflight area carried over."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.connect(timeout)
        self.setup()

    def get_vring_base(self, index: int) -> int:
        body = self.call(Req.GET_VRING_BASE, P.record(P.VRING_STATE, index=index))
        return int(np.frombuffer(body, P.VRING_STATE)[0]["num"])

    # ---- net helpers (vring 2k = RX, 2k+1 = TX) ----
    def rx(self, pair: int = 0) -> DriverRing:
        return self.rings[2 * pair]

    def tx(self, pair: int = 0) -> DriverRing:
        return self.rings[2 * pair + 1]

    def send_frames(self, frames: list[bytes], pair: int = 0) -> int:
        """Queue frames (each behind a zero virtio_net_hdr) on TX; returns how many fit."""
        t = self.tx(pair)
        t.take_used()
        n = 0
        for f in frames:
            if not t.free:
                break
            t.add_buffer(bytes(NET_HDR) + f)
            n += 1
        t.publish()
        return n

    def post_rx(self, n: int | None = None, pair: int = 0) -> int:
        r = self.rx(pair)
        k = len(r.free) if n is None else min(n, len(r.free))
        for _ in range(k):
            r.add_buffer(writable=True)
        r.publish()
        return k

    def recv_frames(self, pair: int = 0) -> list[bytes]:
        """Frames the back-end delivered (header stripped), buffers reposted."""
        r = self.rx(pair)
        out = []
        used = r.take_used()
        i = 0
        while i < len(used):
            head, ln = used[i]
            data = r.buf(head)[:ln].tobytes()
            nbuf = int.from_bytes(data[10:12], "little") if self.features & F.NET_MRG_RXBUF else 1
            for k in range(1, max(nbuf, 1)):
                if i + k < len(used):
                    h2, l2 = used[i + k]
                    data += r.buf(h2)[:l2].tobytes()
            out.append(data[NET_HDR if (self.features & (F.VERSION_1 | F.NET_MRG_RXBUF)) else 10 :])
            i += max(nbuf, 1)
        if used:
            self.post_rx(len(used), pair)
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for r in self.rings:
            r.close()
        self.rings = []
        if self.inflight_mm is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view of the area
                self.inflight_mm.close()
            self.inflight_mm = None
        if self.inflight_fd >= 0:
            os.close(self.inflight_fd)
            self.inflight_fd = -1
        self.mem = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it does
        os.close(self.fd)
