"""How vring compiles its data-plane kernels.

``kernel``: nogil, cached, and without numba's reference counting (``_nrt=False``). Kernels
never allocate: their callers own every array, so the atomic incref/decref numba would emit
around each call that passes arrays is pure cost (measured here: walk_chain 55 ns → 11 ns per
chain). Functions that allocate (the loops that build their scratch arrays) use plain ``njit``
and call kernels.
"""
from __future__ import annotations

from numba import njit


def kernel(fn):
    return njit(nogil=True, cache=True, _nrt=False)(fn)


def inline_kernel(fn):
    """A kernel inlined into its callers by numba (not left to LLVM): for the small per-frame steps
    between two kernels. Measured: devices.net._send left as a call cost ~30 ns per frame."""
    return njit(nogil=True, cache=True, _nrt=False, inline="always")(fn)
