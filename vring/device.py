"""What a vhost-user device offers the session: feature sets, per-queue tables, the data plane.

A device owns one set of shared arrays for all its ports (one port = one vhost-user socket):
``qstate`` (one QSTATE record per vring), ``counters`` (one row per vring) and ``regions``
(one region table per port). Sessions change them only inside ``paused()``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from vring.layout import N_COUNTERS, new_qstate
from vring.memory import MAX_REGIONS, GuestMemory


class Device:
    """Base class: subclasses set the feature masks, the worker, and may override the hooks."""

    kind = "device"
    features = 0
    protocol_features = 0

    def __init__(self, nports: int, vrings_per_port: int):
        self.nports = nports
        self.nvq = vrings_per_port
        self.qstate = new_qstate(nports * vrings_per_port)
        self.counters = np.zeros((nports * vrings_per_port, N_COUNTERS), dtype=np.uint64)
        self.regions = np.zeros((nports, MAX_REGIONS, 4), dtype=np.uint64)
        self.memory = [GuestMemory(self.regions[p]) for p in range(nports)]
        self.worker = None

    def row(self, port: int, index: int) -> int:
        return port * self.nvq + index

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self.worker is None:
            yield
        else:
            with self.worker.paused():
                yield

    # ---- hooks ----
    def queue_num(self) -> int:
        """GET_QUEUE_NUM reply."""
        return self.nvq

    def port_features(self, port: int) -> int:
        """The virtio features offered on ``port`` (the same on every port unless a device says otherwise)."""
        return self.features

    def setup_queue(self, row: int, features: int) -> None:
        """Device-specific qstate fields when a ring starts."""

    def get_config(self, port: int, offset: int, size: int) -> bytes | None:
        return None

    def set_mtu(self, port: int, mtu: int) -> bool:
        """NET_SET_MTU (an MTU already range-checked): False if the device has no MTU."""
        return False

    def announce(self, port: int, mac: bytes) -> bool:
        """SEND_RARP after a live migration: make the network learn ``mac`` behind ``port``.
        False if the device has no network to announce to."""
        return False

    def disconnected(self, port: int) -> None:
        """A front-end left ``port`` (its rings are already stopped and its memory unmapped)."""

    def sample_extra(self) -> dict:
        """Device-specific fields for stats samples (vring.control)."""
        return {}

    def summary_lines(self) -> list[str]:
        """Device-specific lines printed at exit after the per-port counters."""
        return []

    def compile(self) -> None:
        """Compile (or load from numba's cache) what the data plane and the control plane's jitted
        paths run, so nothing compiles while a front-end waits. Cold: a minute or two."""
        if self.worker is not None:
            self.worker.warm_up()

    def start(self) -> None:
        self.compile()
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
