"""The provider contract (cloudllm.testing.contract) run over the built-in providers and a third-party plugin."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloudllm.testing.contract import ProviderContract

ECHO_FIXTURE = Path(__file__).parents[1] / "fixtures" / "echo_provider"


@pytest.fixture(scope="module")
def echo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake plugin package pip-installed into a folder of its own (the venv stays untouched)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "echo_provider"
    shutil.copytree(ECHO_FIXTURE, source)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    return target


class TestEchoPlugin(ProviderContract):
    """A plugin found through its entry point, as users install one."""

    provider = "echo"

    @pytest.fixture(autouse=True)
    def _installed(self, echo_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.syspath_prepend(str(echo_site))  # entry points are read from sys.path at each look-up
        monkeypatch.setenv("ECHO_PROVIDER_DB", str(tmp_path / "db.json"))

    @pytest.fixture
    def failing_deploy_kwargs(self, deploy_kwargs):
        return {**deploy_kwargs, "options": {"fail": "1"}}


class TestLocal(ProviderContract):
    provider = "local"


@pytest.mark.slow
class TestSageMaker(ProviderContract):
    provider = "sagemaker"

    @pytest.fixture
    def deploy_kwargs(self, sagemaker_emulator):
        return {"bucket": f"{sagemaker_emulator.bucket}/models", "options": {"role": sagemaker_emulator.role},
                "runtime": "handler", "instance": "ml.m5.xlarge"}  # fmt: skip


@pytest.mark.slow
class TestVertex(ProviderContract):
    provider = "vertex"

    @pytest.fixture
    def deploy_kwargs(self, vertex_emulator):
        return {"bucket": vertex_emulator.bucket}


def test_each_feature_says_what_asks_for_it_and_the_contract_knows_how_to_ask() -> None:
    from cloudllm.testing.contract import FEATURE_KWARGS, FEATURE_REQUESTS
    from cloudllm.types import Feature

    assert Feature.GRPC.asked_by == "request" and Feature.AUTOSCALING.asked_by == "spec"
    for feature in Feature:
        assert feature in (FEATURE_REQUESTS if feature.asked_by == "request" else FEATURE_KWARGS), feature
