"""Restarts under traffic: peers killed and restarted, vring killed and restarted.

- testpmd (virtio-user front-end, flowgen on two ports through ``vring net`` xconnect) is
  SIGKILLed and a new testpmd started, in both socket roles (vring listens / ``vring --client``
  connects to testpmd's server=1 sockets): traffic resumes, vring's fds and memfd mappings
  come back to their level before the first front-end, no errors.
- vring is SIGKILLed and restarted under a running QEMU guest whose NIC's chardev has
  ``reconnect=1``: the guest's ping (answered by an in-tree Frontend on vring's other port)
  resumes, and the guest's virtio ring stays consistent (no "not a head"/"BAD_RING" complaint
  from its driver, ping replies keep coming, vring's counters show no errors).

Times to resume are printed (``pytest -s``).
"""
from __future__ import annotations

import os
import re
import signal
import struct
import threading
import time

import pytest
from peers import QemuGuest, Testpmd, VhostUserNet, require_peer

from vring.frontend import Frontend

pytestmark = pytest.mark.peer


def fds_and_maps(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        return fds, sum("memfd:" in line for line in f)


def wait_value(fn, want, timeout: float):
    deadline = time.monotonic() + timeout
    got = fn()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = fn()
    return got


# ------------------------------------------------------------------------------------------
# testpmd killed and restarted


def _testpmd(peers, a, b, name, server_fe):
    fe = Testpmd([a, b], "flowgen", server=True if server_fe else None, cpus=(0, 1), frame_size=64, burst=32,
                 workdir=os.path.dirname(a), name=name)
    return peers.add(fe)


@pytest.mark.parametrize("role", ["vring_server", "vring_client"])
def test_testpmd_killed_and_restarted(sockdir, peers, vring_proc, role):
    require_peer("testpmd")
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    client = role == "vring_client"
    if client:
        v = vring_proc("net", "--client", "--socket", a, "--socket", b, cpus="0")
        v.wait_log("vring net:", 60)
    else:
        v = vring_proc("net", "--socket", a, "--socket", b, cpus="0")
        v.wait_log("port=1 listening", 60)
    time.sleep(0.5)
    base = fds_and_maps(v.proc.pid)
    resume = []
    for round_ in range(3):
        t0 = time.monotonic()
        if client:  # a killed server leaves its socket files; testpmd refuses to bind over them
            for p in (a, b):
                if os.path.exists(p):
                    os.unlink(p)
        fe = _testpmd(peers, a, b, f"fe{round_}", client)
        fe.wait_forwarding(60)
        v.wait_log("port=1 front-end connected", 60)
        fe.wait_traffic(60, direction="rx", min_packets=10_000)
        resume.append(time.monotonic() - t0)
        if round_ == 2:
            fs = fe.stop()
            assert fs.complete
            for p in (0, 1):
                assert fs.ports[p]["rx_packets"] >= 10_000, fs.ports
        else:
            fe.kill()  # SIGKILL: no clean shutdown, rings and memory just vanish
        got = wait_value(lambda: fds_and_maps(v.proc.pid), base, 10)
        assert got == base, f"after testpmd #{round_} died: fds/maps {got}, before {base}\n{v.log_text()[-3000:]}"
        assert v.proc.poll() is None, v.log_text()[-3000:]
    assert v.stop() == 0
    log = v.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert log.count("port=0 front-end connected") == 3
    print(f"\n{role}: testpmd start -> 10k frames received on both ports: "
          + ", ".join(f"{t:.1f} s" for t in resume) + f" (rounds 2 and 3 after a SIGKILL); vring {v.port_counters()}")


# ------------------------------------------------------------------------------------------
# vring killed and restarted under a QEMU guest

GUEST_IP, PEER_IP = "10.0.0.1", "10.0.0.2"
GUEST_MAC = "52:54:00:00:00:31"
PEER_MAC = bytes.fromhex("525400000032")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def answer(f: bytes) -> bytes | None:
    """The reply of host PEER_IP to an ARP request or an ICMP echo request, or None."""
    peer_ip = bytes(map(int, PEER_IP.split(".")))
    if len(f) >= 42 and f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x01" and f[38:42] == peer_ip:
        arp = b"\x00\x01\x08\x00\x06\x04\x00\x02" + PEER_MAC + peer_ip + f[22:28] + f[28:32]
        return f[6:12] + PEER_MAC + b"\x08\x06" + arp
    if len(f) >= 42 and f[12:14] == b"\x08\x00" and f[23] == 1 and f[30:34] == peer_ip:
        ihl = (f[14] & 0xF) * 4
        ip = bytearray(f[14 : 14 + ihl])
        total = struct.unpack("!H", ip[2:4])[0]
        icmp = bytearray(f[14 + ihl : 14 + total])
        if not icmp or icmp[0] != 8:
            return None
        ip[12:16], ip[16:20] = f[30:34], f[26:30]
        icmp[0] = 0
        icmp[2:4] = b"\0\0"
        icmp[2:4] = struct.pack("!H", _csum(bytes(icmp)))
        return f[6:12] + PEER_MAC + b"\x08\x00" + bytes(ip) + bytes(icmp)
    return None


class Responder(threading.Thread):
    """An in-tree Frontend on vring's other port that answers ARP and ping for PEER_IP."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path = path
        self.lock = threading.Lock()
        self.fe: Frontend | None = None
        self.stopping = False
        self.echoes: list[float] = []  # when each echo request was answered
        self.error: BaseException | None = None

    def attach(self) -> None:
        fe = Frontend(self.path, queue_size=256)
        fe.connect(timeout=60)
        fe.setup()
        fe.post_rx()
        with self.lock:
            old, self.fe = self.fe, fe
        if old is not None:
            old.close()

    def detach(self) -> None:
        with self.lock:
            old, self.fe = self.fe, None
        if old is not None:
            old.close()

    def run(self) -> None:
        try:
            while not self.stopping:
                with self.lock:
                    fe = self.fe
                    if fe is not None:
                        out = []
                        for f in fe.recv_frames():
                            r = answer(f)
                            if r is not None:
                                out.append(r)
                                if r[12:14] == b"\x08\x00":
                                    self.echoes.append(time.monotonic())
                        if out:
                            fe.send_frames(out)
                        fe.tx().take_used()
                time.sleep(0.002)
        except BaseException as e:
            self.error = e


def test_vring_killed_and_restarted_under_a_qemu_guest(sockdir, peers, vring_proc):
    require_peer("qemu")
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    args = ("net", "--socket", a, "--socket", b)
    v = vring_proc(*args, cpus="1")
    v.wait_log("port=1 listening", 60)
    resp = Responder(b)
    resp.attach()
    resp.start()
    count, interval = 150, 0.2
    g = peers.add(QemuGuest([VhostUserNet(a, mac=GUEST_MAC, reconnect=1)], name="g", workdir=sockdir,
                            params={"ip": f"{GUEST_IP}/24", "ping": PEER_IP, "count": count,
                                    "interval": interval, "ping_wait": 60}))
    try:
        g.wait_result(r"^ping reachable", 120)
        deadline = time.monotonic() + 30
        while len(resp.echoes) < 15 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(resp.echoes) >= 15, f"guest pings not answered\n{g.log_tail()}\n{v.log_text()[-2000:]}"
        # the crash: vring dies with the guest's rings in use
        before = len(resp.echoes)
        t_kill = time.monotonic()
        v.stop(signal.SIGKILL)
        resp.detach()
        v2 = vring_proc(*args, cpus="1")
        v2.wait_log("port=1 listening", 60)
        t_up = time.monotonic()
        resp.attach()
        v2.wait_log("port=0 front-end connected", 30)  # QEMU reconnects (reconnect=1)
        deadline = time.monotonic() + 30
        while len(resp.echoes) <= before + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(resp.echoes) > before + 1, f"ping did not resume\n{g.log_tail()}\n{v2.log_text()[-3000:]}"
        t_resume = resp.echoes[before + 1]
        m = g.wait_result(r"^ping (ok|fail) tx=(\d+) rx=(\d+)", count * interval + 60)
    except Exception as e:
        raise AssertionError(f"{e}\n{g.log_tail()}\n--- vring ---\n{v.log_text()[-2000:]}") from e
    finally:
        resp.stopping = True
        resp.join(5)
    tx, rx = int(m.group(2)), int(m.group(3))
    lost = tx - rx
    print(f"\nvring SIGKILLed and restarted: back up (listening) {t_up - t_kill:.1f} s after the kill, "
          f"guest pings answered again {t_resume - t_kill:.1f} s after it; ping tx={tx} rx={rx} lost={lost}")
    assert resp.error is None, repr(resp.error)
    assert tx == count
    # only the pings sent while no vring was running (plus the reconnect) may be lost
    assert lost <= (t_resume - t_kill) / interval + 5, (tx, rx, t_resume - t_kill)
    assert len(resp.echoes) - before >= 0.8 * (count - before - lost)
    serial = g.log_text()
    assert not re.search(r"not a head|BAD_RING|virtio_net.*(error|fail)|Unexpected TXQ", serial), serial[-3000:]
    g.stop()
    resp.detach()
    assert v2.stop() == 0
    log = v2.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    c = v2.port_counters()
    print(f"restarted vring {c}")
    assert c[0]["errors"] == 0 and c[0]["tx_packets"] >= rx - before - 2
