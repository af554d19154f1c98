"""See inside the rings: pandas DataFrames of a queue's state, from a live back-end, a snapshot, or a front-end.

A :class:`QueueState` is one consistent *copy* of one virtqueue: its descriptor table, its avail and
used rings (raw bytes, reinterpreted with the layout's dtypes), the device's private indexes
(``last_avail_idx``, ``used_idx``) and/or the driver's (``avail_idx``, ``last_used``, free list),
counters, and the region table. Every table is computed from that copy, never from live memory,
so a table can't change under you while you look at it.

Where a copy comes from:

- :func:`queue` / :func:`queues` -- a live :class:`~vring.device.Device` (in this process: the
  control socket thread of ``vring net`` or a notebook that runs a back-end in-process). Guest
  memory is read by slicing the region's ``mmap`` object (a bytes copy under the GIL, no buffer
  export, no raw pointer), so inspection can never keep a mapping alive or fault on an unmapped one.
  No lock is taken: the data plane runs on. A read is *torn* when an index moved while the ring was
  being copied; it is detected (indexes read before and after) and retried (:class:`TornRead` after
  ``retries`` attempts).
- :func:`driver_queue` -- the in-tree :class:`~vring.frontend.Frontend`'s own view of one of its
  rings (its numpy views and bookkeeping), to compare with the device's.
- :func:`load` -- a ``.npz`` snapshot written by :func:`save` (or ``vring snapshot``).

Split and packed rings: ``QueueState`` is a split ring, :class:`PackedQueueState` a packed one
(``layout`` says which). They share method names (``indexes``, ``descriptors``, ``avail_window``,
``used_window``, ``chains``, ``in_flight``, ``outstanding_heads``) and the common columns (``head``,
``addr``, ``len``, ``flags``, ``flag_names``, ``write``, ``region``), so notebooks and tools work on
both. In a packed ring the descriptor ring *is* the avail and used ring: the "windows" are the
available chains from the device's position and the used elements before its used position, and
a chain is named by its first slot (``head``) and the buffer id it carries (``id``).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vring.layout import (
    COUNTER_NAMES,
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    USED_ELEM,
    avail_bytes,
    desc_bytes,
    used_bytes,
)

SNAPSHOT_VERSION = 1
LAYOUTS = ("split", "packed")
DESC_FLAG_NAMES = ((DESC_F_NEXT, "NEXT"), (DESC_F_WRITE, "WRITE"), (DESC_F_INDIRECT, "INDIRECT"),
                   (PACKED_DESC_F_AVAIL, "AVAIL"), (PACKED_DESC_F_USED, "USED"))
EVENT_FLAG_NAMES = {RING_EVENT_FLAGS_ENABLE: "enable", RING_EVENT_FLAGS_DISABLE: "disable",
                    RING_EVENT_FLAGS_DESC: "desc"}
RETRIES = 200


class TornRead(RuntimeError):
    """The ring kept changing while it was copied (``retries`` attempts)."""


class Unmapped(RuntimeError):
    """The queue's ring addresses aren't in mapped guest memory (not started, or memory changing)."""


def flag_names(flags: int) -> str:
    return "|".join(n for bit, n in DESC_FLAG_NAMES if flags & bit) or "-"


def _pd():
    import pandas as pd

    return pd


def _flags_avail(fl: int, wrap: int) -> bool:
    """Packed descriptor flags available for the driver wrap counter ``wrap`` (§2.8.1; the
    kernels' ``packed.flags_avail``, in plain Python for copies and snapshots)."""
    return bool(fl & PACKED_DESC_F_AVAIL) == bool(wrap) and bool(fl & PACKED_DESC_F_USED) != bool(wrap)


def _u16(x: int) -> int:
    return int(x) & 0xFFFF


# --------------------------------------------------------------------------------------------
# one queue's copy


@dataclass
class QueueState:
    """A consistent copy of one virtqueue and the tables computed from it.

    ``dev`` holds the device's private state (``last_avail_idx``, ``used_idx``, ``ready``, ``broken``...)
    and ``drv`` the driver's (``avail_idx``, ``last_used``, ``free``); either may be None.
    ``regions`` is an (n, 2) array of (gpa, size) rows; ``indirect`` maps an indirect table's gpa to
    its DESC records (what could be read).
    """

    size: int
    desc_raw: bytes
    avail_raw: bytes
    used_raw: bytes
    layout: str = "split"
    port: int = 0
    index: int = 0
    dev: dict[str, int] | None = None
    drv: dict[str, Any] | None = None
    counters: dict[str, int] | None = None
    regions: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))
    indirect: dict[int, np.ndarray] = field(default_factory=dict)
    time: float = 0.0
    attempts: int = 1

    # ---- raw views of the copy ----
    @property
    def desc(self) -> np.ndarray:
        return np.frombuffer(self.desc_raw, DESC, self.size)

    @property
    def avail_ring(self) -> np.ndarray:
        return np.frombuffer(self.avail_raw, "<u2", self.size, 4)

    @property
    def used_ring(self) -> np.ndarray:
        return np.frombuffer(self.used_raw, USED_ELEM, self.size, 4)

    @property
    def avail_flags(self) -> int:
        return int(np.frombuffer(self.avail_raw, "<u2", 1, 0)[0])

    @property
    def avail_idx(self) -> int:
        return int(np.frombuffer(self.avail_raw, "<u2", 1, 2)[0])

    @property
    def used_event(self) -> int:
        return int(np.frombuffer(self.avail_raw, "<u2", 1, 4 + 2 * self.size)[0])

    @property
    def used_flags(self) -> int:
        return int(np.frombuffer(self.used_raw, "<u2", 1, 0)[0])

    @property
    def used_idx(self) -> int:
        return int(np.frombuffer(self.used_raw, "<u2", 1, 2)[0])

    @property
    def avail_event(self) -> int:
        return int(np.frombuffer(self.used_raw, "<u2", 1, 4 + 8 * self.size)[0])

    # ---- derived indexes ----
    @property
    def last_avail_idx(self) -> int | None:
        return None if self.dev is None else _u16(self.dev["last_avail_idx"])

    @property
    def outstanding(self) -> int:
        """Chains the driver made available and hasn't seen used yet (avail.idx - used.idx)."""
        return _u16(self.avail_idx - self.used_idx)

    @property
    def pending(self) -> int | None:
        """Chains available that the device hasn't popped yet (device view only)."""
        return None if self.dev is None else _u16(self.avail_idx - self.last_avail_idx)

    @property
    def in_flight_count(self) -> int | None:
        """Chains popped by the device and not yet in the used ring (device view only)."""
        if self.dev is None:
            return None
        return _u16(self.last_avail_idx - _u16(self.dev["used_idx"]))

    def indexes(self):
        """The ring's indexes as a Series: both sides' free-running u16 indexes, slots and derived counts.

        (Split rings have no wrap counters; a packed ring would add avail/used wrap counters here.)
        """
        pd = _pd()
        d: dict[str, Any] = {
            "layout": self.layout, "size": self.size,
            "avail.flags": self.avail_flags, "avail.idx": self.avail_idx, "used_event": self.used_event,
            "used.flags": self.used_flags, "used.idx": self.used_idx, "avail_event": self.avail_event,
            "avail.slot": self.avail_idx % self.size, "used.slot": self.used_idx % self.size,
            "outstanding": self.outstanding,
        }
        if self.dev is not None:
            d.update({"dev.last_avail_idx": self.last_avail_idx, "dev.used_idx": _u16(self.dev["used_idx"]),
                      "pending": self.pending, "in_flight": self.in_flight_count})
            for k in ("ready", "broken", "event_idx", "kicks_on"):
                if k in self.dev:
                    d[k] = int(self.dev[k])
        if self.drv is not None:
            d.update({"drv.avail_idx": _u16(self.drv["avail_idx"]), "drv.last_used": _u16(self.drv["last_used"]),
                      "drv.free": len(self.drv["free"]),
                      "unpublished": _u16(self.drv["avail_idx"] - self.avail_idx),
                      "unreclaimed": _u16(self.used_idx - self.drv["last_used"])})
        return pd.Series(d, name=f"port{self.port}/vring{self.index}")

    # ---- tables ----
    def region_of(self, addr: int) -> tuple[int, int]:
        """(region index, offset) of a guest-physical address, or (-1, -1)."""
        for i, (gpa, size) in enumerate(self.regions):
            if int(gpa) <= addr < int(gpa) + int(size):
                return i, addr - int(gpa)
        return -1, -1

    def _owners(self) -> dict[int, int]:
        """descriptor id -> head of the outstanding chain it belongs to."""
        own: dict[int, int] = {}
        desc = self.desc
        for head in self.outstanding_heads():
            d = head
            for _ in range(self.size):
                if d >= self.size or d in own:
                    break
                own[d] = head
                fl = int(desc[d]["flags"])
                if fl & DESC_F_INDIRECT or not fl & DESC_F_NEXT:
                    break
                d = int(desc[d]["next"])
        return own

    def descriptors(self):
        """The descriptor table: one row per descriptor, with the outstanding chain it belongs to (or -1)."""
        pd = _pd()
        desc = self.desc
        own = self._owners()
        reg = [self.region_of(int(a)) for a in desc["addr"]]
        df = pd.DataFrame({
            "id": np.arange(self.size),
            "addr": desc["addr"].astype(np.uint64),
            "len": desc["len"].astype(np.int64),
            "flags": desc["flags"].astype(np.int64),
            "flag_names": [flag_names(int(f)) for f in desc["flags"]],
            "next": desc["next"].astype(np.int64),
            "region": [r for r, _ in reg],
            "chain": [own.get(i, -1) for i in range(self.size)],
        })
        if self.drv is not None:
            free = set(self.drv["free"])
            df["free"] = [i in free for i in range(self.size)]
        return df.set_index("id")

    def _window(self, end: int) -> list[tuple[int, int, int]]:
        """(age, idx, slot) of the last ``size`` entries before free-running index ``end``, oldest first."""
        rows = []
        for k in range(self.size, 0, -1):
            idx = _u16(end - k)
            rows.append((k, idx, idx % self.size))
        return rows

    def avail_window(self):
        """The avail ring as the last ``size`` entries before avail.idx, oldest first, with their state:
        ``available`` (not popped by the device), ``in_flight`` (popped, not used), ``outstanding``
        (driver view: posted, not yet used), ``consumed``."""
        pd = _pd()
        ring = self.avail_ring
        rows = []
        for _, idx, slot in self._window(self.avail_idx):
            if self.dev is not None:
                if _u16(self.avail_idx - idx) <= self.pending:
                    state = "available"
                elif _u16(self.avail_idx - idx) <= self.pending + self.in_flight_count:
                    state = "in_flight"
                else:
                    state = "consumed"
            else:
                state = "outstanding" if _u16(self.avail_idx - idx) <= self.outstanding else "consumed"
            rows.append((idx, slot, int(ring[slot]), state))
        return pd.DataFrame(rows, columns=["idx", "slot", "head", "state"])

    def used_window(self):
        """The used ring as the last ``size`` entries before used.idx, oldest first. With the driver's
        view, ``unreclaimed`` marks entries the driver hasn't taken yet."""
        pd = _pd()
        ring = self.used_ring
        rows = []
        for _, idx, slot in self._window(self.used_idx):
            e = ring[slot]
            rows.append((idx, slot, int(e["id"]), int(e["len"])))
        df = pd.DataFrame(rows, columns=["idx", "slot", "id", "len"])
        if self.drv is not None:
            unre = _u16(self.used_idx - self.drv["last_used"])
            df["unreclaimed"] = [_u16(self.used_idx - i) <= unre for i in df["idx"]]
        return df

    def outstanding_heads(self) -> list[int]:
        """Heads the driver posted and hasn't seen used yet, oldest first (avail entries [used.idx, avail.idx);
        exact for an in-order device such as vring)."""
        ring = self.avail_ring
        n = self.outstanding
        if n > self.size:
            return []
        return [int(ring[_u16(self.used_idx + i) % self.size]) for i in range(n)]

    def in_flight(self):
        """In-flight heads: one row per outstanding chain, with whether the device has popped it.

        Device view: ``state`` is ``available`` or ``in_flight`` (popped, not used; empty between the
        data plane's batches). Driver view: the chains whose descriptors aren't on the free list.
        """
        pd = _pd()
        heads = self.outstanding_heads()
        rows = []
        for i, h in enumerate(heads):
            idx = _u16(self.used_idx + i)
            if self.dev is not None:
                state = "in_flight" if _u16(idx - _u16(self.dev["used_idx"])) < self.in_flight_count else "available"
            else:
                state = "outstanding"
            rows.append((idx, idx % self.size, h, state))
        return pd.DataFrame(rows, columns=["idx", "slot", "head", "state"])

    def driver_heads(self) -> list[int]:
        """Driver view only: heads of the chains whose descriptors aren't free (the driver's bookkeeping)."""
        if self.drv is None:
            raise ValueError("no driver-side state in this copy")
        free = set(self.drv["free"])
        desc = self.desc
        busy = [d for d in range(self.size) if d not in free]
        linked = {int(desc[d]["next"]) for d in busy if int(desc[d]["flags"]) & DESC_F_NEXT}
        return sorted(d for d in busy if d not in linked)

    def chain(self, head: int) -> list[dict[str, Any]]:
        """Decode one chain: its segments (direct, or read through an indirect table)."""
        desc = self.desc
        segs: list[dict[str, Any]] = []
        d = head
        seen = 0
        while 0 <= d < self.size and seen < self.size:
            e = desc[d]
            fl = int(e["flags"])
            if fl & DESC_F_INDIRECT:
                tbl = self.indirect.get(int(e["addr"]))
                if tbl is None:
                    segs.append(self._seg(head, len(segs), d, e, False, note="indirect table not captured"))
                else:
                    for j in range(min(len(tbl), self.size)):
                        t = tbl[j]
                        segs.append(self._seg(head, len(segs), j, t, True))
                        if not int(t["flags"]) & DESC_F_NEXT:
                            break
                break
            segs.append(self._seg(head, len(segs), d, e, False))
            if not fl & DESC_F_NEXT:
                break
            d = int(e["next"])
            seen += 1
        return segs

    def _seg(self, head, i, d, e, indirect, note=""):
        addr = int(e["addr"])
        r, off = self.region_of(addr)
        fl = int(e["flags"])
        return {"head": head, "seg": i, "desc": d, "addr": addr, "len": int(e["len"]), "flags": fl,
                "flag_names": flag_names(fl), "write": bool(fl & DESC_F_WRITE), "indirect": indirect,
                "region": r, "offset": off, "note": note}

    def chains(self, heads: list[int] | None = None):
        """Decoded chains, one row per segment (default: every outstanding chain)."""
        pd = _pd()
        heads = self.outstanding_heads() if heads is None else heads
        rows = [s for h in heads for s in self.chain(h)]
        cols = ["head", "seg", "desc", "addr", "len", "flags", "flag_names", "write", "indirect", "region", "offset",
                "note"]
        return pd.DataFrame(rows, columns=cols)

    def occupancy(self) -> dict[str, float]:
        o = {"outstanding": self.outstanding, "size": self.size, "fill": self.outstanding / self.size}
        if self.dev is not None:
            o["pending"] = self.pending
        return o


class PackedQueueState(QueueState):
    """A consistent copy of one packed virtqueue (virtio 1.x §2.8).

    ``desc_raw`` is the descriptor ring (PACKED_DESC records), ``avail_raw`` the driver event
    suppression area and ``used_raw`` the device's (4 bytes each). The device's positions are
    ``last_avail_idx``/``avail_wrap`` (next chain to pop) and ``used_idx``/``used_wrap`` (next used
    element), from ``dev``.
    """

    layout: str = "packed"

    @property
    def desc(self) -> np.ndarray:
        return np.frombuffer(self.desc_raw, PACKED_DESC, self.size)

    @property
    def driver_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the driver event suppression area (the driver tells us when it wants calls)."""
        a = np.frombuffer(self.avail_raw, "<u2", 2)
        return int(a[0]), int(a[1])

    @property
    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the device event suppression area (we tell the driver when we want kicks)."""
        a = np.frombuffer(self.used_raw, "<u2", 2)
        return int(a[0]), int(a[1])

    def _pos(self) -> tuple[int, int, int, int]:
        if self.dev is None:
            raise ValueError("a packed copy needs the device's positions")
        d = self.dev
        return int(d["last_avail_idx"]), int(d["avail_wrap"]), int(d["used_idx"]), int(d["used_wrap"])

    def _available(self, desc: np.ndarray, idx: int, wrap: int) -> bool:
        return _flags_avail(int(desc[idx]["flags"]), wrap)

    def pending_chains(self) -> list[dict[str, Any]]:
        """The chains available from the device's position, in order: slot, wrap, slots, buffer id."""
        desc = self.desc
        idx, wrap, _, _ = self._pos()
        out: list[dict[str, Any]] = []
        seen = 0
        while seen < self.size and self._available(desc, idx, wrap):
            start, start_wrap, slots = idx, wrap, []
            while seen < self.size:
                slots.append(idx)
                fl = int(desc[idx]["flags"])
                seen += 1
                idx += 1
                if idx == self.size:
                    idx, wrap = 0, wrap ^ 1
                if not fl & DESC_F_NEXT:
                    break
            out.append({"slot": start, "wrap": start_wrap, "slots": slots, "id": int(desc[slots[-1]]["id"])})
        return out

    @property
    def last_avail_idx(self) -> int | None:
        return None if self.dev is None else int(self.dev["last_avail_idx"])

    @property
    def in_flight_count(self) -> int | None:
        """Descriptors popped by the device and not yet used (0 between the data plane's batches)."""
        if self.dev is None:
            return None
        la, aw, ui, uw = self._pos()
        return (la - ui) + (self.size if aw != uw else 0)

    @property
    def pending(self) -> int | None:
        """Chains available that the device hasn't popped yet."""
        return len(self.pending_chains())

    @property
    def pending_descriptors(self) -> int:
        return sum(len(c["slots"]) for c in self.pending_chains())

    @property
    def outstanding(self) -> int:
        """Descriptors the driver made available and hasn't seen used yet."""
        return self.pending_descriptors + self.in_flight_count

    def indexes(self):
        pd = _pd()
        la, aw, ui, uw = self._pos()
        dro, drf = self.driver_event
        dvo, dvf = self.device_event
        d: dict[str, Any] = {
            "layout": self.layout, "size": self.size,
            "dev.last_avail_idx": la, "dev.avail_wrap": aw, "dev.used_idx": ui, "dev.used_wrap": uw,
            "driver_event.off": dro & 0x7FFF, "driver_event.wrap": dro >> 15,
            "driver_event.flags": EVENT_FLAG_NAMES.get(drf & 3, str(drf)),
            "device_event.off": dvo & 0x7FFF, "device_event.wrap": dvo >> 15,
            "device_event.flags": EVENT_FLAG_NAMES.get(dvf & 3, str(dvf)),
            "pending": self.pending, "pending_descriptors": self.pending_descriptors,
            "in_flight": self.in_flight_count, "outstanding": self.outstanding,
        }
        for k in ("ready", "broken", "event_idx", "kicks_on"):
            if k in self.dev:
                d[k] = int(self.dev[k])
        return pd.Series(d, name=f"port{self.port}/vring{self.index}")

    def _slot_states(self) -> dict[int, tuple[str, int]]:
        """slot -> (state, head slot of its chain) for pending and in-flight descriptors."""
        out: dict[int, tuple[str, int]] = {}
        for c in self.pending_chains():
            for sl in c["slots"]:
                out[sl] = ("available", c["slot"])
        _, _, ui, _ = self._pos()
        for k in range(self.in_flight_count or 0):
            out.setdefault((ui + k) % self.size, ("in_flight", -1))
        return out

    def descriptors(self):
        """The descriptor ring: one row per slot with its AVAIL/USED bits and its state: ``available``
        (part of a chain the device will pop next), ``in_flight``, ``used`` (a used element: AVAIL == USED)
        or ``-`` (a descriptor of an earlier lap)."""
        pd = _pd()
        desc = self.desc
        st = self._slot_states()
        rows = []
        for i in range(self.size):
            e = desc[i]
            fl = int(e["flags"])
            a, u = bool(fl & PACKED_DESC_F_AVAIL), bool(fl & PACKED_DESC_F_USED)
            state, chain = st.get(i, ("used" if self._is_used(desc, i) else "-", -1))
            rows.append({"slot": i, "addr": int(e["addr"]), "len": int(e["len"]), "id": int(e["id"]), "flags": fl,
                         "flag_names": flag_names(fl), "avail": int(a), "used": int(u),
                         "region": self.region_of(int(e["addr"]))[0], "state": state, "chain": chain})
        return pd.DataFrame(rows).set_index("slot")

    def avail_window(self):
        """The chains available from the device's position, oldest first (one row per chain)."""
        pd = _pd()
        rows = [(c["slot"], c["wrap"], c["slot"], c["id"], len(c["slots"]), "available") for c in self.pending_chains()]
        return pd.DataFrame(rows, columns=["idx", "wrap", "head", "id", "ndesc", "state"])

    def _is_used(self, desc: np.ndarray, slot: int) -> bool:
        """A used element of the lap that wrote ``slot`` last: AVAIL == USED == that lap's wrap counter
        (an all-zero record is a slot never written since the ring was set up, not a used element)."""
        _, _, ui, uw = self._pos()
        wrap = uw if slot < ui else uw ^ 1  # slots before used_idx were written in this lap
        e = desc[slot]
        fl = int(e["flags"])
        a, u = bool(fl & PACKED_DESC_F_AVAIL), bool(fl & PACKED_DESC_F_USED)
        blank = fl == 0 and int(e["addr"]) == 0 and int(e["len"]) == 0 and int(e["id"]) == 0
        return a == u == bool(wrap) and not blank

    def used_window(self):
        """Used elements before the device's used position, oldest first (see ``_is_used``)."""
        pd = _pd()
        desc = self.desc
        _, _, ui, uw = self._pos()
        rows = []
        for k in range(self.size):
            slot = (ui + k) % self.size
            wrap = uw if slot < ui else uw ^ 1
            if self._is_used(desc, slot):
                rows.append((slot, wrap, int(desc[slot]["id"]), int(desc[slot]["len"])))
        return pd.DataFrame(rows, columns=["idx", "wrap", "id", "len"])

    def outstanding_heads(self) -> list[int]:
        """Buffer ids of the chains the device will pop next (a packed chain is named by its buffer id)."""
        return [c["id"] for c in self.pending_chains()]

    def in_flight(self):
        pd = _pd()
        rows = [(c["slot"], c["wrap"], c["slot"], c["id"], "available") for c in self.pending_chains()]
        return pd.DataFrame(rows, columns=["idx", "wrap", "head", "id", "state"])

    def driver_heads(self) -> list[int]:
        raise NotImplementedError("the in-tree front-end drives split rings only")

    def chain(self, head: int) -> list[dict[str, Any]]:
        """Decode the chain starting at slot ``head`` (following NEXT through the ring, or an indirect table)."""
        desc = self.desc
        segs: list[dict[str, Any]] = []
        slot = head
        for _ in range(self.size):
            e = desc[slot]
            fl = int(e["flags"])
            if fl & DESC_F_INDIRECT:
                tbl = self.indirect.get(int(e["addr"]))
                if tbl is None:
                    segs.append(self._pseg(head, len(segs), slot, e, False, "indirect table not captured"))
                else:
                    for j in range(min(len(tbl), self.size)):
                        segs.append(self._pseg(head, len(segs), j, tbl[j], True, ""))
                break
            segs.append(self._pseg(head, len(segs), slot, e, False, ""))
            if not fl & DESC_F_NEXT:
                break
            slot = (slot + 1) % self.size
        return segs

    def _pseg(self, head, i, d, e, indirect, note):
        seg = self._seg(head, i, d, e, indirect, note)
        seg["id"] = int(e["id"]) if "id" in e.dtype.names else -1
        return seg

    def chains(self, heads: list[int] | None = None):
        """Decoded chains, one row per segment (default: every chain available to the device), by first slot."""
        pd = _pd()
        heads = [c["slot"] for c in self.pending_chains()] if heads is None else heads
        rows = [s for h in heads for s in self.chain(h)]
        cols = ["head", "seg", "desc", "id", "addr", "len", "flags", "flag_names", "write", "indirect", "region",
                "offset", "note"]
        return pd.DataFrame(rows, columns=cols)

    def occupancy(self) -> dict[str, float]:
        return {"outstanding": self.outstanding, "size": self.size, "fill": self.outstanding / self.size,
                "pending": self.pending}


def make_state(layout: str, **kw) -> QueueState:
    if layout == "packed":
        return PackedQueueState(layout="packed", **kw)
    if layout != "split":
        raise ValueError(f"unknown ring layout {layout!r}")
    return QueueState(layout="split", **kw)


# --------------------------------------------------------------------------------------------
# reading guest memory without exports or raw pointers


def _hva_read(memory, hva: int, n: int) -> bytes:
    """Copy n bytes at host address hva from one mapped region (mmap slicing: a copy, no export)."""
    for r in list(memory.regions):
        try:
            base = r.hva
        except AttributeError:  # removed (its view dropped) while we looked
            continue
        if base <= hva and hva + n <= base + r.size:
            off = r.mmap_offset + (hva - base)
            try:
                return r.mm[off : off + n]
            except ValueError as e:  # closed meanwhile
                raise Unmapped(str(e)) from None
    raise Unmapped(f"host address {hva:#x}+{n} is not in guest memory")


def _gpa_read(memory, gpa: int, n: int) -> bytes:
    out = b""
    while n > 0:
        for r in list(memory.regions):
            off = gpa - r.gpa
            if 0 <= off < r.size:
                k = min(n, r.size - off)
                try:
                    out += r.mm[r.mmap_offset + off : r.mmap_offset + off + k]
                except ValueError as e:
                    raise Unmapped(str(e)) from None
                gpa += k
                n -= k
                break
        else:
            raise Unmapped(f"guest address {gpa:#x} is not mapped")
    return out


def _read_indirect(desc: np.ndarray, read, dtype: np.dtype = DESC) -> dict[int, np.ndarray]:
    """The indirect tables the ring's descriptors point at (a packed ring's tables use the packed layout)."""
    out: dict[int, np.ndarray] = {}
    for e in desc[(desc["flags"] & DESC_F_INDIRECT) != 0]:
        addr, ln = int(e["addr"]), int(e["len"])
        if ln == 0 or ln % 16 or ln > 16 * 32768 or addr in out:
            continue
        with contextlib.suppress(Unmapped):
            out[addr] = np.frombuffer(read(addr, ln), dtype).copy()
    return out


def _qstate_fields(q: np.void) -> dict:
    """A queue-state record as a dict: ints, and lists for its array fields (a packed batch's shadow)."""
    return {k: q[k].tolist() if q.dtype[k].shape else int(q[k]) for k in q.dtype.names}


def _device_indexes(q: np.void, memory) -> tuple[int, ...]:
    if "packed" in q.dtype.names and q["packed"]:
        # the ring has no index in memory: the device's positions (and the batch it is building) tell
        return tuple(int(q[k]) for k in ("last_avail_idx", "avail_wrap", "used_idx", "used_wrap", "t_count",
                                         "u_count"))
    avail_idx = int.from_bytes(_hva_read(memory, int(q["avail"]) + 2, 2), "little")
    used_idx = int.from_bytes(_hva_read(memory, int(q["used"]) + 2, 2), "little")
    return avail_idx, used_idx, int(q["last_avail_idx"]), int(q["used_idx"])


def _counters(saved: np.ndarray) -> dict[str, int]:
    """A snapshot's counters by name; one saved before a counter existed reads it as 0."""
    return {n: int(saved[i]) if i < len(saved) else 0 for i, n in enumerate(COUNTER_NAMES)}


def _region_rows(table: np.ndarray) -> np.ndarray:
    t = table[table[:, 1] != 0]
    return t[:, :2].astype(np.uint64).copy()


def queue(dev, port: int, index: int, retries: int = RETRIES, indirect: bool = True) -> QueueState:
    """A consistent copy of vring ``index`` of ``port`` of a live device (no lock; torn reads retried)."""
    row = dev.row(port, index)
    memory = dev.memory[port]
    last = None
    for attempt in range(1, retries + 1):
        q = dev.qstate[row].copy()
        size = int(q["size"])
        if not q["ready"] or size == 0 or not q["desc"]:
            raise Unmapped(f"port {port} vring {index} is not started")
        packed = bool(q["packed"]) if "packed" in q.dtype.names else False
        before = _device_indexes(q, memory)
        desc_raw = _hva_read(memory, int(q["desc"]), desc_bytes(size))
        avail_raw = _hva_read(memory, int(q["avail"]), 4 if packed else avail_bytes(size))
        used_raw = _hva_read(memory, int(q["used"]), 4 if packed else used_bytes(size))
        q2 = dev.qstate[row].copy()
        after = _device_indexes(q2, memory)
        cur = (before, int(q["desc"]), int(q["avail"]), int(q["used"]))
        if before == after and (cur[1:] == (int(q2["desc"]), int(q2["avail"]), int(q2["used"]))):
            st = make_state("packed" if packed else "split", size=size, desc_raw=desc_raw, avail_raw=avail_raw,
                            used_raw=used_raw, port=port, index=index, dev=_qstate_fields(q),
                            counters={n: int(v) for n, v in zip(COUNTER_NAMES, dev.counters[row], strict=True)},
                            regions=_region_rows(dev.regions[port]), time=time.time(), attempts=attempt)
            # the copy must agree with itself too: indexes inside the copied rings equal those read around it
            if packed or (st.avail_idx == before[0] and st.used_idx == before[1]):
                if indirect:
                    st.indirect = _read_indirect(st.desc, lambda a, n: _gpa_read(memory, a, n),
                                                 PACKED_DESC if packed else DESC)
                return st
        last = (before, after)
        if attempt % 16 == 0:
            time.sleep(0)  # let the data plane finish its batch
    raise TornRead(f"port {port} vring {index} changed during {retries} copies (last {last})")


def ready_rows(dev) -> list[tuple[int, int]]:
    return [divmod(r, dev.nvq) for r in range(len(dev.qstate)) if dev.qstate[r]["ready"]]


def queues(dev, retries: int = RETRIES) -> dict[tuple[int, int], QueueState]:
    """Copies of every started queue of a device, keyed (port, vring)."""
    out = {}
    for port, index in ready_rows(dev):
        with contextlib.suppress(Unmapped):
            out[(port, index)] = queue(dev, port, index, retries=retries)
    return out


def driver_queue(fe, index: int) -> QueueState:
    """The in-tree front-end's own view of its ring ``index`` (driver side: its views and bookkeeping)."""
    from vring.frontend import GPA_BASE

    r = fe.rings[index]
    st = QueueState(size=r.size, desc_raw=r.desc.tobytes(), avail_raw=r.avail.tobytes(), used_raw=r.used.tobytes(),
                    index=index, drv={"avail_idx": r.avail_idx, "last_used": r.last_used, "free": list(r.free),
                                      "kicks": r.kicks},
                    regions=np.array([[GPA_BASE, fe.mem_size]], np.uint64), time=time.time())
    st.indirect = _read_indirect(st.desc, lambda a, n: fe.mem[a - GPA_BASE : a - GPA_BASE + n].tobytes())
    return st


# --------------------------------------------------------------------------------------------
# per-queue counters and status


def broken_reason(code: int) -> str:
    if not code:
        return ""
    from vring.split import BROKEN_REASONS

    return BROKEN_REASONS.get(code, f"code {code}")


def _queue_rows(qstate: np.ndarray, counters: np.ndarray, nvq: int, ring_pos: dict | None = None) -> list[dict]:
    """One dict per vring; ring_pos: row -> (avail.idx or None for packed, chains pending)."""
    rows = []
    for row in range(len(qstate)):
        q = qstate[row]
        port, index = divmod(row, nvq)
        d = {"port": port, "vring": index, "pair": index // 2, "dir": "rx" if index % 2 == 0 else "tx",
             "ready": int(q["ready"]), "size": int(q["size"])}
        d.update({n: int(v) for n, v in zip(COUNTER_NAMES, counters[row], strict=True)})
        d["broken"] = int(q["broken"])
        d["broken_reason"] = broken_reason(int(q["broken"]))
        d["layout"] = "packed" if "packed" in q.dtype.names and q["packed"] else "split"
        d["last_avail_idx"] = int(q["last_avail_idx"])
        d["used_idx"] = int(q["used_idx"])
        pos = (ring_pos or {}).get(row)
        if pos is not None:
            d["avail_idx"] = pos[0]
            d["pending"] = pos[1]
            d["occupancy"] = d["pending"] / max(1, int(q["size"]))
        else:
            d["avail_idx"] = None
            d["pending"] = None
            d["occupancy"] = None
        rows.append(d)
    return rows


def _packed_pending(desc_raw: bytes, size: int, idx: int, wrap: int) -> int:
    flags = np.frombuffer(desc_raw, PACKED_DESC, size)["flags"]
    n = seen = 0
    while seen < size:
        if not _flags_avail(int(flags[idx]), wrap):
            break
        while seen < size:
            fl = int(flags[idx])
            seen += 1
            idx += 1
            if idx == size:
                idx, wrap = 0, wrap ^ 1
            if not fl & DESC_F_NEXT:
                break
        n += 1
    return n


def ring_positions(dev, retries: int = 50) -> dict[int, tuple[int | None, int]]:
    """row -> (avail.idx, chains pending) for every started ring, read from guest memory (split: the avail
    index; packed: a walk of the descriptor flags). A row is left out while its memory is unmapped."""
    out: dict[int, tuple[int | None, int]] = {}
    for row in range(len(dev.qstate)):
        for _ in range(retries):
            q = dev.qstate[row].copy()
            if not q["ready"] or not q["avail"]:
                break
            mem = dev.memory[row // dev.nvq]
            try:
                if "packed" in q.dtype.names and q["packed"]:
                    raw = _hva_read(mem, int(q["desc"]), desc_bytes(int(q["size"])))
                    pos = (None, _packed_pending(raw, int(q["size"]), int(q["last_avail_idx"]), int(q["avail_wrap"])))
                else:
                    ai = int.from_bytes(_hva_read(mem, int(q["avail"]) + 2, 2), "little")
                    pos = (ai, _u16(ai - int(q["last_avail_idx"])))
            except Unmapped:
                break
            q2 = dev.qstate[row]
            if (q2["avail"] == q["avail"] and q2["ready"] and q2["last_avail_idx"] == q["last_avail_idx"]):
                out[row] = pos
                break
    return out


def counters(dev):
    """Per-queue counters and status of a live device as a DataFrame (one row per vring)."""
    pd = _pd()
    return pd.DataFrame(_queue_rows(dev.qstate.copy(), dev.counters.copy(), dev.nvq, ring_positions(dev)))


# --------------------------------------------------------------------------------------------
# snapshots


def snapshot_arrays(dev, meta: dict | None = None, retries: int = RETRIES) -> dict[str, np.ndarray]:
    """Everything about a device's rings as named arrays (what :func:`save` writes)."""
    arrays: dict[str, np.ndarray] = {
        "qstate": dev.qstate.copy(),
        "counters": dev.counters.copy(),
        "regions": dev.regions.copy(),
    }
    states = {}
    skipped = {}
    for port, index in ready_rows(dev):
        try:
            states[dev.row(port, index)] = queue(dev, port, index, retries=retries)
        except (Unmapped, TornRead) as e:
            skipped[dev.row(port, index)] = f"{type(e).__name__}: {e}"
    for row, st in states.items():
        arrays[f"q{row}_desc"] = np.frombuffer(st.desc_raw, np.uint8)
        arrays[f"q{row}_avail"] = np.frombuffer(st.avail_raw, np.uint8)
        arrays[f"q{row}_used"] = np.frombuffer(st.used_raw, np.uint8)
        arrays[f"q{row}_qstate"] = np.array([tuple(st.dev[k] for k in dev.qstate.dtype.names)], dev.qstate.dtype)
        arrays[f"q{row}_counters"] = np.array([st.counters[n] for n in COUNTER_NAMES], np.uint64)
        if st.indirect:
            addrs = sorted(st.indirect)
            arrays[f"q{row}_ind_addr"] = np.array(addrs, np.uint64)
            arrays[f"q{row}_ind_count"] = np.array([len(st.indirect[a]) for a in addrs], np.int64)
            arrays[f"q{row}_ind_desc"] = np.concatenate([st.indirect[a] for a in addrs])
    m = {"version": SNAPSHOT_VERSION, "nports": dev.nports, "nvq": dev.nvq,
         "kind": getattr(dev, "kind", "device"), "time": time.time(), "pid": os.getpid(),
         "queues": sorted(states), "skipped": skipped}
    m.update(meta or {})
    arrays["meta"] = np.array(json.dumps(m))
    return arrays


def save(dev, path: str, meta: dict | None = None) -> str:
    """Write a snapshot of a live device to ``path`` (.npz)."""
    np.savez_compressed(path, **snapshot_arrays(dev, meta))
    return path


class Snapshot:
    """A saved ``.npz`` snapshot: ``meta``, ``counters()`` and ``queue(port, vring)`` as from a live device."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.meta = json.loads(str(arrays["meta"]))
        if self.meta.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {self.meta.get('version')} (this vring reads {SNAPSHOT_VERSION})")
        self.nvq = int(self.meta["nvq"])
        self.qstate = arrays["qstate"]

    def rows(self) -> list[tuple[int, int]]:
        return [divmod(r, self.nvq) for r in self.meta["queues"]]

    def queue(self, port: int, index: int) -> QueueState:
        row = port * self.nvq + index
        a = self.arrays
        if f"q{row}_desc" not in a:
            raise KeyError(f"port {port} vring {index} is not in this snapshot (not started)")
        q = a[f"q{row}_qstate"][0]
        packed = "packed" in q.dtype.names and bool(q["packed"])
        st = make_state("packed" if packed else "split", size=int(q["size"]), desc_raw=a[f"q{row}_desc"].tobytes(),
                        avail_raw=a[f"q{row}_avail"].tobytes(), used_raw=a[f"q{row}_used"].tobytes(),
                        port=port, index=index, dev=_qstate_fields(q),
                        counters=_counters(a[f"q{row}_counters"]),
                        regions=_region_rows(a["regions"][port]), time=float(self.meta["time"]))
        if f"q{row}_ind_addr" in a:
            desc = a[f"q{row}_ind_desc"]
            start = 0
            for addr, n in zip(a[f"q{row}_ind_addr"], a[f"q{row}_ind_count"], strict=True):
                st.indirect[int(addr)] = desc[start : start + int(n)]
                start += int(n)
        return st

    def counters(self):
        pd = _pd()
        pos: dict[int, tuple[int | None, int]] = {}
        for row in self.meta["queues"]:
            st = self.queue(*divmod(row, self.nvq))
            pos[row] = (None if st.layout == "packed" else st.avail_idx, st.pending)
        return pd.DataFrame(_queue_rows(self.qstate, self.arrays["counters"], self.nvq, pos))


def load(path_or_file) -> Snapshot:
    """Read a snapshot written by :func:`save` / ``vring snapshot``."""
    with np.load(path_or_file, allow_pickle=False) as z:
        return Snapshot({k: z[k] for k in z.files})
