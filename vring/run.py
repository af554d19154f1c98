"""``vring run CONFIG.yaml``: several devices of different kinds in one process, kept apart.

Each device gets what ``vring net`` / ``vring switch`` / ``vring vsock`` would give it alone: its
own data-plane worker thread and its own control-plane thread (a :class:`vring.server.Server`
with its own selector), plus, if asked, its own control socket and metrics endpoint. So a
front-end whose messages are slow to handle (a pause of its device's data plane, a big memory
table) delays only its own device, a bad ring breaks only its queue, and a bug that ends one
device's control thread is logged and leaves the others serving. (A front-end that stalls
mid-message holds nobody, not even its own device's other ports: sessions buffer partial
messages.) What is still shared: the GIL (the data planes run nogil; the vsock data plane and
all control threads take turns).
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

HELP = """\
Serve several vhost-user devices (virtio-net ports, switches, vsock guests) from one process.
Every device has its own data-plane thread and its own control-plane thread: a front-end that
sends garbage to one device never delays the others.

CONFIG.yaml:
  devices:
    - type: net                 # vring net: xconnect / loopback / sink / source
      name: left                # optional (default TYPE-INDEX): in logs and the final counters
      sockets: [/tmp/a.sock, /tmp/b.sock]
      mode: xconnect            # default: xconnect with two sockets, loopback with one
      queues: 1                 # and burst, idle_rounds (or poll: true / interrupt: true), cpus: "1",
      mtu: 9000                 #   disable: RING_PACKED,IN_ORDER, frame_size (source), client: true,
      hold_us: 1000             #   hold_us (vring net --hold-us)
      control: /tmp/left.ctl    # optional: vring stats --control /tmp/left.ctl
      metrics: 127.0.0.1:9101   # optional: Prometheus
    - type: switch              # vring switch: same keys (no mode, disable, frame_size, hold_us) + age, table_size
      sockets: [/tmp/s0.sock, /tmp/s1.sock, /tmp/s2.sock]
    - type: vsock               # vring vsock: the guests as in `vring vsock --config` (+ client, cpus)
      vms:
        - {guest_cid: 3, socket: /tmp/vhost3.sock, uds_path: /tmp/vm3.vsock}
"""

COMMON_KEYS = {"type", "name", "client", "control", "metrics", "cpus"}
PORT_KEYS = {"sockets", "queues", "burst", "idle_rounds", "poll", "interrupt", "mtu"}
KEYS = {
    "net": COMMON_KEYS | PORT_KEYS | {"mode", "disable", "frame_size", "hold_us"},
    "switch": COMMON_KEYS | PORT_KEYS | {"age", "table_size"},
    "vsock": COMMON_KEYS | {"vms"},
}


@dataclass
class Unit:
    """One device of the process with its sockets, control-plane thread and observers."""

    name: str
    dev: object
    sockets: list[str]
    client: bool = False
    control_path: str | None = None
    metrics_addr: str | None = None
    server: object = None
    control: object = None
    metrics: object = None
    thread: threading.Thread | None = None
    failed: BaseException | None = field(default=None, repr=False)

    def open(self) -> None:
        """Start the data plane, then listen (the sockets appear only when the device is ready)."""
        from vring.server import Server

        if hasattr(self.dev, "open"):
            self.dev.open()  # vsock: the host-side listeners
        self.dev.start()
        self.server = Server(self.dev, self.sockets, client=self.client, name=self.name)
        self.server.open()
        if self.control_path:
            from vring.control import ControlServer

            self.control = ControlServer(self.dev, self.server, self.control_path,
                                         meta={"name": self.name, "sockets": self.sockets}).start()
            log.info("dev=%s control socket: %s", self.name, self.control.path)
        if self.metrics_addr:
            from vring.metrics import serve

            self.metrics = serve(self.dev, self.server, self.metrics_addr, name=self.name)
            log.info("dev=%s metrics: %s", self.name, self.metrics.url)

    def serve(self) -> None:
        self.thread = threading.Thread(target=self._serve, name=f"control-{self.name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve()
        except BaseException as e:  # a bug, not input: this device stops serving, the others go on
            log.exception("dev=%s control plane failed; the other devices keep running", self.name)
            self.failed = e

    def close(self) -> None:
        if self.server is not None:
            self.server.stopping = True
        if self.thread is not None:
            self.thread.join(15)
        for obs in (self.control, self.metrics):
            if obs is not None:
                obs.close()
        if self.server is not None:
            self.server.close()
        self.dev.stop()

    def report(self) -> list[str]:
        lines = []
        for p in range(self.dev.nports):
            c = self.dev.port_counters(p)
            lines.append(f"{self.name} port {p} ({self.sockets[p]}): " + " ".join(f"{k}={v}" for k, v in c.items()))
        return lines + [f"{self.name} {line}" for line in self.dev.summary_lines()]


def _idle_rounds(d: dict) -> int:
    return 0 if d.get("poll") else 1 if d.get("interrupt") else int(d.get("idle_rounds", 20000))


def build(d: dict, index: int) -> Unit:
    """One Unit from one entry of the ``devices`` list (ValueError on a bad entry)."""
    from vring.cli import parse_cpus, parse_features

    kind = d.get("type")
    where = f"devices[{index}]"
    if kind not in KEYS:
        raise ValueError(f"{where}: type must be one of {', '.join(KEYS)}")
    d = {str(k).replace("-", "_"): v for k, v in d.items()}
    unknown = set(d) - KEYS[kind]
    if unknown:
        raise ValueError(f"{where} ({kind}): unknown key(s) {', '.join(sorted(unknown))}")
    name = str(d.get("name", f"{kind}-{index}"))
    cpus = parse_cpus(str(d["cpus"])) if d.get("cpus") is not None else None
    try:
        if kind == "vsock":
            from devices.vsock import VsockDevice, _vm_from_dict

            vms = d.get("vms")
            if not isinstance(vms, list) or not vms:
                raise ValueError("a 'vms' list is required")
            cfgs = [_vm_from_dict(v, f"{where} vms[{i}]") for i, v in enumerate(vms)]
            dev = VsockDevice(cfgs, cpus=cpus)
            sockets = [c.socket for c in cfgs]
        else:
            sockets = d.get("sockets")
            if not isinstance(sockets, list) or not sockets:
                raise ValueError("a 'sockets' list is required")
            sockets = [str(s) for s in sockets]
            port = {"queues": int(d.get("queues", 1)), "burst": int(d.get("burst", 32)),
                    "idle_rounds": _idle_rounds(d), "cpus": cpus, "mtu": int(d.get("mtu", 0))}
            if kind == "net":
                from devices.net import HOLD_US, NetDevice

                mode = d.get("mode") or ("xconnect" if len(sockets) == 2 else "loopback")
                dev = NetDevice(len(sockets), mode, frame_size=int(d.get("frame_size", 64)),
                                disable=parse_features(d["disable"]) if d.get("disable") else 0,
                                hold_us=float(d.get("hold_us", HOLD_US)), **port)
            else:
                from devices.switch import SwitchDevice

                dev = SwitchDevice(len(sockets), age=float(d.get("age", 300.0)),
                                   table_size=int(d.get("table_size", 4096)), **port)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} ({kind}): {e}") from None
    return Unit(name, dev, sockets, bool(d.get("client", False)), d.get("control"), d.get("metrics"))


def load(path: str) -> list[Unit]:
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    devs = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(devs, list) or not devs or not all(isinstance(d, dict) for d in devs):
        raise ValueError(f"{path}: expected a top-level 'devices' list of mappings")
    units = [build(d, i) for i, d in enumerate(devs)]
    names = [u.name for u in units]
    paths = [p for u in units for p in u.sockets]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: two devices share a name")
    if len(set(paths)) != len(paths):
        raise ValueError(f"{path}: two ports share a socket path")
    return units


def cmd_run(args: argparse.Namespace) -> int:
    try:
        units = load(args.config)
    except (OSError, ValueError) as e:
        log.error("vring run: %s", e)
        return 2
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    opened: list[Unit] = []
    try:
        for u in units:
            opened.append(u)
            u.open()
        for u in units:
            u.serve()
        log.info("vring run: %d device(s): %s", len(units),
                 " ".join(f"{u.name}({type(u.dev).__name__}, {u.dev.nports} port(s))" for u in units))
        until = time.monotonic() + args.seconds if args.seconds else None
        while not stop.is_set() and (until is None or time.monotonic() < until):
            stop.wait(0.25 if until is None else max(0.0, min(0.25, until - time.monotonic())))
    except OSError as e:
        log.error("vring run: %s", e)
        return 2
    finally:
        for u in reversed(opened):
            try:
                u.close()
            except Exception:
                log.exception("dev=%s: stopping failed", u.name)
        for u in opened:
            for line in u.report():
                print(line, flush=True)
    return 1 if any(u.failed for u in units) else 0


def register(sub) -> None:
    r = sub.add_parser("run", help="several devices (net, switch, vsock) in one process, from a YAML file",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("config", metavar="CONFIG.yaml", help="the devices (format above)")
    r.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (default: until a signal)")
    r.set_defaults(func=cmd_run)
