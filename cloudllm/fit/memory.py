"""How much memory a model needs on one device: answered from config.json alone.

No weights are loaded. Memory per device is the sum of

- weights at the serving dtype or quantization (embeddings and the LM head stay at the
  compute dtype under weight-only quantization; only the other linear layers shrink),
- the KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes x max_total_tokens x batch,
- prefill activations (hidden and MLP intermediates of the prompt tokens, plus fp32 logits),
- a fixed runtime overhead per device (CUDA context, cuBLAS/NCCL workspaces, the server process),

and it must stay under a usable fraction of the device's memory (verdict.py places it there).

TGI and vLLM allocate the KV cache as a pool: they start when one full-length request fits
and serve fewer requests at once when the pool is short. The handler runtime pads a whole
batch, so it needs max_batch full-length requests to fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from cloudllm.adapters import adapter_gpu_bytes
from cloudllm.errors import UserError
from cloudllm.model_source import ModelInfo

if TYPE_CHECKING:
    from cloudllm.spec import DeploySpec
    from cloudllm_runtime.settings import ServingSettings

GiB = 1024**3

# Per device: CUDA context (~0.5 GiB), cuBLAS/NCCL workspaces, the server's Python process.
RUNTIME_OVERHEAD_BYTES = 1 * GiB
# Group-wise int4 (group 128) stores a 16-bit scale and zero point per group.
INT4_GROUP_SIZE = 128
ENGINE_RUNTIMES = ("tgi", "vllm")

# quantize mode -> (bytes per quantized weight, what it is)
QUANTIZE_MODES: dict[str, tuple[float, str]] = {
    "int8": (1.0, "int8 weight-only, shipped quantized"),
    "int4": (0.5, "int4 weight-only (group 128), shipped quantized"),
    "bitsandbytes": (1.0, "bitsandbytes 8-bit, quantized by the engine at load"),
    "bitsandbytes-nf4": (0.5, "bitsandbytes NF4, quantized by the engine at load"),
    "bitsandbytes-fp4": (0.5, "bitsandbytes FP4, quantized by the engine at load"),
    "eetq": (1.0, "EETQ 8-bit, quantized by the engine at load"),
    "fp8": (1.0, "FP8 weights, quantized by the engine at load"),
}

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}

# Field names per family: Llama/BERT, GPT-2, T5, MPT/DistilBERT, then BART/mBART/Pegasus/Marian.
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads", "decoder_attention_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim")
_HEAD_DIM = ("head_dim", "d_kv")
_INTERMEDIATE = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "ffn_hidden_size", "hidden_dim", "decoder_ffn_dim", "encoder_ffn_dim")
_POSITIONS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
_GENERATIVE_TASKS = ("text-generation", "text2text-generation", "summarization")


# --- the model's shape ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """What memory depends on, read from config.json (text_config for multimodal models)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    decoder_layers: int  # layers holding a KV cache
    encoder_decoder: bool
    kv_per_token_override: int | None = None  # elements per token per layer (MLA caches a latent, not K and V)


def _field(config: dict, names: tuple[str, ...]):
    for source in (config, config.get("text_config") or {}):
        for name in names:
            value = source.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return int(value)
    return None


def _missing(model: ModelInfo, names: tuple[str, ...], why: str) -> UserError:
    alt = f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""
    return UserError(
        f"{model.path}/config.json has no {names[0]}{alt}: {why}",
        f"add {names[0]} from the model's original config.json",
    )


def model_dims(model: ModelInfo) -> ModelDims:
    """The model's shape; UserError naming the config field when one the estimate needs is missing."""
    config = model.config
    why = "cannot size the KV cache and activations"
    layers = _field(config, _LAYERS)
    if layers is None:
        raise _missing(model, _LAYERS, why)
    heads = _field(config, _HEADS)
    if heads is None:
        raise _missing(model, _HEADS, why)
    hidden = _field(config, _HIDDEN)
    head_dim = _field(config, _HEAD_DIM)
    if head_dim is None:
        if hidden is None:
            raise _missing(model, _HEAD_DIM + _HIDDEN, why)
        head_dim = hidden // heads
    if hidden is None:
        hidden = heads * head_dim
    kv_heads = _field(config, _KV_HEADS)
    if kv_heads is None:
        kv_heads = 1 if config.get("multi_query") else heads
    intermediate = _field(config, _INTERMEDIATE) or 4 * hidden
    vocab = _field(config, ("vocab_size", "padded_vocab_size"))
    if vocab is None:
        raise _missing(model, ("vocab_size",), "cannot size the embeddings and logits")
    encoder_decoder = bool(config.get("is_encoder_decoder"))
    decoder_layers = _field(config, ("num_decoder_layers", "decoder_layers")) or layers
    kv_lora_rank = _field(config, ("kv_lora_rank",))
    override = None
    if kv_lora_rank:
        override = kv_lora_rank + (_field(config, ("qk_rope_head_dim",)) or 0)
    tied = config.get("tie_word_embeddings", True)
    return ModelDims(
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=hidden,
        intermediate=intermediate,
        vocab=vocab,
        tied_embeddings=bool(tied),
        decoder_layers=decoder_layers,
        encoder_decoder=encoder_decoder,
        kv_per_token_override=override,
    )


def max_total_tokens_limit(model: ModelInfo) -> tuple[int, str] | None:
    """The longest sequence the model was trained for (stretched by rope_scaling.factor), and the field saying so."""
    config = {**(model.config.get("text_config") or {}), **model.config}
    name = next((n for n in _POSITIONS if isinstance(config.get(n), int) and config[n] > 0), None)
    if name is None:
        return None
    positions = config[name]
    scaling = config.get("rope_scaling") or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if isinstance(factor, (int, float)) and factor > 1:
        original = scaling.get("original_max_position_embeddings")
        base = original if isinstance(original, int) and original > 0 else positions
        if base * factor > positions:
            return int(base * factor), f"{name} with rope_scaling factor {factor:g}"
    return positions, name


def check_max_total_tokens(model: ModelInfo, max_total_tokens: int) -> None:
    found = max_total_tokens_limit(model)
    if found and max_total_tokens > found[0]:
        limit, source = found
        raise UserError(
            f"max_total_tokens {max_total_tokens:,} is beyond the {limit:,} tokens this model handles ({source} in config.json)",
            f"use --max-total-tokens {limit} or less",
        )


# --- memory ---------------------------------------------------------------------------------
class MemoryEstimate(BaseModel):
    """Memory the whole model needs on one device (unsharded), in bytes."""

    dtype: str = Field(description="Compute dtype of activations and the KV cache.")
    weight_format: str = Field(description="How weights sit in memory: the dtype or the quantization mode.")
    parameters: int | None
    weights_bytes: int
    kv_cache_bytes: int = Field(description="2 x layers x kv_heads x head_dim x bytes x max_total_tokens x max_batch.")
    kv_cache_bytes_per_position: int = Field(description="K and V of one token (sequence position) over all layers.")
    activations_bytes: int = Field(description="Prefill activations and logits of the batch the runtime pads.")
    overhead_bytes: int = Field(description="Runtime overhead per device.")
    adapters_bytes: int = Field(0, description="LoRA adapters kept beside the weights: rank x (in + out) x modules x dtype, summed.")
    total_bytes: int = Field(description="Sum of the above on one device.")

    def breakdown(self, max_total_tokens: int, max_batch: int) -> str:
        kv = f" + KV cache {gib(self.kv_cache_bytes)} ({max_total_tokens:,} tokens x {max_batch})" if self.kv_cache_bytes else ""
        kv += f" + adapters {gib(self.adapters_bytes)}" if self.adapters_bytes else ""
        return (
            f"weights {gib(self.weights_bytes)} ({self.weight_format}){kv} + activations {gib(self.activations_bytes)}"
            f" + overhead {gib(self.overhead_bytes)} = {gib(self.total_bytes)} unsharded"
        )


@dataclass(frozen=True)
class Workload:
    """What is served, independent of the instance."""

    model: ModelInfo
    runtime: str
    quantize: str | None = None
    dtype: str | None = None  # spec.serving.dtype ("auto" or None: the runtime's choice)
    max_total_tokens: int = 2048
    max_input_tokens: int = 1024
    max_batch: int = 8
    adapters: tuple = ()  # cloudllm.adapters.AdapterInfo of each LoRA adapter served beside the model

    @property
    def engine(self) -> bool:
        return self.runtime in ENGINE_RUNTIMES


def workload_from_spec(spec: "DeploySpec", model: ModelInfo, settings: "ServingSettings", runtime: str, adapters: tuple = ()) -> Workload:
    return Workload(
        adapters=tuple(adapters),
        model=model,
        runtime=runtime,
        quantize=spec.quantize,
        dtype=spec.serving.dtype,
        max_total_tokens=settings.max_total_tokens,
        max_input_tokens=min(settings.max_input_tokens, settings.max_total_tokens),
        max_batch=settings.max_batch_size,
    )


def workload_for_model(model: str, *, runtime: str | None = None, **spec_kwargs) -> Workload:
    """A Workload from a model folder and deploy flags, without a provider (`cloudllm instances --fits`).

    Without a runtime: tgi for text generation (what the cloud providers pick for LLMs), else
    the handler, which is also the only runtime serving shipped int8/int4 weights.
    """
    from cloudllm.model_source import inspect_model
    from cloudllm.spec import serving_settings, spec_from_kwargs

    spec = spec_from_kwargs(model, **spec_kwargs)
    info = inspect_model(spec.model, task=spec.task, allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code)
    if runtime is None:
        offline = (spec.quantize or "").lower() in ("int8", "int4") or info.quantization in ("int8", "int4")
        runtime = "tgi" if info.task == "text-generation" and not offline else "handler"
    return workload_from_spec(spec, info, serving_settings(spec, info), runtime)


def serving_dtype(work: Workload, *, on_gpu: bool) -> str:
    """The dtype weights are computed in: the spec's, else what the runtime picks for this checkpoint."""
    if work.dtype and work.dtype != "auto":
        return work.dtype
    stored = work.model.dtype or work.model.config.get("torch_dtype") or "float32"
    if stored not in ("float32", "float16", "bfloat16", "float64"):
        stored = "bfloat16"  # pre-quantized checkpoints compute in 16-bit
    if not on_gpu:
        return "float32"  # the handler runs float32 on CPU (bf16 matmuls are slow there)
    if work.engine and stored in ("float32", "float64"):
        return "float16"  # TGI and vLLM serve float32 checkpoints in float16
    return stored


def quantize_mode(quantize: str | None) -> tuple[float, str] | None:
    if quantize is None:
        return None
    mode = QUANTIZE_MODES.get(quantize.lower())
    if mode is None:
        raise UserError(f"unknown quantization {quantize!r}", f"use one of: {', '.join(QUANTIZE_MODES)}")
    return mode


def _embedding_params(dims: ModelDims, config: dict) -> int:
    """Embedding and lm_head parameters: they stay at the compute dtype under weight-only quantization."""
    params = dims.vocab * dims.hidden * (1 if dims.tied_embeddings else 2)
    if "n_positions" in config:  # learned position embeddings (GPT-2 style)
        params += config["n_positions"] * dims.hidden
    return params


def estimate_memory(work: Workload, *, on_gpu: bool = True, dims: ModelDims | None = None) -> MemoryEstimate:
    """Memory of the model on one device: weights, KV cache for the full batch, activations, overhead."""
    model = work.model
    dims = dims or model_dims(model)
    dtype = serving_dtype(work, on_gpu=on_gpu)
    dtype_bytes = DTYPE_BYTES.get(dtype)
    if dtype_bytes is None:
        raise UserError(f"unknown serving dtype {dtype!r}", "use auto, float32, float16 or bfloat16")
    weights, weight_format = _weights_bytes(work, dims, dtype, dtype_bytes)
    kv_per_token = kv_bytes_per_token(dims, dtype_bytes)
    batch = work.max_batch
    kv_tokens = work.max_total_tokens + (work.max_input_tokens if dims.encoder_decoder else 0)
    kv = kv_per_token * kv_tokens * batch if generates(model) else 0
    activations = activation_bytes(work, dims, dtype_bytes, batch=1 if work.engine else batch, shards=1)
    adapters = sum(adapter_gpu_bytes(a, dtype_bytes) for a in work.adapters)
    return MemoryEstimate(
        dtype=dtype,
        weight_format=weight_format,
        parameters=model.parameters,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        kv_cache_bytes_per_position=kv_per_token if generates(model) else 0,
        activations_bytes=activations,
        overhead_bytes=RUNTIME_OVERHEAD_BYTES,
        adapters_bytes=adapters,
        total_bytes=weights + kv + activations + RUNTIME_OVERHEAD_BYTES + adapters,
    )


def kv_bytes_per_token(dims: ModelDims, dtype_bytes: int, *, kv_heads: int | None = None, layers: int | None = None) -> int:
    """K and V of one token over all decoder layers (optionally only some heads or layers)."""
    layers = dims.decoder_layers if layers is None else layers
    if dims.kv_per_token_override:
        return layers * dims.kv_per_token_override * dtype_bytes
    heads = dims.kv_heads if kv_heads is None else kv_heads
    return 2 * layers * heads * dims.head_dim * dtype_bytes


def generates(model: ModelInfo) -> bool:
    return model.task in _GENERATIVE_TASKS


def _weights_bytes(work: Workload, dims: ModelDims, dtype: str, dtype_bytes: int) -> tuple[int, str]:
    model = work.model
    if model.quantization:
        return model.weight_bytes, f"pre-quantized ({model.quantization})"
    params = model.parameters
    if params is None:  # pickle weights: scale the file bytes by the dtype change
        stored = DTYPE_BYTES.get(str(model.dtype), 4)
        params = model.weight_bytes // stored
    mode = quantize_mode(work.quantize)
    if mode is None:
        return params * dtype_bytes, dtype
    per_param, _ = mode
    quant = work.quantize.lower()
    if quant == "bitsandbytes" and work.runtime == "vllm":
        per_param = 0.5  # vLLM's in-flight bitsandbytes is 4-bit (TGI's is 8-bit)
    embedding = min(params, _embedding_params(dims, model.config))
    linear = params - embedding
    compute_bytes = min(dtype_bytes, 2)  # quantized models compute in 16-bit
    if per_param < 1:
        scales = linear * 4 / INT4_GROUP_SIZE  # fp16 scale + zero per group
    elif quant == "fp8":
        scales = 0  # one scale per tensor
    else:
        scales = linear * 2 / dims.hidden  # fp16 scale per output channel
    return int(linear * per_param + scales + embedding * compute_bytes), quant


def activation_bytes(work: Workload, dims: ModelDims, dtype_bytes: int, *, batch: int, shards: int) -> int:
    """Prefill of `batch` prompts: hidden states and MLP intermediates (split across shards), fp32 logits."""
    tokens = batch * work.max_input_tokens
    per_token = 2 * dims.hidden + 2 * math.ceil(dims.intermediate / shards)
    return tokens * per_token * dtype_bytes + batch * dims.vocab * 4


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"

