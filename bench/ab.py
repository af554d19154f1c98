"""A/B of builds of vring: bench/e2e.py's runs of vring alone, calls alternating between trees.

    /tmp/venv/bin/python bench/ab.py --trees head=/work/main,try=/work/wt/try --calls 5 --out /tmp/ab \\
        -- --frontends testpmd --variants packed --dirs loop,xconnect --bursts 4,64 --sizes 64 --seconds 3
    /tmp/venv/bin/python bench/ab.py --report --out /tmp/ab  # the table again, from OUT/ab.json
    /tmp/venv/bin/python bench/ab.py --report --by-latency --out /tmp/ab  # runs at ~80 and ~330 ns apart
    /tmp/venv/bin/python bench/ab.py --trees main=.,hold20=. --vring-args 'hold20=--hold-us 20' --out /tmp/h \\
        -- --frontends testpmd ...                            # two settings of one build

Each tree is a checkout (a git worktree) of the build to measure. ab.py first compiles each tree's
data plane (``python -m vring compile --only DEVICE`` there, the device e2e runs: a first run must
not measure numba compiling), then makes ``--calls`` rounds; in each it runs every tree's own
``bench/e2e.py --backends vring --reps 1`` with the e2e arguments given, into OUT/NAME_CALL. The
trees' order rotates from round to round, so no tree always runs right after the same one. DPDK is
left out: two builds of vring measured minutes apart on a shared VM compare better against each
other, alternating, than through DPDK's runs.

Writes OUT/ab.json (every call's args, summary and runs) and prints, per cell and tree, the median
rate (min-max) over the calls, vring's busy ns per frame and its empty-poll share (medians).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (bench/ holds scripts, not a package)


def order(names: list[str], call: int) -> list[str]:
    """The trees' order in round ``call`` (from 1): rotated by one each round."""
    k = call % len(names)
    return names[k:] + names[:k]


def table(calls: list[dict], by_latency: bool = False) -> list[str]:
    """Markdown rows: per cell (in the order first measured) and tree, vring's runs over the calls;
    ``by_latency``: per cell and cross-core latency (``e2e.latency``), "mixed" runs left out."""
    cells: dict = {}
    for c in calls:
        for r in c["runs"]:
            lat = (e2e.latency(r),) if by_latency else ()
            if r.get("backend") != "vring" or lat == ("mixed",):
                continue
            cells.setdefault(e2e.cell(r) + lat, {}).setdefault(c["tree"], []).append(r)
    trees = list(dict.fromkeys(c["tree"] for c in calls))
    col = (" latency |", "---|") if by_latency else ("", "")
    out = [f"| frontend | variant | dir | burst | size |{col[0]} tree | runs | Mpps median (min-max) | busy ns/frame | "
           "empty polls |", f"|---|---|---|---:|---:|{col[1]}---|---:|---|---:|---:|"]
    med = lambda v, f: f(statistics.median(v)) if v else "-"  # noqa: E731
    for key, per in cells.items():
        for tree in trees:
            rs = per.get(tree, [])
            mpps = [r["mpps"] for r in rs if r.get("mpps") is not None]
            busy = [b for b in map(e2e.busy_ns_per_frame, rs) if b]
            empty = [r["empty_share"] for r in rs if r.get("empty_share") is not None]
            rate = (f"{statistics.median(mpps):.2f} ({min(mpps):.2f}-{max(mpps):.2f})" if mpps
                    else "failed" if rs else "-")
            failed = len(rs) - len(mpps)
            out.append(f"| {' | '.join(str(k) for k in key)} | {tree} | {len(mpps)}"
                       f"{f' (+{failed} failed)' if failed else ''} | {rate} | {med(busy, lambda x: f'{x:.0f}')} | "
                       f"{med(empty, lambda x: f'{x:.1%}')} |")
    return out


def device_of(e2e_args: list[str]) -> str:
    """The vring device e2e runs with these arguments (its --vring-device), read by e2e's own parser."""
    return e2e.parser().parse_args(e2e_args).vring_device


def compile_tree(path: str, device: str) -> None:
    """Compile that tree's data plane of ``device`` only (each other device's would take minutes more)."""
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, "-m", "vring", "compile"]
    rc = subprocess.run([*cmd, "--only", device], cwd=path, env=env).returncode
    if rc == 2:  # argparse's: a tree older than --only compiles every device
        subprocess.run(cmd, cwd=path, env=env, check=True)
    elif rc != 0:
        raise SystemExit(f"compiling {path} failed (rc {rc})")


def run_call(name: str, path: str, call: int, out: str, e2e_args: list[str], vring_args: str = "") -> dict:
    dest = os.path.join(out, f"{name}_{call}")
    extra = [f"--vring-args={vring_args}"] if vring_args else []
    with open(dest + ".log", "w") as log:
        rc = subprocess.run([sys.executable, os.path.join(path, "bench", "e2e.py"), *e2e_args, *extra,
                             "--backends", "vring", "--reps", "1", "--out", dest],
                            cwd=path, stdout=log, stderr=subprocess.STDOUT).returncode
    with open(os.path.join(dest, "e2e.json")) as f:
        d = json.load(f)
    print(f"{time.strftime('%H:%M:%S')} call {call} {name}: rc={rc}", flush=True)
    return {"tree": name, "path": path, "call": call, "args": d["args"], "elapsed_s": d.get("elapsed_s"),
            "summary": d["summary"], "runs": d["runs"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", help="NAME=PATH,NAME=PATH...: the checkouts to compare")
    ap.add_argument("--vring-args", action="append", default=[], metavar="NAME=ARGS",
                    help="options for that tree's vring net (e2e's --vring-args), e.g. 'hold=--hold-us 20' with "
                         "--trees main=/work/main,hold=/work/main: two settings of one build")
    ap.add_argument("--calls", type=int, default=5, help="rounds; each runs every tree once")
    ap.add_argument("--out", required=True, help="directory for the calls' results and ab.json (with --report: "
                                                 "that directory, or an A/B's JSON file)")
    ap.add_argument("--note", default="", help="what is being compared, kept in ab.json")
    ap.add_argument("--report", action="store_true", help="measure nothing: print OUT/ab.json's table")
    ap.add_argument("--by-latency", action="store_true",
                    help="split each cell by the cores' line round trip during the run (near / far; see "
                         "e2e.latency), leaving out runs during which it changed")
    ap.add_argument("e2e_args", nargs=argparse.REMAINDER, help="-- then bench/e2e.py's arguments")
    a = ap.parse_args(argv)
    path = a.out if a.report and a.out.endswith(".json") else os.path.join(a.out, "ab.json")
    if a.report:
        with open(path) as f:
            print("\n".join(table(json.load(f)["calls"], a.by_latency)))
        return 0
    if not a.trees:
        ap.error("--trees is needed unless --report")
    trees = dict(t.split("=", 1) for t in a.trees.split(","))
    settings = dict(v.split("=", 1) for v in a.vring_args)
    e2e_args = a.e2e_args[1:] if a.e2e_args[:1] == ["--"] else a.e2e_args
    os.makedirs(a.out, exist_ok=True)
    for p in dict.fromkeys(trees.values()):
        compile_tree(p, device_of(e2e_args))
    calls = []
    for call in range(1, a.calls + 1):
        for name in order(list(trees), call):
            calls.append(run_call(name, trees[name], call, a.out, e2e_args, settings.get(name, "")))
            with open(path, "w") as f:  # after every call: an interrupted A/B keeps what it measured
                json.dump({"note": a.note, "trees": trees, "vring_args": settings, "e2e_args": e2e_args,
                           "calls": calls}, f, indent=1)
    print("\n".join(table(calls, a.by_latency)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
