"""Benchmarks get their own numba cache, so they never race the test suite's cache files.

It is keyed on vring's sources as the suite's is (vring._use_source_keyed_cache): a cache keyed
only on each file's timestamp, as a fixed NUMBA_CACHE_DIR would be, kept this suite's kernels with
an old copy of the data-plane steps they inline (stop 31: the kernel benchmarks measured the split
forward path of a build before)."""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
# Must happen before vring is imported (the kernel suite imports it after this file is loaded).
os.environ.setdefault("VRING_CACHE_HOME", os.path.join(HERE, ".numba_cache"))
