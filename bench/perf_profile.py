"""Where the cores' time goes in one end-to-end configuration: ``perf record`` of both CPUs while
testpmd (virtio-user) drives ``vring net --poll`` or DPDK's ``net_vhost`` (as bench/e2e.py runs them).

perf can't name numba's JIT code (no symbols, no perf map: the data plane is loaded from numba's
cache), so the vring process's anonymous executable mappings are copied out of /proc/PID/mem while
it runs, disassembled with objdump, and each sample is put on the instruction before the sampled
address: a timer sample lands just after the instruction the core waited on (a fence, a load that
missed). Those instructions are sorted into kinds a reader can check against the source
(``KINDS``). This VM has no hardware counters (perf's ``cycles`` is not supported), so the samples
are ``cpu-clock`` ticks.

    /tmp/venv/bin/python bench/perf_profile.py --variant packed --dir loop --burst 4 --out bench/results/profile
    /tmp/venv/bin/python bench/perf_profile.py --backend dpdk --variant packed --dir loop --burst 32

Writes OUT/profile_<backend>_<variant>_<dir>_b<burst>.json: the share of each CPU's samples per
(process, object, symbol) as perf report gives them, per kind of JIT instruction, and the hottest
JIT instructions with the code around them.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import TESTPMD, Runner, StartFailed, log, testpmd_samples, vring_fe_samples  # noqa: E402
from e2e import parser as e2e_parser  # noqa: E402

# how a sampled JIT instruction is labelled: the first pattern its text matches (objdump AT&T syntax)
KINDS = [
    ("fence (lock-prefixed)", re.compile(r"\block\b")),
    ("clock read (rdtsc)", re.compile(r"\brdtscp?\b")),
    ("division", re.compile(r"\bi?div")),
    ("prefetch", re.compile(r"\bprefetch")),
    # a packed descriptor's flags (offset 14) or a split avail/used index: 16-bit loads
    ("16-bit load (descriptor flags, ring index)", re.compile(r"\bmovzwl\s+(-?0x[0-9a-f]+)?\(")),
    ("other load", re.compile(r"\bmov\w*\s+(-?0x[0-9a-f]+)?\(")),
    ("other", re.compile(r".")),
]
INSN = re.compile(r"^\s*([0-9a-f]+):\s+(?:[0-9a-f]{2} )+\s*(.*)$")


def kind(text: str) -> str:
    return next(name for name, rx in KINDS if rx.search(text))


def disassemble(blob_path: str, base: int) -> list[tuple[int, str]]:
    """(address, instruction text) of raw x86-64 code loaded at ``base``."""
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f"--adjust-vma={base:#x}",
                          blob_path], capture_output=True, text=True, check=True).stdout
    insns = []
    for line in out.splitlines():
        m = INSN.match(line)
        if m and m.group(2):
            insns.append((int(m.group(1), 16), m.group(2).strip()))
    return insns


def attribute(samples: collections.Counter, insns: list[tuple[int, str]], top: int = 25) -> dict:
    """Put each sampled address's count on the instruction before it; shares by kind, hottest ones."""
    addrs = [a for a, _ in insns]
    index = {a: i for i, a in enumerate(addrs)}
    per_insn: collections.Counter = collections.Counter()
    for ip, n in samples.items():
        i = index.get(ip)
        if i is None:  # not an instruction boundary in our listing (data, or padding decoded oddly)
            continue
        per_insn[max(i - 1, 0)] += n
    total = sum(samples.values()) or 1
    kinds: collections.Counter = collections.Counter()
    for i, n in per_insn.items():
        kinds[kind(insns[i][1])] += n
    hot = []
    for i, n in per_insn.most_common(top):
        hot.append({"share": round(n / total, 4), "addr": f"{addrs[i]:#x}", "insn": insns[i][1],
                    "kind": kind(insns[i][1]), "context": [f"{a:#x}: {t}" for a, t in insns[max(i - 4, 0): i + 2]]})
    return {"samples": total, "unplaced": round(1 - sum(per_insn.values()) / total, 4),
            "kinds": {k: round(n / total, 4) for k, n in kinds.most_common()}, "hot": hot}


def dump_jit(pid: int, dest: str) -> list[tuple[int, str]]:
    """Copy the anonymous executable mappings of ``pid`` (numba's code) to files; (base, path) each."""
    blobs = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            f = line.split()
            if "x" not in f[1] or len(f) > 5:  # executable, no backing file, no [vdso]-like name
                continue
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            mem.seek(lo)
            path = os.path.join(dest, f"jit_{lo:x}.bin")
            with open(path, "wb") as o:
                o.write(mem.read(hi - lo))
            blobs.append((lo, path))
    return blobs


def is_jit(dso: str) -> bool:
    """perf names code without a file after a perf map it looked for (/tmp/perf-PID.map) or [JIT]."""
    return dso.startswith(("[JIT]", "[unknown]")) or re.search(r"perf-\d+\.map$", dso) is not None


def jit_ips(data: str) -> collections.Counter:
    """Sampled addresses in code without a file (numba's), with their counts."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,dso"], capture_output=True, text=True).stdout
    ips: collections.Counter = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"^\s*([0-9a-f]+)\s+\((.*)\)\s*$", line)
        if m and is_jit(m.group(2)):
            ips[int(m.group(1), 16)] += 1
    return ips


def top_symbols(data: str, cpu: int, n: int = 60) -> list[dict]:
    """perf report's heaviest (command, object, symbol) on one CPU, numba's code as one entry; a
    symbol perf cannot name (a stripped library's static function) is its address in the object,
    the same in every run."""
    out = subprocess.run(["perf", "report", "-i", data, "--cpu", str(cpu), "--sort", "comm,dso,sym", "--stdio", "-q",
                          "--field-separator=|"], capture_output=True, text=True).stdout
    shares: collections.Counter = collections.Counter()
    for line in out.splitlines():
        f = [x.strip() for x in line.split("|")]
        if len(f) != 4 or not f[0].endswith("%"):
            continue
        obj, sym = f[2], re.sub(r"^\[.\]\s*", "", f[3])
        if is_jit(obj):
            obj, sym = "numba data plane", "(JIT code)"
        shares[(f[1], obj, sym)] += float(f[0].rstrip("%")) / 100
    return [{"share": round(v, 4), "comm": k[0], "object": k[1], "symbol": k[2]} for k, v in shares.most_common(n)]


def summarize(data: str, cpus: list[int], blobs: list[tuple[int, str]]) -> dict:
    res: dict = {"cpus": {str(c): top_symbols(data, c) for c in cpus}}
    jit = jit_ips(data)
    for base, path in blobs:
        size = os.path.getsize(path)
        mine = collections.Counter({ip: n for ip, n in jit.items() if base <= ip < base + size})
        if sum(mine.values()) > 0.2 * sum(jit.values()):  # the data plane's code, not a small trampoline
            res["jit"] = {"base": f"{base:#x}", "size": size, **attribute(mine, disassemble(path, base))}
    return res


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="vring", choices=["vring", "dpdk"])
    ap.add_argument("--variant", default="packed", choices=["split", "packed", "2q"])
    ap.add_argument("--dir", default="loop", choices=["tx", "rx", "loop", "xconnect"])
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds recorded, after 2 s of traffic")
    ap.add_argument("--freq", type=int, default=2000,
                    help="samples per second per CPU (each is a VM exit here; see bench/README.md)")
    ap.add_argument("--be-cpu", type=int, default=1)
    ap.add_argument("--fe-cpu", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile"))
    ap.add_argument("--vring-args", default="", metavar="ARGS", help="more options for vring net, as e2e's")
    ap.add_argument("--vring-device", default="net", choices=["net", "switch"],
                    help="switch: profile vring switch (--dir xconnect), as e2e's --vring-device")
    ap.add_argument("--frontend", default="testpmd", choices=["testpmd", "vring"],
                    help="vring: the in-tree jitted generator (vring frontend), as e2e's --frontends vring")
    ap.add_argument("--rate", type=float, default=0.0, metavar="MPPS",
                    help="with --frontend vring: offered load per TX queue, as e2e's --rate (0: unpaced)")
    return ap


def runner_args(args: argparse.Namespace) -> argparse.Namespace:
    """What e2e's Runner reads: e2e's defaults, then our options, and no warm-up (perf records a
    window of its own), so an option e2e adds needs nothing here."""
    # (the in-tree generator runs for e2e's seconds: long enough for our 2 s of traffic, the record, and a margin)
    return argparse.Namespace(**{**vars(e2e_parser().parse_args([])), **vars(args), "warmup": 0.0,
                                 "seconds": args.seconds + 4})


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.vring_device == "switch" and args.dir != "xconnect":
        ap.error("--vring-device switch profiles --dir xconnect only")
    for tool in ("perf", "objdump", TESTPMD):
        if shutil.which(tool) is None:
            log(f"{tool} not found (apt-get install linux-perf binutils dpdk-dev)")
            return 2
    work = tempfile.mkdtemp(prefix="vring-prof-")
    res: dict = {"backend": args.backend, "variant": args.variant, "dir": args.dir, "burst": args.burst,
                 "size": args.size, "seconds": args.seconds, "freq": args.freq, "be_cpu": args.be_cpu,
                 "fe_cpu": args.fe_cpu, "vring_args": args.vring_args,
                 "vring_device": args.vring_device, "frontend": args.frontend, "rate": args.rate}
    try:
        runner = Runner(runner_args(args), work)
        with runner.started(args.frontend, args.backend, args.dir, args.burst, args.size, args.variant) as st:
            time.sleep(2)
            data = os.path.join(work, "perf.data")

            def fe_rates() -> list[float]:
                if args.frontend == "vring":
                    return vring_fe_samples(st.fep.text(), st.key)
                return testpmd_samples(st.fep.text(), st.testpmd_column, st.nports)

            n0 = len(fe_rates())
            subprocess.run(["perf", "record", "-q", "-C", f"{args.be_cpu},{args.fe_cpu}", "-F", str(args.freq),
                            "-o", data, "--", "sleep", str(args.seconds)], check=True, capture_output=True)
            rates = fe_rates()[n0:]
            res["mpps"] = round(sum(rates) / len(rates), 3) if rates else None
            blobs = dump_jit(st.bep.pid, work) if args.backend == "vring" else []
            res.update(summarize(data, [args.be_cpu, args.fe_cpu], blobs))
    except StartFailed as e:
        log(str(e))
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    fe = "" if args.frontend == "testpmd" else f"_{args.frontend}fe" + (f"_rate{args.rate:g}" if args.rate else "")
    be = "vring_switch" if args.backend == "vring" and args.vring_device == "switch" else args.backend
    path = os.path.join(args.out, f"profile_{be}_{args.variant}_{args.dir}_b{args.burst}{fe}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{args.frontend} fe, {args.backend} {args.variant} {args.dir} burst {args.burst}: {res.get('mpps')} Mpps "
          "during the record")
    for cpu, top in res["cpus"].items():
        print(f"cpu {cpu}:")
        for t in top[:10]:
            print(f"  {t['share']:6.1%}  {t['comm']:<14} {t['object']:<34} {t['symbol']}")
    if "jit" in res:
        print("numba data plane, by the instruction waited on:")
        for k, v in res["jit"]["kinds"].items():
            print(f"  {v:6.1%}  {k}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
