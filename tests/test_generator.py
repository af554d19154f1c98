"""The in-tree front-end on packed rings, and its jitted generator (split and packed) against both
back-ends it is used to compare: ``vring net`` and DPDK's own ``net_vhost`` (testpmd, io mode)."""
from __future__ import annotations

import os
import time

import pytest
from peers import Testpmd, require_peer, wait_for_socket
from test_net import connect, pump, start

from vring.frontend import Frontend
from vring.generator import run
from vring.layout import PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED
from vring.protocol import F


def test_packed_frontend_frames_intact_and_in_order(vring_proc, sockdir):
    """More frames than the ring holds, so both rings wrap several times (wrap counters flip)."""
    v, (a,) = start(vring_proc, sockdir)
    fe = connect(a, packed=True)
    assert fe.features & F.RING_PACKED
    assert pump(fe, fe, 3000, size=200) == list(range(3000))
    rx = fe.rx()
    assert rx.used_wrap == 1 - (3000 // rx.size) % 2  # (every RX buffer is one frame here)
    fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert c["tx_packets"] == 3000 and c["rx_packets"] == 3000 and c["errors"] == 0


def test_packed_used_id_not_in_flight_is_refused(vring_proc, sockdir):
    """The front-end checks what a back-end gives back: a used element naming a buffer it never
    posted is an error, not a buffer freed twice."""
    v, (a,) = start(vring_proc, sockdir)
    fe = connect(a, packed=True)
    rx = fe.rx()
    assert pump(fe, fe, 10) == list(range(10))
    # forge a used element at the next position, with a buffer id that is posted... then not
    p, w = rx.used_idx, rx.used_wrap
    bid = int(rx.desc[p]["id"])
    rx.ndescs.pop(bid)
    rx.desc[p]["flags"] = (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED) if w else 0
    with pytest.raises(RuntimeError, match="not in flight"):
        rx.take_used()
    fe.close()
    v.stop()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_generator_through_vring_loopback(vring_proc, sockdir, packed):
    v, (a,) = start(vring_proc, sockdir)
    fe = Frontend(a, packed=packed)
    fe.connect()
    fe.setup()
    res = run(fe, "flowgen", 2.0, burst=32, frame_size=64)
    fe.close()
    assert v.stop() == 0
    c = v.port_counters()[0]
    assert res["tx_packets"] > 10_000
    # what vring took from TX it delivered or counted dropped; the generator saw what vring
    # delivered, minus what was still in flight when it stopped; and vring took all it was sent
    # but what the generator posted after vring's last poll
    assert c["tx_packets"] == c["rx_packets"] + c["rx_dropped"]
    assert c["rx_packets"] - fe.queue_size <= res["rx_packets"] <= c["rx_packets"]
    assert res["tx_packets"] <= c["tx_packets"] <= res["tx_packets"] + fe.queue_size


@pytest.mark.peer
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_generator_through_dpdk_net_vhost(sockdir, peers, packed):
    """The generator (what bench/e2e.py runs as the in-tree front-end) against DPDK's vhost
    back-end: testpmd with two net_vhost ports in io mode cross-connects them."""
    require_peer("testpmd")
    socks = [os.path.join(sockdir, f"{s}.sock") for s in "ab"]
    be = peers.add(Testpmd(socks, "io", backend=True, cpus=(0, 1), workdir=sockdir, name="be"))
    for s in socks:
        wait_for_socket(s, 30, proc=be)
    be.wait_forwarding(30)
    fes = [Frontend(s, packed=packed) for s in socks]
    for fe in fes:
        fe.connect()
        fe.setup()
    assert all(bool(fe.features & F.RING_PACKED) == packed for fe in fes)
    be.wait_connected(30)
    res = run(fes, "flowgen", 2.0, burst=32, frame_size=64)
    time.sleep(0.2)
    bs = be.stop()
    for fe in fes:
        fe.close()
    assert bs.complete, be.log_tail()
    print(f"\ngenerator: {res}\nbackend: {bs.ports}")
    sent, got = res["tx_packets"], res["rx_packets"]
    assert sent >= 100_000
    # the generator counts a frame sent when DPDK gives its buffer back, so DPDK took at least
    # that and at most a ring more; the generator got what DPDK sent it but what was still in
    # flight at the stop (io forwarding drops frames for a full RX ring: its TX-dropped)
    dpdk_rx = bs.ports[0]["rx_packets"] + bs.ports[1]["rx_packets"]
    dpdk_tx = bs.ports[0]["tx_packets"] + bs.ports[1]["tx_packets"]
    in_flight = sum(fe.queue_size for fe in fes)
    assert sent <= dpdk_rx <= sent + in_flight
    assert dpdk_tx - in_flight <= got <= dpdk_tx
    assert got >= 0.9 * sent
