"""The hidden wake as a user meets it: `cloudllm invoke` in a subprocess against an endpoint that its idle
clock scaled to zero, on the offline SageMaker (inference components) and the Vertex AI fake (scale-to-zero
spec). The answer lands on stdout, the progress line on stderr, exit 0; with a --wake-timeout too short
for the wake, one error line naming --wake-timeout and a non-zero exit, no traceback.

The API-level wake is tested in tests/providers/test_sagemaker_components.py and test_vertex_tenancy.py."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from cloudllm import api
from cloudllm.providers.sagemaker import components as comp
from cloudllm.testing import eventually
from cloudllm_emulators.sagemaker import ROLE_ARN
from cloudllm_emulators.sagemaker_components import ComponentBackend
from tests.conftest import run_cli



def _woken(result, name: str) -> str:
    """Exit 0, the answer alone on stdout, and the wait shown on stderr: what a person or a script sees."""
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert f"waking {name} from zero..." in lines, result.stderr
    assert any(line.startswith(f"waking {name} from zero: done in") for line in lines), result.stderr
    assert result.stdout.strip() and "waking" not in result.stdout
    return result.stdout


def _too_short(result, name: str) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert errors[0].startswith(f"error: endpoint {name} did not wake from zero within 1s") and "--wake-timeout" in errors[0]
    assert not result.stdout.strip()
    return errors[0]


# --- SageMaker: an inference component at zero copies, woken by the NoCapacityInvocationFailures alarm ------------
@pytest.fixture(scope="module")
def sagemaker_zero(sagemaker_emulator, tiny_gpt2: Path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ComponentBackend, "wake_seconds", 2.0)  # a real wake provisions an instance: minutes
        result = api.deploy(
            tiny_gpt2, provider="sagemaker", name="wake-cli", instance="ml.m5.xlarge", runtime="handler",
            min_instances=0, max_instances=1, bucket=f"{sagemaker_emulator.bucket}/models", options={"role": ROLE_ARN},
        )  # fmt: skip
        assert result.endpoint.state == "InService"
        yield patch, "wake-cli", comp.model_component("wake-cli", tiny_gpt2.name.lower())
        api.delete("wake-cli", provider="sagemaker")


def _sagemaker_idles_to_zero(patch: pytest.MonkeyPatch, component: str) -> None:
    """The emulator's target tracking scales an idle component in to its MinCapacity, 0, as SageMaker's does after 15 minutes."""
    sm = boto3.client("sagemaker")
    patch.setattr(ComponentBackend, "idle_seconds", 0.5)
    try:
        eventually(lambda: sm.describe_inference_component(InferenceComponentName=component)["RuntimeConfig"]["CurrentCopyCount"] == 0,
                   what=f"{component} scaled in to zero copies")  # fmt: skip
    finally:
        patch.setattr(ComponentBackend, "idle_seconds", 900.0)  # the woken copy must not be scaled in again under the test


def test_invoke_on_sagemaker_waits_through_the_wake_and_answers(sagemaker_zero) -> None:
    patch, name, component = sagemaker_zero
    _sagemaker_idles_to_zero(patch, component)
    result = run_cli("invoke", name, "Hello", "--provider", "sagemaker", "--max-new-tokens", "4", "--param", "do_sample=false", "--wake-timeout", "300")
    _woken(result, name)
    assert boto3.client("sagemaker").describe_inference_component(InferenceComponentName=component)["RuntimeConfig"]["CurrentCopyCount"] == 1


def test_invoke_on_sagemaker_with_too_short_a_wake_timeout_is_one_line(sagemaker_zero) -> None:
    patch, name, component = sagemaker_zero
    _sagemaker_idles_to_zero(patch, component)
    patch.setattr(ComponentBackend, "wake_seconds", 600.0)
    result = run_cli("invoke", name, "Hello", "--provider", "sagemaker", "--wake-timeout", "1")
    _too_short(result, name)


# --- Vertex AI: a deployed model with a scale-to-zero spec, woken by the first request's 429 ----------------------
@pytest.fixture(scope="module")
def vertex_zero(vertex_emulator, tiny_gpt2: Path):
    result = api.deploy(
        tiny_gpt2, provider="vertex", name="wake-cli-vx", instance="n1-standard-4", runtime="handler",
        min_instances=0, max_instances=1, bucket=vertex_emulator.bucket,
    )  # fmt: skip
    assert result.endpoint.state == "InService"
    yield vertex_emulator.tenancy, "wake-cli-vx"
    api.delete("wake-cli-vx", provider="vertex")


def _vertex_idles_to_zero(tenancy) -> None:
    tenancy.idle_seconds = 0.5
    try:
        eventually(lambda: tenancy.zero_specs and all(tenancy.asleep(d) for d in tenancy.zero_specs), what="wake-cli-vx scaled to zero")
    finally:
        tenancy.idle_seconds = None


def test_invoke_on_vertex_waits_through_the_429s_and_answers(vertex_zero) -> None:
    tenancy, name = vertex_zero
    _vertex_idles_to_zero(tenancy)
    tenancy.wake_seconds = 2.0
    woken_before = tenancy.wakes
    result = run_cli("invoke", name, "Hello", "--provider", "vertex", "--max-new-tokens", "4", "--param", "do_sample=false", "--wake-timeout", "300")
    _woken(result, name)
    assert tenancy.wakes > woken_before and not any(tenancy.asleep(d) for d in tenancy.zero_specs)


def test_invoke_on_vertex_with_too_short_a_wake_timeout_is_one_line(vertex_zero) -> None:
    tenancy, name = vertex_zero
    _vertex_idles_to_zero(tenancy)
    tenancy.wake_seconds = 600.0
    try:
        result = run_cli("invoke", name, "Hello", "--provider", "vertex", "--wake-timeout", "1")
    finally:
        tenancy.wake_seconds = 0.2
    _too_short(result, name)
