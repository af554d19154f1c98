"""How long a cache line takes to go from one CPU to another and back (ns), measured now.

Every forwarding rate in bench/ is mostly lines moving between the back-end's and the front-end's
cores, so this one figure moves them all. On the shared VMs these benchmarks run on it is not a
constant: on 2026-11-26 (AMD EPYC, 2 vCPUs) it read ~90 ns for a while and then ~320 ns, as the host
placed the two vCPUs on cores sharing an L3 or not, and the packet rates of both back-ends went
up and down with it. bench/e2e.py measures it before and after every run, and every half second
during it (``urgent`` readings), so that runs can be compared with runs made under the same latency.

    python bench/xcore.py [--cpus 0,1] [--times 10]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading

import numpy as np
from numba import njit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vring.ordering import cycles, load_i64_acquire, store_i64_release  # noqa: E402
from vring.ordering_calibrate import ns_per_cycle  # noqa: E402

WARM = 100  # hand-overs before the timed ones: both threads running, the line in play


@njit(nogil=True, cache=True)
def _ping(line: int, rounds: int, give_up: int) -> int:
    """Hand the line over ``rounds`` times (odd values: the other CPU's turn); returns the cycles,
    or -1 if no answer came for ``give_up`` cycles (the other thread is gone)."""
    x = load_i64_acquire(line)  # even: the line is ours (a previous call's hand-overs continue)
    t0 = cycles()
    for _ in range(rounds):
        store_i64_release(line, x + 1)
        spins = 0
        while load_i64_acquire(line) != x + 2:
            spins += 1
            if spins & 1023 == 0 and cycles() - t0 > give_up:
                return -1
        x += 2
    return cycles() - t0


@njit(nogil=True, cache=True)
def _pong(line: int, stop: int, answers: int) -> None:
    """Answer every odd value with the next one, ``answers`` times or until ``stop`` (another line)
    is set."""
    while answers > 0 and load_i64_acquire(stop) == 0:
        v = load_i64_acquire(line)
        if v & 1:
            store_i64_release(line, v + 1)
            answers -= 1


def _urgent() -> None:
    """Make the calling thread real-time (SCHED_FIFO), if we may: a reading taken while busy-polling
    threads are pinned to the same CPUs then runs at once and whole, instead of queueing behind them
    for a time slice and timing the scheduler. The kernel still keeps 5 % of each second for others."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))


def round_trip_ns(cpus: tuple[int, int] = (0, 1), rounds: int = 20000, urgent: bool = False) -> float | None:
    """One measurement: ``rounds`` hand-overs between ``cpus``; None if they can't be pinned or the
    other thread stops answering. ``urgent``: the two threads run real-time (``_urgent``), for
    readings taken during a benchmark run."""
    if not set(cpus) <= os.sched_getaffinity(0) or cpus[0] == cpus[1]:
        return None
    buf = np.zeros(32, dtype=np.int64)  # the line at [0], the stop flag a line further at [16]
    first = (-buf.ctypes.data % 64) // 8
    line = buf.ctypes.data + 8 * first
    stop = line + 128
    res: list[int] = []
    both = threading.Barrier(2, timeout=10)  # neither spins real-time before the other is on its CPU

    def pong():
        os.sched_setaffinity(0, {cpus[1]})
        if urgent:
            both.wait()
            _urgent()
        _pong(line, stop, WARM + rounds)  # returns with the last answer: not spinning on after ping is done

    def ping():
        os.sched_setaffinity(0, {cpus[0]})
        if urgent:
            both.wait()
            _urgent()
        give_up = int(2e9 / ns_per_cycle())  # 2 s
        if _ping(line, WARM, give_up) >= 0:  # warm: both threads running, the line in play
            res.append(_ping(line, rounds, give_up))

    t = [threading.Thread(target=pong, daemon=True), threading.Thread(target=ping, daemon=True)]
    for th in t:
        th.start()
    t[1].join(10)
    buf[first + 16] = 1  # stop the answering thread
    t[0].join(1)
    if not res or res[0] < 0:
        return None
    return round(res[0] * ns_per_cycle() / rounds, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", default="0,1")
    ap.add_argument("--times", type=int, default=10)
    a = ap.parse_args(argv)
    cpus = tuple(int(c) for c in a.cpus.split(","))
    for _ in range(a.times):
        print(round_trip_ns(cpus), "ns", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
