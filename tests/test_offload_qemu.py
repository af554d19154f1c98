"""A TCP stream between two QEMU Linux guests (TCG) through ``vring net`` (xconnect), with checksum
and segmentation offloads on, and with them off on the receiving side.

Guest 1 (tests/qemu/init ``vr.tcp_send``) sends a few MiB of random data with busybox nc and
reports its md5; guest 2 (``vr.tcp_recv``) receives them and reports size and md5: they must match.

- ``offloads``: both NICs negotiate CSUM/GUEST_CSUM/TSO4/TSO6, so guest 1 hands vring TCP
  super-frames with partial checksums and vring passes them through untouched (its offload
  counters: ``gso_passed`` > 0, nothing completed in software).
- ``receiver_without_offloads``: guest 2's NIC has ``guest_csum=off,guest_tso4=off,guest_tso6=off``,
  so vring must cut guest 1's super-frames into MSS-sized segments and fill in every checksum
  (``gso_segmented`` and ``csum_completed`` > 0) — the bytes still match, and the Linux receiver
  dropped nothing for a bad checksum (it would have stalled the stream).

CPU placement as in tests/test_qemu.py: vring on CPU 1, the guests unpinned.
"""
from __future__ import annotations

import os
import time

import pytest
from peers import QemuGuest, VhostUserNet, require_peer

pytestmark = pytest.mark.peer

MAC1, MAC2 = "52:54:00:00:02:01", "52:54:00:00:02:02"
IP1, IP2 = "10.0.2.1", "10.0.2.2"
KIB = 2048
PORT = 5001
VRING_CPU = "1"
VRING_OPTS = ("-v",) if os.environ.get("VRING_TEST_DEBUG") else ()
RECEIVER_PROPS = {"offloads": "", "receiver_without_offloads": "guest_csum=off,guest_tso4=off,guest_tso6=off"}


def offload_stats(log: str) -> dict[str, int]:
    line = next(x for x in log.splitlines() if x.startswith("offload:"))
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


@pytest.mark.parametrize("case", list(RECEIVER_PROPS))
def test_tcp_stream_between_guests(sockdir, peers, vring_proc, case):
    require_peer("qemu")
    t0 = time.monotonic()
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    v = vring_proc(*VRING_OPTS, "net", "--socket", a, "--socket", b, cpus=VRING_CPU)
    v.wait_log("port=1 listening", 60)
    g2 = peers.add(QemuGuest([VhostUserNet(b, mac=MAC2, props=RECEIVER_PROPS[case])], name="g2", workdir=sockdir,
                             params={"ip": f"{IP2}/24", "tcp_recv": f"{PORT}:{KIB}", "tcp_wait": 200}))
    g1 = peers.add(QemuGuest([VhostUserNet(a, mac=MAC1)], name="g1", workdir=sockdir,
                             params={"ip": f"{IP1}/24", "tcp_send": f"{IP2}:{PORT}:{KIB}", "tcp_wait": 200,
                                     "wait": 300}))
    try:
        sent = g1.wait_result(r"^tcp data (\d+) KiB md5 ([0-9a-f]{32})", 120)
        got = g2.wait_result(r"^tcp recv (ok|fail) (\d+) bytes md5 ([0-9a-f]{32})", 240)
        g1.wait_result(r"^tcp send ok", 30)
    except Exception as e:
        raise AssertionError(f"{e}\n{g1.log_tail()}\n{g2.log_tail()}\n--- vring ---\n{v.log_text()[-4000:]}") from e
    t_stream = time.monotonic() - t0
    diag = f"{g1.log_tail()}\n{g2.log_tail()}\n--- vring ---\n{v.log_text()[-4000:]}"
    assert int(sent.group(1)) == KIB, diag
    assert got.group(1) == "ok" and int(got.group(2)) == KIB * 1024, diag
    assert got.group(3) == sent.group(2), diag  # the same bytes arrived
    g1.stop()
    g2.stop()
    assert v.stop() == 0, v.log_text()[-4000:]
    log = v.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    st = offload_stats(log)
    c = v.port_counters()
    print(f"\n{case}: stream done after {t_stream:.1f} s; offload {st}\nvring {c}")
    assert st["bad"] == 0, st
    assert c[0]["errors"] == 0 and c[1]["errors"] == 0, c
    assert st["gso_passed"] + st["gso_segmented"] > 0, f"guest 1 sent no TSO super-frame: {st}"
    if case == "offloads":
        # every offload request went through as it was: nothing done in software
        assert st["gso_passed"] > 0 and st["gso_segmented"] == 0 and st["csum_completed"] == 0, st
    else:
        # guest 1 -> guest 2 completed here; guest 2's ACKs (partial checksums) still pass to guest 1
        assert st["gso_passed"] == 0 and st["gso_segmented"] > 0, st
        assert st["segments"] > st["gso_segmented"] and st["csum_completed"] > 0, st
        assert st["csum_passed"] > 0, st
