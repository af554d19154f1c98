"""virtio-net over vhost-user: ports, the virtio_net_hdr, mergeable RX buffers, and forwarding.

Each port is one vhost-user socket with ``queues`` queue pairs: vring 2k is RX (device
writes, frames to the driver), vring 2k+1 is TX (frames from the driver). A *link* moves
frames from one TX vring to one RX vring (forward), drops them (sink) or generates them
(source). A frame whose destination has no front-end, no room or no ready ring is dropped
and counted: one side never stalls the other.

The whole data plane is ``net_loop``: one nogil numba loop over all links that returns
only when the control plane asks (see vring.dataplane).
"""
from __future__ import annotations

import logging

import numpy as np
from numba import njit

from devices.capture import DIR_FROM_GUEST, DIR_TO_GUEST, K_PORTS, capture
from devices.capture import empty as no_capture
from devices.offload import (
    FRAME_MAX,
    GSO_NONE,
    O_BAD,
    O_CSUM,
    O_CSUM_PASSED,
    O_GSO,
    O_GSO_PASSED,
    O_SEGMENTS,
    OFF_CSUM,
    OFF_ECN,
    OFF_TSO4,
    OFF_TSO6,
    OSTAT_NAMES,
    complete_csum,
    gso_plan,
    make_segment,
    needs,
)
from vring.dataplane import (
    BUSY_CYCLES,
    BUSY_FRAMES,
    BUSY_OPEN,
    BUSY_SIZE,
    BUSY_TIMED_FRAMES,
    Worker,
    account_poll,
    busy_begins,
    busy_drop,
    busy_ends,
    busy_per_frame,
    end_round,
    running,
)
from vring.device import Device
from vring.dirtylog import log_pieces
from vring.jit import inline_kernel, kernel
from vring.layout import C_BYTES, C_DROPS, C_ERRORS, C_HELD, C_PACKETS
from vring.ordering import copy_bytes, cycles, load_u8, load_u16, load_u64, store_u16, store_u32, store_u64
from vring.protocol import MAX_MTU, MIN_MTU, PF, F
from vring.ring import (
    BUF_NONE,
    BUF_READ,
    BUF_WRITE,
    EMPTY,
    avail_ahead,
    begin,
    cursor,
    finish,
    finish_later,
    flush_calls,
    peek_one,
    pop,
    prefetch_batch,
    put_used,
    rollback,
    take_one,
)
from vring.split import MAX_SEGS

log = logging.getLogger(__name__)

MODE_FORWARD, MODE_SINK, MODE_SOURCE = 0, 1, 2
MODES = ("xconnect", "loopback", "sink", "source")
# how long frames wait in a TX ring for the receiver's buffers before they are dropped (_room)
HOLD_US = 1000.0
SEQ_AT = 42  # where a source frame carries its number: after the Ethernet, IPv4 and UDP headers
HELD = 64  # frames a batch takes before it copies them (_fill_held, _fill_forwarded)
# rows of the held frames' array (loop_scratch): the source's (_source_batch), the forward path's (_forward_batch)
H_AT, H_ID, H_NDESC, H_SEQ = range(4)  # frame address in the RX buffer, buffer id, descriptors, number
F_TO, F_FROM, F_LEN, F_TX_ID, F_RX_ID = range(5)  # RX frame address, TX frame address, length, buffer ids
REFILL = 16  # buffers an RX ring that ran dry should have again before frames go on (_room)
MAX_MRG = 64  # RX chains one frame may be merged over
HDR_LEN_V1 = 12  # virtio_net_hdr with num_buffers (VERSION_1 or MRG_RXBUF)
HDR_LEN_LEGACY = 10
ETH_HLEN = 14  # a frame may be MTU + 14 bytes long (+ 4 with one VLAN tag)
DEFAULT_MTU = 1500  # reported in the config space when no MTU is set

# checksum and TCP segmentation offloads, both ways (devices.offload completes them for a port
# that lacks one). Not offered: UFO (IP fragmentation; Linux 6.1 guests never send it) and USO
# (not in QEMU 7.2 nor Linux 6.1).
NET_OFFLOADS = (
    F.NET_CSUM | F.NET_GUEST_CSUM | F.NET_HOST_TSO4 | F.NET_HOST_TSO6 | F.NET_HOST_ECN
    | F.NET_GUEST_TSO4 | F.NET_GUEST_TSO6 | F.NET_GUEST_ECN
)
# IN_ORDER holds by construction: every chain is completed, in order, in the batch that popped it
# LOG_ALL + LOG_SHMFD: live migration (vring.dirtylog); GUEST_ANNOUNCE and RARP: re-teaching the
# network where the guest is afterwards (QEMU handles the guest's announce on its control queue)
NET_FEATURES = (
    F.VERSION_1 | F.NET_MRG_RXBUF | F.RING_INDIRECT_DESC | F.RING_EVENT_IDX | F.PROTOCOL_FEATURES | F.ANY_LAYOUT
    | F.RING_PACKED | F.IN_ORDER | F.NET_MTU | NET_OFFLOADS | F.LOG_ALL | F.NET_GUEST_ANNOUNCE
)
NET_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.INFLIGHT_SHMFD | PF.NET_MTU | PF.LOG_SHMFD | PF.RARP
)


# _deliver, _send: the receiver has too few buffers posted for the frame yet (not a -BROKEN_* code);
# nothing counted: the caller holds the frame in its TX ring or counts it dropped
NO_ROOM = -2000


@kernel
def _mark_broken(qs, counters, q, code):
    if not qs[q]["broken"]:
        qs[q]["broken"] = code
    counters[q, C_ERRORS] += 1


@inline_kernel
def _copy_frame(s_hva, s_len, ns, skip, d_hva, d_len, d_off, nbytes):
    """Copy nbytes from the source pieces (after ``skip`` bytes) to the destination pieces
    (after ``d_off`` bytes); both sides are known to be long enough. Usually one memcpy."""
    if ns == 1 and np.uint64(skip) + nbytes <= s_len[0] and np.uint64(d_off) + nbytes <= d_len[0]:
        copy_bytes(d_hva[0] + np.uint64(d_off), s_hva[0] + np.uint64(skip), nbytes)  # one piece each side
        return
    si = 0
    so = np.uint64(skip)
    while si < ns and so >= s_len[si]:
        so -= s_len[si]
        si += 1
    di = 0
    do = np.uint64(d_off)
    while do >= d_len[di]:
        do -= d_len[di]
        di += 1
    while nbytes > 0:
        k = min(s_len[si] - so, d_len[di] - do, nbytes)
        copy_bytes(d_hva[di] + do, s_hva[si] + so, k)
        so += k
        do += k
        nbytes -= k
        if so == s_len[si]:
            si += 1
            so = np.uint64(0)
        if do == d_len[di]:
            di += 1
            do = np.uint64(0)


@njit(nogil=True, cache=True)
def new_scratch():
    """Per-loop scratch for ``_deliver``: RX pieces, source pieces, RX chains of one frame, header."""
    return (
        np.zeros(MAX_SEGS, np.uint64),
        np.zeros(MAX_SEGS, np.uint64),
        np.zeros(MAX_SEGS + 1, np.uint64),
        np.zeros(MAX_SEGS + 1, np.uint64),
        np.zeros(MAX_MRG, np.int64),
        np.zeros(MAX_MRG, np.uint64),
        np.zeros(MAX_MRG, np.int64),
        np.zeros(16, np.uint8),
    )


@njit(nogil=True, cache=True)
def new_offload_scratch(ostats):
    """Per-loop scratch for ``_send``'s offload path: the frame, one segment, one piece (address,
    length); with ``ostats``, the device's offload counters (devices.offload O_*). Apart from
    ``new_scratch`` so the per-frame calls pass no more arrays than they did without offloads."""
    return np.zeros(FRAME_MAX, np.uint8), np.zeros(FRAME_MAX, np.uint8), np.zeros(1, np.uint64), \
        np.zeros(1, np.uint64), ostats


@inline_kernel
def _put_header(h, h0, h1, nch, hl):
    """Write a virtio_net_hdr of ``hl`` bytes at ``h`` (fields as ``_deliver``'s h0, h1; num_buffers
    ``nch`` if the header has it), storing only where it differs: a recycled buffer usually holds
    this very header already, and a line we don't dirty is one the driver reads from its own cache
    (DPDK's ASSIGN_UNLESS_EQUAL)."""
    if load_u64(h) != h0:
        store_u64(h, h0)
    if load_u16(h + np.uint64(8)) != h1:
        store_u16(h + np.uint64(8), h1)
    if hl >= 12 and load_u16(h + np.uint64(10)) != np.uint16(nch):
        store_u16(h + np.uint64(10), np.uint16(nch))


@inline_kernel
def _take(qs, regions, dst, need, sc, h0, h1):
    """Pop the RX chains of dst a frame of ``need`` bytes (its virtio_net_hdr included) takes into
    ``sc``, and write that header: the first 10 bytes are h0 (bytes 0-7: flags, gso_type, hdr_len,
    gso_size, csum_start, little-endian) and h1 (csum_offset), 0, 0 asking for no offload;
    num_buffers is ours.

    Returns chains taken (> 0), NO_ROOM when too few buffers are posted for it yet, 0 when it is
    too big for dst's buffers (drop), or -BROKEN_*; nothing is popped unless it returns > 0.
    """
    d_hva, d_len, c_hva, c_len, rx_ids, rx_caps, rx_ndesc, hdr = sc
    hl = np.uint64(qs[dst]["hdr_len"])
    mrg = qs[dst]["mrg_rxbuf"]
    c0 = cursor(qs, dst)
    nd = 0
    nch = 0
    cap = np.uint64(0)
    while cap < need:
        if (nch > 0 and not mrg) or nch >= MAX_MRG:
            rollback(qs, dst, c0)  # one buffer per frame without MRG_RXBUF: too big, drop
            return 0
        m, ln, bid, ndesc = pop(qs, dst, regions, 1, d_hva, d_len, nd)
        if m == EMPTY:
            rollback(qs, dst, c0)
            return NO_ROOM  # more buffers could take it: a sender may hold it (_send)
        if m < 0:
            rollback(qs, dst, c0)
            return m
        nd = m
        rx_ids[nch] = bid
        rx_caps[nch] = ln
        rx_ndesc[nch] = ndesc
        nch += 1
        cap += ln
    if d_len[0] >= hl:  # the common case: the header fits in the first piece, written in place
        _put_header(d_hva[0], h0, h1, nch, hl)
    else:
        for b in range(8):
            hdr[b] = (h0 >> np.uint64(8 * b)) & np.uint64(0xFF)
        hdr[8] = h1 & 0xFF
        hdr[9] = h1 >> 8
        hdr[10] = nch & 0xFF
        hdr[11] = nch >> 8
        c_hva[0] = np.uint64(hdr.ctypes.data)
        c_len[0] = hl
        _copy_frame(c_hva, c_len, 1, 0, d_hva, d_len, 0, hl)
    return nch


@inline_kernel
def _fill(qs, regions, dst, s_hva, s_len, ns, src_hdr, flen, sc, nch):
    """Copy the frame (source pieces after ``src_hdr`` header bytes) into the ``nch`` RX chains
    ``_take`` took into ``sc``, behind their header, and put their used elements."""
    d_hva, d_len, _c_hva, _c_len, rx_ids, rx_caps, rx_ndesc, _hdr = sc
    hl = np.uint64(qs[dst]["hdr_len"])
    need = hl + flen
    _copy_frame(s_hva, s_len, ns, src_hdr, d_hva, d_len, hl, flen)
    if qs[dst]["log_base"] != 0:  # migrating: the front-end must re-copy the pages we wrote
        log_pieces(qs, dst, regions, d_hva, d_len, need)
    rem = need
    for k in range(nch):
        used = min(rx_caps[k], rem)
        put_used(qs, dst, rx_ids[k], used, rx_ndesc[k])
        rem -= used


@inline_kernel
def _deliver(qs, regions, dst, s_hva, s_len, ns, src_hdr, flen, sc, h0, h1):
    """Write one frame (source pieces after ``src_hdr`` header bytes) into dst's RX chains behind a
    virtio_net_hdr (h0, h1 as ``_take``'s). Returns ``_take``'s result: chains used (> 0), NO_ROOM,
    0 (too big: drop) or -BROKEN_*; nothing is popped unless it was delivered."""
    nch = _take(qs, regions, dst, np.uint64(qs[dst]["hdr_len"]) + flen, sc, h0, h1)
    if nch > 0:
        _fill(qs, regions, dst, s_hva, s_len, ns, src_hdr, flen, sc, nch)
    return nch


@kernel
def _deliver_slow(qs, regions, dst, s_hva, s_len, ns, src_hdr, flen, sc, h0, h1):
    """``_deliver`` as a call, for the rare paths (software offloads, injected frames): one
    compiled copy for them instead of one inlined copy each."""
    return _deliver(qs, regions, dst, s_hva, s_len, ns, src_hdr, flen, sc, h0, h1)


@inline_kernel
def _count(counters, dst, r, flen):
    """Count one delivery attempt on dst (``_deliver``'s result): 1 delivered, 0 dropped, or the
    -BROKEN_* code."""
    if r > 0:
        counters[dst, C_PACKETS] += 1
        counters[dst, C_BYTES] += flen
        return 1
    if r == 0 or r == NO_ROOM:
        counters[dst, C_DROPS] += 1
        return 0
    return r


@inline_kernel
def _send(qs, counters, regions, dst, s_hva, s_len, ns, hl, flen, sc, ob):
    """Deliver one frame from a TX chain (after its ``hl``-byte virtio_net_hdr) into RX vring dst.

    The header's offload request (checksum, TCP segmentation) is passed through if dst's driver
    negotiated it, else completed here (``_complete``). Counts dst's packets, bytes and drops.
    Returns the frames delivered (0: dropped), NO_ROOM (uncounted) when dst has too few buffers
    posted for the frame yet, or -BROKEN_* (dst broke; not yet marked).
    """
    h0 = np.uint64(0)
    h1 = np.uint16(0)
    if hl >= 10:
        if s_len[0] >= 10:
            h0 = load_u64(s_hva[0])  # read once: the driver may rewrite it meanwhile
            h1 = load_u16(s_hva[0] + np.uint64(8))
        else:  # ANY_LAYOUT: the header spans pieces
            hdr, p_hva, p_len = sc[7], ob[2], ob[3]
            p_hva[0] = np.uint64(hdr.ctypes.data)
            p_len[0] = np.uint64(16)
            _copy_frame(s_hva, s_len, ns, 0, p_hva, p_len, 0, np.uint64(10))
            for b in range(8):
                h0 |= np.uint64(hdr[b]) << np.uint64(8 * b)
            h1 = np.uint16(hdr[8]) | (np.uint16(hdr[9]) << np.uint16(8))
    if h0 & np.uint64(0xFFFF) != 0:  # flags or GSO set: rare (most frames take the zero header below)
        need = needs(np.int64(h0 & np.uint64(0xFF)), np.int64((h0 >> np.uint64(8)) & np.uint64(0xFF)))
        if need & ~np.int64(qs[dst]["net_offload"]) != 0:
            return _complete(qs, counters, regions, dst, s_hva, s_len, ns, hl, flen, sc, ob, h0, h1)
        if need != 0:  # dst takes it as it is
            ob[4][O_GSO_PASSED if need & (OFF_TSO4 | OFF_TSO6) else O_CSUM_PASSED] += 1
            h0 &= ~np.uint64(0xFE)  # only NEEDS_CSUM is meaningful from a driver (§5.1.6.2.1)
        else:  # DATA_VALID or other flags a driver must not send: nothing to do
            h0 = np.uint64(0)
            h1 = np.uint16(0)
    else:
        h0 = np.uint64(0)  # gso_type NONE: the other fields mean nothing (§5.1.6.2)
        h1 = np.uint16(0)
    r = _deliver(qs, regions, dst, s_hva, s_len, ns, hl, flen, sc, h0, h1)
    if r == NO_ROOM:
        return NO_ROOM
    return _count(counters, dst, r, flen)


@kernel
def _complete(qs, counters, regions, dst, s_hva, s_len, ns, hl, flen, sc, ob, h0, h1):
    """The offload dst did not negotiate, done in software on a private copy of the frame: the
    checksum filled in, or the TCP super-frame cut into segments (each in its own RX chain(s))."""
    lin, seg, p_hva, p_len, ostats = ob
    if flen > np.uint64(FRAME_MAX):
        ostats[O_BAD] += 1
        counters[dst, C_DROPS] += 1
        return 0
    p_hva[0] = np.uint64(lin.ctypes.data)
    p_len[0] = np.uint64(FRAME_MAX)
    _copy_frame(s_hva, s_len, ns, hl, p_hva, p_len, 0, flen)  # from here on the guest can't change it
    gso = np.int64((h0 >> np.uint64(8)) & np.uint64(0x7F))
    if gso == GSO_NONE:
        if complete_csum(lin, flen, np.int64(h0 >> np.uint64(48)), np.int64(h1)) < 0:
            ostats[O_BAD] += 1
            counters[dst, C_DROPS] += 1
            return 0
        ostats[O_CSUM] += 1
        p_len[0] = flen
        return _count(counters, dst, _deliver_slow(qs, regions, dst, p_hva, p_len, 1, 0, flen, sc, np.uint64(0),
                                                  np.uint16(0)), flen)
    mss = np.int64((h0 >> np.uint64(32)) & np.uint64(0xFFFF))
    nseg, l3, l4, hdrs, v6 = gso_plan(lin, flen, np.int64((h0 >> np.uint64(8)) & np.uint64(0xFF)), mss,
                                          seg.shape[0])
    if nseg < 0:
        ostats[O_BAD] += 1
        counters[dst, C_DROPS] += 1
        return 0
    ostats[O_GSO] += 1
    p_hva[0] = np.uint64(seg.ctypes.data)
    sent = 0
    for i in range(nseg):
        n = make_segment(lin, flen, l3, l4, hdrs, v6, mss, i, nseg, seg)
        if n < 0:  # cannot happen after gso_plan; stop rather than deliver garbage
            break
        p_len[0] = np.uint64(n)
        r = _deliver_slow(qs, regions, dst, p_hva, p_len, 1, 0, np.uint64(n), sc, np.uint64(0), np.uint16(0))
        if r == 0 or r == NO_ROOM:  # no room: the later segments would not fit either
            counters[dst, C_DROPS] += np.uint64(nseg - i)
            break
        if r < 0:
            return r
        counters[dst, C_PACKETS] += 1
        counters[dst, C_BYTES] += np.uint64(n)
        ostats[O_SEGMENTS] += 1
        sent += 1
    return sent


@kernel
def _byte_at(s_hva, s_len, ns, off):
    """The byte ``off`` bytes into the source pieces (the caller knows they are that long)."""
    si = 0
    while si < ns and off >= s_len[si]:
        off -= s_len[si]
        si += 1
    return load_u8(s_hva[si] + off)


@inline_kernel
def too_long(qs, src, s_hva, s_len, ns, hl, flen):
    """Whether a frame of ``flen`` bytes from TX ring ``src`` exceeds its port's MTU (max_frame =
    MTU + 14; 4 bytes more for a frame with one VLAN tag: 802.1Q 0x8100 or 802.1ad 0x88a8).
    GSO super-frames are exempt (devices.offload bounds them)."""
    limit = np.uint64(qs[src]["max_frame"])
    if limit == 0 or flen <= limit:
        return False
    if hl >= 10 and _byte_at(s_hva, s_len, ns, np.uint64(1)) != 0:
        return False  # a TCP super-frame (gso_type set): its segments are what the MTU bounds
    if flen > limit + np.uint64(4):
        return True
    t = (np.uint32(_byte_at(s_hva, s_len, ns, hl + np.uint64(12))) << np.uint32(8)) | np.uint32(
        _byte_at(s_hva, s_len, ns, hl + np.uint64(13)))
    return t != 0x8100 and t != 0x88A8


@inline_kernel
def _ready(qs, q):
    return q >= 0 and qs[q]["ready"] != 0 and qs[q]["broken"] == 0


@inline_kernel
def begin_batch(qs, counters, regions, q, burst, buffers, busy):
    """Start a batch on ring q: -1 if it isn't ready, 0 if it has nothing (or has just broken),
    else a hint of the chains available, whose lines are being prefetched (``buffers``: BUF_*),
    and the round's busy span has begun (dataplane.busy_begins)."""
    if not _ready(qs, q):
        return -1
    n = begin(qs, q, burst)
    if n < 0:
        _mark_broken(qs, counters, q, -n)
        return 0
    if n > 0:
        busy_begins(busy)
        prefetch_batch(qs, q, regions, min(n, burst), buffers)
    return n


@inline_kernel
def _holding(qs, dst, hold):
    """Whether frames for RX vring ``dst`` may wait (longer) for its buffers: the wait began now
    or less than ``hold`` cycles ago. It ends (``held_since`` 0) when a frame gets through."""
    now = cycles()
    if qs[dst]["held_since"] == 0:
        qs[dst]["held_since"] = now
        return True
    return now - qs[dst]["held_since"] < np.uint64(hold)


@inline_kernel
def _refilled(qs, dst, b):
    """Whether RX vring ``dst``, which has ``b`` buffers posted (a hint, at most the burst for a
    packed ring), has a batch of them: REFILL, or a quarter of the ring if that is fewer.

    A receiver that ran dry and gets a frame per buffer as each is posted keeps its ring full: the
    used entries we write are then one or two slots behind the driver's reading position, in the
    line it reads next, and every frame moves that line between the cores twice (at burst 1 on the
    EPYC VM, ~2 Mpps when the cores are ~330 ns apart). Waiting for a batch keeps the two apart."""
    k = min(REFILL, np.int64(qs[dst]["size"]) // 4)
    return b >= k or avail_ahead(qs, dst, k)  # (b is a hint: at most the burst for a packed ring)


@inline_kernel
def _room(qs, dst, b, burst, hold):
    """How many frames to take for RX vring ``dst``, which has ``b`` buffers posted (a hint).

    With ``hold`` (cycles, > 0) a frame the receiver has no room for waits in its TX ring rather
    than being dropped: the sender's ring fills and the loss, if any, is the sender's own, which it
    counts (testpmd's TX-dropped). A receiver that stays full longer than ``hold`` gets the old
    treatment, frames taken and dropped, so a stalled guest cannot stall its peer for good, and
    an adaptive loop does not spin on frames it may not move. Once a hold has begun, frames also
    wait for the receiver to post a batch of buffers again (``_refilled``), for at most a sixteenth
    of ``hold`` from the hold's start. Returns 0 to hold this round."""
    if hold <= 0:
        return burst
    if b > 0:
        if qs[dst]["held_since"] != 0 and not _refilled(qs, dst, b) and (
                cycles() - qs[dst]["held_since"] < np.uint64(hold >> 4)):
            return 0
        return min(b, burst)  # (a frame that needs more buffers than these waits too: _forward_batch)
    if _holding(qs, dst, hold):
        return 0
    return burst  # held long enough: take the frames (and drop them) until the receiver has room


@inline_kernel
def _held(counters, dst, busy, nothing_moved):
    """Count a poll whose frames wait for RX vring ``dst``'s buffers; if the poll moved nothing
    (and opened the round's busy span), the span is dropped: waiting is not busy time."""
    counters[dst, C_HELD] += 1
    if nothing_moved:
        busy_drop(busy)


@inline_kernel
def _peek_plain(qs, regions, src, hl, need):
    """The next frame of TX vring ``src`` if it is of the common kind: one descriptor of at least
    ``need`` bytes, no offload asked (flags and gso_type 0), within the MTU. Returns (host address,
    frame length, buffer id), or address 0 (nothing moved)."""
    s, slen, sid = peek_one(qs, src, regions, 0, need)
    if s == 0:
        return s, np.uint64(0), sid
    flen = slen - hl
    limit = np.uint64(qs[src]["max_frame"])
    if (limit != 0 and flen > limit) or load_u16(s) != 0:  # too long, or flags / gso_type set
        return np.uint64(0), np.uint64(0), sid
    return s, flen, sid


@inline_kernel
def _take_plain(qs, counters, src, sid, dst, did, d, hd, flen):
    """Take the frame ``_peek_plain`` found (buffer id ``sid``, ``flen`` bytes) for the
    one-descriptor RX buffer ``d`` that ``ring.peek_one`` found on ``dst``: a header asking for no
    offload written, both descriptors taken, the frame counted on both. The copy and the used
    elements are the caller's."""
    _put_header(d, np.uint64(0), np.uint16(0), 1, hd)  # no offload, num_buffers 1
    take_one(qs, dst, did)
    take_one(qs, src, sid)
    counters[src, C_PACKETS] += 1
    counters[src, C_BYTES] += flen
    counters[dst, C_PACKETS] += 1
    counters[dst, C_BYTES] += flen


@inline_kernel
def _commit_plain(qs, counters, src, sid, s, hl, dst, did, d, hd, flen):
    """``_take_plain``, then the frame copied once and both descriptors used: the switch's
    per-frame path (its frames may go to different rings); net's holds the copy (``_forward_one``)."""
    _take_plain(qs, counters, src, sid, dst, did, d, hd, flen)
    copy_bytes(d + hd, s + hl, flen)
    put_used(qs, dst, did, hd + flen, 1)
    put_used(qs, src, sid, 0, 1)


@inline_kernel
def _forward_one(qs, counters, regions, src, dst, hl, held, n):
    """Take the next frame of TX vring ``src`` for RX vring ``dst`` (split or packed, either) if it
    is the common case: one descriptor each side, no offload asked, within the MTU, fits one RX
    buffer (``_take_plain``); its copy and used elements wait in column ``n`` of ``held`` for
    ``_fill_forwarded``.
    Returns 1 if it did, 0 (nothing changed) for ``_send``'s general path to decide."""
    s, flen, sid = _peek_plain(qs, regions, src, hl, hl)
    if s == 0:
        return 0
    hd = np.uint64(qs[dst]["hdr_len"])
    d, _, did = peek_one(qs, dst, regions, 1, hd + flen)
    if d == 0:
        return 0
    _take_plain(qs, counters, src, sid, dst, did, d, hd, flen)
    held[F_TO, n] = d + hd
    held[F_FROM, n] = s + hl
    held[F_LEN, n] = flen
    held[F_TX_ID, n] = sid
    held[F_RX_ID, n] = did
    return 1


@inline_kernel
def _fill_forwarded(qs, src, dst, held, n):
    """Copy the ``n`` frames ``_forward_one`` held, in one loop (as ``_fill_held``), then give both
    rings their used elements in the order the frames were taken; the TX buffers only now, as
    their frames have been read.

    The copies get a loop of their own: with each frame's used elements in the same loop the kernel
    benchmark (one core) gains 5-9 ns a frame, but across cores the rate fell ~20 %
    (tries/epyc_stop42.md section 5)."""
    if n == 0:
        return  # (and dst may be no ring: sink mode)
    for k in range(n):
        copy_bytes(held[F_TO, k], held[F_FROM, k], held[F_LEN, k])
    hd = np.uint64(qs[dst]["hdr_len"])
    for k in range(n):
        put_used(qs, dst, np.int64(held[F_RX_ID, k]), hd + held[F_LEN, k], 1)
        put_used(qs, src, np.int64(held[F_TX_ID, k]), np.uint64(0), 1)


@inline_kernel
def _forward_batch(qs, counters, regions, src, dst, mode, burst, hold, one, s_hva, s_len, sc, ob, cap, busy, held):
    """Pop up to ``burst`` frames from TX vring ``src`` and forward, sink or drop them (``hold``:
    see ``_room``). A frame of the common kind takes ``_forward_one``: up to HELD of them are copied
    together (``_fill_forwarded``), before any frame the general path takes, so used elements stay
    in order."""
    capturing = cap[0][K_PORTS] != 0
    opened = busy[BUSY_OPEN] == 0
    if mode == MODE_FORWARD and hold > 0 and qs[dst]["held_since"] != 0 and _ready(qs, src) and _ready(qs, dst):
        # in a hold the receiver is looked at first, and the sender's lines (which its driver keeps
        # writing) are left alone while the hold lasts
        began = begin(qs, dst, burst)
        if began >= 0 and _room(qs, dst, began, burst, hold) == 0:
            _held(counters, dst, busy, False)
            return 0
    else:
        began = -1
    n = begin_batch(qs, counters, regions, src, burst, BUF_NONE if mode == MODE_SINK and not capturing else BUF_READ,
                    busy)
    if n <= 0:
        return n
    dst_ok = mode == MODE_FORWARD and _ready(qs, dst)
    limit = burst
    if dst_ok:
        b = began if began >= 0 else begin(qs, dst, burst)  # (a hold's first look already began it)
        if b < 0:
            _mark_broken(qs, counters, dst, -b)
            dst_ok = False
        else:
            limit = _room(qs, dst, b, burst, hold)
            if limit == 0:  # nothing popped: the frames wait in src for the receiver's buffers
                _held(counters, dst, busy, opened)
                return 0
            # only buffers already posted: taking the line the driver is refilling would stall it
            prefetch_batch(qs, dst, regions, min(b, burst), BUF_WRITE)
    dst_began = dst_ok
    done = 0
    sent = 0
    hl = np.uint64(qs[src]["hdr_len"])
    # the common case's own path: nothing to capture or log, full headers
    simple = dst_ok and not capturing and qs[dst]["log_base"] == 0 and hl >= 10 and qs[dst]["hdr_len"] >= 10
    n = 0  # frames held by _forward_one
    for _ in range(limit):
        if simple and dst_ok and _forward_one(qs, counters, regions, src, dst, hl, held, n):
            n += 1
            sent += 1
            done += 1
            if n == HELD:
                _fill_forwarded(qs, src, dst, held, n)
                n = 0
            continue
        _fill_forwarded(qs, src, dst, held, n)
        n = 0
        c = cursor(qs, src)
        ns, total, bid, ndesc = pop(qs, src, regions, 0, s_hva, s_len, 0)
        if ns == EMPTY:
            break
        if ns < 0:
            _mark_broken(qs, counters, src, -ns)
            break
        flen = total - hl if total >= hl else np.uint64(0)
        r = 0
        if total < hl:
            counters[src, C_ERRORS] += 1  # a runt without a full header: nothing to forward
        elif too_long(qs, src, s_hva, s_len, ns, hl, flen):
            counters[src, C_DROPS] += 1  # longer than the MTU the front-end set (or --mtu)
        else:
            if mode == MODE_FORWARD and dst_ok:
                # the frame is sent before its TX chain is given back, so one that must wait for
                # more RX buffers (a multi-buffer frame, mergeable) can stay in the TX ring
                r = _send(qs, counters, regions, dst, s_hva, s_len, ns, hl, flen, sc, ob)
                if r == NO_ROOM:
                    if hold > 0 and _holding(qs, dst, hold):
                        rollback(qs, src, c)
                        _held(counters, dst, busy, done == 0 and opened)
                        break
                    counters[dst, C_DROPS] += 1  # no hold, or held long enough
                    r = 0
            counters[src, C_PACKETS] += 1
            counters[src, C_BYTES] += flen
            if capturing:
                capture(cap[0], cap[1], cap[2], src, DIR_FROM_GUEST, s_hva, s_len, ns, hl, flen)
            if mode == MODE_FORWARD and not dst_ok and dst >= 0:
                counters[dst, C_DROPS] += 1
            elif r > 0:
                sent += 1
                if capturing:
                    capture(cap[0], cap[1], cap[2], dst, DIR_TO_GUEST, s_hva, s_len, ns, hl, flen)
            elif r < 0:
                _mark_broken(qs, counters, dst, -r)
                dst_ok = False
        put_used(qs, src, bid, 0, ndesc)
        done += 1
    _fill_forwarded(qs, src, dst, held, n)
    if sent > 0 and hold > 0:
        qs[dst]["held_since"] = 0  # a frame got through: any wait for dst's buffers is over
    finish_later(qs, src, counters)
    if dst_began:
        finish_later(qs, dst, counters)
    return done


@inline_kernel
def _number(d_hva, d_len, off, seq, sc):
    """Write ``seq``'s low 4 bytes (little-endian) at byte ``off`` of a frame already written into
    the pieces ``d_hva``/``d_len``, which hold at least ``off`` + 4 of its bytes (``sc``: scratch
    as ``new_scratch``'s, for a number that falls across two pieces).

    The source numbers each frame in the guest's buffer after copying the template there, not in
    the template before the copy: a copy that loads bytes stored just before cannot take them
    from the store buffer and waits until every older store is in the cache, here the previous
    frames' stores to lines the driver's core last read (rx burst 64 on the EPYC VM, cores ~330
    ns apart: 82-85 % of the source's time in that copy, 7.1-7.5 Mpps against DPDK's 10.2-10.8)."""
    i = 0
    o = off
    while o >= d_len[i]:
        o -= d_len[i]
        i += 1
    if o + np.uint64(4) <= d_len[i]:
        store_u32(d_hva[i] + o, np.uint32(seq & np.uint64(0xFFFFFFFF)))
        return
    _d_hva, _d_len, c_hva, c_len, _ids, _caps, _ndesc, hdr = sc  # across pieces (tiny RX buffers, mergeable)
    for b in range(4):
        hdr[b] = (seq >> np.uint64(8 * b)) & np.uint64(0xFF)
    c_hva[0] = np.uint64(hdr.ctypes.data)
    c_len[0] = np.uint64(4)
    _copy_frame(c_hva, c_len, 1, 0, d_hva, d_len, off, np.uint64(4))


@inline_kernel
def _fill_held(qs, dst, held, n, frame, numbered, used):
    """Copy ``frame`` into the ``n`` RX buffers ``_source_batch`` held back (``held``: rows AT, ID,
    NDESC, SEQ), number them, then put their used elements, in the order they were popped.

    One tight loop of copies, as DPDK's batched copy (do_data_copy_enqueue): the stores to lines
    the driver's core last read wait in the store buffer together, so their misses can overlap.
    One frame at a time, between pops and headers, they came one after another (rx at bursts
    32-64 with cores ~330 ns apart: 7.3-9.4 Mpps, DPDK 9.6-10.6; 10.7-12.9 so)."""
    src = np.uint64(frame.ctypes.data)
    flen = np.uint64(frame.shape[0])
    for k in range(n):
        copy_bytes(held[H_AT, k], src, flen)
    if numbered:
        for k in range(n):
            store_u32(held[H_AT, k] + np.uint64(SEQ_AT), np.uint32(held[H_SEQ, k] & np.uint64(0xFFFFFFFF)))
    for k in range(n):
        put_used(qs, dst, np.int64(held[H_ID, k]), used, np.int64(held[H_NDESC, k]))


@inline_kernel
def _source_batch(qs, counters, regions, dst, burst, one, frame, s_hva, s_len, sc, cap, busy, held):
    """Generate up to ``burst`` frames (``frame`` with a running sequence number) into RX vring ``dst``.

    A frame that fits its first RX buffer is held back (up to HELD of them) and copied with the
    others by ``_fill_held``; any other frame first fills those, so used elements stay in order."""
    a = begin_batch(qs, counters, regions, dst, burst, BUF_WRITE, busy)
    if a <= 0:
        return a
    s_hva[0] = np.uint64(frame.ctypes.data)
    s_len[0] = np.uint64(frame.shape[0])
    flen = np.uint64(frame.shape[0])
    numbered = flen >= np.uint64(SEQ_AT + 4)
    hl = np.uint64(qs[dst]["hdr_len"])
    need = hl + flen
    plain = qs[dst]["log_base"] == 0  # migrating: every frame goes through _fill, which logs the pages
    at = hl + np.uint64(SEQ_AT)  # where the frame's number lands in the RX chain
    d_hva, d_len = sc[0], sc[1]
    n = 0
    sent = 0
    for _ in range(burst):
        seq = counters[dst, C_PACKETS]
        r = _take(qs, regions, dst, need, sc, np.uint64(0), np.uint16(0))
        if r == 1 and plain and d_len[0] >= need:
            held[H_AT, n] = d_hva[0] + hl
            held[H_ID, n] = sc[4][0]
            held[H_NDESC, n] = sc[6][0]
            held[H_SEQ, n] = seq
            n += 1
            if n == HELD:
                _fill_held(qs, dst, held, n, frame, numbered, need)
                n = 0
        elif r > 0:
            _fill_held(qs, dst, held, n, frame, numbered, need)
            n = 0
            _fill(qs, regions, dst, s_hva, s_len, 1, 0, flen, sc, r)
            if numbered:
                _number(d_hva, d_len, at, seq, sc)
        elif r == 0 or r == NO_ROOM:
            break  # no room: the driver hasn't posted buffers yet (not a drop: nothing was sent)
        else:
            _mark_broken(qs, counters, dst, -r)
            break
        counters[dst, C_PACKETS] += 1
        counters[dst, C_BYTES] += flen
        sent += 1
        if cap[0][K_PORTS] != 0:
            if numbered:
                _number(s_hva, s_len, np.uint64(SEQ_AT), seq, sc)  # the template as delivered, for the capture
            capture(cap[0], cap[1], cap[2], dst, DIR_TO_GUEST, s_hva, s_len, 1, 0, flen)
    _fill_held(qs, dst, held, n, frame, numbered, need)
    finish_later(qs, dst, counters)
    return sent


def loop_scratch(nwatch: int, ostats: np.ndarray) -> tuple:
    """The arrays ``net_loop`` works in, made here so the loop itself is a kernel (no reference
    counting, so the batch steps inline into it): the eventfd value 1, a read buffer, pollfds for
    ``nwatch`` kick fds and the wake-up fd, TX pieces, ``new_scratch``, ``new_offload_scratch`` and
    the held frames of one batch (``_source_batch``, ``_forward_batch``)."""
    return (np.ones(1, np.uint64), np.zeros(1, np.uint64), np.zeros((nwatch + 1, 2), np.int32),
            np.zeros(MAX_SEGS, np.uint64), np.zeros(MAX_SEGS, np.uint64), new_scratch(), new_offload_scratch(ostats),
            np.zeros((5, HELD), np.uint64))


@kernel
def net_loop(ctrl, qs, counters, regions, links, rows, watch, frame, burst, hold, polls, busy, cap, scratch):
    """The net data plane: run every link, round after round, until told to stop.

    Self-measurement (as testpmd's --record-burst-stats / --record-core-cycles): polls[n]
    counts polls of a ready ring that found n frames (n capped at burst); busy[] the cycles of
    busy rounds (from the first poll that found work to the end of the next round's call
    decisions) and the frames they moved. ``rows``: the rings the links publish to, whose call
    decisions each round settles at its start (ring.finish_later).
    """
    one, buf, pollfds, s_hva, s_len, sc, ob, held = scratch
    idle = 0
    while running(ctrl):
        flush_calls(qs, rows, counters, one)
        busy_ends(busy)  # the last round's work ends with its call decisions
        work = 0
        for li in range(links.shape[0]):
            src = links[li, 0]
            dst = links[li, 1]
            mode = links[li, 2]
            if mode == MODE_SOURCE:
                done = _source_batch(qs, counters, regions, dst, burst, one, frame, s_hva, s_len, sc, cap, busy,
                                     held)
            else:
                done = _forward_batch(qs, counters, regions, src, dst, mode, burst, hold, one, s_hva, s_len, sc, ob,
                                      cap, busy, held)
            work += account_poll(polls, busy, burst, done)
        idle = end_round(ctrl, qs, watch, pollfds, buf, work, idle)  # sleeps only after a round with no work
    flush_calls(qs, rows, counters, one)  # nothing left undecided while the control plane has the rings
    busy_ends(busy)


def offloads_taken(features: int) -> int:
    """The OFF_* bits of a driver's negotiated features: what its RX vrings take as-is.
    GSO needs GUEST_CSUM too (§5.1.3.1), so without it nothing is taken."""
    if not features & F.NET_GUEST_CSUM:
        return 0
    off = OFF_CSUM
    off |= OFF_TSO4 if features & F.NET_GUEST_TSO4 else 0
    off |= OFF_TSO6 if features & F.NET_GUEST_TSO6 else 0
    off |= OFF_ECN if features & F.NET_GUEST_ECN else 0
    return off


@njit(nogil=True, cache=True)
def inject(qs, counters, regions, dst, frame, cap):
    """Deliver ``frame`` (no virtio header) into RX vring ``dst`` as one batch, from the control
    plane with the data plane paused (SEND_RARP). Returns chains used, 0 (dropped) or -1."""
    if not _ready(qs, dst):
        return -1
    b = begin(qs, dst, 1)
    if b < 0:
        _mark_broken(qs, counters, dst, -b)
        return -1
    one = np.ones(1, np.uint64)
    s_hva = np.full(1, np.uint64(frame.ctypes.data), np.uint64)
    s_len = np.full(1, np.uint64(frame.shape[0]), np.uint64)
    flen = np.uint64(frame.shape[0])
    r = _deliver_slow(qs, regions, dst, s_hva, s_len, 1, 0, flen, new_scratch(), np.uint64(0), np.uint16(0))
    if r == NO_ROOM:
        r = 0
    if r > 0:
        counters[dst, C_PACKETS] += 1
        counters[dst, C_BYTES] += flen
        if cap[0][K_PORTS] != 0:
            capture(cap[0], cap[1], cap[2], dst, DIR_TO_GUEST, s_hva, s_len, 1, 0, flen)
    elif r == 0:
        counters[dst, C_DROPS] += 1
    else:
        _mark_broken(qs, counters, dst, -r)
    finish(qs, dst, counters, one)
    return r


def rarp_frame(mac: bytes) -> np.ndarray:
    """The broadcast RARP request a migrated guest's MAC is announced with (as DPDK's
    make_rarp_packet and QEMU's announce_self): switches learn ``mac`` from its source."""
    eth = b"\xff" * 6 + mac + b"\x80\x35"  # ETH_P_RARP
    # htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, op 3 (reverse request); sender = target = mac
    arp = b"\x00\x01\x08\x00\x06\x04\x00\x03" + mac + bytes(4) + mac + bytes(4)
    return np.frombuffer((eth + arp).ljust(60, b"\x00"), np.uint8).copy()


def test_frame(size: int) -> np.ndarray:
    """A broadcast Ethernet/IPv4/UDP frame of ``size`` bytes (the source mode's template)."""
    size = max(size, 60)
    f = np.zeros(size, dtype=np.uint8)
    f[0:6] = 0xFF
    f[6:12] = (0x02, 0, 0, 0, 0, 0x01)
    f[12:14] = (0x08, 0x00)
    ip_len = size - 14
    f[14:24] = (0x45, 0, ip_len >> 8, ip_len & 0xFF, 0, 0, 0, 0, 64, 17)
    f[26:34] = (10, 0, 0, 1, 10, 0, 0, 2)
    f[34:38] = (0x04, 0xD2, 0x16, 0x2E)
    udp_len = size - 34
    f[38:40] = (udp_len >> 8, udp_len & 0xFF)
    return f


class NetDevice(Device):
    """vring net: ``len(sockets)`` ports of ``queues`` queue pairs each, joined by ``mode``."""

    kind = "net"

    def __init__(self, nports: int, mode: str, queues: int = 1, frame_size: int = 64, burst: int = 32,
                 idle_rounds: int = 20000, cpus: list[int] | None = None, disable: int = 0, mtu: int = 0,
                 port_disable: dict[int, int] | None = None, hold_us: float = HOLD_US):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode == "xconnect" and nports != 2:
            raise ValueError("xconnect needs exactly two ports")
        super().__init__(nports, 2 * queues)
        self._init_mtu(mtu)
        self.mode = mode
        self.queues = queues
        self.burst = burst
        if hold_us < 0:
            raise ValueError("hold must be >= 0 microseconds")
        self.hold_cycles = 0
        if hold_us > 0:
            from vring.ordering_calibrate import ns_per_cycle

            self.hold_cycles = max(1, int(hold_us * 1000 / ns_per_cycle()))
        self.features = int(NET_FEATURES | (F.NET_MQ if queues > 1 else 0)) & ~disable
        self.port_disable = dict(port_disable or {})  # port -> features not offered there only
        if any(not 0 <= p < nports for p in self.port_disable):
            raise ValueError(f"--disable PORT=...: ports are 0..{nports - 1}")
        self.protocol_features = int(NET_PROTOCOL_FEATURES)
        self.frame = test_frame(frame_size)
        self.links = self._links()
        watch = sorted({int(s) for s, _, m in self.links if m != MODE_SOURCE and s >= 0}
                       | {int(d) for _, d, m in self.links if m == MODE_SOURCE})
        self.watch = np.array(watch, dtype=np.int64)
        self.rows = np.array(sorted({int(r) for r in self.links[:, :2].ravel() if r >= 0}), dtype=np.int64)
        self.cap = no_capture()  # replaced by PcapDrain.arrays() with --pcap (before start)
        self.polls = np.zeros(burst + 1, np.int64)
        self.busy = np.zeros(BUSY_SIZE, np.uint64)
        self.ostats = np.zeros(len(OSTAT_NAMES), np.uint64)
        self.scratch = loop_scratch(len(self.watch), self.ostats)
        self.worker = Worker("net", net_loop, self._args, idle_rounds=idle_rounds, cpus=cpus)

    def _links(self) -> np.ndarray:
        rx = lambda p, k: self.row(p, 2 * k)  # noqa: E731
        tx = lambda p, k: self.row(p, 2 * k + 1)  # noqa: E731
        links = []
        for k in range(self.queues):
            for p in range(self.nports):
                if self.mode == "xconnect":
                    links.append((tx(p, k), rx(1 - p, k), MODE_FORWARD))
                elif self.mode == "loopback":
                    links.append((tx(p, k), rx(p, k), MODE_FORWARD))
                elif self.mode == "sink":
                    links.append((tx(p, k), -1, MODE_SINK))
                else:
                    links.append((tx(p, k), -1, MODE_SINK))  # drain what the driver sends
                    links.append((-1, rx(p, k), MODE_SOURCE))
        return np.array(links, dtype=np.int64).reshape(-1, 3)

    def _args(self) -> tuple:
        return (self.qstate, self.counters, self.regions, self.links, self.rows, self.watch, self.frame, self.burst,
                self.hold_cycles, self.polls, self.busy, self.cap, self.scratch)

    def poll_stats(self) -> dict[str, float]:
        """Share of empty polls, and cycles (and ns) per frame in the rounds that found work. The
        loop keeps counting meanwhile: the counts are copied once, so the shares add up."""
        from vring.ordering_calibrate import ns_per_cycle

        polls, busy = self.polls.copy(), self.busy.copy()
        total = int(polls.sum())
        cyc = busy_per_frame(busy)
        return {
            "polls": total,
            "empty": int(polls[0]),  # raw counts too, so a reader can difference two samples
            "frames": int(busy[BUSY_FRAMES]),
            "busy_cycles": int(busy[BUSY_CYCLES]),  # of the timed busy rounds (dataplane.BUSY_SAMPLE)
            "timed_frames": int(busy[BUSY_TIMED_FRAMES]),
            "empty_share": float(polls[0]) / total if total else 0.0,
            "full_share": float(polls[-1]) / total if total else 0.0,
            "cycles_per_frame": cyc,
            "ns_per_frame": cyc * ns_per_cycle(),
        }

    def queue_num(self) -> int:
        return self.queues  # virtio-net counts queue pairs (as DPDK and QEMU do)

    def port_features(self, port: int) -> int:
        return self.features & ~self.port_disable.get(port, 0)

    def compile(self) -> None:
        # the SEND_RARP path too: compiled on first use it could take longer than a front-end waits
        inject(self.qstate, self.counters, self.regions, -1, rarp_frame(bytes(6)), self.cap)
        super().compile()

    def announce(self, port: int, mac: bytes) -> bool:
        """SEND_RARP: send a RARP frame from ``mac`` where a frame sent on ``port`` would go."""
        frame = rarp_frame(mac)
        tx = self.row(port, 1)
        with self.paused():
            for src, dst, mode in self.links:
                if src == tx and mode == MODE_FORWARD:
                    inject(self.qstate, self.counters, self.regions, int(dst), frame, self.cap)
        return True

    def setup_queue(self, row: int, features: int) -> None:
        v1 = features & (F.VERSION_1 | F.NET_MRG_RXBUF)
        self.qstate[row]["hdr_len"] = HDR_LEN_V1 if v1 else HDR_LEN_LEGACY
        self.qstate[row]["mrg_rxbuf"] = 1 if features & F.NET_MRG_RXBUF else 0
        mtu = self.port_mtu(row // self.nvq)
        self.qstate[row]["max_frame"] = mtu + ETH_HLEN if mtu else 0
        self.qstate[row]["net_offload"] = offloads_taken(features)

    # ---- MTU: --mtu for every port, NET_SET_MTU for one connection ----
    def _init_mtu(self, mtu: int) -> None:
        if mtu and not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU must be {MIN_MTU}..{MAX_MTU}")
        self.mtu = mtu
        self.set_mtus = [0] * self.nports  # NET_SET_MTU of each port's current front-end

    def port_mtu(self, port: int) -> int:
        """The MTU frames from ``port`` are held to: its front-end's NET_SET_MTU, else --mtu (0: none)."""
        return self.set_mtus[port] or self.mtu

    def set_mtu(self, port: int, mtu: int) -> bool:
        with self.paused():
            self.set_mtus[port] = mtu
            for row in range(self.row(port, 0), self.row(port, self.nvq)):
                self.qstate[row]["max_frame"] = mtu + ETH_HLEN
        return True

    def disconnected(self, port: int) -> None:
        self.set_mtus[port] = 0  # the next front-end says its own

    def get_config(self, port: int, offset: int, size: int) -> bytes | None:
        """struct virtio_net_config (§5.1.4): mac[6] (none offered: zero), status (LINK_UP),
        max_virtqueue_pairs, mtu; the rest zero."""
        cfg = bytes(6) + (1).to_bytes(2, "little") + self.queues.to_bytes(2, "little") \
            + (self.port_mtu(port) or DEFAULT_MTU).to_bytes(2, "little")
        if offset < 0 or size < 0 or offset + size > 256:
            return None
        return (cfg + bytes(256))[offset : offset + size]

    def offload_stats(self) -> dict[str, int]:
        """Frames whose offload request was passed through (partial checksum only, or TCP
        super-frames), completed (checksums, super-frames segmented and the segments they became)
        or dropped as bad (devices.offload)."""
        return {n: int(v) for n, v in zip(OSTAT_NAMES, self.ostats, strict=True)}

    def sample_extra(self) -> dict:
        return {"offload": self.offload_stats()}

    def summary_lines(self) -> list[str]:
        return ["offload: " + " ".join(f"{k}={v}" for k, v in self.offload_stats().items())]

    def port_counters(self, port: int) -> dict[str, int]:
        """rx = frames delivered to the driver, tx = frames taken from it, drops = frames lost toward it,
        held = polls that left frames in the sending ring while this driver had no RX buffer."""
        rows = range(self.row(port, 0), self.row(port, self.nvq))
        c = self.counters
        rx_rows = [r for r in rows if (r - self.row(port, 0)) % 2 == 0]
        tx_rows = [r for r in rows if (r - self.row(port, 0)) % 2 == 1]
        return {
            "rx_packets": int(sum(c[r, C_PACKETS] for r in rx_rows)),
            "rx_bytes": int(sum(c[r, C_BYTES] for r in rx_rows)),
            "rx_dropped": int(sum(c[r, C_DROPS] for r in rx_rows)),
            "rx_held": int(sum(c[r, C_HELD] for r in rx_rows)),  # polls that left frames waiting for a buffer
            "tx_packets": int(sum(c[r, C_PACKETS] for r in tx_rows)),
            "tx_bytes": int(sum(c[r, C_BYTES] for r in tx_rows)),
            "tx_dropped": int(sum(c[r, C_DROPS] for r in tx_rows)),  # longer than the MTU
            "errors": int(sum(c[r, C_ERRORS] for r in rows)),
        }
