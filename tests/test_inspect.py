"""vring.inspect against the in-tree front-end's own view of its rings, after scripted sequences;
snapshots round-trip; torn reads are retried, not shown; the control socket and the Prometheus
collector report the device's counters. The back-end runs in this process (LocalBackend)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from peers import wait_until

from vring import inspect as vi
from vring.control import ControlClient, LocalBackend
from vring.frontend import NET_HDR, Frontend
from vring.layout import COUNTER_NAMES, DESC, DESC_F_INDIRECT, DESC_F_NEXT

pd = pytest.importorskip("pandas")

QSIZE = 16


@pytest.fixture
def backend(sockdir):
    b = LocalBackend([os.path.join(sockdir, "a.sock")], control=os.path.join(sockdir, "c.ctl")).start()
    yield b
    b.stop()


@pytest.fixture
def fe(backend):
    f = Frontend(backend.server.endpoints[0].path, queue_size=QSIZE)
    f.connect()
    f.setup()
    wait_until(lambda: all(backend.dev.qstate["ready"]))
    yield f
    f.close()


def _same_rings(dev_view: vi.QueueState, drv_view: vi.QueueState) -> None:
    """The device-side copy (through qstate host addresses and the region table) and the driver's own views
    hold the same ring; the tables computed from them agree."""
    assert dev_view.size == drv_view.size
    d1, d2 = dev_view.descriptors(), drv_view.descriptors()
    pd.testing.assert_frame_equal(d1.drop(columns=[]), d2.drop(columns=["free"]))
    pd.testing.assert_frame_equal(dev_view.avail_window()[["idx", "slot", "head"]],
                                  drv_view.avail_window()[["idx", "slot", "head"]])
    pd.testing.assert_frame_equal(dev_view.used_window(), drv_view.used_window().drop(columns=["unreclaimed"]))
    i1, i2 = dev_view.indexes(), drv_view.indexes()
    for k in ("avail.idx", "used.idx", "avail.flags", "used.flags", "outstanding"):
        assert i1[k] == i2[k], k
    pd.testing.assert_frame_equal(dev_view.chains(), drv_view.chains())
    # what the driver's bookkeeping says is out (not on its free list) is what the device sees outstanding,
    # plus what is used but not yet taken back by the driver
    u = drv_view.used_window()
    unreclaimed = list(u.loc[u["unreclaimed"], "id"])
    assert sorted(dev_view.outstanding_heads() + unreclaimed) == drv_view.driver_heads()


def test_split_scripted_tx_chains(backend, fe):
    t = fe.tx()
    row = 1  # port 0, vring 1 = TX
    with backend.dev.paused():  # the data plane holds still: the chains stay pending
        h1 = t.add_buffer(bytes(NET_HDR) + b"\x11" * 60)
        segs = [(t.buf_gpa(d), n, False) for d, n in ((t.free[-1], NET_HDR), (t.free[-2], 30), (t.free[-3], 40))]
        h2 = t.add_chain(segs)
        t.publish()
        dev_view = vi.queue(backend.dev, 0, row)
        drv_view = vi.driver_queue(fe, row)
        _same_rings(dev_view, drv_view)
        assert dev_view.pending == 2 and dev_view.in_flight_count == 0
        assert dev_view.outstanding_heads() == [h1, h2]
        ch = dev_view.chains()
        assert list(ch.groupby("head", sort=False).size()) == [1, 3]
        c2 = ch[ch["head"] == h2]
        assert list(c2["addr"]) == [s[0] for s in segs] and list(c2["len"]) == [s[1] for s in segs]
        assert list(c2["flag_names"]) == ["NEXT", "NEXT", "-"] and not c2["write"].any()
        assert (c2["region"] == 0).all()
        fl = dev_view.in_flight()
        assert list(fl["head"]) == [h1, h2] and set(fl["state"]) == {"available"}
        d = dev_view.descriptors()
        second = int(t.desc[h2]["next"])
        assert set(d.index[(d["chain"] == h2).to_numpy()]) == {h2, second, int(t.desc[second]["next"])}
    # running again: the back-end consumes both chains and publishes two used entries
    wait_until(lambda: int(t.used["idx"]) == 2)
    dev_view = vi.queue(backend.dev, 0, row)
    drv_view = vi.driver_queue(fe, row)
    _same_rings(dev_view, drv_view)
    assert dev_view.pending == 0 and dev_view.outstanding == 0
    u = drv_view.used_window().tail(2)
    assert list(u["id"]) == [h1, h2] and list(u["unreclaimed"]) == [True, True]
    assert fe.tx().take_used() == [(h1, 0), (h2, 0)]
    drv_after = vi.driver_queue(fe, row)
    assert not drv_after.used_window()["unreclaimed"].any() and len(drv_after.drv["free"]) == QSIZE
    c = dev_view.counters
    assert c["packets"] == 2 and c["bytes"] == 60 + 70 and c["errors"] == 0


def test_split_scripted_rx_and_loopback(backend, fe):
    rx = fe.rx()
    fe.post_rx(5)
    dev_view = vi.queue(backend.dev, 0, 0)
    _same_rings(dev_view, vi.driver_queue(fe, 0))
    assert dev_view.pending == 5  # RX buffers wait for frames
    ch = dev_view.chains()
    assert len(ch) == 5 and ch["write"].all() and (ch["len"] == fe.buf_size).all()
    assert fe.send_frames([b"\x02" * 60, b"\x03" * 100]) == 2
    wait_until(lambda: int(rx.used["idx"]) == 2)
    dev_view = vi.queue(backend.dev, 0, 0)
    drv_view = vi.driver_queue(fe, 0)
    _same_rings(dev_view, drv_view)
    assert dev_view.pending == 3 and dev_view.outstanding == 3
    assert list(drv_view.used_window().tail(2)["len"]) == [NET_HDR + 60, NET_HDR + 100]
    assert list(dev_view.avail_window()["state"].tail(5)) == ["consumed"] * 2 + ["available"] * 3
    frames = fe.recv_frames()  # reposts two buffers
    assert [len(f) for f in frames] == [60, 100]
    dev_view = vi.queue(backend.dev, 0, 0)
    _same_rings(dev_view, vi.driver_queue(fe, 0))
    assert dev_view.pending == 5
    df = vi.counters(backend.dev)
    pc = backend.dev.port_counters(0)
    assert int(df.loc[df.vring == 0, "packets"].iloc[0]) == pc["rx_packets"] == 2
    assert int(df.loc[df.vring == 1, "packets"].iloc[0]) == pc["tx_packets"] == 2
    assert int(df.loc[df.vring == 0, "pending"].iloc[0]) == 5


def test_split_indirect_chain(backend, fe):
    t = fe.tx()
    with backend.dev.paused():
        # an indirect table of 2 descriptors in slot A, pointing at header+payload in slots B and C
        a, b, c = t.free[-1], t.free[-2], t.free[-3]
        tbl = np.zeros(2, DESC)
        tbl[0] = (t.buf_gpa(b), NET_HDR, DESC_F_NEXT, 1)
        tbl[1] = (t.buf_gpa(c), 64, 0, 0)
        t.buf(a)[: tbl.nbytes] = np.frombuffer(tbl.tobytes(), np.uint8)
        head = t.add_chain([(t.buf_gpa(a), tbl.nbytes, False)])
        t.desc[head]["flags"] = DESC_F_INDIRECT
        t.publish()
        dev_view = vi.queue(backend.dev, 0, 1)
        _same_rings(dev_view, vi.driver_queue(fe, 1))
        ch = dev_view.chains()
        assert list(ch["indirect"]) == [True, True]
        assert list(ch["addr"]) == [t.buf_gpa(b), t.buf_gpa(c)] and list(ch["len"]) == [NET_HDR, 64]
        # the snapshot keeps the indirect table
        snap = vi.Snapshot(vi.snapshot_arrays(backend.dev))
        pd.testing.assert_frame_equal(snap.queue(0, 1).chains(), ch)
    wait_until(lambda: int(t.used["idx"]) == 1)
    assert backend.dev.counters[1, COUNTER_NAMES.index("packets")] == 1


def test_snapshot_round_trip(backend, fe, tmp_path):
    fe.post_rx(7)
    fe.send_frames([b"\x05" * 80] * 3)
    wait_until(lambda: int(fe.rx().used["idx"]) == 3)
    with backend.dev.paused():
        live = {k: vi.queue(backend.dev, *k) for k in ((0, 0), (0, 1))}
        path = vi.save(backend.dev, str(tmp_path / "s.npz"))
        counters = vi.counters(backend.dev)
    snap = vi.load(path)
    assert snap.rows() == [(0, 0), (0, 1)]
    for k, st in live.items():
        s2 = snap.queue(*k)
        for table in ("descriptors", "avail_window", "used_window", "chains", "in_flight"):
            pd.testing.assert_frame_equal(getattr(s2, table)(), getattr(st, table)(), obj=table)
        assert s2.indexes().equals(st.indexes())
        assert s2.counters == st.counters
    pd.testing.assert_frame_equal(snap.counters(), counters)
    # and the same through the control socket, as `vring snapshot` does it
    with ControlClient(backend.control.path) as c:
        out = c.snapshot(str(tmp_path / "c.npz"))
    snap2 = vi.load(out)
    assert snap2.meta["pid"] == os.getpid() and snap2.rows() == [(0, 0), (0, 1)]
    pd.testing.assert_frame_equal(snap2.queue(0, 1).descriptors(), live[(0, 1)].descriptors())


def test_torn_reads_are_retried_not_shown(backend, fe, monkeypatch):
    fe.post_rx(2)
    real = vi._device_indexes
    calls = {"n": 0}

    def moving(q, memory):  # the first 5 reads see the indexes move under the copy
        calls["n"] += 1
        idx = real(q, memory)
        return (idx[0] + calls["n"], *idx[1:]) if calls["n"] <= 10 else idx

    monkeypatch.setattr(vi, "_device_indexes", moving)
    st = vi.queue(backend.dev, 0, 0)
    assert st.attempts == 6 and st.pending == 2
    calls["n"] = -10_000  # never stable
    with pytest.raises(vi.TornRead):
        vi.queue(backend.dev, 0, 0, retries=20)


def test_under_traffic_copies_are_consistent(backend, fe):
    """With the jitted generator running, every copy is self-consistent (indexes within the ring size)."""
    from vring.generator import Generator

    g = Generator(fe, "flowgen", burst=8)
    g.start()
    try:
        wait_until(lambda: g.totals()["rx_packets"] > 1000, timeout=60)
        for _ in range(50):
            for v in (0, 1):
                st = vi.queue(backend.dev, 0, v)
                assert st.outstanding <= QSIZE and st.pending <= st.outstanding
                assert st.in_flight_count <= QSIZE
    finally:
        g.stop()


def test_control_sample_and_features(backend, fe):
    fe.post_rx()
    fe.send_frames([b"\x07" * 64] * 4)
    wait_until(lambda: int(fe.rx().used["idx"]) == 4)
    with ControlClient(backend.control.path) as c:
        s = c.sample()
    assert s["pid"] == os.getpid() and s["nports"] == 1
    p = s["ports"][0]
    assert p["connected"] and p["features"] == fe.features and p["protocol_features"] == fe.protocol_features
    assert "VERSION_1" in p["features_names"]
    q = {x["vring"]: x for x in s["queues"]}
    assert q[0]["packets"] == 4 and q[1]["packets"] == 4 and q[0]["bytes"] == 256
    assert q[0]["pending"] == QSIZE - 4 and q[0]["broken"] == 0
    assert p["counters"] == backend.dev.port_counters(0)


def test_prometheus_scrape_parses_and_matches(backend, fe):
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    from vring.metrics import serve

    fe.post_rx()
    fe.send_frames([b"\x09" * 64] * 3)
    wait_until(lambda: int(fe.rx().used["idx"]) == 3)
    m = serve(backend.dev, backend.server, "127.0.0.1:0")
    try:
        assert m.host == "127.0.0.1"
        text = urlopen(m.url, timeout=10).read().decode()
    finally:
        m.close()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("packets", "bytes", "drops", "calls", "errors", "batches"):
        metric = {"calls": "vring_notifications"}.get(name, f"vring_{name}")
        got = {(s.labels["port"], s.labels["vring"]): s.value for s in fams[metric].samples
               if s.name.endswith("_total")}
        col = COUNTER_NAMES.index(name)
        assert got == {("0", str(v)): float(backend.dev.counters[v, col]) for v in (0, 1)}, name
    ready = {s.labels["vring"]: s.value for s in fams["vring_queue_ready"].samples}
    assert ready == {"0": 1.0, "1": 1.0}
    assert fams["vring_packets"].samples[0].value == 3.0
    assert [s.value for s in fams["vring_port_connected"].samples] == [1.0]


# ---------------------------------------------------------------- packed rings, scripted by hand
# (the in-tree front-end drives split rings only: here the test plays the driver of a packed ring,
# and the device's positions are set as vring.packed leaves them after each batch)


class PackedRig:
    """One packed ring of ``size`` in a memfd mapped through a real GuestMemory, and a fake device row."""

    GPA = 0x2_0000_0000

    def __init__(self, size: int):
        import mmap
        import types

        from vring.layout import new_qstate
        from vring.memory import MAX_REGIONS, GuestMemory

        self.size = size
        fd = os.memfd_create("packed-rig", os.MFD_CLOEXEC)
        os.ftruncate(fd, 1 << 20)
        self.mm = mmap.mmap(fd, 1 << 20, flags=mmap.MAP_SHARED)
        regions = np.zeros((1, MAX_REGIONS, 4), np.uint64)
        self.gm = GuestMemory(regions[0])
        r = self.gm.add(self.GPA, 1 << 20, 0x7F00_0000_0000, 0, os.dup(fd))
        os.close(fd)
        qs = new_qstate(2)
        q = qs[0]
        q["size"], q["ready"], q["packed"] = size, 1, 1
        q["desc"], q["avail"], q["used"] = r.hva, r.hva + 0x1000, r.hva + 0x1004
        q["avail_wrap"] = q["used_wrap"] = 1
        self.dev = types.SimpleNamespace(qstate=qs, counters=np.zeros((2, len(COUNTER_NAMES)), np.uint64),
                                         regions=regions, memory=[self.gm], nvq=2, nports=1,
                                         row=lambda p, i: p * 2 + i)
        from vring.layout import PACKED_DESC

        self.ring = np.frombuffer(self.mm, PACKED_DESC, size, 0)
        self.next, self.wrap = 0, 1  # the driver's position

    def post(self, buf_id: int, lens: list[int], write: bool = False) -> int:
        """Make a chain available (flags of the first descriptor last, as a driver must)."""
        from vring.layout import DESC_F_WRITE, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED

        start, first_flags = self.next, 0
        for i, ln in enumerate(lens):
            fl = (DESC_F_NEXT if i < len(lens) - 1 else 0) | (DESC_F_WRITE if write else 0)
            fl |= PACKED_DESC_F_AVAIL if self.wrap else PACKED_DESC_F_USED
            e = self.ring[self.next]
            e["addr"], e["len"], e["id"] = self.GPA + 0x10000 + 0x800 * self.next, ln, buf_id
            if i == 0:
                first_flags = fl
            else:
                e["flags"] = fl
            self.next += 1
            if self.next == self.size:
                self.next, self.wrap = 0, self.wrap ^ 1
        self.ring[start]["flags"] = first_flags
        return start

    def device_uses(self, chains: list[tuple[int, int, int]]) -> None:
        """The device pops chains [(buf_id, ndesc, written len)] and publishes one used element each."""
        from vring.layout import PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED

        q = self.dev.qstate[0]
        for buf_id, ndesc, ln in chains:
            e = self.ring[int(q["used_idx"])]
            e["id"], e["len"] = buf_id, ln
            e["flags"] = (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED) if q["used_wrap"] else 0
            for name, wrap in (("used_idx", "used_wrap"), ("last_avail_idx", "avail_wrap")):
                v = int(q[name]) + ndesc
                if v >= self.size:
                    v -= self.size
                    q[wrap] ^= 1
                q[name] = v

    def close(self) -> None:
        self.ring = None
        self.gm.clear()
        self.mm.close()


def test_packed_scripted_chains_and_wrap():
    rig = PackedRig(4)
    try:
        a = rig.post(5, [NET_HDR, 60])
        b = rig.post(7, [100])
        st = vi.queue(rig.dev, 0, 0)
        assert st.layout == "packed" and isinstance(st, vi.PackedQueueState)
        assert st.pending == 2 and st.pending_descriptors == 3 and st.in_flight_count == 0
        assert st.outstanding_heads() == [5, 7]
        ch = st.chains()
        assert list(ch["head"]) == [a, a, b] and list(ch["id"]) == [5, 5, 7]
        assert list(ch["len"]) == [NET_HDR, 60, 100] and list(ch["flag_names"]) == ["NEXT|AVAIL", "AVAIL", "AVAIL"]
        assert (ch["region"] == 0).all()
        d = st.descriptors()
        assert list(d["state"]) == ["available", "available", "available", "-"]
        assert list(st.avail_window()["ndesc"]) == [2, 1]
        ix = st.indexes()
        assert (ix["dev.last_avail_idx"], ix["dev.avail_wrap"], ix["outstanding"]) == (0, 1, 3)
        # the device uses chain 5 (2 descriptors): one used element in slot 0
        rig.device_uses([(5, 2, 72)])
        st = vi.queue(rig.dev, 0, 0)
        assert st.outstanding_heads() == [7]
        assert st.used_window().to_dict("records") == [{"idx": 0, "wrap": 1, "id": 5, "len": 72}]
        assert st.descriptors().loc[0, "state"] == "used"
        # the driver posts across the end of the ring: the chain's second descriptor is in the next lap
        c = rig.post(9, [10, 20])
        assert (c, rig.wrap) == (3, 0)
        st = vi.queue(rig.dev, 0, 0)
        assert st.outstanding_heads() == [7, 9] and st.pending_descriptors == 3
        assert list(st.chain(c)[i]["desc"] for i in (0, 1)) == [3, 0]
        # the device uses both: positions wrap, and the used element of lap 2 has AVAIL = USED = 0
        rig.device_uses([(7, 1, 0), (9, 2, 30)])
        st = vi.queue(rig.dev, 0, 0)
        ix = st.indexes()
        assert (ix["dev.used_idx"], ix["dev.used_wrap"], ix["pending"]) == (1, 0, 0)
        u = st.used_window()
        # a used element goes where its chain started: id 9 in slot 3, still written with lap 1's wrap
        assert u.to_dict("records") == [{"idx": 2, "wrap": 1, "id": 7, "len": 0},
                                        {"idx": 3, "wrap": 1, "id": 9, "len": 30}]
        assert st.descriptors().loc[0, "flag_names"] == "USED"  # chain 9's second descriptor, lap 2 (wrap 0)
        # snapshot round trip keeps the layout
        snap = vi.Snapshot(vi.snapshot_arrays(rig.dev))
        s2 = snap.queue(0, 0)
        assert isinstance(s2, vi.PackedQueueState)
        for table in ("descriptors", "avail_window", "used_window", "chains"):
            pd.testing.assert_frame_equal(getattr(s2, table)(), getattr(st, table)(), obj=table)
        assert snap.counters().loc[0, "layout"] == "packed"
    finally:
        rig.close()


def test_broken_queue_reason_in_sample_table_and_metrics(backend, fe):
    from prometheus_client.parser import text_string_to_metric_families

    from vring.metrics import generate

    t = fe.tx()
    t.add_chain([(0xDEAD_0000, 64, False)])  # a buffer outside guest memory
    t.publish()
    wait_until(lambda: backend.dev.qstate[1]["broken"] != 0)
    with ControlClient(backend.control.path) as c:
        q = {x["vring"]: x for x in c.sample()["queues"]}
    assert q[1]["broken_reason"] == "descriptor buffer outside guest memory" and q[1]["errors"] == 1
    assert q[0]["broken"] == 0  # the other queue keeps running
    st = vi.queue(backend.dev, 0, 1)  # a broken ring can still be looked at
    assert st.indexes()["broken"] == q[1]["broken"] and st.chains()["region"].tolist() == [-1]
    fams = {f.name: f for f in text_string_to_metric_families(generate(backend.dev, backend.server).decode())}
    broken = {s.labels["vring"]: s.value for s in fams["vring_queue_broken"].samples}
    assert broken == {"0": 0.0, "1": float(q[1]["broken"])}
