"""Split virtqueue layout (virtio 1.x §2.7) as numpy dtypes, and the queue-state record.

The kernels address rings through host addresses with the offsets below; Python code
(the in-tree front-end, inspection, tests) views the same bytes with the dtypes.
"""
from __future__ import annotations

import numpy as np

# descriptor flags
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
# ring flags
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
USED_ELEM = np.dtype([("id", "<u4"), ("len", "<u4")])
DESC_SIZE = 16
USED_ELEM_SIZE = 8
MAX_QUEUE_SIZE = 32768


def avail_dtype(size: int) -> np.dtype:
    return np.dtype([("flags", "<u2"), ("idx", "<u2"), ("ring", "<u2", (size,)), ("used_event", "<u2")])


def used_dtype(size: int) -> np.dtype:
    return np.dtype([("flags", "<u2"), ("idx", "<u2"), ("ring", USED_ELEM, (size,)), ("avail_event", "<u2")])


def desc_bytes(size: int) -> int:
    return DESC_SIZE * size


def avail_bytes(size: int) -> int:
    return 6 + 2 * size


def used_bytes(size: int) -> int:
    return 6 + USED_ELEM_SIZE * size


# Alignment the spec requires of each part (§2.7): descriptor table 16, avail 2, used 4.
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

# Per-queue state shared by the control plane and the kernels (field names follow the spec).
SHADOW = 64  # used elements a batch keeps before writing them to the ring (vring.packed/split.put_used)

QSTATE = np.dtype(
    [
        ("size", "<u4"),
        ("ready", "<u4"),  # 1: the data plane may touch this ring
        ("desc", "<u8"),  # host addresses of the three parts, validated when the ring starts
        ("avail", "<u8"),
        ("used", "<u8"),
        ("last_avail_idx", "<u4"),  # u16 values kept in u32 fields
        ("used_idx", "<u4"),
        ("signalled_used", "<u4"),
        ("signalled_valid", "<u4"),
        ("event_idx", "<u4"),
        ("mem", "<u4"),  # which region table (port) this ring's addresses go through
        ("call_fd", "<i4"),
        ("kick_fd", "<i4"),
        ("broken", "<u4"),  # 0 or a BROKEN_* reason code
        ("hdr_len", "<u4"),  # device-specific: virtio-net header length
        ("mrg_rxbuf", "<u4"),
        ("net_offload", "<u4"),  # virtio-net RX: offloads the driver takes as-is (devices.offload OFF_*)
        ("kicks_on", "<u4"),  # 1 while we asked the driver for kicks (idle sleep)
        ("packed", "<u4"),  # 1: packed ring (VIRTIO_F_RING_PACKED), 0: split
        ("avail_wrap", "<u4"),  # packed: the driver's wrap counter at last_avail_idx
        ("used_wrap", "<u4"),  # packed: our wrap counter at used_idx
        # the batch being built (vring.ring): tentative pops and pending used elements
        ("t_count", "<u4"),  # split: chains popped; packed: descriptors popped
        ("t_idx", "<u4"),  # packed: position after the popped chains
        ("t_wrap", "<u4"),
        ("avail_cache", "<u4"),  # split: chains known available at t_count=0
        ("u_count", "<u4"),  # used elements pending
        ("u_idx", "<u4"),  # packed: position of the next used element
        ("u_wrap", "<u4"),
        ("head_flags", "<u4"),  # packed: flags of the batch's first used element, stored last
        ("head_addr", "<u8"),
        ("in_order", "<u4"),  # VIRTIO_F_IN_ORDER negotiated (packed: a batch's zero-length elements go as one)
        ("u_merged", "<u4"),  # packed: every pending used element so far is folded into the batch's first
        # the batch's used elements, kept here and written to the ring together at publish
        # (packed: or when SHADOW fills up; split: past SHADOW, as they come) rather than one by one
        ("sh_n", "<u4"),
        ("sh_head", "<u4"),  # 1: sh_*[0] is the batch's first element (its flags are stored last)
        ("sh_pos", "<u2", (SHADOW,)),
        ("sh_id", "<u2", (SHADOW,)),
        ("sh_flags", "<u2", (SHADOW,)),
        ("sh_len", "<u4", (SHADOW,)),
        ("call_pending", "<u4"),  # published, the call decision left to flush_calls (vring.ring)
        ("held_since", "<u8"),  # RX (net): cycle count when a TX ring's frames began waiting for room here, 0: none
        # in-flight tracking (vring.inflight): host address of this queue's region, 0 = not tracked
        ("inflight", "<u8"),
        ("inflight_counter", "<u8"),
        ("max_frame", "<u4"),  # virtio-net TX: longest frame accepted (MTU + 14), 0: no limit
        # live migration (vring.dirtylog): while the front-end logs (VHOST_F_LOG_ALL + a log from
        # SET_LOG_BASE), every byte we write into guest memory marks its 4 KiB page in the log
        ("log_base", "<u8"),  # host address of the dirty bitmap, 0 while logging is off
        ("log_size", "<u8"),  # its length in bytes: pages beyond size * 8 are not logged (log_miss)
        ("log_used", "<u8"),  # guest-physical address of the part of the ring we write (split: used ring)
        ("log_desc", "<u8"),  # packed: guest-physical address of the descriptor ring (written back)
        ("log_ring", "<u4"),  # 1: log ring writes too (SET_VRING_ADDR flag VHOST_VRING_F_LOG)
        ("log_miss", "<u4"),  # writes that could not be logged (page beyond the log, address unmapped)
    ],
    align=True,
)

# Per-queue counters: one uint64 row per queue.
C_PACKETS, C_BYTES, C_DROPS, C_CALLS, C_ERRORS, C_BATCHES, C_HELD = range(7)
COUNTER_NAMES = ("packets", "bytes", "drops", "calls", "errors", "batches", "held")
N_COUNTERS = len(COUNTER_NAMES)


# Packed ring (virtio 1.x §2.8)
PACKED_DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
EVENT_SUPPRESS = np.dtype([("off_wrap", "<u2"), ("flags", "<u2")])
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_DESC = 0, 1, 2


def new_qstate(n: int) -> np.ndarray:
    q = np.zeros(n, dtype=QSTATE)
    q["call_fd"] = -1
    q["kick_fd"] = -1
    return q
