"""Adapter inspection: real peft adapters built offline, checked against real tiny bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudllm.adapters import adapter_gpu_bytes, check_adapter_against_base, check_adapter_name, inspect_adapter
from cloudllm.errors import UserError
from cloudllm.model_source import inspect_model
from cloudllm.testing.tiny_adapters import build_tiny_lora
from cloudllm.testing.tiny_models import build_tiny_gpt2, build_tiny_llama


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"gpt2": build_tiny_gpt2(root / "gpt2"), "llama": build_tiny_llama(root / "llama"), "wide": build_tiny_gpt2(root / "wide", n_embd=128)}


@pytest.fixture(scope="module")
def gpt2_lora(bases, tmp_path_factory) -> Path:
    return build_tiny_lora(bases["gpt2"], tmp_path_factory.mktemp("lora") / "support", rank=4)


def test_inspect_reads_rank_modules_and_bytes(gpt2_lora):
    info = inspect_adapter("support", gpt2_lora)
    assert info.rank == 4 and info.alpha == 8.0
    assert info.target_modules == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    # Per module: A is r x 64, B is 192 x r, float32.
    assert info.parameters == 2 * (4 * 64 + 192 * 4)
    assert info.weight_bytes == info.parameters * 4
    assert adapter_gpu_bytes(info, serving_dtype_bytes=2) == info.parameters * 2
    assert {f.name for f in info.files} == {"adapter_config.json", "adapter_model.safetensors"}


def test_matching_base_passes_and_other_architecture_is_refused(gpt2_lora, bases):
    info = inspect_adapter("support", gpt2_lora)
    assert check_adapter_against_base(info, inspect_model(bases["gpt2"])) == []
    with pytest.raises(UserError, match="does not have: c_attn"):
        check_adapter_against_base(info, inspect_model(bases["llama"]))


def test_other_model_size_is_refused(gpt2_lora, bases):
    with pytest.raises(UserError, match="different model size"):
        check_adapter_against_base(inspect_adapter("support", gpt2_lora), inspect_model(bases["wide"]))


def test_another_base_name_is_a_warning(gpt2_lora, bases, tmp_path):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    config = json.loads((gpt2_lora / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))
    (renamed / "adapter_model.safetensors").write_bytes((gpt2_lora / "adapter_model.safetensors").read_bytes())
    base = bases["gpt2"]
    model = inspect_model(base)
    model.config["_name_or_path"] = "openai-community/gpt2"
    warnings = check_adapter_against_base(inspect_adapter("legal", renamed), model)
    assert warnings and "meta-llama/Llama-3.1-8B" in warnings[0]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "pickle weights"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda d: (d / "adapter_config.json").write_text("{nope"), "not valid JSON"),
        (lambda d: (d / "adapter_config.json").write_text("[1]"), "not a JSON object"),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "IA3", "r": 4}'), "only LoRA"),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}'), "positive integer"),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": "x"}'), "lora_alpha"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x01"), "truncated"),
    ],
)
def test_bad_adapter_folders_are_one_line_errors(gpt2_lora, tmp_path, mutate, message):
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((gpt2_lora / name).read_bytes())
    mutate(folder)
    with pytest.raises(UserError, match=message) as caught:
        inspect_adapter("bad", folder)
    assert "\n" not in str(caught.value)


def test_a_model_folder_is_not_an_adapter(bases):
    with pytest.raises(UserError, match="no adapter_config.json"):
        inspect_adapter("oops", bases["gpt2"])


@pytest.mark.parametrize("name", ["", "-x", "x-", "a b", "a/b", "x" * 49, "ünï"])
def test_bad_adapter_names(name):
    with pytest.raises(UserError, match="adapter name"):
        check_adapter_name(name)


# --- the spec, the plan and the flags ------------------------------------------------------------
@pytest.fixture
def echo_free_home(cloudllm_home):
    return cloudllm_home


def _local_plan(base: Path, **kwargs):
    from cloudllm import api

    return api.plan(base, provider="local", name="shared", **kwargs)


def test_plan_inspects_adapters_and_digests_them_apart(bases, gpt2_lora, tmp_path, echo_free_home):
    from cloudllm.plan import fingerprint_digest

    plain = _local_plan(bases["gpt2"])
    with_one = _local_plan(bases["gpt2"], adapters={"support": str(gpt2_lora)})
    assert [a.name for a in with_one.adapters] == ["support"] and with_one.adapters[0].rank == 4
    assert plain.fingerprint["adapters_digest"] is None
    # Adapters change only their own digest: weights, code and deployment settings stay as they were.
    for key in ("weights_digest", "code_digest", "deploy_digest", "scaling_digest"):
        assert plain.fingerprint[key] == with_one.fingerprint[key]
    assert with_one.fingerprint["adapters_digest"] and with_one.digest != plain.digest
    # No adapters: the digest is the one endpoints deployed before adapters existed carry.
    assert plain.digest == fingerprint_digest({k: v for k, v in plain.fingerprint.items() if k != "adapters_digest"})
    # The content decides, not the folder: a copy elsewhere digests the same.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in gpt2_lora.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    moved = _local_plan(bases["gpt2"], adapters={"support": str(copy)})
    assert moved.fingerprint == with_one.fingerprint
    report = with_one.report().model_dump(mode="json")
    assert report["adapters"][0]["name"] == "support" and report["adapters"][0]["digest"] == with_one.adapter_digests["support"]
    assert any(line.strip().startswith("adapter:  support: rank 4") for line in with_one.describe())


def test_adapters_only_when_nothing_else_changed(bases, gpt2_lora, echo_free_home):
    from cloudllm.types import Endpoint, Fingerprint

    plain = _local_plan(bases["gpt2"])
    with_one = _local_plan(bases["gpt2"], adapters={"support": str(gpt2_lora)})
    with_one.existing = Endpoint(name="shared", provider="local", state="InService", fingerprint=Fingerprint(**plain.fingerprint))
    with_one.action = "update"
    assert with_one.adapters_only and not with_one.rescale_only
    from cloudllm.plan import compare

    assert compare(with_one) == ("update", ["adapters changed (now: support)"])
    bigger = _local_plan(bases["gpt2"], adapters={"support": str(gpt2_lora)}, tags={"team": "a"})
    bigger.existing, bigger.action = with_one.existing, "update"
    assert not bigger.adapters_only


def test_plan_refuses_an_adapter_for_another_architecture(bases, gpt2_lora, echo_free_home):
    with pytest.raises(UserError, match="does not have: c_attn"):
        _local_plan(bases["llama"], adapters={"support": str(gpt2_lora)})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--adapter", "legal"], "--adapter 'legal' is not NAME=PATH"),
        (["--adapter", "=./x"], "is not NAME=PATH"),
        (["--adapter", "a b=./x"], "adapter name 'a b' is not valid"),
        (["--adapter", "legal=./a", "--adapter", "legal=./b"], "--adapter legal is given twice"),
        (["--adapter", "legal=./no-such-folder"], "is not a folder"),
        (["--add-model", "bad name"], "model name 'bad name'"),
        (["--add-model", "embed"], "there is no local endpoint shared to add model embed to"),
    ],
)
def test_bad_adapter_flags_are_one_line_and_create_nothing(bases, flags, message, echo_free_home):
    from click.testing import CliRunner

    from cloudllm.cli import cli

    result = CliRunner().invoke(cli, ["deploy", str(bases["gpt2"]), "--name", "shared", *flags], standalone_mode=False)
    assert isinstance(result.exception, UserError), result.output
    assert message in result.exception.line()
    assert not (echo_free_home / "local" / "shared").exists() and not (echo_free_home / "endpoints" / "shared.json").exists()


def test_a_provider_must_opt_in_to_adapters(bases, gpt2_lora, echo_free_home):
    from cloudllm.errors import PlanRefused
    from cloudllm.providers.base import OPT_IN_FEATURES
    from cloudllm.providers.local import LocalProvider
    from cloudllm.types import Feature

    class Older(LocalProvider):  # a plugin written before adapters existed
        offers = frozenset()

    assert OPT_IN_FEATURES == {Feature.ADAPTERS, Feature.MULTI_MODEL}
    with pytest.raises(PlanRefused, match="LoRA adapters .* not available on the local provider: the provider does not implement it"):
        Older().require({Feature.ADAPTERS})
    from cloudllm.providers.base import Provider

    with pytest.raises(PlanRefused, match="does not implement it"):  # the base's default, which Older would inherit from a plain Provider
        Provider.add_adapter(Older(), "x", inspect_adapter("support", gpt2_lora), None)


def test_invoke_body_carries_the_adapter():
    from cloudllm.invocation import build_body, with_adapter

    assert with_adapter(build_body("hi", {"max_new_tokens": 3}), "legal") == {"inputs": "hi", "parameters": {"max_new_tokens": 3, "adapter_id": "legal"}}
    assert with_adapter(build_body("hi"), None) == {"inputs": "hi"}
    with pytest.raises(UserError, match="disagree"):
        with_adapter(build_body(None, None, '{"inputs": "x", "parameters": {"adapter_id": "a"}}'), "b")
    with pytest.raises(UserError, match="not valid"):
        with_adapter(build_body("hi"), "no such/name")


def test_chat_names_the_adapter_as_openai_model(echo_free_home):
    from cloudllm import api

    _, body = api._chat_request("shared", "hi", None, None, "local", None, None, stream=False, adapter="legal")
    assert body["model"] == "legal" and body["messages"] == [{"role": "user", "content": "hi"}]


def test_fit_counts_adapter_memory_at_the_serving_dtype(bases, gpt2_lora, tmp_path):
    from cloudllm.catalog.instances import lookup
    from cloudllm.fit import plan_fit
    from cloudllm.spec import serving_settings, spec_from_kwargs

    model = inspect_model(bases["gpt2"])
    spec = spec_from_kwargs(bases["gpt2"], name="x", provider="sagemaker", instance="ml.g5.xlarge")
    instance = lookup("sagemaker", "ml.g5.xlarge")
    plain = plan_fit(spec, model, serving_settings(spec, model), "tgi", instance)
    two = [inspect_adapter("support", gpt2_lora), inspect_adapter("legal", build_tiny_lora(bases["gpt2"], tmp_path / "legal", rank=8))]
    fitted = plan_fit(spec, model, serving_settings(spec, model), "tgi", instance, adapters=tuple(two))
    # TGI serves this float32 checkpoint in float16: 2 bytes per LoRA parameter (rank x (in + out) x modules).
    assert fitted.memory.adapters_bytes == sum(a.parameters for a in two) * 2 == 2 * (2 * (4 * 64 + 192 * 4) + 2 * (8 * 64 + 192 * 8))
    assert fitted.memory.total_bytes == plain.memory.total_bytes + fitted.memory.adapters_bytes
    assert "+ adapters" in fitted.memory.breakdown(fitted.max_total_tokens, fitted.max_batch)


def test_invoke_with_an_adapter_is_refused_where_the_provider_serves_none(monkeypatch, echo_free_home):
    from cloudllm import api
    from cloudllm.errors import PlanRefused
    from cloudllm.providers.local import LocalProvider

    class Older(LocalProvider):
        offers = frozenset()

    monkeypatch.setattr(api, "get_provider", lambda name, region=None, options=None: Older(region=region, options=options))
    for call in (lambda: api.invoke("shared", "hi", provider="older", adapter="legal"),
                 lambda: list(api.invoke_stream("shared", "hi", provider="older", adapter="legal")),
                 lambda: api.chat("shared", "hi", provider="older", adapter="legal")):  # fmt: skip
        with pytest.raises(PlanRefused, match="LoRA adapters .* not available on the local provider"):
            call()
