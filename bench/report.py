"""Turn pytest-benchmark JSON from bench/test_kernels.py into ns/packet: JSON, a table and a plot.

    /tmp/venv/bin/python bench/report.py bench/results/kernels.raw.json [more runs ...] [--out bench/results]

Several JSON files (repeated runs) are merged: per kernel, ring, batch and size the median is
the median of the runs' medians, min/max the extremes over all runs, and ``run_medians`` lists
each run's median (the spread between runs on a shared machine is larger than within one).

Writes OUT/kernels.json (ns/packet median/min/max per kernel, ring format, batch and frame size),
OUT/kernels_ns_per_packet.png (split rings: ns/packet vs batch, log2 x axis, one line per kernel
and size) and OUT/kernels_packed_vs_split.png (one panel per kernel measured on both formats), and
prints Markdown tables per frame size: split kernels (rows: batch, columns: kernel, median
ns/packet), then packed vs split (median ns/packet of each and packed / split).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_ORDER = ("pop", "push", "notify", "scatter", "deliver", "forward")


def load(path: str) -> tuple[list[dict], dict]:
    with open(path) as f:
        raw = json.load(f)
    rows = []
    for b in raw.get("benchmarks", []):
        ei = b.get("extra_info", {})
        if "packets" not in ei or "kernel" not in ei:
            continue
        st = b["stats"]
        pk = int(ei["packets"])
        per = {k: st[k] * 1e9 / pk for k in ("median", "min", "max", "mean")}
        rows.append({
            "kernel": ei["kernel"], "ring": ei.get("ring", "split"), "batch": int(ei["batch"]),
            "size": int(ei["size"]), "packets": pk,
            "rounds": int(st.get("rounds", 0)), "ns_per_packet": {k: round(v, 3) for k, v in per.items()},
            "mpps_median": round(1e3 / per["median"], 2) if per["median"] > 0 else None,
            "name": b.get("name"),
        })
    order = {k: i for i, k in enumerate(KERNEL_ORDER)}
    rows.sort(key=lambda r: (r["ring"] != "split", order.get(r["kernel"], 99), r["size"], r["batch"]))
    meta = {k: raw.get(k) for k in ("datetime", "version")}
    mi = raw.get("machine_info", {})
    meta["machine"] = {k: mi.get(k) for k in ("node", "processor", "python_version", "release")}
    meta["cpu"] = (mi.get("cpu") or {}).get("brand_raw")
    return rows, meta


def merge(runs: list[list[dict]]) -> list[dict]:
    """One row per kernel/ring/batch/size over several runs (see the module docstring)."""
    by_key: dict[tuple, list[dict]] = {}
    for rows in runs:
        for r in rows:
            by_key.setdefault((r["kernel"], r["ring"], r["batch"], r["size"]), []).append(r)
    out = []
    for rs in by_key.values():
        meds = sorted(r["ns_per_packet"]["median"] for r in rs)
        med = statistics.median(meds)
        row = dict(rs[0])
        row["ns_per_packet"] = {"median": round(med, 3), "min": min(r["ns_per_packet"]["min"] for r in rs),
                                "max": max(r["ns_per_packet"]["max"] for r in rs),
                                "mean": round(statistics.mean(r["ns_per_packet"]["mean"] for r in rs), 3)}
        row["run_medians"] = meds
        row["rounds"] = sum(r["rounds"] for r in rs)
        row["mpps_median"] = round(1e3 / med, 2) if med > 0 else None
        out.append(row)
    order = {k: i for i, k in enumerate(KERNEL_ORDER)}
    out.sort(key=lambda r: (r["ring"] != "split", order.get(r["kernel"], 99), r["size"], r["batch"]))
    return out


def table(rows: list[dict], size: int) -> str:
    rows = [r for r in rows if r["ring"] == "split"]
    kernels = [k for k in KERNEL_ORDER if any(r["kernel"] == k and r["size"] == size for r in rows)]
    kernels += sorted({r["kernel"] for r in rows if r["size"] == size} - set(kernels))
    batches = sorted({r["batch"] for r in rows if r["size"] == size})
    cell = {(r["kernel"], r["batch"]): r["ns_per_packet"] for r in rows if r["size"] == size}
    out = [f"ns/packet, {size} B frames: median (min)", "",
           "| batch | " + " | ".join(kernels) + " |", "|---:|" + "---:|" * len(kernels)]
    for b in batches:
        vals = []
        for k in kernels:
            c = cell.get((k, b))
            vals.append(f"{c['median']:.1f} ({c['min']:.1f})" if c else "")
        out.append(f"| {b} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def compare_table(rows: list[dict], size: int) -> str:
    """Packed vs split, for the kernels measured on both: median ns/packet and packed / split."""
    cell = {(r["kernel"], r["ring"], r["batch"]): r["ns_per_packet"]["median"] for r in rows if r["size"] == size}
    kernels = [k for k in KERNEL_ORDER if any(kk == k and ring == "packed" for kk, ring, _ in cell)]
    batches = sorted({b for _, _, b in cell})
    out = [f"packed vs split, {size} B frames: median ns/packet, split / packed (packed ÷ split)", "",
           "| batch | " + " | ".join(kernels) + " |", "|---:|" + "---:|" * len(kernels)]
    for b in batches:
        vals = []
        for k in kernels:
            sp, pk = cell.get((k, "split", b)), cell.get((k, "packed", b))
            vals.append(f"{sp:.1f} / {pk:.1f} ({pk / sp:.2f})" if sp and pk else "")
        out.append(f"| {b} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def plot_compare(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = [k for k in KERNEL_ORDER if any(r["kernel"] == k and r["ring"] == "packed" for r in rows)]
    if not kernels:
        return
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, len(kernels), figsize=(4 * len(kernels), 4.5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, k in zip(axes[0], kernels, strict=True):
        for si, s in enumerate(sizes):
            for ring, style in (("split", "-"), ("packed", "--")):
                pts = sorted((r["batch"], r["ns_per_packet"]) for r in rows
                             if r["kernel"] == k and r["size"] == s and r["ring"] == ring)
                if not pts:
                    continue
                x = [p[0] for p in pts]
                ax.plot(x, [p[1]["median"] for p in pts], style, marker="o", ms=3, color=cmap(si),
                        label=f"{ring} {s} B")
                ax.fill_between(x, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts], color=cmap(si),
                                alpha=0.08)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(k)
        ax.set_xlabel("batch")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ns / packet (median; band = min..max)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("packed (dashed) vs split (solid) ring kernels, one thread, synthetic rings")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ring"] == "split"]
    kernels = [k for k in KERNEL_ORDER if any(r["kernel"] == k for r in rows)]
    sizes = sorted({r["size"] for r in rows})
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for ki, k in enumerate(kernels):
        for si, s in enumerate(sizes):
            pts = sorted((r["batch"], r["ns_per_packet"]) for r in rows if r["kernel"] == k and r["size"] == s)
            if not pts:
                continue
            x = [p[0] for p in pts]
            med = [p[1]["median"] for p in pts]
            lo = [p[1]["min"] for p in pts]
            hi = [p[1]["max"] for p in pts]
            color = cmap(ki % 10)
            ax.plot(x, med, styles[si % len(styles)], marker="o", ms=3, color=color, label=f"{k} {s} B")
            ax.fill_between(x, lo, hi, color=color, alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (chains per kernel call)")
    ax.set_ylabel("ns / packet (median; band = min..max)")
    ax.set_title("vring split-ring kernels, one thread, synthetic rings")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", nargs="+", help="pytest-benchmark JSON (--benchmark-json=...), one per run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory (default bench/results)")
    args = ap.parse_args(argv)
    loaded = [load(p) for p in args.raw]
    rows, meta = merge([r for r, _ in loaded]), loaded[0][1]
    meta["runs"] = [m.get("datetime") for _, m in loaded]
    if not rows:
        print(f"no kernel benchmarks with extra_info in {args.raw}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "kernels.json")
    with open(out_json, "w") as f:
        sources = [os.path.abspath(p) for p in args.raw]
        json.dump({"source": sources, **meta, "unit": "ns/packet", "results": rows}, f, indent=1)
    out_png = os.path.join(args.out, "kernels_ns_per_packet.png")
    plot(rows, out_png)
    cmp_png = os.path.join(args.out, "kernels_packed_vs_split.png")
    plot_compare(rows, cmp_png)
    for s in sorted({r["size"] for r in rows}):
        print(table(rows, s))
        print()
        if any(r["ring"] == "packed" and r["size"] == s for r in rows):
            print(compare_table(rows, s))
            print()
    print(f"wrote {out_json}, {out_png} and {cmp_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
