"""The wire format: every request round-trips, and the framing rules refuse what they must."""
from __future__ import annotations

import numpy as np
import pytest

from vring import protocol as P
from vring.protocol import ProtocolError, Req


def _payload_for(spec: P.Spec) -> bytes:
    p = spec.payload
    if p is None:
        return b""
    if isinstance(p, np.dtype):
        return bytes(range(p.itemsize))
    if p is P.Var.MEM_TABLE:
        return P.mem_table(P.record(P.MEM_REGION, gpa=0x1000, size=0x2000, uaddr=0x3000, mmap_offset=0))
    if p is P.Var.CONFIG:
        return np.array([(0, 4, 0)], P.CONFIG_HEAD).tobytes() + b"\x01\x02\x03\x04"
    return b"\x00" * 8


@pytest.mark.parametrize("req", list(Req))
def test_every_request_round_trips(req):
    spec = P.REQUESTS[req]
    payload = _payload_for(spec)
    for need_reply in (False, True):
        msg = P.encode(req, payload, need_reply=need_reply)
        r, flags, size = P.decode_header(msg[:12])
        assert (r, size) == (int(req), len(payload))
        assert flags & P.FLAG_VERSION_MASK == P.VERSION
        assert bool(flags & P.FLAG_NEED_REPLY) == need_reply
        P.check_header(r, flags, size)
        assert msg[12:] == payload
        assert P.check_message(r, msg[12:], spec.min_fds) is spec


def test_every_request_number_is_in_the_table():
    assert set(P.REQUESTS) == set(Req)
    assert [int(r) for r in Req] == list(range(1, len(Req) + 1))


@pytest.mark.parametrize("req", [r for r in Req if isinstance(P.REQUESTS[r].payload, np.dtype)])
def test_wrong_payload_size_is_refused(req):
    size = P.REQUESTS[req].payload.itemsize
    with pytest.raises(ProtocolError):
        P.check_message(req, b"\x00" * (size + 1), P.REQUESTS[req].min_fds)
    with pytest.raises(ProtocolError):
        P.check_message(req, b"\x00" * (size - 1), P.REQUESTS[req].min_fds)


def test_fd_counts_are_checked():
    with pytest.raises(ProtocolError, match="fds"):
        P.check_message(Req.SET_FEATURES, bytes(8), 1)
    with pytest.raises(ProtocolError, match="fd"):
        P.check_message(Req.ADD_MEM_REG, bytes(40), 0)
    P.check_message(Req.SET_VRING_KICK, bytes(8), 1)
    with pytest.raises(ProtocolError):
        P.check_message(Req.SET_VRING_KICK, bytes(8), 2)


def test_framing_errors_are_fatal():
    with pytest.raises(ProtocolError) as e:
        P.check_header(Req.GET_FEATURES, 0x2, 0)  # version 2
    assert e.value.fatal
    with pytest.raises(ProtocolError) as e:
        P.check_header(Req.GET_FEATURES, 0x1, P.MAX_PAYLOAD + 1)
    assert e.value.fatal


def test_unknown_request_and_oversized_tables():
    with pytest.raises(ProtocolError, match="unknown"):
        P.check_message(999, b"", 0)
    big = np.array([(9, 0)], P.MEM_TABLE_HEAD).tobytes() + bytes(9 * 32)
    with pytest.raises(ProtocolError, match="regions"):
        P.check_message(Req.SET_MEM_TABLE, big, 8)
    cfg = np.array([(0, 1000, 0)], P.CONFIG_HEAD).tobytes()
    with pytest.raises(ProtocolError, match="config"):
        P.check_message(Req.GET_CONFIG, cfg, 0)


def test_mem_table_parse():
    regs = np.zeros(3, P.MEM_REGION)
    regs["gpa"] = [0, 0x10000, 0x20000]
    regs["size"] = 0x10000
    out = P.parse_mem_table(P.mem_table(regs))
    assert (out == regs).all()
