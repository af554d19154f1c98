"""How long one tick of ``vring.ordering.cycles`` lasts, measured once against the monotonic clock."""
from __future__ import annotations

import functools
import time

from numba import njit

from vring.ordering import cycles


@njit(cache=True)
def _now():
    return cycles()


@functools.cache
def ns_per_cycle() -> float:
    _now()
    t0, c0 = time.perf_counter_ns(), _now()
    time.sleep(0.05)
    t1, c1 = time.perf_counter_ns(), _now()
    return (t1 - t0) / max(1, int(c1) - int(c0))
