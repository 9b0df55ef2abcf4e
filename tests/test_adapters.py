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
