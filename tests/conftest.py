"""Shared fixtures: a vring back-end in a child process, a short socket directory, peers."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from peers import PeerGroup, short_tmpdir  # noqa: E402

ROOT = os.path.dirname(HERE)


def bench_script(name: str):
    """A script of bench/ (not a package) loaded as a module, to test its pure functions."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


class VringProcess:
    """``python -m vring ARGS`` in its own process group, its log kept, stopped by PID."""

    def __init__(self, args: list[str], log_path: str, cpus: str | None = None):
        self.args = args
        self.log_path = log_path
        prefix = ["taskset", "-c", cpus] if cpus else []
        self._log = open(log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(prefix + [sys.executable, "-m", "vring", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=ROOT, env=env)

    def log_text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_log(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"vring exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {needle!r} in vring's log:\n{self.log_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            killed = sig == signal.SIGKILL
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                killed = True
        if killed:  # a killed vring cannot remove its control socket: do it, as its operator would
            from vring.control import default_path

            with contextlib.suppress(FileNotFoundError):
                os.unlink(default_path(self.proc.pid))
        self._log.close()
        return self.proc.returncode

    def port_counters(self) -> dict[int, dict[str, int]]:
        """The final counters vring prints per port on exit."""
        out = {}
        for line in self.log_text().splitlines():
            if line.startswith("port ") and "rx_packets=" in line:
                p = int(line.split()[1])
                out[p] = {k: int(v) for k, v in (kv.split("=") for kv in line.split(": ", 1)[1].split())}
        return out


@pytest.fixture
def sockdir():
    d = short_tmpdir("vrt")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def peers():
    with PeerGroup() as g:
        yield g


@pytest.fixture
def vring_proc(sockdir):
    started: list[VringProcess] = []

    def start(*args: str, cpus: str | None = None) -> VringProcess:
        v = VringProcess(list(args), os.path.join(sockdir, f"vring{len(started)}.log"), cpus=cpus)
        started.append(v)
        return v

    yield start
    for v in started:
        v.stop()
