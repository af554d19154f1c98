"""The real-peer harness (tests/peers.py), proven against DPDK's own vhost-user backend.

testpmd with net_vhost ports in io mode stands in for our backend: it cross-connects its two
ports (what arrives on port 0 leaves on port 1 and vice versa).  These tests check the harness,
not vring; the same shapes are used with vring as the backend.

Both tests are marked ``peer`` and ``reference``.  A missing peer skips them, or fails them when
CI=true.  Two cores: each busy-polling testpmd gets its forwarding lcore on its own CPU.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import (
    QemuGuest,
    Testpmd,
    VhostUserNet,
    require_peer,
    wait_for_socket,
)

pytestmark = [pytest.mark.peer, pytest.mark.reference]


def test_testpmd_flowgen_through_dpdk_vhost_io(sockdir, peers):
    """Frontend testpmd (2 virtio-user ports, flowgen) <-> backend testpmd (2 net_vhost, io).

    The backend forwards frontend port 0's frames to frontend port 1 and back.  With
    tx[p] = TX-packets of frontend port p (frames its virtio ring accepted; frames refused on a
    full ring are TX-dropped, not sent) and rx[p] = its RX-packets, from testpmd's forward
    statistics at stop (frontend stopped first), we require for each direction
        0.99 * tx[0] <= rx[1] <= tx[0]   and   0.99 * tx[1] <= rx[0] <= tx[1],
    and that each direction carried at least 100000 frames.
    """
    require_peer("testpmd")
    t0 = time.monotonic()
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    # backend forwards on CPU 0, frontend on CPU 1; each main lcore sleeps on the other CPU
    be = peers.add(Testpmd([a, b], "io", backend=True, cpus=(1, 0), workdir=sockdir, name="be"))
    wait_for_socket(a, 20, proc=be)
    wait_for_socket(b, 20, proc=be)
    be.wait_forwarding(20)
    fe = peers.add(Testpmd([a, b], "flowgen", cpus=(0, 1), frame_size=64, burst=32,
                           workdir=sockdir, name="fe"))
    fe.wait_forwarding(30)
    be.wait_connected(20)
    fe.wait_traffic(30, direction="rx")  # both frontend ports receive
    t_traffic = time.monotonic()
    time.sleep(3)
    fs = fe.stop()
    bs = be.stop()
    t_end = time.monotonic()
    print(f"\nfrontend: {fs.ports}\nbackend: {bs.ports}\n"
          f"setup {t_traffic - t0:.1f} s, total {t_end - t0:.1f} s")

    assert fs.complete and bs.complete, fe.log_tail() + "\n" + be.log_tail()
    assert set(fs.ports) == {0, 1} and set(bs.ports) == {0, 1}
    tx = {p: fs.ports[p]["tx_packets"] for p in (0, 1)}
    rx = {p: fs.ports[p]["rx_packets"] for p in (0, 1)}
    for src, dst in ((0, 1), (1, 0)):
        assert tx[src] >= 100_000, f"frontend port {src} sent only {tx[src]}"
        assert rx[dst] <= tx[src], f"port {dst} received {rx[dst]} > {tx[src]} sent by port {src}"
        assert rx[dst] >= 0.99 * tx[src], (
            f"port {dst} received {rx[dst]} of {tx[src]} sent by port {src} "
            f"({100 * rx[dst] / tx[src]:.3f}%)")
        # the backend saw the frames on the matching ports
        assert bs.ports[src]["rx_packets"] <= tx[src]
        assert bs.ports[src]["rx_packets"] >= 0.99 * tx[src]
    assert not fe.alive() and not be.alive()


PING_COUNT = 20


def test_two_qemu_guests_ping_through_dpdk_vhost_io(sockdir, peers):
    """Two TCG guests, each on one net_vhost port of a testpmd io backend (one CPU), ping:
    guest 1 sends PING_COUNT pings to guest 2 and must see 0% loss."""
    require_peer("testpmd", "qemu")
    t0 = time.monotonic()
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    be = peers.add(Testpmd([a, b], "io", backend=True, cpus=1, workdir=sockdir, name="be"))
    wait_for_socket(a, 20, proc=be)
    wait_for_socket(b, 20, proc=be)
    be.wait_forwarding(20)
    g2 = peers.add(QemuGuest([VhostUserNet(b, mac="52:54:00:00:00:02")], name="g2", workdir=sockdir,
                             params={"ip": "10.0.0.2/24", "wait": 300}, cpus=[0]))
    g1 = peers.add(QemuGuest([VhostUserNet(a, mac="52:54:00:00:00:01")], name="g1", workdir=sockdir,
                             params={"ip": "10.0.0.1/24", "ping": "10.0.0.2", "count": PING_COUNT},
                             cpus=[0]))
    g1.wait_result(r"^boot ok", 60)
    t_boot = time.monotonic()
    be.wait_connected(60)
    m = g1.wait_result(r"^ping (ok|fail) tx=(\d+) rx=(\d+) loss=(\S+)%", 180)
    t_ping = time.monotonic()
    print(f"\nguest 1: {g1.results()}\nguest 2: {g2.results()}\n"
          f"boot {t_boot - t0:.1f} s, ping done {t_ping - t0:.1f} s")
    assert m.group(1) == "ok", g1.log_tail() + "\n" + g2.log_tail()
    assert int(m.group(2)) == PING_COUNT and int(m.group(3)) == PING_COUNT
    g1.wait_result(r"^done", 30)
    g1.stop()
    g2.stop()
    bs = be.stop()
    print(f"backend: {bs.ports}  total {time.monotonic() - t0:.1f} s")
    assert bs.complete
    # the backend forwarded at least the pings and replies (plus ARP)
    assert bs.ports[0]["rx_packets"] >= PING_COUNT and bs.ports[1]["rx_packets"] >= PING_COUNT
