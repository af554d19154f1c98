"""Real vhost-user peers for the tests: DPDK testpmd and QEMU guests.

A plain module (no import of vring, pytest only imported lazily), usable as ``from peers import ...``
(tests/ on sys.path) or ``from tests.peers import ...``.

- :class:`Testpmd` runs ``dpdk-testpmd`` either as a vhost-user *frontend* (one ``net_virtio_user``
  port per socket) or as a vhost-user *backend* (``backend=True``: one ``net_vhost`` port per socket,
  DPDK's own vhost library: the reference backend).  It parses testpmd's forward statistics.
- :class:`QemuGuest` boots Debian's kernel with a busybox initramfs (:func:`build_initramfs`, from
  ``tests/qemu/``) under TCG with vhost-user devices (:class:`VhostUserNet`, :class:`VhostUserVsock`,
  or raw arguments), and reads the ``RESULT ...`` lines the guest's /init prints on the serial port.
- :class:`PeerGroup` tracks started peers and stops them (reverse order) at the end of a test.
- :func:`short_tmpdir`, :func:`wait_for_socket`, :func:`require_peer`.

Every peer runs under ``timeout -k 5 HARD_LIMIT`` in its own process group (session), with
PR_SET_PDEATHSIG=SIGTERM, so it cannot outlive the test run even if pytest is killed: ``stop()``
sends SIGTERM (testpmd then prints its statistics), waits, and SIGKILLs the whole process group.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

HERE = Path(__file__).resolve().parent
QEMU_DIR = HERE / "qemu"

TESTPMD = os.environ.get("VRING_TESTPMD", "dpdk-testpmd")
QEMU = os.environ.get("VRING_QEMU", "qemu-system-x86_64")
CACHE_DIR = Path(os.environ.get("VRING_PEER_CACHE", "/tmp/vring-peer-cache"))

__all__ = [
    "PeerError", "PeerMissing", "peer_missing", "require_peer", "in_ci",
    "short_tmpdir", "wait_for_socket", "PeerProcess", "PeerGroup",
    "Testpmd", "ForwardStats", "parse_forward_stats", "parse_port_stats",
    "find_kernel", "build_initramfs", "VhostUserNet", "VhostUserVsock", "QemuGuest",
]


class PeerError(RuntimeError):
    """A peer failed to start, died, or did not reach the expected state in time."""


class PeerMissing(PeerError):
    """A peer program (testpmd, QEMU, kernel, ...) is not installed."""


# --------------------------------------------------------------------------------------------
# availability


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def find_kernel() -> tuple[str, str] | None:
    """(path of /boot/vmlinuz-VER, VER) for the newest kernel that has /lib/modules/VER, or None."""
    env = os.environ.get("VRING_KERNEL")
    if env:
        ver = os.environ.get("VRING_KERNEL_VERSION") or Path(env).name.removeprefix("vmlinuz-")
        return env, ver

    def key(p: str):
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p)]

    for path in sorted(glob.glob("/boot/vmlinuz-*"), key=key, reverse=True):
        ver = Path(path).name.removeprefix("vmlinuz-")
        if Path("/lib/modules", ver, "modules.dep").is_file() and os.access(path, os.R_OK):
            return path, ver
    return None


def peer_missing(*kinds: str) -> list[str]:
    """What is missing for the given peers: "testpmd" and/or "qemu" (or plain program names)."""
    need: dict[str, list[str]] = {
        "testpmd": [TESTPMD, "timeout", "stdbuf"],
        "qemu": [QEMU, "timeout", "busybox", "cpio", "gzip"],
    }
    missing = []
    for kind in kinds:
        for prog in need.get(kind, [kind]):
            if shutil.which(prog) is None and prog not in missing:
                missing.append(prog)
        if kind == "qemu" and find_kernel() is None:
            missing.append("kernel (/boot/vmlinuz-* with /lib/modules; apt-get install linux-image-amd64)")
    return missing


def require_peer(*kinds: str) -> None:
    """Skip the calling test if a peer is missing -- or FAIL it when CI=true."""
    import pytest

    missing = peer_missing(*kinds)
    if missing:
        msg = "peer not installed: " + ", ".join(missing)
        if in_ci():
            pytest.fail(msg + " (CI=true: peers are required)", pytrace=False)
        pytest.skip(msg)


# --------------------------------------------------------------------------------------------
# small helpers


def short_tmpdir(prefix: str = "vr") -> str:
    """A new private directory with a short path (AF_UNIX socket paths must stay < 108 bytes)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return tempfile.mkdtemp(prefix=prefix + "-", dir=base)


def wait_until(cond, timeout: float = 10.0) -> None:
    """Poll ``cond()`` every 10 ms until it is true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)


def wait_for_socket(path: str | os.PathLike, timeout: float = 20.0,
                    proc: "PeerProcess | None" = None, connect: bool = False) -> None:
    """Wait until ``path`` is a unix socket (and accepts a connection, if ``connect``).

    Raises PeerError if ``proc`` dies meanwhile, TimeoutError on timeout.  Note that ``connect``
    makes a real connection: a vhost-user server then sees a client come and go.
    """
    path = os.fspath(path)
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(path) and Path(path).is_socket():
            if not connect:
                return
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        if proc is not None and not proc.alive():
            raise PeerError(f"{proc.name} exited (rc={proc.returncode}) before {path} appeared\n"
                            + proc.log_tail())
        if time.monotonic() > deadline:
            raise TimeoutError(f"socket {path} did not appear within {timeout} s"
                               + ("\n" + proc.log_tail() if proc else ""))
        time.sleep(0.05)


_PR_SET_PDEATHSIG = 1


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


_LIVE: "weakref.WeakSet[PeerProcess]" = weakref.WeakSet()
_counter = itertools.count()


@atexit.register
def _kill_leftovers() -> None:
    for p in list(_LIVE):
        try:
            p.kill()
        except Exception:
            pass


class PeerProcess:
    """A program run under ``timeout -k 5 HARD`` in its own process group, output to a log file."""

    def __init__(self, argv: Sequence[str], *, name: str, log_path: str | os.PathLike,
                 hard_timeout: float = 600, env: dict | None = None, line_buffered: bool = False,
                 cpus: str | Iterable[int] | None = None):
        self.name = name
        self.log_path = Path(log_path)
        self.hard_timeout = hard_timeout
        self.argv = list(argv)
        self.env = env
        self.line_buffered = line_buffered
        self.cpus = cpus
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    # --- lifecycle
    def command(self) -> list[str]:
        cmd = ["timeout", "-k", "5", str(int(self.hard_timeout))]
        if self.cpus is not None:
            cpus = self.cpus if isinstance(self.cpus, str) else ",".join(map(str, self.cpus))
            cmd += ["taskset", "-c", cpus]
        if self.line_buffered and shutil.which("stdbuf"):
            cmd += ["stdbuf", "-oL", "-eL"]
        return cmd + self.argv

    def start(self):
        if self.proc is not None:
            raise PeerError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_pdeathsig,
                env=None if self.env is None else {**os.environ, **self.env})
        self.started_at = time.monotonic()
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        """Wait for the peer to exit by itself; returns its exit status. TimeoutError otherwise."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout} s") from None

    def _signal_group(self, sig: int) -> None:
        # Only while the group leader (the timeout wrapper) is not reaped: its pid, hence the
        # process-group id, cannot have been reused.
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def terminate(self, grace: float = 10.0) -> int | None:
        """SIGTERM (timeout forwards it to the program), wait ``grace`` s, then SIGKILL the group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        self.stopped_at = self.stopped_at or time.monotonic()
        _LIVE.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash: no clean shutdown)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.stopped_at = self.stopped_at or time.monotonic()
        _LIVE.discard(self)

    def stop(self):
        return self.terminate()

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- log
    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def wait_log(self, pattern: str, timeout: float, count: int = 1, what: str | None = None) -> list[re.Match]:
        """Wait until ``pattern`` (regex, MULTILINE) matches ``count`` times in the log."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            matches = list(rx.finditer(self.log_text()))
            if len(matches) >= count:
                return matches
            if not self.alive():
                # one last read: the program may have written its last lines and exited
                matches = list(rx.finditer(self.log_text()))
                if len(matches) >= count:
                    return matches
                raise PeerError(f"{self.name} exited (rc={self.returncode}) while waiting for "
                                f"{what or pattern!r}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {what or pattern!r} not seen {count}x within "
                                   f"{timeout} s\n{self.log_tail()}")
            time.sleep(0.1)


class PeerGroup:
    """Starts peers and stops all of them (in reverse order) on exit; use one per test."""

    def __init__(self):
        self.peers: list = []

    def add(self, peer, start: bool = True):
        self.peers.append(peer)
        if start and getattr(peer, "proc", None) is None:
            peer.start()
        return peer

    def stop_all(self) -> None:
        errors = []
        for p in reversed(self.peers):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                errors.append(e)
        self.peers.clear()
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()


# --------------------------------------------------------------------------------------------
# testpmd


_FWD_BLOCK = re.compile(
    r"-+ Forward statistics for port (\d+) +-+\s*\n"
    r"\s*RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)\s+RX-total:\s*(\d+)\s*\n"
    r"(?:.*\n)*?"  # queue or checksum lines may come between
    r"\s*TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)\s+TX-total:\s*(\d+)")
_ACC_BLOCK = re.compile(
    r"Accumulated forward statistics for all ports\+*\s*\n"
    r"\s*RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)\s+RX-total:\s*(\d+)\s*\n"
    r"\s*TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)\s+TX-total:\s*(\d+)")
_NIC_BLOCK = re.compile(
    r"#+ NIC statistics for port (\d+) +#+\s*\n"
    r"\s*RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)\s+RX-bytes:\s*(\d+)\s*\n"
    r"(?:.*\n)*?"
    r"\s*TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)\s+TX-bytes:\s*(\d+)\s*\n"
    r"(?:.*\n)*?"
    r"\s*Rx-pps:\s*(\d+)\s+Rx-bps:\s*(\d+)\s*\n"
    r"\s*Tx-pps:\s*(\d+)\s+Tx-bps:\s*(\d+)")


@dataclass
class ForwardStats:
    """testpmd's forward statistics at stop.

    ``ports[N]`` and ``total`` are dicts with rx_packets, rx_dropped, tx_packets, tx_dropped
    (plus rx_total, tx_total).  tx_packets counts packets the port's TX ring accepted;
    tx_dropped counts packets testpmd had to free because the ring was full.
    ``complete`` is False if testpmd did not print the accumulated block (it crashed or was killed).
    """
    ports: dict[int, dict[str, int]] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    complete: bool = False

    def __getitem__(self, port: int) -> dict[str, int]:
        return self.ports[port]


def _six(vals) -> dict[str, int]:
    rxp, rxd, rxt, txp, txd, txt = (int(v) for v in vals)
    return {"rx_packets": rxp, "rx_dropped": rxd, "rx_total": rxt,
            "tx_packets": txp, "tx_dropped": txd, "tx_total": txt}


def parse_forward_stats(text: str) -> ForwardStats:
    """Parse the LAST set of "Forward statistics for port N" blocks and the
    "Accumulated forward statistics" block that testpmd prints when forwarding stops."""
    text = text.replace("\r", "")
    acc = list(_ACC_BLOCK.finditer(text))
    st = ForwardStats()
    if acc:
        last = acc[-1]
        st.total = _six(last.groups())
        st.complete = True
        # the per-port blocks of the same stop precede it (after any earlier accumulated block)
        start = acc[-2].end() if len(acc) > 1 else 0
        scope = text[start:last.start()]
    else:
        scope = text
    for m in _FWD_BLOCK.finditer(scope):
        st.ports[int(m.group(1))] = _six(m.groups()[1:])
    if st.complete and not st.ports:
        st.ports[0] = dict(st.total)  # (older testpmd prints no per-port block for one port)
    if not st.complete and st.ports:
        st.total = {k: sum(p[k] for p in st.ports.values()) for k in next(iter(st.ports.values()))}
    return st


def parse_port_stats(text: str) -> dict[int, list[dict[str, int]]]:
    """All periodic "NIC statistics for port N" samples (--stats-period): per port, in order,
    dicts with rx_packets, rx_missed, tx_packets, tx_errors, rx_pps, tx_pps (cumulative counters)."""
    out: dict[int, list[dict[str, int]]] = {}
    for m in _NIC_BLOCK.finditer(text.replace("\r", "")):
        g = [int(x) for x in m.groups()]
        out.setdefault(g[0], []).append({
            "rx_packets": g[1], "rx_missed": g[2], "rx_bytes": g[3],
            "tx_packets": g[4], "tx_errors": g[5], "tx_bytes": g[6],
            "rx_pps": g[7], "rx_bps": g[8], "tx_pps": g[9], "tx_bps": g[10]})
    return out


def _dpdk_runtime_base() -> Path:
    if os.geteuid() == 0:
        return Path("/var/run/dpdk")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "dpdk"


def _remove_stale_runtime_dirs() -> None:
    """Remove runtime dirs vr<PID>_* of test processes that no longer exist (killed runs)."""
    for d in _dpdk_runtime_base().glob("vr*_*"):
        m = re.fullmatch(r"vr(\d+)_\w+", d.name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            shutil.rmtree(d, ignore_errors=True)


class Testpmd(PeerProcess):
    """dpdk-testpmd with one port per socket, as vhost-user frontend (virtio-user) or backend.

    Frontend (default): ``--vdev net_virtio_userI,path=SOCK,queues=Q[,server=1][,DEVARGS]``;
    by default virtio-user connects as a client, ``server=True`` makes it listen.
    Backend (``backend=True``): ``--vdev net_vhostI,iface=SOCK,queues=Q[,client=1][,DEVARGS]``;
    by default the vhost port listens, ``server=False`` makes it connect (client=1).

    ``cpus=(MAIN, FWD...)``: ``--lcores 0@MAIN,1@FWD,...``; one forwarding lcore per FWD entry
    (``--nb-cores`` = their number).  An int puts the main and forwarding lcore on the same CPU.
    testpmd then forwards in ``mode`` with ``--stats-period 1`` and no interactive prompt.

    With two ports the default "paired" topology gives two streams: RX port 0 -> TX port 1 and
    RX port 1 -> TX port 0, both on the single forwarding core.  In flowgen mode every stream
    drains its RX port and sends generated frames on its TX port, so both ports send and receive;
    in io mode (the backend) whatever port 0 receives is sent on port 1 and vice versa.

    Start order: the side that listens first, then wait_for_socket(), then the other side.
    Gotcha: a virtio-user port with server=1 BLOCKS testpmd's startup until a client connects,
    one port after another: with two server ports the second socket only appears once the first
    is connected (a net_vhost client=1 backend keeps retrying, so start it after the first socket
    exists and wait_forwarding() on the frontend afterwards).
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, sockets: Sequence[str | os.PathLike], mode: str = "io", *,
                 backend: bool = False, server: bool | None = None, devargs: str = "",
                 queues: int = 1, frame_size: int | str = 64, burst: int = 32,
                 cpus: Sequence[int] | int = (0, 1), mbufs: int = 16384, mem_mb: int = 256,
                 extra_args: Sequence[str] = (), eal_args: Sequence[str] = (),
                 workdir: str | os.PathLike | None = None, name: str | None = None,
                 hard_timeout: float = 600, stats_period: int = 1):
        if not sockets:
            raise ValueError("need at least one socket")
        self.sockets = [os.fspath(s) for s in sockets]
        self.mode = mode
        self.backend = backend
        # who listens on the sockets: by default the backend (net_vhost) does
        self.server = server if server is not None else backend
        self.queues = queues
        n = next(_counter)
        role = "be" if backend else "fe"
        self.name_ = name or f"testpmd-{role}{n}"
        self.file_prefix = f"vr{os.getpid()}_{role}{n}"
        workdir = Path(workdir) if workdir else Path(os.path.dirname(self.sockets[0]))
        if isinstance(cpus, int):
            cpus = (cpus, cpus)
        main, *fwd = cpus
        if not fwd:
            fwd = [main]
        lcores = ",".join([f"0@{main}"] + [f"{i + 1}@{c}" for i, c in enumerate(fwd)])
        vdevs = []
        for i, sock in enumerate(self.sockets):
            if backend:
                dev = f"net_vhost{i},iface={sock},queues={queues}"
                if server is False:
                    dev += ",client=1"
            else:
                dev = f"net_virtio_user{i},path={sock},queues={queues}"
                if server:
                    dev += ",server=1"
            if devargs:
                dev += "," + devargs
            vdevs += ["--vdev", dev]
        argv = [TESTPMD, "--lcores", lcores, "--no-pci", "--no-huge", "-m", str(mem_mb),
                f"--file-prefix={self.file_prefix}", *eal_args, *vdevs, "--",
                f"--forward-mode={mode}", "--stats-period", str(stats_period),
                f"--total-num-mbufs={mbufs}", f"--burst={burst}", f"--txpkts={frame_size}",
                f"--rxq={queues}", f"--txq={queues}", f"--nb-cores={len(fwd)}", *extra_args]
        super().__init__(argv, name=self.name_, log_path=workdir / f"{self.name_}.log",
                         hard_timeout=hard_timeout, line_buffered=True)
        self.stats: ForwardStats | None = None

    @property
    def runtime_dir(self) -> Path:
        return _dpdk_runtime_base() / self.file_prefix

    def start(self):
        _remove_stale_runtime_dirs()
        return super().start()

    def wait_forwarding(self, timeout: float = 30.0) -> None:
        """Wait until testpmd has configured all ports and started forwarding.

        A frontend whose backend is the server has connected by then (virtio-user connects while
        its port is configured; testpmd exits if that fails).  For a backend, or a frontend with
        server=1, the peer may not be connected yet: see wait_connected / wait_traffic."""
        self.wait_log(r"^Logical Core \d+ .*forwards packets on \d+ streams"
                      r"|^Start automatic packet forwarding", timeout, what="forwarding started")

    def wait_connected(self, timeout: float = 30.0, count: int | None = None) -> None:
        """Backend only: wait until ``count`` (default: all) devices are ready for processing."""
        if not self.backend:
            raise PeerError("wait_connected is for backend=True (net_vhost) only")
        self.wait_log(r"virtio is now ready for processing", timeout,
                      count=len(self.sockets) if count is None else count,
                      what="vhost device ready")

    def port_samples(self) -> dict[int, list[dict[str, int]]]:
        return parse_port_stats(self.log_text())

    def wait_traffic(self, timeout: float = 30.0, ports: Iterable[int] | None = None,
                     direction: str = "rx", min_packets: int = 1) -> None:
        """Wait until every port in ``ports`` (default all) has counted ``min_packets`` packets
        in ``direction`` ("rx" or "tx") in the periodic NIC statistics."""
        ports = list(range(len(self.sockets)) if ports is None else ports)
        key = f"{direction}_packets"
        deadline = time.monotonic() + timeout
        while True:
            s = self.port_samples()
            if all(s.get(p) and s[p][-1][key] >= min_packets for p in ports):
                return
            if not self.alive():
                raise PeerError(f"{self.name} exited (rc={self.returncode}) while waiting for "
                                f"{direction} traffic\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {direction} traffic on ports {ports} within "
                                   f"{timeout} s\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, grace: float = 10.0) -> ForwardStats:
        """SIGTERM; testpmd stops forwarding, prints its statistics and exits.  SIGKILL after
        ``grace`` s.  Removes testpmd's runtime directory.  Returns the parsed statistics."""
        if self.proc is None:
            return ForwardStats()
        if self.stats is None or self.alive():
            self.terminate(grace)
            self.stats = parse_forward_stats(self.log_text())
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return self.stats

    def kill(self) -> None:
        super().kill()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# QEMU guests


def build_initramfs(out_path: str | os.PathLike | None = None, kernel_version: str | None = None,
                    force: bool = False) -> str:
    """Build (or reuse from the cache) the test initramfs for ``kernel_version`` (default: the
    kernel find_kernel() picks).  Cached as CACHE_DIR/initramfs-VER-HASH.cpio.gz where HASH
    covers tests/qemu/init and build_initramfs.sh; copied to ``out_path`` if given.
    Returns the path of the file."""
    if kernel_version is None:
        k = find_kernel()
        if k is None:
            raise PeerMissing("no kernel with modules found under /boot and /lib/modules")
        kernel_version = k[1]
    script = QEMU_DIR / "build_initramfs.sh"
    h = hashlib.sha256()
    for f in (script, QEMU_DIR / "init"):
        h.update(f.read_bytes())
    for prog in ("busybox", "socat"):
        p = shutil.which(prog)
        if p:
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cached = CACHE_DIR / f"initramfs-{kernel_version}-{h.hexdigest()[:12]}.cpio.gz"
    if force or not cached.is_file():
        r = subprocess.run(["bash", str(script), str(cached), kernel_version],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not cached.is_file():
            raise PeerError(f"build_initramfs.sh failed (rc={r.returncode}):\n{r.stdout}{r.stderr}")
    if out_path is not None:
        shutil.copyfile(cached, out_path)
        return os.fspath(out_path)
    return os.fspath(cached)


_mac_counter = itertools.count(1)


def _chardev(cid: str, path: str, server: bool, reconnect: int | None) -> str:
    s = f"socket,id={cid},path={path}"
    if server:
        s += ",server=on,wait=off"
    elif reconnect:
        s += f",reconnect={reconnect}"
    return s


@dataclass
class VhostUserNet:
    """A virtio-net-pci NIC on a vhost-user socket (QEMU connects as client unless ``server``).

    ``props``: extra virtio-net-pci properties, e.g. "packed=on,mrg_rxbuf=off" (with queues > 1,
    "mq=on" is added).  ``vectors=0`` (INTx) is needed: QEMU 7.2 + TCG + vhost-user crashes with
    MSI-X."""
    socket: str
    mac: str | None = None
    queues: int = 1
    server: bool = False
    reconnect: int | None = None
    props: str = ""
    vectors: int | None = 0

    def qemu_args(self, i: int) -> list[str]:
        mac = self.mac or "52:54:00:00:%02x:%02x" % (os.getpid() & 0xff, next(_mac_counter) & 0xff)
        self.mac = mac
        nd = f"vhost-user,id=n{i},chardev=c{i}"
        if self.queues > 1:
            nd += f",queues={self.queues}"
        dev = f"virtio-net-pci,netdev=n{i},mac={mac},romfile="
        if self.vectors is not None:
            dev += f",vectors={self.vectors}"
        if self.queues > 1 and "mq=" not in self.props:
            dev += ",mq=on"
        if self.props:
            dev += "," + self.props
        return ["-chardev", _chardev(f"c{i}", os.fspath(self.socket), self.server, self.reconnect),
                "-netdev", nd, "-device", dev]


@dataclass
class VhostUserVsock:
    """A vhost-user-vsock-pci device (the guest's CID comes from the backend via GET_CONFIG)."""
    socket: str
    server: bool = False
    reconnect: int | None = None
    props: str = ""
    vectors: int | None = 0

    def qemu_args(self, i: int) -> list[str]:
        dev = f"vhost-user-vsock-pci,chardev=c{i},romfile="
        if self.vectors is not None:
            dev += f",vectors={self.vectors}"
        if self.props:
            dev += "," + self.props
        return ["-chardev", _chardev(f"c{i}", os.fspath(self.socket), self.server, self.reconnect),
                "-device", dev]


class QemuGuest(PeerProcess):
    """A TCG QEMU guest: Debian's kernel, the test initramfs, vhost-user devices.

    ``devices``: VhostUserNet / VhostUserVsock objects (or anything with ``qemu_args(i)``), or
    lists of raw QEMU arguments.  ``params``: the guest /init's vr.* parameters, e.g.
    ``{"ip": "10.0.0.1/24", "ping": "10.0.0.2", "count": 20}`` (see tests/qemu/init).
    The serial console goes to WORKDIR/NAME.serial.log (``log_text()``), QEMU's own messages to
    WORKDIR/NAME.log (``qemu_log_text()``).  ``monitor=True`` adds an HMP monitor socket
    (``hmp()``).  ``cpus``: CPU list for taskset (None: not pinned).
    """

    def __init__(self, devices: Sequence = (), *, params: dict | None = None, name: str | None = None,
                 workdir: str | os.PathLike | None = None, memory_mb: int = 256,
                 kernel: str | None = None, initrd: str | None = None, append: str = "",
                 cpus: str | Iterable[int] | None = None, extra_args: Sequence[str] = (),
                 monitor: bool = False, hard_timeout: float = 600):
        n = next(_counter)
        name = name or f"qemu{n}"
        self.workdir = Path(workdir) if workdir else Path(short_tmpdir("vrq"))
        self.devices = list(devices)
        self.params = dict(params or {})
        if kernel is None:
            k = find_kernel()
            if k is None:
                raise PeerMissing("no kernel found under /boot")
            kernel, kver = k
        else:
            kver = None
        self.kernel = kernel
        self.initrd = initrd or build_initramfs(kernel_version=kver)
        self.serial_log = self.workdir / f"{name}.serial.log"
        self.monitor_path = self.workdir / f"{name}.mon" if monitor else None
        cmdline = "console=ttyS0 quiet panic=-1 " + " ".join(
            f"vr.{k}={v}" for k, v in self.params.items())
        if append:
            cmdline += " " + append
        argv = [QEMU, "-machine", "pc,accel=tcg", "-m", str(memory_mb), "-nodefaults",
                "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
                "-numa", "node,memdev=mem",
                "-kernel", kernel, "-initrd", self.initrd, "-append", cmdline,
                "-display", "none", "-no-reboot",
                "-chardev", f"file,id=ser0,path={self.serial_log}", "-serial", "chardev:ser0",
                "-monitor", f"unix:{self.monitor_path},server=on,wait=off" if monitor else "none"]
        for i, d in enumerate(self.devices):
            argv += list(d) if isinstance(d, (list, tuple)) else d.qemu_args(i)
        argv += list(extra_args)
        super().__init__(argv, name=name, log_path=self.workdir / f"{name}.log",
                         hard_timeout=hard_timeout, cpus=cpus)

    def start(self):
        try:
            self.serial_log.unlink()
        except FileNotFoundError:
            pass
        self.serial_log.touch()
        return super().start()

    # serial console = the guest's log; QEMU's own stdout/stderr = qemu_log_text()
    def log_text(self) -> str:
        try:
            return self.serial_log.read_bytes().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def qemu_log_text(self) -> str:
        return super().log_text()

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        q = self.qemu_log_text().strip()
        return (f"--- last {len(tail)} lines of {self.serial_log} ---\n" + "\n".join(tail)
                + (f"\n--- {self.log_path} ---\n{q[-3000:]}" if q else ""))

    def results(self) -> list[str]:
        """The guest's RESULT lines so far, without the "RESULT " prefix."""
        return [m.group(1).strip() for m in re.finditer(r"^RESULT (.*)$", self.log_text(), re.M)]

    def wait_result(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Wait for a RESULT line matching ``pattern`` (regex searched in the text after
        "RESULT "); returns the match.  PeerError if QEMU exits first, TimeoutError on timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.results():
                m = rx.search(line)
                if m:
                    return m
            if not self.alive():
                for line in self.results():
                    m = rx.search(line)
                    if m:
                        return m
                raise PeerError(f"{self.name} exited (rc={self.returncode}) before RESULT "
                                f"{pattern!r}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no RESULT {pattern!r} within {timeout} s\n"
                                   + self.log_tail())
            time.sleep(0.1)

    def hmp(self, command: str, timeout: float = 10.0) -> str:
        """Run a human-monitor command (needs monitor=True); returns its output."""
        if self.monitor_path is None:
            raise PeerError("QemuGuest(monitor=True) is needed for hmp()")
        wait_for_socket(self.monitor_path, timeout, proc=self)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(os.fspath(self.monitor_path))

            def until_prompt() -> str:
                buf = b""
                while not buf.endswith(b"(qemu) "):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                return buf.decode("utf-8", "replace")

            until_prompt()
            s.sendall(command.encode() + b"\n")
            out = until_prompt()
        out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out).replace("\r", "")
        lines = out.splitlines()
        if lines and command in lines[0]:
            lines = lines[1:]
        if lines and lines[-1].startswith("(qemu)"):
            lines = lines[:-1]
        return "\n".join(lines)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM (QEMU exits at once), SIGKILL the group after ``grace`` s; reaps it."""
        return self.terminate(grace)
