"""``vring stats --once --json``, ``vring snapshot`` and ``--metrics`` against a ``vring net`` process.

With DPDK testpmd as the front-end (peer test): the counters rise while traffic runs, with no
drop (frames wait in the sender's ring), and, once it stops, match testpmd's own counts; a
Prometheus scrape parses and matches the same sample.
With the in-tree jitted generator: the same commands, no peer needed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from urllib.request import urlopen

import pytest
from peers import Testpmd, require_peer, wait_until

from vring import inspect as vi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vring_cli(*args: str, timeout: float = 60) -> str:
    r = subprocess.run([sys.executable, "-m", "vring", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def stats_json(ctl: str, interval: float = 0.3) -> dict:
    out = vring_cli("stats", "--control", ctl, "--once", "--json", "--interval", str(interval))
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def by_queue(s: dict) -> dict[tuple[int, int], dict]:
    return {(q["port"], q["vring"]): q for q in s["queues"]}


def scrape(log_text: str) -> dict[tuple[str, str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    url = re.search(r"metrics: (http://\S+)", log_text).group(1)
    assert url.startswith("http://127.0.0.1:")  # loopback by default
    text = urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if "vring" in s.labels:
                out[(s.name, s.labels["port"], s.labels["vring"])] = s.value
    return out


def check_scrape_matches(m: dict, s: dict) -> None:
    for q in s["queues"]:
        key = (str(q["port"]), str(q["vring"]))
        assert m[("vring_packets_total", *key)] == q["packets"]
        assert m[("vring_bytes_total", *key)] == q["bytes"]
        assert m[("vring_drops_total", *key)] == q["drops"]
        assert m[("vring_notifications_total", *key)] == q["calls"]
        assert m[("vring_errors_total", *key)] == q["errors"]
        assert m[("vring_queue_broken", *key)] == q["broken"]


@pytest.mark.peer
@pytest.mark.parametrize("layout", ["split", "packed"])
def test_stats_under_testpmd_match_testpmd(sockdir, peers, vring_proc, tmp_path, layout):
    require_peer("testpmd")
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    ctl = os.path.join(sockdir, "v.ctl")
    # a hold far above any scheduling hiccup on a shared CI machine: no frame may be dropped here
    v = vring_proc("net", "--socket", a, "--socket", b, "--control", ctl, "--metrics", "127.0.0.1:0",
                   "--hold-us", "300000", cpus="0")
    v.wait_log("control socket:", 60)
    fe = peers.add(Testpmd([a, b], "flowgen", cpus=(0, 1), frame_size=64, burst=32, workdir=sockdir, name="fe",
                           devargs="packed_vq=1" if layout == "packed" else ""))
    fe.wait_forwarding(60)
    v.wait_log("port=1 front-end connected", 60)
    fe.wait_traffic(60, direction="rx")
    s1 = stats_json(ctl)
    time.sleep(1.0)
    s2 = stats_json(ctl)
    snap = str(tmp_path / "live.npz")
    assert "snapshot of pid" in vring_cli("snapshot", "--control", ctl, "--out", snap)
    fs = fe.stop()
    time.sleep(0.5)
    final = stats_json(ctl, interval=0)
    m = scrape(v.log_text())
    # while traffic ran: every vring moved frames, the counters rose, rates were measured, features negotiated
    q1, q2 = by_queue(s1), by_queue(s2)
    for k in q2:
        assert q2[k]["packets"] > q1[k]["packets"] > 0, k
        assert q2[k]["mpps"] > 0 and q2[k]["broken"] == 0
        # testpmd sends flat out and its RX rings fill: vring holds frames in the sender's ring
        # instead of dropping them (--hold-us), so no ring counted a drop in that second
        assert q2[k]["drops"] == q1[k]["drops"], (k, q1[k]["drops"], q2[k]["drops"])
    for p in s2["ports"]:
        assert p["connected"] and "VERSION_1" in p["features_names"]
        assert ("RING_PACKED" in p["features_names"]) == (layout == "packed")
    assert {q["layout"] for q in s2["queues"]} == {layout}
    # once stopped: vring's per-port counts agree with testpmd's own
    assert fs.complete
    for p in (0, 1):
        tx, rx = fs.ports[p]["tx_packets"], fs.ports[p]["rx_packets"]
        c = final["ports"][p]["counters"]
        assert 0.99 * tx <= c["tx_packets"] <= tx, (p, c, tx)
        assert c["rx_packets"] >= rx, (p, c, rx)
        assert c["errors"] == 0
    check_scrape_matches(m, final)
    # the snapshot taken under traffic holds all four started vrings, each copy self-consistent
    sn = vi.load(snap)
    assert sorted(sn.rows()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for port, vr in sn.rows():
        st = sn.queue(port, vr)
        assert st.layout == layout
        assert st.outstanding <= st.size and st.pending <= st.outstanding
        assert len(st.chains()) >= st.pending and len(st.descriptors()) == st.size
    assert v.stop() == 0


def test_stats_snapshot_metrics_with_in_tree_generator(sockdir, vring_proc, tmp_path):
    from vring.frontend import Frontend
    from vring.generator import Generator

    a = os.path.join(sockdir, "a.sock")
    ctl = os.path.join(sockdir, "v.ctl")
    v = vring_proc("net", "--socket", a, "--control", ctl, "--metrics", "0")
    v.wait_log("control socket:", 60)
    fe = Frontend(a, queue_size=256)
    fe.connect()
    fe.setup()
    g = Generator(fe, "flowgen", burst=32)
    g.start()
    try:
        deadline = time.monotonic() + 60
        while g.totals()["rx_packets"] < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        s1 = stats_json(ctl)
        s2 = stats_json(ctl)
        snap = str(tmp_path / "s.npz")
        vring_cli("snapshot", "--control", ctl, "--out", snap)
        human = vring_cli("stats", "--control", ctl, "--once", "--interval", "0.2")
    finally:
        g.stop()
    tot = g.totals()
    time.sleep(0.3)
    final = stats_json(ctl, interval=0)
    m = scrape(v.log_text())
    fe.close()
    q1, q2 = by_queue(s1), by_queue(s2)
    assert q2[(0, 1)]["packets"] > q1[(0, 1)]["packets"] > 0 and q2[(0, 1)]["mpps"] > 0
    assert q2[(0, 0)]["packets"] > q1[(0, 0)]["packets"] > 0
    # the back-end took what the generator counted as sent (plus at most the ring it hadn't reclaimed
    # when it stopped) and delivered at least what it counted as received
    fq = by_queue(final)
    assert tot["tx_packets"] <= fq[(0, 1)]["packets"] <= tot["tx_packets"] + fe.queue_size
    assert tot["rx_packets"] <= fq[(0, 0)]["packets"] <= tot["rx_packets"] + fe.queue_size
    check_scrape_matches(m, final)
    assert "rx" in human and "VERSION_1" in human
    sn = vi.load(snap)
    assert sorted(sn.rows()) == [(0, 0), (0, 1)] and not sn.meta["skipped"]
    assert v.stop() == 0


def test_stats_by_pid_and_default_path(sockdir, vring_proc):
    a = os.path.join(sockdir, "a.sock")
    v = vring_proc("net", "--socket", a)
    v.wait_log("control socket:", 60)
    path = re.search(r"control socket: (\S+)", v.log_text()).group(1)
    assert path == f"/tmp/vring-{v.proc.pid}.ctl" or path.endswith(f"vring-{v.proc.pid}.ctl")
    s = json.loads(vring_cli("stats", "--pid", str(v.proc.pid), "--once", "--json", "--interval", "0"))
    assert s["pid"] == v.proc.pid and not s["ports"][0]["connected"]
    assert v.stop() == 0
    assert not os.path.exists(path)


def test_poll_statistics_count_each_poll_by_what_it_found(sockdir):
    """The loop's self-measurement: a batch the driver publishes at once is one poll that found all
    of it; every other poll found nothing. One busy round in BUSY_SAMPLE is timed: its cycles and
    frames give the busy time per frame."""
    from vring.control import LocalBackend
    from vring.dataplane import BUSY_CYCLES, BUSY_FRAMES, BUSY_OPEN, BUSY_SAMPLE, BUSY_SINCE, BUSY_TIMED_FRAMES
    from vring.frontend import Frontend

    b = LocalBackend([os.path.join(sockdir, "a.sock")], idle_rounds=0).start()  # --poll: never sleeps
    try:
        fe = Frontend(b.server.endpoints[0].path, queue_size=64)
        fe.connect()
        fe.setup()
        dev = b.dev
        wait_until(lambda: all(dev.qstate["ready"]) and dev.polls[0] > 1000)
        assert dev.polls[1:].sum() == 0 and dev.busy[BUSY_FRAMES] == 0 and dev.busy[BUSY_CYCLES] == 0
        fe.post_rx()
        assert fe.send_frames([bytes(60)] * 8) == 8  # one avail index store: one poll finds all 8
        wait_until(lambda: dev.busy[BUSY_FRAMES] == 8 and dev.busy[BUSY_OPEN] == 0)  # the round closed
        assert dev.polls[8] == 1 and dev.polls[1:].sum() == 1
        assert dev.busy[BUSY_CYCLES] == 0 and dev.busy[BUSY_TIMED_FRAMES] == 0  # the first busy round: not timed
        assert len(fe.recv_frames()) == 8  # and the loop did forward them
        for i in range(1, BUSY_SAMPLE):  # one frame per busy round, up to the timed one
            assert fe.send_frames([bytes(60)]) == 1
            wait_until(lambda i=i: dev.busy[BUSY_FRAMES] == 8 + i and dev.busy[BUSY_OPEN] == 0)
            assert len(fe.recv_frames()) == 1
        wait_until(lambda: dev.busy[BUSY_SINCE] == 0 and dev.busy[BUSY_CYCLES] > 0)  # the timed span closed
        assert dev.polls[1] == BUSY_SAMPLE - 1 and dev.busy[BUSY_TIMED_FRAMES] == 1
        ps = dev.poll_stats()
        assert 0 < ps["empty_share"] < 1 and ps["ns_per_frame"] > 0
        # the raw counts behind the shares, for readers that difference two samples (bench/e2e.py)
        assert ps["frames"] == 8 + BUSY_SAMPLE - 1 and ps["timed_frames"] == 1 and ps["busy_cycles"] > 0
        assert 0 < ps["empty"] < ps["polls"] and ps["empty"] / ps["polls"] == ps["empty_share"]
        fe.close()
    finally:
        b.stop()
