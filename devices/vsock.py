"""virtio-vsock over vhost-user, whose host side is unix sockets (the hybrid-vsock convention).

One port (vhost-user socket) per guest ("VM"), three vrings per port: 0 rx (device writes
packets for the driver), 1 tx (packets from the driver), 2 event (TRANSPORT_RESET).

Host side, as rust-vmm's vhost-device-vsock and Firecracker do it:

* host -> guest: a host program connects to the VM's ``uds_path`` and writes ``CONNECT <port>\\n``;
  vring sends the guest a REQUEST for that port from a fresh host port and, once the guest
  answered RESPONSE, writes ``OK <host_port>\\n`` back; then the unix connection carries the
  stream. A refusal (RST) or no answer within CONNECT_TIMEOUT_S closes the unix connection.
* guest -> host: a guest connecting to CID 2 port P makes vring connect to ``<uds_path>_<P>``;
  nobody listening there gets the guest a RST (connection refused).
* sibling guests: guests served by the same process that share a group reach each other by
  CID; packets between them are relayed (the two guests' stacks do the credit accounting).

The data plane is one Python thread per device (a selector over the kick eventfds, the
listeners, the host sockets and the Worker's wake-up eventfd); the ring work is done by the
numba split kernels (``vsock_proto.peek_chain`` / ``commit_chain``). Payload moves between
guest buffers and host sockets without intermediate ``bytes``: ``recvmsg_into`` and ``sendmsg``
on memoryview slices of the mapped guest regions. Only data a host socket cannot take at once
is copied, into a per-connection buffer bounded by the credit we gave the guest
(``tx_buffer_size``).

Threat model: every header field is untrusted. Packets whose src_cid is not the guest's are
dropped; a len larger than the chain, a type or op we don't know, a packet for no connection,
data beyond the credit we granted get a RST (never a reply to a RST); a chain the split kernels
reject marks that queue broken. Replies wait in a bounded queue: a guest that floods us without
posting receive buffers loses replies, not memory.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import logging
import os
import re
import selectors
import signal
import socket
import time

import numpy as np

from devices.vsock_proto import (
    BROKEN_EVENT_CHAIN_SHORT,
    BROKEN_RX_CHAIN_SHORT,
    EVENT,
    EVENT_TRANSPORT_RESET,
    F_SEQPACKET,
    HDR,
    HDR_LEN,
    HOST_CID,
    I_HEAD,
    I_NSEG,
    I_TOTAL,
    MAX_PKT_PAYLOAD,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RESERVED_CIDS,
    SEQ_EOM,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_SEQPACKET,
    TYPE_STREAM,
    commit_chain,
    mark_broken,
    notify,
    peek_chain,
    warm_up_kernels,
)
from vring.dataplane import CMD, RUN, Worker
from vring.device import Device
from vring.layout import C_BYTES, C_DROPS, C_ERRORS, C_PACKETS
from vring.protocol import PF, F
from vring.split import MAX_SEGS, set_kicks

log = logging.getLogger(__name__)

RX, TX, EV = 0, 1, 2
DEFAULT_TX_BUFFER = 64 * 1024
DEFAULT_QUEUE_SIZE = 1024
CONNECT_TIMEOUT_S = 5.0  # guest's answer to a host CONNECT (and the CONNECT line itself)
CONNECT_LINE_MAX = 64
MAX_CONNS = 4096  # per guest
CTL_MAX = 4096  # queued control packets per guest (replies beyond are dropped and counted)
SIBLING_MAX_BYTES = 4 << 20  # relayed bytes waiting for the sibling's receive buffers
BUDGET = 256  # chains per queue per round
FIRST_HOST_PORT = 1024

HANDSHAKE, CONNECTING, ESTABLISHED = "handshake", "connecting", "established"
_CONNECT_RE = re.compile(rb"CONNECT ([0-9]{1,10})\r?")

VSOCK_FEATURES = F.VERSION_1 | F.PROTOCOL_FEATURES | F.RING_INDIRECT_DESC
VSOCK_PROTOCOL_FEATURES = PF.CONFIG | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.MQ


class VmConfig:
    """One guest: the keys of vhost-device-vsock's --vm / YAML ``vms`` entries."""

    def __init__(self, guest_cid: int, socket: str, uds_path: str, tx_buffer_size: int = DEFAULT_TX_BUFFER,
                 queue_size: int = DEFAULT_QUEUE_SIZE, groups: str = "default"):
        self.guest_cid = int(guest_cid)
        self.socket = str(socket)
        self.uds_path = str(uds_path)
        self.tx_buffer_size = int(tx_buffer_size)
        self.queue_size = int(queue_size)
        self.groups = frozenset(g for g in str(groups).split("+") if g)
        if self.guest_cid in RESERVED_CIDS or not 3 <= self.guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest-cid {self.guest_cid} is reserved or out of range (3..2^32-2)")
        if not 4096 <= self.tx_buffer_size <= 1 << 30:
            raise ValueError(f"tx-buffer-size {self.tx_buffer_size} out of range (4096..1 GiB)")
        if not (1 <= self.queue_size <= 32768 and self.queue_size & (self.queue_size - 1) == 0):
            raise ValueError(f"queue-size {self.queue_size} must be a power of 2 in 1..32768")
        if len(self.uds_path) + 11 > 107:
            raise ValueError(f"uds-path {self.uds_path!r} too long for AF_UNIX (with _<port>)")

    def __repr__(self) -> str:
        return (f"VmConfig(guest_cid={self.guest_cid}, socket={self.socket!r}, uds_path={self.uds_path!r}, "
                f"tx_buffer_size={self.tx_buffer_size}, groups={'+'.join(sorted(self.groups))})")


class Conn:
    """One stream between a host unix socket and a guest vsock socket."""

    __slots__ = (
        "buf_alloc",
        "closed",
        "credit_asked",
        "deadline",
        "events",
        "fwd_cnt",
        "fwd_sent",
        "guest_shut_rcv",
        "guest_shut_send",
        "host_eof",
        "local",
        "peer",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "pending",
        "queued",
        "record",
        "rx_cnt",
        "sock",
        "state",
        "type",
        "update_queued",
        "vm",
    )

    def __init__(self, vm: Vm, sock: socket.socket, state: str):
        self.vm = vm
        self.sock = sock
        self.state = state
        self.local = 0  # host-side port (our src_port)
        self.peer = 0  # guest-side port
        self.type = TYPE_STREAM
        self.buf_alloc = vm.cfg.tx_buffer_size  # credit we give the guest
        self.fwd_cnt = 0  # guest bytes written to the host socket (u32 wraps on the wire)
        self.fwd_sent = 0  # fwd_cnt the guest last heard from us
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.rx_cnt = 0  # bytes we sent to the guest
        self.pending = bytearray()  # guest bytes the host socket did not take yet
        self.host_eof = False
        self.guest_shut_send = False
        self.guest_shut_rcv = False
        self.queued = False  # in vm.rx_ready
        self.events = 0
        self.deadline = 0.0
        self.closed = False
        self.credit_asked = False
        self.update_queued = False
        self.record = b""  # SEQPACKET: the rest of a host record not yet sent to the guest

    def credit(self) -> int:
        """Bytes we may still send the guest (its buf_alloc minus what it hasn't consumed)."""
        return max(0, self.peer_buf_alloc - ((self.rx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))


class Vm:
    """Per-guest state: config, listener, connections, replies waiting for receive buffers."""

    def __init__(self, index: int, cfg: VmConfig, dev: VsockDevice):
        self.index = index
        self.cfg = cfg
        self.cid = cfg.guest_cid
        self.dev = dev
        self.rx, self.tx, self.ev = (dev.row(index, k) for k in (RX, TX, EV))
        self.listener: socket.socket | None = None
        self.conns: dict[tuple[int, int], Conn] = {}
        self.handshakes: set[Conn] = set()
        self.ctl: collections.deque = collections.deque()
        self.rx_ready: collections.deque = collections.deque()
        self.sib: collections.deque = collections.deque()  # relayed packets (bytes) from siblings
        self.sib_bytes = 0
        self.siblings: dict[int, Vm] = {}
        self.next_port = FIRST_HOST_PORT
        self.running = False  # rx and tx rings were ready at the last look
        self.reset_event = False  # a TRANSPORT_RESET waits for an event buffer
        self.seqpacket = False
        self.views: list[tuple[int, int, memoryview]] = []
        self.stats = collections.Counter()

    def alloc_port(self) -> int:
        used = {k[0] for k in self.conns}
        for _ in range(1 << 16):
            p = self.next_port
            self.next_port = p + 1 if p < 0xFFFFFFFE else FIRST_HOST_PORT
            if p not in used:
                return p
        raise OSError(errno.EADDRINUSE, "no free host port")


class VsockDevice(Device):
    """vring vsock: one port per guest (VmConfig), rx/tx/event vrings, host side on unix sockets."""

    kind = "vsock"

    def __init__(self, vms: list[VmConfig], cpus: list[int] | None = None):
        if not vms:
            raise ValueError("at least one guest")
        for attr in ("guest_cid", "socket", "uds_path"):
            vals = [getattr(v, attr) for v in vms]
            if len(set(vals)) != len(vals):
                raise ValueError(f"two guests share {attr.replace('_', '-')}")
        super().__init__(len(vms), 3)
        self.features = int(VSOCK_FEATURES | F_SEQPACKET)
        self.protocol_features = int(VSOCK_PROTOCOL_FEATURES)
        self.vms = [Vm(i, c, self) for i, c in enumerate(vms)]
        for a in self.vms:
            for b in self.vms:
                if a is not b and a.cfg.groups & b.cfg.groups:
                    a.siblings[b.cid] = b
        self.sel = selectors.DefaultSelector()
        self.one = np.ones(1, np.uint64)
        self.seg_hva = np.zeros(MAX_SEGS, np.uint64)
        self.seg_len = np.zeros(MAX_SEGS, np.uint64)
        self.info = np.zeros(3, np.int64)
        self.record_buf = bytearray(MAX_PKT_PAYLOAD)
        self.dirty: set[int] = set()
        self._kick_keys: list = []
        self.worker = Worker("vsock", vsock_loop, self._args, cpus=cpus)

    def _args(self) -> tuple:
        return (self,)

    # ---- device hooks ----
    def queue_num(self) -> int:
        return 3

    def setup_queue(self, row: int, features: int) -> None:
        vm = self.vms[row // self.nvq]
        vm.seqpacket = bool(features & F_SEQPACKET)
        if int(self.qstate[row]["size"]) > vm.cfg.queue_size:
            log.warning("vm cid=%d: vring %d of size %d exceeds --queue-size %d", vm.cid, row % self.nvq,
                        int(self.qstate[row]["size"]), vm.cfg.queue_size)

    def get_config(self, port: int, offset: int, size: int) -> bytes | None:
        cfg = self.vms[port].cid.to_bytes(8, "little")  # struct virtio_vsock_config { le64 guest_cid; }
        if offset < 0 or size < 0 or offset + size > 256:
            return None
        return (cfg + bytes(256))[offset : offset + size]

    # ---- lifetime ----
    def open(self) -> None:
        """Bind every guest's uds_path listener (before the vhost-user sockets are served)."""
        from vring.server import _remove_stale

        for vm in self.vms:
            _remove_stale(vm.cfg.uds_path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.bind(vm.cfg.uds_path)
            s.listen(128)
            s.setblocking(False)
            vm.listener = s
            self.sel.register(s, selectors.EVENT_READ, ("listen", vm))
            log.info("vm cid=%d: host side on %s (and %s_<port>)", vm.cid, vm.cfg.uds_path, vm.cfg.uds_path)

    def compile(self) -> None:
        warm_up_kernels()
        super().compile()

    def stop(self) -> None:
        super().stop()  # the data plane thread has returned: the sockets are ours now
        for vm in self.vms:
            self._drop_all(vm, rst=False)
            if vm.listener is not None:
                self.sel.unregister(vm.listener)
                vm.listener.close()
                vm.listener = None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(vm.cfg.uds_path)
        self.sel.close()

    def port_counters(self, port: int) -> dict[str, int]:
        vm = self.vms[port]
        c = self.counters
        return {
            "rx_packets": int(c[vm.rx, C_PACKETS]), "rx_bytes": int(c[vm.rx, C_BYTES]),
            "rx_dropped": int(c[vm.rx, C_DROPS]),
            "tx_packets": int(c[vm.tx, C_PACKETS]), "tx_bytes": int(c[vm.tx, C_BYTES]),
            "errors": int(c[vm.rx, C_ERRORS] + c[vm.tx, C_ERRORS] + c[vm.ev, C_ERRORS]),
            "connections": len(vm.conns), "handshakes": len(vm.handshakes),
            "buffered": sum(len(k.pending) for k in list(vm.conns.values())) + vm.sib_bytes,
            "replies_queued": len(vm.ctl),
        }

    # ---- the data plane (runs in the worker thread only) ----
    def _enter(self) -> None:
        qs = self.qstate
        for vm in self.vms:
            running = bool(qs[vm.rx]["ready"] and qs[vm.tx]["ready"])
            if vm.running and not running:
                log.info("vm cid=%d: rings stopped; dropping %d connection(s)", vm.cid, len(vm.conns))
                self._drop_all(vm, rst=False)
                vm.reset_event = True
            elif running and not vm.running and (int(qs[vm.tx]["last_avail_idx"]) or int(qs[vm.rx]["last_avail_idx"])):
                # rings resumed mid-stream: the driver had connections with another back-end incarnation
                vm.reset_event = True
            vm.running = running
            vm.views = [(r.hva, r.size, memoryview(r.array)) for r in self.memory[vm.index].regions]
            for k in (RX, TX, EV):
                row = self.row(vm.index, k)
                q = qs[row]
                if q["ready"] and not q["broken"]:
                    # we sleep in select(): the driver must kick us (used flags NO_NOTIFY off)
                    set_kicks(qs, row, True)
                fd = int(q["kick_fd"])
                if fd >= 0 and q["ready"]:
                    # the same fd for two rings: one registration serves both
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._kick_keys.append(self.sel.register(fd, selectors.EVENT_READ, ("kick", vm)))
            for conn in list(vm.conns.values()):
                self._interest(conn)

    def _leave(self) -> None:
        for key in self._kick_keys:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(key.fileobj)
        self._kick_keys = []
        for vm in self.vms:
            vm.views = []  # no view of guest memory may outlive the loop (memory may be replaced)

    def _mv(self, vm: Vm, hva: int, ln: int) -> memoryview:
        for base, size, mv in vm.views:
            off = hva - base
            if 0 <= off < size:
                return mv[off : off + ln]
        raise RuntimeError("translated address outside the mapped regions")  # split.translate guarantees it

    def _chain_views(self, vm: Vm, skip: int, limit: int) -> list[memoryview]:
        """The peeked chain's buffers after ``skip`` bytes, at most ``limit`` bytes, as views."""
        n = int(self.info[I_NSEG])
        out = []
        hvas = self.seg_hva[:n].tolist()
        lens = self.seg_len[:n].tolist()
        for hva, ln in zip(hvas, lens, strict=False):
            if limit <= 0:
                break
            if skip >= ln:
                skip -= ln
                continue
            k = min(ln - skip, limit)
            out.append(self._mv(vm, hva + skip, k))
            limit -= k
            skip = 0
        return out

    def _write_chain(self, vm: Vm, data: bytes) -> None:
        """Write bytes at the start of the peeked chain (it is known to be long enough)."""
        off = 0
        for v in self._chain_views(vm, 0, len(data)):
            v[:] = data[off : off + len(v)]
            off += len(v)

    # -- guest -> us --
    def _tx(self, vm: Vm) -> bool:
        """Handle up to BUDGET packets from the guest's tx vring. True if more may be waiting."""
        qs, dev_counters, info = self.qstate, self.counters, self.info
        for _ in range(BUDGET):
            if vm.sib_bytes > SIBLING_MAX_BYTES or any(s.sib_bytes > SIBLING_MAX_BYTES for s in vm.siblings.values()):
                return False  # back-pressure: a sibling is not taking what we relay
            r = peek_chain(qs, dev_counters, self.regions, vm.tx, 0, self.seg_hva, self.seg_len, info)
            if r <= 0:
                if r < 0:
                    self._report_broken(vm, vm.tx)
                return False
            total = int(info[I_TOTAL])
            try:
                self._packet(vm, total)
            finally:
                commit_chain(qs, vm.tx, int(info[I_HEAD]), 0)
                self.dirty.add(vm.tx)
        return True

    def _packet(self, vm: Vm, total: int) -> None:
        c = self.counters
        if total < HDR_LEN:
            c[vm.tx, C_ERRORS] += 1
            vm.stats["short_packets"] += 1
            return
        hb = self._chain_views(vm, 0, HDR_LEN)
        raw = hb[0] if len(hb) == 1 else b"".join(bytes(v) for v in hb)
        src_cid, dst_cid, src_port, dst_port, ln, typ, op, flags, buf_alloc, fwd_cnt = HDR.unpack_from(raw)
        del hb, raw
        c[vm.tx, C_PACKETS] += 1
        if src_cid != vm.cid:
            c[vm.tx, C_ERRORS] += 1
            vm.stats["bad_src_cid"] += 1
            return  # spoofed source: dropped, no reply (it would go to someone else)
        bad = None
        if ln > total - HDR_LEN or ln > MAX_PKT_PAYLOAD:
            bad = "len"
        elif typ not in (TYPE_STREAM, TYPE_SEQPACKET) or (typ == TYPE_SEQPACKET and not vm.seqpacket):
            bad = "type"
        elif op == OP_RW and ln == 0:
            bad = None
        elif op != OP_RW and ln != 0:
            bad = "len"
        if bad is None and dst_cid != HOST_CID:
            sib = vm.siblings.get(dst_cid)
            if sib is None:
                bad = "dst_cid"
            else:
                self._relay(vm, sib, total, ln)
                return
        key = (dst_port, src_port)
        conn = vm.conns.get(key)
        if bad is not None:
            if bad != "dst_cid":  # a CID outside our groups is a refusal, not a driver error
                c[vm.tx, C_ERRORS] += 1
            vm.stats[f"bad_{bad}"] += 1
            if conn is not None:
                self._close(conn, rst=True)
            elif op != OP_RST:
                self._rst_reply(vm, dst_cid, dst_port, src_port, typ)
            return
        if op == OP_REQUEST:
            if conn is not None:
                self._close(conn, rst=True)
                vm.stats["duplicate_request"] += 1
                return
            self._guest_connect(vm, src_port, dst_port, typ, buf_alloc, fwd_cnt)
            return
        if conn is None or conn.state == HANDSHAKE:
            if op != OP_RST:
                vm.stats["no_connection"] += 1
                log.debug("vm cid=%d: op %d for no connection %d->%d", vm.cid, op, src_port, dst_port)
                self._rst_reply(vm, dst_cid, dst_port, src_port, typ)
            return
        if typ != conn.type:
            self._close(conn, rst=True)
            return
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        if op == OP_RW:
            if conn.state != ESTABLISHED or conn.guest_shut_send:
                self._close(conn, rst=True)
                return
            self._guest_data(conn, ln, flags)
        elif op == OP_RESPONSE:
            if conn.state != CONNECTING:
                self._close(conn, rst=True)
                return
            self._established(conn)
        elif op == OP_RST:
            vm.stats["rst_from_guest"] += 1
            self._close(conn, rst=False)
            return
        elif op == OP_SHUTDOWN:
            if flags & SHUTDOWN_RCV:
                conn.guest_shut_rcv = True
            if flags & SHUTDOWN_SEND:
                conn.guest_shut_send = True
            if conn.state != ESTABLISHED:
                self._close(conn, rst=True)
                return
            self._flush(conn)
        elif op == OP_CREDIT_UPDATE:
            conn.credit_asked = False
        elif op == OP_CREDIT_REQUEST:
            self._ctl(conn, OP_CREDIT_UPDATE)
        else:
            c[vm.tx, C_ERRORS] += 1
            vm.stats["bad_op"] += 1
            self._close(conn, rst=True)
            return
        if not conn.closed:
            self._maybe_finish(conn)
            if not conn.closed:
                self._interest(conn)

    def _guest_connect(self, vm: Vm, src_port: int, dst_port: int, typ: int, buf_alloc: int, fwd_cnt: int) -> None:
        """The guest connects to the host's port ``dst_port``: connect to <uds_path>_<dst_port>."""
        if len(vm.conns) >= MAX_CONNS:
            vm.stats["too_many_connections"] += 1
            self._rst_reply(vm, HOST_CID, dst_port, src_port, typ)
            return
        kind = socket.SOCK_SEQPACKET if typ == TYPE_SEQPACKET else socket.SOCK_STREAM
        s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        path = f"{vm.cfg.uds_path}_{dst_port}"
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            vm.stats["refused"] += 1
            log.debug("vm cid=%d: guest port %d -> %s: %s (reset)", vm.cid, src_port, path, e.strerror)
            self._rst_reply(vm, HOST_CID, dst_port, src_port, typ)
            return
        conn = Conn(vm, s, ESTABLISHED)
        conn.local, conn.peer, conn.type = dst_port, src_port, typ
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        vm.conns[(dst_port, src_port)] = conn
        vm.stats["guest_connects"] += 1
        self._ctl(conn, OP_RESPONSE)
        self._interest(conn)

    def _established(self, conn: Conn) -> None:
        """The guest accepted a host CONNECT: tell the host program."""
        conn.state = ESTABLISHED
        conn.vm.handshakes.discard(conn)
        line = b"OK %d\n" % conn.local
        try:
            n = conn.sock.send(line)
        except OSError:
            n = -1
        if n != len(line):  # a fresh connection's buffer always takes a line; if not, give up
            self._close(conn, rst=True)
            return
        conn.vm.stats["host_connects"] += 1

    def _guest_data(self, conn: Conn, ln: int, flags: int) -> None:
        """Forward ``ln`` payload bytes of the peeked chain to the host socket (zero-copy when it takes them)."""
        vm = conn.vm
        if len(conn.pending) + ln > conn.buf_alloc:
            vm.stats["credit_violation"] += 1
            self.counters[vm.tx, C_ERRORS] += 1
            self._close(conn, rst=True)
            return
        self.counters[vm.tx, C_BYTES] += ln
        if ln == 0:
            return
        views = self._chain_views(vm, HDR_LEN, ln)
        if conn.type == TYPE_SEQPACKET:
            # one guest packet = one record piece; without EOM pieces are joined (rare: Linux sends
            # whole messages up to 64 KiB); the unix SOCK_SEQPACKET keeps the boundaries
            conn.pending += b"".join(views)
            if flags & SEQ_EOM:
                self._flush_seq(conn)
            return
        sent = 0
        if not conn.pending:
            try:
                sent = conn.sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn, rst=True)
                return
            conn.fwd_cnt += sent
        if sent < ln:
            skip = sent
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                conn.pending += v[skip:]
                skip = 0
        self._credit_update_if_due(conn)

    def _flush_seq(self, conn: Conn) -> None:
        msg = bytes(conn.pending)
        conn.pending.clear()
        try:
            conn.sock.send(msg)
        except (BlockingIOError, InterruptedError):
            conn.vm.stats["seqpacket_dropped"] += 1  # the host isn't reading: the record is lost
        except OSError:
            self._close(conn, rst=True)
            return
        conn.fwd_cnt += len(msg)
        self._credit_update_if_due(conn)

    def _flush(self, conn: Conn) -> None:
        """Write buffered guest bytes to the host socket; then half-close it if the guest is done sending."""
        if conn.pending and conn.type == TYPE_STREAM:
            try:
                n = conn.sock.send(conn.pending)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._close(conn, rst=True)
                return
            if n:
                del conn.pending[:n]
                conn.fwd_cnt += n
                self._credit_update_if_due(conn)
        if not conn.pending and conn.guest_shut_send and not conn.host_eof:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)

    def _credit_update_if_due(self, conn: Conn) -> None:
        if conn.fwd_cnt - conn.fwd_sent >= conn.buf_alloc // 2 and not conn.update_queued:
            conn.update_queued = True
            self._ctl(conn, OP_CREDIT_UPDATE)

    def _maybe_finish(self, conn: Conn) -> None:
        """Close a connection both sides are done with (the guest gets the RST it waits for)."""
        if conn.pending:
            return
        if (conn.guest_shut_send and conn.guest_shut_rcv) or (conn.guest_shut_send and conn.host_eof):
            self._close(conn, rst=True)

    def _relay(self, vm: Vm, sib: Vm, total: int, ln: int) -> None:
        """A packet for a sibling guest: queue a copy for its receive vring."""
        if not sib.running:
            typ_op = HDR.unpack_from(b"".join(bytes(v) for v in self._chain_views(vm, 0, HDR_LEN)))
            if typ_op[6] != OP_RST:
                self._rst_reply(vm, typ_op[1], typ_op[3], typ_op[2], typ_op[5])
            return
        pkt = b"".join(bytes(v) for v in self._chain_views(vm, 0, HDR_LEN + ln))
        sib.sib.append(pkt)
        sib.sib_bytes += len(pkt)
        self.counters[vm.tx, C_BYTES] += ln
        vm.stats["relayed"] += 1

    # -- us -> guest --
    def _ctl(self, conn: Conn, op: int, flags: int = 0) -> None:
        vm = conn.vm
        if len(vm.ctl) >= CTL_MAX:
            self.counters[vm.rx, C_DROPS] += 1
            return
        vm.ctl.append((HOST_CID, conn.local, conn.peer, conn.type, op, flags, conn))

    def _rst_reply(self, vm: Vm, src_cid: int, src_port: int, dst_port: int, typ: int) -> None:
        if len(vm.ctl) >= CTL_MAX:
            self.counters[vm.rx, C_DROPS] += 1
            return
        if typ not in (TYPE_STREAM, TYPE_SEQPACKET):
            typ = TYPE_STREAM
        vm.ctl.append((src_cid, src_port, dst_port, typ, OP_RST, 0, None))

    def _peek_rx(self, vm: Vm) -> bool:
        r = peek_chain(self.qstate, self.counters, self.regions, vm.rx, 1, self.seg_hva, self.seg_len, self.info)
        if r < 0:
            self._report_broken(vm, vm.rx)
        if r <= 0:
            return False
        if int(self.info[I_TOTAL]) < HDR_LEN:
            mark_broken(self.qstate, self.counters, vm.rx, BROKEN_RX_CHAIN_SHORT)
            self._report_broken(vm, vm.rx)
            return False
        return True

    def _put(self, vm: Vm, length: int) -> None:
        commit_chain(self.qstate, vm.rx, int(self.info[I_HEAD]), length)
        self.dirty.add(vm.rx)
        self.counters[vm.rx, C_PACKETS] += 1

    def _hdr_for(self, vm: Vm, conn: Conn | None, src_cid: int, src_port: int, dst_port: int, typ: int, op: int,
                 flags: int, ln: int) -> bytes:
        if conn is not None:
            conn.fwd_sent = conn.fwd_cnt
            conn.update_queued = False
            return HDR.pack(src_cid, vm.cid, src_port, dst_port, ln, typ, op, flags, conn.buf_alloc,
                            conn.fwd_cnt & 0xFFFFFFFF)
        return HDR.pack(src_cid, vm.cid, src_port, dst_port, ln, typ, op, flags, 0, 0)

    def _rx(self, vm: Vm) -> bool:
        """Fill the guest's receive buffers: replies first, then relayed packets, then host data."""
        for _ in range(BUDGET):
            if not (vm.ctl or vm.sib or vm.rx_ready):
                return False
            if not self._peek_rx(vm):
                return False
            if vm.ctl:
                src_cid, sp, dp, typ, op, flags, conn = vm.ctl.popleft()
                if op == OP_CREDIT_UPDATE and conn is not None and conn.closed:
                    continue
                self._write_chain(vm, self._hdr_for(vm, conn, src_cid, sp, dp, typ, op, flags, 0))
                self._put(vm, HDR_LEN)
                continue
            if vm.sib:
                self._rx_relayed(vm)
                continue
            conn = vm.rx_ready.popleft()
            conn.queued = False
            if not conn.closed:
                self._rx_host_data(vm, conn)
        return True

    def _rx_relayed(self, vm: Vm) -> None:
        pkt = vm.sib[0]
        cap = int(self.info[I_TOTAL])
        if len(pkt) <= cap:
            vm.sib.popleft()
            vm.sib_bytes -= len(pkt)
            self._write_chain(vm, pkt)
            self._put(vm, len(pkt))
            self.counters[vm.rx, C_BYTES] += len(pkt) - HDR_LEN
            return
        # split a relayed RW over several receive buffers (as vhost-vsock does)
        f = list(HDR.unpack_from(pkt))
        k = cap - HDR_LEN
        part = pkt[HDR_LEN : HDR_LEN + k]
        f[4] = k
        flags = f[7]
        if f[5] == TYPE_SEQPACKET:
            f[7] = flags & ~(SEQ_EOM | 2)
        self._write_chain(vm, HDR.pack(*f) + part)
        self._put(vm, cap)
        self.counters[vm.rx, C_BYTES] += k
        f[4] = len(pkt) - HDR_LEN - k
        f[7] = flags
        rest = HDR.pack(*f) + pkt[HDR_LEN + k :]
        vm.sib[0] = rest
        vm.sib_bytes -= len(pkt) - len(rest)

    def _rx_host_data(self, vm: Vm, conn: Conn) -> None:
        """Read from a readable host socket straight into the peeked receive buffer."""
        credit = conn.credit()
        if conn.guest_shut_rcv or conn.host_eof:
            self._interest(conn)
            return
        if credit <= 0:
            if not conn.credit_asked:
                conn.credit_asked = True
                self._ctl(conn, OP_CREDIT_REQUEST)
            self._interest(conn)
            return
        cap = min(int(self.info[I_TOTAL]) - HDR_LEN, credit, MAX_PKT_PAYLOAD)
        views = self._chain_views(vm, HDR_LEN, cap) if cap > 0 else []
        if not views:
            self._requeue(conn)
            return
        flags = 0
        if conn.type == TYPE_SEQPACKET:
            del views
            self._rx_host_record(vm, conn, cap)
            return
        try:
            n = conn.sock.recvmsg_into(views)[0] if len(views) > 1 else conn.sock.recv_into(views[0])
        except (BlockingIOError, InterruptedError):
            del views
            self._interest(conn)  # drained: wait for the selector again
            return
        except OSError:
            del views
            self._write_chain(vm, self._hdr_for(vm, conn, HOST_CID, conn.local, conn.peer, conn.type, OP_RST, 0, 0))
            self._put(vm, HDR_LEN)
            self._close(conn, rst=False)
            return
        del views
        if n == 0:
            conn.host_eof = True
            self._write_chain(vm, self._hdr_for(vm, conn, HOST_CID, conn.local, conn.peer, conn.type, OP_SHUTDOWN,
                                                SHUTDOWN_SEND, 0))
            self._put(vm, HDR_LEN)
            self._maybe_finish(conn)
            if not conn.closed:
                self._interest(conn)
            return
        self._write_chain(vm, self._hdr_for(vm, conn, HOST_CID, conn.local, conn.peer, conn.type, OP_RW, flags, n))
        self._put(vm, HDR_LEN + n)
        self.counters[vm.rx, C_BYTES] += n
        conn.rx_cnt += n
        if n < cap:
            # the socket held less than we could take: it is drained, so wait for the selector
            # rather than requeue for a recv that fails with EAGAIN (a syscall and an exception)
            self._interest(conn)
        else:
            self._requeue(conn)

    def _rx_host_record(self, vm: Vm, conn: Conn, cap: int) -> None:
        """SEQPACKET toward the guest: a record may exceed one receive buffer, so it is read whole
        (a copy) and sent in pieces, EOM on the last."""
        if not conn.record:
            try:
                n, _, mflags, _ = conn.sock.recvmsg_into([self.record_buf])
            except (BlockingIOError, InterruptedError):
                self._interest(conn)
                return
            except OSError:
                n, mflags = -1, 0
            if n <= 0:
                op, fl = (OP_SHUTDOWN, SHUTDOWN_SEND) if n == 0 else (OP_RST, 0)
                self._write_chain(vm, self._hdr_for(vm, conn, HOST_CID, conn.local, conn.peer, conn.type, op, fl, 0))
                self._put(vm, HDR_LEN)
                if n == 0:
                    conn.host_eof = True
                    self._maybe_finish(conn)
                    self._interest(conn)
                else:
                    self._close(conn, rst=False)
                return
            if mflags & socket.MSG_TRUNC:
                vm.stats["seqpacket_truncated"] += 1
            conn.record = bytes(self.record_buf[:n])
        k = min(cap, len(conn.record))
        piece, conn.record = conn.record[:k], conn.record[k:]
        flags = 0 if conn.record else SEQ_EOM
        self._write_chain(vm, self._hdr_for(vm, conn, HOST_CID, conn.local, conn.peer, conn.type, OP_RW, flags, k)
                          + piece)
        self._put(vm, HDR_LEN + k)
        self.counters[vm.rx, C_BYTES] += k
        conn.rx_cnt += k
        self._requeue(conn)

    def _requeue(self, conn: Conn) -> None:
        if not conn.queued and not conn.closed:
            conn.queued = True
            conn.vm.rx_ready.append(conn)

    def _events(self, vm: Vm) -> None:
        if not vm.reset_event:
            return
        r = peek_chain(self.qstate, self.counters, self.regions, vm.ev, 1, self.seg_hva, self.seg_len, self.info)
        if r < 0:
            self._report_broken(vm, vm.ev)
        if r <= 0:
            return
        if int(self.info[I_TOTAL]) < EVENT.size:
            mark_broken(self.qstate, self.counters, vm.ev, BROKEN_EVENT_CHAIN_SHORT)
            self._report_broken(vm, vm.ev)
            return
        self._write_chain(vm, EVENT.pack(EVENT_TRANSPORT_RESET))
        commit_chain(self.qstate, vm.ev, int(self.info[I_HEAD]), EVENT.size)
        self.dirty.add(vm.ev)
        vm.reset_event = False
        log.info("vm cid=%d: sent TRANSPORT_RESET", vm.cid)

    # -- host sockets --
    def _interest(self, conn: Conn) -> None:
        """Register exactly the events this connection can make progress on."""
        if conn.closed:
            return
        ev = 0
        if conn.state == HANDSHAKE:
            ev = selectors.EVENT_READ
        elif conn.state == ESTABLISHED:
            if (not conn.queued and not conn.host_eof and not conn.guest_shut_rcv and conn.credit() > 0
                    and conn.vm.running):
                ev |= selectors.EVENT_READ
            if conn.pending:
                ev |= selectors.EVENT_WRITE
        if ev == conn.events:
            return
        if conn.events == 0:
            self.sel.register(conn.sock, ev, ("conn", conn))
        elif ev == 0:
            self.sel.unregister(conn.sock)
        else:
            self.sel.modify(conn.sock, ev, ("conn", conn))
        conn.events = ev

    def _close(self, conn: Conn, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        vm = conn.vm
        if conn.events:
            self.sel.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()
        conn.pending = bytearray()
        vm.handshakes.discard(conn)
        if conn.state != HANDSHAKE and vm.conns.get((conn.local, conn.peer)) is conn:
            del vm.conns[(conn.local, conn.peer)]
            if rst:
                self._ctl(conn, OP_RST)
        vm.stats["closed"] += 1

    def _drop_all(self, vm: Vm, rst: bool) -> None:
        for conn in list(vm.conns.values()) + list(vm.handshakes):
            self._close(conn, rst=rst)
        vm.ctl.clear()
        vm.rx_ready.clear()
        vm.sib.clear()
        vm.sib_bytes = 0

    def _accept(self, vm: Vm) -> None:
        for _ in range(64):
            try:
                s, _ = vm.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("vm cid=%d: accept: %s", vm.cid, e)
                return
            if len(vm.conns) + len(vm.handshakes) >= MAX_CONNS:
                s.close()
                vm.stats["too_many_connections"] += 1
                continue
            s.setblocking(False)
            conn = Conn(vm, s, HANDSHAKE)
            conn.deadline = time.monotonic() + CONNECT_TIMEOUT_S
            vm.handshakes.add(conn)
            self._interest(conn)

    def _handshake(self, conn: Conn) -> None:
        """Read ``CONNECT <port>\\n`` (peeked, so bytes after the newline stay for the guest)."""
        vm = conn.vm
        try:
            data = conn.sock.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn, rst=False)
            return
        nl = data.find(b"\n")
        if nl < 0:
            if not data or len(data) >= CONNECT_LINE_MAX:
                vm.stats["bad_connect_line" if data else "host_gone"] += 1
                self._close(conn, rst=False)
            return
        conn.sock.recv(nl + 1)
        m = _CONNECT_RE.fullmatch(data[:nl])
        port = int(m.group(1)) if m else -1
        if not 0 <= port <= 0xFFFFFFFF:
            vm.stats["bad_connect_line"] += 1
            self._close(conn, rst=False)
            return
        vm.handshakes.discard(conn)
        conn.local = vm.alloc_port()
        conn.peer = port
        conn.state = CONNECTING
        conn.deadline = time.monotonic() + CONNECT_TIMEOUT_S
        vm.conns[(conn.local, conn.peer)] = conn
        vm.handshakes.add(conn)  # still timed
        self._ctl(conn, OP_REQUEST)
        self._interest(conn)

    def _host_event(self, conn: Conn, mask: int) -> None:
        if conn.closed:
            return
        if conn.state == HANDSHAKE:
            self._handshake(conn)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
            if conn.closed:
                return
            self._maybe_finish(conn)
            if conn.closed:
                return
        if mask & selectors.EVENT_READ:
            self._requeue(conn)
        self._interest(conn)

    def _timers(self, now: float) -> None:
        for vm in self.vms:
            for conn in [k for k in vm.handshakes if k.deadline <= now]:
                vm.stats["connect_timeout"] += 1
                self._close(conn, rst=conn.state == CONNECTING)

    def _report_broken(self, vm: Vm, row: int) -> None:
        code = int(self.qstate[row]["broken"])
        if code and not vm.stats[f"broken{row}"]:
            vm.stats[f"broken{row}"] = 1
            log.error("vm cid=%d: vring %d broken (code %d); its connections are reset", vm.cid, row % self.nvq, code)
            self._drop_all(vm, rst=False)

    def snapshot(self) -> dict:
        """Connection state per guest (tests, logs)."""
        return {vm.cid: {**self.port_counters(vm.index), **dict(vm.stats)} for vm in self.vms}


def _guarded(dev: VsockDevice, vm: Vm, step) -> bool:
    """A bug in the packet logic resets that guest's connections instead of stopping the data plane."""
    try:
        return bool(step(vm))
    except Exception:
        log.exception("vm cid=%d: internal error; resetting its connections", vm.cid)
        vm.stats["internal_errors"] += 1
        dev._drop_all(vm, rst=False)
        vm.reset_event = True
        return False


def vsock_loop(ctrl: np.ndarray, dev: VsockDevice) -> None:
    """The vsock data plane: select, then work every guest's rings, until the control plane pauses us."""
    if ctrl[CMD] != RUN:
        return
    sel = dev.sel
    wake = dev.worker.wake_fd if dev.worker is not None else -1
    sel.register(wake, selectors.EVENT_READ, ("wake", None))
    dev._enter()
    try:
        more = True
        next_timer = 0.0
        while ctrl[CMD] == RUN:
            timeout = 0 if more else 0.5
            for key, mask in sel.select(timeout):
                kind, obj = key.data
                if kind == "conn":
                    dev._host_event(obj, mask)
                elif kind == "kick" or kind == "wake":
                    with contextlib.suppress(OSError):
                        os.read(key.fd, 8)
                elif kind == "listen":
                    dev._accept(obj)
            if ctrl[CMD] != RUN:
                break
            now = time.monotonic()
            if now >= next_timer:
                dev._timers(now)
                next_timer = now + 0.25
            more = False
            for vm in dev.vms:  # all tx first: replies and relayed packets they queue go out this round
                more |= _guarded(dev, vm, dev._tx)
            for vm in dev.vms:
                more |= _guarded(dev, vm, dev._rx)
                _guarded(dev, vm, dev._events)
            for row in dev.dirty:
                notify(dev.qstate, dev.counters, row, dev.one)
            dev.dirty.clear()
    finally:
        sel.unregister(wake)
        dev._leave()


# ---------------------------------------------------------------------------------------------
# command line (compatible with vhost-device-vsock)

HELP = """\
Serve virtio-vsock over vhost-user (QEMU: -device vhost-user-vsock-pci,chardev=...), one guest per
vhost-user socket, with the host side on unix sockets (the hybrid-vsock convention of Firecracker
and rust-vmm's vhost-device-vsock):

  host -> guest   connect to UDS_PATH, write "CONNECT <port>\\n"; once the guest accepts, vring
                  answers "OK <host_port>\\n" and the connection carries the stream. If the guest
                  refuses (nothing listens on <port>), the connection is closed.
  guest -> host   a guest connecting to CID 2, port P makes vring connect to "UDS_PATH_P"; if
                  nobody listens there, the guest's connect fails (connection reset).
  guest -> guest  guests of one vring process that share a group (--groups a+b) reach each other
                  by CID; guests in disjoint groups cannot.

One guest:   vring vsock --guest-cid 3 --uds-path /tmp/vm3.vsock --socket /tmp/vhost3.socket
Several:     vring vsock --vm guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,groups=g1 \\
                         --vm guest-cid=4,socket=/tmp/vhost4.socket,uds-path=/tmp/vm4.vsock,groups=g1
From YAML:   vring vsock --config vms.yaml   with
               vms:
                 - guest_cid: 3
                   socket: /tmp/vhost3.socket
                   uds_path: /tmp/vm3.vsock
                   tx_buffer_size: 65536
                   queue_size: 1024
                   groups: group1+group2
"""

_VM_KEYS = {"guest_cid", "socket", "uds_path", "tx_buffer_size", "queue_size", "groups"}


def _vm_from_dict(d: dict, where: str) -> VmConfig:
    d = {str(k).replace("-", "_"): v for k, v in d.items()}
    unknown = set(d) - _VM_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for k in ("guest_cid", "socket", "uds_path"):
        if k not in d:
            raise ValueError(f"{where}: {k.replace('_', '-')} is required")
    try:
        return VmConfig(int(d["guest_cid"]), d["socket"], d["uds_path"],
                        int(d.get("tx_buffer_size", DEFAULT_TX_BUFFER)),
                        int(d.get("queue_size", DEFAULT_QUEUE_SIZE)), str(d.get("groups", "default")))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def parse_vm_arg(text: str) -> VmConfig:
    d = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            raise ValueError(f"--vm {text!r}: expected key=value, got {part!r}")
        d[k.strip()] = v.strip()
    return _vm_from_dict(d, f"--vm {text!r}")


def load_config(path: str) -> list[VmConfig]:
    import yaml  # pyyaml: only needed for --config

    with open(path) as f:
        doc = yaml.safe_load(f)
    vms = doc.get("vms") if isinstance(doc, dict) else None
    if not isinstance(vms, list) or not vms:
        raise ValueError(f"{path}: expected a top-level 'vms' list")
    return [_vm_from_dict(v, f"{path} vms[{i}]") for i, v in enumerate(vms) if isinstance(v, dict)]


def configs_from_args(args: argparse.Namespace) -> list[VmConfig]:
    single = [args.guest_cid, args.uds_path, args.socket]
    vms: list[VmConfig] = []
    if any(x is not None for x in single):
        if not all(x is not None for x in single):
            raise ValueError("--guest-cid, --uds-path and --socket go together")
        vms.append(VmConfig(args.guest_cid, args.socket, args.uds_path, args.tx_buffer_size, args.queue_size,
                            args.groups))
    for text in args.vm or []:
        vms.append(parse_vm_arg(text))
    if args.config:
        vms.extend(load_config(args.config))
    if not vms:
        raise ValueError("no guest: give --guest-cid/--uds-path/--socket, --vm or --config")
    return vms


def cmd_vsock(args: argparse.Namespace) -> int:
    from vring.cli import parse_cpus
    from vring.server import Server

    try:
        vms = configs_from_args(args)
        dev = VsockDevice(vms, cpus=parse_cpus(args.cpus) if args.cpus else None)
    except (ValueError, OSError) as e:
        log.error("vring vsock: %s", e)
        return 2
    server = Server(dev, [v.socket for v in vms], client=args.client)

    def stop(signum, frame):
        server.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        dev.open()
    except OSError as e:
        log.error("vring vsock: %s", e)
        for vm in dev.vms:
            if vm.listener is not None:
                vm.listener.close()
        return 2
    dev.start()
    try:
        server.open()
        for vm in dev.vms:
            log.info("vring vsock: guest cid=%d on %s (port=%d), host side %s, groups %s", vm.cid, vm.cfg.socket,
                     vm.index, vm.cfg.uds_path, "+".join(sorted(vm.cfg.groups)) or "-")
        server.serve(until=time.monotonic() + args.seconds if args.seconds else None)
    finally:
        server.close()
        snap = None
        try:
            with dev.paused():
                snap = dev.snapshot()
        finally:
            dev.stop()
        for vm in dev.vms:
            c = snap[vm.cid] if snap else dev.port_counters(vm.index)
            print(f"port {vm.index} (cid {vm.cid}): " + " ".join(f"{k}={v}" for k, v in sorted(c.items())),
                  flush=True)
    return 0


def register(sub) -> None:
    v = sub.add_parser("vsock", help="virtio-vsock back-end; host side on unix sockets (hybrid vsock)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--guest-cid", type=int, help="the guest's CID (>= 3)")
    v.add_argument("--uds-path", help="host side unix socket: host programs connect here (CONNECT <port>); "
                                      "guest connections to CID 2 port P go to UDS_PATH_P")
    v.add_argument("--socket", help="vhost-user socket QEMU connects to")
    v.add_argument("--tx-buffer-size", type=int, default=DEFAULT_TX_BUFFER,
                   help="per-connection buffer (credit given to the guest) in bytes (default 65536)")
    v.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="largest vring size accepted (default 1024)")
    v.add_argument("--groups", default="default",
                   help="sibling groups, '+'-separated (default: 'default'); guests sharing a group reach "
                        "each other by CID")
    v.add_argument("--vm", action="append", metavar="KEY=VAL,...",
                   help="a guest: guest-cid=..,socket=..,uds-path=..[,tx-buffer-size=..][,queue-size=..]"
                        "[,groups=..] (repeat for several guests)")
    v.add_argument("--config", metavar="FILE.yaml", help="guests from a YAML file (a 'vms' list, same keys)")
    v.add_argument("--client", action="store_true", help="connect to the vhost-user sockets (QEMU is the server)")
    v.add_argument("--cpus", metavar="LIST", help="pin the data-plane thread to these CPUs")
    v.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (default: until a signal)")
    v.set_defaults(func=cmd_vsock)
