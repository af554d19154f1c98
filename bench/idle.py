"""CPU an idle vring uses in each polling mode, and its resident memory with two ports of 1024-entry rings.

For each mode (``--poll``, ``--interrupt``, the adaptive default) a fresh ``python -m vring net``
with two sockets (xconnect) gets two in-tree front-ends (``vring.frontend.Frontend``, one queue pair,
queue size 1024, every RX buffer posted) that then send nothing. After a settling pause, the
back-end's CPU time (utime + stime of all its threads, /proc/PID/stat) is sampled over
``--seconds``; VmRSS is read before the front-ends connect and while they are connected.

    /tmp/venv/bin/python bench/idle.py [--seconds 5] [--out bench/results/idle.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from vring.frontend import Frontend  # noqa: E402

MODES = {"poll": ["--poll"], "interrupt": ["--interrupt"], "adaptive": []}
QUEUE_SIZE = 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def wait_for(path: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vring did not create {path}")
        time.sleep(0.05)


def measure(mode: str, seconds: float, settle: float, cpu: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="vring-idle-") as d:
        socks = [os.path.join(d, f"p{i}.sock") for i in range(2)]
        argv = [sys.executable, "-m", "vring", "net", *[a for s in socks for a in ("--socket", s)],
                "--cpus", str(cpu), *MODES[mode]]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        fes: list[Frontend] = []
        try:
            for s in socks:
                wait_for(s, proc)
            time.sleep(1.0)
            rss_alone = rss_kib(proc.pid)
            for s in socks:
                fe = Frontend(s, queue_size=QUEUE_SIZE)
                fe.connect(timeout=60)
                fe.setup()
                fes.append(fe)
            time.sleep(settle)  # adaptive: the idle spell passes and the loop goes to sleep
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = cpu_seconds(proc.pid), time.monotonic()
            return {"mode": mode, "cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 2),
                    "rss_kib_before_connect": rss_alone, "rss_kib_two_ports": rss_kib(proc.pid),
                    "queue_size": QUEUE_SIZE, "seconds": seconds}
        finally:
            for fe in fes:
                fe.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds idle before measuring")
    ap.add_argument("--cpu", type=int, default=1, help="CPU of vring's data plane")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "idle.json"))
    args = ap.parse_args()
    rows = [measure(m, args.seconds, args.settle, args.cpu) for m in MODES]
    print("| mode | idle CPU (% of one core) | RSS before connect | RSS, two ports, 1024-entry rings |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['cpu_percent']:.2f} | {r['rss_kib_before_connect'] / 1024:.1f} MiB "
              f"| {r['rss_kib_two_ports'] / 1024:.1f} MiB |")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
