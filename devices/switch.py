"""``vring switch``: an L2 learning switch between virtio-net ports (one port per vhost-user socket).

Every frame a driver sends (TX vring of port p) is switched by its Ethernet header:

- its source MAC (unless multicast) is learned on port p: the MAC table maps MAC -> port and
  the time it was last seen; an entry older than ``age`` seconds is forgotten (ageing);
- a frame for a learned unicast MAC goes to that port only (dropped, and counted as
  ``filtered``, if that port is the ingress port: a frame never goes back out where it came in);
- broadcast, multicast and unknown unicast frames are flooded to every other port whose RX
  vring is ready (never the ingress port).

The MAC table is three numpy arrays (key, port, last seen in cycles) of a power-of-two size with
bounded linear probing (PROBE slots per MAC): learning and lookup do a fixed amount of work, no
allocation and no deletion. A full window evicts its oldest entry. The data plane is
``switch_loop``: one nogil numba loop, like devices.net's ``net_loop``, built from the same
kernels (``_deliver`` writes a frame into an RX vring; the popped TX chain is delivered to N RX
vrings and completed once).

A frame of the common kind (one descriptor, no offload asked, one destination port whose RX vring
has one buffer posted that takes it) has its own path, ``_switch_one``: copied once, straight from
the TX buffer to the RX buffer, as devices.net's ``_forward_one``. The rest go the general way.

With several queue pairs, a frame from TX queue k goes to RX queue k of the destination port
(RX queue 0 if k is not ready there), so the frames of one flow stay on one queue.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
from numba import njit

from devices.capture import DIR_FROM_GUEST, DIR_TO_GUEST, K_PORTS, capture
from devices.capture import empty as no_capture
from devices.net import (
    NET_FEATURES,
    NET_PROTOCOL_FEATURES,
    NO_ROOM,
    NetDevice,
    _commit_plain,
    _mark_broken,
    _peek_plain,
    _ready,
    _send,
    begin_batch,
    inject,
    loop_scratch,
    rarp_frame,
    too_long,
)
from devices.offload import OSTAT_NAMES
from vring.dataplane import BUSY_SIZE, ROUNDS, SLEEPS, Worker, account_poll, busy_ends, end_round, running
from vring.device import Device
from vring.jit import inline_kernel, kernel
from vring.layout import C_BYTES, C_DROPS, C_ERRORS, C_PACKETS
from vring.ordering import cycles, load_u8
from vring.protocol import F
from vring.ring import EMPTY, begin, finish_later, flush_calls, peek_one, pop, prefetch_batch, put_used

log = logging.getLogger(__name__)

PROBE = 8  # slots a MAC may live in (from its hash on)
KEY_VALID = np.uint64(1 << 63)  # set in every used key (so MAC 00:00:00:00:00:00 is a valid key)
ETH_MACS = 12  # destination + source MAC

# swstats slots
S_LEARNED, S_MOVED, S_AGED, S_EVICTED, S_UNICAST, S_FLOODED, S_FILTERED, S_RUNTS = range(8)
SWSTAT_NAMES = ("learned", "moved", "aged", "evicted", "unicast", "flooded", "filtered", "runts")
# params slots
P_AGE = 0  # entry lifetime in cycles (0: never age)
CLOCK_ROUNDS = 64  # switch_loop reads the MAC table's clock once in this many rounds (and after sleeping)


@inline_kernel
def _hash(mac, mask):
    return np.int64(((mac * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) & np.uint64(mask))


@inline_kernel
def _stale(seen, now, age):
    return age != 0 and now > seen and now - seen > age


@inline_kernel
def learn(mac_key, mac_port, mac_seen, mac, port, now, age, st):
    """Record that ``mac`` was seen on ``port`` at ``now`` (cycles)."""
    key = mac | KEY_VALID
    mask = mac_key.shape[0] - 1
    h = _hash(mac, mask)
    free = -1
    oldest = -1
    for i in range(PROBE):
        j = (h + i) & mask
        kj = mac_key[j]
        if kj == key:
            if _stale(mac_seen[j], now, age):
                st[S_AGED] += 1
                st[S_LEARNED] += 1
            elif mac_port[j] != port:
                st[S_MOVED] += 1
            mac_port[j] = port
            mac_seen[j] = now
            return
        if free < 0 and (kj == 0 or _stale(mac_seen[j], now, age)):
            free = j
        if oldest < 0 or mac_seen[j] < mac_seen[oldest]:
            oldest = j
    if free < 0:
        free = oldest
        st[S_EVICTED] += 1
    elif mac_key[free] != 0:
        st[S_AGED] += 1
    mac_port[free] = port
    mac_seen[free] = now
    mac_key[free] = key
    st[S_LEARNED] += 1


@inline_kernel
def lookup(mac_key, mac_port, mac_seen, mac, now, age):
    """The port ``mac`` was learned on, or -1 (unknown or aged out)."""
    key = mac | KEY_VALID
    mask = mac_key.shape[0] - 1
    h = _hash(mac, mask)
    for i in range(PROBE):
        j = (h + i) & mask
        if mac_key[j] == key:
            if _stale(mac_seen[j], now, age):
                return -1
            return mac_port[j]
    return -1


@inline_kernel
def macs_at(addr):
    """(destination, source) MAC of the frame at host address ``addr``, as 48-bit integers in wire
    order (first byte most significant)."""
    d = np.uint64(0)
    s = np.uint64(0)
    for i in range(6):
        d = (d << np.uint64(8)) | np.uint64(load_u8(addr + np.uint64(i)))
        s = (s << np.uint64(8)) | np.uint64(load_u8(addr + np.uint64(6 + i)))
    return d, s


@inline_kernel
def frame_macs(s_hva, s_len, ns, skip):
    """``macs_at`` for the frame after ``skip`` header bytes of the pieces s_*[:ns], which may
    split the MACs. The caller knows the frame has 12 bytes."""
    if ns > 0 and s_len[0] >= np.uint64(skip) + np.uint64(ETH_MACS):
        return macs_at(s_hva[0] + np.uint64(skip))
    si = 0
    off = np.uint64(skip)
    d = np.uint64(0)
    s = np.uint64(0)
    for i in range(ETH_MACS):
        while si < ns and off >= s_len[si]:
            off -= s_len[si]
            si += 1
        b = np.uint64(load_u8(s_hva[si] + off))
        off += np.uint64(1)
        if i < 6:
            d = (d << np.uint64(8)) | b
        else:
            s = (s << np.uint64(8)) | b
    return d, s


@inline_kernel
def _is_multicast(mac):
    return (mac >> np.uint64(40)) & np.uint64(1) != 0  # I/G bit of the first byte (broadcast too)


@inline_kernel
def _rx_row(qs, rx_rows, port, k):
    """The RX vring of ``port`` for TX queue k: queue k if ready, else queue 0, else -1."""
    r = rx_rows[port, k]
    if _ready(qs, r):
        return r
    r = rx_rows[port, 0]
    if _ready(qs, r):
        return r
    return -1


@inline_kernel
def _begin_row(qs, regions, row, began, touched, nt):
    """Begin RX vring ``row``'s batch at the TX batch's first frame for it, and note it in
    ``touched[:nt]``. Returns (0 or begin's -BROKEN_*, the new number of touched rows)."""
    if began[row]:
        return 0, nt
    b = begin(qs, row, 32)
    if b < 0:
        return b, nt
    prefetch_batch(qs, row, regions, min(b, 32), 1)  # only buffers already posted (devices.net)
    began[row] = 1
    touched[nt] = row
    return 0, nt + 1


@inline_kernel
def _to_port(qs, counters, regions, row, s_hva, s_len, ns, hl, flen, sc, ob, began, touched, nt, cap):
    """Deliver one frame into RX vring ``row``, beginning its batch if this is its first frame.
    Returns the new number of touched rows."""
    bad, nt = _begin_row(qs, regions, row, began, touched, nt)
    if bad < 0:
        _mark_broken(qs, counters, row, -bad)
        return nt
    r = _send(qs, counters, regions, row, s_hva, s_len, ns, hl, flen, sc, ob)  # counts packets, bytes, drops...
    if r == NO_ROOM:
        counters[row, C_DROPS] += 1  # ...but a receiver short of buffers: the switch does not hold frames
    elif r > 0:
        if cap[0][K_PORTS] != 0:
            capture(cap[0], cap[1], cap[2], row, DIR_TO_GUEST, s_hva, s_len, ns, hl, flen)
    elif r < 0:
        _mark_broken(qs, counters, row, -r)
    return nt


@inline_kernel
def _switch_one(qs, counters, regions, port, k, src, rx_rows, hl, began, touched, nt, mac_key, mac_port, mac_seen, st,
                now, age):
    """Switch the next frame of TX vring ``src`` if it is the common case, as devices.net's
    ``_forward_one`` forwards: one descriptor, no offload asked, within the MTU, one destination
    port (the learned one, or the only other port when flooding between two) whose RX vring logs
    nothing and has one buffer posted that takes it. Returns (1, nt) if it did; (0, nt)
    with nothing counted or popped for the general path (an RX batch may have begun, and the source
    may have been learned: learning it again there changes nothing, as ``learn`` at the same ``now``
    is idempotent). Learning comes before the lookup, as in the general path: the two differ when
    the destination is the source, or when learning evicts the destination's entry."""
    s, flen, sid = _peek_plain(qs, regions, src, hl, hl + np.uint64(ETH_MACS))  # the MACs lie inside it
    if s == 0:
        return 0, nt
    dmac, smac = macs_at(s + hl)
    if not _is_multicast(smac):
        learn(mac_key, mac_port, mac_seen, smac, port, now, age, st)
    out = -1 if _is_multicast(dmac) else lookup(mac_key, mac_port, mac_seen, dmac, now, age)
    if out < 0 and rx_rows.shape[0] == 2:
        dest = 1 - port  # flooding between two ports: one destination
    elif out >= 0 and out != port:
        dest = out
    else:
        return 0, nt  # flooded to several ports, or filtered
    row = _rx_row(qs, rx_rows, dest, k)
    if row < 0 or qs[row]["log_base"] != 0 or qs[row]["hdr_len"] < 10:
        return 0, nt
    bad, nt = _begin_row(qs, regions, row, began, touched, nt)
    if bad < 0:
        return 0, nt  # the general path marks it broken
    hd = np.uint64(qs[row]["hdr_len"])
    d, _, did = peek_one(qs, row, regions, 1, hd + flen)
    if d == 0:
        return 0, nt
    st[S_UNICAST if out >= 0 else S_FLOODED] += 1
    _commit_plain(qs, counters, src, sid, s, hl, row, did, d, hd, flen)
    return 1, nt


@inline_kernel
def switch_batch(qs, counters, regions, port, k, rx_rows, tx_rows, burst, one, s_hva, s_len, sc, ob, began, touched,
                 mac_key, mac_port, mac_seen, params, st, cap, busy, now):
    """Pop up to ``burst`` frames from TX queue k of ``port`` and switch them; ``now`` (cycles) dates
    the MAC table's entries."""
    src = tx_rows[port, k]
    n = begin_batch(qs, counters, regions, src, burst, 0, busy)
    if n <= 0:
        return n
    age = params[P_AGE]
    nports = rx_rows.shape[0]
    hl = np.uint64(qs[src]["hdr_len"])
    capturing = cap[0][K_PORTS] != 0
    done = 0
    nt = np.int64(0)
    # the common case's own path: nothing to capture, a full header (_switch_one)
    simple = not capturing and hl >= 10
    for _ in range(burst):
        if simple:
            one_done, nt = _switch_one(qs, counters, regions, port, k, src, rx_rows, hl, began, touched, nt, mac_key,
                                       mac_port, mac_seen, st, now, age)
            if one_done:
                done += 1
                continue
        ns, total, bid, ndesc = pop(qs, src, regions, 0, s_hva, s_len, 0)
        if ns == EMPTY:
            break
        if ns < 0:
            _mark_broken(qs, counters, src, -ns)
            break
        put_used(qs, src, bid, 0, ndesc)  # published after every delivery below: the buffers stay ours
        done += 1
        if total < hl + ETH_MACS:
            counters[src, C_ERRORS] += 1  # no Ethernet header to switch on
            st[S_RUNTS] += 1
            continue
        flen = total - hl
        if too_long(qs, src, s_hva, s_len, ns, hl, flen):
            counters[src, C_DROPS] += 1  # longer than the port's MTU
            continue
        counters[src, C_PACKETS] += 1
        counters[src, C_BYTES] += flen
        if capturing:
            capture(cap[0], cap[1], cap[2], src, DIR_FROM_GUEST, s_hva, s_len, ns, hl, flen)
        dmac, smac = frame_macs(s_hva, s_len, ns, hl)
        if not _is_multicast(smac):
            learn(mac_key, mac_port, mac_seen, smac, port, now, age, st)
        out = -1 if _is_multicast(dmac) else lookup(mac_key, mac_port, mac_seen, dmac, now, age)
        if out == port:
            st[S_FILTERED] += 1  # the destination is behind the ingress port: never send it back
            continue
        # to the learned port, else flooded to every other: one loop, so _to_port (and the _send it
        # inlines) is compiled into the loop once
        st[S_UNICAST if out >= 0 else S_FLOODED] += 1
        for p in range(out if out >= 0 else 0, out + 1 if out >= 0 else nports):
            if p == port:
                continue
            row = _rx_row(qs, rx_rows, p, k)
            if row >= 0:
                nt = _to_port(qs, counters, regions, row, s_hva, s_len, ns, hl, flen, sc, ob, began, touched, nt, cap)
            elif out >= 0:
                counters[rx_rows[out, 0], C_DROPS] += 1  # the learned port has no RX vring ready
    finish_later(qs, src, counters)  # the call decisions: switch_loop's next round (ring.finish_later)
    for i in range(nt):
        row = touched[i]
        began[row] = 0
        finish_later(qs, row, counters)
    return done


def switch_scratch(nwatch: int, nrows: int, ostats: np.ndarray) -> tuple:
    """The arrays ``switch_loop`` works in (devices.net.loop_scratch, and the per-batch RX
    bookkeeping: which RX rows a batch began, in the order it touched them)."""
    return (*loop_scratch(nwatch, ostats), np.zeros(nrows, np.uint8), np.zeros(nrows, np.int64))


@kernel
def switch_loop(ctrl, qs, counters, regions, rx_rows, tx_rows, rows, watch, burst, mac_key, mac_port, mac_seen,
                params, st, polls, busy, cap, scratch):
    """The switch data plane: every TX queue of every port, round after round, until told to stop.
    ``rows``: every ring of every port, whose call decisions each round settles at its start
    (ring.finish_later), as net_loop does."""
    one, buf, pollfds, s_hva, s_len, sc, ob, _held, began, touched = scratch
    idle = 0
    now = cycles()
    sleeps = ctrl[SLEEPS]
    while running(ctrl):
        flush_calls(qs, rows, counters, one)
        busy_ends(busy)  # the last round's work ends with its call decisions
        # The MAC table's clock, read before the round polls (rdtsc right behind a poll's descriptor
        # load held the next loads back in net_loop: dataplane.BUSY_SAMPLE): every CLOCK_ROUNDS
        # rounds, which poll for microseconds, and after every sleep, which may last seconds.
        if ctrl[ROUNDS] % CLOCK_ROUNDS == 0 or ctrl[SLEEPS] != sleeps:
            now = cycles()
            sleeps = ctrl[SLEEPS]
        work = 0
        for k in range(tx_rows.shape[1]):
            for p in range(tx_rows.shape[0]):
                done = switch_batch(qs, counters, regions, p, k, rx_rows, tx_rows, burst, one, s_hva, s_len, sc, ob,
                                    began, touched, mac_key, mac_port, mac_seen, params, st, cap, busy, now)
                work += account_poll(polls, busy, burst, done)
        idle = end_round(ctrl, qs, watch, pollfds, buf, work, idle)  # sleeps only after a round with no work
    flush_calls(qs, rows, counters, one)  # nothing left undecided while the control plane has the rings
    busy_ends(busy)


@njit(nogil=True, cache=True)
def switch_inject(qs, counters, regions, port, rx_rows, mac_key, mac_port, mac_seen, params, st, frame, cap):
    """A broadcast ``frame`` (no virtio header) entering on ``port``: learn its source, flood it.
    From the control plane with the data plane paused (SEND_RARP); port -1 does nothing.
    Returns the ports it was delivered to."""
    if port < 0:
        return 0
    s_hva = np.full(1, np.uint64(frame.ctypes.data), np.uint64)
    s_len = np.full(1, np.uint64(frame.shape[0]), np.uint64)
    _dmac, smac = frame_macs(s_hva, s_len, np.int64(1), np.uint64(0))
    if not _is_multicast(smac):
        learn(mac_key, mac_port, mac_seen, smac, port, cycles(), params[P_AGE], st)
    st[S_FLOODED] += 1
    sent = 0
    for p in range(rx_rows.shape[0]):
        if p == port:
            continue
        row = _rx_row(qs, rx_rows, p, 0)
        if row >= 0 and inject(qs, counters, regions, row, frame, cap) > 0:  # devices.net's SEND_RARP path
            sent += 1
    return sent


def mac_str(mac: int) -> str:
    return ":".join(f"{(mac >> (8 * (5 - i))) & 0xFF:02x}" for i in range(6))


def mac_int(text: str) -> int:
    return int(text.replace(":", "").replace("-", ""), 16)


class SwitchDevice(NetDevice):
    """vring switch: ``nports`` virtio-net ports of ``queues`` queue pairs, joined by a learning switch.

    Reuses NetDevice's per-queue set-up (header length, mergeable buffers), queue count, poll
    statistics and port counters; the data plane is ``switch_loop``.
    """

    kind = "switch"

    def __init__(self, nports: int, queues: int = 1, burst: int = 32, age: float = 300.0, table_size: int = 4096,
                 idle_rounds: int = 20000, cpus: list[int] | None = None, mtu: int = 0):
        if nports < 1:
            raise ValueError("a switch needs at least one port")
        if table_size < PROBE or table_size & (table_size - 1):
            raise ValueError(f"the MAC table size must be a power of two >= {PROBE}")
        Device.__init__(self, nports, 2 * queues)
        self._init_mtu(mtu)
        self.mode = "switch"
        self.queues = queues
        self.burst = burst
        self.features = int(NET_FEATURES | (F.NET_MQ if queues > 1 else 0))
        self.port_disable: dict[int, int] = {}  # NetDevice.port_features reads it: the same features on every port
        self.protocol_features = int(NET_PROTOCOL_FEATURES)
        self.rx_rows = np.array([[self.row(p, 2 * k) for k in range(queues)] for p in range(nports)], np.int64)
        self.tx_rows = np.array([[self.row(p, 2 * k + 1) for k in range(queues)] for p in range(nports)], np.int64)
        self.watch = np.sort(self.tx_rows.ravel())
        self.rows = np.sort(np.concatenate([self.rx_rows.ravel(), self.tx_rows.ravel()]))
        self.mac_key = np.zeros(table_size, np.uint64)
        self.mac_port = np.full(table_size, -1, np.int64)
        self.mac_seen = np.zeros(table_size, np.uint64)
        self.params = np.zeros(4, np.uint64)
        self.swstats = np.zeros(len(SWSTAT_NAMES), np.uint64)
        self.age = age
        self.cap = no_capture()  # replaced by PcapDrain.arrays() with --pcap (before start)
        self.polls = np.zeros(burst + 1, np.int64)
        self.busy = np.zeros(BUSY_SIZE, np.uint64)
        self.ostats = np.zeros(len(OSTAT_NAMES), np.uint64)
        self.scratch = switch_scratch(len(self.watch), len(self.qstate), self.ostats)
        self.worker = Worker("switch", switch_loop, self._args, idle_rounds=idle_rounds, cpus=cpus)

    @property
    def age(self) -> float:
        return self._age

    @age.setter
    def age(self, seconds: float) -> None:
        """Entry lifetime in seconds (0: entries never age); may be changed while running."""
        from vring.ordering_calibrate import ns_per_cycle

        self._age = float(seconds)
        self.params[P_AGE] = 0 if seconds <= 0 else max(1, int(seconds * 1e9 / ns_per_cycle()))

    def _args(self) -> tuple:
        return (self.qstate, self.counters, self.regions, self.rx_rows, self.tx_rows, self.rows, self.watch, self.burst,
                self.mac_key, self.mac_port, self.mac_seen, self.params, self.swstats, self.polls, self.busy,
                self.cap, self.scratch)

    def mac_table(self) -> list[dict]:
        """Live entries (not aged out), sorted by port then MAC: {"mac", "port", "age_s"}.

        Read without pausing the data plane: an entry being learned at that instant may be
        missing or show its previous port."""
        from vring.ordering_calibrate import cycles_now, ns_per_cycle

        now = int(cycles_now())
        limit = int(self.params[P_AGE])
        keys, ports, seen = self.mac_key.copy(), self.mac_port.copy(), self.mac_seen.copy()
        out = []
        for j in np.flatnonzero(keys):
            dt = max(0, now - int(seen[j]))
            if limit and dt > limit:
                continue
            out.append({"mac": mac_str(int(keys[j]) & ((1 << 48) - 1)), "port": int(ports[j]),
                        "age_s": round(dt * ns_per_cycle() / 1e9, 3)})
        out.sort(key=lambda e: (e["port"], e["mac"]))
        return out

    def switch_stats(self) -> dict[str, int]:
        return {n: int(v) for n, v in zip(SWSTAT_NAMES, self.swstats, strict=True)}

    def flush(self, port: int | None = None) -> None:
        """Forget every MAC (or those learned on ``port``)."""
        with self.paused():
            sel = np.ones(len(self.mac_key), bool) if port is None else self.mac_port == port
            self.mac_key[sel] = 0
            self.mac_port[sel] = -1
            self.mac_seen[sel] = 0

    def compile(self) -> None:
        # the SEND_RARP path too, not when a front-end is waiting for it
        switch_inject(self.qstate, self.counters, self.regions, -1, self.rx_rows, self.mac_key, self.mac_port,
                      self.mac_seen, self.params, self.swstats, rarp_frame(bytes(6)), self.cap)
        Device.compile(self)  # not NetDevice's: switch_inject has compiled net's inject path

    def announce(self, port: int, mac: bytes) -> bool:
        """SEND_RARP: the migrated guest's MAC is now behind ``port``: learn it there and flood a RARP."""
        args = (self.qstate, self.counters, self.regions, port, self.rx_rows, self.mac_key, self.mac_port,
                self.mac_seen, self.params, self.swstats, rarp_frame(mac), self.cap)
        with self.paused():
            switch_inject(*args)
        return True

    def disconnected(self, port: int) -> None:
        self.flush(port)  # link down: frames for its MACs flood again instead of dying at an empty port
        super().disconnected(port)

    def sample_extra(self) -> dict:
        return {"mac_table": self.mac_table(), "switch": self.switch_stats(), "offload": self.offload_stats()}

    def summary_lines(self) -> list[str]:
        lines = ["switch: " + " ".join(f"{k}={v}" for k, v in self.switch_stats().items()), *super().summary_lines()]
        lines += [f"mac {e['mac']} port={e['port']} age_s={e['age_s']}" for e in self.mac_table()]
        return lines

    def port_counters(self, port: int) -> dict[str, int]:
        """NetDevice's counters plus ``macs``: live MAC table entries on this port."""
        c = super().port_counters(port)
        c["macs"] = sum(1 for e in self.mac_table() if e["port"] == port)
        return c


def cmd_switch(args: argparse.Namespace) -> int:
    from vring.cli import idle_rounds, parse_cpus, serve_backend

    dev = SwitchDevice(len(args.socket), queues=args.queues, burst=args.burst, age=args.age,
                       table_size=args.table_size, idle_rounds=idle_rounds(args),
                       cpus=parse_cpus(args.cpus) if args.cpus else None, mtu=args.mtu)
    return serve_backend(dev, args, f"vring switch: age={args.age:g}s table={args.table_size}", {"mode": "switch"})


def register(sub) -> None:
    from vring.cli import add_backend_arguments

    s = sub.add_parser("switch", help="L2 learning switch between virtio-net ports (one per --socket)",
                       description="Serve virtio-net over vhost-user on every --socket and switch frames between "
                                   "the ports: learn source MACs (with ageing), send frames for a learned MAC to "
                                   "its port only, flood broadcast, multicast and unknown unicast to every other "
                                   "port; never back out of the ingress port.")
    add_backend_arguments(s)
    s.add_argument("--age", type=float, default=300.0,
                   help="seconds a learned MAC is kept without traffic from it (default 300; 0: forever)")
    s.add_argument("--table-size", type=int, default=4096, help="MAC table slots, a power of two (default 4096)")
    s.set_defaults(func=cmd_switch)
