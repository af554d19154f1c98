"""``vring compile --only``: the devices named, and only those, go into numba's cache."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from vring.cli import COMPILE_TARGETS, compile_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_only_takes_device_names():
    assert compile_targets("vsock") == ("vsock",)
    assert compile_targets("net,switch") == ("net", "switch")
    for bad in ("", ",", "net,nic", "NET"):
        with pytest.raises(argparse.ArgumentTypeError):
            compile_targets(bad)
    assert set(COMPILE_TARGETS) == {"net", "switch", "vsock"}


def test_compile_only_vsock_compiles_vsock_alone():
    r = subprocess.run([sys.executable, "-m", "vring", "compile", "--only", "vsock"], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    names = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("compile: ") and " s" in ln
             and not ln.startswith("compile: done")]
    assert names == ["vsock"], r.stdout


def test_compile_only_rejects_an_unknown_device():
    r = subprocess.run([sys.executable, "-m", "vring", "compile", "--only", "nic"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "not a device to compile: nic" in r.stderr, r.stderr
