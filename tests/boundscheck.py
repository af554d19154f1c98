"""Run a test again in a child pytest with NUMBA_BOUNDSCHECK=1 and a fresh NUMBA_CACHE_DIR, so an
array access that the kernels' own validation missed raises IndexError instead of passing
silently (numba does not bounds-check by default, and a cached build would skip the check)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

CHILD_ENV = "VRING_TEST_BOUNDSCHECK_CHILD"


def in_child() -> bool:
    return bool(os.environ.get(CHILD_ENV))


def check_boundscheck_on() -> None:
    """In the child: prove NUMBA_BOUNDSCHECK really is on in this process."""
    if not in_child():
        return
    from numba import njit

    @njit
    def canary(a, i):
        return a[i]

    with pytest.raises(IndexError):
        canary(np.zeros(2), 5)


def run_under_boundscheck(test_file: str, test_name: str, tmp_path) -> None:
    """Run ``test_name`` of ``test_file`` in a child pytest with bounds checking and a fresh cache."""
    cache = tmp_path / "numba"
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(cache), **{CHILD_ENV: "1"})
    p = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-k", test_name, "-p", "no:cacheprovider"],
        env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=540,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "1 passed" in p.stdout
    assert any(cache.rglob("*.nbi")), "kernels were not compiled into the fresh cache"
