"""virtio-net front-end variants through ``vring net`` (xconnect), with real peers.

1. DPDK testpmd, one process with two virtio-user ports in flowgen mode, over the virtio-user
   devargs that change the ring format and the negotiated features: packed rings, no IN_ORDER,
   no MRG_RXBUF, their combinations, 2 queue pairs, 1500-byte frames, and testpmd as the socket
   server (``server=1``) with ``vring --client``.  For each direction the receiving port must get
   at least 99% of what the other port sent (and never more); vring's own counters must agree.
   With 2 queue pairs, vring's per-queue counters (control socket, sampled while traffic runs)
   must show frames on every RX and TX vring of both pairs of both ports.
2. Two QEMU Linux guests (TCG) pinging each other through vring with ``packed=on``, ``mq=on``
   (2 queue pairs, 2 vCPUs per guest) and ``mrg_rxbuf=off``: 20 pings, none lost.

Offloads (CSUM/TSO) are not implemented in vring yet and are not tested here.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
from peers import QemuGuest, Testpmd, VhostUserNet, require_peer, wait_for_socket
from test_qemu import IP1, IP2, MAC1, MAC2, VRING_CPU, VRING_OPTS, _ping_and_check

from vring.control import ControlClient
from vring.protocol import F

pytestmark = pytest.mark.peer

SECONDS = 2.5  # traffic per testpmd case


# --------------------------------------------------------------------------------------------
# helpers


def _sample(ctl: str) -> dict:
    """One stats sample from vring's control socket (what ``vring stats --once --json`` prints)."""
    with ControlClient(ctl, timeout=5) as c:
        return c.sample()


def _queue_packets(s: dict) -> dict[tuple[int, int, str], int]:
    """(port, pair, "rx"|"tx") -> packets, from a stats sample."""
    return {(q["port"], q["pair"], q["dir"]): q["packets"] for q in s["queues"]}


def _broken(s: dict) -> list[str]:
    return [f"port {q['port']} vring {q['vring']}: {q['broken_reason']}" for q in s["queues"] if q["broken"]]


class _Sampler(threading.Thread):
    """Samples vring's control socket every ``period`` s until stopped (or vring is gone).

    vring prints only per-port totals at exit, and a port's negotiated features vanish from the
    samples when its front-end disconnects, so this keeps, over all samples: each port's features
    while it was connected, the highest packet count of every (port, pair, dir), broken vrings."""

    def __init__(self, ctl: str, period: float = 0.5):
        super().__init__(daemon=True)
        self.ctl, self.period = ctl, period
        self.samples = 0
        self.features: dict[int, F] = {}
        self.packets: dict[tuple[int, int, str], int] = {}
        self.broken: set[str] = set()
        self.error: str | None = None
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            try:
                s = _sample(self.ctl)
            except (OSError, ConnectionError, RuntimeError, ValueError) as e:
                self.error = repr(e)
            else:
                self.samples += 1
                for p in s["ports"]:
                    if p.get("connected") and p.get("features"):
                        self.features[p["port"]] = F(p["features"])
                for k, n in _queue_packets(s).items():
                    self.packets[k] = max(n, self.packets.get(k, 0))
                self.broken.update(_broken(s))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# --------------------------------------------------------------------------------------------
# 1. DPDK testpmd (virtio-user) variants

# id: (virtio-user devargs, queue pairs, frame size, testpmd is the socket server)
TESTPMD_CASES = {
    "packed": ("packed_vq=1", 1, 64, False),
    "no_in_order": ("in_order=0", 1, 64, False),
    "no_mrg_rxbuf": ("mrg_rxbuf=0", 1, 64, False),
    "packed_no_in_order": ("packed_vq=1,in_order=0", 1, 64, False),
    "queues2": ("", 2, 64, False),
    "frame1500": ("", 1, 1500, False),
    "packed_no_mrg_rxbuf_1500": ("packed_vq=1,mrg_rxbuf=0", 1, 1500, False),
    "packed_testpmd_server_vring_client": ("packed_vq=1", 1, 64, True),
}


def _check_xconnect(fs, min_frames):
    tx = {p: fs.ports[p]["tx_packets"] for p in (0, 1)}
    rx = {p: fs.ports[p]["rx_packets"] for p in (0, 1)}
    for src, dst in ((0, 1), (1, 0)):
        assert tx[src] >= min_frames, f"port {src} sent only {tx[src]}"
        assert rx[dst] <= tx[src], f"port {dst} received {rx[dst]} > {tx[src]} sent"
        assert rx[dst] >= 0.99 * tx[src], f"port {dst} received {rx[dst]} of {tx[src]} ({rx[dst] / tx[src]:.4f})"
    return tx, rx


@pytest.mark.parametrize("case", list(TESTPMD_CASES))
def test_testpmd_variant(case, sockdir, peers, vring_proc):
    require_peer("testpmd")
    devargs, queues, frame, fe_server = TESTPMD_CASES[case]
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = os.path.join(sockdir, "vring.ctl")
    args = ["net", "--socket", a, "--socket", b, "--control", ctl]
    if queues > 1:
        args += ["--queues", str(queues)]
    if fe_server:
        args.insert(1, "--client")
    fe = Testpmd([a, b], "flowgen", server=True if fe_server else None, devargs=devargs, queues=queues,
                 cpus=(0, 1), frame_size=frame, burst=32, workdir=sockdir, name="fe")
    if fe_server:
        peers.add(fe)  # starts it; with server=1 testpmd listens (one port after the other)
        wait_for_socket(a, 30, proc=fe)
        v = vring_proc(*args, cpus="0")
    else:
        v = vring_proc(*args, cpus="0")
        v.wait_log("port=1 listening", 60)
        peers.add(fe)

    def diag():
        return f"\n{fe.log_tail(30)}\n--- vring ---\n{v.log_text()[-4000:]}"

    try:
        fe.wait_forwarding(60)
        v.wait_log("port=1 front-end connected", 60)
        fe.wait_traffic(30, direction="rx")
    except Exception as e:
        raise AssertionError(f"{case}: no traffic: {e}{diag()}") from e
    time.sleep(SECONDS)
    live = _sample(ctl)  # while traffic runs: per-queue counters, negotiated features
    fs = fe.stop()
    time.sleep(0.3)
    assert fs.complete, diag()
    tx, rx = _check_xconnect(fs, min_frames=20_000 if frame >= 1500 else 50_000)
    assert v.stop() == 0, diag()
    c = v.port_counters()
    feats = {p["port"]: F(p.get("features", 0)) for p in live["ports"]}
    print(f"\n{case}: testpmd tx={tx} rx={rx}\nvring {c}\nfeatures {feats}")
    assert not _broken(live), _broken(live)
    for p in (0, 1):
        # what vring took from port p is what testpmd sent there (testpmd stops with frames
        # still in its rings, so vring may have taken slightly fewer); it delivered all it received
        assert 0.99 * tx[p] <= c[p]["tx_packets"] <= tx[p], (p, c, tx)
        assert c[p]["rx_packets"] >= rx[p], (p, c, rx)
        assert c[p]["errors"] == 0, c
    # xconnect: every frame taken from one port was delivered to the other or counted as dropped
    for src, dst in ((0, 1), (1, 0)):
        assert c[src]["tx_packets"] == c[dst]["rx_packets"] + c[dst]["rx_dropped"], c
    # the devargs took effect in what was negotiated
    for p in (0, 1):
        f = feats[p]
        assert F.VERSION_1 in f, feats
        assert (F.RING_PACKED in f) == ("packed_vq=1" in devargs), feats
        if "in_order=0" in devargs:
            assert F.IN_ORDER not in f, feats
        if "mrg_rxbuf=0" in devargs:
            assert F.NET_MRG_RXBUF not in f, feats
    if queues > 1:
        qp = _queue_packets(live)
        print(f"per queue (port, pair, dir): {qp}")
        for p in (0, 1):
            assert F.NET_MQ in feats[p], feats
            for pair in range(queues):
                for d in ("rx", "tx"):
                    assert qp.get((p, pair, d), 0) > 0, f"port {p} pair {pair} {d} carried nothing: {qp}"


# --------------------------------------------------------------------------------------------
# 2. QEMU Linux guests


QEMU_CASES = {
    "packed": dict(props="packed=on"),
    # 2 vCPUs: Linux uses min(#CPUs, max pairs) = 2 pairs, and XPS maps CPU k to TX queue k.
    # Guest 1's processes (ping) run on CPU 1 only (isolcpus=0), so its echo requests leave on
    # pair 1; guest 2 sends its echo replies from the RX softirq of its (INTx) interrupt, which
    # x86 delivers to CPU 0: they leave on pair 0.  (Unpinned, the pair of each frame depends on
    # where the guest scheduler ran ping; irqaffinity=1 on guest 2 did not move its replies.)
    "mq2": dict(queues=2, smp=2, append1="isolcpus=0"),
    "no_mrg_rxbuf": dict(props="mrg_rxbuf=off"),
}


@pytest.mark.parametrize("case", list(QEMU_CASES))
def test_qemu_variant_ping(case, sockdir, peers, vring_proc):
    require_peer("qemu")
    opt = QEMU_CASES[case]
    queues, smp, props = opt.get("queues", 1), opt.get("smp", 1), opt.get("props", "")
    count = 20
    t0 = time.monotonic()
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = os.path.join(sockdir, "vring.ctl")
    args = ["net", "--socket", a, "--socket", b, "--control", ctl]
    if queues > 1:
        args += ["--queues", str(queues)]
    v = vring_proc(*VRING_OPTS, *args, cpus=VRING_CPU)
    v.wait_log("port=1 listening", 60)
    extra = ["-smp", str(smp)] if smp > 1 else []
    g2 = peers.add(QemuGuest([VhostUserNet(b, mac=MAC2, queues=queues, props=props)], name="g2",
                             workdir=sockdir, params={"ip": f"{IP2}/24", "wait": 300}, extra_args=extra,
                             append=opt.get("append2", "")))
    g1 = peers.add(QemuGuest([VhostUserNet(a, mac=MAC1, queues=queues, props=props)], name="g1",
                             workdir=sockdir, params={"ip": f"{IP1}/24", "ping": IP2, "count": count,
                                                      "interval": 0.1, "ping_wait": 40},
                             extra_args=extra, append=opt.get("append1", "")))
    v.wait_log("control socket:", 60)
    sampler = _Sampler(ctl)
    sampler.start()
    try:
        c = _ping_and_check(v, g1, g2, count, t0)  # stops the guests and vring
    finally:
        sampler.stop()
    assert sampler.samples, f"no stats sample from {ctl}: {sampler.error}"
    feats, qp = sampler.features, sampler.packets
    print(f"{case}: vring {c}\nfeatures {feats}\nper queue (port, pair, dir), highest: {qp}")
    assert not sampler.broken, sampler.broken
    assert set(feats) == {0, 1}, f"features not sampled for both ports: {feats}"
    for p in (0, 1):
        assert (F.RING_PACKED in feats[p]) == ("packed=on" in props), feats
        if "mrg_rxbuf=off" in props:
            assert F.NET_MRG_RXBUF not in feats[p], feats
    if queues > 1:
        for p in (0, 1):
            assert F.NET_MQ in feats[p], feats
        # both pairs carried pings, each through the same pair on both ports (xconnect: pair k of
        # port A <-> pair k of port B): the requests on pair 1, the replies on pair 0 (see QEMU_CASES)
        assert qp.get((0, 1, "tx"), 0) >= count and qp.get((1, 1, "rx"), 0) >= count, f"requests, pair 1: {qp}"
        assert qp.get((1, 0, "tx"), 0) > 0 and qp.get((0, 0, "rx"), 0) > 0, f"replies, pair 0: {qp}"
        assert qp.get((1, 0, "tx"), 0) + qp.get((1, 1, "tx"), 0) >= count, qp
