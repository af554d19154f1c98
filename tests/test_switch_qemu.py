"""Three QEMU Linux guests (TCG) on ``vring switch``: every guest pings both others, and a frame for a
learned MAC is seen only on its port.

Each guest (tests/qemu/init with ``vr.pings=IP,IP``) waits until each other guest answers and then
pings it COUNT times without loss.  vring captures every port (``--pcap``, both directions), and
the captures prove the switching:

- every unicast frame delivered to a guest is addressed to that guest's MAC (once a MAC is
  learned, frames for it reach its port only: a guest only sends to a MAC after an ARP
  exchange, which teaches the switch that MAC first);
- the ICMP echo requests of guest i for guest j reach port j and no third port;
- nothing comes back out of its ingress port (each port's capture holds exactly the frames its
  guest sent plus those delivered to it, matching vring's counters).

The MAC table (read over the control socket while the guests run) holds each guest's MAC on its
port.  CPU placement as in tests/test_qemu.py: vring on CPU 1, the guests unpinned.
"""
from __future__ import annotations

import os
import struct
import time

import pytest
from peers import QemuGuest, VhostUserNet, require_peer

from vring.control import ControlClient

pytestmark = pytest.mark.peer

MACS = ["52:54:00:00:01:01", "52:54:00:00:01:02", "52:54:00:00:01:03"]
IPS = ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
COUNT = 5
VRING_CPU = "1"
VRING_OPTS = ("-v",) if os.environ.get("VRING_TEST_DEBUG") else ()


def read_pcap(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) >= 24 and struct.unpack_from("<I", data)[0] in (0xA1B2C3D4, 0xA1B23C4D), path
    out, off = [], 24
    while off + 16 <= len(data):
        _, _, caplen, _ = struct.unpack_from("<IIII", data, off)
        out.append(data[off + 16: off + 16 + caplen])
        off += 16 + caplen
    return out


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def echo_request(f: bytes) -> tuple[str, str] | None:
    """(source IP, destination IP) of an ICMP echo request, else None."""
    if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 1:
        return None
    ihl = (f[14] & 0xF) * 4
    if len(f) <= 14 + ihl or f[14 + ihl] != 8:
        return None
    return ".".join(map(str, f[26:30])), ".".join(map(str, f[30:34]))


def test_three_guests_ping_every_pair_through_switch(sockdir, peers, vring_proc):
    require_peer("qemu")
    t0 = time.monotonic()
    socks = [os.path.join(sockdir, f"{c}.sock") for c in "abc"]
    ctl = os.path.join(sockdir, "switch.ctl")
    pcap = os.path.join(sockdir, "port{port}.pcap")
    args = [*VRING_OPTS, "switch", "--control", ctl, "--pcap", pcap]
    for s in socks:
        args += ["--socket", s]
    v = vring_proc(*args, cpus=VRING_CPU)
    v.wait_log("port=2 listening", 60)
    guests = []
    for i in range(3):
        others = ",".join(ip for j, ip in enumerate(IPS) if j != i)
        guests.append(peers.add(QemuGuest(
            [VhostUserNet(socks[i], mac=MACS[i])], name=f"g{i + 1}", workdir=sockdir,
            params={"ip": f"{IPS[i]}/24", "pings": others, "count": COUNT, "interval": 0.2, "ping_wait": 40,
                    "wait": 300})))

    def diag() -> str:
        return "\n".join(g.log_tail(25) for g in guests) + f"\n--- vring ---\n{v.log_text()[-4000:]}"

    try:
        for g in guests:
            g.wait_result(r"^pings done", 100 - (time.monotonic() - t0))
    except Exception as e:
        raise AssertionError(f"{e}\n{diag()}") from e
    for i, g in enumerate(guests):
        for j in range(3):
            if j != i:
                m = g.wait_result(rf"^pings {IPS[j]} (ok|fail) tx=(\d+) rx=(\d+) loss=(\S+)%", 0)
                assert m.group(1) == "ok" and int(m.group(3)) == COUNT, f"{g.name} -> {IPS[j]}: {m.group(0)}\n{diag()}"
    with ControlClient(ctl) as c:
        s = c.sample()
    table = {e["mac"]: e["port"] for e in s["mac_table"]}
    for i, mac in enumerate(MACS):
        assert table.get(mac) == i, s["mac_table"]
    assert [p["counters"]["macs"] >= 1 for p in s["ports"]] == [True] * 3, s["ports"]
    for g in guests:
        g.stop()
    assert v.stop() == 0, v.log_text()[-4000:]
    log = v.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    c = v.port_counters()
    print(f"\nvring {c}\n{[ln for ln in log.splitlines() if ln.startswith('switch: ')]}\n"
          f"total {time.monotonic() - t0:.1f} s")
    assert set(c) == {0, 1, 2}

    caps = [read_pcap(pcap.format(port=p)) for p in range(3)]
    requests: dict[tuple[str, str], list[int]] = {}
    for p in range(3):
        me = mac_bytes(MACS[p])
        sent = [f for f in caps[p] if f[6:12] == me]
        got = [f for f in caps[p] if f[6:12] != me]
        # the capture holds what the guest sent and what was delivered to it, nothing twice
        assert (len(sent), len(got)) == (c[p]["tx_packets"], c[p]["rx_packets"]), (p, c)
        assert c[p]["errors"] == 0, c
        for f in got:
            unicast = not f[0] & 1
            # a frame for a learned MAC reaches that MAC's port only
            assert not unicast or f[0:6] == me, f"port {p} got a frame for {f[0:6].hex(':')}: {f[:42].hex()}"
            r = echo_request(f)
            if r:
                requests.setdefault(r, []).append(p)
    for i in range(3):
        for j in range(3):
            if i != j:
                ports = requests.get((IPS[i], IPS[j]), [])
                # reachability probes plus COUNT pings, all on port j only
                assert len(ports) >= COUNT and set(ports) == {j}, (IPS[i], IPS[j], ports)
