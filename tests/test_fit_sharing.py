"""Several models on one endpoint must fit its instances together (cloudllm/fit/sharing.py): placement of
every component's reservation, cost per model, and the plan's refusal through the real CLI against the
offline SageMaker, whose own placement check (ResourceLimitExceeded) agrees."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from cloudllm import api
from cloudllm.catalog import lookup
from cloudllm.fit.sharing import ComponentReservation, fit_together
from cloudllm.providers.sagemaker import components as comp
from cloudllm_emulators.sagemaker import ROLE_ARN
from tests.conftest import run_cli

G5 = lookup("sagemaker", "ml.g5.xlarge")  # 1 A10G, 16 GiB, 4 vCPUs
G5_12 = lookup("sagemaker", "ml.g5.12xlarge")  # 4 A10G


def _gpu_model(name: str, copies: int = 1, *, planned: bool = False, gpus: float = 1, memory_mb: int = 4096) -> ComponentReservation:
    return ComponentReservation(component=f"ep-{name}", model=name, copies=copies, accelerators=gpus, memory_mb=memory_mb, planned=planned)


def test_two_one_gpu_models_do_not_fit_one_single_gpu_instance() -> None:
    shared = fit_together(G5, 1, [_gpu_model("base"), _gpu_model("embed", planned=True)], endpoint="ep")
    assert not shared.fits and shared.instances_needed == 2
    assert "2 copies need 2 GPUs, 8,192 MiB" in shared.summary and "1 x ml.g5.xlarge (1 GPU, 16,384 MiB, 4 vCPUs each)" in shared.summary
    assert "--max-instances 2" in shared.fix and "bigger --instance" in shared.fix and "fewer copies" in shared.fix
    assert "cloudllm delete ep" in shared.fix  # an existing endpoint's instance type and maximum are fixed at creation


def test_they_fit_with_more_instances_or_a_bigger_one_and_each_model_is_costed() -> None:
    on_two = fit_together(G5, 2, [_gpu_model("base"), _gpu_model("embed", planned=True)], endpoint="ep")
    assert on_two.fits and on_two.instances_needed == 2 and on_two.fix is None
    on_big = fit_together(G5_12, 1, [_gpu_model("base", 2), _gpu_model("embed", planned=True)], endpoint="ep")
    assert on_big.fits and on_big.instances_needed == 1
    base, embed = on_big.components
    # Cost per model: copies x the dominant share of one instance x its price (GPUs dominate here: 2/4 and 1/4).
    assert base.per_hour == round(G5_12.price_per_hour * 2 * 0.25, 2) and embed.per_hour == round(G5_12.price_per_hour * 0.25, 2)
    assert "base (deployed): 2 copies x (1 GPU, 4,096 MiB)" in on_big.lines()[1]


def test_host_memory_and_cpu_cores_count_too() -> None:
    cpu = lookup("sagemaker", "ml.m5.xlarge")  # 4 vCPUs, 16 GiB
    heavy = ComponentReservation(component="ep-a", model="a", copies=3, memory_mb=6000, cpu_cores=1, planned=True)
    shared = fit_together(cpu, 1, [heavy], endpoint="ep")
    assert not shared.fits and shared.instances_needed == 2  # two 6,000 MiB copies per 16,384 MiB instance
    assert "--min-instances 2" in shared.fix and "--max-instances 2" in shared.fix
    cores = ComponentReservation(component="ep-b", model="b", copies=1, memory_mb=1024, cpu_cores=8, planned=True)
    too_big = fit_together(cpu, 4, [cores], endpoint="ep")
    assert not too_big.fits and too_big.instances_needed is None
    assert "one copy of b needs 1,024 MiB, 8 CPU cores, more than one ml.m5.xlarge has" in too_big.summary
    assert "bigger --instance" in too_big.fix


# --- through the CLI, against the offline SageMaker -----------------------------------------------------
@pytest.fixture(scope="module")
def shared_endpoint(sagemaker_emulator, tiny_gpt2: Path) -> str:
    """One model as an inference component on one ml.g5.xlarge (1 GPU, MaxInstanceCount 1)."""
    result = api.deploy(
        tiny_gpt2, provider="sagemaker", name="fit-shared", instance="ml.g5.xlarge", runtime="handler",
        min_instances=0, max_instances=1, bucket=f"{sagemaker_emulator.bucket}/models", options={"role": ROLE_ARN},
    )  # fmt: skip
    assert result.endpoint.state == "InService"
    return "fit-shared"


def _add_model_args(emulator, model: Path, verb: str, *extra: str) -> list[str]:
    return [
        verb, str(model), "--provider", "sagemaker", "--name", "fit-shared", "--add-model", "second", "--instance", "ml.g5.xlarge",
        "--runtime", "handler", "--bucket", f"{emulator.bucket}/models", "--role", ROLE_ARN, *extra,
    ]  # fmt: skip


def _one_error_line(result, contains: str) -> str:
    """Refused: a non-zero exit, one error line last on stderr (deploy's progress lines come before it), no traceback."""
    assert result.returncode != 0, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr and contains in errors[0], errors[0]
    return errors[0]


def test_plan_with_one_model_shows_its_reservation_and_cost(sagemaker_emulator, shared_endpoint: str, tiny_gpt2: Path) -> None:
    result = run_cli("plan", str(tiny_gpt2), "--provider", "sagemaker", "--name", shared_endpoint, "--instance", "ml.g5.xlarge",
                     "--runtime", "handler", "--min-instances", "0", "--max-instances", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    sharing = json.loads(result.stdout)["sharing"]
    assert sharing["fits"] and sharing["max_instances"] == 1 and sharing["accelerators_per_instance"] == 1
    (own,) = sharing["components"]
    assert own["component"] == comp.model_component(shared_endpoint, tiny_gpt2.name.lower()) and own["accelerators"] == 1
    assert own["per_hour"] == round(G5.price_per_hour * max(1 / 1, own["memory_mb"] / 16384), 2)


def test_add_model_onto_a_full_endpoint_is_refused_at_plan_time(sagemaker_emulator, shared_endpoint: str, tiny_gpt2: Path) -> None:
    sm = boto3.client("sagemaker")
    before = [c["InferenceComponentName"] for c in sm.list_inference_components(EndpointNameEquals=shared_endpoint)["InferenceComponents"]]
    for verb in ("plan", "deploy"):
        result = run_cli(*_add_model_args(sagemaker_emulator, tiny_gpt2, verb))
        line = _one_error_line(result, "do not fit together")
        assert "2 copies need 2 GPUs" in line and "1 x ml.g5.xlarge (1 GPU" in line
        assert "--max-instances 2" in line and "bigger --instance" in line and "fewer copies" in line
    after = [c["InferenceComponentName"] for c in sm.list_inference_components(EndpointNameEquals=shared_endpoint)["InferenceComponents"]]
    assert after == before  # nothing created
    # The plan's describe names each component's reservation before it refuses.
    shown = run_cli(*_add_model_args(sagemaker_emulator, tiny_gpt2, "plan"))
    assert "shared:" in shown.stdout and "second: 1 copy x (1 GPU" in shown.stdout and "(deployed)" in shown.stdout


def test_the_emulator_refuses_what_the_plan_refuses(sagemaker_emulator, shared_endpoint: str, tiny_gpt2: Path) -> None:
    """--force skips the plan's check; SageMaker's own placement (the emulator's) then refuses, and the deploy says so in one line."""
    result = run_cli(*_add_model_args(sagemaker_emulator, tiny_gpt2, "deploy", "--force"))
    line = _one_error_line(result, "Insufficient capacity to place 1 copies of inference component fit-shared-second")
    assert "(MaxInstanceCount 1)" in line and "require 2 accelerator devices" in line
    assert "more --max-instances" in line and "quota" not in line  # the fix for placement, not for an account quota
    sm = boto3.client("sagemaker")
    names = [c["InferenceComponentName"] for c in sm.list_inference_components(EndpointNameEquals=shared_endpoint)["InferenceComponents"]]
    assert comp.model_component(shared_endpoint, "second") not in names
    assert not [m["ModelName"] for m in sm.list_models()["Models"] if m["ModelName"].startswith("fit-shared-second")]  # undone
