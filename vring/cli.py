"""The ``vring`` command: ``vring net`` (the back-end) and ``vring demo`` (back-end + in-tree front-end)."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

log = logging.getLogger("vring")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def parse_cpus(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3]"""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def parse_features(text: str) -> int:
    """'RING_PACKED,in_order' -> the mask of those virtio feature bits (names of vring.protocol.F)."""
    from vring.protocol import F

    mask = 0
    for name in text.split(","):
        try:
            mask |= F[name.strip().upper()]
        except KeyError:
            raise SystemExit(f"unknown feature {name!r}; known: {', '.join(f.name for f in F)}") from None
    return int(mask)


def parse_disable(values: list[str] | None) -> tuple[int, dict[int, int]]:
    """--disable FEATURES (every port) and --disable PORT=FEATURES (that port only), repeatable."""
    everywhere, per_port = 0, {}
    for v in values or []:
        port, sep, names = v.partition("=")
        if sep:
            if not port.strip().isdigit():
                raise SystemExit(f"--disable {v!r}: expected PORT=FEATURES with a port number")
            per_port[int(port)] = per_port.get(int(port), 0) | parse_features(names)
        else:
            everywhere |= parse_features(v)
    return everywhere, per_port


def mtu_arg(text: str) -> int:
    """--mtu: 68..65535 (what NET_SET_MTU accepts too)."""
    from vring.protocol import MAX_MTU, MIN_MTU

    n = int(text)
    if not MIN_MTU <= n <= MAX_MTU:
        raise argparse.ArgumentTypeError(f"must be {MIN_MTU}..{MAX_MTU}")
    return n


def cmd_net(args: argparse.Namespace) -> int:
    from devices.net import HOLD_US, NetDevice

    mode = args.mode or ("xconnect" if len(args.socket) == 2 else "loopback")
    disable, port_disable = parse_disable(args.disable)
    try:
        dev = NetDevice(len(args.socket), mode, queues=args.queues, frame_size=args.frame_size, burst=args.burst,
                        idle_rounds=idle_rounds(args), cpus=parse_cpus(args.cpus) if args.cpus else None,
                        disable=disable, mtu=args.mtu, port_disable=port_disable,
                        hold_us=HOLD_US if args.hold_us is None else args.hold_us)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return serve_backend(dev, args, f"vring net: mode={mode}", {"mode": mode})


def idle_rounds(args: argparse.Namespace) -> int:
    return 0 if args.poll else 1 if args.interrupt else args.idle_rounds


def serve_backend(dev, args: argparse.Namespace, banner: str, meta: dict) -> int:
    """Run a device's ports until SIGINT/SIGTERM (or --seconds): sockets, capture, control socket,
    metrics; then print each port's counters, the device's summary and the poll statistics."""
    from vring.server import Server

    server = Server(dev, args.socket, client=args.client)
    pcap = control = metrics = None
    if args.pcap:
        from devices.capture import PcapDrain

        paths = {p: args.pcap.format(port=p) for p in range(dev.nports)}
        if len(set(paths.values())) != len(paths):
            raise SystemExit("--pcap: with several ports the path must contain {port}")
        pcap = PcapDrain(paths, dev.nvq, limit=args.pcap_limit)
        dev.cap = pcap.arrays()

    def stop(signum, frame):
        server.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    dev.start()  # compiles the data plane first: the socket appears only when vring is ready
    if pcap is not None:
        pcap.start()
    try:
        server.open()
        log.info("%s ports=%d queues=%d %s", banner, dev.nports, args.queues, "client" if args.client else "server")
        if args.control != "none":
            from vring.control import ControlServer, default_path

            control = ControlServer(dev, server, args.control or default_path(),
                                    meta={"sockets": args.socket, **meta}).start()
            log.info("control socket: %s (vring stats --control %s)", control.path, control.path)
        if args.metrics:
            from vring.metrics import serve as serve_metrics

            metrics = serve_metrics(dev, server, args.metrics)
            log.info("metrics: %s", metrics.url)
        server.serve(until=time.monotonic() + args.seconds if args.seconds else None)
    finally:
        if control is not None:
            control.close()
        if metrics is not None:
            metrics.close()
        server.close()
        dev.stop()
        if pcap is not None:
            pcap.stop()
            log.info("pcap: %d frames written", pcap.written)
        for p in range(dev.nports):
            c = dev.port_counters(p)
            print(f"port {p} ({args.socket[p]}): " + " ".join(f"{k}={v}" for k, v in c.items()), flush=True)
        for line in dev.summary_lines():
            print(line, flush=True)
        ps = dev.poll_stats()
        print(f"polls={ps['polls']} empty={100 * ps['empty_share']:.1f}% full={100 * ps['full_share']:.1f}% "
              f"busy_ns_per_frame={ps['ns_per_frame']:.1f}", flush=True)
    return 0


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every packet back-end (vring net, vring switch) takes."""
    parser.add_argument("--socket", action="append", required=True, metavar="PATH",
                        help="vhost-user socket, one port each (repeat)")
    parser.add_argument("--client", action="store_true",
                        help="connect to the sockets (the front-end is the server); retry and reconnect")
    parser.add_argument("--queues", type=int, default=1, help="queue pairs per port (default 1)")
    parser.add_argument("--burst", type=int, default=32, help="frames per ring per round (default 32)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--poll", action="store_true",
                     help="busy-poll forever, one PAUSE per empty round (lowest latency, one core at 100%%)")
    how.add_argument("--interrupt", action="store_true",
                     help="sleep on the kick eventfds as soon as a round finds nothing (for mostly idle guests)")
    parser.add_argument("--idle-rounds", type=int, default=20000,
                        help="adaptive (default): empty rounds before sleeping on the kick eventfds (default 20000)")
    parser.add_argument("--cpus", metavar="LIST", help="pin the data-plane thread to these CPUs, e.g. 1 or 0,2-3")
    parser.add_argument("--mtu", type=mtu_arg, default=0, metavar="N",
                        help="drop frames from a driver longer than N + 14 bytes (+4 with a VLAN tag) and report N "
                             "in the config space; a front-end's NET_SET_MTU (QEMU host_mtu=) overrides it for its "
                             "port (default: no limit)")
    parser.add_argument("--pcap", metavar="FILE",
                        help="capture each port's frames (both directions) to a pcap file; {port} in FILE is the "
                             "port number (required with several ports)")
    parser.add_argument("--pcap-limit", type=int, default=0, metavar="N", help="stop capturing after N frames")
    parser.add_argument("--seconds", type=float, default=0,
                        help="stop after this many seconds (default: run until a signal)")
    parser.add_argument("--control", metavar="PATH",
                        help="control socket for vring stats / vring snapshot (default /tmp/vring-<pid>.ctl, logged "
                             "at start; 'none': no control socket)")
    parser.add_argument("--metrics", metavar="[HOST:]PORT",
                        help="serve Prometheus metrics on HOST:PORT (host defaults to 127.0.0.1)")


def _print_rates(r: dict) -> None:
    print(f"  tx {r['tx_mpps']:7.3f} Mpps   rx {r['rx_mpps']:7.3f} Mpps   (sent {r['tx_packets']}, "
          f"received {r['rx_packets']})", flush=True)


def cmd_frontend(args: argparse.Namespace) -> int:
    """The in-tree front-end as a traffic generator against any vhost-user net back-end."""
    import json

    from vring.frontend import Frontend
    from vring.generator import run

    fes = [Frontend(path, queue_pairs=args.queues, queue_size=args.queue_size,
                    buf_size=max(2048, args.frame_size + 64), packed=args.packed) for path in args.socket]
    try:
        for fe in fes:
            fe.connect(timeout=args.wait)
            fe.setup()
        res = run(fes, args.mode, args.seconds, burst=args.burst, frame_size=args.frame_size,
                  report=None if args.quiet else _print_rates, rate=args.rate)
    finally:
        for fe in fes:
            fe.close()
    print(json.dumps({"mode": args.mode, "burst": args.burst, "frame_size": args.frame_size, "rate": args.rate,
                      "packed": args.packed, **res}), flush=True)
    return 0


COMPILE_TARGETS = ("net", "switch", "vsock")


def compile_targets(text: str) -> tuple[str, ...]:
    """``vring compile --only``'s value: device names out of COMPILE_TARGETS."""
    names = tuple(n for n in text.split(",") if n)
    bad = [n for n in names if n not in COMPILE_TARGETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"not a device to compile: {','.join(bad) or repr(text)} "
                                         f"(one or more of {','.join(COMPILE_TARGETS)})")
    return names


def cmd_compile(args: argparse.Namespace) -> int:
    from devices.net import NetDevice
    from devices.switch import SwitchDevice
    from devices.vsock_proto import warm_up_kernels

    compile_one = {"net": lambda: NetDevice(2, "xconnect").compile(), "switch": lambda: SwitchDevice(2).compile(),
                   "vsock": warm_up_kernels}
    t0 = time.monotonic()
    for name in COMPILE_TARGETS:  # one order, whatever --only's
        if name not in args.only:
            continue
        t = time.monotonic()
        compile_one[name]()
        print(f"compile: {name} {time.monotonic() - t:.1f} s", flush=True)
    print(f"compile: done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A vring net back-end (loopback) in a child process, the jitted in-tree front-end here, live Mpps."""
    from vring.frontend import Frontend
    from vring.generator import run

    with tempfile.TemporaryDirectory(prefix="vring-demo-") as d:
        sock = os.path.join(d, "vring.sock")
        backend = subprocess.Popen([sys.executable, "-m", "vring", "net", "--socket", sock, "--mode", "loopback"])
        fe = Frontend(sock, queue_size=256)
        try:
            fe.connect(timeout=120)
            fe.setup()
            print(f"demo: in-tree front-end (flowgen) <-> vring net (loopback), {args.frame_size}-byte frames, "
                  f"burst {args.burst}, {args.seconds:g} s", flush=True)
            res = run(fe, "flowgen", args.seconds, burst=args.burst, frame_size=args.frame_size, report=_print_rates)
            print(f"demo: sent {res['tx_packets']} received {res['rx_packets']} "
                  f"({res['rx_mpps']:.2f} Mpps through vring)", flush=True)
            return 0 if res["rx_packets"] > 0 else 1
        finally:
            fe.close()
            backend.send_signal(signal.SIGTERM)
            backend.wait(timeout=30)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vring", description="A vhost-user back-end in Python: numpy + numba data plane.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    n = sub.add_parser("net", help="virtio-net back-end: one port per --socket",
                       description="Serve virtio-net over vhost-user. One port per --socket; with two sockets the "
                                   "default mode cross-connects them, with one it loops frames back.")
    add_backend_arguments(n)
    n.add_argument("--mode", choices=("xconnect", "loopback", "sink", "source"),
                   help="xconnect: port A <-> port B; loopback: frames come back; sink: count and drop; "
                        "source: generate --frame-size frames toward the front-end")
    n.add_argument("--disable", metavar="[PORT=]FEATURES", action="append",
                   help="virtio features not to offer, e.g. RING_PACKED,IN_ORDER,NET_MRG_RXBUF,RING_EVENT_IDX; "
                        "with PORT= (0-based, the order of --socket) on that port only; repeatable "
                        "(the negotiated set of each port is logged)")
    n.add_argument("--frame-size", type=int, default=64, help="frame size for --mode source (default 64)")
    n.add_argument("--hold-us", type=float, metavar="US",  # default devices.net.HOLD_US
                   help="xconnect/loopback: a frame the receiving ring has no room for waits in the sender's "
                        "ring up to US microseconds (the sender sees a full ring and counts its own drops) before "
                        "frames are dropped here; 0: drop at once, as DPDK's vhost does (default 1000). Once "
                        "a receiver ran dry, frames wait for it to post 16 buffers again (a quarter of its ring "
                        "if fewer), for at most US/16 from the start of the wait")
    n.set_defaults(func=cmd_net)

    d = sub.add_parser("demo", help="vring net + the in-tree front-end, printing live Mpps")
    d.add_argument("--seconds", type=float, default=5.0)
    d.add_argument("--frame-size", type=int, default=64)
    d.add_argument("--burst", type=int, default=32)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compile", help="compile the data planes into numba's cache (else the first start does)",
                       description="Compile net, switch and vsock's jitted code into numba's cache, e.g. when "
                                   "building an image: a cold start otherwise spends up to a minute compiling.")
    c.add_argument("--only", type=compile_targets, default=COMPILE_TARGETS, metavar="DEVICES",
                   help=f"comma-separated, of {','.join(COMPILE_TARGETS)} (default: all)")
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("frontend", help="the in-tree front-end as a jitted traffic generator",
                       description="Connect to a vhost-user net back-end (vring net, DPDK net_vhost, ...) as its "
                                   "front-end and generate or sink traffic from a nogil numba loop.")
    g.add_argument("--socket", required=True, action="append", metavar="PATH",
                   help="back-end socket; repeat to drive several ports from the same loop")
    g.add_argument("--mode", choices=("txonly", "rxonly", "flowgen"), default="flowgen",
                   help="txonly: send; rxonly: receive; flowgen: both (default)")
    g.add_argument("--burst", type=int, default=32)
    g.add_argument("--frame-size", type=int, default=64)
    g.add_argument("--rate", type=float, default=0.0, metavar="MPPS",
                   help="offered load per TX queue in Mpps, a burst at a time (default 0: as fast as the back-end "
                        "takes frames); compares back-ends at the same load")
    g.add_argument("--queues", type=int, default=1, help="queue pairs")
    g.add_argument("--queue-size", type=int, default=256)
    g.add_argument("--packed", action="store_true", help="packed rings (VIRTIO_F_RING_PACKED; default split)")
    g.add_argument("--seconds", type=float, default=5.0)
    g.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the socket")
    g.add_argument("--quiet", action="store_true", help="only the final JSON line")
    g.set_defaults(func=cmd_frontend)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


# Modules that add their own subcommand: each has ``register(subparsers)`` adding a parser whose
# defaults set ``func(args) -> int``.
COMMAND_MODULES: list[str] = ["vring.stats", "devices.vsock", "devices.switch", "vring.run"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)
