"""The serving runtime loads int8/int4 folders from `cloudllm quantize` and serves them.

Real weights, real optimum-quanto kernels, real HTTP: the loader alone, the engine's hook,
a code/serve.py process (which generates under torch.inference_mode), and transformers 4.x
through the inference toolkit's hooks.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from cloudllm.quantize import quantize_model
from cloudllm_runtime.engine import load_engine
from cloudllm_runtime.quantized import MARKER, QuantizedModelError, is_quantized, load_quantized_model
from cloudllm_runtime.settings import ServingSettings

from .conftest import ServerProcess

PROMPT_IDS = [[5, 17, 42, 99, 3, 250, 7]]


@pytest.fixture(scope="module")
def quantized(tiny_gpt2: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """quantized(kind, method) -> (original folder, quantized folder), built on first use."""
    root = tmp_path_factory.mktemp("quantized")
    sources = {"gpt2": tiny_gpt2, "llama": tiny_llama}
    built: dict[tuple[str, str], Path] = {}

    def get(kind: str, method: str) -> tuple[Path, Path]:
        if (kind, method) not in built:
            built[kind, method] = root / f"{kind}-{method}"
            quantize_model(sources[kind], built[kind, method], method=method)
        return sources[kind], built[kind, method]

    return get


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generates_under_inference_mode_close_to_the_original(quantized, kind, method, dtype) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    source, folder = quantized(kind, method)
    model = load_quantized_model(str(folder), AutoModelForCausalLM, dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    ids = torch.tensor(PROMPT_IDS)
    with torch.inference_mode():  # what the engine uses; quanto's int4 tensors need the loader's help there
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        logits = model(ids).logits.float()
    assert out.shape == (1, len(PROMPT_IDS[0]) + 4)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        reference = original(ids).logits
    tolerance = {"int8": 0.05, "int4": 0.3}[method] + (0.05 if dtype == "bfloat16" else 0)
    assert (logits - reference).abs().max().item() < tolerance


def test_engine_serves_a_quantized_folder(quantized) -> None:
    _, folder = quantized("gpt2", "int4")
    engine = load_engine(str(folder), ServingSettings(task="text-generation", max_total_tokens=128, max_input_tokens=64, max_new_tokens=16))
    assert type(engine.model.transformer.h[0].attn.c_attn).__name__ == "QLinear"
    predictions = engine.predict(["Once upon a time"], {"max_new_tokens": 4})
    assert len(predictions) == 1 and isinstance(predictions[0]["generated_text"], str)


def test_server_answers_and_streams_with_int4_weights(quantized, artifact_factory) -> None:
    _, folder = quantized("llama", "int4")
    server = ServerProcess(artifact_factory(folder, task="text-generation", max_total_tokens=128, max_input_tokens=64)).wait_ready()
    try:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 4}}
        answer = httpx.post(f"{server.url}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, server.log()
        assert isinstance(answer.json()[0]["generated_text"], str)
        with httpx.stream("POST", f"{server.url}/invocations", json={**body, "stream": True}, timeout=60) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert events and json.loads(events[-1][5:]).get("generated_text") is not None
    finally:
        server.stop()


def test_missing_weights_are_an_error_not_random_values(quantized, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    _, folder = quantized("gpt2", "int8")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "quantized-model.safetensors"
    tensors = load_file(weights)
    del tensors["transformer.h.1.mlp.c_fc.weight._scale"], tensors["transformer.ln_f.weight"]
    save_file(tensors, weights)
    with pytest.raises(QuantizedModelError, match="lack 2 parameter"):
        load_quantized_model(str(broken), AutoModelForCausalLM)


def test_marker_of_another_version_or_format(quantized, tmp_path: Path) -> None:
    import shutil

    from transformers import AutoModelForCausalLM

    _, folder = quantized("gpt2", "int8")
    newer = tmp_path / "newer"
    shutil.copytree(folder, newer)
    marker = json.loads((newer / MARKER).read_text())
    (newer / MARKER).write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(QuantizedModelError, match="format version 99"):
        load_quantized_model(str(newer), AutoModelForCausalLM)
    (newer / MARKER).write_text(json.dumps({**marker, "format": "someone-else"}))
    assert not is_quantized(str(newer))


def test_transformers_4_loads_quantized_weights_through_the_toolkit_hooks(quantized, tmp_path: Path) -> None:
    from cloudllm import api

    from .test_transformers4 import TF4, _toolkit

    if not (TF4 / ".installed").exists():
        pytest.skip("transformers 4.x not installed: run `make install .venv/tf4/.installed` (make test does)")
    _, folder = quantized("gpt2", "int4")
    artifact = tmp_path / "artifact"
    api.package(folder, artifact)
    out = _toolkit(artifact, {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5}})
    assert isinstance(out, list) and isinstance(out[0]["generated_text"], str)
