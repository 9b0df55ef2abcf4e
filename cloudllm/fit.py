"""Will the model fit, on how many GPUs, and at what cost: answered from config.json and the catalog.

No weights are loaded. Memory per device is the sum of

- weights at the serving dtype or quantization (embeddings and the LM head stay at the
  compute dtype under weight-only quantization; only the other linear layers shrink),
- the KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes x max_total_tokens x batch,
- prefill activations (hidden and MLP intermediates of the prompt tokens, plus fp32 logits),
- a fixed runtime overhead per device (CUDA context, cuBLAS/NCCL workspaces, the server process),

and it must stay under a usable fraction of the device's memory (the rest is the margin left
for allocator fragmentation and driver reservations).

TGI and vLLM allocate the KV cache as a pool: they start when one full-length request fits
and serve fewer requests at once when the pool is short. The handler runtime pads a whole
batch, so it needs max_batch full-length requests to fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from pydantic import BaseModel, Field

from cloudllm.catalog.instances import HOURS_PER_30_DAYS, InstanceType, catalog_info, catalog_providers, lookup, offers, resolve
from cloudllm.errors import UserError
from cloudllm.model_source import ModelInfo

if TYPE_CHECKING:
    from cloudllm.spec import DeploySpec
    from cloudllm_runtime.settings import ServingSettings

GiB = 1024**3

# The stated margin: this much of a GPU's nominal memory is usable (vLLM's default
# gpu_memory_utilization); the rest absorbs fragmentation and driver reservations.
GPU_USABLE_FRACTION = 0.90
# Host RAM on CPU instances and this machine: the OS and page cache keep the rest.
HOST_USABLE_FRACTION = 0.80
# Per device: CUDA context (~0.5 GiB), cuBLAS/NCCL workspaces, the server's Python process.
RUNTIME_OVERHEAD_BYTES = 1 * GiB
# Group-wise int4 (group 128) stores a 16-bit scale and zero point per group.
INT4_GROUP_SIZE = 128
ENGINE_RUNTIMES = ("tgi", "vllm")
MAX_SHARDS_TRIED = (1, 2, 4, 8, 16)
SUGGESTIONS = 3

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
# The modes worth trying when a model does not fit, per runtime: one 8-bit, one 4-bit
# (int8/int4 are shipped weights, which only the handler serves; engines quantize at load).
QUANTIZE_TO_TRY = {"handler": ("int8", "int4"), "tgi": ("bitsandbytes", "bitsandbytes-nf4"), "vllm": ("fp8",)}

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
    total_bytes: int = Field(description="Sum of the above on one device.")

    def breakdown(self, max_total_tokens: int, max_batch: int) -> str:
        kv = f" + KV cache {gib(self.kv_cache_bytes)} ({max_total_tokens:,} tokens x {max_batch})" if self.kv_cache_bytes else ""
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

    @property
    def engine(self) -> bool:
        return self.runtime in ENGINE_RUNTIMES


def workload_from_spec(spec: "DeploySpec", model: ModelInfo, settings: "ServingSettings", runtime: str) -> Workload:
    return Workload(
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


def _quantize_mode(quantize: str | None) -> tuple[float, str] | None:
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
    kv = kv_per_token * kv_tokens * batch if _generates(model) else 0
    activations = _activation_bytes(work, dims, dtype_bytes, batch=1 if work.engine else batch, shards=1)
    return MemoryEstimate(
        dtype=dtype,
        weight_format=weight_format,
        parameters=model.parameters,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        kv_cache_bytes_per_position=kv_per_token if _generates(model) else 0,
        activations_bytes=activations,
        overhead_bytes=RUNTIME_OVERHEAD_BYTES,
        total_bytes=weights + kv + activations + RUNTIME_OVERHEAD_BYTES,
    )


def kv_bytes_per_token(dims: ModelDims, dtype_bytes: int, *, kv_heads: int | None = None, layers: int | None = None) -> int:
    """K and V of one token over all decoder layers (optionally only some heads or layers)."""
    layers = dims.decoder_layers if layers is None else layers
    if dims.kv_per_token_override:
        return layers * dims.kv_per_token_override * dtype_bytes
    heads = dims.kv_heads if kv_heads is None else kv_heads
    return 2 * layers * heads * dims.head_dim * dtype_bytes


def _generates(model: ModelInfo) -> bool:
    return model.task in _GENERATIVE_TASKS


def _weights_bytes(work: Workload, dims: ModelDims, dtype: str, dtype_bytes: int) -> tuple[int, str]:
    model = work.model
    if model.quantization:
        return model.weight_bytes, f"pre-quantized ({model.quantization})"
    params = model.parameters
    if params is None:  # pickle weights: scale the file bytes by the dtype change
        stored = DTYPE_BYTES.get(str(model.dtype), 4)
        params = model.weight_bytes // stored
    mode = _quantize_mode(work.quantize)
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


def _activation_bytes(work: Workload, dims: ModelDims, dtype_bytes: int, *, batch: int, shards: int) -> int:
    """Prefill of `batch` prompts: hidden states and MLP intermediates (split across shards), fp32 logits."""
    tokens = batch * work.max_input_tokens
    per_token = 2 * dims.hidden + 2 * math.ceil(dims.intermediate / shards)
    return tokens * per_token * dtype_bytes + batch * dims.vocab * 4


# --- fitting ---------------------------------------------------------------------------------
class InstanceSuggestion(BaseModel):
    instance: str
    accelerator: str | None = Field(None, description="The --accelerator value for Vertex n1 machines.")
    label: str
    price_per_hour: float | None
    shards: int | None
    margin_bytes: int

    def line(self) -> str:
        price = f"${self.price_per_hour:.2f}/h" if self.price_per_hour is not None else "price unknown"
        gpus = f", {self.shards} GPU{'s' if self.shards != 1 else ''}" if self.shards else ""
        flag = f" --accelerator {self.accelerator}" if self.accelerator else ""
        return f"{self.instance}{flag} ({price}{gpus})"


class FitReport(BaseModel):
    """The verdict: does the model fit, on how many devices, with what margin, and what would."""

    verdict: Literal["fits", "does-not-fit", "unknown"]
    fits: bool | None
    summary: str
    target: Literal["gpu", "neuron", "cpu", "local"] | None = Field(description="What the model is measured against.")
    instance: str | None
    runtime: str
    quantize: str | None
    max_total_tokens: int
    max_input_tokens: int
    max_batch: int
    memory: MemoryEstimate | None
    shards: int | None = Field(description="Devices the model is split across (NUM_SHARD / tensor parallel degree).")
    devices: int = Field(0, description="GPUs or Neuron chips on the instance (0 for CPU).")
    device_memory_bytes: int = Field(0, description="Nominal memory per device (host RAM for CPU).")
    usable_bytes: int = Field(0, description="Memory per device counted on: nominal x the usable fraction.")
    usable_fraction: float = 0
    required_bytes: int = Field(0, description="Memory needed per device with `shards` devices.")
    margin_bytes: int = Field(0, description="usable - required; negative is the shortfall.")
    concurrent_requests: int | None = Field(None, description="Full-length requests the KV cache holds at once.")
    max_batch_that_fits: int | None = Field(None, description="Largest max_batch that fits this instance.")
    quantize_would_fit: dict[str, bool] = Field(default_factory=dict, description="Would --quantize MODE fit this instance?")
    suggestions: list[InstanceSuggestion] = Field(default_factory=list, description="Cheapest instances that fit, by price.")
    notes: list[str] = Field(default_factory=list)

    def lines(self) -> list[str]:
        """The verdict for people: the summary, then what would make it fit."""
        lines = [self.summary]
        if self.memory:
            lines.append("memory: " + self.memory.breakdown(self.max_total_tokens, self.max_batch))
        lines += self.notes
        if self.fits is False:
            would = [f"--quantize {mode}" for mode, ok in self.quantize_would_fit.items() if ok]
            if would:
                lines.append(f"{' or '.join(would)} would fit {self.instance}")
            elif self.quantize_would_fit:
                lines.append(f"neither {' nor '.join('--quantize ' + m for m in self.quantize_would_fit)} would fit {self.instance}")
        if self.fits is False and self.max_batch_that_fits and self.max_batch_that_fits < self.max_batch:
            lines.append(f"--max-batch {self.max_batch_that_fits} would fit")
        if self.suggestions:
            lines.append("cheapest that fit: " + ", ".join(s.line() for s in self.suggestions))
        elif self.fits is False:
            lines.append("no instance in the catalog fits; quantize, shorten --max-total-tokens or lower --max-batch")
        return lines


@dataclass(frozen=True)
class _Placement:
    fits: bool
    full: bool  # the whole max_batch of full-length requests fits
    shards: int
    required: int
    usable: int
    device_bytes: int
    fraction: float
    concurrent: int | None


def _splits(dims: ModelDims, n: int) -> bool:
    """True when TGI/vLLM take tensor parallel degree n: it divides the attention heads, and the
    KV heads split n ways or are replicated evenly (vLLM: kv_heads % n == 0 or n % kv_heads == 0)."""
    return dims.heads % n == 0 and (dims.kv_heads % n == 0 or n % dims.kv_heads == 0)


def _shard_options(dims: ModelDims, devices: int) -> list[int]:
    """Tensor-parallel degrees TGI/vLLM accept: powers of two that split the attention heads."""
    return [n for n in MAX_SHARDS_TRIED if n <= devices and _splits(dims, n)] or [1]


def engine_shard_count(model: ModelInfo, gpus: int) -> int:
    """GPUs a TGI/vLLM engine shards over on an instance with `gpus` GPUs.

    All of them where the attention heads split evenly (the instance is the engine's alone, and
    the spare memory becomes KV cache), else the most that do: TGI and vLLM refuse a tensor
    parallel degree that does not divide the heads (28 heads cannot go 8 ways, 4 can).
    """
    if gpus <= 1:
        return max(gpus, 1)
    try:
        dims = model_dims(model)
    except UserError:
        return gpus  # the config lacks the fields; the engine reads the real ones and says more
    return gpus if _splits(dims, gpus) else max(_shard_options(dims, gpus))


def _required(work: Workload, dims: ModelDims, mem: MemoryEstimate, shards: int, batch: int) -> int:
    dtype_bytes = DTYPE_BYTES[mem.dtype]
    if not _generates(work.model):
        kv_tokens_dev = 0
    elif work.engine:  # tensor parallel: each shard holds its share of the KV heads
        kv_tokens_dev = kv_bytes_per_token(dims, dtype_bytes, kv_heads=math.ceil(dims.kv_heads / shards))
    else:  # accelerate device map: each device holds its share of the layers
        kv_tokens_dev = kv_bytes_per_token(dims, dtype_bytes, layers=math.ceil(dims.decoder_layers / shards))
    tokens = work.max_total_tokens + (work.max_input_tokens if dims.encoder_decoder else 0)
    act_batch = 1 if work.engine else batch
    activations = _activation_bytes(work, dims, dtype_bytes, batch=act_batch, shards=shards if work.engine else 1)
    return math.ceil(mem.weights_bytes / shards) + kv_tokens_dev * tokens * batch + activations + mem.overhead_bytes


def _place(work: Workload, dims: ModelDims, mem: MemoryEstimate, *, devices: int, device_bytes: int, fraction: float) -> _Placement:
    """Smallest shard count that serves the full batch; else, for engines, the one with the most KV room."""
    usable = int(device_bytes * fraction)
    options = _shard_options(dims, devices) if devices else [1]
    per_batch = {n: _required(work, dims, mem, n, work.max_batch) for n in options}
    for n in options:
        if per_batch[n] <= usable:
            return _Placement(True, True, n, per_batch[n], usable, device_bytes, fraction, work.max_batch)
    if work.engine:
        n = options[-1]
        one = _required(work, dims, mem, n, 1)
        if one <= usable:
            per_request = per_batch[n] - one if work.max_batch > 1 else 0
            spare = usable - one
            concurrent = 1 + (spare * (work.max_batch - 1) // per_request if per_request else 0)
            return _Placement(True, False, n, one, usable, device_bytes, fraction, min(work.max_batch, concurrent))
        return _Placement(False, False, n, one, usable, device_bytes, fraction, 0)
    n = options[-1]
    return _Placement(False, False, n, per_batch[n], usable, device_bytes, fraction, 0)


def _placement_on(work: Workload, instance: InstanceType, dims: ModelDims) -> tuple[_Placement, MemoryEstimate]:
    on_gpu = instance.accelerator_count > 0
    mem = estimate_memory(work, on_gpu=on_gpu, dims=dims)
    if on_gpu:
        return _place(
            work, dims, mem,
            devices=instance.accelerator_count,
            device_bytes=int(instance.accelerator_memory_gib * GiB),
            fraction=GPU_USABLE_FRACTION,
        ), mem  # fmt: skip
    return _place(work, dims, mem, devices=0, device_bytes=int(instance.memory_gib * GiB), fraction=HOST_USABLE_FRACTION), mem


def _max_batch_that_fits(work: Workload, fits_with) -> int | None:
    low, high = 0, work.max_batch
    while low < high:
        mid = (low + high + 1) // 2
        if fits_with(dataclasses.replace(work, max_batch=mid)):
            low = mid
        else:
            high = mid - 1
    return low or None


def _usable_for_runtime(instance: InstanceType, runtime: str) -> str | None:
    """Why this runtime cannot run on this instance at all (None when it can)."""
    if instance.kind == "neuron":
        return f"{instance.name} has AWS Inferentia2 chips: it needs a Neuron-compiled model and a neuronx image, which cloudllm does not build"
    if runtime in ENGINE_RUNTIMES and instance.kind == "cpu":
        return f"{runtime} needs a GPU and {instance.name} has none"
    return None


def fit_instance(work: Workload, instance: InstanceType, *, suggest: bool = True) -> FitReport:
    """The verdict for one instance, with suggestions when it does not fit."""
    return _fit(work, instance, suggest=suggest)


def fit_local(work: Workload, *, ram_bytes: int | None = None) -> FitReport:
    """The verdict for this machine: the handler on CPU against its RAM; no instance, no cost."""
    ram = ram_bytes if ram_bytes is not None else machine_ram_bytes()
    machine = InstanceType(provider="local", name="this machine", kind="cpu", vcpu=os.cpu_count() or 1, memory_gib=ram / GiB, region="local")
    return _fit(work, machine, suggest=False, local=True)


def _fit(work: Workload, instance: InstanceType, *, suggest: bool, local: bool = False) -> FitReport:
    dims = model_dims(work.model)
    check_max_total_tokens(work.model, work.max_total_tokens)
    placement, mem = _placement_on(work, instance, dims)
    notes = _notes(work, instance, local=local)
    blocked = _usable_for_runtime(instance, work.runtime)
    if blocked:
        notes.insert(0, blocked)
        placement = dataclasses.replace(placement, fits=False, full=False, concurrent=0)
    report = FitReport(
        verdict="fits" if placement.fits else "does-not-fit",
        fits=placement.fits,
        summary="",
        target="local" if local else instance.kind,
        instance=None if local else instance.label,
        runtime=work.runtime,
        quantize=work.quantize,
        max_total_tokens=work.max_total_tokens,
        max_input_tokens=work.max_input_tokens,
        max_batch=work.max_batch,
        memory=mem,
        shards=placement.shards if instance.accelerator_count else None,
        devices=instance.accelerator_count,
        device_memory_bytes=placement.device_bytes,
        usable_bytes=placement.usable,
        usable_fraction=placement.fraction,
        required_bytes=placement.required,
        margin_bytes=placement.usable - placement.required,
        concurrent_requests=placement.concurrent if _generates(work.model) else None,
        notes=notes,
    )
    if not blocked:
        report.max_batch_that_fits = _max_batch_that_fits(work, lambda w: _placement_on(w, instance, dims)[0].full)
        if work.engine and placement.fits and placement.concurrent < work.max_batch:
            report.notes.append(
                f"the KV cache holds {placement.concurrent} of {work.max_batch} full-length requests at once; "
                f"more wait in the queue"
            )
    if not placement.fits and not blocked:
        current = _quantize_mode(work.quantize)
        for mode in () if work.model.quantization else QUANTIZE_TO_TRY.get(work.runtime, ()):
            if current and QUANTIZE_MODES[mode][0] >= current[0]:
                continue  # no smaller than what is asked already
            report.quantize_would_fit[mode] = _placement_on(dataclasses.replace(work, quantize=mode), instance, dims)[0].fits
    if suggest and not placement.fits:
        report.suggestions = cheapest_fits(work, instance.provider, dims=dims)
    report.summary = _summary(report, None if local else instance)
    return report


def unknown_fit(work: Workload, reason: str, *, provider: str | None = None) -> FitReport:
    """No verdict (no instance chosen, or one the catalog does not know); the estimate and suggestions still stand."""
    check_max_total_tokens(work.model, work.max_total_tokens)
    mem = estimate_memory(work, on_gpu=True)
    suggestions = cheapest_fits(work, provider) if provider in catalog_providers() else []
    return FitReport(
        verdict="unknown",
        fits=None,
        summary=f"fit unknown: {reason}; the model needs about {gib(mem.total_bytes)} on one GPU",
        target=None,
        instance=None,
        runtime=work.runtime,
        quantize=work.quantize,
        max_total_tokens=work.max_total_tokens,
        max_input_tokens=work.max_input_tokens,
        max_batch=work.max_batch,
        memory=mem,
        shards=None,
        suggestions=suggestions,
        notes=[reason],
    )


def cheapest_fits(work: Workload, provider: str | None = None, *, limit: int = SUGGESTIONS, dims: ModelDims | None = None) -> list[InstanceSuggestion]:
    """The cheapest instances (by indicative price) that fit the workload, cheapest first."""
    dims = dims or model_dims(work.model)
    found = []
    for instance in _candidates(work, provider):
        if instance.price_per_hour is None:
            continue
        placement, _ = _placement_on(work, instance, dims)
        if placement.fits:
            found.append(
                InstanceSuggestion(
                    instance=instance.name,
                    accelerator=instance.accelerator_flag if instance.name.startswith("n1-") else None,
                    label=instance.label,
                    price_per_hour=instance.price_per_hour,
                    shards=placement.shards if instance.accelerator_count else None,
                    margin_bytes=placement.usable - placement.required,
                )
            )
    found.sort(key=lambda s: (s.price_per_hour, -s.margin_bytes, s.label))
    return found[:limit]


def fit_table(work: Workload, provider: str | None = None) -> list[tuple[InstanceType, FitReport]]:
    """Every catalog configuration the workload fits, cheapest first (`cloudllm instances --fits`)."""
    rows = []
    for instance in _candidates(work, provider):
        report = fit_instance(work, instance, suggest=False)
        if report.fits:
            rows.append((instance, report))
    rows.sort(key=lambda r: (r[0].price_per_hour is None, r[0].price_per_hour or 0, r[0].provider, r[0].label))
    return rows


def _candidates(work: Workload, provider: str | None) -> list[InstanceType]:
    """Configurations worth proposing: ones the runtime runs on; CPU ones only for models under 1B parameters
    (larger ones generate too slowly there, however much RAM there is)."""
    params = work.model.parameters or work.model.weight_bytes // 2
    return [
        instance
        for instance in offers(provider)
        if not _usable_for_runtime(instance, work.runtime) and (instance.kind != "cpu" or params < 1_000_000_000)
    ]


def _notes(work: Workload, instance: InstanceType, *, local: bool) -> list[str]:
    if local:
        return ["measured against this machine's RAM (the local provider runs the handler on CPU, float32)"]
    notes = []
    if instance.note:
        notes.append(instance.note)
    if work.runtime == "handler" and instance.accelerator_count > 1:
        notes.append("the handler runtime spreads layers over the GPUs with accelerate's device map")
    return notes


def _summary(report: FitReport, instance: InstanceType | None) -> str:
    where = "this machine's RAM" if instance is None else instance.label
    if report.fits:
        per = _per_device(report)
        return (
            f"fits {where}: needs {gib(report.required_bytes)}{per} of {gib(report.usable_bytes)} usable "
            f"({report.usable_fraction:.0%} of {gib(report.device_memory_bytes)}), margin {gib(report.margin_bytes)}"
        )
    shortfall = -report.margin_bytes
    if shortfall > 0:
        per = _per_device(report)
        return (
            f"does not fit {where}: needs {gib(report.required_bytes)}{per}, {gib(report.usable_bytes)} usable: "
            f"short by {gib(shortfall)}"
        )
    return f"does not fit {where}: {report.notes[0] if report.notes else 'unsupported'}"


def _per_device(report: FitReport) -> str:
    if not report.shards:
        return ""
    device = "Neuron chip" if report.target == "neuron" else "GPU"
    return f" per {device}" + (f" x {report.shards}" if report.shards > 1 else "")


# --- the plan's entry points -----------------------------------------------------------------
def resolve_instance(
    spec: "DeploySpec", default: str | None = None, accepts_uncatalogued: Callable[[str], bool] = lambda name: False
) -> InstanceType | None:
    """The catalog entry of the spec's instance (or the provider's default).

    None for local and unknown providers, and for instance types the platform takes but
    the catalog lacks (accepts_uncatalogued): those are planned without fit or cost.
    """
    if spec.provider not in catalog_providers():
        return None
    name = spec.instance or default
    if not name:
        return None
    if lookup(spec.provider, name) is None and accepts_uncatalogued(name):
        return None
    return resolve(spec.provider, name, spec.accelerator)


def plan_fit(
    spec: "DeploySpec",
    model: ModelInfo,
    settings: "ServingSettings",
    runtime: str,
    instance: InstanceType | None,
    *,
    ram_bytes: int | None = None,
) -> FitReport:
    """The fit verdict of a deploy: this machine's RAM for local, the instance's devices for clouds."""
    work = workload_from_spec(spec, model, settings, runtime)
    if spec.provider == "local":
        return fit_local(work, ram_bytes=ram_bytes)
    if instance is None:
        if spec.provider not in catalog_providers():
            reason = f"the {spec.provider} provider's instance types are not in cloudllm's catalog"
        elif spec.instance:
            reason = f"{spec.instance} is not in cloudllm's instance catalog"
        else:
            reason = "no instance chosen (pass --instance)"
        return unknown_fit(work, reason, provider=spec.provider)
    return fit_instance(work, instance)


def plan_cost(spec: "DeploySpec", instance: InstanceType | None) -> "CostEstimate | None":
    """Price x min..max instances; None where there is no instance (local) or no catalog entry."""
    if instance is None:
        return None
    return estimate_cost(instance, spec.min_instances, spec.max_instances)


# --- cost ------------------------------------------------------------------------------------
class CostEstimate(BaseModel):
    """Indicative on-demand cost: price x instances, per hour and per 30 days."""

    currency: Literal["USD"] = "USD"
    region: str = Field(description="Region the catalog price is for (not necessarily the deploy region).")
    instance: str
    price_per_hour: float | None
    min_instances: int
    max_instances: int
    per_hour_min: float | None
    per_hour_max: float | None
    per_30_days_min: float | None
    per_30_days_max: float | None
    as_of: str = Field(description="Date of the catalog's prices.")
    note: str

    def line(self) -> str:
        if self.price_per_hour is None:
            return f"{self.instance}: no price in the catalog"
        count = f"{self.min_instances}" if self.min_instances == self.max_instances else f"{self.min_instances}..{self.max_instances}"
        return (
            f"${self.price_per_hour:,.2f}/h x {count} instance(s) = {_span(self.per_hour_min, self.per_hour_max)}/h, "
            f"{_span(self.per_30_days_min, self.per_30_days_max)} per 30 days ({self.note})"
        )


def _span(low: float | None, high: float | None) -> str:
    return f"${low:,.2f}" if low == high else f"${low:,.2f}-${high:,.2f}"


def estimate_cost(instance: InstanceType, min_instances: int, max_instances: int) -> CostEstimate:
    price = instance.price_per_hour
    info = catalog_info()

    def total(count: int, hours: float) -> float | None:
        return None if price is None else round(price * count * hours, 2)

    return CostEstimate(
        region=instance.region,
        instance=instance.label,
        price_per_hour=price,
        min_instances=min_instances,
        max_instances=max_instances,
        per_hour_min=total(min_instances, 1),
        per_hour_max=total(max_instances, 1),
        per_30_days_min=total(min_instances, HOURS_PER_30_DAYS),
        per_30_days_max=total(max_instances, HOURS_PER_30_DAYS),
        as_of=info.as_of,
        note=f"indicative on-demand price in {instance.region} as of {info.as_of}; storage, traffic and taxes not included",
    )


# --- helpers ---------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def machine_ram_bytes() -> int:
    """Physical RAM of this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
