"""virtio-vsock wire format (virtio 1.2 §5.10) and the jitted ring helpers the vsock data plane uses.

The packet header is 44 bytes, little-endian, packed::

    le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len,
    le16 type, le16 op, le32 flags, le32 buf_alloc, le32 fwd_cnt
"""
from __future__ import annotations

import struct

import numpy as np
from numba import njit

from vring.layout import C_ERRORS
from vring.split import avail_count, avail_head, call, publish_used, put_used, walk_chain

HDR = struct.Struct("<QQIIIHHIII")
HDR_LEN = HDR.size  # 44
assert HDR_LEN == 44
EVENT = struct.Struct("<I")

HOST_CID = 2
VMADDR_CID_ANY = 0xFFFFFFFF
RESERVED_CIDS = (0, 1, 2, VMADDR_CID_ANY)

TYPE_STREAM = 1
TYPE_SEQPACKET = 2

OP_INVALID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(8)
OP_NAMES = ("INVALID", "REQUEST", "RESPONSE", "RST", "SHUTDOWN", "RW", "CREDIT_UPDATE", "CREDIT_REQUEST")

SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SEQ_EOM = 1
SEQ_EOR = 2

EVENT_TRANSPORT_RESET = 0
F_SEQPACKET = 1 << 1  # VIRTIO_VSOCK_F_SEQPACKET

MAX_PKT_PAYLOAD = 64 * 1024  # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest payload a driver sends

# queue-broken reason codes of the vsock device (the split kernels use 1..11, the session 100)
BROKEN_RX_CHAIN_SHORT = 120  # a receive chain too small for the 44-byte header
BROKEN_EVENT_CHAIN_SHORT = 121

# info slots filled by peek_chain
I_HEAD, I_TOTAL, I_NSEG = range(3)


@njit(nogil=True, cache=True)
def mark_broken(qs, counters, q, code):
    if not qs[q]["broken"]:
        qs[q]["broken"] = code
    counters[q, C_ERRORS] += 1


@njit(nogil=True, cache=True)
def peek_chain(qs, counters, regions, q, writable, seg_hva, seg_len, info):
    """Map the next available chain of vring ``q`` without consuming it.

    1: mapped (head, total bytes, piece count in ``info``, pieces in seg_*); 0: nothing available
    or the ring isn't usable; -1: the driver broke the ring (it is marked broken here).
    """
    if not qs[q]["ready"] or qs[q]["broken"]:
        return 0
    n = avail_count(qs, q)
    if n < 0:
        mark_broken(qs, counters, q, -n)
        return -1
    if n == 0:
        return 0
    head = avail_head(qs, q, 0)
    if head < 0:
        mark_broken(qs, counters, q, -head)
        return -1
    ns, total = walk_chain(qs, q, regions, head, writable, seg_hva, seg_len, 0)
    if ns < 0:
        mark_broken(qs, counters, q, -ns)
        return -1
    info[I_HEAD] = head
    info[I_TOTAL] = total
    info[I_NSEG] = ns
    return 1


@njit(nogil=True, cache=True)
def commit_chain(qs, q, head, length):
    """Return the chain peeked last to the driver with ``length`` bytes written."""
    put_used(qs, q, 0, head, length)
    publish_used(qs, q, 1, 1)


@njit(nogil=True, cache=True)
def notify(qs, counters, q, one):
    if qs[q]["ready"]:
        call(qs, q, counters, one)


def warm_up_kernels() -> None:
    """Compile (or load from numba's cache) the helpers before a front-end is served."""
    from vring.layout import N_COUNTERS, new_qstate
    from vring.memory import MAX_REGIONS

    qs = new_qstate(1)
    counters = np.zeros((1, N_COUNTERS), np.uint64)
    regions = np.zeros((1, MAX_REGIONS, 4), np.uint64)
    seg = np.zeros(4, np.uint64)
    info = np.zeros(3, np.int64)
    peek_chain(qs, counters, regions, 0, 0, seg, seg.copy(), info)
    notify(qs, counters, 0, np.ones(1, np.uint64))
    mark_broken(qs, counters, 0, 0)
    # commit_chain would write to the (null) ring: compile it without running it
    from numba import typeof, types

    commit_chain.compile((typeof(qs), types.int64, types.int64, types.int64))
