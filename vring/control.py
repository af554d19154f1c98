"""The per-process control socket of ``vring net``: attach to a running back-end without disturbing it.

A unix stream socket (default ``/tmp/vring-<pid>.ctl``, printed at start; ``--control PATH``) served by
one daemon thread. A request is one JSON object on one line; the reply is one JSON line, for
``snapshot`` followed by exactly ``bytes`` bytes of ``.npz``:

- ``{"cmd": "ping"}`` -> ``{"ok": true, "pid": ...}``
- ``{"cmd": "sample"}`` -> one stats sample (:func:`sample`): per-queue counters and state, per-port
  connection and negotiated features, poll statistics, a monotonic timestamp.
- ``{"cmd": "snapshot"}`` -> ``{"ok": true, "bytes": N}`` + the ``.npz`` (:func:`vring.inspect.save`).
- ``{"cmd": "queue", "port": P, "vring": V}`` -> that queue's indexes and in-flight heads.

The thread only reads: the shared counter and queue-state arrays (numpy reads, no locks), and guest
memory through :mod:`vring.inspect` (copies, torn reads retried). It never pauses the data plane.

:class:`LocalBackend` runs the same back-end (device, vhost-user server, control socket) inside the
calling process, for notebooks and tests.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import selectors
import socket
import tempfile
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 16


def default_path(pid: int | None = None) -> str:
    return os.path.join(tempfile.gettempdir(), f"vring-{pid or os.getpid()}.ctl")


def _feature_names(mask: int, kind: str) -> str:
    from vring.protocol import PF, F
    from vring.session import feature_names

    return feature_names(mask, F if kind == "F" else PF)


def sample(dev, server=None, extra: dict | None = None) -> dict[str, Any]:
    """One machine-readable stats sample of a live device (and its server's sessions, when given)."""
    from vring import inspect as vi

    t = time.monotonic()
    rows = vi._queue_rows(dev.qstate.copy(), dev.counters.copy(), dev.nvq, vi.ring_positions(dev))
    ports = []
    for p in range(dev.nports):
        d: dict[str, Any] = {"port": p}
        if server is not None:
            ep = server.endpoints[p]
            s = ep.session
            d.update({"socket": ep.path, "client": ep.client, "connected": s is not None})
            if s is not None:
                d.update({"features": int(s.features), "features_names": _feature_names(int(s.features), "F"),
                          "protocol_features": int(s.protocol_features),
                          "protocol_features_names": _feature_names(int(s.protocol_features), "PF"),
                          "status": int(s.status)})
        pc = getattr(dev, "port_counters", None)
        if pc is not None:
            d["counters"] = pc(p)
        ports.append(d)
    out: dict[str, Any] = {
        "pid": os.getpid(), "time": time.time(), "monotonic": t, "kind": getattr(dev, "kind", "device"),
        "mode": getattr(dev, "mode", None), "nports": dev.nports, "nvq": dev.nvq,
        "ports": ports, "queues": rows,
    }
    ps = getattr(dev, "poll_stats", None)
    if ps is not None:
        try:
            out["poll"] = ps()
        except Exception as e:  # never fail a sample over the self-measurement
            out["poll"] = {"error": str(e)}
    w = getattr(dev, "worker", None)
    if w is not None:
        from vring.dataplane import BUSY_ROUNDS, ROUNDS, SLEEPS

        out["worker"] = {"rounds": int(w.ctrl[ROUNDS]), "busy_rounds": int(w.ctrl[BUSY_ROUNDS]),
                         "sleeps": int(w.ctrl[SLEEPS])}
    extra_dev = getattr(dev, "sample_extra", None)
    if extra_dev is not None:
        out.update(extra_dev())
    out.update(extra or {})
    return out


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


class ControlServer:
    """Serve control requests for ``dev`` (and ``server``'s sessions) on ``path`` from a daemon thread."""

    def __init__(self, dev, server=None, path: str | None = None, meta: dict | None = None):
        self.dev = dev
        self.server = server
        self.path = path or default_path()
        self.meta = dict(meta or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self.requests = 0

    def start(self) -> ControlServer:
        from vring.server import _remove_stale

        _remove_stale(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)  # ring contents are the guest's data: owner only
        s.listen(8)
        self._listener = s
        self._thread = threading.Thread(target=self._main, name="vring-control", daemon=True)
        self._thread.start()
        return self

    def _main(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                if not sel.select(0.2):
                    continue
                try:
                    conn, _ = self._listener.accept()
                except OSError:
                    continue
                with conn:
                    try:
                        self._serve_conn(conn)
                    except Exception:
                        log.exception("control: request failed")
        finally:
            sel.close()

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        f = conn.makefile("rb")
        while not self._stop.is_set():
            line = f.readline(MAX_REQUEST)
            if not line:
                return
            try:
                req = json.loads(line)
                cmd = req.get("cmd")
            except (ValueError, AttributeError):
                self._reply(conn, {"ok": False, "error": "bad request: one JSON object per line"})
                continue
            self.requests += 1
            try:
                self._handle(conn, cmd, req)
            except Exception as e:
                log.exception("control: %s failed", cmd)
                self._reply(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})

    def _reply(self, conn: socket.socket, obj: dict, data: bytes = b"") -> None:
        conn.sendall(json.dumps(obj, default=_json_default).encode() + b"\n" + data)

    def _handle(self, conn: socket.socket, cmd: str, req: dict) -> None:
        from vring import inspect as vi

        if cmd == "ping":
            self._reply(conn, {"ok": True, "pid": os.getpid()})
        elif cmd == "sample":
            self._reply(conn, {"ok": True, **sample(self.dev, self.server, {"meta": self.meta})})
        elif cmd == "snapshot":
            buf = io.BytesIO()
            meta = {**self.meta, "sample": sample(self.dev, self.server)}
            meta = json.loads(json.dumps(meta, default=_json_default))
            np.savez_compressed(buf, **vi.snapshot_arrays(self.dev, meta))
            data = buf.getvalue()
            self._reply(conn, {"ok": True, "bytes": len(data)}, data)
        elif cmd == "queue":
            st = vi.queue(self.dev, int(req["port"]), int(req["vring"]))
            self._reply(conn, {"ok": True, "indexes": {k: (v if isinstance(v, str) else int(v))
                                                       for k, v in st.indexes().items()},
                               "in_flight": st.in_flight().to_dict("records")})
        else:
            self._reply(conn, {"ok": False, "error": f"unknown command {cmd!r}"})

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class ControlClient:
    """Talk to a back-end's control socket: ``sample()``, ``snapshot(out)``, ``request(cmd, ...)``."""

    def __init__(self, path: str | None = None, pid: int | None = None, timeout: float = 10.0):
        if path is None:
            if pid is None:
                raise ValueError("a control socket path or a back-end pid")
            path = default_path(pid)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._f = self.sock.makefile("rb")

    def request(self, cmd: str, **kw) -> dict:
        self.sock.sendall(json.dumps({"cmd": cmd, **kw}).encode() + b"\n")
        line = self._f.readline()
        if not line:
            raise ConnectionError("the back-end closed the control connection")
        rep = json.loads(line)
        if not rep.get("ok"):
            raise RuntimeError(f"control {cmd}: {rep.get('error')}")
        return rep

    def sample(self) -> dict:
        return self.request("sample")

    def snapshot_bytes(self) -> bytes:
        rep = self.request("snapshot")
        data = self._f.read(int(rep["bytes"]))
        if len(data) != int(rep["bytes"]):
            raise ConnectionError("snapshot cut short")
        return data

    def snapshot(self, out: str) -> str:
        data = self.snapshot_bytes()
        tmp = out + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
        return out

    def close(self) -> None:
        self._f.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for(path: str, timeout: float = 60.0, proc=None) -> None:
    """Wait until a control socket answers ping (``proc``: a Popen whose exit ends the wait)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"back-end exited ({proc.returncode}) before its control socket answered")
        try:
            with ControlClient(path, timeout=2) as c:
                c.request("ping")
                return
        except (OSError, RuntimeError, ValueError) as e:
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"no control socket at {path}: {last}")


class LocalBackend:
    """``vring net`` inside this process: NetDevice + vhost-user Server (served from a thread) + control socket.

    For notebooks and tests: ``dev`` is the live device, so :mod:`vring.inspect` can read it directly.
    """

    def __init__(self, sockets: list[str], mode: str | None = None, control: str | None = None,
                 metrics: str | None = None, **device_kw):
        from devices.net import NetDevice
        from vring.server import Server

        mode = mode or ("xconnect" if len(sockets) == 2 else "loopback")
        self.dev = NetDevice(len(sockets), mode, **device_kw)
        self.server = Server(self.dev, list(sockets))
        self.control_path = control
        self.metrics_addr = metrics
        self.control: ControlServer | None = None
        self.metrics = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalBackend:
        self.dev.start()  # compiles (or loads) the data plane
        self.server.open()
        if self.control_path is not None:
            self.control = ControlServer(self.dev, self.server, self.control_path).start()
        if self.metrics_addr is not None:
            from vring.metrics import serve

            self.metrics = serve(self.dev, self.server, self.metrics_addr)
        self._thread = threading.Thread(target=self.server.serve, name="vring-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.stopping = True
        if self._thread is not None:
            self._thread.join(10)
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self.server.close()
        self.dev.stop()

    def __enter__(self) -> LocalBackend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
