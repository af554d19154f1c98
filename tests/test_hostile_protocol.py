"""Hostile vhost-user front-ends against a live ``vring net`` child process.

One vring (loopback, two ports) serves the whole module. Port B has a well-behaved front-end
(the in-tree one) for the whole run; port A is fed garbage by hypothesis: truncated and
oversized messages, wrong versions and flags, unknown requests, too many or unexpected fds,
memory tables with zero / too many / overlapping / overflowing / unmappable / too-short
regions, ring indexes out of range, ring addresses outside memory or misaligned, queue sizes
zero or not powers of two, and every request in any order (after no set-up, after protocol
negotiation, or after a complete set-up with rings running).

After every case: vring is alive, answers (or has closed) that connection, real frames still
loop through port B, and once the bad front-end is gone vring's fd count (/proc/PID/fd) and
memfd mappings (/proc/PID/maps) are back to the baseline. The number of cases per class is
printed at the end of the module (``pytest -s``). VRING_FUZZ_EXAMPLES scales the run.
"""
from __future__ import annotations

import collections
import os
import select
import socket
import struct
import tempfile
import time

import numpy as np
import pytest
from conftest import VringProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import short_tmpdir
from test_net import check, frame

from vring import protocol as P
from vring.frontend import Frontend
from vring.protocol import PF, F, Req

EXAMPLES = int(os.environ.get("VRING_FUZZ_EXAMPLES", "300"))
CLASSES: collections.Counter = collections.Counter()
U64_MAX = (1 << 64) - 1


# ------------------------------------------------------------------------------------------
# the back-end under test and its observers


def fds_and_maps(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum("memfd:" in line or "/tmp/" in line for line in f)
    return fds, maps


class Rig:
    def __init__(self, v: VringProcess, bad_path: str, good: Frontend, base: tuple[int, int]):
        self.v, self.bad_path, self.good, self.base = v, bad_path, good, base
        self.seq = 0

    @property
    def pid(self) -> int:
        return self.v.proc.pid

    def alive(self) -> None:
        assert self.v.proc.poll() is None, f"vring died ({self.v.proc.returncode}):\n{self.v.log_text()[-3000:]}"

    def wait_baseline(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        now = fds_and_maps(self.pid)
        while now != self.base and time.monotonic() < deadline:
            time.sleep(0.01)
            now = fds_and_maps(self.pid)
        self.alive()
        assert now == self.base, f"fds/memfd maps {now}, baseline {self.base}:\n{self.v.log_text()[-2000:]}"

    def traffic(self, n: int = 4) -> None:
        """Real frames through the other port (loopback): all come back intact, in order."""
        fe = self.good
        frames = [frame(self.seq + i) for i in range(n)]
        assert fe.send_frames(frames) == n
        got: list[int] = []
        deadline = time.monotonic() + 5
        while len(got) < n and time.monotonic() < deadline:
            got += [check(f) for f in fe.recv_frames()]
            fe.tx().take_used()
        self.alive()
        assert got == list(range(self.seq, self.seq + n)), f"port B: {got}\n{self.v.log_text()[-2000:]}"
        self.seq += n


@pytest.fixture(scope="module")
def rig():
    d = short_tmpdir("vrh")
    a, b = os.path.join(d, "a.sock"), os.path.join(d, "b.sock")
    v = VringProcess(["net", "--mode", "loopback", "--socket", a, "--socket", b], os.path.join(d, "vring.log"))
    good = None
    try:
        v.wait_log("port=1 listening", 60)
        good = Frontend(b, queue_size=64)
        good.connect()
        good.setup()
        good.post_rx()
        time.sleep(0.2)
        r = Rig(v, a, good, (0, 0))
        r.traffic()
        r.base = fds_and_maps(v.proc.pid)
        yield r
        r.alive()
        good.close()
        good = None
        assert v.stop() == 0
        log = v.log_text()
        assert "Traceback" not in log, log[-4000:]
        print("\nhostile protocol cases per class:")
        for k, n in sorted(CLASSES.items()):
            print(f"  {k:40s} {n}")
        print(f"  {'TOTAL':40s} {sum(CLASSES.values())}")
    finally:
        if good is not None:
            good.close()
        v.stop()
        import shutil

        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# fds a hostile front-end may attach

_tmpfile = tempfile.NamedTemporaryFile(prefix="vring-ro-", dir="/tmp")  # noqa: SIM115 (module lifetime)
_tmpfile.write(b"\0" * 65536)
_tmpfile.flush()


def make_fd(kind: str, size: int = 0) -> int:
    if kind == "memfd":
        fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "devnull":
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    if kind == "dir":
        return os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if kind == "rofile":  # a big enough regular file that can't be mapped writable
        return os.open(_tmpfile.name, os.O_RDONLY | os.O_CLOEXEC)
    if kind == "socket":
        s1, s2 = socket.socketpair()
        s2.close()
        return s1.detach()
    raise ValueError(kind)


FD_KINDS = ("memfd", "eventfd", "pipe", "devnull", "dir", "rofile", "socket")
fd_spec = st.one_of(
    st.tuples(st.just("memfd"), st.sampled_from([0, 4096, 1 << 16, 1 << 20, 1 << 24, 1 << 36])),
    st.tuples(st.sampled_from(FD_KINDS[1:]), st.just(0)),
)

# ------------------------------------------------------------------------------------------
# message strategies: each draws (class label, request, payload, fd specs, flags or None)

interesting_u64 = st.one_of(
    st.sampled_from([0, 1, 0xFFF, 0x1000, 0x1001, 1 << 20, 1 << 32, 1 << 63, U64_MAX - 0xFFF, U64_MAX]),
    st.integers(0, U64_MAX),
)
interesting_u32 = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 255, 256, 257, 1 << 15, 0xFFFF, 1 << 16, 0xFFFFFFFF]),
                            st.integers(0, 0xFFFFFFFF))


def region_values():
    # a few values per field, so overlaps, exact fits and wrap-arounds come up often
    return st.fixed_dictionaries({
        "gpa": st.one_of(st.sampled_from([0, 0x1000, 1 << 20, 1 << 32, U64_MAX - 0xFFF]), interesting_u64),
        "size": st.one_of(st.sampled_from([0, 1, 0x1000, 1 << 16, 1 << 20, 1 << 24, 1 << 63, U64_MAX]),
                          interesting_u64),
        "uaddr": st.one_of(st.sampled_from([0, 0x1000, 0x7F00_0000_0000, U64_MAX - 0xFFF]), interesting_u64),
        "mmap_offset": st.one_of(st.sampled_from([0, 0, 1, 0x1000, 1 << 20, U64_MAX]), interesting_u64),
    })


@st.composite
def mem_table_msg(draw):
    regs = draw(st.lists(region_values(), min_size=0, max_size=10))
    # the fds: usually one per region, each a memfd that fits, is short, or is something else
    nfd = draw(st.sampled_from([len(regs)] * 4 + [0, max(len(regs) - 1, 0), len(regs) + 1, 9]))
    fds = []
    for i in range(nfd):
        if i < len(regs) and draw(st.booleans()):
            need = regs[i]["size"] + regs[i]["mmap_offset"]
            need = need if need < (1 << 36) else 4096
            fds.append(("memfd", draw(st.sampled_from([need, max(need - 1, 0), need // 2]))))
        else:
            fds.append(draw(fd_spec))
    n_claim = draw(st.sampled_from([len(regs)] * 4 + [0, len(regs) + 1, 9, 0xFFFFFFFF]))
    rec = np.zeros(len(regs), P.MEM_REGION)
    for i, r in enumerate(regs):
        rec[i] = (r["gpa"], r["size"], r["uaddr"], r["mmap_offset"])
    payload = struct.pack("<II", n_claim, 0) + rec.tobytes()
    label = "mem_table:" + ("empty" if not regs else "too_many" if len(regs) > 8 else "regions")
    if n_claim != len(regs):
        label = "mem_table:bad_count"
    elif nfd != len(regs):
        label = "mem_table:fd_mismatch"
    return label, Req.SET_MEM_TABLE, payload, fds, None


@st.composite
def single_region_msg(draw):
    req = draw(st.sampled_from([Req.ADD_MEM_REG, Req.REM_MEM_REG]))
    r = draw(region_values())
    payload = struct.pack("<QQQQQ", 0, r["gpa"], r["size"], r["uaddr"], r["mmap_offset"])
    fds = draw(st.lists(fd_spec, min_size=0, max_size=2))
    if fds and fds[0][0] == "memfd" and draw(st.booleans()) and r["size"] + r["mmap_offset"] < (1 << 36):
        fds[0] = ("memfd", r["size"] + r["mmap_offset"])
    return f"{req.name.lower()}", req, payload, fds, None


def ring_index():
    return st.one_of(st.sampled_from([0, 1, 0, 1, 2, 3, 255, 256, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))


@st.composite
def vring_state_msg(draw):
    req = draw(st.sampled_from([Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE, Req.SET_VRING_ENABLE,
                                Req.SET_VRING_ENDIAN, Req.VRING_KICK]))
    idx = draw(st.one_of(st.sampled_from([0, 1]), ring_index()))
    num = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 100, 256, 1000, 1024, 32768, 65535, 65536, 0xFFFFFFFF]),
                         interesting_u32))
    label = f"{req.name.lower()}:" + ("index_ok" if idx < 2 else "index_out_of_range")
    return label, req, struct.pack("<II", idx, num), [], None


@st.composite
def vring_addr_msg(draw, uaddr: int, mem_size: int):
    idx = draw(st.one_of(st.sampled_from([0, 1]), ring_index()))

    def addr():
        return draw(st.one_of(
            st.integers(0, mem_size // 4096 - 1).map(lambda k: uaddr + 4096 * k),  # inside, aligned
            st.integers(0, mem_size - 1).map(lambda k: uaddr + k),  # inside, maybe misaligned
            st.sampled_from([uaddr + mem_size - 8, uaddr + mem_size, uaddr - 4096, 0, U64_MAX - 15]),
            interesting_u64,
        ))

    flags = draw(st.sampled_from([0, 1, 0xFFFFFFFF]))
    payload = struct.pack("<IIQQQQ", idx, flags, addr(), addr(), addr(), draw(interesting_u64))
    return "set_vring_addr", Req.SET_VRING_ADDR, payload, [], None


@st.composite
def vring_fd_msg(draw):
    req = draw(st.sampled_from([Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR]))
    val = draw(st.one_of(st.sampled_from([0, 1, 2, 0x100, 0x101, 0xFF, 0x1FF]), interesting_u64))
    fds = draw(st.lists(st.one_of(st.just(("eventfd", 0)), fd_spec), min_size=0, max_size=2))
    kind = ("nofd_flag" if val & 0x100 else "no_fd" if not fds
            else "eventfd" if fds[0][0] == "eventfd" else "other_fd")
    return f"{req.name.lower()}:{kind}", req, struct.pack("<Q", val), fds, None


@st.composite
def u64_msg(draw):
    req = draw(st.sampled_from([Req.SET_FEATURES, Req.SET_PROTOCOL_FEATURES, Req.SET_STATUS, Req.SEND_RARP,
                                Req.NET_SET_MTU, Req.CLOSE_CRYPTO_SESSION]))
    if req == Req.SET_FEATURES and draw(st.booleans()):
        # what a front-end may really ask for: subsets of what vring offers (split or packed rings)
        from devices.net import NET_FEATURES

        offered = int(NET_FEATURES | F.RING_PACKED | F.IN_ORDER)
        value = draw(st.integers(0, U64_MAX)) & offered
        return "set_features:offered_subset", req, struct.pack("<Q", value), [], None
    return req.name.lower(), req, struct.pack("<Q", draw(interesting_u64)), [], None


@st.composite
def config_msg(draw):
    req = draw(st.sampled_from([Req.GET_CONFIG, Req.SET_CONFIG]))
    off, size = draw(interesting_u32), draw(st.sampled_from([0, 1, 6, 8, 12, 256, 257, 4096]))
    body = draw(st.binary(max_size=64)) if draw(st.booleans()) else bytes(min(size, 300))
    return req.name.lower(), req, struct.pack("<III", off, size, draw(interesting_u32)) + body, [], None


@st.composite
def any_request_msg(draw):
    """Any request number (known or not), a payload of the right size or not, random fds."""
    req = draw(st.one_of(st.sampled_from(list(Req)), st.integers(0, 0xFFFFFFFF),
                         st.sampled_from([0, 44, 77, 0x7FFFFFFF])))
    known = int(req) in {int(r) for r in Req}
    spec = P.REQUESTS[Req(req)] if known else None
    size = None
    if spec is not None and isinstance(spec.payload, np.dtype):
        size = spec.payload.itemsize
    if size is not None and draw(st.booleans()):
        payload = draw(st.binary(min_size=size, max_size=size))
    else:
        payload = draw(st.binary(max_size=80))
    fds = draw(st.lists(fd_spec, min_size=0, max_size=3))
    name = Req(req).name.lower() if known else "unknown_request"
    return f"any:{name}", int(req), payload, fds, None


@st.composite
def too_many_fds_msg(draw):
    req = draw(st.sampled_from([Req.SET_MEM_TABLE, Req.SET_VRING_CALL, Req.SET_OWNER, Req.GET_FEATURES]))
    n = draw(st.integers(9, 16))
    return "too_many_fds", req, struct.pack("<Q", 0), [("eventfd", 0)] * n, None


@st.composite
def bad_flags_msg(draw):
    req = draw(st.sampled_from([Req.GET_FEATURES, Req.SET_OWNER, Req.GET_PROTOCOL_FEATURES, Req.SET_FEATURES]))
    flags = draw(st.one_of(st.sampled_from([0, 2, 3, 0x5, 0x9, 0xD, 0xFFFFFFFF, 0x1 | 0x100]),
                           st.integers(0, 0xFFFFFFFF)))
    payload = struct.pack("<Q", 0) if req == Req.SET_FEATURES else b""
    label = "flags:bad_version" if flags & 3 != 1 else "flags:odd_bits"
    return label, req, payload, [], flags


def hostile_message(uaddr: int, mem_size: int):
    return st.one_of(mem_table_msg(), mem_table_msg(), single_region_msg(), vring_state_msg(),
                     vring_addr_msg(uaddr, mem_size), vring_fd_msg(), u64_msg(), config_msg(), any_request_msg(),
                     too_many_fds_msg(), bad_flags_msg())


# ------------------------------------------------------------------------------------------
# wire helpers


def read_msg(sock: socket.socket, timeout: float) -> tuple[int, int, bytes] | str:
    """One message from vring, "closed", or "timeout"."""
    buf = b""
    deadline = time.monotonic() + timeout
    need = P.HEADER_SIZE
    while True:
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                return "timeout"
            try:
                c = sock.recv(need - len(buf))
            except (ConnectionError, OSError):
                return "closed"
            if not c:
                return "closed"
            buf += c
        if need == P.HEADER_SIZE:
            req, flags, size = P.decode_header(buf)
            need += size
            if size:
                continue
        req, flags, size = P.decode_header(buf[: P.HEADER_SIZE])
        return req, flags, buf[P.HEADER_SIZE :]


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> bool:
    try:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.sendall(data)
        return True
    except OSError:
        return False  # vring closed the connection already: fine


def message_bytes(req: int, payload: bytes, flags: int) -> bytes:
    return struct.pack("<III", req & 0xFFFFFFFF, flags & 0xFFFFFFFF, len(payload)) + payload


def sync(sock: socket.socket) -> str:
    """Ask GET_FEATURES and read until its reply: "alive" or "closed" (never "timeout")."""
    if not send_raw(sock, message_bytes(Req.GET_FEATURES, b"", P.VERSION), []):
        return "closed"
    while True:
        m = read_msg(sock, 8.0)
        if m == "closed":
            return "closed"
        assert m != "timeout", "vring neither answered nor closed the connection"
        req, flags, _ = m
        assert flags & P.FLAG_REPLY, m
        if req == Req.GET_FEATURES:
            return "alive"


# ------------------------------------------------------------------------------------------
# the fuzz test


def prepare(fe: Frontend, level: int) -> None:
    """0: nothing; 1: SET_OWNER + protocol features (REPLY_ACK); 2: complete set-up, rings running."""
    fe.connect()
    if level == 1:
        fe.send(Req.SET_OWNER)
        pf = fe.u64(Req.GET_PROTOCOL_FEATURES)
        fe.send(Req.SET_PROTOCOL_FEATURES, P.u64(pf & (PF.REPLY_ACK | PF.MQ | PF.CONFIGURE_MEM_SLOTS)))
        fe.protocol_features = pf
    elif level == 2:
        fe.setup()
        fe.post_rx()


FE_QUEUE = 64
_probe = Frontend("/nonexistent", queue_size=FE_QUEUE)  # only for the size of its memory
FE_MEM_SIZE = _probe.mem_size
_probe.close()


@st.composite
def scenario(draw):
    level = draw(st.sampled_from([0, 1, 2]))
    # ring addresses are drawn relative to a fixed fake uaddr, rebased onto the real one later
    msgs = draw(st.lists(hostile_message(1 << 40, FE_MEM_SIZE), min_size=1, max_size=6))
    need_reply = draw(st.lists(st.booleans(), min_size=len(msgs), max_size=len(msgs)))
    truncate = draw(st.sampled_from([None] * 6 + ["header", "payload", "oversized"]))
    return level, msgs, need_reply, truncate


def rebase(payload: bytes, req: int, uaddr: int) -> bytes:
    if req != Req.SET_VRING_ADDR or len(payload) != 40:
        return payload
    idx, flags, *addrs = struct.unpack("<IIQQQQ", payload)
    fake = 1 << 40
    addrs = [(a - fake + uaddr) & U64_MAX if fake - 8192 <= a < 2 * fake else a for a in addrs[:3]] + addrs[3:]
    return struct.pack("<IIQQQQ", idx, flags, *addrs)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False,
          print_blob=True)
@given(sc=scenario())
def test_fuzz_every_request(rig, sc):
    level, msgs, need_reply, truncate = sc
    fe = Frontend(rig.bad_path, queue_size=FE_QUEUE)
    try:
        prepare(fe, level)
        sock = fe.sock
        CLASSES[f"level{level}"] += 1
        for (label, req, payload, fd_specs, flags), nr in zip(msgs, need_reply, strict=True):
            CLASSES[label] += 1
            payload = rebase(payload, req, fe.uaddr)
            if flags is None:
                flags = P.VERSION | (P.FLAG_NEED_REPLY if nr else 0)
            fds = [make_fd(k, s) for k, s in fd_specs]
            try:
                ok = send_raw(sock, message_bytes(req, payload, flags), fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if not ok:
                break
            # drain whatever vring answers (reply, REPLY_ACK) without predicting it
            while select.select([sock], [], [], 0.0)[0]:
                if read_msg(sock, 1.0) in ("closed", "timeout"):
                    break
        if truncate:
            CLASSES[f"truncated:{truncate}"] += 1
            if truncate == "header":
                send_raw(sock, message_bytes(Req.GET_FEATURES, b"", 1)[:7], [])
            elif truncate == "payload":
                send_raw(sock, struct.pack("<III", Req.SET_FEATURES, 1, 8) + b"\1\2\3", [make_fd("eventfd")])
            else:
                send_raw(sock, struct.pack("<III", Req.SET_MEM_TABLE, 1, 1 << 20) + bytes(100), [])
                m = read_msg(sock, 8.0)
                while isinstance(m, tuple):  # answers to earlier messages
                    m = read_msg(sock, 8.0)
                assert m == "closed", "oversized message did not close the connection"
        else:
            sync(sock)
    finally:
        fe.close()
    rig.alive()
    rig.traffic()
    rig.wait_baseline()


# ------------------------------------------------------------------------------------------
# targeted cases (each would hang, crash or leak without its fix / check)


def test_call_eventfd_at_max_counter_does_not_block_the_data_plane(rig):
    """A blocking call eventfd whose counter the front-end filled: a blocking write() would stop
    the data plane for every port and then the control plane (waiting for the pause)."""
    fe = Frontend(rig.bad_path, queue_size=FE_QUEUE)
    efd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
    try:
        prepare(fe, 2)
        os.eventfd_write(efd, U64_MAX - 1)
        assert fe.ack(Req.SET_VRING_CALL, P.u64(0), (efd,)) == 0
        fe.send_frames([frame(i) for i in range(8)])  # loopback: RX used -> call
        time.sleep(0.3)
        rig.traffic()
        assert fe.ack(Req.SET_VRING_ENABLE, P.record(P.VRING_STATE, index=0, num=1)) == 0
    finally:
        os.close(efd)
        fe.close()
    rig.traffic()
    rig.wait_baseline()


@pytest.mark.parametrize("kind", ["memfd", "pipe", "devnull", "socket"])
def test_kick_and_call_fds_must_be_eventfds(rig, kind):
    fe = Frontend(rig.bad_path, queue_size=FE_QUEUE)
    try:
        prepare(fe, 1)
        for req in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            fd = make_fd(kind, 4096)
            try:
                assert fe.ack(req, P.u64(0), (fd,)) == 1
            finally:
                os.close(fd)
    finally:
        fe.close()
    rig.traffic()
    rig.wait_baseline()
    assert "is not an eventfd" in rig.v.log_text()


def test_region_fd_shorter_than_region_is_refused_not_sigbus(rig):
    fe = Frontend(rig.bad_path, queue_size=FE_QUEUE)
    try:
        prepare(fe, 1)
        short = make_fd("memfd", fe.mem_size // 2)
        try:
            reg = P.record(P.MEM_REGION, gpa=0, size=fe.mem_size, uaddr=fe.uaddr, mmap_offset=0)
            assert fe.ack(Req.SET_MEM_TABLE, P.mem_table(reg), (short,)) == 1
            reg = P.record(P.MEM_REGION, gpa=0, size=fe.mem_size // 2, uaddr=fe.uaddr, mmap_offset=4096)
            assert fe.ack(Req.SET_MEM_TABLE, P.mem_table(reg), (short,)) == 1
        finally:
            os.close(short)
    finally:
        fe.close()
    rig.traffic()
    rig.wait_baseline()


def test_dripping_front_end_holds_the_control_plane_at_most_msg_timeout(rig):
    """A front-end sending one byte of a message now and then: the connection is dropped after
    MSG_TIMEOUT_S in total, not MSG_TIMEOUT_S per byte; port B's traffic never stops."""
    from vring.session import MSG_TIMEOUT_S

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(rig.bad_path)
    msg = message_bytes(Req.SET_FEATURES, struct.pack("<Q", 0), P.VERSION)
    t0 = time.monotonic()
    closed_at = None
    try:
        for i in range(len(msg) - 1):
            try:
                s.send(msg[i : i + 1])
            except OSError:
                closed_at = time.monotonic()
                break
            if select.select([s], [], [], 1.0)[0] and s.recv(1) == b"":
                closed_at = time.monotonic()
                break
        rig.traffic()  # the data plane kept going meanwhile
    finally:
        s.close()
    assert closed_at is not None and closed_at - t0 < 2 * MSG_TIMEOUT_S + 2, closed_at and closed_at - t0
    rig.wait_baseline()
    rig.traffic()
