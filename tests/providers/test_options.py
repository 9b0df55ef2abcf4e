"""Typed provider options: each provider's model checks spec.options before anything runs; record_options keeps what deploy found."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import ClassVar

import jsonschema
import pytest
from pydantic import Field

from cloudllm import api
from cloudllm.config_file import file_schema
from cloudllm.errors import UserError
from cloudllm.providers.base import Provider, ProviderOptions, StrictOptions, get_provider
from cloudllm.records import load_record
from cloudllm.spec import spec_from_kwargs
from tests.conftest import assert_one_line_error, run_cli

BUILT_IN = ("local", "sagemaker", "vertex")


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_provider_refuses_an_unknown_option_naming_the_ones_it_takes(name: str) -> None:
    provider = get_provider(name)
    assert issubclass(provider.Options, StrictOptions)
    with pytest.raises(UserError) as info:
        get_provider(name, options={"forse": True})
    line = info.value.line()
    assert f"the {name} provider has no option 'forse'" in line and "did you mean force?" in line
    assert ", ".join(sorted(provider.Options.model_fields)) in line and "\n" not in line


@pytest.mark.parametrize(
    ("name", "options", "contains"),
    [
        ("sagemaker", {"num_gpus": "many"}, "option num_gpus=many of the sagemaker provider: Input should be a valid integer"),
        ("sagemaker", {"volume_size": 4096}, "option volume_size=4096 of the sagemaker provider: Input should be less than or equal to 512"),
        ("sagemaker", {"vpc_subnets": "subnet-1"}, "option vpc_subnets=subnet-1 of the sagemaker provider: Input should be a valid list"),
        # a string "false" read as a flag would be true: refused instead
        ("sagemaker", {"network_isolation": "false"}, "option network_isolation=false of the sagemaker provider: Input should be a valid boolean"),
        ("vertex", {"project": ["a", "b"]}, "option project=['a', 'b'] of the vertex provider: Input should be a valid string"),
        ("vertex", {"rollout_wait": "soon"}, "rollout_wait=soon is not a number of seconds"),
        ("local", {"force": "yes"}, "option force=yes of the local provider: Input should be a valid boolean"),
    ],
)
def test_a_mistyped_option_is_one_line_with_what_the_option_is(name: str, options: dict, contains: str) -> None:
    with pytest.raises(UserError) as info:
        get_provider(name, options=options)
    assert contains in info.value.line() and "\n" not in info.value.line()


def test_a_secret_looking_value_is_never_echoed() -> None:
    class Plugin(_Recorder):
        class Options(StrictOptions):
            api_token: int = Field(0, description="A number, say.")

    with pytest.raises(UserError) as info:
        Plugin(options={"api_token": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"})
    assert "hf_AbCd" not in info.value.line() and "api_token=***" in info.value.line()


def test_options_as_given_pass_unconverted() -> None:
    """The endpoint's digest covers spec.options as written: checking them must not change them."""
    given = {"role": "arn:aws:iam::123456789012:role/r", "num_gpus": "4", "rollout_wait": "60", "vpc_subnets": ["s"], "vpc_security_groups": ["g"]}
    assert dict(get_provider("sagemaker", options=given).options) == given


def test_the_cli_refuses_a_mistyped_option_before_anything_is_created(tiny_gpt2: Path, cloudllm_home: Path) -> None:
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "typo", "--option", "rolout_wait=5")
    assert_one_line_error(result, contains="the local provider has no option 'rolout_wait'")
    assert load_record("typo") is None and not (cloudllm_home / "local" / "typo").exists()


def test_cloudllm_yaml_names_the_file_line_of_a_bad_option(tmp_path: Path, tiny_gpt2: Path, cloudllm_home: Path) -> None:
    path = tmp_path / "cloudllm.yaml"
    path.write_text(textwrap.dedent(f"""\
        file_id: options-test
        endpoints:
          - name: first
            model: {tiny_gpt2}
            provider: local
          - name: second
            model: {tiny_gpt2}
            provider: local
            options: {{kms_key: k}}
        """))  # fmt: skip
    result = run_cli("apply", "-f", str(path), "--dry-run")
    assert_one_line_error(result, contains=f"{path}:6: endpoint second: the local provider has no option 'kms_key'")


def test_cloudllm_schema_shows_each_providers_options() -> None:
    schema = file_schema()
    for name in BUILT_IN:
        options = schema["$defs"][f"{name}_options"]
        assert options["additionalProperties"] is False and "force" in options["properties"]
    assert {"role", "vpc_subnets", "rollback_alarms", "kms_key", "profile"} <= set(schema["$defs"]["sagemaker_options"]["properties"])
    assert {"project", "kms_key", "rollout_wait"} <= set(schema["$defs"]["vertex_options"]["properties"])
    validator = jsonschema.Draft202012Validator(schema)

    def errors(options: dict, provider: str = "sagemaker", where: str = "endpoints") -> list:
        entry = {"provider": provider, "options": options}
        data = {"endpoints": [{"name": "a", "model": "m", **entry}]} if where == "endpoints" else {"defaults": entry, "endpoints": [{"name": "a", "model": "m"}]}
        return list(validator.iter_errors(data))

    assert not errors({"role": "arn:aws:iam::1:role/r", "vpc_subnets": ["s"], "rollout_wait": 60})
    assert errors({"rolout_wait": 60}) and errors({"vpc_subnets": "s"}) and errors({"role": "r"}, provider="vertex")
    assert errors({"rolout_wait": 60}, where="defaults")
    assert not errors({"anything": 1}, provider="not-installed")  # an unknown provider is the loader's to refuse


def test_the_cli_schema_command_prints_the_same() -> None:
    result = run_cli("schema")
    assert result.returncode == 0 and '"sagemaker_options"' in result.stdout and '"vertex_options"' in result.stdout


# --- record_options --------------------------------------------------------------------------------
class _Recorder(Provider):
    """A provider that finds a bucket while deploying, as SageMaker does (nothing else is exercised)."""

    name: ClassVar[str] = "recorder"

    class Options(StrictOptions):
        bucket: str | None = Field(None, description="Found by deploy.")

    def deploy(self, plan, reporter):
        from cloudllm.types import Endpoint

        self.record_options(bucket=f"found-by-{plan.spec.name}")
        return Endpoint(name=plan.spec.name, provider=self.name, state="InService", model=plan.model.path)

    def update(self, plan, existing, reporter):
        raise NotImplementedError

    def get(self, name):
        return None

    def list(self):
        return []

    def delete(self, name, *, purge_artifacts=False, reporter=None):
        pass

    def invoke(self, name, body):
        return {}


def test_providers_read_options_but_record_what_they_find_through_the_hook() -> None:
    provider = _Recorder(options={"force": True})
    with pytest.raises(TypeError):
        provider.options["bucket"] = "written directly"  # type: ignore[index]
    provider.record_options(bucket="b")
    assert dict(provider.options) == {"force": True, "bucket": "b"}
    with pytest.raises(UserError, match="the recorder provider has no option 'bukket'"):
        provider.record_options(bukket="b")  # what a provider records is checked like what a user gives
    assert dict(provider.options) == {"force": True, "bucket": "b"}


def test_the_core_keeps_recorded_options_in_the_endpoint_record(cloudllm_home: Path, tiny_gpt2: Path, monkeypatch) -> None:
    provider = _Recorder()
    monkeypatch.setattr(api, "_provider_for_spec", lambda spec: provider)  # the plugin is not installed; everything else is real
    monkeypatch.setattr(api, "_provider_from_record", lambda record: provider)
    result = api.deploy(spec=spec_from_kwargs(tiny_gpt2, provider="recorder", name="rec"))
    assert result.action == "create"
    assert load_record("rec").options == {"bucket": "found-by-rec"}


def test_a_plugin_without_an_options_model_takes_any_option_as_before() -> None:
    class Loose(_Recorder):
        Options = ProviderOptions

    assert dict(Loose(options={"hf_token": "t", "note": 1}).options) == {"hf_token": "t", "note": 1}
    with pytest.raises(UserError, match="option force=maybe"):
        Loose(options={"force": "maybe"})
