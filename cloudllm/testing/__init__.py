"""cloudllm.testing: a pytest plugin for testing deploy configs offline, plus tiny model builders.

Installed with cloudllm (entry point `pytest11`), so its fixtures are available in
any test suite:

    def test_my_model_answers(cloudllm_home, tiny_gpt2):
        cloudllm.deploy(tiny_gpt2, provider="local", name="t")
        assert cloudllm.invoke("t", "Hello")
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def cloudllm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated CLOUDLLM_HOME; local endpoints started in it are stopped afterwards."""
    home = tmp_path / "cloudllm-home"
    monkeypatch.setenv("CLOUDLLM_HOME", str(home))
    yield home
    _stop_local_endpoints(home)


def _stop_local_endpoints(home: Path) -> None:
    import json
    import signal

    for state_file in (home / "local").glob("*/state.json"):
        try:
            pid = json.loads(state_file.read_text()).get("pid")
            if pid:
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def vertex_emulator():
    """An offline Vertex AI + Cloud Storage on loopback, shared by a test module.

    The module's tests see its environment (STORAGE_EMULATOR_HOST, CLOUDLLM_VERTEX_ENDPOINT,
    GOOGLE_CLOUD_PROJECT), so `--provider vertex` deploys go to it; `vertex_emulator.bucket`
    is an empty gs:// location to deploy to.
    """
    from cloudllm_emulators.vertex import VertexEmulator

    with VertexEmulator() as emulator, pytest.MonkeyPatch.context() as patch:
        for key, value in emulator.env.items():
            patch.setenv(key, value)
        emulator.create_bucket("cloudllm-test")
        emulator.bucket = "gs://cloudllm-test/models"
        yield emulator


@pytest.fixture(scope="module")
def sagemaker_emulator(tmp_path_factory: pytest.TempPathFactory):
    """An offline SageMaker (+ S3, IAM, CloudWatch Logs, Application Auto Scaling) on loopback, shared by a test module.

    The module's tests see its environment (AWS_ENDPOINT_URL, dummy credentials, region, and
    no ~/.aws files or profile), so `--provider sagemaker` deploys and any boto3 client go to it.
    `sagemaker_emulator.bucket` (s3://...) and `.role` (an IAM role ARN) exist.
    """
    from cloudllm_emulators.sagemaker import SageMakerEmulator

    nowhere = tmp_path_factory.mktemp("aws") / "none"
    with SageMakerEmulator() as emulator, pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            patch.delenv(key, raising=False)
        patch.setenv("AWS_CONFIG_FILE", str(nowhere))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        for key, value in emulator.env().items():
            patch.setenv(key, value)
        yield emulator


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 model folder (text-generation), built offline once per session."""
    from cloudllm.testing.tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


def eventually(check, *, what: str = "the condition", within: float = 120.0):
    """Poll check() until it returns something true, and return that; AssertionError after `within` seconds.

    For tests waiting on a condition (a server gone, an endpoint InService): a bound, never a fixed sleep.
    """
    from cloudllm.providers.kit import Backoff, Pending, StillRunning, wait_until

    def poll():
        found = check()
        return found if found else Pending()

    try:
        return wait_until(poll, what=what, deadline=within, backoff=Backoff(first=0.05, floor=0.05, most=0.25))
    except StillRunning:
        raise AssertionError(f"{what} never became true within {within:.0f}s") from None
