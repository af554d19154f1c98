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
    """A kernel inlined into its callers by numba (LLVM never inlines across numba functions): for
    the per-frame steps (pop, walk_chain, translate, put_used, _deliver, _copy_frame ...). A call
    passes every array as ~7 words on the stack; measured behind testpmd, making those steps
    inline took the 64 B source rate from 12.7 to 23.4 Mpps and loopback from 7.8 to 11.8.
    Inline them only into kernels: inlined into a function with reference counting on, each
    array use inside a loop pays an atomic incref/decref (a synthetic pop: 12 -> 89 ns).
    The price is compile time (cold cache: the net loop 22 s with every step a call, ~85 s with
    the per-frame and per-batch steps and the batches themselves inlined), paid once per cache.
    Developing: numba's cache is keyed on each function's own file, and after editing an inlined
    kernel we have seen callers in other files both recompile and keep the old copy; remove the
    ``__pycache__/*.nbi``/``*.nbc`` files before measuring. And never edit a data-plane file while
    tests run: a device started meanwhile compiles cold (over a minute) and its test times out."""
    return njit(nogil=True, cache=True, _nrt=False, inline="always")(fn)
