"""End-to-end packet rate: vring net vs DPDK's vhost back-end, alternating, same session.

For each configuration (frontend, direction, burst, frame size) and each repetition, the same
frontend runs once against ``python -m vring net --poll`` and once against ``dpdk-testpmd
--vdev net_vhost0`` (vring, dpdk, vring, dpdk, ...), back-end and frontend pinned to different
CPUs. Each run starts fresh processes (by PID, own session, stdin /dev/null), waits for traffic,
measures, and stops them with SIGTERM (SIGKILL after a grace period).

Directions (frontend mode -> vring mode / testpmd forward mode):
  tx    frontend txonly  -> vring sink     / testpmd rxonly   (rate: frames the frontend got into the ring)
  rx    frontend rxonly  -> vring source   / testpmd txonly   (rate: frames the frontend received)
  loop  frontend flowgen -> vring loopback / testpmd io       (rate: frames the frontend received back)
  xconnect  two ports, frontend flowgen on both -> vring xconnect / testpmd io between two net_vhost
        ports (rate: frames received on both ports together)
Frontends: ``testpmd`` (DPDK virtio-user) and ``vring`` (``python -m vring frontend``, the jitted
in-tree generator). The rate is always read on the frontend side, so both back-ends are measured
with the same ruler: testpmd's own per-period pps samples (TSC-timed), or the in-tree generator's
per-second counts; the first ``--warmup`` seconds after traffic starts are skipped.

Also recorded per run: the back-end's empty-poll share over the measured window (``window``:
vring's poll counters read through its control socket at the window's start and end; testpmd,
run interactive, prints its ``--record-burst-stats`` counts on ``show fwd stats all`` at the same
two moments, and its share is the upper bound those counts allow, as packets / burst of its
bursts at least were not empty), the same over the back-end's whole life (``be_polls``: testpmd
polls from its start, long before the front-end connects, so that share says more about start-up
than headroom), and how much CPU processes other than ours used meanwhile (``foreign_cpu``, % of
one CPU): on a shared 2-core machine a run with foreign load is not clean. With ``--fe-bursts`` the
testpmd front-end counts its own bursts too (``fe_bursts``: how full its RX and TX bursts were).

    /tmp/venv/bin/python bench/e2e.py --quick            # < 2 min: burst 32, 64 B, tx, 2 reps, 3 s
    /tmp/venv/bin/python bench/e2e.py --frontends testpmd,vring --dirs tx,rx,loop \\
        --bursts 1,8,32,64 --sizes 64,512,1500 --reps 5 --seconds 5
    /tmp/venv/bin/python bench/e2e.py --frontends vring --rate 4 --dirs tx,loop,xconnect \\
        --bursts 1,8,32 --sizes 64      # same offered load (4 Mpps per TX queue): compare headroom
    /tmp/venv/bin/python bench/e2e.py --frontends testpmd --variants packed --dirs loop --bursts 32 \\
        --sizes 64 --vring-args '--hold-us 0'   # one setting of vring net; alternate with the default
    /tmp/venv/bin/python bench/e2e.py --merge a/e2e.json b/e2e.json:packed --note '...' --out c
        # one set from several calls (more reps of some cells, another call's packed runs)

Writes bench/results/e2e.json (every run and a summary per configuration) and
bench/results/e2e_ratio.png (vring/DPDK median ratio vs burst).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # vring.control, from the tree being measured
TESTPMD = os.environ.get("TESTPMD", "dpdk-testpmd")
DPDK_RUN = "/var/run/dpdk" if os.getuid() == 0 else os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/tmp"), "dpdk")

VRING_MODE = {"tx": "sink", "rx": "source", "loop": "loopback", "xconnect": "xconnect"}
DPDK_MODE = {"tx": "rxonly", "rx": "txonly", "loop": "io", "xconnect": "io"}
FE_TESTPMD_MODE = {"tx": "txonly", "rx": "rxonly", "loop": "flowgen", "xconnect": "flowgen"}
FE_VRING_MODE = {"tx": "txonly", "rx": "rxonly", "loop": "flowgen", "xconnect": "flowgen"}
# Ring variants: extra virtio_user devargs (testpmd front-end), queue pairs per port.
VARIANTS = {"split": ("", 1), "packed": (",packed_vq=1", 1), "2q": ("", 2)}


def socks(sock: str, direction: str) -> list[str]:
    """The back-end's sockets: two ports for a cross-connect (frames go port 0 <-> port 1), else one."""
    return [sock, sock.replace(".sock", "b.sock")] if direction == "xconnect" else [sock]


def testpmd_eal(main_cpu: int, fwd_cpu: int, prefix: str, vdevs: list[str]) -> list[str]:
    """testpmd's command line up to its own options (ending in "--"), as both roles run it: no
    hugepages nor PCI, its idle main lcore on ``main_cpu`` and its one forwarding lcore on ``fwd_cpu``."""
    return ["stdbuf", "-oL", TESTPMD, "--lcores", f"0@{main_cpu},1@{fwd_cpu}", "--no-pci", "--no-huge",
            "-m", "256", f"--file-prefix={prefix}", *[a for v in vdevs for a in ("--vdev", v)], "--"]


def control(sock: str) -> str:
    """vring's control socket for a run (vring stats and e2e's window samples read it)."""
    return sock.replace(".sock", ".ctl")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes
class Proc:
    """A child in its own session, output to a log file, stopped by its PID."""

    def __init__(self, name: str, argv: list[str], logdir: str, env: dict | None = None, commands: bool = False):
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.PIPE if commands else subprocess.DEVNULL,
                                     start_new_session=True, cwd=ROOT, env=env, text=True)
        self.pid = self.proc.pid

    def command(self, line: str, until: str, timeout: float = 10.0) -> str:
        """Send one line to an interactive child (``commands=True``) and return its output up to the
        first match of the regex ``until`` ("" if it did not come within ``timeout``)."""
        off = len(self.text())
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return ""
        found: list[str] = []

        def done() -> bool:
            m = re.search(until, self.text()[off:])
            if m:
                found.append(self.text()[off:][: m.end()])
            return m is not None

        wait_for(done, timeout, [self])
        return found[0] if found else ""

    def text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read().replace("\r", "")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_jiffies(self) -> int:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime (all threads)
        except (OSError, IndexError, ValueError):
            return 0

    def stop(self, grace: float = 10.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"  {self.name} (pid {self.pid}) ignored SIGTERM for {grace:g}s: SIGKILL")
                try:
                    os.killpg(self.pid, signal.SIGKILL)  # its own session: pgid == pid
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def cpu_total() -> int:
    with open("/proc/stat") as f:
        v = f.readline().split()[1:]
    return sum(int(x) for x in v[:3]) + sum(int(x) for x in v[5:8])  # user nice system irq softirq steal


def wait_for(pred, timeout: float, procs: list[Proc], step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if any(not p.alive() for p in procs):
            return bool(pred())
        time.sleep(step)
    return False


# ---------------------------------------------------------------- parsing
def testpmd_samples(text: str, key: str, ports: int = 1) -> list[float]:
    """Per-period pps samples (--stats-period) for key Rx-pps or Tx-pps, in Mpps, summed over ports."""
    v = [int(m) / 1e6 for m in re.findall(rf"{key}:\s+(\d+)", text)]
    return [sum(v[i : i + ports]) for i in range(0, len(v) - ports + 1, ports)]


def after_start(samples: list[float], skip: int) -> list[float]:
    """Samples after the first nonzero one, ``skip`` more dropped (warm-up)."""
    for i, s in enumerate(samples):
        if s > 0:
            rest = samples[i + 1 :]
            return rest[skip:] if len(rest) > skip else rest
    return []


def testpmd_bursts(text: str, which: str, burst: int) -> dict | None:
    """``--record-burst-stats`` over every port's (or stream's) ``which`` (RX/TX) bursts: {'bursts': N,
    'empty_share': x, 'empty_share_max': y, 'spread': ...}. testpmd prints whole percents, cut
    down (99 % is 99.0-99.9 %), so ``x`` is that print weighted over the ports and ``y`` the exact
    upper bound its counts allow: a burst moves at most ``burst`` packets, so at least
    packets / burst of the N bursts were not empty."""
    total = packets = empty_floor = nonempty_min = 0
    spread: dict[int, float] = {}
    # one block per port, or per stream when there are more streams than ports (queues > 1)
    for block in re.split(r"Forward statistics for port|Forward Stats for RX Port", text)[1:]:
        m = re.search(rf"{which}-bursts\s*:\s*(\d+)\s*\[([^\]]*)\]", block)
        pk = re.search(rf"{which}-packets:\s*(\d+)", block)
        if not m or not pk:
            continue
        n = int(m.group(1))
        shares = {int(b): int(p) / 100 for p, b in re.findall(r"(\d+)% of (\d+) pkts", m.group(2))}
        for b, x in shares.items():
            spread[b] = spread.get(b, 0.0) + x * n
        total += n
        packets += int(pk.group(1))
        empty_floor += shares.get(0, 0.0) * n
        nonempty_min += -(-int(pk.group(1)) // burst)
    if not total:
        return None
    return {"bursts": total, "packets": packets, "empty_share": empty_floor / total,
            "empty_share_max": 1 - nonempty_min / total, "spread": {b: round(x / total, 4) for b, x in spread.items()}}


# the end of testpmd's "show fwd stats all" / "stop" print: the accumulated block's closing line
TESTPMD_STATS_END = r"Accumulated forward statistics[^\n]*\n(?:[^\n]*\n)*?\s*\+{20,}\s*\n"


def dpdk_window(a: dict | None, b: dict | None, burst: int) -> dict | None:
    """testpmd's bursts and packets between two prints of ``testpmd_bursts``: the share of empty
    bursts is at most 1 - (packets / burst) / bursts (the printed percentages can't be differenced)."""
    if not a or not b or b["bursts"] <= a["bursts"]:
        return None
    n, pk = b["bursts"] - a["bursts"], b["packets"] - a["packets"]
    return {"bursts": n, "packets": pk, "empty_share_max": 1 - -(-pk // burst) / n}


def vring_sample(path: str) -> dict | None:
    """vring's poll counters now, from its control socket (the ``sample`` request)."""
    from vring.control import ControlClient

    try:
        with ControlClient(path, timeout=5) as c:
            return c.sample().get("poll")
    except (OSError, ValueError, RuntimeError):  # ConnectionError is an OSError
        return None


def vring_window(a: dict | None, b: dict | None) -> dict | None:
    """vring's polls, empty polls and busy time between two ``vring_sample``s."""
    if not a or not b or "empty" not in a or "empty" not in b or b["polls"] <= a["polls"]:
        return None
    n, e, f, c = (b[k] - a[k] for k in ("polls", "empty", "frames", "busy_cycles"))
    # busy cycles are those of a sample of busy rounds: per frame of that sample (older vrings timed all)
    t = b["timed_frames"] - a["timed_frames"] if "timed_frames" in a and "timed_frames" in b else f
    ns_per_cycle = b["ns_per_frame"] / b["cycles_per_frame"] if b.get("cycles_per_frame") else 0.0
    return {"polls": n, "frames": f, "empty_share": e / n,
            "busy_ns_per_frame": c / t * ns_per_cycle if t else None}


def testpmd_totals(text: str) -> dict:
    out = {}
    acc = text.split("Accumulated forward statistics")
    if len(acc) > 1:
        for k, pat in (("rx", r"RX-packets:\s+(\d+)\s+RX-dropped:\s+(\d+)"),
                       ("tx", r"TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)")):
            m = re.search(pat, acc[-1])  # the last print: when forwarding stopped
            if m:
                out[f"{k}_packets"], out[f"{k}_dropped"] = int(m.group(1)), int(m.group(2))
    return out


def testpmd_cycles(text: str) -> float | None:
    """``--record-core-cycles``: ns per packet. testpmd 22.11 times each forwarding call from before its
    RX burst to its end and adds the time only when the burst received packets (empty calls return
    first), so this is its busy time per packet, as vring's busy_ns_per_frame."""
    m = re.search(r"CPU cycles/packet=([\d.]+) .* at (\d+) MHz Clock", text)
    return float(m.group(1)) * 1000 / int(m.group(2)) if m else None


def vring_polls(text: str) -> dict | None:
    m = re.search(r"polls=(\d+) empty=([\d.]+)% full=([\d.]+)% busy_ns_per_frame=([\d.]+)", text)
    if not m:
        return None
    return {"polls": int(m.group(1)), "empty_share": float(m.group(2)) / 100, "full_share": float(m.group(3)) / 100,
            "busy_ns_per_frame": float(m.group(4))}


def vring_totals(text: str) -> dict:
    """The per-port counters vring net prints on exit, summed over ports: ``rx_dropped`` counts
    frames it had for a driver's RX ring and could not place (ring full), as testpmd's TX-dropped."""
    out: dict[str, int] = {}
    for line in re.findall(r"^port \d+ \(.*?\): (.*)$", text, re.M):
        for k, v in re.findall(r"(\w+)=(\d+)", line):
            out[k] = out.get(k, 0) + int(v)
    return out


def vring_fe_samples(text: str, key: str) -> list[float]:
    """Per-second rates the in-tree generator prints: '  tx   7.123 Mpps   rx   0.000 Mpps ...'."""
    return [float(x) for x in re.findall(rf"\b{key}\s+([\d.]+) Mpps", text)]


# ---------------------------------------------------------------- one run
class StartFailed(Exception):
    """A run's processes did not get to passing traffic (the message says which step)."""

    def __init__(self, msg: str, logs: str):
        super().__init__(msg)
        self.logs = logs  # the run's log directory


@dataclass
class Started:
    """A back-end and a front-end passing traffic (``Runner.started``)."""
    bep: Proc
    fep: Proc
    sock: str  # the (first) back-end socket; the control socket is control(sock)
    logs: str  # the directory of both processes' logs
    key: str  # "tx" or "rx": which side of the front-end the rate is read on
    nports: int

    @property
    def testpmd_column(self) -> str:
        """The column of testpmd's periodic stats the rate is read from (a testpmd front-end)."""
        return "Tx-pps" if self.key == "tx" else "Rx-pps"


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: str):
        self.a = args
        self.work = workdir
        self.n = 0
        self.be_cpu, self.fe_cpu = args.be_cpu, args.fe_cpu

    def _names(self) -> tuple[str, str, str]:
        self.n += 1
        tag = f"vb{os.getpid() % 100000}_{self.n}"
        d = os.path.join(self.work, f"run{self.n}")
        os.makedirs(d, exist_ok=True)
        return tag, os.path.join("/tmp", f"{tag}.sock"), d

    def vring_argv(self, direction: str, burst: int, size: int, sock: str, variant: str = "split") -> list[str]:
        """``vring net`` (or ``vring switch``, cross-connect only) as e2e runs it; ``--vring-args`` go
        last, so they can override (A/B of an option)."""
        device = ["switch"] if self.a.vring_device == "switch" else [
            "net", "--mode", VRING_MODE[direction], "--frame-size", str(size)]
        return ["taskset", "-c", str(self.be_cpu), sys.executable, "-m", "vring", *device,
                *[a for s in socks(sock, direction) for a in ("--socket", s)], "--control", control(sock),
                *(["--poll"] if self.a.vring_mode == "poll" else []),
                "--cpus", str(self.be_cpu), "--burst", str(burst), "--queues", str(VARIANTS[variant][1]),
                *shlex.split(self.a.vring_args)]

    def backend(self, kind: str, direction: str, burst: int, size: int, sock: str, tag: str, d: str,
                variant: str = "split") -> Proc:
        if kind == "vring":
            return Proc("be_vring", self.vring_argv(direction, burst, size, sock, variant), d,
                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return Proc("be_dpdk", self.testpmd_be_argv(direction, burst, size, sock, tag, variant), d, commands=True)

    def testpmd_be_argv(self, direction: str, burst: int, size: int, sock: str, tag: str,
                        variant: str = "split") -> list[str]:
        """testpmd as DPDK's vhost back-end, interactive and forwarding from the start: e2e asks for
        its stats at the window's ends."""
        q = VARIANTS[variant][1]
        return [*testpmd_eal(self.fe_cpu, self.be_cpu, f"{tag}_be",
                             [f"net_vhost{i},iface={s},queues={q}" for i, s in enumerate(socks(sock, direction))]),
                "-i", "--auto-start",
                f"--forward-mode={DPDK_MODE[direction]}", "--total-num-mbufs=16384",
                f"--burst={burst}", f"--txpkts={size}", "--nb-cores=1", "--record-burst-stats",
                *(["--record-core-cycles"] if self.a.dpdk_cycles else []),
                f"--rxq={q}", f"--txq={q}"]

    def window_mark(self, be: str, bep: Proc, sock: str, direction: str, burst: int) -> dict | None:
        """The back-end's poll counts now (see ``dpdk_window`` / ``vring_window``)."""
        if be == "vring":
            return vring_sample(control(sock))
        out = bep.command("show fwd stats all", TESTPMD_STATS_END)
        return testpmd_bursts(out, "TX" if direction == "rx" else "RX", burst)

    def frontend(self, kind: str, direction: str, burst: int, size: int, sock: str, tag: str, d: str,
                 variant: str = "split") -> Proc:
        if kind == "vring":
            secs = self.a.warmup + self.a.seconds + 2
            argv = ["taskset", "-c", str(self.fe_cpu), sys.executable, "-m", "vring", "frontend",
                    *[a for s in socks(sock, direction) for a in ("--socket", s)],
                    "--mode", FE_VRING_MODE[direction], "--burst", str(burst), "--frame-size", str(size),
                    "--seconds", str(secs), "--wait", "60", "--rate", str(self.a.rate),
                    "--queues", str(VARIANTS[variant][1]), *(["--packed"] if variant == "packed" else [])]
            return Proc("fe_vring", argv, d, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return Proc("fe_testpmd", self.testpmd_fe_argv(direction, burst, size, sock, tag, variant), d)

    def testpmd_fe_argv(self, direction: str, burst: int, size: int, sock: str, tag: str,
                        variant: str = "split") -> list[str]:
        """testpmd as the virtio-user front-end; with ``--fe-bursts`` it also counts its own bursts."""
        devargs, q = VARIANTS[variant]
        return [*testpmd_eal(self.be_cpu, self.fe_cpu, f"{tag}_fe",
                             [f"net_virtio_user{i},path={s},queues={q}{devargs}"
                              for i, s in enumerate(socks(sock, direction))]),
                f"--forward-mode={FE_TESTPMD_MODE[direction]}", "--stats-period", "1", "--total-num-mbufs=16384",
                f"--burst={burst}", f"--txpkts={size}", f"--rxq={q}", f"--txq={q}", "--nb-cores=1",
                *(["--record-burst-stats"] if self.a.fe_bursts else [])]

    @contextlib.contextmanager
    def started(self, fe: str, be: str, direction: str, burst: int, size: int, variant: str = "split"):
        """The back-end, then the front-end, started and passing traffic: yields a :class:`Started`.
        On the way out both are stopped and DPDK's runtime directories and the sockets removed.
        Raises :class:`StartFailed` when a step does not get there."""
        tag, sock, d = self._names()
        procs: list[Proc] = []
        try:
            bep = self.backend(be, direction, burst, size, sock, tag, d, variant)
            procs.append(bep)
            # 180 s: a back-end that compiles its data plane cold takes ~90 s to open its socket
            if not wait_for(lambda: all(os.path.exists(s) for s in socks(sock, direction)), 180, [bep]):
                raise StartFailed("backend socket did not appear", d)
            fep = self.frontend(fe, direction, burst, size, sock, tag, d, variant)
            procs.append(fep)
            st = Started(bep, fep, sock, d, "tx" if direction == "tx" else "rx", len(socks(sock, direction)))
            if fe == "testpmd":
                flowing = wait_for(lambda: any(s > 0 for s in testpmd_samples(fep.text(), st.testpmd_column,
                                                                               st.nports)), 60, procs)
            else:
                flowing = wait_for(lambda: any(s > 0 for s in vring_fe_samples(fep.text(), st.key)), 60, procs)
            if not flowing:
                raise StartFailed("no traffic at the frontend within 60 s", d)
            yield st
        finally:
            for p in reversed(procs):
                p.stop(5)
            for suffix in ("_be", "_fe"):
                shutil.rmtree(os.path.join(DPDK_RUN, tag + suffix), ignore_errors=True)
            for s in [*socks(sock, direction), control(sock)]:
                try:
                    os.unlink(s)
                except FileNotFoundError:
                    pass

    def run(self, fe: str, be: str, direction: str, burst: int, size: int, rep: int, variant: str = "split") -> dict:
        res: dict = {"frontend": fe, "backend": be, "dir": direction, "burst": burst, "size": size, "rep": rep,
                     "variant": variant, "mpps": None}
        t_start = time.monotonic()
        pair = (self.be_cpu, self.fe_cpu)
        before = cross_core_ns(pair)
        try:
            with self.started(fe, be, direction, burst, size, variant) as st:
                res["logs"] = st.logs
                self._measure(res, st)
        except StartFailed as e:
            res["logs"], res["error"] = e.logs, str(e)
        res["xcore_ns"] = [before, cross_core_ns(pair)]  # before and after: did it change meanwhile?
        res["seconds"] = round(time.monotonic() - t_start, 1)
        return res

    def watch_latency(self, seconds: float) -> list[float]:
        """Sleep through the measured window, reading the line round trip between the two CPUs every
        ``--probe-every`` seconds (short real-time readings, ~0.2-0.7 ms each: bench/xcore.py), since
        the host may move the vCPUs in the middle of a run; the readings taken."""
        end = time.monotonic() + seconds
        out: list[float] = []
        every = self.a.probe_every
        while every > 0 and time.monotonic() + every < end:
            time.sleep(every)
            x = cross_core_ns((self.be_cpu, self.fe_cpu), rounds=2000, urgent=True, reads=1)
            if x is not None:
                out.append(x)
        time.sleep(max(0.0, end - time.monotonic()))
        return out

    def _measure(self, res: dict, st: Started) -> None:
        """Warm up, sample the window, stop both sides and read what they printed into ``res``."""
        fe, be, direction, burst = res["frontend"], res["backend"], res["dir"], res["burst"]
        bep, fep, sock, key, nports = st.bep, st.fep, st.sock, st.key, st.nports
        c0, o0, t0 = cpu_total(), sum(p.cpu_jiffies() for p in (bep, fep)), time.monotonic()
        time.sleep(self.a.warmup)
        w0 = self.window_mark(be, bep, sock, direction, burst)
        res["xcore_during"] = self.watch_latency(max(0.0, self.a.seconds - (0 if fe == "testpmd" else 0.5)))
        w1 = self.window_mark(be, bep, sock, direction, burst)
        c1, o1, t1 = cpu_total(), sum(p.cpu_jiffies() for p in (bep, fep)), time.monotonic()
        if fe == "vring":
            wait_for(lambda: not fep.alive(), 30, [])  # it stops itself after --seconds
        hz = os.sysconf("SC_CLK_TCK")
        res["foreign_cpu"] = round(max(0.0, ((c1 - c0) - (o1 - o0)) / hz / max(t1 - t0, 1e-3) * 100), 1)
        fep.stop()
        if be == "dpdk":  # its final stats (the loss accounting reads them) before it goes
            bep.command("stop", TESTPMD_STATS_END)
        bep.stop()
        ft, bt = fep.text(), bep.text()
        if fe == "testpmd":
            samples = after_start(testpmd_samples(ft, st.testpmd_column, nports),
                                  max(0, round(self.a.warmup)))
            res["fe_totals"] = testpmd_totals(ft)
            if self.a.fe_bursts:  # the front-end's own bursts over its life (its print at exit)
                res["fe_bursts"] = {w: testpmd_bursts(ft, w, burst) for w in ("RX", "TX")}
        else:
            samples = after_start(vring_fe_samples(ft, key), max(0, round(self.a.warmup)))
            m = re.findall(r"^\{.*\}$", ft, re.M)
            if m:
                res["fe_final"] = {k: v for k, v in json.loads(m[-1]).items() if k.endswith(("mpps", "packets"))}
        res["samples"] = [round(s, 3) for s in samples]
        if samples:
            res["mpps"] = round(statistics.fmean(samples), 3)
        if be == "vring":
            res["be_polls"] = vring_polls(bt)
            res["be_totals"] = vring_totals(bt)
            res["window"] = vring_window(w0, w1)
        else:
            i = bt.rfind("Telling cores to stop")
            last = bt[i:] if i >= 0 else bt  # the print at stop covers the whole run
            res["be_polls"] = testpmd_bursts(last, "TX" if direction == "rx" else "RX", burst)
            res["be_totals"] = testpmd_totals(bt)
            if res["be_polls"] and self.a.dpdk_cycles:
                res["be_polls"]["busy_ns_per_frame"] = testpmd_cycles(last)
            res["window"] = dpdk_window(w0, w1, burst)
        if res["window"]:  # DPDK's: the upper bound its counts allow
            res["empty_share"] = res["window"].get("empty_share", res["window"].get("empty_share_max"))
        if res["mpps"] is None:
            res["error"] = "no samples after warm-up"


# ---------------------------------------------------------------- summary, plot
def _dist(v: list[float]) -> dict | None:
    if not v:
        return None
    return {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3), "n": len(v)}


def _steady_ratios(sel: list[dict], spread: float = 1.5) -> list[float]:
    """vring / DPDK of each repetition whose two runs saw about the same line round trip between
    the cores (all reads, before, during and after each run, within ``spread`` of each other): on a VM
    whose vCPUs the host moves, a pair measured across a move compares two machines."""
    out = []
    for rep in sorted({r["rep"] for r in sel}):
        pair = {r["backend"]: r for r in sel if r["rep"] == rep}
        v, p = pair.get("vring"), pair.get("dpdk")
        if v and p and v.get("mpps") and p.get("mpps") and steady_pair(v, p, spread):
            out.append(v["mpps"] / p["mpps"])
    return out


def steady_pair(a: dict, b: dict, spread: float = 1.5) -> bool:
    """Whether two runs saw about the same line round trip between the cores throughout (every
    reading of both within ``spread`` of each other)."""
    lat = [x for r in (a, b) for x in xcore_reads(r)]
    return None not in lat and max(lat) <= spread * min(lat)


def cell(r: dict) -> tuple:
    """The configuration a run measured (front-end, variant, direction, burst, size): runs are
    grouped by it. Sets from before variants existed have no "variant": theirs was split."""
    return (r["frontend"], r.get("variant", "split"), r["dir"], r["burst"], r["size"])


def busy_ns_per_frame(r: dict) -> float | None:
    """The back-end's busy ns per frame in a run: over the measured window, else over its life."""
    return (r.get("window") or {}).get("busy_ns_per_frame") or (r.get("be_polls") or {}).get("busy_ns_per_frame")


def xcore_reads(r: dict) -> list[float | None]:
    """A run's line round trip readings: before, during (``watch_latency``; none in older sets), after."""
    x = r.get("xcore_ns") or [None, None]
    return [x[0], *(r.get("xcore_during") or []), x[-1]]


def latency(r: dict, near: float = 150.0, far: float = 250.0) -> str:
    """The cores' line round trip during a run: "near" when every read (before, during and after)
    was under ``near`` ns, "far" when all were over ``far``, else "mixed" (it changed, or no
    reading). On the EPYC VM the host puts the two vCPUs on cores sharing an L3 (~80 ns) or not
    (~330 ns), and moves them every few seconds to minutes."""
    x = [v for v in xcore_reads(r) if v]
    if len(x) < 2:
        return "mixed"
    return "near" if max(x) < near else "far" if min(x) > far else "mixed"


def summarize(runs: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys(cell(r) for r in runs))
    out = []
    for k in keys:
        fe, variant, direction, burst, size = k
        sel = [r for r in runs if cell(r) == k]
        row = {"frontend": fe, "variant": variant, "dir": direction, "burst": burst, "size": size}
        for be in ("vring", "dpdk"):
            rs = [r for r in sel if r["backend"] == be]
            row[be] = _dist([r["mpps"] for r in rs if r.get("mpps") is not None])
            # over the measured window (DPDK's: the upper bound its counts allow), then over the
            # back-end's whole life (DPDK's as printed, cut to whole percents, and its bound)
            row[f"{be}_empty_share"] = _dist([r["empty_share"] for r in rs if r.get("empty_share") is not None])
            row[f"{be}_empty_share_run"] = _dist([r["be_polls"]["empty_share"] for r in rs
                                                  if (r.get("be_polls") or {}).get("empty_share") is not None])
            if be == "dpdk":
                row["dpdk_empty_share_max_run"] = _dist([r["be_polls"]["empty_share_max"] for r in rs
                                                         if (r.get("be_polls") or {}).get("empty_share_max")
                                                         is not None])
            row[f"{be}_busy_ns_per_frame"] = _dist([b for b in map(busy_ns_per_frame, rs) if b])
            row[f"{be}_failed"] = sum(1 for r in rs if r.get("mpps") is None)
        row["foreign_cpu_max"] = max((r.get("foreign_cpu") or 0 for r in sel), default=None)
        v, p = row["vring"], row["dpdk"]
        row["ratio_median"] = round(v["median"] / p["median"], 3) if v and p and p["median"] > 0 else None
        row["ratio_best"] = round(v["max"] / p["max"], 3) if v and p and p["max"] > 0 else None
        row["xcore_ns"] = _dist([x for r in sel for x in xcore_reads(r) if x])
        steady = _steady_ratios(sel)
        row["steady_pairs"] = f"{len(steady)}/{len({r['rep'] for r in sel})}"
        row["ratio_steady"] = round(statistics.median(steady), 3) if steady else None
        out.append(row)
    return out


def merge(paths: list[str], note: str = "") -> dict:
    """One set from several e2e.json files (``PATH`` or ``PATH:VARIANT,...`` to take those variants
    only): the first file's header, every file's runs with reps renumbered so that no two files share
    a rep (a rep pairs a vring run with its DPDK run), summarized again. ``args_extra`` holds the
    other files' args, each with ``from``, so the set says what went in."""
    out: dict = {}
    runs: list[dict] = []
    extra = []
    for path in paths:
        path, _, only = path.partition(":")
        keep = set(only.split(",")) if only else None
        with open(path) as f:
            d = json.load(f)
        base = max((r["rep"] for r in runs), default=-1) + 1
        runs += [dict(r, rep=r["rep"] + base) for r in d["runs"]
                 if keep is None or r.get("variant", "split") in keep]
        if not out:
            out = {k: d[k] for k in ("args", "cpus", "machine", "elapsed_s") if k in d}
        else:
            extra.append(dict(d.get("args", {}), **{"from": path}))
    return dict(out, summary=summarize(runs), runs=runs, args_extra=extra, note=note)


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lines: dict = {}
    for s in summary:
        if s["ratio_median"] is not None:
            lines.setdefault((s["frontend"], s.get("variant", "split"), s["dir"], s["size"]), []).append(
                (s["burst"], s["ratio_median"]))
    for (fe, variant, direction, size), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"{fe} fe, {variant}, {direction}, {size} B")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("burst")
    ax.set_ylabel("vring / DPDK vhost (median Mpps ratio)")
    ax.set_title("vring net vs DPDK net_vhost, same frontend, alternating runs")
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cross_core_ns(cpus: tuple[int, int], rounds: int = 5000, urgent: bool = False, reads: int = 3) -> float | None:
    """The line round trip between the two CPUs now (bench/xcore.py): the least of ``reads`` reads."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from xcore import round_trip_ns

    v = [x for x in (round_trip_ns(cpus, rounds=rounds, urgent=urgent) for _ in range(reads)) if x is not None]
    return min(v) if v else None


def machine() -> dict:
    """What the numbers were measured on: these VMs change from one session to the next."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    dpdk = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        dpdk = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dpdk"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": os.uname().release, "dpdk": dpdk}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny matrix: both frontends, tx, burst 32, 64 B, 2 reps, 3 s (< 2 min)")
    ap.add_argument("--frontends", default="testpmd,vring", help="testpmd,vring")
    ap.add_argument("--dirs", default="tx,rx,loop,xconnect", help="tx,rx,loop,xconnect")
    ap.add_argument("--bursts", default="1,8,32,64")
    ap.add_argument("--sizes", default="64,512,1500")
    ap.add_argument("--variants", default="split",
                    help="split,packed,2q: ring layout / queue pairs (both front-ends)")
    ap.add_argument("--backends", default="vring,dpdk",
                    help="vring,dpdk: both for a ratio; one alone when comparing builds of vring")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (after warm-up)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of traffic skipped before measuring")
    ap.add_argument("--rate", type=float, default=0.0, metavar="MPPS",
                    help="the in-tree generator's offered load per TX queue (default 0: unpaced); with a rate both "
                         "back-ends carry the same load and their empty-poll shares compare their headroom")
    ap.add_argument("--vring-mode", choices=("poll", "adaptive"), default="poll",
                    help="vring's polling mode: --poll (busy-poll, as DPDK's PMD does; the default here) or its "
                         "own default, adaptive (polls under load, sleeps on the kicks after an idle spell)")
    ap.add_argument("--vring-device", choices=("net", "switch"), default="net",
                    help="the vring back-end: net (the default) or switch, the MAC-learning switch between the "
                         "two ports (--dirs xconnect only), against the same DPDK io forwarding")
    ap.add_argument("--vring-args", default="", metavar="ARGS",
                    help="more options for vring net (one string, e.g. '--hold-us 0'; a lone flag as "
                         "--vring-args=--flag): to compare settings of one build, run e2e once per setting "
                         "(--backends vring,dpdk keeps DPDK as the yardstick)")
    ap.add_argument("--dpdk-cycles", action="store_true",
                    help="run testpmd with --record-core-cycles and record its busy ns per packet (it then reads "
                         "the clock on every poll, empty ones too: keep it out of runs that compare empty polls)")
    ap.add_argument("--fe-bursts", action="store_true",
                    help="run the testpmd front-end with --record-burst-stats and record how full its RX and TX "
                         "bursts were (fe_bursts): how the front-end's work is cut up against each back-end")
    ap.add_argument("--probe-every", type=float, default=0.5, metavar="S",
                    help="read the line round trip between the CPUs every S seconds during each measured "
                         "window (short real-time readings, see bench/xcore.py; 0: only before and after)")
    ap.add_argument("--pair-retries", type=int, default=0, metavar="N",
                    help="run a vring/DPDK pair again, up to N times, while its runs did not see the same line "
                         "round trip between the CPUs throughout (steady_pair); every pair run is kept, each "
                         "with its own rep and its attempt number")
    ap.add_argument("--be-cpu", type=int, default=1, help="CPU of the back-end's data plane (default 1)")
    ap.add_argument("--fe-cpu", type=int, default=0, help="CPU of the frontend's data plane (default 0)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--keep-logs", metavar="DIR", help="copy every run's logs here")
    ap.add_argument("--merge", nargs="+", metavar="JSON[:VARIANTS]",
                    help="measure nothing: merge these e2e.json files (optionally only some variants of one) "
                         "into OUT/e2e.json and its plot, reps renumbered per file")
    ap.add_argument("--note", default="", help="with --merge: what the merged set is, kept in its JSON")
    return ap


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Take SIGTERM as Ctrl-C: the runs' finally blocks then stop the back-end and front-end, which
    run in their own sessions and would otherwise go on spinning on both CPUs after we are gone."""
    signal.signal(signal.SIGTERM, _interrupted)


def measure_cell(run, backends: list[str], reps: int, retries: int, runs: list[dict]) -> None:
    """``reps`` pairs of one cell, the back-ends alternating (``run(backend, rep)`` -> result), into
    ``runs``. A pair whose runs did not see the same line round trip throughout (``steady_pair``)
    is run again, up to ``retries`` times. Every pair run is kept, with its own rep and its
    ``attempt`` (0: the first), so the summary's medians count them all and its steady ratios
    the pairs that were steady."""
    rep = 0
    for _ in range(reps):
        for attempt in range(retries + 1):
            pair = []
            for be in backends:
                r = run(be, rep)
                r["attempt"] = attempt
                runs.append(r)
                pair.append(r)
            rep += 1
            if len(pair) < 2 or None in (pair[0].get("mpps"), pair[1].get("mpps")) or steady_pair(*pair):
                break
            log(f"the line round trip changed within the pair ({latency(pair[0])}, {latency(pair[1])}): "
                f"{'again' if attempt < retries else 'kept as it is'}")


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.merge:
        merged = merge(args.merge, args.note)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "e2e.json"), "w") as f:
            json.dump(merged, f, indent=1)
        plot(merged["summary"], os.path.join(args.out, "e2e_ratio.png"))
        log(f"merged {len(merged['runs'])} runs from {len(args.merge)} files into {args.out}")
        return 0
    stop_on_sigterm()
    if args.quick:
        args.frontends, args.dirs, args.bursts, args.sizes = "testpmd,vring", "tx", "32", "64"
        args.reps, args.seconds, args.warmup = 2, 3.0, 1.0
    if shutil.which(TESTPMD) is None:
        log(f"{TESTPMD} not found (apt-get install dpdk-dev)")
        return 2
    frontends = [f for f in args.frontends.split(",") if f]
    dirs = [d for d in args.dirs.split(",") if d]
    for d in dirs:
        if d not in VRING_MODE:
            ap.error(f"bad direction {d}")
        if args.vring_device == "switch" and d != "xconnect":
            ap.error("--vring-device switch runs --dirs xconnect only (a switch needs two ports)")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"bad variant {v}")
    t_all = time.monotonic()
    runs: list[dict] = []
    work = tempfile.mkdtemp(prefix="vring-e2e-")
    runner = Runner(args, work)
    try:
        matrix = [(fe, v, d, size, burst) for fe in frontends for v in variants for d in dirs
                  for size in _ints(args.sizes) for burst in _ints(args.bursts)]
        backends = [b for b in ("vring", "dpdk") if b in args.backends.split(",")]
        for fe, variant, direction, size, burst in matrix:
            def run(be: str, rep: int) -> dict:
                r = runner.run(fe, be, direction, burst, size, rep, variant)
                extra = f" empty={r['empty_share']:.1%}" if r.get("empty_share") is not None else ""
                log(f"{fe:>7} fe {variant:>6} {direction:>4} burst {burst:>3} {size:>4} B rep {rep} {be:>5}: "
                    f"{r['mpps'] if r['mpps'] is not None else 'FAILED (' + r.get('error', '?') + ')'}"
                    f" Mpps{extra} foreign_cpu={r.get('foreign_cpu')}% ({r['seconds']} s)")
                return r
            measure_cell(run, backends, args.reps, args.pair_retries, runs)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        if args.keep_logs:
            shutil.copytree(work, args.keep_logs, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    for r in runs:
        r.pop("logs", None)
    summary = summarize(runs)
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "e2e.json")
    host = machine()
    with open(out_json, "w") as f:
        json.dump({"args": vars(args), "cpus": os.cpu_count(), "machine": host,
                   "elapsed_s": round(time.monotonic() - t_all, 1), "summary": summary, "runs": runs}, f, indent=1)
    out_png = os.path.join(args.out, "e2e_ratio.png")
    plot(summary, out_png)
    print("| frontend | variant | dir | burst | size | vring Mpps med (min-max) | DPDK Mpps med (min-max) | "
          "ratio med | best / best | ratio, pairs at one latency | cross-core ns | "
          "empty polls in the window: vring / DPDK (bound) | whole life: vring / DPDK (bound) | foreign CPU max |")
    print("|---|---|---|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|")
    fmt = lambda d: f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})" if d else "failed"  # noqa: E731
    pct = lambda d, nd=1: f"{d['median']:.{nd}%}" if d else "-"  # noqa: E731
    ns = lambda d: f"{d['median']:.0f} ({d['min']:.0f}-{d['max']:.0f})" if d else "-"  # noqa: E731
    for s in summary:
        ratio = s["ratio_median"] if s["ratio_median"] is not None else "-"
        print(f"| {s['frontend']} | {s['variant']} | {s['dir']} | {s['burst']} | {s['size']} | {fmt(s['vring'])} | "
              f"{fmt(s['dpdk'])} | {ratio} | {s['ratio_best'] or '-'} | "
              f"{s['ratio_steady'] or '-'} ({s['steady_pairs']}) | "
              f"{ns(s['xcore_ns'])} | {pct(s['vring_empty_share'])} / {pct(s['dpdk_empty_share'])} | "
              f"{pct(s['vring_empty_share_run'])} / {pct(s.get('dpdk_empty_share_max_run'))} | "
              f"{s['foreign_cpu_max']}% |")
    print(f"measured on {host}")
    print(f"elapsed {time.monotonic() - t_all:.0f} s; wrote {out_json} and {out_png}")
    return 0 if all(r.get("mpps") is not None for r in runs) and runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
