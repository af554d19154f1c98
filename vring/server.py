"""The control plane: one thread, one selector, every port's socket and session.

Server mode listens on each port's path and, after a front-end disconnects, accepts the
next one. Client mode (``--client``, for front-ends that are the socket server) connects,
retries until the socket appears, and reconnects after a disconnect.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import time

from vring.device import Device
from vring.session import Session
from vring.split import BROKEN_REASONS

log = logging.getLogger(__name__)

RETRY_S = 0.5
TICK_S = 0.25


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on (a killed server leaves one behind)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"another process is listening on {path}")


class Endpoint:
    """One port's socket: its listener or its connection, and its session."""

    def __init__(self, port: int, path: str, client: bool):
        self.port = port
        self.path = path
        self.client = client
        self.listener: socket.socket | None = None
        self.session: Session | None = None
        self.next_try = 0.0
        self.waiting_logged = False


class Server:
    """Serve a device's ports until ``stop()`` (or a signal handler sets ``stopping``)."""

    def __init__(self, device: Device, paths: list[str], client: bool = False, name: str = ""):
        if len(paths) != device.nports:
            raise ValueError("one socket path per port")
        self.dev = device
        self.name = name  # the device's name in logs when one process serves several (vring run)
        self.tag = f"dev={name} " if name else ""
        self.client = client
        self.endpoints = [Endpoint(i, p, client) for i, p in enumerate(paths)]
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.closing = False
        self._reported: dict[int, int] = {}
        self.connections = 0

    def open(self) -> None:
        for ep in self.endpoints:
            if not ep.client:
                _remove_stale(ep.path)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(ep.path)
                s.listen(4)
                s.setblocking(False)
                ep.listener = s
                self.sel.register(s, selectors.EVENT_READ, ("listen", ep))
                log.info("%sport=%d listening on %s", self.tag, ep.port, ep.path)

    def _attach(self, ep: Endpoint, conn: socket.socket) -> None:
        conn.setblocking(True)
        ep.session = Session(self.dev, ep.port, conn, name=f"{self.name}.port{ep.port}" if self.name else "")
        self.sel.register(conn, selectors.EVENT_READ, ("session", ep))
        self.connections += 1
        log.info("%sport=%d front-end connected (%s)", self.tag, ep.port, ep.path)

    def _detach(self, ep: Endpoint) -> None:
        s = ep.session
        if s is None:
            return
        self.sel.unregister(s.sock)
        s.close()
        ep.session = None
        if not self.closing:
            self.dev.disconnected(ep.port)
        ep.next_try = time.monotonic() + RETRY_S
        log.info("%sport=%d front-end disconnected; counters %s", self.tag, ep.port, self.port_summary(ep.port))

    def port_summary(self, port: int) -> dict:
        f = getattr(self.dev, "port_counters", None)
        return f(port) if f else {}

    def _try_connect(self, ep: Endpoint) -> None:
        if time.monotonic() < ep.next_try:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(ep.path)
        except OSError as e:
            s.close()
            ep.next_try = time.monotonic() + RETRY_S
            if not ep.waiting_logged:
                log.info("%sport=%d waiting for %s (%s)", self.tag, ep.port, ep.path, e.strerror)
                ep.waiting_logged = True
            return
        ep.waiting_logged = False
        self._attach(ep, s)

    def _check_broken(self) -> None:
        q = self.dev.qstate
        for row in range(len(q)):
            code = int(q[row]["broken"])
            if code and self._reported.get(row) != code:
                port, index = divmod(row, self.dev.nvq)
                reason = BROKEN_REASONS.get(code, "unknown")
                log.error("%sport=%d vring=%d broken: %s (code %d); other queues keep running", self.tag, port, index,
                          reason, code)
            self._reported[row] = code

    def poll_once(self, timeout: float = TICK_S) -> None:
        for ep in self.endpoints:
            if ep.client and ep.session is None:
                self._try_connect(ep)
        for key, _ in self.sel.select(timeout):
            kind, ep = key.data
            if kind == "listen":
                try:
                    conn, _ = key.fileobj.accept()
                except OSError:
                    continue
                if ep.session is not None:
                    log.warning("%sport=%d already has a front-end; refusing another connection", self.tag, ep.port)
                    conn.close()
                    continue
                self._attach(ep, conn)
            elif ep.session is not None and not ep.session.handle():
                self._detach(ep)
        for ep in self.endpoints:
            if ep.session is not None and ep.session.stalled():
                log.warning("%sport=%d front-end stopped mid-message; closing the connection", self.tag, ep.port)
                self._detach(ep)
        self._check_broken()

    def serve(self, until: float | None = None) -> None:
        """Run until ``stopping`` is set (or the monotonic deadline ``until`` passes)."""
        while not self.stopping and (until is None or time.monotonic() < until):
            self.poll_once()

    def close(self) -> None:
        self.closing = True
        for ep in self.endpoints:
            self._detach(ep)
            if ep.listener is not None:
                self.sel.unregister(ep.listener)
                ep.listener.close()
                ep.listener = None
                try:
                    os.unlink(ep.path)
                except FileNotFoundError:
                    pass
        self.sel.close()
