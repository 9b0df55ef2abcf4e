"""`deploy --image` to the SageMaker emulator, the endpoint served by the image itself through podman."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from tests.conftest import run_cli
from tests.containers.conftest import TEST_BASE


def _deploy(emulator, model: Path, name: str, *extra: str):
    return run_cli(
        "deploy", str(model), "--provider", "sagemaker", "--name", name, "--instance", "ml.g5.xlarge", "--runtime", "handler",
        "--bucket", f"{emulator.bucket}/models", "--role", emulator.role, *extra, timeout=900,
    )  # fmt: skip


def test_deploy_image_build_serves_the_endpoint_from_the_container(serving_image, registry, sagemaker_emulator, tiny_gpt2, monkeypatch) -> None:
    monkeypatch.setenv("CLOUDLLM_BUILD_BASE", TEST_BASE)
    dry = _deploy(sagemaker_emulator, tiny_gpt2, "sm-image", "--image", "build", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"image: {serving_image.image} FROM {TEST_BASE}" in dry.stdout + dry.stderr

    deployed = _deploy(sagemaker_emulator, tiny_gpt2, "sm-image", "--image", "build", "--json")
    assert deployed.returncode == 0, deployed.stderr
    model_name = boto3.client("sagemaker").describe_endpoint_config(
        EndpointConfigName=boto3.client("sagemaker").describe_endpoint(EndpointName="sm-image")["EndpointConfigName"]
    )["ProductionVariants"][0]["ModelName"]
    image = boto3.client("sagemaker").describe_model(ModelName=model_name)["PrimaryContainer"]["Image"]
    assert image.startswith("123456789012.dkr.ecr.us-east-1.amazonaws.com/cloudllm-serve@sha256:")

    answer = run_cli("invoke", "sm-image", "Once upon a time", "--max-new-tokens", "3", "--raw")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)[0]["generated_text"].strip()
    # The container's log (CloudWatch) shows the SageMaker contract: the model read from /opt/ml/model.
    logs = run_cli("logs", "sm-image")
    assert '"model_dir": "/opt/ml/model"' in logs.stdout
    assert run_cli("delete", "sm-image").returncode == 0


def test_deploy_with_an_image_the_registry_does_not_have_fails_and_records_nothing(serving_image, registry, sagemaker_emulator, tiny_gpt2) -> None:
    from cloudllm.images.registry import RegistryLogin, copy_image

    repository = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cloudllm-serve"
    copy_image(serving_image.image_id, f"{repository}:{serving_image.image.split(':')[1]}", RegistryLogin("", "AWS", "-"))
    missing = f"{repository}:never-pushed"  # the repository is there, this tag is not
    result = _deploy(sagemaker_emulator, tiny_gpt2, "sm-noimage", "--image", missing)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: endpoint sm-noimage failed: CannotPullContainerError: " + missing), last
    assert "cleaned up" in result.stderr
    assert "sm-noimage" not in run_cli("list").stdout
