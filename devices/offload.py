"""virtio-net offloads completed in software: checksums and TCP segmentation (virtio 1.x §5.1.6).

A driver that negotiated CSUM / HOST_TSO4 / HOST_TSO6 may send a frame whose checksum is only
partial (``flags`` NEEDS_CSUM: the sum from ``csum_start`` to the end goes at ``csum_start +
csum_offset``) or a TCP "super-frame" of up to 64 KiB to be cut into ``gso_size`` payloads.
When the receiving port negotiated the matching GUEST_* features the header is passed through
unchanged (devices.net); otherwise the kernels here finish the work, as a software switch does.

Threat model: the frame and its virtio_net_hdr come from an untrusted driver. The caller first
copies the frame into a private buffer (so the guest cannot change it while we read it), then
every offset read from the header or the frame (csum_start/offset, Ethernet/IP/TCP header
lengths, gso_size) is checked against the frame length here before it indexes anything: these
kernels run without bounds checks. A check that fails returns a negative BAD_* code: the caller
drops and counts the frame. hdr_len is not used: Linux sets it to the linear part's length,
not the header length, so the headers are parsed from the frame.
"""
from __future__ import annotations

import numpy as np

from vring.jit import kernel
from vring.ordering import copy_bytes

# virtio_net_hdr (§5.1.6): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset[, num_buffers]
HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 0, 1, 3, 4
GSO_ECN = 0x80

# what a receiving port accepts as-is (qstate "net_offload", from its negotiated GUEST_* features)
OFF_CSUM, OFF_TSO4, OFF_TSO6, OFF_ECN = 1, 2, 4, 8

FRAME_MAX = 65536 + 256  # largest frame the kernels take: a 64 KiB IP packet plus L2 headers
MAX_GSO_SEGS = 512  # segments one super-frame may become (64 KiB at a 128-byte MSS)

BAD_CSUM_RANGE = 1  # csum_start / csum_offset outside the frame
BAD_TOO_BIG = 2  # frame longer than FRAME_MAX
BAD_GSO_TYPE = 3  # a gso_type we did not offer (UDP, unknown)
BAD_GSO_SIZE = 4  # gso_size 0, or too many segments, or a segment over 64 KiB
BAD_L3 = 5  # not IPv4 / IPv6 carrying TCP, or its header outside the frame
BAD_L4 = 6  # TCP header outside the frame

# offload statistics (NetDevice.ostats)
O_CSUM_PASSED, O_GSO_PASSED, O_CSUM, O_GSO, O_SEGMENTS, O_BAD = range(6)
OSTAT_NAMES = ("csum_passed", "gso_passed", "csum_completed", "gso_segmented", "segments", "bad")

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80


@kernel
def needs(flags, gso_type):
    """The OFF_* bits a receiver must have to take this header as-is (0: nothing to offload)."""
    n = 0
    if flags & HDR_F_NEEDS_CSUM:
        n |= OFF_CSUM
    g = gso_type & 0x7F
    if g == GSO_TCPV4:
        n |= OFF_CSUM | OFF_TSO4
    elif g == GSO_TCPV6:
        n |= OFF_CSUM | OFF_TSO6
    elif g != GSO_NONE:
        n |= 0x100  # UDP (UFO) or unknown: never accepted as-is, never offered
    if g != GSO_NONE and gso_type & GSO_ECN:
        n |= OFF_ECN
    return n


@kernel
def csum_add(buf, start, end, acc):
    """acc + the big-endian 16-bit words of buf[start:end] (an odd last byte is padded with 0).
    The caller guarantees 0 <= start <= end <= len(buf)."""
    i = start
    while i + 1 < end:
        acc += (np.uint64(buf[i]) << np.uint64(8)) | np.uint64(buf[i + 1])
        i += 2
    if i < end:
        acc += np.uint64(buf[i]) << np.uint64(8)
    return acc


@kernel
def csum_fold(acc):
    """The ones'-complement of the folded 16-bit sum (RFC 1071): the value to store."""
    while acc >> np.uint64(16):
        acc = (acc & np.uint64(0xFFFF)) + (acc >> np.uint64(16))
    return np.uint16(np.uint64(0xFFFF) - acc)


@kernel
def _put16(buf, at, v):
    buf[at] = (v >> 8) & 0xFF
    buf[at + 1] = v & 0xFF


@kernel
def _copy(dst, d0, src, s0, n):
    """dst[d0:d0+n] = src[s0:s0+n] (a slice assignment may allocate: kernels run without NRT)."""
    if n > 0:
        copy_bytes(np.uint64(dst.ctypes.data) + np.uint64(d0), np.uint64(src.ctypes.data) + np.uint64(s0), np.uint64(n))


@kernel
def _get16(buf, at):
    return (np.int64(buf[at]) << 8) | np.int64(buf[at + 1])


@kernel
def complete_csum(buf, flen, start, offset):
    """NEEDS_CSUM done here: sum buf[start:flen] (the driver left the pseudo-header sum in the
    checksum field) and store it at start + offset. Returns 0 or -BAD_CSUM_RANGE."""
    flen = np.int64(flen)
    start = np.int64(start)
    offset = np.int64(offset)
    # §5.1.6.2: csum_start and csum_offset must leave room for the 2-byte field inside the frame
    if flen > buf.shape[0] or start >= flen or offset > flen - start - 2:
        return -BAD_CSUM_RANGE
    c = csum_fold(csum_add(buf, start, flen, np.uint64(0)))
    if c == 0 and offset == 6:
        c = np.uint16(0xFFFF)  # UDP: 0 means "no checksum"; send its ones'-complement twin
    _put16(buf, start + offset, c)
    return 0


@kernel
def parse_tcp(buf, flen, gso_type):
    """Locate the headers of a TCP super-frame: (l3, l4, payload offset, is_v6) or (-BAD_*, 0, 0, 0).

    Ethernet with up to two VLAN tags, then IPv4 (any IHL) or IPv6 without extension headers,
    then TCP; each header must lie inside buf[:flen], and the IP version must match gso_type."""
    flen = np.int64(flen)
    g = gso_type & 0x7F
    if g != GSO_TCPV4 and g != GSO_TCPV6:
        return -BAD_GSO_TYPE, 0, 0, 0
    l3 = np.int64(14)
    if flen < l3:
        return -BAD_L3, 0, 0, 0
    et = _get16(buf, 12)
    for _ in range(2):
        if et != ETH_P_8021Q and et != ETH_P_8021AD:
            break
        if flen < l3 + 4:
            return -BAD_L3, 0, 0, 0
        et = _get16(buf, l3 + 2)
        l3 += 4
    v6 = 0
    if g == GSO_TCPV4:
        if et != ETH_P_IP or flen < l3 + 20 or buf[l3] >> 4 != 4 or buf[l3 + 9] != 6:
            return -BAD_L3, 0, 0, 0
        ihl = np.int64(buf[l3] & 0xF) * 4
        if ihl < 20 or flen < l3 + ihl:
            return -BAD_L3, 0, 0, 0
        l4 = l3 + ihl
    else:
        if et != ETH_P_IPV6 or flen < l3 + 40 or buf[l3] >> 4 != 6 or buf[l3 + 6] != 6:
            return -BAD_L3, 0, 0, 0
        l4 = l3 + 40
        v6 = 1
    if flen < l4 + 20:
        return -BAD_L4, 0, 0, 0
    doff = np.int64(buf[l4 + 12] >> 4) * 4
    if doff < 20 or flen < l4 + doff:
        return -BAD_L4, 0, 0, 0
    return l3, l4, l4 + doff, v6


@kernel
def gso_plan(buf, flen, gso_type, gso_size, out_cap):
    """Check a TCP super-frame and count its segments: (nseg, l3, l4, payload offset, is_v6), or
    (-BAD_*, 0, 0, 0, 0). ``out_cap``: the size of the buffer segments are built in."""
    flen = np.int64(flen)
    mss = np.int64(gso_size)
    if flen > buf.shape[0]:
        return -BAD_TOO_BIG, 0, 0, 0, 0
    l3, l4, hdrs, v6 = parse_tcp(buf, flen, gso_type)
    if l3 < 0:
        return l3, 0, 0, 0, 0
    if mss == 0 or hdrs + mss > out_cap or hdrs + mss - l3 > 0xFFFF:
        return -BAD_GSO_SIZE, 0, 0, 0, 0
    pay = flen - hdrs
    nseg = max((pay + mss - 1) // mss, 1)
    if nseg > MAX_GSO_SEGS:
        return -BAD_GSO_SIZE, 0, 0, 0, 0
    return nseg, l3, l4, hdrs, v6


@kernel
def make_segment(buf, flen, l3, l4, hdrs, v6, mss, i, nseg, out):
    """Build segment i of nseg (planned by ``gso_plan``) in ``out``; returns its length.

    Headers copied from the super-frame, then: IPv4 total length, id + i and header checksum, or
    IPv6 payload length; TCP sequence number + i * mss; FIN and PSH only on the last segment,
    CWR only on the first; the TCP checksum over the pseudo-header and the segment.
    Returns the segment's length, or -BAD_GSO_SIZE if the arguments are not a plan's."""
    flen = np.int64(flen)
    mss = np.int64(mss)
    if hdrs + mss > out.shape[0] or flen > buf.shape[0] or i < 0 or i >= nseg:
        return -BAD_GSO_SIZE  # not as gso_plan planned it: touch nothing
    p0 = hdrs + i * mss
    plen = min(mss, flen - p0)
    if plen < 0:
        plen = 0
    n = hdrs + plen
    _copy(out, 0, buf, 0, hdrs)
    _copy(out, hdrs, buf, p0, plen)
    tcp_len = n - l4
    if v6:
        _put16(out, l3 + 4, n - l3 - 40)
    else:
        _put16(out, l3 + 2, n - l3)
        _put16(out, l3 + 4, (_get16(buf, l3 + 4) + i) & 0xFFFF)
        _put16(out, l3 + 10, 0)
        _put16(out, l3 + 10, csum_fold(csum_add(out, l3, l4, np.uint64(0))))
    seq = ((np.int64(buf[l4 + 4]) << 24) | (np.int64(buf[l4 + 5]) << 16) | (np.int64(buf[l4 + 6]) << 8)
           | np.int64(buf[l4 + 7]))
    seq = (seq + i * mss) & 0xFFFFFFFF
    out[l4 + 4] = (seq >> 24) & 0xFF
    out[l4 + 5] = (seq >> 16) & 0xFF
    out[l4 + 6] = (seq >> 8) & 0xFF
    out[l4 + 7] = seq & 0xFF
    fl = buf[l4 + 13]
    if i != nseg - 1:
        fl &= ~np.uint8(TCP_FIN | TCP_PSH)
    if i != 0:
        fl &= ~np.uint8(TCP_CWR)
    out[l4 + 13] = fl
    _put16(out, l4 + 16, 0)
    # pseudo-header (RFC 793 / RFC 8200 §8.1): addresses, protocol, TCP length
    if v6:
        acc = csum_add(out, l3 + 8, l3 + 40, np.uint64(6 + tcp_len))
    else:
        acc = csum_add(out, l3 + 12, l3 + 20, np.uint64(6 + tcp_len))
    _put16(out, l4 + 16, csum_fold(csum_add(out, l4, n, acc)))
    return n
