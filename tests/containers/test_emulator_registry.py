"""The emulators start the loopback registry (the ECR / Artifact Registry stand-in) themselves when none is given."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx
import pytest

from tests.conftest import run_cli
from tests.containers.conftest import CLOUDLLM

REGISTRY_ENV = "CLOUDLLM_REGISTRY_ENDPOINT"
EMULATE = {"sagemaker": ["--port", "0"], "vertex": ["--port", "0", "--storage-port", "0"]}


def _emulate(cloud: str, env: dict[str, str]) -> tuple[subprocess.Popen, dict[str, str]]:
    """`cloudllm emulate CLOUD` in the background, and the variables it says to export."""
    process = subprocess.Popen(
        [CLOUDLLM, "emulate", cloud, *EMULATE[cloud]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    exported: dict[str, str] = {}
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("# "):
            return process, exported
        key, _, value = line.removeprefix("export ").strip().partition("=")
        exported[key] = value
    pytest.fail(f"emulate {cloud} exited: {process.stderr.read() if process.stderr else ''}")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def _registry_answers(endpoint: str) -> bool:
    try:
        return httpx.get(f"http://{endpoint}/v2/", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("cloud", sorted(EMULATE))
def test_emulate_starts_a_registry_when_none_is_given_and_stops_it(cloud) -> None:
    env = {key: value for key, value in os.environ.items() if key != REGISTRY_ENV}
    process, exported = _emulate(cloud, env)
    try:
        endpoint = exported[REGISTRY_ENV]
        assert endpoint.startswith("127.0.0.1:")
        assert _registry_answers(endpoint)
    finally:
        _stop(process)
    assert process.returncode == 0
    assert not _registry_answers(endpoint)


def test_emulate_uses_the_registry_it_is_given(registry) -> None:
    process, exported = _emulate("sagemaker", {**os.environ, REGISTRY_ENV: registry.endpoint})
    _stop(process)
    assert REGISTRY_ENV not in exported  # the caller's shell has it already
    assert _registry_answers(registry.endpoint)  # and it was not stopped


def test_the_emulator_fixture_gets_a_registry_that_push_reaches(small_image, monkeypatch) -> None:
    from cloudllm_emulators.sagemaker import SageMakerEmulator

    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    with SageMakerEmulator() as emulator:
        endpoint = emulator.env()[REGISTRY_ENV]
        pushed = run_cli("push", small_image, "--provider", "sagemaker", "--region", "us-east-1", "--json", env=emulator.env())
        assert pushed.returncode == 0, pushed.stderr
        repository = json.loads(pushed.stdout)["uri"].split("/", 1)[1].rsplit(":", 1)[0]
        assert httpx.get(f"http://{endpoint}/v2/{repository}/tags/list").json()["tags"] == [small_image.rsplit(":", 1)[1]]
    assert REGISTRY_ENV not in os.environ
    assert not _registry_answers(endpoint)
