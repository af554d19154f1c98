"""One connected front-end: reads vhost-user messages, checks them, and runs a handler per request.

Threat model: the front-end is untrusted. Framing (version, size, fd count) is checked by
vring.protocol before any handler; each handler checks indexes and values; every fd that
arrives is either kept by exactly one owner or closed before the next message is read.
A bad message gets a failure reply (REPLY_ACK) or closes this connection; other ports and
devices keep running. Rings and memory change only while the data plane is paused.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from vring import inflight
from vring import protocol as P
from vring.device import Device
from vring.dirtylog import DirtyLog, LogError
from vring.layout import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    avail_bytes,
    desc_bytes,
    used_bytes,
)
from vring.memory import MAX_REGIONS, MemoryError_
from vring.protocol import PF, F, ProtocolError, Req
from vring.ring import set_kicks
from vring.split import BROKEN_RING_ADDRESS, BROKEN_RING_BASE

log = logging.getLogger(__name__)

MSG_TIMEOUT_S = 5.0  # a front-end that stops mid-message (or stops reading replies) is dropped


class Failed(Exception):
    """The request is refused: a failure reply (REPLY_ACK), and the connection stays up."""


@dataclass
class Vring:
    """What the front-end has told us about one vring."""

    num: int = 0
    addr: np.void | None = None
    base: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    enabled: bool = False
    started: bool = False
    fds: list = field(default_factory=list)


def feature_names(mask: int, flag_type: type) -> str:
    names = [f.name for f in flag_type if mask & f.value and f.name]
    rest = mask & ~sum(f.value for f in flag_type)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "0"


class Session:
    """The state of one front-end connection on one port of a device."""

    def __init__(self, device: Device, port: int, sock: socket.socket, name: str = ""):
        self.dev = device
        self.port = port
        self.sock = sock
        self.name = name or f"port{port}"
        # Reads never block: a message arriving in pieces is buffered (with its fds) until complete,
        # so a front-end that stops mid-message holds no other port; stalled() reports it.
        self.sock.setblocking(False)
        self._buf = bytearray()
        self._fds: list[int] = []
        self._size = 0
        self._deadline = 0.0
        self.mem = device.memory[port]
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.status = 0
        self.owner = False
        self.vrings = [Vring() for _ in range(device.nvq)]
        self.closed = False
        # (gpa, size, uaddr) -> extra ADD_MEM_REGs of an already mapped region (see _add_mem_reg)
        self.mem_dups: dict[tuple[int, int, int], int] = {}
        self.inflight: inflight.Area | None = None  # GET/SET_INFLIGHT_FD
        self.log: DirtyLog | None = None  # SET_LOG_BASE: the front-end's dirty bitmap (live migration)

    # ---- I/O ----
    def _send(self, request: int, payload: bytes | np.ndarray, fds: list[int] | None = None) -> None:
        # replies are small; a front-end that leaves them unread until its socket buffer is full
        # is dropped after MSG_TIMEOUT_S instead of holding the control plane
        msg = P.encode(request, payload, reply=True)
        self.sock.settimeout(MSG_TIMEOUT_S)
        try:
            if fds:
                n = socket.send_fds(self.sock, [msg], fds)
                self.sock.sendall(msg[n:])  # the rest, if the first sendmsg was short (fds went with byte 0)
            else:
                self.sock.sendall(msg)
        finally:
            self.sock.setblocking(False)

    def stalled(self) -> bool:
        """A message has been incomplete for longer than MSG_TIMEOUT_S (the server then drops us)."""
        return bool(self._buf) and time.monotonic() > self._deadline

    def _drop_fds(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds = []

    def handle(self) -> bool:
        """Read what the socket has (the selector said readable) and run the message once it is
        complete; at most one message per call. False when the connection is finished."""
        try:
            while True:
                have = len(self._buf)
                need = P.HEADER_SIZE - have if have < P.HEADER_SIZE else P.HEADER_SIZE + self._size - have
                try:
                    data, fds, flags, _ = socket.recv_fds(self.sock, need, P.MAX_FDS, socket.MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    return True  # the rest of the message is not here yet
                self._fds += fds  # a message's fds come with its first bytes
                if flags & socket.MSG_CTRUNC:
                    raise ProtocolError("more fds than a message may carry (truncated)", fatal=True)
                if not data:
                    if have:
                        raise ProtocolError("connection closed mid-message", fatal=True)
                    return False
                if not have:
                    self._deadline = time.monotonic() + MSG_TIMEOUT_S  # one deadline for the whole message
                self._buf += data
                if have < P.HEADER_SIZE <= len(self._buf):
                    request, mflags, self._size = P.decode_header(bytes(self._buf[: P.HEADER_SIZE]))
                    P.check_header(request, mflags, self._size)
                if len(self._buf) == P.HEADER_SIZE + self._size:
                    break
            request, mflags, size = P.decode_header(bytes(self._buf[: P.HEADER_SIZE]))
            payload = bytes(self._buf[P.HEADER_SIZE :])
            self._buf.clear()
            try:
                self._dispatch(request, mflags, payload, self._fds)  # handlers take the fds they keep
            finally:
                self._drop_fds()
            return True
        except ProtocolError as e:
            log.warning("%s: %s%s", self.name, e, " (closing connection)" if e.fatal else "")
            return not e.fatal
        except (ConnectionError, TimeoutError, OSError) as e:
            log.info("%s: connection error: %s", self.name, e)
            return False

    def _dispatch(self, request: int, mflags: int, payload: bytes, fds: list[int]) -> None:
        need_ack = bool(mflags & P.FLAG_NEED_REPLY) and bool(self.protocol_features & PF.REPLY_ACK)
        try:
            spec = P.check_message(request, payload, len(fds))
        except ProtocolError as e:
            known = request in P.REQUESTS.keys()
            if known and P.REQUESTS[Req(request)].reply:
                # the front-end waits for a reply we can't give: close rather than leave it hanging
                raise ProtocolError(f"{e}; closing", fatal=True) from None
            log.warning("%s: %s", self.name, e)
            if need_ack:
                self._send(request, P.u64(1))
            return
        log.debug("%s: %s flags=%#x size=%d fds=%d", self.name, Req(request).name, mflags, len(payload), len(fds))
        handler = getattr(self, "_" + Req(request).name.lower(), None)
        ok = True
        reply = None
        try:
            if handler is None:
                raise Failed(f"{Req(request).name} is not supported")
            reply = handler(payload, fds)
        except (Failed, MemoryError_) as e:
            log.warning("%s: %s refused: %s", self.name, Req(request).name, e)
            ok = False
        if spec.reply:
            if reply is None:
                # a request that must be answered but failed: no way to say so in-band
                raise ProtocolError(f"{Req(request).name} failed; closing", fatal=True)
            out_fds: list[int] = []
            if isinstance(reply, tuple):  # (payload, fds to send and then close)
                reply, out_fds = reply
            try:
                self._send(request, reply, out_fds)
            finally:
                for fd in out_fds:
                    os.close(fd)
        elif need_ack:
            self._send(request, P.u64(0 if ok else 1))

    # ---- helpers ----
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise Failed(f"vring index {index} out of range (0..{len(self.vrings) - 1})")
        return self.vrings[index]

    @staticmethod
    def _take_fd(fds: list[int]) -> int:
        return fds.pop(0)

    def _sync(self, index: int) -> None:
        """Save the data plane's position of a running ring into the front-end's view."""
        row = self.dev.row(self.port, index)
        q = self.dev.qstate[row]
        if q["ready"]:
            wrap = int(q["avail_wrap"]) << 15 if q["packed"] else 0
            self.vrings[index].base = int(q["last_avail_idx"]) | wrap

    def _apply(self, index: int) -> None:
        """Recompute a vring's qstate row from what the front-end said (data plane paused)."""
        v = self.vrings[index]
        row = self.dev.row(self.port, index)
        q = self.dev.qstate[row]
        q["ready"] = 0
        q["inflight"] = 0
        q["kick_fd"] = v.kick
        q["call_fd"] = v.call
        q["mem"] = self.port
        self._apply_log(q, v)
        if not (v.started and v.enabled and v.num and v.addr is not None and len(self.mem)):
            return
        packed = bool(self.features & F.RING_PACKED)
        # packed (§2.8): descriptor ring, driver and device event suppression areas (4 bytes each)
        parts = ((desc_bytes(v.num), DESC_ALIGN), (4, 4), (4, 4)) if packed else (
            (desc_bytes(v.num), DESC_ALIGN), (avail_bytes(v.num), AVAIL_ALIGN), (used_bytes(v.num), USED_ALIGN))
        try:
            a = v.addr
            for name, (nbytes, align) in zip(("desc", "avail", "used"), parts):
                part = int(a[name])
                if part % align:
                    raise MemoryError_(f"{name} address {part:#x} is not {align}-aligned")
                q[name] = self.mem.uaddr_to_hva(part, nbytes)
        except MemoryError_ as e:
            q["broken"] = BROKEN_RING_ADDRESS
            log.warning("%s: vring %d broken: %s", self.name, index, e)
            return
        q["packed"] = int(packed)
        if packed:
            # base: position in bits 0-14, the driver's wrap counter in bit 15; we hold no
            # chains across a stop, so the used position and wrap equal the avail ones
            q["last_avail_idx"] = q["used_idx"] = v.base & 0x7FFF
            q["avail_wrap"] = q["used_wrap"] = (v.base >> 15) & 1
            if q["last_avail_idx"] >= v.num:
                q["broken"] = BROKEN_RING_BASE
                log.warning("%s: vring %d broken: packed base %#x beyond queue size %d", self.name, index, v.base,
                            v.num)
                return
            self._start_common(q, row, v.num)
            return
        used_idx = int(np.frombuffer(_at(q["used"] + 2, 2), np.uint16)[0])
        if used_idx != v.base:
            # we never hold chains across a stop, so the used index is where we are
            log.info("%s: vring %d base %d but used idx %d: resuming at %d", self.name, index, v.base, used_idx,
                     used_idx)
            v.base = used_idx
        q["last_avail_idx"] = v.base
        q["used_idx"] = v.base
        self._start_inflight(index, q, v.num)
        self._start_common(q, row, v.num)

    def _start_inflight(self, index: int, q: np.void, num: int) -> None:
        """Reconcile the queue's inflight region with its ring and let the data plane track it."""
        a = self.inflight
        q["inflight_counter"] = 0
        if a is None or index >= a.num_queues:
            return
        if a.queue_size != num:
            log.warning("%s: vring %d has %d descriptors, its inflight region %d: not tracked", self.name, index,
                        num, a.queue_size)
            return
        ring = np.frombuffer(_at(q["avail"], avail_bytes(num)), np.uint16)  # flags, idx, ring[num]
        n, problem = inflight.recover(a.region(index), num, int(q["used_idx"]), ring[2 : 2 + num], int(ring[1]))
        if problem:
            log.warning("%s: vring %d: %s", self.name, index, problem)
        if n:
            log.info("%s: vring %d: %d chain(s) were in flight: resubmitted in counter order from used idx %d",
                     self.name, index, n, int(q["used_idx"]))
        q["inflight"] = a.addr(index)

    def _apply_log(self, q: np.void, v: Vring) -> None:
        """Logging fields of a queue record: on while LOG_ALL is negotiated and a log is mapped."""
        on = self.log is not None and bool(self.features & F.LOG_ALL)
        if q["log_miss"]:  # the kernels count, the control plane reports (never per packet)
            log.warning("%s: %d writes into guest memory could not be logged (log too small for the memory)",
                        self.name, int(q["log_miss"]))
            q["log_miss"] = 0
        q["log_base"] = self.log.hva if on else 0
        q["log_size"] = self.log.size if on else 0
        ring = on and v.addr is not None and bool(int(v.addr["flags"]) & P.VRING_F_LOG)
        q["log_ring"] = int(ring)
        q["log_used"] = int(v.addr["log"]) if ring else 0
        desc = self.mem.uaddr_to_gpa(int(v.addr["desc"])) if ring else None
        q["log_desc"] = desc or 0  # packed rings write used elements back into the descriptor ring

    def _start_common(self, q: np.void, row: int, num: int) -> None:
        q["size"] = num
        q["signalled_valid"] = 0
        q["call_pending"] = 0
        q["held_since"] = 0  # a hold (devices.net._room) begun on the ring this one replaces is over
        q["event_idx"] = 1 if self.features & F.RING_EVENT_IDX else 0
        q["in_order"] = 1 if self.features & F.IN_ORDER else 0
        q["broken"] = 0
        self.dev.setup_queue(row, self.features)
        set_kicks(self.dev.qstate, row, False)  # we poll: ask the driver not to kick
        q["ready"] = 1

    def _refresh_all(self) -> None:
        for i in range(len(self.vrings)):
            self._apply(i)

    def _stop_ring(self, index: int) -> None:
        v = self.vrings[index]
        self._sync(index)
        v.started = False
        if v.kick >= 0:
            os.close(v.kick)
            v.kick = -1
        self._apply(index)

    def _replace_fd(self, which: str, payload: bytes, fds: list[int]) -> Vring:
        val = int(P.parse(P.U64, payload)["u64"])
        v = self._vring(val & P.VRING_IDX_MASK)
        if val & P.VRING_NOFD:
            fd = -1  # polling mode: any fd that came along is closed by the caller
        else:
            if not fds:
                raise Failed(f"{which} fd missing")
            if _fd_kind(fds[0]) != "anon_inode:[eventfd]":
                raise Failed(f"{which} fd is not an eventfd ({_fd_kind(fds[0])})")
            # The data plane must never block on it: a front-end could fill the counter of a call
            # eventfd, or drain a kick eventfd between our poll() and read().
            os.set_blocking(fds[0], False)
            fd = self._take_fd(fds)
        with self.dev.paused():
            self._sync(val & P.VRING_IDX_MASK)
            old = getattr(v, which)
            setattr(v, which, fd)
            if which == "kick":
                v.started = True
                if not self.features & F.PROTOCOL_FEATURES:
                    v.enabled = True  # without protocol features a ring is enabled when it starts
            self._apply(val & P.VRING_IDX_MASK)
            if old >= 0:
                os.close(old)
        return v

    # ---- handlers: return the reply payload (requests with replies) or None ----
    def _get_features(self, payload, fds):
        return P.u64(self.dev.port_features(self.port))

    def _set_features(self, payload, fds):
        v = int(P.parse(P.U64, payload)["u64"])
        offered = self.dev.port_features(self.port)
        if v & ~offered:
            raise Failed(f"features {v:#x} include bits we did not offer ({v & ~offered:#x})")
        with self.dev.paused():
            for i in range(len(self.vrings)):
                self._sync(i)
            self.features = v
            self.features_set = True
            self._refresh_all()
        log.info("%s: features %s", self.name, feature_names(v, F))

    def _set_owner(self, payload, fds):
        self.owner = True

    def _reset_owner(self, payload, fds):
        self.reset()

    def _reset_device(self, payload, fds):
        self.reset()

    def _get_protocol_features(self, payload, fds):
        return P.u64(self.dev.protocol_features)

    def _set_protocol_features(self, payload, fds):
        v = int(P.parse(P.U64, payload)["u64"])
        if v & ~self.dev.protocol_features:
            raise Failed(f"protocol features {v:#x} include bits we did not offer")
        self.protocol_features = v
        log.info("%s: protocol features %s", self.name, feature_names(v, PF))

    def _get_queue_num(self, payload, fds):
        return P.u64(self.dev.queue_num())

    def _get_max_mem_slots(self, payload, fds):
        return P.u64(MAX_REGIONS)

    def _set_mem_table(self, payload, fds):
        regions = P.parse_mem_table(payload)
        if len(fds) != len(regions):
            raise Failed(f"{len(regions)} regions but {len(fds)} fds")
        with self.dev.paused():
            for i in range(len(self.vrings)):
                self._sync(i)
            self.mem.clear()
            self.mem_dups.clear()
            try:
                while fds:
                    r = regions[len(regions) - len(fds)]
                    self.mem.add(int(r["gpa"]), int(r["size"]), int(r["uaddr"]), int(r["mmap_offset"]),
                                 self._take_fd(fds))
            except MemoryError_:
                self.mem.clear()
                self._refresh_all()
                raise
            self._refresh_all()
        log.info("%s: memory table of %d region(s), %d MiB", self.name, len(regions),
                 sum(int(r["size"]) for r in regions) >> 20)

    def _add_mem_reg(self, payload, fds):
        r = P.parse(P.SINGLE_MEM_REGION, payload)["region"]
        key = (int(r["gpa"]), int(r["size"]), int(r["uaddr"]))
        if any((m.gpa, m.size, m.uaddr, m.mmap_offset) == (*key, int(r["mmap_offset"])) for m in self.mem.regions):
            # QEMU 7.2 (and other versions) sends ADD/REM_MEM_REG once per queue pair (one vhost_dev each) on the same
            # connection: the very same region again is no overlap. Count it; REM_MEM_REGs balance it.
            os.close(self._take_fd(fds))
            self.mem_dups[key] = self.mem_dups.get(key, 0) + 1
            log.debug("%s: memory region gpa=%#x added again (%d extra)", self.name, key[0], self.mem_dups[key])
            return
        with self.dev.paused():
            for i in range(len(self.vrings)):
                self._sync(i)
            self.mem.add(int(r["gpa"]), int(r["size"]), int(r["uaddr"]), int(r["mmap_offset"]), self._take_fd(fds))
            self._refresh_all()
        log.info("%s: memory region added gpa=%#x size=%d MiB (%d region(s))", self.name, int(r["gpa"]),
                 int(r["size"]) >> 20, len(self.mem))

    def _rem_mem_reg(self, payload, fds):
        r = P.parse(P.SINGLE_MEM_REGION, payload)["region"]
        key = (int(r["gpa"]), int(r["size"]), int(r["uaddr"]))
        if self.mem_dups.get(key, 0) > 0:  # one of the extra ADD_MEM_REGs of this region
            self.mem_dups[key] -= 1
            return
        with self.dev.paused():
            for i in range(len(self.vrings)):
                self._sync(i)
            found = self.mem.remove(int(r["gpa"]), int(r["size"]), int(r["uaddr"]))
            self._refresh_all()
        if not found:
            raise Failed(f"no region at gpa={int(r['gpa']):#x}")
        log.info("%s: memory region removed gpa=%#x (%d left)", self.name, int(r["gpa"]), len(self.mem))

    def _set_log_base(self, payload, fds):
        if not self.protocol_features & PF.LOG_SHMFD:
            raise Failed("SET_LOG_BASE without LOG_SHMFD (a log in shared memory) negotiated")
        m = P.parse(P.LOG, payload)
        try:
            new = DirtyLog(self._take_fd(fds), int(m["size"]), int(m["offset"]))
        except LogError as e:
            raise Failed(str(e)) from None
        end = max((r.gpa + r.size for r in self.mem.regions), default=0)
        if not new.covers(end):
            new.close()
            raise Failed(f"log of {int(m['size'])} bytes does not cover guest memory up to {end:#x}")
        with self.dev.paused():
            for i in range(len(self.vrings)):
                self._sync(i)  # _apply restarts each ring where _sync saw it
            old, self.log = self.log, new
            self._refresh_all()
        if old is not None:
            old.close()
        log.info("%s: dirty log of %d bytes (covers %d MiB)", self.name, new.size, new.size * 8 * 4096 >> 20)
        return P.u64(0)  # with LOG_SHMFD the front-end waits for this reply (QEMU ignores its payload)

    def _send_rarp(self, payload, fds):
        if not self.protocol_features & PF.RARP:
            raise Failed("SEND_RARP without the RARP protocol feature")
        mac = bytes(payload[:6])  # the guest's MAC in the first 6 bytes of the u64 (QEMU: memcpy)
        if not self.dev.announce(self.port, mac):
            raise Failed("this device can't announce a MAC")
        log.info("%s: announced %s after migration (RARP)", self.name, mac.hex(":"))

    def _set_vring_num(self, payload, fds):
        s = P.parse(P.VRING_STATE, payload)
        v = self._vring(int(s["index"]))
        n = int(s["num"])
        # split rings must be a power of 2 (§2.7); packed rings any size up to 32768 (§2.8)
        pow2 = n & (n - 1) == 0 or bool(self.features & F.RING_PACKED)
        if not (1 <= n <= MAX_QUEUE_SIZE and pow2):
            raise Failed(f"queue size {n} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        with self.dev.paused():
            self._sync(int(s["index"]))
            v.num = n
            self._apply(int(s["index"]))

    def _set_vring_addr(self, payload, fds):
        a = P.parse(P.VRING_ADDR, payload)
        v = self._vring(int(a["index"]))
        with self.dev.paused():
            self._sync(int(a["index"]))
            v.addr = a
            self._apply(int(a["index"]))

    def _set_vring_base(self, payload, fds):
        s = P.parse(P.VRING_STATE, payload)
        v = self._vring(int(s["index"]))
        with self.dev.paused():
            v.base = int(s["num"]) & 0xFFFF
            self._apply(int(s["index"]))

    def _get_vring_base(self, payload, fds):
        s = P.parse(P.VRING_STATE, payload)
        index = int(s["index"])
        v = self._vring(index)
        with self.dev.paused():
            self._stop_ring(index)
        return P.record(P.VRING_STATE, index=index, num=v.base)

    def _set_vring_kick(self, payload, fds):
        self._replace_fd("kick", payload, fds)

    def _set_vring_call(self, payload, fds):
        self._replace_fd("call", payload, fds)

    def _set_vring_err(self, payload, fds):
        self._replace_fd("err", payload, fds)

    def _set_vring_enable(self, payload, fds):
        s = P.parse(P.VRING_STATE, payload)
        index = int(s["index"])
        v = self._vring(index)
        if int(s["num"]) not in (0, 1):
            raise Failed(f"SET_VRING_ENABLE num={int(s['num'])}")
        with self.dev.paused():
            self._sync(index)
            v.enabled = bool(s["num"])
            self._apply(index)

    def _set_status(self, payload, fds):
        self.status = int(P.parse(P.U64, payload)["u64"]) & 0xFF

    def _get_status(self, payload, fds):
        return P.u64(self.status)

    def _get_inflight_fd(self, payload, fds):
        d = P.parse(P.INFLIGHT, payload)
        nq, size = int(d["num_queues"]), int(d["queue_size"])
        try:
            self._check_inflight()
            area, fd = inflight.create(nq, size, len(self.vrings))
        except (Failed, inflight.InflightError, OSError) as e:
            # mmap_size 0 and no fd: "no inflight area" (QEMU then goes on without one)
            log.warning("%s: GET_INFLIGHT_FD num_queues=%d queue_size=%d refused: %s", self.name, nq, size, e)
            return P.record(P.INFLIGHT, num_queues=nq, queue_size=size)
        self._replace_inflight(area)
        log.info("%s: inflight area of %d bytes for %d queue(s) of %d", self.name, area.size, nq, size)
        return P.record(P.INFLIGHT, mmap_size=area.size, mmap_offset=0, num_queues=nq, queue_size=size), [fd]

    def _set_inflight_fd(self, payload, fds):
        d = P.parse(P.INFLIGHT, payload)
        self._check_inflight()
        try:  # the fd stays in ``fds``: closed after this message, the mapping keeps the memory
            area = inflight.attach(fds[0], int(d["mmap_size"]), int(d["mmap_offset"]), int(d["num_queues"]),
                                   int(d["queue_size"]), len(self.vrings))
        except inflight.InflightError as e:
            raise Failed(str(e)) from None
        self._replace_inflight(area)
        log.info("%s: inflight area set: %d queue(s) of %d", self.name, area.num_queues, area.queue_size)

    def _check_inflight(self) -> None:
        if not self.protocol_features & PF.INFLIGHT_SHMFD:
            raise Failed("INFLIGHT_SHMFD was not negotiated")
        if self.features & F.RING_PACKED:
            raise Failed("in-flight tracking is implemented for split rings only (RING_PACKED negotiated)")

    def _replace_inflight(self, area: inflight.Area | None) -> None:
        with self.dev.paused():
            for i in range(len(self.vrings)):
                self._sync(i)
            old, self.inflight = self.inflight, area
            self._refresh_all()  # no qstate row points into the old area any more
        if old is not None:
            old.close()

    def _net_set_mtu(self, payload, fds):
        if not self.protocol_features & PF.NET_MTU:
            raise Failed("NET_SET_MTU without the NET_MTU protocol feature")
        mtu = int(P.parse(P.U64, payload)["u64"])
        if not P.MIN_MTU <= mtu <= P.MAX_MTU:
            raise Failed(f"MTU {mtu} out of range ({P.MIN_MTU}..{P.MAX_MTU})")
        if not self.dev.set_mtu(self.port, mtu):
            raise Failed(f"a {self.dev.kind} device has no MTU")
        log.info("%s: MTU %d", self.name, mtu)

    def _get_config(self, payload, fds):
        h = np.frombuffer(payload, P.CONFIG_HEAD, 1)[0]
        data = self.dev.get_config(self.port, int(h["offset"]), int(h["size"]))
        if data is None or len(data) != int(h["size"]):
            log.warning("%s: GET_CONFIG offset=%d size=%d not available", self.name, h["offset"], h["size"])
            data = bytes(int(h["size"]))
        return payload[: P.CONFIG_HEAD.itemsize] + data

    # ---- lifetime ----
    def reset(self) -> None:
        """Stop every ring and forget the negotiation (RESET_OWNER / RESET_DEVICE)."""
        with self.dev.paused():
            dirty_log, self.log = self.log, None
            for i, v in enumerate(self.vrings):
                for fd in (v.kick, v.call, v.err):
                    if fd >= 0:
                        os.close(fd)
                self.vrings[i] = Vring()
                self._apply(i)
            if dirty_log is not None:  # every queue record let go of it above
                dirty_log.close()
        self._replace_inflight(None)  # a reset device starts with a new area (spec: GET_INFLIGHT_FD)
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.status = 0

    def close(self) -> None:
        """Disconnect: stop the rings, close every fd, unmap all memory."""
        if self.closed:
            return
        self.closed = True
        with self.dev.paused():
            self.reset()
            self.mem.clear()
        self._drop_fds()  # of a message that never completed
        self.sock.close()


def _fd_kind(fd: int) -> str:
    """What an fd refers to, as /proc shows it ("anon_inode:[eventfd]", "/memfd:x (deleted)", ...)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"unknown: {e.strerror}"


def _at(addr: int, n: int) -> bytearray:
    """A copy of n bytes at a validated host address (control plane only)."""
    import ctypes

    return bytearray(ctypes.string_at(int(addr), n))
