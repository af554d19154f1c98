"""How bench/ builds result sets out of several calls: e2e.py --merge (more reps of some cells, or
another call's variants, in one set) and ab.py's table of an A/B between builds."""
from __future__ import annotations

import json

import pytest
from conftest import bench_script


@pytest.fixture(scope="module")
def e2e():
    return bench_script("e2e")


@pytest.fixture(scope="module")
def ab():
    return bench_script("ab")


def _run(backend, rep, mpps, variant="split", burst=32, busy=None, empty=None, xcore=None):
    return {"frontend": "testpmd", "variant": variant, "dir": "loop", "burst": burst, "size": 64,
            "backend": backend, "rep": rep, "mpps": mpps, "empty_share": empty,
            "window": {"busy_ns_per_frame": busy} if busy else None, "xcore_ns": xcore}


def _write(path, runs, **args):
    with open(path, "w") as f:
        json.dump({"args": args, "cpus": 2, "machine": {"cpu": "x"}, "elapsed_s": 1.0, "runs": runs}, f)
    return str(path)


def test_merge_keeps_each_files_pairs_apart_and_filters_variants(e2e, tmp_path):
    a = _write(tmp_path / "a.json", [_run("vring", 0, 10.0), _run("dpdk", 0, 8.0),
                                     _run("vring", 1, 12.0), _run("dpdk", 1, 12.0)], bursts="32")
    b = _write(tmp_path / "b.json", [_run("vring", 0, 9.0), _run("dpdk", 0, 10.0),  # reps 0 again
                                     _run("vring", 0, 1.0, "packed"), _run("dpdk", 0, 2.0, "packed")], bursts="32")
    m = e2e.merge([a, b + ":split"], note="two calls")
    assert [r["rep"] for r in m["runs"]] == [0, 0, 1, 1, 2, 2]  # b's rep 0 became 2, its packed runs left out
    assert m["note"] == "two calls" and m["args"] == {"bursts": "32"}
    assert m["args_extra"] == [{"bursts": "32", "from": b}]
    (row,) = m["summary"]
    assert row["vring"] == {"median": 10.0, "min": 9.0, "max": 12.0, "n": 3}
    assert row["ratio_median"] == pytest.approx(10.0 / 10.0) and row["ratio_best"] == pytest.approx(1.0)
    # the packed runs alone, from the second file
    (packed,) = e2e.merge([b + ":packed"])["summary"]
    assert packed["variant"] == "packed" and packed["ratio_median"] == pytest.approx(0.5)


def test_merge_from_the_command_line_writes_the_set_and_its_plot(e2e, tmp_path):
    a = _write(tmp_path / "a.json", [_run("vring", 0, 10.0, burst=b) for b in (1, 8)]
               + [_run("dpdk", 0, 5.0, burst=b) for b in (1, 8)])
    out = tmp_path / "out"
    assert e2e.main(["--merge", a, "--note", "n", "--out", str(out)]) == 0
    d = json.loads((out / "e2e.json").read_text())
    assert [s["ratio_median"] for s in d["summary"]] == [2.0, 2.0] and d["note"] == "n"
    assert (out / "e2e_ratio.png").stat().st_size > 0


def test_ab_order_rotates_and_table_gives_each_tree_its_runs(ab):
    assert [ab.order(["a", "b", "c"], k) for k in (1, 2, 3)] == [["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    calls = [
        {"tree": "head", "call": 1, "runs": [_run("vring", 0, 10.0, busy=50, empty=0.5)]},
        {"tree": "try", "call": 1, "runs": [_run("vring", 0, 12.0, busy=40, empty=0.6)]},
        {"tree": "try", "call": 2, "runs": [_run("vring", 0, 14.0, busy=30, empty=0.8),
                                            _run("vring", 0, 1.0, burst=4)]},
        {"tree": "head", "call": 2, "runs": [_run("vring", 0, 8.0, busy=70, empty=0.7),
                                             _run("vring", 0, None, burst=4), _run("dpdk", 0, 99.0)]},
    ]
    rows = ab.table(calls)[2:]
    assert rows == [
        "| testpmd | split | loop | 32 | 64 | head | 2 | 9.00 (8.00-10.00) | 60 | 60.0% |",
        "| testpmd | split | loop | 32 | 64 | try | 2 | 13.00 (12.00-14.00) | 35 | 70.0% |",
        "| testpmd | split | loop | 4 | 64 | head | 0 (+1 failed) | failed | - | - |",
        "| testpmd | split | loop | 4 | 64 | try | 1 | 1.00 (1.00-1.00) | - | - |",
    ]


def test_ab_table_by_latency_keeps_near_and_far_runs_apart(ab):
    calls = [
        {"tree": "head", "call": 1, "runs": [_run("vring", 0, 15.0, xcore=[80.0, 85.0])]},
        {"tree": "head", "call": 2, "runs": [_run("vring", 0, 8.0, xcore=[330.0, 320.0])]},
        {"tree": "head", "call": 3, "runs": [_run("vring", 0, 12.0, xcore=[80.0, 330.0]),  # moved: left out
                                             _run("vring", 0, 11.0)]},  # no reading: left out
        {"tree": "try", "call": 1, "runs": [_run("vring", 0, 16.0, xcore=[90.0, 70.0])]},
    ]
    assert ab.table(calls, by_latency=True)[2:] == [
        "| testpmd | split | loop | 32 | 64 | near | head | 1 | 15.00 (15.00-15.00) | - | - |",
        "| testpmd | split | loop | 32 | 64 | near | try | 1 | 16.00 (16.00-16.00) | - | - |",
        "| testpmd | split | loop | 32 | 64 | far | head | 1 | 8.00 (8.00-8.00) | - | - |",
        "| testpmd | split | loop | 32 | 64 | far | try | 0 | - | - | - |",
    ]
    assert ab.table(calls)[2:][0].startswith("| testpmd | split | loop | 32 | 64 | head | 4 | 11.50 (8.00-15.00)")


def test_ab_compiles_only_the_device_e2e_runs(ab):
    assert ab.device_of(["--frontends", "testpmd", "--dirs", "xconnect"]) == "net"
    assert ab.device_of(["--vring-device", "switch", "--dirs", "xconnect"]) == "switch"
    assert ab.device_of(["--vring-device=switch"]) == "switch"
