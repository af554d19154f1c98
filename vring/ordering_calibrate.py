"""How long one tick of ``vring.ordering.cycles`` lasts, measured once against the monotonic clock."""
from __future__ import annotations

import functools
import time

from numba import njit

from vring.ordering import cycles


@njit(cache=True)
def cycles_now() -> int:
    """``vring.ordering.cycles`` read from Python (the data plane's clock, for its timestamps)."""
    return cycles()


def _pair() -> tuple[float, int]:
    """A monotonic time and a cycle count taken together: of a few tries, the one whose clock reads
    lie closest around the counter's (a thread preempted between two reads, as happens on a busy
    machine, would skew the ratio by the whole preemption)."""
    best = None
    for _ in range(5):
        a = time.perf_counter_ns()
        c = int(cycles_now())
        b = time.perf_counter_ns()
        if best is None or b - a < best[0]:
            best = (b - a, (a + b) / 2, c)
    return best[1], best[2]


@functools.cache
def ns_per_cycle() -> float:
    cycles_now()
    t0, c0 = _pair()
    time.sleep(0.05)
    t1, c1 = _pair()
    return (t1 - t0) / max(1, c1 - c0)
