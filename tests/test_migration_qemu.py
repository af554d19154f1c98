"""Live migration of a QEMU Linux guest (TCG) whose NIC is on vring, while another guest pings it.

Topology: one ``vring switch`` with three ports: P (the pinging guest), G-src (the guest to
migrate) and G-dst (the same guest's NIC in the destination QEMU, started with ``-incoming``).
Each QEMU has its own vhost-user connection (its own session, rings, memory table and dirty
log); they share the switch process so that P reaches G before and after the move.

P waits until G answers, then pings it COUNT times at INTERVAL. Meanwhile the source QEMU is
told ``migrate`` (HMP); QEMU accepts only because vring offers VHOST_F_LOG_ALL and LOG_SHMFD
(it blocks migration otherwise), sends SET_LOG_BASE and logs through the whole transfer. The
migration must complete while P still pings, the destination must run, and P's pings must go
on: after the switch-over the switch learns G's MAC on G-dst, from SEND_RARP (vring injects a
RARP from G's MAC) or from the guest's own announce (GUEST_ANNOUNCE) — whichever QEMU chose.
Reported: pings lost during the migration (at most MAX_LOST allowed).

The second test moves G between two separate vring processes: A (``vring net`` cross-connecting
P's first NIC and G-src) and B (P's second NIC and G-dst). P bridges its two NICs (vr.bridge:
a Linux bridge in the guest, its address on br0), so it reaches G at either place; after the
switch-over the bridge must re-learn G's MAC behind B, from the announce that only B can carry.
"""
from __future__ import annotations

import os
import re
import time

import pytest
from peers import QemuGuest, VhostUserNet, require_peer

pytestmark = pytest.mark.peer

MAC_P, MAC_G, MAC_P1 = "52:54:00:00:02:01", "52:54:00:00:02:02", "52:54:00:00:02:03"
IP_P, IP_G = "10.0.2.1", "10.0.2.2"
COUNT, INTERVAL = 60, 0.2  # 12 s of pings: the migration (1-4 s here) happens inside this window
# Losses are the time between the source completing and the destination QEMU starting its NIC on
# its back-end: ~1 s (0-1 pings) on a quiet machine, 2-5 s when other TCG guests compete for the
# 2 cores (an early SEND_RARP before the rings start is dropped; QEMU repeats it).
MAX_LOST = 20
VRING_CPU = "1"
VRING_OPTS = ("-v",) if os.environ.get("VRING_TEST_DEBUG") else ()
PING_RX = r"^ping (ok|fail) tx=(\d+) rx=(\d+) loss=(\S+)%"


def source_and_target(peers, sockdir: str, src_sock: str, dst_sock: str, announce: str, mig: str):
    """G-src, and G-dst waiting for it on ``mig``: one MAC, a NIC each on the given sockets
    (guest_announce=off for "rarp": then QEMU asks the back-end to announce the guest)."""
    params = {"ip": f"{IP_G}/24", "wait": 300}
    props = "guest_announce=off" if announce == "rarp" else ""
    src = peers.add(QemuGuest([VhostUserNet(src_sock, mac=MAC_G, props=props)], name="gsrc", workdir=sockdir,
                              params=params, monitor=True))
    dst = peers.add(QemuGuest([VhostUserNet(dst_sock, mac=MAC_G, props=props)], name="gdst", workdir=sockdir,
                              params=params, monitor=True, extra_args=["-incoming", f"unix:{mig}"]))
    return src, dst


def migrate_while_pinging(p: QemuGuest, src: QemuGuest, dst: QemuGuest, mig: str, diag, t0: float):
    """Once P reaches G, migrate G from ``src`` to ``dst`` (listening on ``mig``) while P pings.
    Asserts the migration completed before P's pings ended and the destination runs; returns
    P's final ping RESULT match, QEMU's last ``info migrate`` and the seconds the migration took."""
    try:
        p.wait_result(r"^ping reachable", 150 - (time.monotonic() - t0))
        t_mig = time.monotonic()
        assert src.hmp(f"migrate -d unix:{mig}").strip() == "", diag()
        deadline = time.monotonic() + 60
        while True:
            info = src.hmp("info migrate")
            m = re.search(r"^Migration status: (\S+)", info, re.M)
            status = m.group(1) if m else "?"
            if status in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        t_done = time.monotonic()
        assert status == "completed", f"migration {status}:\n{info}\n{diag()}"
        # the migration was over while P was still pinging: the pings below span it
        assert not any(re.search(PING_RX, r) for r in p.results()), diag()
        assert "running" in dst.hmp("info status"), diag()
        m = p.wait_result(PING_RX, COUNT * INTERVAL + 60)
    except Exception as e:
        raise AssertionError(f"{e}\n{diag()}") from e
    return m, info, t_done - t_mig


def guest_tails(p: QemuGuest, src: QemuGuest, dst: QemuGuest) -> str:
    """The guests' serial logs for a failure: the destination's longer, so that an oops there
    shows its first lines (what faulted, the call trace), not only the panic at its end."""
    return "\n".join((p.log_tail(20), src.log_tail(20), dst.log_tail(90)))


def qemu_times(info: str) -> str:
    total = re.search(r"^total time: (\d+) ms", info, re.M)
    downtime = re.search(r"^downtime: (\d+) ms", info, re.M)
    return f"QEMU total {total and total.group(1)} ms, downtime {downtime and downtime.group(1)} ms"


@pytest.mark.parametrize("announce", ["guest", "rarp"])
def test_guest_keeps_pinging_through_live_migration(sockdir, peers, vring_proc, announce):
    """announce="guest": the guest negotiates GUEST_ANNOUNCE and sends gratuitous ARPs itself;
    "rarp": the NIC has guest_announce=off, so QEMU asks vring (SEND_RARP) to announce it."""
    require_peer("qemu")
    t0 = time.monotonic()
    socks = [os.path.join(sockdir, f"{c}.sock") for c in ("p", "gsrc", "gdst")]
    args = [*VRING_OPTS, "switch"]
    for s in socks:
        args += ["--socket", s]
    v = vring_proc(*args, cpus=VRING_CPU)
    v.wait_log("port=2 listening", 60)
    mig = os.path.join(sockdir, "mig.sock")
    src, dst = source_and_target(peers, sockdir, socks[1], socks[2], announce, mig)
    p = peers.add(QemuGuest([VhostUserNet(socks[0], mac=MAC_P)], name="p", workdir=sockdir,
                            params={"ip": f"{IP_P}/24", "ping": IP_G, "count": COUNT, "interval": INTERVAL,
                                    "ping_wait": 90}))

    def diag() -> str:
        return guest_tails(p, src, dst) + f"\n--- vring ---\n{v.log_text()[-5000:]}"

    m, info, t_mig = migrate_while_pinging(p, src, dst, mig, diag, t0)
    tx, rx = int(m.group(2)), int(m.group(3))
    lost = tx - rx
    log = v.log_text()
    rarp = "announced 52:54:00:00:02:02" in log
    print(f"\nmigration {t_mig:.1f} s ({qemu_times(info)}); pings tx={tx} rx={rx} lost={lost}; "
          f"announce by {'SEND_RARP' if rarp else 'the guest (GUEST_ANNOUNCE)'}; total {time.monotonic() - t0:.1f} s")
    assert tx == COUNT and lost <= MAX_LOST, f"{m.group(0)}\n{diag()}"
    assert "dirty log of" in log, log[-4000:]  # the source's back-end really logged
    assert rarp == (announce == "rarp"), log[-4000:]
    for g in (p, src, dst):
        g.stop()
    assert v.stop() == 0, v.log_text()[-4000:]
    log = v.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    keep = ("features", "dirty log", "announced", "switch: ", "port ")
    print("\n".join(ln for ln in log.splitlines() if any(k in ln for k in keep)))
    c = v.port_counters()
    # after the switch-over G's frames came in on G-dst and P's pings went out there
    assert c[2]["tx_packets"] > 0 and c[2]["rx_packets"] > 0, c
    assert re.search(r"^switch: .*moved=[1-9]", log, re.M), log[-3000:]


@pytest.mark.parametrize("announce", ["guest", "rarp"])
def test_guest_keeps_pinging_across_two_vring_processes(sockdir, peers, vring_proc, announce):
    """G-src's NIC on vring process A, G-dst's on vring process B; P has a NIC on each, bridged.
    Only B can carry G's announce to P after the switch-over (the guest's, or B's RARP)."""
    require_peer("qemu")
    t0 = time.monotonic()
    a = [os.path.join(sockdir, f"a{i}.sock") for i in (0, 1)]  # A: port 0 = P's eth0, port 1 = G-src
    b = [os.path.join(sockdir, f"b{i}.sock") for i in (0, 1)]  # B: port 0 = P's eth1, port 1 = G-dst
    va = vring_proc(*VRING_OPTS, "net", "--socket", a[0], "--socket", a[1], cpus=VRING_CPU)
    vb = vring_proc(*VRING_OPTS, "net", "--socket", b[0], "--socket", b[1], cpus=VRING_CPU)
    va.wait_log("port=1 listening", 60)
    vb.wait_log("port=1 listening", 60)
    mig = os.path.join(sockdir, "mig.sock")
    src, dst = source_and_target(peers, sockdir, a[1], b[1], announce, mig)
    p = peers.add(QemuGuest([VhostUserNet(a[0], mac=MAC_P), VhostUserNet(b[0], mac=MAC_P1)], name="p",
                            workdir=sockdir, params={"bridge": 1, "ip": f"{IP_P}/24", "ping": IP_G, "count": COUNT,
                                                     "interval": INTERVAL, "ping_wait": 90}))

    def diag() -> str:
        return (guest_tails(p, src, dst) + f"\n--- vring A ---\n{va.log_text()[-4000:]}"
                + f"\n--- vring B ---\n{vb.log_text()[-4000:]}")

    m, info, t_mig = migrate_while_pinging(p, src, dst, mig, diag, t0)
    tx, rx = int(m.group(2)), int(m.group(3))
    lost = tx - rx
    assert any(r.startswith("bridge br0 ports eth0 eth1") for r in p.results()), diag()
    la, lb = va.log_text(), vb.log_text()
    rarp = "port1: announced 52:54:00:00:02:02" in lb
    print(f"\nmigration {t_mig:.1f} s ({qemu_times(info)}); pings tx={tx} rx={rx} lost={lost}; "
          f"announce by {'SEND_RARP to B' if rarp else 'the guest (GUEST_ANNOUNCE)'}; "
          f"total {time.monotonic() - t0:.1f} s")
    assert tx == COUNT and lost <= MAX_LOST, f"{m.group(0)}\n{diag()}"
    # A served the source (QEMU logged through it), B the destination (never asked to log)
    assert "port1: dirty log of" in la, la[-4000:]
    assert "dirty log of" not in lb, lb[-4000:]
    assert rarp == (announce == "rarp") and "announced" not in la, diag()
    for g in (p, src, dst):
        g.stop()
    assert va.stop() == 0 and vb.stop() == 0, diag()
    keep = ("features", "dirty log", "announced", "port ")
    for name, v in (("A", va), ("B", vb)):
        log = v.log_text()
        assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
        print(f"--- vring {name} ---\n" + "\n".join(ln for ln in log.splitlines() if any(k in ln for k in keep)))
    ca, cb = va.port_counters(), vb.port_counters()
    # G was served at both places, and after the switch-over B carried P's pings and G's replies
    assert ca[1]["tx_packets"] > 0 and ca[1]["rx_packets"] > 0, ca
    assert cb[1]["tx_packets"] > 0 and cb[1]["rx_packets"] > 0, cb
    assert cb[0]["rx_packets"] > 0 and cb[0]["tx_packets"] > 0, cb
