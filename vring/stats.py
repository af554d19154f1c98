"""``vring stats`` (live view or one JSON sample) and ``vring snapshot`` over a back-end's control socket."""
from __future__ import annotations

import argparse
import json
import sys
import time

from vring.control import ControlClient, default_path


def _path(args: argparse.Namespace) -> str:
    if args.control:
        return args.control
    if args.pid:
        return default_path(args.pid)
    raise SystemExit("give --control PATH or --pid PID (the path vring net printed at start)")


def rates(prev: dict, cur: dict) -> dict[tuple[int, int], dict[str, float]]:
    """Per (port, vring): Mpps, Gbit/s, drops/s between two samples."""
    dt = cur["monotonic"] - prev["monotonic"]
    out = {}
    old = {(q["port"], q["vring"]): q for q in prev["queues"]}
    for q in cur["queues"]:
        o = old.get((q["port"], q["vring"]))
        if o is None or dt <= 0:
            continue
        out[(q["port"], q["vring"])] = {
            "mpps": (q["packets"] - o["packets"]) / dt / 1e6,
            "gbps": 8 * (q["bytes"] - o["bytes"]) / dt / 1e9,
            "drops_per_s": (q["drops"] - o["drops"]) / dt,
        }
    return out


def one_sample(client: ControlClient, interval: float) -> dict:
    """A sample; with interval > 0, two samples that far apart and the rates between them."""
    s = client.sample()
    if interval > 0:
        time.sleep(interval)
        s2 = client.sample()
        r = rates(s, s2)
        for q in s2["queues"]:
            q.update(r.get((q["port"], q["vring"]), {}))
        s2["interval"] = s2["monotonic"] - s["monotonic"]
        s = s2
    s.pop("ok", None)
    return s


def table(s: dict, r: dict | None = None):
    """A rich renderable of one sample (ports, then one row per vring)."""
    from rich.console import Group
    from rich.table import Table

    ports = Table(title=f"vring {s.get('kind')} pid {s.get('pid')} mode {s.get('mode')}", expand=False)
    for c in ("port", "socket", "front-end", "features", "protocol features"):
        ports.add_column(c)
    for p in s["ports"]:
        ports.add_row(str(p["port"]), p.get("socket", ""), "connected" if p.get("connected") else "-",
                      p.get("features_names", ""), p.get("protocol_features_names", ""))
    t = Table(expand=False)
    for c, j in (("port", "right"), ("vring", "right"), ("dir", "left"), ("packets", "right"), ("bytes", "right"),
                 ("Mpps", "right"), ("drops", "right"), ("held", "right"), ("calls", "right"), ("errors", "right"),
                 ("occupancy", "left"), ("state", "left")):
        t.add_column(c, justify=j)
    for q in s["queues"]:
        key = (q["port"], q["vring"])
        rr = (r or {}).get(key, {})
        if q["pending"] is not None and q["size"]:
            n = round(10 * q["pending"] / q["size"])
            occ = f"{'#' * n}{'.' * (10 - n)} {q['pending']}/{q['size']}"
        else:
            occ = ""
        if q["broken"]:
            state = f"[red]broken: {q['broken_reason']}[/red]"
        else:
            state = "ready" if q["ready"] else "[dim]stopped[/dim]"
        t.add_row(str(q["port"]), str(q["vring"]), q["dir"], f"{q['packets']:,}", f"{q['bytes']:,}",
                  f"{rr['mpps']:.3f}" if "mpps" in rr else "", f"{q['drops']:,}", f"{q.get('held', 0):,}",
                  f"{q['calls']:,}",
                  f"{q['errors']:,}", occ, state)
    poll = s.get("poll") or {}
    foot = ""
    if "polls" in poll:
        foot = (f"polls {poll['polls']:,}  empty {100 * poll['empty_share']:.1f}%  full {100 * poll['full_share']:.1f}%"
                f"  busy ns/frame {poll['ns_per_frame']:.1f}")
    from rich.text import Text

    return Group(ports, t, Text(foot))


def _console():
    from rich.console import Console

    # a terminal: its width; a pipe or a file: wide enough that no column is cut
    return Console() if sys.stdout.isatty() else Console(width=200)


def cmd_stats(args: argparse.Namespace) -> int:
    path = _path(args)
    with ControlClient(path) as c:
        if args.once:
            s = one_sample(c, args.interval)
            if args.json:
                print(json.dumps(s), flush=True)
            else:
                _console().print(table(s, {(q["port"], q["vring"]): q for q in s["queues"]}))
            return 0
        from rich.live import Live

        prev = c.sample()
        deadline = time.monotonic() + args.seconds if args.seconds else None
        try:
            with Live(table(prev), console=_console(), refresh_per_second=4, screen=False) as live:
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(args.interval or 1.0)
                    try:
                        cur = c.sample()
                    except (OSError, ConnectionError) as e:
                        print(f"vring stats: back-end gone ({e})", file=sys.stderr)
                        return 1
                    live.update(table(cur, rates(prev, cur)))
                    prev = cur
        except KeyboardInterrupt:
            pass
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    path = _path(args)
    with ControlClient(path, timeout=60) as c:
        out = c.snapshot(args.out)
    from vring.inspect import load

    snap = load(out)
    print(f"snapshot of pid {snap.meta.get('pid')}: {len(snap.meta['queues'])} started vrings -> {out}", flush=True)
    return 0


def register(sub) -> None:
    s = sub.add_parser("stats", help="live counters of a running vring net (over its control socket)",
                       description="Attach to a running back-end through its control socket and show per port "
                                   "and vring packets, bytes, Mpps, drops, broken reasons, negotiated features "
                                   "and ring occupancy.")
    s.add_argument("--control", metavar="PATH", help="the control socket vring net printed at start")
    s.add_argument("--pid", type=int, help="the back-end's pid (its default control socket)")
    s.add_argument("--once", action="store_true", help="one sample, then exit")
    s.add_argument("--json", action="store_true", help="with --once: one JSON object on one line")
    s.add_argument("--interval", type=float, default=1.0,
                   help="seconds between samples (with --once: the window the rates are measured over; 0: no rates)")
    s.add_argument("--seconds", type=float, default=0, help="live view: stop after this many seconds")
    s.set_defaults(func=cmd_stats)

    n = sub.add_parser("snapshot", help="save all ring state of a running vring net to a .npz",
                       description="Copy every started vring (descriptor table, avail and used rings, indexes, "
                                   "counters, region table) of a running back-end into FILE.npz for "
                                   "vring.inspect.load() in a notebook.")
    n.add_argument("--control", metavar="PATH")
    n.add_argument("--pid", type=int)
    n.add_argument("--out", required=True, metavar="FILE.npz")
    n.set_defaults(func=cmd_snapshot)
