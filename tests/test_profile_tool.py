"""bench/perf_profile.py's reading of perf samples in numba's code: each sample goes on the instruction
before the sampled address (a timer sample lands after the instruction the core waited on), and
instructions are sorted into kinds. The code bytes are real x86-64, decoded by objdump."""
from __future__ import annotations

import collections

import pytest
from conftest import bench_script

# lock orl $0x0,-0x40(%rsp); xor %ebx,%ebx; movzwl 0xe(%rax,%rcx,1),%ecx; test %cx,%cx; rdtsc; shl $0x20,%rdx
CODE = bytes.fromhex("f0834c24c000" "31db" "0fb74c080e" "6685c9" "0f31" "48c1e220")
BASE = 0x7F00_0000_1000


@pytest.fixture(scope="module")
def profile():
    return bench_script("perf_profile")


@pytest.mark.parametrize(("insn", "expected"), [
    ("lock orl $0x0,-0x40(%rsp)", "fence (lock-prefixed)"),
    ("rdtsc", "clock read (rdtsc)"),
    ("div    %esi", "division"),
    ("prefetchw 0x3f(%rax)", "prefetch"),
    ("movzwl 0xe(%rax,%rcx,1),%ecx", "16-bit load (descriptor flags, ring index)"),
    ("mov    0x548(%rsp),%r15", "other load"),
    ("mov    %rsi,0xf8(%rcx)", "other"),  # a store
    ("shl    $0x20,%rdx", "other"),
])
def test_kinds(profile, insn, expected):
    assert profile.kind(insn) == expected


def test_samples_go_on_the_instruction_before(profile, tmp_path):
    blob = tmp_path / "code.bin"
    blob.write_bytes(CODE)
    insns = profile.disassemble(str(blob), BASE)
    assert [a - BASE for a, _ in insns] == [0, 6, 8, 13, 16, 18]
    assert insns[0][1].startswith("lock orl") and insns[4][1] == "rdtsc"
    samples = collections.Counter({BASE + 6: 6, BASE + 13: 2, BASE + 18: 1, BASE + 3: 1})  # +3: inside the fence
    r = profile.attribute(samples, insns)
    assert r["samples"] == 10 and r["unplaced"] == 0.1
    assert r["kinds"] == {"fence (lock-prefixed)": 0.6, "16-bit load (descriptor flags, ring index)": 0.2,
                          "clock read (rdtsc)": 0.1}
    assert [h["addr"] for h in r["hot"]] == [f"{BASE:#x}", f"{BASE + 8:#x}", f"{BASE + 16:#x}"]
    assert r["hot"][0]["share"] == 0.6 and r["hot"][0]["kind"] == "fence (lock-prefixed)"


def test_perf_names_for_code_without_a_file(profile):
    assert profile.is_jit("[JIT] tid 25263") and profile.is_jit("/tmp/perf-25084.map")
    assert not profile.is_jit("/usr/lib/x86_64-linux-gnu/libc.so.6") and not profile.is_jit("[kernel.kallsyms]")


def test_its_options_are_enough_for_e2e_runner(profile):
    """perf_profile starts its peers with e2e's Runner, which reads some of its options."""
    args = profile.runner_args(profile.parser().parse_args(["--dir", "xconnect", "--vring-args", "--hold-us 0"]))
    argv = profile.Runner(args, "/tmp").vring_argv(args.dir, args.burst, args.size, "/tmp/p.sock", args.variant)
    assert argv[-2:] == ["--hold-us", "0"] and argv.count("--socket") == 2
    # every e2e option is there (e2e's default unless perf_profile has its own), warm-up none
    assert set(vars(profile.e2e_parser().parse_args([]))) <= set(vars(args))
    assert (args.warmup, args.rate, args.dpdk_cycles, args.fe_bursts, args.be_cpu) == (0.0, 0.0, False, False, 1)
