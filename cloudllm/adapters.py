"""LoRA adapters: inspect a PEFT adapter folder without loading it, and check it against its base.

An adapter is served beside one copy of its base model, so what matters at deploy time is
whether its modules exist in the base with the shapes it expects (an adapter trained for
another architecture fails only when the server loads it, after upload, otherwise) and how
many bytes it keeps on the GPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, Field

from cloudllm.errors import UserError
from cloudllm.model_source import DTYPE_BYTES, PICKLE_SUFFIXES, ModelFile, ModelInfo, read_safetensors_header
from cloudllm_runtime.protocol import ADAPTER_NAME, ADAPTER_NAME_RULE  # one name rule: the model server checks it on every request

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft names a LoRA tensor <module path>.lora_A.weight / .lora_B.weight (optionally with the
# adapter name before .weight) under the wrapper's "base_model.model." prefix; an embedding's are
# <module path>.lora_embedding_A / _B, parameters with no .weight.
_LORA_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:(?P<part>[AB])(?:\.[^.]+)?\.weight|embedding_(?P<embedding_part>[AB])(?:\.[^.]+)?)$"
)


class AdapterInfo(BaseModel):
    """What deploy needs to know about one LoRA adapter, read from its folder without loading it."""

    name: str = Field(description="The name requests select it by (--adapter NAME=PATH).")
    path: str
    rank: int = Field(description="LoRA rank r.")
    alpha: float = Field(description="lora_alpha: the adapter's scale is alpha / r.")
    target_modules: list[str] = Field(description="Module paths of the base the adapter changes, as found in its weights.")
    base_model: str | None = Field(description="base_model_name_or_path from adapter_config.json.")
    dtype: str | None = Field(description="The dtype of the adapter's tensors.")
    weight_bytes: int
    parameters: int
    files: list[ModelFile]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "modules": len(self.target_modules),
            "base_model": self.base_model,
            "weight_bytes": self.weight_bytes,
        }


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.match(name or ""):
        raise UserError(
            f"adapter name {name!r} is not valid",
            f"{ADAPTER_NAME_RULE} (e.g. --adapter legal=./lora-legal)",
        )
    return name


def inspect_adapter(name: str, path: str | Path) -> AdapterInfo:
    """Read adapter_config.json and the safetensors header of a PEFT LoRA folder; load nothing."""
    check_adapter_name(name)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"adapter {name!r}: {folder} is not a folder", "pass the folder that holds adapter_config.json")
    config = _read_adapter_config(name, folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p.name for p in folder.iterdir() if p.name.startswith("adapter_model") and p.name.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise UserError(
                f"adapter {name!r} has pickle weights ({pickled[0]}), which can run code when loaded",
                "re-save it as safetensors: PeftModel.from_pretrained(base, DIR).save_pretrained(OUT, safe_serialization=True)",
            )
        raise UserError(f"adapter {name!r}: {folder} has no {ADAPTER_WEIGHTS}", "save the adapter with save_pretrained (safetensors)")
    header = read_safetensors_header(weights)
    modules, parameters, weight_bytes, dtypes = _lora_modules(name, weights.name, header)
    files = [
        ModelFile(name=p.name, path=str(p.resolve()), size=p.stat().st_size)
        for p in (folder / ADAPTER_CONFIG, weights)
    ]
    return AdapterInfo(
        name=name,
        path=str(folder.resolve()),
        rank=config["r"],
        alpha=float(config.get("lora_alpha", config["r"])),
        target_modules=sorted(modules),
        base_model=config.get("base_model_name_or_path") if isinstance(config.get("base_model_name_or_path"), str) else None,
        dtype=max(dtypes, key=dtypes.get) if dtypes else None,
        weight_bytes=weight_bytes,
        parameters=parameters,
        files=files,
    )


def _read_adapter_config(name: str, folder: Path) -> dict:
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserError(f"adapter {name!r}: {folder} has no {ADAPTER_CONFIG}", "pass a PEFT adapter folder (save_pretrained writes it)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"adapter {name!r}: {config_path} is not valid JSON ({exc})", "re-save the adapter with save_pretrained") from None
    if not isinstance(config, dict):
        raise UserError(f"adapter {name!r}: {config_path} is not a JSON object", "re-save the adapter with save_pretrained")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UserError(
            f"adapter {name!r} is a {peft_type or 'untyped'} adapter; only LoRA adapters are served",
            "train a LoRA adapter (peft LoraConfig) or merge this one into the model and deploy the result",
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"adapter {name!r}: r in {ADAPTER_CONFIG} must be a positive integer, not {rank!r}", "re-save the adapter")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not (0 < alpha < 1e6):
        raise UserError(f"adapter {name!r}: lora_alpha in {ADAPTER_CONFIG} must be a positive number, not {alpha!r}", "re-save the adapter")
    return config


def _lora_modules(name: str, file_name: str, header: dict) -> tuple[set[str], int, int, dict[str, int]]:
    modules: dict[str, set[str]] = {}
    parameters = weight_bytes = 0
    dtypes: dict[str, int] = {}
    for tensor, info in header.items():
        count = 1
        for dim in info["shape"]:
            count *= dim
        parameters += count
        weight_bytes += count * DTYPE_BYTES[info["dtype"]]
        dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
        match = _LORA_TENSOR.match(tensor)
        if match:
            modules.setdefault(match["module"], set()).add(match["part"] or match["embedding_part"])
    if not modules:
        raise UserError(f"adapter {name!r}: {file_name} holds no LoRA tensors (lora_A/lora_B)", "re-save the adapter with peft's save_pretrained")
    half = sorted(m for m, parts in modules.items() if parts != {"A", "B"})
    if half:
        raise UserError(f"adapter {name!r}: module {half[0]} has only one of lora_A/lora_B", "the adapter file is incomplete; re-save it")
    return set(modules), parameters, weight_bytes, dtypes


def check_adapter_against_base(adapter: AdapterInfo, model: ModelInfo) -> list[str]:
    """Refuse an adapter whose modules or shapes the base lacks; return warnings (e.g. another base name)."""
    if model.weight_format != "safetensors":
        raise UserError(f"adapter {adapter.name!r} needs a safetensors base model", "convert the base model to safetensors")
    base = _base_linear_shapes(model)
    adapter_header = read_safetensors_header(Path(adapter.path) / ADAPTER_WEIGHTS)
    missing: list[str] = []
    for module in adapter.target_modules:
        shape = _find_module(base, module)
        if shape is None:
            missing.append(module)
            continue
        a_in = _tensor_shape(adapter_header, module, "A")[-1]
        b_out = _tensor_shape(adapter_header, module, "B")[0]
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]: either orientation fits.
        if sorted((a_in, b_out)) != sorted(shape):
            raise UserError(
                f"adapter {adapter.name!r} expects {module} to map {a_in} -> {b_out} features, the base's is {shape[1]} -> {shape[0]}",
                "the adapter was trained for a different model size; deploy it with the base it was trained on",
            )
    if missing:
        names = sorted({m.rsplit(".", 1)[-1] for m in missing})
        raise UserError(
            f"adapter {adapter.name!r} changes modules the base model ({model.architecture}) does not have: {', '.join(names)}",
            "the adapter was trained for another architecture; deploy it with the base it was trained on",
        )
    warnings = []
    base_name = model.config.get("_name_or_path") if isinstance(model.config.get("_name_or_path"), str) else None
    if adapter.base_model and base_name and _short(adapter.base_model) != _short(base_name):
        warnings.append(f"adapter {adapter.name!r} was trained on {adapter.base_model}, the base is {base_name}")
    return warnings


def adapter_gpu_bytes(adapter: AdapterInfo, serving_dtype_bytes: int | None = None) -> int:
    """Bytes the adapter keeps on the accelerator: rank x (in + out) x modules, at the serving dtype."""
    if serving_dtype_bytes is None or not adapter.parameters:
        return adapter.weight_bytes
    return adapter.parameters * serving_dtype_bytes


def _base_linear_shapes(model: ModelInfo) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for f in model.weight_files:
        for tensor, info in read_safetensors_header(f.path).items():
            if tensor.endswith(".weight") and len(info["shape"]) == 2:
                shapes[tensor.removesuffix(".weight")] = tuple(info["shape"])
    return shapes


def _find_module(base: dict[str, tuple[int, int]], module: str) -> tuple[int, int] | None:
    if module in base:
        return base[module]
    # The saved base may lack the wrapper's top-level prefix (GPT2LMHeadModel saves "h.0..." in
    # some exports, "transformer.h.0..." in others), so match on the longest common tail.
    for name, shape in base.items():
        if name.endswith("." + module) or module.endswith("." + name):
            return shape
    return None


def _tensor_shape(header: dict, module: str, part: str) -> list[int]:
    for tensor, info in header.items():
        match = _LORA_TENSOR.match(tensor)
        if match and match["module"] == module and (match["part"] or match["embedding_part"]) == part:
            return info["shape"]
    raise AssertionError(f"{module}.lora_{part} vanished between two reads")  # inspect_adapter checked both exist


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


# --- what a provider ships and compares -------------------------------------------------------
def adapter_files(adapter: AdapterInfo) -> list[tuple[str, str]]:
    """(name relative to the adapter's folder, local path) of each file a provider ships: config and weights."""
    return [(f.name, f.path) for f in adapter.files]


def adapter_digest(adapter: AdapterInfo) -> str:
    """The adapter's content address: sha256 over its files' names and sha256 (the upload key `adapters/<digest>/`)."""
    from cloudllm.hashing import sha256_bytes, sha256_file

    parts = {name: sha256_file(path) for name, path in adapter_files(adapter)}
    return sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def adapters_digest(digests: dict[str, str]) -> str | None:
    """One digest of a set of adapters, {name: adapter_digest}; None for no adapters (the fingerprint leaves it out)."""
    from cloudllm.hashing import sha256_bytes

    return sha256_bytes(json.dumps(digests, sort_keys=True).encode()) if digests else None


def inspect_adapters(adapters: dict[str, str], model: ModelInfo) -> tuple[list[AdapterInfo], list[str]]:
    """Inspect every adapter of a spec and check it against the base; (adapters, warnings)."""
    infos, warnings = [], []
    for name, path in sorted(adapters.items()):
        info = inspect_adapter(name, path)
        warnings += check_adapter_against_base(info, model)
        infos.append(info)
    return infos, warnings


# --- what the serving engines load -------------------------------------------------------------
# TGI loads LoRA only into its flash models whose layers it can look up by Llama's names
# (server/text_generation_server/utils/adapter.py, build_layer_weight_lookup: model.layers[i]
# .self_attn.{q,k,v,o}_proj and .mlp.{gate,up,down}_proj); anything else fails at start. vLLM
# serves LoRA only for models that implement SupportsLoRA (GPT-2 does not), with the same module
# names. Both are checked here, at plan time, rather than found out when the engine loads.
LLAMA_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
ENGINE_LORA_ARCHITECTURES: dict[str, frozenset[str]] = {
    "tgi": frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}),
    "vllm": frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}),
}
# vLLM's --max-lora-rank takes one of these (vllm/config: MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_engine_adapters(runtime: str, architecture: str | None, adapters: list[AdapterInfo]) -> None:
    """Refuse, in one line, adapters the runtime's engine would refuse when it loads them.

    Runtimes not in ENGINE_LORA_ARCHITECTURES (handler: cloudllm's own server, peft) take any
    adapter check_adapter_against_base accepted."""
    if not adapters or runtime not in ENGINE_LORA_ARCHITECTURES:
        return
    supported = ENGINE_LORA_ARCHITECTURES[runtime]
    if architecture not in supported:
        raise UserError(
            f"the {runtime} runtime serves LoRA adapters only on Llama-shaped models ({', '.join(sorted(supported))}), "
            f"not on {architecture or 'a model without architectures in config.json'}",
            "deploy with --runtime handler (cloudllm's server loads adapters with peft), or merge the adapter into the model",
        )
    for adapter in adapters:
        other = sorted({module.rsplit(".", 1)[-1] for module in adapter.target_modules} - LLAMA_LORA_MODULES)
        if other:
            raise UserError(
                f"adapter {adapter.name!r} changes {', '.join(other)}, which {runtime} does not load LoRA into "
                f"(it takes {', '.join(sorted(LLAMA_LORA_MODULES))})",
                "train the adapter on those modules only, or deploy with --runtime handler",
            )
    if runtime == "vllm":
        top = max(adapter.rank for adapter in adapters)
        if top > VLLM_LORA_RANKS[-1]:
            raise UserError(f"adapter rank {top} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}", "use adapters of rank 512 or less")


def vllm_max_lora_rank(adapters: list[AdapterInfo]) -> int:
    """The smallest --max-lora-rank vLLM takes that holds every adapter (a larger one reserves more GPU memory)."""
    top = max((adapter.rank for adapter in adapters), default=1)
    return next(rank for rank in VLLM_LORA_RANKS if rank >= top)
