"""NET_MTU with the in-tree front-end: ``--mtu``, NET_SET_MTU, the config space, oversized frames
dropped and counted. (Two QEMU guests with host_mtu=9000: tests/test_qemu.py.)"""
from __future__ import annotations

import os
import time

import numpy as np
from test_net import check, connect, frame, start

from vring import protocol as P
from vring.frontend import Frontend
from vring.protocol import PF, F, Req


def config_mtu(fe: Frontend) -> tuple[int, int]:
    """(max_virtqueue_pairs, mtu) from GET_CONFIG of struct virtio_net_config."""
    head = P.record(P.CONFIG_HEAD, offset=0, size=12).tobytes()
    body = fe.call(Req.GET_CONFIG, head + bytes(12))[P.CONFIG_HEAD.itemsize :]
    return int.from_bytes(body[8:10], "little"), int.from_bytes(body[10:12], "little")


def vlan(f: bytes) -> bytes:
    """The same frame with an 802.1Q tag after the MACs (4 bytes longer)."""
    return f[:12] + b"\x81\x00\x00\x05" + f[12:]


def loop(fe: Frontend, frames: list[bytes]) -> list[bytes]:
    """Send frames through the loopback port; what came back once every TX buffer was used."""
    assert fe.send_frames(frames) == len(frames)
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got += fe.recv_frames()
        fe.tx().take_used()
        if len(fe.tx().free) == fe.tx().size:
            time.sleep(0.05)  # the used TX buffers are published before the RX side: one more look
            got += fe.recv_frames()
            return got
    raise AssertionError("TX buffers not returned")


def test_mtu_option_set_mtu_and_config_space(vring_proc, sockdir):
    v, (a,) = start(vring_proc, sockdir, "--mtu", "1500")
    fe = connect(a, queue_size=64, buf_size=10240, features=Frontend.DEFAULT_FEATURES | F.NET_MTU,
                 protocol_features=Frontend.DEFAULT_PROTOCOL | PF.NET_MTU)
    try:
        assert fe.features & F.NET_MTU and fe.protocol_features & PF.NET_MTU
        assert config_mtu(fe) == (1, 1500)
        # MTU + 14 passes, one byte more is dropped; a VLAN-tagged frame may be 4 bytes longer
        ok, tagged = frame(1, 1514), vlan(frame(2, 1514))
        got = loop(fe, [ok, frame(3, 1515), tagged, vlan(frame(4, 1515))])
        assert [len(f) for f in got] == [1514, 1518] and check(got[0]) == 1 and got[1] == tagged
        # NET_SET_MTU: refused out of range, then 9000 for this port
        assert fe.ack(Req.NET_SET_MTU, P.u64(67)) == 1
        assert fe.ack(Req.NET_SET_MTU, P.u64(65536)) == 1
        assert fe.ack(Req.NET_SET_MTU, P.u64(9000)) == 0
        assert config_mtu(fe) == (1, 9000)
        got = loop(fe, [frame(5, 9014), frame(6, 9015)])
        assert [check(f) for f in got] == [5] and len(got[0]) == 9014
    finally:
        fe.close()
    v.wait_log("port=0 front-end disconnected", 10)
    # the next front-end gets --mtu again; without the protocol feature NET_SET_MTU is refused
    fe = connect(a, queue_size=64, buf_size=4096)
    try:
        assert config_mtu(fe) == (1, 1500)
        assert fe.ack(Req.NET_SET_MTU, P.u64(9000)) == 1
        assert len(loop(fe, [frame(7, 1515)])) == 0
    finally:
        fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert c["tx_dropped"] == 4 and c["tx_packets"] == 3 and c["errors"] == 0, c
    assert "NET_SET_MTU refused: MTU 67 out of range" in v.log_text()


def test_set_mtu_needs_reply_ack_only_when_asked(vring_proc, sockdir):
    """Without NEED_REPLY no answer comes (the next reply is GET_FEATURES')."""
    v, (a,) = start(vring_proc, sockdir)
    fe = Frontend(a, queue_size=64, protocol_features=PF.NET_MTU)
    try:
        fe.connect()
        fe.send(Req.SET_OWNER)
        fe.send(Req.SET_PROTOCOL_FEATURES, P.u64(PF.NET_MTU))
        fe.send(Req.NET_SET_MTU, P.u64(1400))
        assert int(np.frombuffer(fe.call(Req.GET_FEATURES), "<u8")[0]) & F.NET_MTU
    finally:
        fe.close()
    v.wait_log("port0: MTU 1400", 10)
    assert v.stop() == 0


def start_switch(vring_proc, sockdir):
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    v = vring_proc("switch", "--mtu", "1500", "--socket", a, "--socket", b)
    v.wait_log("port=1 listening", 60)
    return v, (a, b)


def test_switch_drops_frames_over_mtu(vring_proc, sockdir):
    v, (a, b) = start_switch(vring_proc, sockdir)
    fa, fb = connect(a, queue_size=64), connect(b, queue_size=64)
    try:
        assert fa.send_frames([frame(1, 1515), frame(2, 1514)]) == 2  # unknown unicast: flooded to b
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            got += fb.recv_frames()
        assert [check(f) for f in got] == [2]
    finally:
        fa.close()
        fb.close()
    assert v.stop() == 0
    c = v.port_counters()
    assert c[0]["tx_dropped"] == 1 and c[0]["tx_packets"] == 1 and c[1]["rx_packets"] == 1, c
