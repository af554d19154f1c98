"""bench/e2e.py's empty-poll window: two prints of testpmd's (and two samples of vring's) poll
counts, differenced. The testpmd text is what DPDK 22.11's testpmd printed for `show fwd stats all`
here (net_vhost in io mode behind a virtio-user flowgen, burst 1), 5 s apart. Also: the vring net
command line e2e runs."""
from __future__ import annotations

import argparse
import re

import pytest
from conftest import bench_script


@pytest.fixture(scope="module")
def e2e():
    return bench_script("e2e")


def _print(rx_packets: int, tx_packets: int, rx_bursts: int, shares: str) -> str:
    return f"""testpmd> show fwd stats all

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: {rx_packets}       RX-dropped: 0             RX-total: {rx_packets}
  TX-packets: {tx_packets}       TX-dropped: 301           TX-total: {tx_packets}
  RX-bursts : {rx_bursts} [{shares}]
  TX-bursts : {tx_packets} [0% of 0 pkts + 100% of 1 pkts]
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: {rx_packets}       RX-dropped: 0             RX-total: {rx_packets}
  TX-packets: {tx_packets}       TX-dropped: 301           TX-total: {tx_packets}
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
testpmd> """


FIRST = _print(4819659, 4819539, 192950906, "97% of 0 pkts + 3% of 1 pkts")
SECOND = _print(15702034, 15701733, 205686887, "92% of 0 pkts + 8% of 1 pkts")


def test_testpmd_window_is_the_difference_of_two_prints(e2e):
    a, b = e2e.testpmd_bursts(FIRST, "RX", 1), e2e.testpmd_bursts(SECOND, "RX", 1)
    assert (a["bursts"], a["packets"]) == (192950906, 4819659)
    # over its whole life testpmd looks 92 % idle: most of those polls came before the front-end connected
    assert b["empty_share"] == pytest.approx(0.92)
    w = e2e.dpdk_window(a, b, 1)
    assert w["bursts"] == 205686887 - 192950906 and w["packets"] == 15702034 - 4819659
    # in the window at most 1 - packets / bursts were empty (burst 1: exactly that)
    assert w["empty_share_max"] == pytest.approx(1 - 10882375 / 12735981)
    assert w["empty_share_max"] < 0.15
    assert e2e.dpdk_window(b, a, 1) is None  # counts that went backwards: no window
    assert e2e.dpdk_window(None, b, 1) is None


def test_the_end_of_a_print_is_found(e2e):
    text = "noise\n" + SECOND + "more"
    m = re.search(e2e.TESTPMD_STATS_END, text)
    assert m and text[: m.end()].rstrip().endswith("+" * 20)
    assert re.search(e2e.TESTPMD_STATS_END, SECOND.split("+++++++++++++++ Accumulated")[0]) is None
    # the final totals come from the last print (when forwarding stopped), not an earlier one
    assert e2e.testpmd_totals(FIRST + SECOND)["rx_packets"] == 15702034


def test_vring_window(e2e):
    a = {"polls": 1000, "empty": 900, "frames": 3200, "busy_cycles": 320000, "cycles_per_frame": 100.0,
         "ns_per_frame": 50.0}
    b = {"polls": 3000, "empty": 2500, "frames": 19200, "busy_cycles": 1920000, "cycles_per_frame": 100.0,
         "ns_per_frame": 50.0}
    w = e2e.vring_window(a, b)
    assert w["polls"] == 2000 and w["frames"] == 16000
    assert w["empty_share"] == pytest.approx(1600 / 2000)
    assert w["busy_ns_per_frame"] == pytest.approx(1600000 / 16000 * 0.5)
    assert e2e.vring_window(b, a) is None
    # a vring that times one busy round in 16: busy cycles are per frame of the timed rounds
    a2, b2 = dict(a, timed_frames=200), dict(b, timed_frames=1200)
    assert e2e.vring_window(a2, b2)["busy_ns_per_frame"] == pytest.approx(1600000 / 1000 * 0.5)
    assert e2e.vring_window({"polls": 1}, b) is None  # a sample from a vring without raw counts


def test_vring_args_reach_vring_net_last(e2e):
    """--vring-args are appended to e2e's own vring net options, so vring's parser takes them over
    e2e's (the last of a repeated option wins) and an A/B of one option needs no code change."""
    from vring.cli import build_parser

    def runner(extra, mode="poll"):
        return e2e.Runner(argparse.Namespace(be_cpu=1, fe_cpu=0, vring_args=extra, vring_mode=mode, vring_device="net"),
                          "/tmp")

    base = runner("").vring_argv("loop", 32, 64, "/tmp/x.sock", "packed")
    argv = runner("--hold-us 0 --burst 8").vring_argv("loop", 32, 64, "/tmp/x.sock", "packed")
    assert argv[:len(base)] == base and argv[len(base):] == ["--hold-us", "0", "--burst", "8"]
    net = argv[argv.index("-m") + 2:]  # what follows "python -m vring"
    args = build_parser().parse_args(net)
    assert (args.mode, args.burst, args.hold_us, args.poll) == ("loopback", 8, 0.0, True)
    assert build_parser().parse_args(base[base.index("-m") + 2:]).hold_us is None
    # --vring-mode adaptive: vring's own default, neither --poll nor --interrupt
    adaptive = runner("", "adaptive").vring_argv("loop", 32, 64, "/tmp/x.sock", "packed")
    args = build_parser().parse_args(adaptive[adaptive.index("-m") + 2:])
    assert (args.poll, args.interrupt, args.mode) == (False, False, "loopback")


def test_vring_device_switch_runs_vring_switch_on_both_ports(e2e):
    """--vring-device switch: the cross-connect's two sockets go to ``vring switch`` (which takes no
    --mode or --frame-size), with e2e's poll mode, CPU, burst and queues; other directions are refused."""
    from vring.cli import build_parser

    ns = argparse.Namespace(be_cpu=1, fe_cpu=0, vring_args="", vring_mode="poll", vring_device="switch")
    argv = e2e.Runner(ns, "/tmp").vring_argv("xconnect", 8, 64, "/tmp/x.sock", "2q")
    args = build_parser().parse_args(argv[argv.index("-m") + 2:])
    assert args.cmd == "switch"
    assert (args.socket, args.burst, args.poll, args.queues, args.cpus) == (
        ["/tmp/x.sock", "/tmp/xb.sock"], 8, True, 2, "1")
    assert e2e.parser().parse_args([]).vring_device == "net"
    with pytest.raises(SystemExit):
        e2e.main(["--vring-device", "switch", "--dirs", "loop,xconnect"])


def test_vring_mode_is_an_e2e_option(e2e):
    assert e2e.parser().parse_args([]).vring_mode == "poll"
    assert e2e.parser().parse_args(["--vring-mode", "adaptive"]).vring_mode == "adaptive"


def test_fe_bursts_asks_the_testpmd_front_end_for_its_burst_counts(e2e):
    """--fe-bursts adds --record-burst-stats to the testpmd front-end (its exit print then holds the
    RX-bursts / TX-bursts lines testpmd_bursts reads), and only then: counting costs the front-end."""
    def argv(fe_bursts):
        r = e2e.Runner(argparse.Namespace(be_cpu=1, fe_cpu=0, vring_args="", fe_bursts=fe_bursts), "/tmp")
        return r.testpmd_fe_argv("loop", 32, 64, "/tmp/x.sock", "t", "packed")

    on, off = argv(True), argv(False)
    assert on[:-1] == off and on[-1] == "--record-burst-stats"
    assert "--forward-mode=flowgen" in off and any("packed_vq=1" in a for a in off)
    assert e2e.testpmd_bursts(SECOND, "TX", 32)["spread"] == {0: 0.0, 1: 1.0}


def test_both_testpmd_roles_get_the_variants_queues_and_ports(e2e):
    """The back-end and the front-end testpmd are built from the same variant table: a cross-connect
    gets two vdevs on each side (port 0 <-> port 1) and the 2q variant two queue pairs on both."""
    r = e2e.Runner(argparse.Namespace(be_cpu=1, fe_cpu=0, vring_args="", fe_bursts=False, dpdk_cycles=False), "/tmp")
    be = r.testpmd_be_argv("xconnect", 8, 64, "/tmp/x.sock", "t", "2q")
    fe = r.testpmd_fe_argv("xconnect", 8, 64, "/tmp/x.sock", "t", "2q")
    assert [a for a in be if a.startswith("net_vhost")] == ["net_vhost0,iface=/tmp/x.sock,queues=2",
                                                            "net_vhost1,iface=/tmp/xb.sock,queues=2"]
    assert [a for a in fe if a.startswith("net_virtio_user")] == ["net_virtio_user0,path=/tmp/x.sock,queues=2",
                                                                  "net_virtio_user1,path=/tmp/xb.sock,queues=2"]
    for argv in (be, fe):
        assert "--rxq=2" in argv and "--txq=2" in argv and "--burst=8" in argv
    assert "--forward-mode=io" in be and "--forward-mode=flowgen" in fe and "-i" in be


def test_sigterm_unwinds_like_ctrl_c(e2e):
    """A SIGTERM (pkill, a CI timeout) must run the finally blocks that stop the peers e2e started."""
    import os
    import signal
    import time

    old = signal.getsignal(signal.SIGTERM)
    try:
        e2e.stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises on delivery, before this returns
    finally:
        signal.signal(signal.SIGTERM, old)
