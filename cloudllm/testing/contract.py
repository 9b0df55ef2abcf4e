"""The provider contract: what every provider, built-in or plugin, must do, as tests it runs against itself.

    from cloudllm.testing.contract import ProviderContract

    class TestMyProvider(ProviderContract):
        provider = "myprovider"

        @pytest.fixture
        def deploy_kwargs(self):            # what a deploy to your platform needs besides the model
            return {"region": "x", "bucket": "..."}

        @pytest.fixture
        def failing_deploy_kwargs(self, deploy_kwargs, broken_model):   # a deploy your platform fails
            return {**deploy_kwargs, "model": broken_model}

The checks: an unchanged redeploy does nothing; get() returns the digests of the plan; delete is
idempotent; a failed deploy leaves nothing behind; a feature the provider lacks is refused with
its reason before anything is created. They go through cloudllm.api, as users do.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from cloudllm.errors import PlanRefused, UserError
from cloudllm.types import Feature

# A spec that needs each feature (cloudllm.plan.required_features reads them back).
FEATURE_KWARGS: dict[Feature, dict[str, Any]] = {
    Feature.INSTANCE_TYPES: {"instance": "ml.g5.xlarge"},
    Feature.AUTOSCALING: {"max_instances": 2},
    Feature.SCALE_TO_ZERO: {"min_instances": 0},
    Feature.TRAFFIC_SHIFTING: {"rollout": "canary:10"},
    Feature.ENGINE_RUNTIMES: {"runtime": "tgi"},
    # Refused before the adapter folder is read, so it need not exist.
    Feature.ADAPTERS: {"adapters": {"contract": "./no-such-adapter"}},
    Feature.MULTI_MODEL: {"add_model": "second"},
}
_names = itertools.count()


class ProviderContract:
    """Subclass with `provider` set and the `deploy_kwargs` fixture; override `failing_deploy_kwargs` as needed."""

    provider: str = ""

    @pytest.fixture
    def deploy_kwargs(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def contract_model(self, tiny_gpt2: Path) -> Path:
        return tiny_gpt2

    @pytest.fixture
    def broken_model(self, tiny_gpt2: Path, tmp_path: Path) -> Path:
        """The tiny model with a config its weights do not match: every real server fails to load it."""
        import shutil

        broken = tmp_path / "broken-gpt2"
        shutil.copytree(tiny_gpt2, broken)
        config = json.loads((broken / "config.json").read_text())
        config["n_embd"] = config.get("n_embd", 32) * 2
        (broken / "config.json").write_text(json.dumps(config))
        return broken

    @pytest.fixture
    def failing_deploy_kwargs(self, deploy_kwargs: dict[str, Any], broken_model: Path) -> dict[str, Any]:
        return {**deploy_kwargs, "model": broken_model}

    def _name(self) -> str:
        return f"contract-{self.provider}-{next(_names)}"

    def _deploy(self, name: str, kwargs: dict[str, Any], model: Path):
        from cloudllm import api

        kwargs = dict(kwargs)
        return api.deploy(kwargs.pop("model", model), provider=self.provider, name=name, **kwargs)

    def _provider(self, kwargs: dict[str, Any]):
        from cloudllm.providers.base import get_provider

        return get_provider(self.provider, region=kwargs.get("region"), options=kwargs.get("options"))

    def test_unchanged_redeploy_does_nothing_and_get_returns_the_digests(self, deploy_kwargs, contract_model) -> None:
        name = self._name()
        first = self._deploy(name, deploy_kwargs, contract_model)
        try:
            assert first.action == "create"
            found = self._provider(deploy_kwargs).get(name)
            assert found is not None and found.digest == first.plan.digest
            assert found.fingerprint.model_dump() == first.plan.fingerprint
            again = self._deploy(name, deploy_kwargs, contract_model)
            assert again.action == "unchanged", again.reasons
            assert self._provider(deploy_kwargs).get(name).digest == first.plan.digest
        finally:
            self._delete(name, deploy_kwargs)

    def test_delete_is_idempotent(self, deploy_kwargs, contract_model) -> None:
        name = self._name()
        self._deploy(name, deploy_kwargs, contract_model)
        self._delete(name, deploy_kwargs)
        provider = self._provider(deploy_kwargs)
        assert provider.get(name) is None
        try:  # deleting what is gone changes nothing: at most it says so, in one line
            provider.delete(name)
        except UserError:
            pass
        assert provider.get(name) is None

    def test_a_failed_deploy_leaves_nothing(self, failing_deploy_kwargs, contract_model) -> None:
        name = self._name()
        with pytest.raises(UserError):
            self._deploy(name, failing_deploy_kwargs, contract_model)
        provider = self._provider(failing_deploy_kwargs)
        assert provider.get(name) is None
        assert name not in [e.name for e in provider.list()]

    def test_lacking_features_are_refused_with_their_reason(self, deploy_kwargs, contract_model) -> None:
        from cloudllm import api

        from cloudllm.providers.base import OPT_IN_FEATURES

        provider = self._provider(deploy_kwargs)
        lacking = {**{f: "the provider does not implement it" for f in OPT_IN_FEATURES - provider.offers}, **provider.unsupported}
        for feature, reason in lacking.items():
            name = self._name()
            with pytest.raises(PlanRefused) as info:
                if feature is Feature.GRPC:  # asked for by a request, not by a deploy
                    api.invoke_grpc(name, "hi", provider=self.provider, region=deploy_kwargs.get("region"), options=deploy_kwargs.get("options"))
                else:
                    api.plan(contract_model, provider=self.provider, name=name, **{**deploy_kwargs, **FEATURE_KWARGS[feature]})
            assert reason in info.value.line(), info.value.line()
            assert provider.get(name) is None

    def _delete(self, name: str, kwargs: dict[str, Any]) -> None:
        from cloudllm import api

        api.delete(name, provider=self.provider, region=kwargs.get("region"), options=kwargs.get("options"), purge_artifacts=True)
