"""vhost-user wire format: request numbers, feature bits, payload dtypes and the request table.

Reference: QEMU docs/interop/vhost-user.rst. The table ``REQUESTS`` says, for each
front-end request, which payload it carries, how many fds it may carry and whether
the back-end answers it. ``check_header`` applies those rules once, before any handler.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
HEADER_SIZE = 12
MAX_FDS = 8  # spec: at most 8 fds in one message
MAX_PAYLOAD = 4096  # larger than any payload vring accepts; bigger means a broken stream
VRING_NOFD = 1 << 8  # SET_VRING_KICK/CALL/ERR: no fd (polling)
VRING_IDX_MASK = 0xFF
VRING_F_LOG = 1 << 0  # SET_VRING_ADDR flags: log used-ring writes at log_guest_addr
MAX_MEM_REGIONS = 8  # SET_MEM_TABLE carries at most 8 regions
MIN_MTU, MAX_MTU = 68, 65535  # NET_SET_MTU: IPv4's minimum; virtio_net_config.mtu is a u16


class Req(enum.IntEnum):
    """Front-end → back-end requests."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class F(enum.IntFlag):
    """Virtio feature bits (device-independent and virtio-net) as masks."""

    NET_CSUM = 1 << 0
    NET_GUEST_CSUM = 1 << 1
    NET_MTU = 1 << 3
    NET_MAC = 1 << 5
    NET_GSO = 1 << 6
    NET_GUEST_TSO4 = 1 << 7
    NET_GUEST_TSO6 = 1 << 8
    NET_GUEST_ECN = 1 << 9
    NET_GUEST_UFO = 1 << 10
    NET_HOST_TSO4 = 1 << 11
    NET_HOST_TSO6 = 1 << 12
    NET_HOST_ECN = 1 << 13
    NET_HOST_UFO = 1 << 14
    NET_MRG_RXBUF = 1 << 15
    NET_STATUS = 1 << 16
    NET_CTRL_VQ = 1 << 17
    NET_CTRL_RX = 1 << 18
    NET_GUEST_ANNOUNCE = 1 << 21
    NET_MQ = 1 << 22
    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL: log every write into guest memory (live migration)
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35


class PF(enum.IntFlag):
    """vhost-user protocol feature bits as masks."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# ---- payload dtypes (little-endian, packed as on the wire) ----
HEADER = np.dtype([("request", "<u4"), ("flags", "<u4"), ("size", "<u4")])
U64 = np.dtype([("u64", "<u8")])
VRING_STATE = np.dtype([("index", "<u4"), ("num", "<u4")])
VRING_ADDR = np.dtype(
    [("index", "<u4"), ("flags", "<u4"), ("desc", "<u8"), ("used", "<u8"), ("avail", "<u8"), ("log", "<u8")]
)
MEM_REGION = np.dtype([("gpa", "<u8"), ("size", "<u8"), ("uaddr", "<u8"), ("mmap_offset", "<u8")])
MEM_TABLE_HEAD = np.dtype([("nregions", "<u4"), ("padding", "<u4")])
SINGLE_MEM_REGION = np.dtype([("padding", "<u8"), ("region", MEM_REGION)])
LOG = np.dtype([("size", "<u8"), ("offset", "<u8")])
IOTLB = np.dtype([("iova", "<u8"), ("size", "<u8"), ("uaddr", "<u8"), ("perm", "u1"), ("type", "u1"), ("pad", "6u1")])
CONFIG_HEAD = np.dtype([("offset", "<u4"), ("size", "<u4"), ("flags", "<u4")])
INFLIGHT = np.dtype([("mmap_size", "<u8"), ("mmap_offset", "<u8"), ("num_queues", "<u2"), ("queue_size", "<u2")])
VRING_AREA = np.dtype([("u64", "<u8"), ("size", "<u8"), ("offset", "<u8")])
DEVICE_STATE = np.dtype([("direction", "<u4"), ("phase", "<u4")])
SHARED_OBJECT = np.dtype([("uuid", "16u1")])
MAX_CONFIG = 256


class Var(enum.Enum):
    """Payloads whose size depends on their contents."""

    MEM_TABLE = "mem_table"  # MEM_TABLE_HEAD + nregions * MEM_REGION
    CONFIG = "config"  # CONFIG_HEAD + size bytes
    ANY = "any"  # opaque (crypto sessions, rarp mac is a u64)


@dataclass(frozen=True)
class Spec:
    """How one request looks on the wire."""

    payload: np.dtype | Var | None  # None: no payload
    fds: int  # most fds the request may carry
    reply: bool  # the back-end sends a reply of its own (not just a REPLY_ACK)
    min_fds: int = 0


_E = None
REQUESTS: dict[Req, Spec] = {
    Req.GET_FEATURES: Spec(_E, 0, True),
    Req.SET_FEATURES: Spec(U64, 0, False),
    Req.SET_OWNER: Spec(_E, 0, False),
    Req.RESET_OWNER: Spec(_E, 0, False),
    Req.SET_MEM_TABLE: Spec(Var.MEM_TABLE, MAX_MEM_REGIONS, False),
    Req.SET_LOG_BASE: Spec(LOG, 1, True, 1),
    Req.SET_LOG_FD: Spec(_E, 1, False, 1),
    Req.SET_VRING_NUM: Spec(VRING_STATE, 0, False),
    Req.SET_VRING_ADDR: Spec(VRING_ADDR, 0, False),
    Req.SET_VRING_BASE: Spec(VRING_STATE, 0, False),
    Req.GET_VRING_BASE: Spec(VRING_STATE, 0, True),
    Req.SET_VRING_KICK: Spec(U64, 1, False),
    Req.SET_VRING_CALL: Spec(U64, 1, False),
    Req.SET_VRING_ERR: Spec(U64, 1, False),
    Req.GET_PROTOCOL_FEATURES: Spec(_E, 0, True),
    Req.SET_PROTOCOL_FEATURES: Spec(U64, 0, False),
    Req.GET_QUEUE_NUM: Spec(_E, 0, True),
    Req.SET_VRING_ENABLE: Spec(VRING_STATE, 0, False),
    Req.SEND_RARP: Spec(U64, 0, False),
    Req.NET_SET_MTU: Spec(U64, 0, False),
    Req.SET_BACKEND_REQ_FD: Spec(_E, 1, False, 1),
    Req.IOTLB_MSG: Spec(IOTLB, 0, False),
    Req.SET_VRING_ENDIAN: Spec(VRING_STATE, 0, False),
    Req.GET_CONFIG: Spec(Var.CONFIG, 0, True),
    Req.SET_CONFIG: Spec(Var.CONFIG, 0, False),
    Req.CREATE_CRYPTO_SESSION: Spec(Var.ANY, 0, True),
    Req.CLOSE_CRYPTO_SESSION: Spec(U64, 0, False),
    Req.POSTCOPY_ADVISE: Spec(_E, 0, True),
    Req.POSTCOPY_LISTEN: Spec(_E, 0, False),
    Req.POSTCOPY_END: Spec(_E, 0, True),
    Req.GET_INFLIGHT_FD: Spec(INFLIGHT, 0, True),
    Req.SET_INFLIGHT_FD: Spec(INFLIGHT, 1, False, 1),
    Req.GPU_SET_SOCKET: Spec(_E, 1, False, 1),
    Req.RESET_DEVICE: Spec(_E, 0, False),
    Req.VRING_KICK: Spec(VRING_STATE, 0, False),
    Req.GET_MAX_MEM_SLOTS: Spec(_E, 0, True),
    Req.ADD_MEM_REG: Spec(SINGLE_MEM_REGION, 1, False, 1),
    Req.REM_MEM_REG: Spec(SINGLE_MEM_REGION, 1, False),
    Req.SET_STATUS: Spec(U64, 0, False),
    Req.GET_STATUS: Spec(_E, 0, True),
    Req.GET_SHARED_OBJECT: Spec(SHARED_OBJECT, 0, True),
    Req.SET_DEVICE_STATE_FD: Spec(DEVICE_STATE, 1, True, 1),
    Req.CHECK_DEVICE_STATE: Spec(_E, 0, True),
}


class ProtocolError(Exception):
    """The message breaks the wire rules; ``fatal`` means the stream can't be trusted any more."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.fatal = fatal


def encode(request: int, payload: bytes | np.ndarray = b"", reply: bool = False, need_reply: bool = False) -> bytes:
    """One message as bytes: header + payload."""
    body = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    head = np.array([(request, flags, len(body))], dtype=HEADER)
    return head.tobytes() + body


def decode_header(raw: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header."""
    h = np.frombuffer(raw, dtype=HEADER, count=1)[0]
    return int(h["request"]), int(h["flags"]), int(h["size"])


def check_header(request: int, flags: int, size: int) -> None:
    """Framing rules that don't need the payload; a failure here means the stream is broken."""
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"bad version in flags {flags:#x}", fatal=True)
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes is too large", fatal=True)


def expected_size(spec: Spec, payload: bytes) -> int | None:
    """The size the payload must have, or None if any size is acceptable."""
    p = spec.payload
    if p is None:
        return 0
    if isinstance(p, np.dtype):
        return p.itemsize
    if p is Var.MEM_TABLE:
        if len(payload) < MEM_TABLE_HEAD.itemsize:
            return MEM_TABLE_HEAD.itemsize
        n = int(np.frombuffer(payload, MEM_TABLE_HEAD, 1)[0]["nregions"])
        if n > MAX_MEM_REGIONS:
            raise ProtocolError(f"memory table with {n} regions (at most {MAX_MEM_REGIONS})")
        return MEM_TABLE_HEAD.itemsize + n * MEM_REGION.itemsize
    if p is Var.CONFIG:
        if len(payload) < CONFIG_HEAD.itemsize:
            return CONFIG_HEAD.itemsize
        n = int(np.frombuffer(payload, CONFIG_HEAD, 1)[0]["size"])
        if n > MAX_CONFIG:
            raise ProtocolError(f"config access of {n} bytes (at most {MAX_CONFIG})")
        return CONFIG_HEAD.itemsize + n
    return None


def check_message(request: int, payload: bytes, nfds: int) -> Spec:
    """Apply the table's rules to a whole message; returns its Spec. Raises ProtocolError."""
    try:
        spec = REQUESTS[Req(request)]
    except ValueError:
        raise ProtocolError(f"unknown request {request}") from None
    want = expected_size(spec, payload)
    # QEMU sends an 8-byte payload with some requests that carry none: tolerate extra bytes there.
    if want is not None and len(payload) != want and not (want == 0 and len(payload) <= 8):
        raise ProtocolError(f"{Req(request).name}: payload is {len(payload)} bytes, expected {want}")
    if nfds > spec.fds:
        raise ProtocolError(f"{Req(request).name}: {nfds} fds, at most {spec.fds} allowed")
    if nfds < spec.min_fds:
        raise ProtocolError(f"{Req(request).name}: needs {spec.min_fds} fd(s), got {nfds}")
    return spec


def parse(dtype: np.dtype, payload: bytes) -> np.void:
    """The payload as one record of ``dtype`` (a copy: the message buffer is short-lived)."""
    return np.frombuffer(payload, dtype=dtype, count=1)[0].copy()


def parse_mem_table(payload: bytes) -> np.ndarray:
    """The regions of a SET_MEM_TABLE payload."""
    n = int(np.frombuffer(payload, MEM_TABLE_HEAD, 1)[0]["nregions"])
    return np.frombuffer(payload, MEM_REGION, n, MEM_TABLE_HEAD.itemsize).copy()


def mem_table(regions: np.ndarray) -> bytes:
    """A SET_MEM_TABLE payload for ``regions`` (MEM_REGION records)."""
    head = np.array([(len(regions), 0)], dtype=MEM_TABLE_HEAD)
    return head.tobytes() + np.asarray(regions, dtype=MEM_REGION).tobytes()


def record(dtype: np.dtype, **fields: int) -> np.ndarray:
    """One record of ``dtype`` with the given fields (the rest zero), ready for ``encode``."""
    r = np.zeros(1, dtype=dtype)
    for k, v in fields.items():
        r[0][k] = v
    return r


def u64(value: int) -> np.ndarray:
    return record(U64, u64=value)
