"""Benchmarks get their own numba cache, so they never race the test suite's cache files."""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
# Must happen before numba is imported (the kernel suite imports vring after this file is loaded).
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(HERE, ".numba_cache"))
