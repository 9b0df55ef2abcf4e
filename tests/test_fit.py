"""Memory estimates against hand arithmetic on known configs, fit boundaries, shards, suggestions and cost.

Large models are ModelInfo objects built from their real config.json fields: the estimate reads
only the config and the parameter count, never weights.
"""

from __future__ import annotations

import math

import pytest

from cloudllm.catalog import InstanceType, lookup, resolve
from cloudllm.errors import UserError
from cloudllm.fit import (
    GPU_USABLE_FRACTION,
    HOST_USABLE_FRACTION,
    INT4_GROUP_SIZE,
    RUNTIME_OVERHEAD_BYTES,
    GiB,
    Workload,
    check_max_total_tokens,
    cheapest_fits,
    estimate_cost,
    estimate_memory,
    fit_instance,
    fit_local,
    fit_table,
    model_dims,
    plan_cost,
    plan_fit,
)
from cloudllm.model_source import ModelInfo
from cloudllm.plan import serving_settings
from cloudllm.spec import DeploySpec, spec_from_kwargs

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA3_8B_PARAMS = 8_030_261_248
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64}
LLAMA3_70B_PARAMS = 70_553_706_496
LLAMA2_7B = {**LLAMA3_8B, "intermediate_size": 11008, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
LLAMA2_7B_PARAMS = 6_738_415_616
GPT2 = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "n_positions": 1024,
    "vocab_size": 50257,
}
GPT2_PARAMS = 124_439_808


def model_info(config: dict, parameters: int, dtype: str = "bfloat16", task: str = "text-generation", **extra) -> ModelInfo:
    stored = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    return ModelInfo(
        path="/models/m",
        architecture=(config.get("architectures") or [None])[0],
        model_type=config.get("model_type"),
        task=task,
        parameters=parameters,
        dtype=dtype,
        weight_bytes=parameters * stored,
        total_bytes=parameters * stored,
        weight_format="safetensors",
        files=[],
        config=config,
        **extra,
    )


def work(model: ModelInfo, runtime: str = "tgi", quantize: str | None = None, total: int = 4096, inputs: int = 2048, batch: int = 8):
    return Workload(model, runtime, quantize, None, total, inputs, batch)


def gpu(memory_gib: float, count: int = 1, price: float = 1.0, name: str = "ml.test") -> InstanceType:
    return InstanceType(
        provider="sagemaker", name=name, kind="gpu", accelerator="TEST", accelerator_count=count,
        accelerator_memory_gib=memory_gib, vcpu=8, memory_gib=64, price_per_hour=price, region="us-east-1",
    )  # fmt: skip


def activations(w: Workload, hidden: int, intermediate: int, vocab: int, dtype_bytes: int, batch: int, shards: int = 1) -> int:
    return batch * w.max_input_tokens * (2 * hidden + 2 * math.ceil(intermediate / shards)) * dtype_bytes + batch * vocab * 4


# --- the estimate ----------------------------------------------------------------------------
def test_llama_gqa_estimate_matches_arithmetic():
    w = work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS))
    mem = estimate_memory(w)
    kv_per_token = 2 * 32 * 8 * 128 * 2  # K and V x layers x kv_heads x head_dim x bf16
    assert mem.kv_cache_bytes_per_position == kv_per_token == 131_072
    assert mem.kv_cache_bytes == kv_per_token * 4096 * 8 == 4 * GiB
    assert mem.weights_bytes == LLAMA3_8B_PARAMS * 2
    assert mem.dtype == "bfloat16"
    assert mem.activations_bytes == activations(w, 4096, 14336, 128256, 2, batch=1)  # engines prefill one prompt at a time
    assert mem.overhead_bytes == RUNTIME_OVERHEAD_BYTES
    assert mem.total_bytes == mem.weights_bytes + mem.kv_cache_bytes + mem.activations_bytes + mem.overhead_bytes


def test_gpt2_names_and_dtype_per_runtime():
    model = model_info(GPT2, GPT2_PARAMS, dtype="float32")
    handler = estimate_memory(work(model, "handler", total=1024, inputs=512, batch=4))
    assert handler.dtype == "float32"  # the handler keeps the checkpoint's dtype on GPU
    assert handler.kv_cache_bytes_per_position == 2 * 12 * 12 * 64 * 4
    assert handler.kv_cache_bytes == 2 * 12 * 12 * 64 * 4 * 1024 * 4
    assert handler.weights_bytes == GPT2_PARAMS * 4
    tgi = estimate_memory(work(model, "tgi", total=1024, inputs=512, batch=4))
    assert tgi.dtype == "float16"  # TGI/vLLM serve float32 checkpoints in float16
    assert tgi.weights_bytes == GPT2_PARAMS * 2
    assert tgi.kv_cache_bytes_per_position == 2 * 12 * 12 * 64 * 2
    on_cpu = estimate_memory(work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS), "handler"), on_gpu=False)
    assert on_cpu.dtype == "float32" and on_cpu.weights_bytes == LLAMA3_8B_PARAMS * 4


def test_explicit_dtype_wins():
    model = model_info(GPT2, GPT2_PARAMS, dtype="float32")
    w = Workload(model, "handler", None, "bfloat16", 1024, 512, 1)
    assert estimate_memory(w).weights_bytes == GPT2_PARAMS * 2


def test_multi_query_head_dim_and_text_config():
    falcon = {"architectures": ["FalconForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 71,
              "hidden_size": 4544, "multi_query": True, "vocab_size": 65024}  # fmt: skip
    dims = model_dims(model_info(falcon, 7_000_000_000))
    assert (dims.kv_heads, dims.head_dim) == (1, 64)
    gemma = {"architectures": ["GemmaForCausalLM"], "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 16, "head_dim": 256, "hidden_size": 3072, "vocab_size": 256000}  # fmt: skip
    assert model_dims(model_info(gemma, 8_500_000_000)).head_dim == 256  # not 3072 / 16
    llava = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": LLAMA3_8B}
    dims = model_dims(model_info(llava, LLAMA3_8B_PARAMS))
    assert (dims.layers, dims.kv_heads, dims.head_dim) == (32, 8, 128)


def test_latent_attention_caches_the_latent_not_k_and_v():
    mla = {**LLAMA3_8B, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    mem = estimate_memory(work(model_info(mla, LLAMA3_8B_PARAMS)))
    assert mem.kv_cache_bytes_per_position == 32 * (512 + 64) * 2


def test_encoder_only_models_have_no_kv_cache():
    bert = {"architectures": ["BertForSequenceClassification"], "num_hidden_layers": 12, "num_attention_heads": 12,
            "hidden_size": 768, "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512}  # fmt: skip
    mem = estimate_memory(work(model_info(bert, 109_000_000, dtype="float32", task="text-classification"), "handler", total=512, inputs=512))
    assert mem.kv_cache_bytes == 0 and mem.kv_cache_bytes_per_position == 0


def test_int8_and_int4_keep_embeddings_at_16_bit():
    model = model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)
    embedding = 128256 * 4096 * 2  # embed_tokens + untied lm_head
    linear = LLAMA3_8B_PARAMS - embedding
    int8 = estimate_memory(work(model, "handler", "int8"))
    assert int8.weights_bytes == int(linear * 1 + linear * 2 / 4096 + embedding * 2)
    assert int8.weight_format == "int8"
    int4 = estimate_memory(work(model, "handler", "int4"))
    assert int4.weights_bytes == int(linear * 0.5 + linear * 4 / INT4_GROUP_SIZE + embedding * 2)
    assert int4.dtype == "bfloat16" and int4.kv_cache_bytes == 4 * GiB  # the KV cache stays 16-bit
    fp8 = estimate_memory(work(model, "tgi", "fp8"))
    assert fp8.weights_bytes == linear + embedding * 2
    # GPT-2 ties lm_head to wte and learns position embeddings: both stay 16-bit
    gpt2 = estimate_memory(work(model_info(GPT2, GPT2_PARAMS, dtype="float16"), "handler", "int8", total=1024, inputs=512))
    gpt2_embedding = 50257 * 768 + 1024 * 768
    gpt2_linear = GPT2_PARAMS - gpt2_embedding
    assert gpt2.weights_bytes == int(gpt2_linear + gpt2_linear * 2 / 768 + gpt2_embedding * 2)


def test_engine_bitsandbytes_is_8_bit_on_tgi_and_4_bit_on_vllm():
    model = model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)
    tgi = estimate_memory(work(model, "tgi", "bitsandbytes"))
    vllm = estimate_memory(work(model, "vllm", "bitsandbytes"))
    assert vllm.weights_bytes < tgi.weights_bytes < LLAMA3_8B_PARAMS * 2


def test_pre_quantized_models_count_their_file_bytes():
    model = model_info(LLAMA3_8B, LLAMA3_8B_PARAMS, quantization="awq")
    model.weight_bytes = 5_700_000_000
    mem = estimate_memory(work(model))
    assert mem.weights_bytes == 5_700_000_000 and "awq" in mem.weight_format


def test_unknown_quantization_is_a_user_error():
    with pytest.raises(UserError, match="unknown quantization 'int3'"):
        estimate_memory(work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS), quantize="int3"))


@pytest.mark.parametrize(
    "missing, named",
    [("num_hidden_layers", "num_hidden_layers"), ("num_attention_heads", "num_attention_heads"), ("vocab_size", "vocab_size")],
)
def test_missing_config_field_is_named(missing, named):
    config = {k: v for k, v in LLAMA3_8B.items() if k != missing}
    with pytest.raises(UserError) as err:
        estimate_memory(work(model_info(config, LLAMA3_8B_PARAMS)))
    assert f"config.json has no {named}" in err.value.line()


def test_missing_gpt2_layer_count_names_the_llama_and_gpt2_fields():
    config = {k: v for k, v in GPT2.items() if k != "n_layer"}
    with pytest.raises(UserError) as err:
        model_dims(model_info(config, GPT2_PARAMS, dtype="float32"))
    assert "num_hidden_layers" in err.value.line() and "n_layer" in err.value.line()


def test_max_total_tokens_beyond_the_model_is_refused():
    check_max_total_tokens(model_info(GPT2, GPT2_PARAMS), 1024)
    with pytest.raises(UserError) as err:
        check_max_total_tokens(model_info(GPT2, GPT2_PARAMS), 1025)
    assert "n_positions" in err.value.line() and "--max-total-tokens 1024" in err.value.line()
    scaled = {**LLAMA3_8B, "max_position_embeddings": 8192, "rope_scaling": {"factor": 4.0, "rope_type": "yarn"}}
    check_max_total_tokens(model_info(scaled, LLAMA3_8B_PARAMS), 32768)
    with pytest.raises(UserError, match="32,768 tokens"):
        check_max_total_tokens(model_info(scaled, LLAMA3_8B_PARAMS), 32769)
    with pytest.raises(UserError, match="max_total_tokens"):
        spec_from_kwargs("/models/m", serving={"max_total_tokens": 2_000_000})  # absurd: above 1M in any model


# --- fit --------------------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", ["handler", "tgi"])
def test_fit_boundary_is_the_usable_fraction(runtime):
    w = work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS), runtime, batch=1)
    required = estimate_memory(w).total_bytes  # one device, one request: everything counts
    exact = fit_instance(w, gpu((required / GPU_USABLE_FRACTION + 2) / GiB), suggest=False)
    assert exact.fits and exact.verdict == "fits" and 0 <= exact.margin_bytes < 8
    assert exact.required_bytes == required
    short = fit_instance(w, gpu((required / GPU_USABLE_FRACTION - 16) / GiB), suggest=False)
    assert short.fits is False and short.verdict == "does-not-fit" and short.margin_bytes < 0
    assert "short by" in short.summary


def test_llama3_8b_fits_a_g5_xlarge_with_the_margin_shown():
    report = fit_instance(work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)), lookup("sagemaker", "ml.g5.xlarge"))
    assert report.fits and report.shards == 1 and report.concurrent_requests == 8
    assert report.usable_bytes == int(24 * GiB * 0.9)
    assert report.margin_bytes == report.usable_bytes - report.required_bytes > 0
    assert report.summary.startswith("fits ml.g5.xlarge: needs 20.1 GiB per GPU of 21.6 GiB usable (90% of 24.0 GiB)")


def test_does_not_fit_reports_shortfall_quantization_and_cheapest_fits():
    model = model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)
    report = fit_instance(work(model, "handler"), lookup("sagemaker", "ml.g4dn.xlarge"))
    assert report.fits is False
    assert -report.margin_bytes > 6 * GiB
    assert report.quantize_would_fit == {"int8": False, "int4": True}
    prices = [s.price_per_hour for s in report.suggestions]
    assert prices == sorted(prices) and len(prices) == 3
    cheapest = min(i.price_per_hour for i, _ in fit_table(work(model, "handler"), "sagemaker") if i.price_per_hour is not None)
    assert prices[0] == cheapest
    for suggestion in report.suggestions:
        assert fit_instance(work(model, "handler"), lookup("sagemaker", suggestion.instance), suggest=False).fits
    text = "\n".join(report.lines())
    assert "--quantize int4 would fit ml.g4dn.xlarge" in text and "cheapest that fit: " in text


def test_engine_modes_are_tried_for_tgi():
    report = fit_instance(work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)), lookup("sagemaker", "ml.g4dn.xlarge"))
    assert report.quantize_would_fit == {"bitsandbytes": True, "bitsandbytes-nf4": True}


def test_engines_start_with_a_smaller_kv_pool_the_handler_does_not():
    model = model_info(LLAMA2_7B, LLAMA2_7B_PARAMS)  # no GQA: 0.5 MiB of KV per token
    g5 = lookup("sagemaker", "ml.g5.xlarge")
    tgi = fit_instance(work(model, "tgi"), g5)
    assert tgi.fits and 1 <= tgi.concurrent_requests < 8
    assert any("holds" in note for note in tgi.notes)
    handler = fit_instance(work(model, "handler"), g5)
    assert handler.fits is False
    assert 1 <= handler.max_batch_that_fits < 8
    assert fit_instance(work(model, "handler", batch=handler.max_batch_that_fits), g5, suggest=False).fits
    assert not fit_instance(work(model, "handler", batch=handler.max_batch_that_fits + 1), g5, suggest=False).fits


def _per_gpu_tgi(n: int, w: Workload) -> int:
    """Llama-3-70B per GPU with tensor parallel degree n, by hand."""
    weights = math.ceil(LLAMA3_70B_PARAMS * 2 / n)
    kv = 2 * 80 * math.ceil(8 / n) * 128 * 2 * w.max_total_tokens * w.max_batch
    return weights + kv + activations(w, 8192, 28672, 128256, 2, batch=1, shards=n) + RUNTIME_OVERHEAD_BYTES


@pytest.mark.parametrize("instance", ["ml.g5.48xlarge", "ml.p4d.24xlarge", "ml.p4de.24xlarge", "ml.p5.48xlarge"])
def test_shards_are_the_smallest_gpu_count_that_fits(instance):
    w = work(model_info(LLAMA3_70B, LLAMA3_70B_PARAMS))
    row = lookup("sagemaker", instance)
    usable = int(row.accelerator_memory_gib * GiB * GPU_USABLE_FRACTION)
    expected = next(n for n in (1, 2, 4, 8) if _per_gpu_tgi(n, w) <= usable)
    report = fit_instance(w, row, suggest=False)
    assert report.fits and report.shards == expected
    assert report.required_bytes == _per_gpu_tgi(expected, w)


def test_70b_on_a2_ultragpu_and_g5_xlarge():
    w = work(model_info(LLAMA3_70B, LLAMA3_70B_PARAMS))
    assert fit_instance(w, resolve("vertex", "a2-ultragpu-4g"), suggest=False).shards == 2
    small = fit_instance(w, lookup("sagemaker", "ml.g5.xlarge"))
    assert small.fits is False and small.shards == 1
    assert [s.instance for s in small.suggestions] and all(s.shards for s in small.suggestions)


def test_shards_must_divide_the_attention_heads():
    odd = {**LLAMA3_8B, "num_attention_heads": 12, "num_key_value_heads": 12, "hidden_size": 1536}
    model = model_info(odd, 60_000_000_000)  # 112 GiB of weights: 8 A10Gs would hold it, 4 cannot
    report = fit_instance(work(model, batch=1), lookup("sagemaker", "ml.g5.48xlarge"), suggest=False)
    assert report.shards == 4 and report.fits is False  # 12 heads do not split 8 ways


@pytest.mark.parametrize(
    "heads, kv_heads, gpus, engine_gpus",
    [(32, 8, 8, 8), (28, 4, 8, 4), (12, 12, 8, 4), (32, 8, 4, 4), (14, 2, 8, 2), (32, 1, 8, 8), (40, 40, 1, 1), (32, 8, 0, 1)],
)
def test_engines_shard_over_the_most_gpus_that_split_the_heads(heads, kv_heads, gpus, engine_gpus):
    """NUM_SHARD / SM_NUM_GPUS / tensor parallel degree: every GPU when the heads split evenly (28 heads cannot go 8 ways)."""
    from cloudllm.fit import engine_shard_count

    config = {**LLAMA3_8B, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": heads * 128}
    assert engine_shard_count(model_info(config, LLAMA3_8B_PARAMS), gpus) == engine_gpus


def test_handler_spreads_layers_with_the_device_map():
    report = fit_instance(work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS), "handler"), lookup("sagemaker", "ml.g4dn.12xlarge"))
    assert report.fits and report.shards == 2
    assert any("device map" in note for note in report.notes)


def test_cpu_instances_fit_small_models_on_the_handler_only():
    tiny = model_info(GPT2, GPT2_PARAMS, dtype="float32")
    cpu = lookup("sagemaker", "ml.m5.xlarge")
    handler = fit_instance(work(tiny, "handler", total=1024, inputs=512), cpu)
    assert handler.fits and handler.target == "cpu" and handler.shards is None
    assert handler.usable_bytes == int(16 * GiB * HOST_USABLE_FRACTION)
    tgi = fit_instance(work(tiny, "tgi", total=1024, inputs=512), cpu)
    assert tgi.fits is False and "tgi needs a GPU" in tgi.notes[0]
    assert all(lookup("sagemaker", s.instance).kind == "gpu" for s in tgi.suggestions)
    cheapest = cheapest_fits(work(tiny, "handler", total=1024, inputs=512), "sagemaker")
    assert cheapest[0].instance == "ml.c5.large"  # the cheapest row of all fits a 124M model


def test_neuron_instances_are_not_offered():
    report = fit_instance(work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)), lookup("sagemaker", "ml.inf2.24xlarge"))
    assert report.fits is False and "Neuron" in report.notes[0]
    assert all(not s.instance.startswith("ml.inf2") for s in report.suggestions)


def test_vertex_suggestions_carry_the_accelerator_flag():
    w = work(model_info(LLAMA3_8B, LLAMA3_8B_PARAMS), batch=1, total=1024, inputs=512)
    report = fit_instance(w, resolve("vertex", "n1-standard-4", "NVIDIA_TESLA_T4:1"))
    assert report.fits is False
    n1 = [s for s in report.suggestions if s.instance.startswith("n1-")]
    assert n1 and all(s.accelerator for s in n1)
    assert "--accelerator NVIDIA_TESLA_T4:2" in n1[0].line()


def test_local_fit_uses_this_machines_ram():
    model = model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)
    w = work(model, "handler", total=1024, inputs=512, batch=1)
    need = estimate_memory(w, on_gpu=False).total_bytes
    assert fit_local(w, ram_bytes=int(need / HOST_USABLE_FRACTION) + 2).fits
    small = fit_local(w, ram_bytes=16 * GiB)
    assert small.fits is False and small.target == "local" and small.instance is None
    assert "this machine's RAM" in small.summary


def test_plan_fit_and_cost_from_spec():
    model = model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)
    spec = DeploySpec(name="m", model="/models/m", provider="sagemaker", instance="ml.g5.xlarge", max_instances=3,
                      serving={"max_total_tokens": 4096, "max_batch_size": 8})  # fmt: skip
    instance = resolve("sagemaker", "ml.g5.xlarge")
    report = plan_fit(spec, model, serving_settings(spec, model), "tgi", instance)
    assert report.fits and report.max_total_tokens == 4096 and report.max_batch == 8
    cost = plan_cost(spec, instance)
    assert (cost.per_hour_min, cost.per_hour_max) == (1.41, 4.22)
    assert cost.per_30_days_min == round(1.408 * 720, 2) == 1013.76
    assert cost.per_30_days_max == round(1.408 * 3 * 720, 2)
    assert cost.region == "us-east-1" and "indicative" in cost.note
    assert plan_cost(spec.model_copy(update={"provider": "local", "instance": None}), None) is None


def test_no_instance_gives_unknown_verdict_with_suggestions():
    model = model_info(LLAMA3_8B, LLAMA3_8B_PARAMS)
    spec = DeploySpec(name="m", model="/models/m", provider="vertex")
    report = plan_fit(spec, model, serving_settings(spec, model), "vllm", None)
    assert report.verdict == "unknown" and report.fits is None
    assert report.suggestions and all(lookup("vertex", s.instance) for s in report.suggestions)
    assert report.summary.startswith("fit unknown: no instance chosen")
    plugin = plan_fit(spec.model_copy(update={"provider": "myplugin"}), model, serving_settings(spec, model), "vllm", None)
    assert plugin.verdict == "unknown" and "myplugin provider's instance types" in plugin.summary and not plugin.suggestions


def test_cost_scale_to_zero_and_ranges():
    cost = estimate_cost(lookup("vertex", "g2-standard-8"), 0, 2)
    assert cost.per_hour_min == 0 and cost.per_hour_max == round(0.9817 * 2, 2)
    assert "0..2 instance(s)" in cost.line()
