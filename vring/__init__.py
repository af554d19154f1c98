"""vring: a vhost-user back-end whose data plane is numpy views of guest memory and numba kernels."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__version__ = "0.1.0"


def _use_source_keyed_cache() -> None:
    """Keep numba's on-disk cache in a directory named after a hash of vring's sources.

    numba checks only the timestamp of the file a cached function is defined in, not the files
    of the kernels it inlined: after an upgrade or an edit of vring/split.py, devices/net.py's
    cached loop would still run the old kernels. A directory per source hash can't go stale.
    The directories live under $VRING_CACHE_HOME (bench/ keeps its own there), else the user's
    cache directory. An explicit NUMBA_CACHE_DIR wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = Path(__file__).resolve().parent
    h = hashlib.sha1(__version__.encode())
    for pkg in (here, here.parent / "devices"):
        for f in sorted(pkg.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    home = os.environ.get("VRING_CACHE_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vring"
    from numba.core import config

    config.CACHE_DIR = str(base / f"numba-{h.hexdigest()[:16]}")


_use_source_keyed_cache()
