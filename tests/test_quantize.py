"""cloudllm quantize: int8/int4 weights written, reported, served; engine modes and pre-quantized models.

Real torch, real optimum-quanto, the tiny GPT-2 (Conv1D projections, tied LM head) and the
tiny Llama (nn.Linear, untied LM head).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import cloudllm
from cloudllm import api
from cloudllm.cli import main
from cloudllm.errors import UserError
from cloudllm.model_source import inspect_model
from cloudllm.quantize import (
    AGREEMENT_THRESHOLDS,
    check_method,
    engine_quantize_env,
    prepare_model,
    quantize_model,
)
from cloudllm.spec import spec_from_kwargs
from cloudllm.testing.tiny_models import build_tiny_llama
from cloudllm_runtime.quantized import MARKER, load_quantized_model

GPT2_PROJECTIONS = 8  # 2 layers x (c_attn, c_proj, mlp.c_fc, mlp.c_proj)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def gpt2_int8(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("quantized") / "gpt2-int8"
    return out, quantize_model(tiny_gpt2, out, method="int8")


@pytest.fixture(scope="module")
def llama_int4(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("quantized") / "llama-int4"
    return out, quantize_model(tiny_llama, out, method="int4")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


# --- the report ------------------------------------------------------------------------------
def test_int8_gpt2_quantizes_every_conv1d_projection_and_reports_it(gpt2_int8, tiny_gpt2: Path) -> None:
    out, report = gpt2_int8
    assert len(report.conv1d_to_linear) == GPT2_PROJECTIONS
    assert sorted(report.quantized) == sorted(report.conv1d_to_linear)  # none left in full precision
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"transformer.wte", "transformer.wpe", "lm_head"}
    assert "tied to the input embeddings" in reasons["lm_head"]
    assert report.policy["lm_head"].startswith("tied") and report.policy["embeddings"] == "original dtype"
    # float32 source: int8 data + one float32 scale per output channel is just over a quarter
    assert 0.25 < report.layer_ratio < 0.30
    assert report.bytes_after < report.bytes_before and report.ratio == pytest.approx(report.bytes_after / report.bytes_before, abs=1e-3)
    f = report.fidelity
    assert f.probes == 8 and f.positions > 100
    assert f.agreement >= AGREEMENT_THRESHOLDS["int8"] and f.passed
    assert 0 < f.mean_logit_diff <= f.max_logit_diff < f.mean_abs_logit


def test_int4_llama_groups_and_lm_head_policy(llama_int4, tiny_llama: Path, tmp_path: Path) -> None:
    out, report = llama_int4
    assert report.group_sizes and sum(report.group_sizes.values()) == len(report.quantized) == 14
    assert "lm_head" not in report.quantized
    assert "(policy; --quantize-lm-head" in {s.name: s.reason for s in report.skipped}["lm_head"]
    assert report.layer_ratio < 0.20  # float32 source: 4 bits + scales per row
    with_head = quantize_model(tiny_llama, tmp_path / "with-head", method="int4", quantize_lm_head=True, force=True)
    assert "lm_head" in with_head.quantized and with_head.policy["lm_head"] == "quantized"
    assert with_head.bytes_after < report.bytes_after


def test_quantized_folder_format(gpt2_int8, tiny_gpt2: Path) -> None:
    out, report = gpt2_int8
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == "cloudllm-quanto" and marker["method"] == "int8"
    assert marker["conv1d_to_linear"] == report.conv1d_to_linear
    assert set(marker["quantization_map"]) == set(report.quantized)
    assert marker["fidelity"]["agreement"] == report.fidelity.agreement
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names and marker["weight_files"] == ["quantized-model.safetensors"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    # config.json is the original's: nothing that transformers' own quantizers would act on
    assert (out / "config.json").read_bytes() == (tiny_gpt2 / "config.json").read_bytes()


def test_quantizing_twice_writes_the_same_bytes(gpt2_int8, tiny_gpt2: Path, tmp_path: Path) -> None:
    """A fresh CI runner quantizes again: equal bytes keep the bundle digest, so nothing is re-uploaded or redeployed."""
    from cloudllm.hashing import sha256_file

    first, _ = gpt2_int8
    quantize_model(tiny_gpt2, tmp_path / "again", method="int8")
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    assert {n: sha256_file(first / n) for n in files} == {n: sha256_file(tmp_path / "again" / n) for n in files}


def test_transformers_from_pretrained_refuses_the_folder_instead_of_loading_random_weights(gpt2_int8) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = gpt2_int8
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)


def test_inspect_reports_quantization_and_the_original_parameter_count(gpt2_int8, tiny_gpt2: Path) -> None:
    out, report = gpt2_int8
    original, quantized = inspect_model(tiny_gpt2), inspect_model(out)
    assert quantized.quantization == "int8" and original.quantization is None
    assert quantized.parameters == original.parameters and quantized.dtype == original.dtype == "float32"
    assert quantized.weight_bytes == report.bytes_after < original.weight_bytes


def test_quantized_model_matches_the_original(gpt2_int8, tiny_gpt2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = gpt2_int8
    original = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    quantized = load_quantized_model(str(out), AutoModelForCausalLM, dtype="float32")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        diff = (original(ids).logits - quantized(ids).logits).abs().max().item()
    assert 0 < diff < 0.05


# --- bad input: one line, exit 2, nothing left behind ------------------------------------------
@pytest.mark.parametrize(
    "args, contains",
    [
        (("--method", "int3"), "unknown quantization method 'int3'"),
        (("--method", "eetq"), "eetq is applied by the tgi engine"),
        (("--method", "int8", "--exclude", "*"), "has no layers int8 can take"),
        (("--method", "int4", "--min-agreement", "0.999"), "below the 100% threshold"),
        (("--method", "int8", "--min-agreement", "7"), "is not a share"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_folder(capsys, tiny_llama: Path, tmp_path: Path, args, contains) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", str(tiny_llama), "-o", str(out), *args)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and contains in lines[0], err
    assert not out.exists() and leftovers(tmp_path) == []


def test_output_folder_that_exists_needs_overwrite(capsys, gpt2_int8, tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "quantize", str(tiny_gpt2), "-o", str(out), "--method", "int8")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, stdout, _ = run_cli(capsys, "quantize", str(tiny_gpt2), "-o", str(out), "--method", "int8", "--overwrite", "--json")
    report = json.loads(stdout)
    assert code == 0 and report["method"] == "int8" and report["output"] == str(out.resolve())
    assert not (out / "keep.txt").exists() and (out / MARKER).is_file()


def test_refused_quantization_keeps_an_existing_output_folder(capsys, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "quantize", str(tiny_llama), "-o", str(out), "--method", "int4", "--overwrite", "--min-agreement", "0.999")
    assert code == 2 and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


def test_force_keeps_a_quantization_below_the_threshold(capsys, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "quantize", str(tiny_llama), "-o", str(out), "--method", "int4", "--min-agreement", "0.999", "--force")
    assert code == 0 and "kept despite the low agreement (--force)" in stdout
    assert json.loads((out / MARKER).read_text())["fidelity"]["passed"] is False


def test_already_quantized_models_are_not_quantized_twice(capsys, gpt2_int8, tiny_gpt2: Path, tmp_path: Path) -> None:
    out, _ = gpt2_int8
    code, _, err = run_cli(capsys, "quantize", str(out), "-o", str(tmp_path / "again"), "--method", "int4")
    assert code == 2 and "already quantized (int8)" in err
    awq = prequantized(tiny_gpt2, tmp_path / "awq", {"quant_method": "awq", "bits": 4, "group_size": 128})
    code, _, err = run_cli(capsys, "quantize", str(awq), "-o", str(tmp_path / "again"), "--method", "int8")
    assert code == 2 and "already quantized (awq)" in err
    with pytest.raises(UserError, match="already quantized"):
        check_method("int8", "handler", inspect_model(awq))


# --- pre-quantized detection -----------------------------------------------------------------
def prequantized(model: Path, dest: Path, quantization_config: dict | None = None, extra_file: str | None = None) -> Path:
    shutil.copytree(model, dest)
    if quantization_config is not None:
        config = json.loads((dest / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (dest / "config.json").write_text(json.dumps(config))
    if extra_file:
        (dest / extra_file).write_text(json.dumps({"bits": 4, "group_size": 128}))
    return dest


@pytest.mark.parametrize(
    "config, extra_file, method",
    [
        ({"quant_method": "gptq", "bits": 4}, None, "gptq"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, None, "fp8"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, None, "compressed-tensors"),
        ({"quant_method": "torchao", "quant_type": {"default": {}}}, None, "torchao"),
        ({"load_in_8bit": True}, None, "bitsandbytes"),  # written before transformers recorded quant_method
        (None, "quantize_config.json", "gptq"),  # AutoGPTQ before quantization_config existed
        ({}, None, None),
    ],
)
def test_prequantized_methods_are_detected(tiny_gpt2: Path, tmp_path: Path, config, extra_file, method) -> None:
    assert inspect_model(prequantized(tiny_gpt2, tmp_path / "m", config, extra_file)).quantization == method


# --- methods vs runtimes, and what the engines get -------------------------------------------
@pytest.mark.parametrize(
    "runtime, method, prequantized, env",
    [
        ("tgi", "bitsandbytes", False, {"HF_MODEL_QUANTIZE": "bitsandbytes", "QUANTIZE": "bitsandbytes"}),
        ("tgi", "eetq", False, {"HF_MODEL_QUANTIZE": "eetq", "QUANTIZE": "eetq"}),
        ("tgi", "awq", True, {"HF_MODEL_QUANTIZE": "awq", "QUANTIZE": "awq"}),
        ("tgi", "fbgemm_fp8", True, {"HF_MODEL_QUANTIZE": "fp8", "QUANTIZE": "fp8"}),
        ("vllm", "fp8", False, {"OPTION_QUANTIZE": "fp8"}),
        ("vllm", "bitsandbytes", False, {"OPTION_QUANTIZE": "bitsandbytes"}),
        ("vllm", "fp8", True, {}),  # vLLM reads a pre-quantized model's method from config.json
        ("vllm", "gptq", True, {}),
        ("handler", "int8", False, {}),
        ("handler", "int8", True, {}),
        ("tgi", None, True, {}),
    ],
)
def test_engine_quantize_env(runtime, method, prequantized, env) -> None:
    assert engine_quantize_env(runtime, method, prequantized=prequantized) == env


@pytest.mark.parametrize(
    "runtime, method, prequantized",
    [("vllm", "eetq", False), ("tgi", "torchao", True), ("tgi", "awq", False), ("tgi", "int8", True)],
)
def test_engine_quantize_env_refuses_what_the_engine_cannot_serve(runtime, method, prequantized) -> None:
    with pytest.raises(UserError, match=f"the {runtime} runtime cannot serve {method}"):
        engine_quantize_env(runtime, method, prequantized=prequantized)


@pytest.mark.parametrize(
    "method, runtime, contains",
    [
        ("int3", "handler", "unknown quantization method 'int3'"),
        ("eetq", "handler", "eetq needs --runtime tgi; handler serves int8 and int4 (shipped weights)"),
        ("int8", "tgi", "the tgi runtime cannot serve int8 weights"),
        ("bitsandbytes-nf4", "vllm", "needs --runtime tgi; vllm serves fp8, bitsandbytes (on the fly)"),
    ],
)
def test_methods_a_runtime_cannot_serve(method, runtime, contains) -> None:
    with pytest.raises(UserError) as error:
        check_method(method, runtime)
    assert contains in error.value.line()


# --- deploy and package ship the quantized weights ---------------------------------------------
def test_package_with_quantize_ships_quantized_weights_and_quanto(cloudllm_home: Path, tiny_gpt2: Path, tmp_path: Path) -> None:
    plain = api.package(tiny_gpt2, tmp_path / "plain")
    bundle = api.package(tiny_gpt2, tmp_path / "int8", quantize="int8")
    names = {f.name for f in bundle.files}
    assert {"quantized-model.safetensors", MARKER} <= names and "model.safetensors" not in names
    assert bundle.manifest.model["quantization"] == "int8" and bundle.total_bytes < plain.total_bytes
    requirements = (tmp_path / "int8" / "code" / "requirements.txt").read_text()
    assert "optimum-quanto>=0.2.7" in requirements
    assert "optimum-quanto" not in (tmp_path / "plain" / "code" / "requirements.txt").read_text()
    settings = json.loads((tmp_path / "int8" / "code" / "settings.json").read_text())
    assert settings["quantization"] == "int8"


def test_package_refuses_offline_weights_for_an_engine_runtime(cloudllm_home: Path, tiny_gpt2: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        api.package(tiny_gpt2, tmp_path / "out", quantize="int8", runtime="tgi")
    assert "the tgi runtime cannot serve int8" in error.value.line() and "bitsandbytes" in error.value.line()
    assert not (tmp_path / "out").exists()


def test_deploy_quantizes_once_and_reuses_the_cache(cloudllm_home: Path, tiny_gpt2: Path) -> None:
    spec = spec_from_kwargs(tiny_gpt2, quantize="int8")
    first = prepare_model(spec, inspect_model(tiny_gpt2), "handler")
    marker = Path(first.path) / MARKER
    mtime = marker.stat().st_mtime_ns
    second = prepare_model(spec, inspect_model(tiny_gpt2), "handler")
    assert second.path == first.path and marker.stat().st_mtime_ns == mtime
    assert Path(first.path).is_relative_to(cloudllm_home / "quantized") and first.quantization == "int8"
    int4 = prepare_model(spec_from_kwargs(tiny_gpt2, quantize="int4"), inspect_model(tiny_gpt2), "handler")
    assert int4.path != first.path and int4.quantization == "int4"


def test_local_deploy_serves_int8_weights(cloudllm_home: Path, tiny_gpt2: Path) -> None:
    """plan and --dry-run size int8 by arithmetic and quantize nothing; deploy quantizes; a fresh machine converges."""
    planned = api.plan(tiny_gpt2, provider="local", name="q8", quantize="int8")
    dry = cloudllm.deploy(tiny_gpt2, provider="local", name="q8", quantize="int8", dry_run=True)
    assert planned.quantize_pending == dry.plan.quantize_pending == "int8"
    assert planned.fit.memory.weights_bytes < planned.model.weight_bytes / 2  # float32 source, int8 estimate
    assert not list((cloudllm_home / "quantized").glob("*")) and not (cloudllm_home / "local" / "q8").exists()

    result = cloudllm.deploy(tiny_gpt2, provider="local", name="q8", quantize="int8")
    assert result.action == "create" and result.plan.model.quantization == "int8"
    assert result.plan.runtime == "handler" and result.plan.quantize_pending is None
    answer = cloudllm.invoke("q8", "Once upon a time", parameters={"max_new_tokens": 4})
    assert isinstance(answer, str)
    again = cloudllm.deploy(tiny_gpt2, provider="local", name="q8", quantize="int8")
    assert again.action == "unchanged"

    shutil.rmtree(cloudllm_home / "quantized")  # a new CI runner: the endpoint exists, the quantized cache does not
    unknown = api.plan(tiny_gpt2, provider="local", name="q8", quantize="int8")
    assert unknown.action == "unknown" and "not quantized on this machine yet" in unknown.reasons[0]
    assert cloudllm.deploy(tiny_gpt2, provider="local", name="q8", quantize="int8").action == "unchanged"  # same bytes again
    cloudllm.delete("q8")


def test_large_models_are_written_in_shards_that_load(monkeypatch, tiny_gpt2: Path, tmp_path: Path) -> None:
    import cloudllm.quantize.weights as quantize

    monkeypatch.setattr(quantize, "MAX_SHARD_BYTES", 64 * 1024)  # the tiny model's 290 KB in several files
    report = quantize_model(tiny_gpt2, tmp_path / "sharded", method="int8")
    marker = json.loads((tmp_path / "sharded" / MARKER).read_text())
    assert len(marker["weight_files"]) > 2 and marker["weight_files"][0].endswith("-of-%05d.safetensors" % len(marker["weight_files"]))
    assert inspect_model(tmp_path / "sharded").weight_bytes == report.bytes_after
    from transformers import AutoModelForCausalLM

    assert load_quantized_model(str(tmp_path / "sharded"), AutoModelForCausalLM) is not None
