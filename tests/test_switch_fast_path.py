"""The switch's own path for the common frame (devices.switch._switch_one) against its general
path, on random and hostile rings, split or packed (the rings and frames of test_forward_fast_path).

``switch_batch`` takes a frame through ``_switch_one`` when nothing is captured; a capture that is
on for another port (it records nothing here) sends every frame through the general path
(``pop``, ``learn``, ``lookup``, ``_to_port``). Port 0 sends on the TX vring, port 1 receives on
the RX vring. Before the batch, some frames' destination MACs are learned on port 0 (filtered),
on port 1 (unicast) or not at all (flooded to port 1). One round of the data plane itself
(``switch_loop``, the kernel ``vring compile`` compiles) runs both ways from the same state: the
result, the queue state, the counters, the MAC table, the switch's stats and every byte of guest
memory must be the same (the MAC table's times: refreshed in the same entries, as each run reads
its own clock).
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_forward_fast_path import GPA0, REGION, ROWS, RX, TX, TX_DESC, WATCH, Guest, both_ways, scenario

from devices.switch import S_FILTERED, S_FLOODED, S_UNICAST, SWSTAT_NAMES, learn, switch_loop, switch_scratch
from vring.dataplane import run_rounds
from vring.layout import C_PACKETS, DESC_F_WRITE

RX_ROWS = np.array([[-1], [RX]], np.int64)  # port 0 receives nothing here; port 1 on the RX vring
TX_ROWS = np.array([[TX], [-1]], np.int64)


@st.composite
def switch_scenario(draw):
    sc = draw(scenario())
    sc["learn"] = [draw(st.sampled_from([None, None, 0, 1])) for _ in range(sc["size"])]  # per TX slot
    return sc


class SwitchGuest(Guest):
    def __init__(self, sc: dict):
        super().__init__(sc)
        self.mac_key = np.zeros(64, np.uint64)
        self.mac_port = np.full(64, -1, np.int64)
        self.mac_seen = np.zeros(64, np.uint64)
        self.params = np.zeros(4, np.uint64)  # age 0: entries never age
        self.sw = np.zeros(len(SWSTAT_NAMES), np.uint64)
        hl = sc["hl_tx"]
        for slot, port in enumerate(sc["learn"]):  # a frame's destination MAC, where it is in guest memory
            addr, ln, _id, _fl = struct.unpack_from("<QIHH", self.mem, TX_DESC + 16 * slot)
            if port is None or not GPA0 <= addr < GPA0 + REGION - hl - 12 or ln < hl + 12:
                continue
            off = addr - GPA0 + hl
            mac = int.from_bytes(bytes(self.mem[off : off + 6]), "big")
            learn(self.mac_key, self.mac_port, self.mac_seen, np.uint64(mac), port, np.uint64(1), np.uint64(0),
                  np.zeros(len(SWSTAT_NAMES), np.uint64))

    def run(self, burst: int, general: bool):
        cap, polls, busy = self.loop_arrays(burst, general)
        scratch = self.scratch = switch_scratch(len(WATCH), 2, np.zeros(8, np.uint64))
        run_rounds(switch_loop, 1, self.qs, self.counters, self.regions, RX_ROWS, TX_ROWS, ROWS, WATCH, burst,
                   self.mac_key, self.mac_port, self.mac_seen, self.params, self.sw, polls, busy, cap, scratch)
        return self.poll_result(polls, busy)

    def state(self):
        return (*super().state(), self.mac_key.copy(), self.mac_port.copy(), self.mac_seen.copy(), self.sw.copy())

    def restore(self, st_) -> None:
        super().restore(st_[:3])
        self.mac_key[:], self.mac_port[:], self.mac_seen[:], self.sw[:] = st_[3:]


def check(sc: dict) -> tuple[int, np.ndarray, np.ndarray]:
    """Both ways; (frames moved, counters, switch stats)."""
    g = SwitchGuest(sc)
    seen = g.mac_seen.copy()
    fast, after_fast, after = both_ways(g, sc["burst"])
    for i, name in ((3, "mac_key"), (4, "mac_port"), (6, "switch stats")):
        assert (after_fast[i] == after[i]).all(), f"{name} differs"
    assert ((after_fast[5] != seen) == (after[5] != seen)).all(), "MAC table times refreshed in other entries"
    return fast[0], after[2], after[6]


@settings(max_examples=400, deadline=None, database=None)
@given(switch_scenario())
def test_common_frame_path_equals_the_general_path(sc):
    check(sc)


@pytest.mark.parametrize("tx_packed", [False, True], ids=["tx-split", "tx-packed"])
@pytest.mark.parametrize("rx_packed", [False, True], ids=["rx-split", "rx-packed"])
def test_the_common_frame_path_switches_and_is_checked(tx_packed, rx_packed):
    """Plain cases through both paths: 4 one-descriptor frames into 4 big RX buffers, their
    destinations learned on port 1 (unicast), not at all (flooded to port 1) or on port 0
    (filtered), so the equality above is not only ever about frames neither path moved; and on its
    own, the batch took the common path for the 3 frames delivered (the filtered one goes the
    general way: the general path's pieces, s_hva, hold that one frame only). (The
    4 frames' MACs are distinct and unicast: their bytes count up from 12 mod 64, and repeat from
    the fifth frame on.)"""
    sc = dict(size=8, hl_tx=12, hl_rx=12, tx=[([("buf", 12 + 64, 0)], None)] * 4, tx_hdr=[0] * 8,
              rx=[[("buf", 2048, DESC_F_WRITE)]] * 4, tx_start=(0, 1), rx_start=(7, 0), mrg=1, in_order=1,
              max_frame=0, burst=32, unavail_at=8, learn=[1, None, 0, None, None, None, None, None],
              tx_packed=tx_packed, rx_packed=rx_packed, bad_head_at=None)
    done, counters, sw = check(sc)
    assert done == 4
    assert (sw[S_UNICAST], sw[S_FLOODED], sw[S_FILTERED]) == (1, 2, 1)
    assert counters[TX, C_PACKETS] == 4 and counters[RX, C_PACKETS] == 3  # 1 unicast + 2 flooded delivered
    g = SwitchGuest(sc)
    assert g.run(32, general=False)[0] == 4
    assert np.count_nonzero(g.scratch[3]) == 1, "more than the filtered frame went through pop"
