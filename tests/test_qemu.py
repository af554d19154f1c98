"""Two QEMU Linux guests (TCG) ping each other through ``vring net`` (xconnect).

Each guest boots Debian's kernel with the test initramfs (tests/qemu/) and has one virtio-net-pci
NIC on a vhost-user socket; vring cross-connects the two sockets.  Guest 1 pings guest 2 and
reports ``RESULT ping ok|fail tx=N rx=N loss=P%`` on its serial console; no ping may be lost.
vring's final per-port counters must show traffic both ways and no errors.

CPU placement on two cores (measured): vring is pinned to CPU 1, the TCG guests are not pinned.
vring sleeps in poll() while the guests boot (the CPU-bound part), and the guests are nearly idle
while they ping, so they rarely compete.  Unpinned guests boot about 3 s faster than both guests
pinned to CPU 0 (about 10 s instead of 13 s, under load), with the same ping round-trip times.
Set VRING_TEST_DEBUG=1 to run vring with -v.
"""
from __future__ import annotations

import os
import time

import pytest
from peers import QemuGuest, VhostUserNet, require_peer, wait_for_socket

pytestmark = pytest.mark.peer

MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
IP1, IP2 = "10.0.0.1", "10.0.0.2"
VRING_CPU = "1"
VRING_OPTS = ("-v",) if os.environ.get("VRING_TEST_DEBUG") else ()
GUEST_CPUS = None  # not pinned (see above)
PING_RX = r"^ping (ok|fail) tx=(\d+) rx=(\d+) loss=(\S+)%"


def _guests(peers, sockdir, a, b, count, interval, server=False, props="", ping_params=None):
    """Guest 2 (pinged, stays up) on socket b, guest 1 (pings guest 2) on socket a."""
    g2 = peers.add(QemuGuest([VhostUserNet(b, mac=MAC2, server=server, props=props)], name="g2", workdir=sockdir,
                             params={"ip": f"{IP2}/24", "wait": 300}, cpus=GUEST_CPUS))
    g1 = peers.add(QemuGuest([VhostUserNet(a, mac=MAC1, server=server, props=props)], name="g1", workdir=sockdir,
                             params={"ip": f"{IP1}/24", "ping": IP2, "count": count,
                                     "interval": interval, "ping_wait": 40, **(ping_params or {})},
                             cpus=GUEST_CPUS))
    return g1, g2


class _Timeline:
    """When (s since t0) each guest's RESULT lines first appeared: both serial logs are polled
    together, so a failure report shows which guest was late (e.g. guest 2 still booting while
    guest 1 already pings it)."""

    def __init__(self, t0, guests):
        self.t0, self.guests, self.events = t0, guests, []
        self._seen = set()

    def poll(self):
        now = time.monotonic() - self.t0
        for g in self.guests:
            for r in g.results():
                if (g.name, r) not in self._seen:
                    self._seen.add((g.name, r))
                    self.events.append(f"{now:5.1f} s {g.name}: {r}")

    def wait(self, guest, pattern, timeout):
        """Poll all guests until ``guest`` prints a RESULT matching ``pattern``; returns the match."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            try:
                return guest.wait_result(pattern, 0)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{guest.name}: no RESULT {pattern!r} within {timeout} s\n"
                                       + str(self)) from None
            time.sleep(0.1)

    def __str__(self):
        return "\n".join(self.events)


def _ping_and_check(v, g1, g2, count, t0):
    tl = _Timeline(t0, [g1, g2])
    try:
        tl.wait(g1, r"^boot ok", 90)
        tl.wait(g2, r"^net (up|fail)", 60)
        v.wait_log("port=0 front-end connected", 30)
        v.wait_log("port=1 front-end connected", 30)
        reach = tl.wait(g1, r"^ping (reachable after \d+ s|unreachable)", 60)
        m = tl.wait(g1, PING_RX, 30 + count * 0.5)
    except Exception as e:
        raise AssertionError(f"{e}\n{g1.log_tail()}\n{g2.log_tail()}\n--- vring ---\n"
                             f"{v.log_text()[-4000:]}") from e
    print(f"\n{tl}")
    diag = f"{tl}\n{g1.log_tail()}\n{g2.log_tail()}\n--- vring ---\n{v.log_text()[-4000:]}"
    assert reach.group(1).startswith("reachable"), diag
    assert m.group(1) == "ok", diag
    assert (int(m.group(2)), int(m.group(3)), float(m.group(4))) == (count, count, 0.0), diag
    g1.wait_result(r"^done", 20)
    g1.stop()
    g2.stop()
    assert v.stop() == 0, v.log_text()[-4000:]
    log = v.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    c = v.port_counters()
    print(f"vring {c}\ntotal {time.monotonic() - t0:.1f} s")
    assert set(c) == {0, 1}, v.log_text()[-4000:]
    for p in (0, 1):
        # port p took at least the pings (or replies) and ARP from its guest, and delivered the other's
        assert c[p]["tx_packets"] >= count, c
        assert c[p]["rx_packets"] >= count, c
        assert c[p]["errors"] == 0, c
    # xconnect: every frame one port took from its guest was delivered to the other, or counted
    # as dropped there (a frame sent before the other guest's RX ring is ready is dropped)
    for src, dst in ((0, 1), (1, 0)):
        assert c[src]["tx_packets"] == c[dst]["rx_packets"] + c[dst]["rx_dropped"], c
    return c


def test_two_guests_ping_through_vring(sockdir, peers, vring_proc):
    """vring is the socket server; two guests connect; guest 1 sends 100 pings, none lost."""
    require_peer("qemu")
    count = 100
    t0 = time.monotonic()
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    v = vring_proc(*VRING_OPTS, "net", "--socket", a, "--socket", b, cpus=VRING_CPU)
    v.wait_log("port=1 listening", 60)
    g1, g2 = _guests(peers, sockdir, a, b, count, 0.1)
    _ping_and_check(v, g1, g2, count, t0)


def test_qemu_server_vring_client(sockdir, peers, vring_proc):
    """QEMU is the socket server (server=on,wait=off); ``vring net --client`` connects."""
    require_peer("qemu")
    count = 20
    t0 = time.monotonic()
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    g1, g2 = _guests(peers, sockdir, a, b, count, 0.1, server=True)
    wait_for_socket(a, 30, proc=g1)
    wait_for_socket(b, 30, proc=g2)
    v = vring_proc(*VRING_OPTS, "net", "--client", "--socket", a, "--socket", b, cpus=VRING_CPU)
    _ping_and_check(v, g1, g2, count, t0)


def test_host_mtu_9000_jumbo_ping(sockdir, peers, vring_proc):
    """QEMU's host_mtu=9000 offers the guests MTU 9000 (vring offers NET_MTU) and sends NET_SET_MTU;
    8000-byte pings cross vring's xconnect, none lost."""
    require_peer("qemu")
    count = 5
    t0 = time.monotonic()
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    v = vring_proc(*VRING_OPTS, "net", "--socket", a, "--socket", b, cpus=VRING_CPU)
    v.wait_log("port=1 listening", 60)
    g1, g2 = _guests(peers, sockdir, a, b, count, 0.2, props="host_mtu=9000", ping_params={"psize": 8000})
    for g in (g1, g2):
        g.wait_result(r"^net (up|fail)", 120)
    mtus = [g.wait_result(r"^net up \S+ \S+ mtu (\d+)", 0).group(1) for g in (g1, g2)]
    c = _ping_and_check(v, g1, g2, count, t0)
    assert mtus == ["9000", "9000"], mtus  # the guests took the MTU from the config space
    log = v.log_text()
    assert "port0: MTU 9000" in log and "port1: MTU 9000" in log, log[-3000:]
    assert c[0]["tx_bytes"] >= count * 8000 and c[1]["tx_bytes"] >= count * 8000, c
    assert c[0]["tx_dropped"] == c[1]["tx_dropped"] == 0, c
