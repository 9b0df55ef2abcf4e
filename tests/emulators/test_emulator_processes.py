"""The emulators start and stop their servers through cloudllm_procs: a pid they recorded that now runs
another process (the kernel reuses pids) is never signalled, and their own servers do stop."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cloudllm_emulators.containers import LoopbackRegistry
from cloudllm_emulators.sagemaker import HostedModel
from cloudllm_emulators.vertex import _Replica
from cloudllm_procs import start

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def stranger():
    """A process that is not the emulator's: what a recorded pid may run once the server has gone."""
    process = start(SLEEPER, stdout=subprocess.DEVNULL)
    yield process
    process.kill()
    process.wait()


def _hosted(tmp_path: Path) -> HostedModel:
    backend = SimpleNamespace(work_dir=lambda: tmp_path)
    return HostedModel(backend, "ep", {"EndpointConfigName": "cfg", "ProductionVariants": [{"VariantName": "AllTraffic"}]}, lambda _: None)


def _replica(tmp_path: Path) -> _Replica:
    return _Replica(deployed_model_id="1", workdir=tmp_path / "replica", port=1, predict_route="/p", health_route="/h")


def _registry(tmp_path: Path) -> LoopbackRegistry:
    return LoopbackRegistry()


@pytest.mark.parametrize("make", [_hosted, _replica, _registry], ids=["sagemaker", "vertex", "registry"])
def test_a_pid_now_running_another_process_is_never_signalled(make, stranger: subprocess.Popen, tmp_path: Path) -> None:
    server = make(tmp_path)
    server.process = stranger  # the record's pid, reused by the kernel for a process the emulator did not start
    if isinstance(server, _Replica):
        server.send(signal.SIGKILL)  # what the crash fault sends
    server.stop()
    assert stranger.poll() is None


@pytest.mark.parametrize("make", [_hosted, _replica, _registry], ids=["sagemaker", "vertex", "registry"])
def test_their_own_server_is_stopped(make, tmp_path: Path) -> None:
    server = make(tmp_path)
    server.process = start(SLEEPER, stdout=subprocess.DEVNULL, marker=server.marker)  # as each starts its command
    try:
        server.stop()
        assert server.process.wait(timeout=60) == -signal.SIGTERM
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
