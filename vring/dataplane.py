"""The data-plane thread: a long-running nogil numba loop that Python only starts, pauses and stops.

A device supplies ``loop(ctrl, *args)``, a jitted function that keeps working until
``ctrl[CMD]`` stops being RUN and then returns. ``Worker.paused()`` asks it to return, waits
until it has (the acknowledgement), lets the control plane change rings or memory, and
starts it again with fresh arguments. While idle the loop can sleep in poll(2) on the
kick eventfds (adaptive mode), so an idle backend costs no CPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from vring.jit import inline_kernel, kernel
from vring.ordering import cpu_relax, cycles, fence_seq_cst, load_i64_acquire, sys_poll, sys_read
from vring.ring import has_work, set_kicks

log = logging.getLogger(__name__)

# control array slots (int64); LAST_ROUND: the loop returns by itself once ROUNDS reaches it (0: never)
CMD, WAKE_FD, IDLE_ROUNDS, SLEEP_MS, ROUNDS, BUSY_ROUNDS, SLEEPS, LAST_ROUND = range(8)
CTRL_SIZE = 16
RUN, PAUSE = 1, 0
POLLIN = 1
# busy[] slots (uint64): cycles of the timed busy spans, frames moved (all), start of the open timed
# span (0: none), frames the timed spans moved, whether this round has found work, busy rounds
# since the last timed one
BUSY_CYCLES, BUSY_FRAMES, BUSY_SINCE, BUSY_TIMED_FRAMES, BUSY_OPEN, BUSY_NTH = range(6)
BUSY_SIZE = 6
# one busy round in BUSY_SAMPLE is timed: on the Xeon VM rdtsc costs ~19 ns, and read behind a poll's
# first descriptor load in every busy round it cost far more (packed tx burst 1: 3.55 Mpps timing every
# round, 13.0 timing one in 16; bench/results/tries/xeon_stop28.md)
BUSY_SAMPLE = 16


@inline_kernel
def running(ctrl):
    """Whether the control plane still wants the loop to run (an acquire load: never hoisted)."""
    return load_i64_acquire(np.uint64(ctrl.ctypes.data) + np.uint64(8 * CMD)) == RUN


@kernel
def idle_sleep(ctrl, qs, watch, pollfds, buf):
    """Turn kicks on for the watched queues, re-check them, and sleep in poll(2) until a kick,
    a control-plane wake-up or the timeout; then turn kicks off again (we are polling)."""
    for i in range(watch.shape[0]):
        q = watch[i]
        if qs[q]["ready"] and not qs[q]["broken"]:
            set_kicks(qs, q, True)
    fence_seq_cst()  # kicks-on visible before we re-read the avail indexes (no lost wake-up)
    pending = not running(ctrl)
    n = 1
    pollfds[0, 0] = np.int32(ctrl[WAKE_FD])
    pollfds[0, 1] = POLLIN
    for i in range(watch.shape[0]):
        q = watch[i]
        if qs[q]["ready"] and not qs[q]["broken"]:
            if has_work(qs, q) != 0:
                pending = True
            if qs[q]["kick_fd"] >= 0 and n < pollfds.shape[0]:
                pollfds[n, 0] = qs[q]["kick_fd"]
                pollfds[n, 1] = POLLIN
                n += 1
    if not pending:
        ctrl[SLEEPS] += 1
        r = sys_poll(np.uint64(pollfds.ctypes.data), np.uint64(n), np.int32(ctrl[SLEEP_MS]))
        if r > 0:
            for k in range(n):
                if (pollfds[k, 1] >> 16) & POLLIN:  # revents: drain the eventfd counter
                    sys_read(pollfds[k, 0], np.uint64(buf.ctypes.data), np.uint64(8))
    for i in range(watch.shape[0]):
        q = watch[i]
        if qs[q]["ready"] and not qs[q]["broken"]:
            set_kicks(qs, q, False)


@inline_kernel
def busy_begins(busy):
    """A poll found work. The first such poll of a round opens the round's busy span, and one busy
    round in BUSY_SAMPLE is timed: its span starts now. Counting busy rounds, not rounds, keeps
    the sample from locking onto a pattern of empty and busy rounds; an empty round reads no clock."""
    if busy[BUSY_OPEN] == 0:
        busy[BUSY_OPEN] = 1
        busy[BUSY_NTH] += 1
        if busy[BUSY_NTH] >= BUSY_SAMPLE:
            busy[BUSY_NTH] = 0
            busy[BUSY_SINCE] = cycles()


@inline_kernel
def busy_drop(busy):
    """The poll that opened the round's span moved nothing after all (it waited): no busy span."""
    busy[BUSY_OPEN] = 0
    busy[BUSY_SINCE] = 0


@inline_kernel
def busy_ends(busy):
    """Close the round's busy span, if any; a timed one's cycles count as busy time."""
    if busy[BUSY_SINCE] != 0:
        busy[BUSY_CYCLES] += cycles() - busy[BUSY_SINCE]
        busy[BUSY_SINCE] = 0
    busy[BUSY_OPEN] = 0


@inline_kernel
def account_poll(polls, busy, burst, done):
    """Self-measurement of one poll that returned ``done`` (-1: ring not ready): polls[n] counts
    polls that found n frames, busy[BUSY_FRAMES] the frames moved (and BUSY_TIMED_FRAMES those of
    timed rounds). Returns the frames moved."""
    if done > 0:
        busy[BUSY_FRAMES] += done
        if busy[BUSY_SINCE] != 0:
            busy[BUSY_TIMED_FRAMES] += done
    if done >= 0:
        polls[min(done, burst)] += 1
    return max(done, 0)


def busy_per_frame(busy) -> float:
    """Cycles per frame of the timed busy rounds (0.0 before any)."""
    timed = int(busy[BUSY_TIMED_FRAMES])
    return int(busy[BUSY_CYCLES]) / timed if timed else 0.0


@inline_kernel
def end_round(ctrl, qs, watch, pollfds, buf, work, idle):
    """Account a polling round that moved ``work`` frames; after ``ctrl[IDLE_ROUNDS]`` empty rounds
    in a row, sleep on the watched queues' kicks. Returns the new count of empty rounds."""
    ctrl[ROUNDS] += 1
    if ctrl[ROUNDS] == ctrl[LAST_ROUND]:
        ctrl[CMD] = PAUSE  # the rounds a caller of run_rounds asked for are done
    if work > 0:
        ctrl[BUSY_ROUNDS] += 1
        return 0
    idle += 1
    # One PAUSE (~40 ns here) per empty round, --poll included: with it testpmd behind vring ran 7-9 %
    # faster by median, from fewer slow spells (bench/results/tries/epyc_stop23.md); likely because a
    # poll that spins asks for the ring line the driver is writing every ~8 ns. In adaptive mode it
    # also gives an idle spell a floor.
    cpu_relax()
    if ctrl[IDLE_ROUNDS] == 0:
        return idle  # --poll: never sleeps
    if idle >= ctrl[IDLE_ROUNDS]:
        idle_sleep(ctrl, qs, watch, pollfds, buf)
        return 0
    return idle


def run_rounds(loop: Callable, rounds: int, *args) -> np.ndarray:
    """Run a device's data-plane loop (``loop(ctrl, *args)``, the function its Worker runs) for
    exactly ``rounds`` rounds in this thread, polling, never sleeping; returns its control array.
    For tests and measurements of the loop itself."""
    ctrl = np.zeros(CTRL_SIZE, dtype=np.int64)
    ctrl[CMD] = RUN
    ctrl[WAKE_FD] = -1
    ctrl[LAST_ROUND] = rounds
    loop(ctrl, *args)
    return ctrl


class Worker:
    """One data-plane thread running ``loop(ctrl, *args_fn())`` with pause/resume."""

    def __init__(self, name: str, loop: Callable, args_fn: Callable[[], tuple], idle_rounds: int = 20000,
                 sleep_ms: int = 1000, cpus: list[int] | None = None):
        self.name = name
        self._loop = loop
        self._args_fn = args_fn
        self.ctrl = np.zeros(CTRL_SIZE, dtype=np.int64)
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.ctrl[WAKE_FD] = self.wake_fd
        self.ctrl[IDLE_ROUNDS] = idle_rounds  # 0: busy-poll forever
        self.ctrl[SLEEP_MS] = sleep_ms
        self._cv = threading.Condition()
        self._cmd = "run"
        self._pauses = 0
        self._in_loop = False
        self.error: BaseException | None = None
        self.cpus = cpus
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def warm_up(self) -> None:
        """Compile (or load from cache) the loop before any front-end is accepted: run it once
        with the command already PAUSE, so it returns at once."""
        self.ctrl[CMD] = PAUSE
        t0 = time.monotonic()
        # say so when it is a cold compile (first start after an install or upgrade), not a cache load
        notice = threading.Timer(3, lambda: log.info(
            "worker=%s: compiling the data plane (first start only: 1-3 min, then cached; "
            "`vring compile` does it ahead of time)", self.name))
        notice.daemon = True
        notice.start()
        try:
            self._loop(self.ctrl, *self._args_fn())
        finally:
            notice.cancel()
        if time.monotonic() - t0 > 2:
            log.info("worker=%s: data plane compiled in %.1f s (kept in numba's cache for the next start)",
                     self.name, time.monotonic() - t0)

    def start(self) -> None:
        """Run the loop in its thread; ``warm_up`` first (Device.compile does) so it starts compiled."""
        self._thread.start()

    def _main(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)  # pid 0: this thread only
            log.info("worker=%s pinned to cpus %s", self.name, ",".join(map(str, self.cpus)))
        while True:
            with self._cv:
                while self._cmd != "run":
                    if self._cmd == "stop":
                        return
                    self._cv.wait()
                self.ctrl[CMD] = RUN
                self._in_loop = True
            try:
                self._loop(self.ctrl, *self._args_fn())
            except BaseException as e:  # a kernel bug, not guest input: stop this worker loudly
                log.exception("worker=%s data plane failed", self.name)
                self.error = e
                with self._cv:
                    self._cmd = "stop"
            finally:
                with self._cv:
                    self._in_loop = False
                    self._cv.notify_all()

    def _interrupt(self) -> None:
        self.ctrl[CMD] = PAUSE
        os.eventfd_write(self.wake_fd, 1)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the data plane out of the loop (acknowledged) for the duration of the block."""
        with self._cv:
            self._pauses += 1
            if self._cmd == "run":
                self._cmd = "pause"
            self._interrupt()
            while self._in_loop:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._pauses -= 1
                if self._pauses == 0 and self._cmd == "pause":
                    self._cmd = "run"
                    self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._cmd = "stop"
            self._interrupt()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        os.close(self.wake_fd)
        self.wake_fd = -1
