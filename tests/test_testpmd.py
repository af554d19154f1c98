"""DPDK testpmd (virtio-user) as the real front-end of ``vring net``.

One testpmd with two virtio-user ports in flowgen mode: both ports send and receive. vring
cross-connects them. For each direction, the receiving port must get at least 99% of what the
other port's ring accepted (testpmd's TX-packets), and never more.
"""
from __future__ import annotations

import os
import time

import pytest
from peers import Testpmd, require_peer, wait_for_socket

pytestmark = pytest.mark.peer


def _check_xconnect(fs, min_frames=100_000):
    tx = {p: fs.ports[p]["tx_packets"] for p in (0, 1)}
    rx = {p: fs.ports[p]["rx_packets"] for p in (0, 1)}
    for src, dst in ((0, 1), (1, 0)):
        assert tx[src] >= min_frames, f"port {src} sent only {tx[src]}"
        assert rx[dst] <= tx[src], f"port {dst} received {rx[dst]} > {tx[src]} sent"
        assert rx[dst] >= 0.99 * tx[src], f"port {dst} received {rx[dst]} of {tx[src]} ({rx[dst] / tx[src]:.4f})"
    return tx, rx


def _run(peers, vring, a, b, server_fe: bool, seconds=3.0):
    fe = peers.add(Testpmd([a, b], "flowgen", server=True if server_fe else None, cpus=(0, 1),
                           frame_size=64, burst=32, workdir=os.path.dirname(a), name="fe"), start=False)
    if server_fe:
        fe.start()
        wait_for_socket(a, 30, proc=fe)
    else:
        fe.start()
    fe.wait_forwarding(60)
    vring.wait_log("port=1 front-end connected", 60)
    fe.wait_traffic(60, direction="rx")
    time.sleep(seconds)
    fs = fe.stop()
    time.sleep(0.3)
    return fs


def test_testpmd_xconnect_vring_server(sockdir, peers, vring_proc):
    require_peer("testpmd")
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    v = vring_proc("net", "--socket", a, "--socket", b, cpus="0")
    v.wait_log("port=1 listening", 60)
    fs = _run(peers, v, a, b, server_fe=False)
    assert fs.complete
    tx, rx = _check_xconnect(fs)
    assert v.stop() == 0
    c = v.port_counters()
    print(f"\ntestpmd tx={tx} rx={rx}\nvring {c}")
    # vring's own counts agree with testpmd's: what it took from port p is what testpmd sent on p
    # (testpmd stops with frames still in its rings, so vring may have taken slightly fewer)
    for p in (0, 1):
        assert 0.99 * tx[p] <= c[p]["tx_packets"] <= tx[p]
        assert c[p]["rx_packets"] >= rx[p]
        assert c[p]["errors"] == 0


def test_testpmd_server_vring_client(sockdir, peers, vring_proc):
    require_peer("testpmd")
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    v = vring_proc("net", "--client", "--socket", a, "--socket", b, cpus="0")
    fs = _run(peers, v, a, b, server_fe=True)
    assert fs.complete
    _check_xconnect(fs)
    assert v.stop() == 0
