"""bench/xcore.py's cache-line round trip, and how bench/e2e.py uses it to pair runs made under the
same latency between the cores (the host moves these VMs' vCPUs: ~90 ns one spell, ~320 the next)."""
from __future__ import annotations

import argparse
import os
import sys
import time

import pytest
from conftest import bench_script


@pytest.fixture(scope="module")
def e2e():
    return bench_script("e2e")


@pytest.fixture(scope="module")
def xcore():
    # imported by its own name, as bench/e2e.py does: numba's cache of its kernels records the module
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import xcore

    return xcore


def test_round_trip_between_two_cpus(xcore):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail("this test needs two CPUs (CI has two)")
    ns = xcore.round_trip_ns((cpus[0], cpus[1]), rounds=2000)
    # two threads really handed the line over 2000 times (a hang would be a None after 10 s):
    # a round trip between cores costs at least a few ns and, busy VM or not, far less than 1 ms
    assert ns is not None and 1 < ns < 1e6
    # as e2e reads it during a run: real-time threads where allowed (root in CI), the same figure
    ns = xcore.round_trip_ns((cpus[0], cpus[1]), rounds=2000, urgent=True)
    assert ns is not None and 1 < ns < 1e6
    assert xcore.round_trip_ns((cpus[0], cpus[0])) is None  # one CPU: nothing to measure
    assert xcore.round_trip_ns((cpus[0], 4096)) is None  # a CPU we may not run on


def _run(backend, rep, mpps, lat, during=None):
    r = {"frontend": "testpmd", "variant": "packed", "dir": "loop", "burst": 32, "size": 64,
         "backend": backend, "rep": rep, "mpps": mpps, "xcore_ns": lat}
    if during is not None:
        r["xcore_during"] = during
    return r


def test_latency_of_a_run_counts_the_readings_taken_during_it(e2e):
    assert e2e.latency(_run("vring", 0, 6.0, [80, 85])) == "near"  # a set from before the readings during
    assert e2e.latency(_run("vring", 0, 6.0, [80, 85], [82, 79, 84])) == "near"
    assert e2e.latency(_run("vring", 0, 2.0, [320, 330], [325, 331])) == "far"
    # before and after agree, but the host moved the vCPUs away and back in the middle of the run
    assert e2e.latency(_run("dpdk", 0, 4.8, [80, 85], [82, 330, 84])) == "mixed"
    assert e2e.latency(_run("dpdk", 0, 4.8, [330, 325], [82, 83, 84])) == "mixed"
    assert e2e.xcore_reads(_run("dpdk", 0, 4.8, [330, 325], [82, 83])) == [330, 82, 83, 325]


def test_steady_pairs_are_the_ones_measured_at_one_latency(e2e):
    runs = [
        _run("vring", 0, 12.0, [90, 95]), _run("dpdk", 0, 10.0, [92, 100]),  # steady: 1.2
        _run("vring", 1, 6.0, [320, 330]), _run("dpdk", 1, 12.0, [95, 90]),  # the host moved a vCPU: out
        _run("vring", 2, 7.0, [320, 321]), _run("dpdk", 2, 7.0, [330, 318]),  # steady at the far latency
        _run("vring", 3, 7.0, [90, 300]), _run("dpdk", 3, 9.0, [300, 300]),  # moved during the vring run
        _run("vring", 4, None, [90, 90]), _run("dpdk", 4, 9.0, [90, 90]),  # a failed run
        _run("vring", 5, 9.0, [None, 90]), _run("dpdk", 5, 9.0, [90, 90]),  # no probe
    ]
    assert e2e._steady_ratios(runs) == pytest.approx([1.2, 1.0])
    row = e2e.summarize(runs)[0]
    assert row["steady_pairs"] == "2/6" and row["ratio_steady"] == pytest.approx(1.1)
    assert row["xcore_ns"]["min"] == 90 and row["xcore_ns"]["max"] == 330
    # a pair whose ends agree but whose middle does not is not steady
    runs[4:6] = [_run("vring", 2, 7.0, [320, 321], [322, 85]), _run("dpdk", 2, 7.0, [330, 318], [320])]
    assert e2e._steady_ratios(runs) == pytest.approx([1.2])


def test_readings_during_a_window_keep_to_its_length(e2e):
    """watch_latency sleeps through the window and reads the round trip every --probe-every seconds
    (none with 0), ending when the window does."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail("this test needs two CPUs (CI has two)")
    runner = e2e.Runner(argparse.Namespace(be_cpu=cpus[1], fe_cpu=cpus[0], probe_every=0.2), "/tmp")
    t0 = time.monotonic()
    got = runner.watch_latency(0.9)
    took = time.monotonic() - t0
    assert 3 <= len(got) <= 4 and all(1 < x < 1e6 for x in got)  # at 0.2, 0.4, 0.6 (0.8: if reads are quick)
    assert 0.9 <= took < 2.0
    runner.a.probe_every = 0
    t0 = time.monotonic()
    assert runner.watch_latency(0.3) == [] and 0.3 <= time.monotonic() - t0 < 1.0


def test_a_pair_measured_across_a_move_is_run_again(e2e):
    """measure_cell runs a pair again (up to --pair-retries times) while its two runs saw different
    round trips, keeps every run with its own rep, and stops at the first steady pair."""
    # what the host does, pair after pair: moved within the pair, moved again, then steady (far)
    lats = iter([([90, 90], [88]), ([320, 330], [325]),
                 ([90, 300], [95]), ([310, 320], [315]),
                 ([320, 330], [318]), ([330, 325], [322]),
                 ([85, 90], [88]), ([90, 92], [91])])

    def run(be, rep):
        before_after, during = next(lats)
        return _run(be, rep, 7.0 if be == "vring" else 6.0, before_after, during)

    runs = []
    e2e.measure_cell(run, ["vring", "dpdk"], 2, 3, runs)
    # rep 0 took three pairs (the third steady); rep 1's first pair was steady: 8 runs, 4 pairs
    assert [(r["backend"], r["rep"], r["attempt"]) for r in runs] == [
        ("vring", 0, 0), ("dpdk", 0, 0), ("vring", 1, 1), ("dpdk", 1, 1), ("vring", 2, 2), ("dpdk", 2, 2),
        ("vring", 3, 0), ("dpdk", 3, 0)]
    assert e2e._steady_ratios(runs) == pytest.approx([7 / 6, 7 / 6])
    assert e2e.summarize(runs)[0]["steady_pairs"] == "2/4"
    # with no retries the unsteady pair is kept as it is; a failed run is not retried
    runs = []
    lats = iter([([90, 90], [88]), ([320, 330], [325])])
    e2e.measure_cell(run, ["vring", "dpdk"], 1, 0, runs)
    assert [r["rep"] for r in runs] == [0, 0] and e2e._steady_ratios(runs) == []
    runs = []
    e2e.measure_cell(lambda be, rep: _run(be, rep, None, [90, 90], [90]), ["vring", "dpdk"], 1, 3, runs)
    assert len(runs) == 2
    # one back-end alone: nothing to pair, each rep runs once
    runs = []
    e2e.measure_cell(lambda be, rep: _run(be, rep, 5.0, [90, 330]), ["vring"], 3, 3, runs)
    assert [r["rep"] for r in runs] == [0, 1, 2]
