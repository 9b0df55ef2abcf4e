"""Quantization: int8/int4 weights shipped in the artifact, and engine modes passed to TGI/vLLM.

Three ways a deploy can end up quantized, decided once here:

    offline       int8 | int4         `cloudllm quantize` (or deploy --quantize) writes a new model
                                      folder with optimum-quanto weights; the handler runtime serves it
    engine        bitsandbytes, eetq, fp8 ...   TGI / vLLM quantize full-precision weights at start-up
    pre-quantized config.json quantization_config (awq, gptq, fp8, ...) or our quantization.json:
                                      served as it is, never quantized twice

Offline quantization is weight-only: int8 is per-output-channel absmax (s = max|w|/127,
q = round(w/s)); int4 is asymmetric (scale and zero point) per group of 128 inputs, quanto's
default (smaller groups where 128 does not divide a row, one group per row of <= 128).
GPT-2's Conv1D projections become nn.Linear first, so no projection silently stays
full precision. Embeddings stay in the original dtype, and so does the LM head
(tied to the embeddings in most models; quantizing it would untie and duplicate it).
Every run measures fidelity on a fixed probe set and refuses to write a model whose
greedy next-token agreement with the original falls below the method's threshold.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cloudllm.bundle import copy_file
from cloudllm.console import Reporter
from cloudllm.errors import UserError
from cloudllm.model_source import ModelInfo, inspect_model
from cloudllm_runtime.quantized import (
    FORMAT,
    FORMAT_VERSION,
    MARKER,
    QUANTO_REQUIREMENT,
    WEIGHTS_PREFIX,
    convert_conv1d_to_linear,
)

# Offline methods -> optimum-quanto weight qtype.
OFFLINE_METHODS = {"int8": "qint8", "int4": "qint4"}

# What each runtime quantizes on the fly from full-precision weights (TGI: --quantize /
# QUANTIZE; vLLM through LMI: option.quantize / OPTION_QUANTIZE).
ENGINE_METHODS: dict[str, tuple[str, ...]] = {
    "handler": (),
    "tgi": ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "eetq", "fp8"),
    "vllm": ("fp8", "bitsandbytes"),
}

# Pre-quantized formats (config.json quantization_config.quant_method) each runtime loads.
# TGI and vLLM read the method from config.json themselves; the handler loads them through
# transformers, which needs the format's library (see templates/requirements.txt.j2).
PREQUANTIZED_METHODS: dict[str, tuple[str, ...]] = {
    "handler": ("int8", "int4", "bitsandbytes", "torchao", "compressed-tensors", "fp8"),
    "tgi": ("awq", "gptq", "marlin", "exl2", "compressed-tensors", "fp8", "fbgemm_fp8"),
    "vllm": ("awq", "gptq", "marlin", "compressed-tensors", "fp8", "fbgemm_fp8", "bitsandbytes", "aqlm", "modelopt"),
}

# TGI's --quantize name for a pre-quantized config's quant_method.
_TGI_PREQUANTIZED_NAME = {"fbgemm_fp8": "fp8"}

# Refuse below this greedy next-token agreement with the original (see threshold_for).
AGREEMENT_THRESHOLDS = {"int8": 0.90, "int4": 0.70}

PROBE_TOKENS = 32
PROBE_TEXTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "To reset your password, open Settings, choose Account, then select Security.",
    "The mitochondria is the powerhouse of the cell; it produces most of its ATP.",
    "Q: What is 17 multiplied by 3?\nA: 17 multiplied by 3 is 51.",
    "Summarise this contract: the party of the first part agrees to pay in full.",
    "Les modèles de langage traduisent du texte, écrivent du code et répondent aux questions.",
)

MAX_SHARD_BYTES = 5 * 1024**3
SOURCE_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# --- the report ------------------------------------------------------------------------
class SkippedLayer(BaseModel):
    name: str
    reason: str


class Fidelity(BaseModel):
    """Quantized vs original logits on the fixed probe set (teacher-forced, every position)."""

    probes: int
    positions: int
    max_logit_diff: float | None = Field(description="None when the quantized model produced NaN/inf.")
    mean_logit_diff: float | None
    mean_abs_logit: float = Field(description="Mean |logit| of the original: the scale the diffs compare to.")
    median_margin: float | None = Field(
        None, description="Median gap between the original's top two logits: the smaller, the more a tiny change flips a token."
    )
    agreement: float = Field(description="Share of positions where quantized and original pick the same next token.")
    threshold: float
    passed: bool


class QuantizationReport(BaseModel):
    """What one quantization did: sizes, layers, fidelity."""

    method: str
    source: str
    output: str
    library: str
    dtype: str | None = Field(description="The original dtype; scales are stored in it.")
    bytes_before: int = Field(description="All weight bytes of the original.")
    bytes_after: int = Field(description="All weight bytes written.")
    ratio: float
    layer_bytes_before: int = Field(description="Weight bytes of the layers that were quantized, before.")
    layer_bytes_after: int = Field(description="Their quantized data + scales (+ quanto's two scalar buffers).")
    layer_ratio: float
    quantized: list[str]
    skipped: list[SkippedLayer]
    conv1d_to_linear: list[str]
    group_sizes: dict[str, int] = Field(default_factory=dict, description="int4: layers per group size ('none': per channel).")
    policy: dict[str, str]
    fidelity: Fidelity
    forced: bool = False
    seconds: float = 0.0

    def summary_lines(self) -> list[str]:
        from cloudllm.console import human_bytes

        f = self.fidelity
        lines = [
            f"{self.method}: {len(self.quantized)} layers quantized, {len(self.skipped)} kept in {self.dtype}",
            f"weights: {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)} ({self.ratio:.3f}); "
            f"quantized layers {human_bytes(self.layer_bytes_before)} -> {human_bytes(self.layer_bytes_after)} ({self.layer_ratio:.3f})",
            f"fidelity on {f.probes} probes / {f.positions} positions: next-token agreement {f.agreement:.1%} "
            f"(threshold {f.threshold:.0%}), logit diff max {f.max_logit_diff} mean {f.mean_logit_diff} "
            f"(original: mean |logit| {f.mean_abs_logit:.3f}, median top-2 gap {f.median_margin})",
        ]
        if self.conv1d_to_linear:
            lines.append(f"converted {len(self.conv1d_to_linear)} Conv1D layers to Linear before quantizing")
        for layer in _collapse(self.skipped):
            lines.append(f"kept: {layer}")
        return lines


def _collapse(skipped: list[SkippedLayer], limit: int = 6) -> list[str]:
    """Skipped layers grouped by reason, so a 32-layer model prints a few lines."""
    by_reason: dict[str, list[str]] = {}
    for layer in skipped:
        by_reason.setdefault(layer.reason, []).append(layer.name)
    lines = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        lines.append(f"{shown}: {reason}")
    return lines


def threshold_for(method: str) -> float:
    """Minimum greedy next-token agreement.

    Weight-only int8 per channel is close to lossless on trained LLMs (next-token agreement
    well above 95%), so below 90% something is wrong with the model or the conversion.
    int4 with groups of 128 loses more (a few points of perplexity on 7B models, top-1
    agreement typically in the high 80s); 70% still catches the failures that matter (a
    broken layer gives agreement near 1/vocab). Randomly initialised models are the case it
    cannot tell from a broken one: their logits are nearly flat (the report's median_margin),
    so small weight errors flip the argmax. The benchmark's random 150M Llama scores 38% at
    int4 and is refused, as it should be unless --force; trained models have the margins.
    """
    return AGREEMENT_THRESHOLDS[method]


# --- methods vs runtimes ----------------------------------------------------------------
def all_methods() -> list[str]:
    engine = {m for methods in ENGINE_METHODS.values() for m in methods}
    return [*OFFLINE_METHODS, *sorted(engine)]


def check_method(method: str, runtime: str, model: ModelInfo | None = None) -> str:
    """Validate `--quantize METHOD` for `runtime` (and the model); returns 'offline' or 'engine'."""
    if method not in OFFLINE_METHODS and not any(method in methods for methods in ENGINE_METHODS.values()):
        raise UserError(f"unknown quantization method {method!r}", f"use one of: {', '.join(all_methods())}")
    if model is not None and model.quantization:
        raise UserError(
            f"{model.path} is already quantized ({model.quantization})",
            f"drop --quantize: its {model.quantization} weights are served as they are",
        )
    if method in OFFLINE_METHODS:
        if runtime != "handler":
            raise UserError(
                f"the {runtime} runtime cannot serve {method} weights written by cloudllm quantize",
                f"use --runtime handler, or let {runtime} quantize on the fly: {_served(runtime)}",
            )
        return "offline"
    if method not in ENGINE_METHODS.get(runtime, ()):
        engines = " or ".join(r for r, methods in ENGINE_METHODS.items() if method in methods)
        raise UserError(
            f"the {runtime} runtime cannot apply --quantize {method}",
            f"{method} needs --runtime {engines}; {runtime} serves {_served(runtime)}",
        )
    return "engine"


def check_prequantized(model: ModelInfo, runtime: str) -> None:
    """A pre-quantized model must be one the runtime loads."""
    method = model.quantization
    if method and method not in PREQUANTIZED_METHODS.get(runtime, ()):
        raise UserError(
            f"the {runtime} runtime cannot serve a {method}-quantized model",
            f"{runtime} serves pre-quantized {', '.join(PREQUANTIZED_METHODS.get(runtime, ())) or 'nothing'}; "
            f"pick a runtime that serves {method} with --runtime",
        )


def _served(runtime: str) -> str:
    parts = []
    if runtime == "handler":
        parts.append(f"{' and '.join(OFFLINE_METHODS)} (shipped weights)")
    if ENGINE_METHODS.get(runtime):
        parts.append(f"{', '.join(ENGINE_METHODS[runtime])} (on the fly)")
    if PREQUANTIZED_METHODS.get(runtime):
        prequantized = [m for m in PREQUANTIZED_METHODS[runtime] if m not in OFFLINE_METHODS]
        parts.append(f"pre-quantized {', '.join(prequantized)} models")
    return "; ".join(parts) or "no quantization"


def engine_quantize_env(runtime: str, method: str | None, *, prequantized: bool = False) -> dict[str, str]:
    """Container environment that tells TGI / vLLM (LMI) how to quantize; {} when there is nothing to pass.

    method: spec.quantize (on the fly), or with prequantized=True the model's own method
    (ModelInfo.quantization). TGI: HF_MODEL_QUANTIZE (the SageMaker DLC maps it to QUANTIZE)
    and QUANTIZE (the launcher's own variable, which the Vertex image reads directly); do
    not also set DTYPE, the launcher refuses --dtype with --quantize. vLLM: OPTION_QUANTIZE
    for on-the-fly modes only; vLLM reads a pre-quantized model's method from config.json,
    and LMI advises against setting it. The handler reads quantization.json / config.json
    itself. Raises UserError for a method the runtime cannot serve.
    """
    if not method or runtime == "handler" or (method in OFFLINE_METHODS and not prequantized):
        return {}
    served = PREQUANTIZED_METHODS if prequantized else ENGINE_METHODS
    if method not in served.get(runtime, ()):
        raise UserError(f"the {runtime} runtime cannot serve {method}", f"{runtime} serves {_served(runtime)}")
    if runtime == "tgi":
        name = _TGI_PREQUANTIZED_NAME.get(method, method)
        return {"HF_MODEL_QUANTIZE": name, "QUANTIZE": name}
    if runtime == "vllm" and not prequantized:
        return {"OPTION_QUANTIZE": method}
    return {}


def plan_quantize_env(plan: Any) -> dict[str, str]:
    """engine_quantize_env for a Plan: --quantize when given, else the model's pre-quantized method."""
    if plan.spec.quantize:
        return engine_quantize_env(plan.runtime, plan.spec.quantize)
    return engine_quantize_env(plan.runtime, plan.model.quantization, prequantized=True)


def required_runtime(spec: Any, model: ModelInfo) -> str | None:
    """"handler" when the shipped weights are (or will be) int8/int4, which only it serves; else None."""
    if getattr(spec, "quantize", None) in OFFLINE_METHODS or model.quantization in OFFLINE_METHODS:
        return "handler"
    return None


# --- deploy: quantize into a cache folder, once per source + method ------------------------
def prepare_model(spec: Any, model: ModelInfo, runtime: str, reporter: Reporter | None = None, *, run: bool = True) -> ModelInfo:
    """The model deploy ships: validated against the runtime, quantized first for int8/int4.

    Quantized folders live in $CLOUDLLM_HOME/quantized/<digest>/ keyed by the source files'
    sha256 and the method, so a redeploy reuses them instead of quantizing again. With
    run=False (plan, --dry-run) nothing is quantized: the folder quantized earlier, or the
    source model itself, whose fit is then estimated at the method's bytes per weight.
    """
    from cloudllm.home import home_dir

    reporter = reporter or Reporter()
    method = getattr(spec, "quantize", None)
    if not method:
        check_prequantized(model, runtime)
        return model
    if check_method(method, runtime, model) == "engine":
        return model
    folder = home_dir("quantized") / source_digest(model, method)[:24] / f"{Path(model.path).name}-{method}"
    if (folder / MARKER).is_file():
        reporter.step(f"reusing the {method} weights quantized earlier ({folder})")
    elif not run:
        return model
    else:
        try:
            report = quantize_model(model.path, folder, method=method, task=model.task,
                                    trust_remote_code=model.trust_remote_code, reporter=reporter)  # fmt: skip
            reporter.step(f"quantized {Path(model.path).name} to {method}: {report.summary_lines()[1]}")
        except UserError:
            if not (folder / MARKER).is_file():  # else a concurrent deploy wrote the same folder first
                raise
    return inspect_model(folder, task=model.task, trust_remote_code=model.trust_remote_code)


def source_digest(model: ModelInfo, method: str) -> str:
    """Identity of (source files, method, format): equal digests give equal quantized folders."""
    from cloudllm.hashing import sha256_bytes, sha256_file

    files = {f.name: sha256_file(f.path) for f in model.files}
    key = {"files": files, "method": method, "format": FORMAT, "format_version": FORMAT_VERSION}
    return sha256_bytes(json.dumps(key, sort_keys=True).encode())


# --- quantize a folder ---------------------------------------------------------------------
def quantize_model(
    source: str | Path,
    out: str | Path,
    *,
    method: str,
    overwrite: bool = False,
    force: bool = False,
    exclude: list[str] | tuple[str, ...] = (),
    quantize_lm_head: bool = False,
    min_agreement: float | None = None,
    task: str | None = None,
    trust_remote_code: bool = False,
    reporter: Reporter | None = None,
) -> QuantizationReport:
    """Quantize the model folder `source` into the new folder `out` and report what happened.

    Written to a sibling staging folder and renamed at the end: on any error or refusal
    nothing is left at `out`. Raises UserError for bad input and for agreement below
    min_agreement (default: the method's threshold, see threshold_for) unless force.
    """
    reporter = reporter or Reporter()
    if method not in OFFLINE_METHODS:
        if method not in all_methods():
            raise UserError(f"unknown quantization method {method!r}", f"use --method {' or --method '.join(OFFLINE_METHODS)}")
        engines = " or ".join(r for r, methods in ENGINE_METHODS.items() if method in methods)
        raise UserError(
            f"{method} is applied by the {engines} engine when it loads the model, not written to a folder",
            f"deploy the original with --runtime {engines.split(' or ')[0]} --quantize {method}, or use --method int8 or int4",
        )
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise UserError(f"--min-agreement {min_agreement} is not a share", "pass a number between 0 and 1, e.g. 0.95")
    info = inspect_model(source, task=task, trust_remote_code=trust_remote_code)
    if info.quantization:
        raise UserError(f"{info.path} is already quantized ({info.quantization})", "quantize the original, full-precision model")
    if info.weight_format != "safetensors":
        raise UserError(f"{info.path} has pickle weights", "convert them to safetensors first (save_pretrained(dir, safe_serialization=True))")
    out = Path(out).expanduser().resolve()
    src = Path(info.path).resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise UserError(f"output folder {out} overlaps the model folder {src}", "write the quantized model to a separate folder")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"output folder {out} already exists", "choose another -o or pass --overwrite")

    started = time.monotonic()
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with reporter.waiting(f"quantizing {src.name} to {method}") as status:
            threshold = threshold_for(method) if min_agreement is None else min_agreement
            report = _quantize_into(info, staging, method, list(exclude), quantize_lm_head, threshold, force, status)
        report.output = str(out)
        report.seconds = round(time.monotonic() - started, 2)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            if not overwrite and (out.is_file() or any(out.iterdir())):
                raise UserError(f"output folder {out} was created while quantizing", "choose another -o or pass --overwrite")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _quantize_into(info: ModelInfo, staging: Path, method: str, exclude: list[str], quantize_lm_head: bool, threshold: float,
                   force: bool, status) -> QuantizationReport:  # fmt: skip
    """Quantize, write to `staging`, reload what was written and compare it with the original.

    Both sides of the comparison run in float32: the original's weights upcast exactly and
    the artifact loaded by the serving runtime's own loader, so the figures measure the
    quantization (and prove the round trip), not bf16 kernel noise. Peak memory is the
    original in float32.
    """
    import gc

    import torch
    import transformers
    from optimum.quanto import freeze, quantization_map, quantize
    from optimum.quanto import __version__ as quanto_version

    from cloudllm_runtime.quantized import load_quantized_model

    status("loading the original")
    model, auto_name = _load_original(info)
    dtype = _source_dtype(info)
    status("running the original on the probe set")
    probes = _probe_inputs(info, model)
    reference = _run_probes(model, probes)
    model.to(getattr(torch, dtype))  # back to the checkpoint's dtype (exact): scales are stored in it

    conversions = convert_conv1d_to_linear(model)
    picked, skipped, policy = _pick_layers(model, exclude, quantize_lm_head)
    if not picked:
        raise UserError(
            f"{info.path} has no layers {method} can take (it quantizes nn.Linear and GPT-2 Conv1D projections"
            f"{'; --exclude left none' if exclude else ''})",
            "quantize a model with linear projections, or drop --exclude patterns that match them all",
        )
    layer_bytes_before = sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in picked)

    status(f"quantizing {len(picked)} layers")
    with torch.no_grad():
        quantize(model, weights=OFFLINE_METHODS[method], include=picked)
        freeze(model)
    qmap = quantization_map(model)
    group_sizes: dict[str, int] = {}
    if method == "int4":
        for name in picked:
            size = str(model.get_submodule(name).weight_group_size or "none")
            group_sizes[size] = group_sizes.get(size, 0) + 1

    status("writing safetensors")
    staging.mkdir(parents=True)
    tensors = _dedupe(model.state_dict())
    weight_files = _write_shards(tensors, staging)
    layer_bytes_after = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".weight.")[0] in qmap or _is_quanto_buffer(k, qmap)
    )
    del tensors, model
    gc.collect()
    source_weight_names = {f.name for f in info.weight_files} | set(SOURCE_WEIGHT_INDEXES)
    for f in info.files:
        if f.name not in source_weight_names and f.name != MARKER:
            copy_file(Path(f.path), staging / f.name)
    marker = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "library": {"name": QUANTO_REQUIREMENT, "version": quanto_version, "weights": OFFLINE_METHODS[method]},
        "auto_class": auto_name,
        "dtype": dtype,
        "parameters": info.parameters,
        "weight_files": weight_files,
        "conv1d_to_linear": conversions,
        "quantization_map": qmap,
        "policy": policy,
        "skipped": [s.model_dump() for s in skipped],
    }
    _write_marker(staging, marker)

    status("running the written model on the probe set")
    reloaded = load_quantized_model(str(staging), getattr(transformers, auto_name), device="cpu", dtype="float32",
                                    trust_remote_code=info.trust_remote_code)  # fmt: skip
    fidelity = _fidelity(reference, _run_probes(reloaded, probes), threshold)
    del reloaded
    if not fidelity.passed and not force:
        raise UserError(
            f"{method} changes the model too much: next-token agreement {fidelity.agreement:.1%} on the probe set, "
            f"below the {fidelity.threshold:.0%} threshold (max logit diff {fidelity.max_logit_diff})",
            f"try {'int8' if method == 'int4' else 'serving it unquantized'}, keep sensitive layers with --exclude, "
            "or pass --force to keep it anyway",
        )
    _write_marker(staging, {**marker, "fidelity": fidelity.model_dump()})
    bytes_after = sum((staging / name).stat().st_size for name in weight_files)
    return QuantizationReport(
        method=method,
        source=info.path,
        output=str(staging),
        library=f"{QUANTO_REQUIREMENT} {quanto_version}",
        dtype=dtype,
        bytes_before=info.weight_bytes,
        bytes_after=bytes_after,
        ratio=round(bytes_after / max(info.weight_bytes, 1), 4),
        layer_bytes_before=layer_bytes_before,
        layer_bytes_after=layer_bytes_after,
        layer_ratio=round(layer_bytes_after / max(layer_bytes_before, 1), 4),
        quantized=picked,
        skipped=skipped,
        conv1d_to_linear=conversions,
        group_sizes=group_sizes,
        policy=policy,
        fidelity=fidelity,
        forced=force and not fidelity.passed,
    )


def _write_marker(folder: Path, marker: dict) -> None:
    (folder / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _source_dtype(info: ModelInfo) -> str:
    """The checkpoint's dtype: config.json's, else the dtype holding most weight bytes, else float32."""
    import torch

    for name in (info.config.get("dtype"), info.config.get("torch_dtype"), info.dtype):
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) and getattr(torch, name).is_floating_point:
            return name
    return "float32"


def _is_quanto_buffer(key: str, qmap: dict) -> bool:
    module, _, leaf = key.rpartition(".")
    return module in qmap and leaf in ("input_scale", "output_scale")


def _load_original(info: ModelInfo):
    """The original in float32 (exact for 16-bit checkpoints), for the reference probe run."""
    import torch
    import transformers

    from cloudllm_runtime.engine import ENGINES, dtype_keyword
    from cloudllm_runtime.protocol import normalize_task

    # The class the serving engine will load it with, so the probe runs what gets served.
    auto_name = ENGINES[normalize_task(info.task)].auto_class
    auto_class = getattr(transformers, auto_name)
    transformers.utils.logging.disable_progress_bar()
    try:
        model = auto_class.from_pretrained(
            info.path, trust_remote_code=info.trust_remote_code, **{dtype_keyword(): torch.float32}
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"transformers cannot load {info.path} as {auto_name} ({str(exc).splitlines()[0]})", "check the model folder") from None
    return model.eval(), auto_name


def _pick_layers(model, exclude, quantize_lm_head: bool) -> tuple[list[str], list[SkippedLayer], dict[str, str]]:
    """Which nn.Linear layers to quantize, and why the others with weights stay as they are."""
    import torch
    from fnmatch import fnmatch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = output is not None and inputs is not None and output.weight is inputs.weight
    picked: list[str] = []
    skipped: list[SkippedLayer] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, torch.nn.Embedding):
            skipped.append(SkippedLayer(name=name, reason="embedding: kept in the original dtype (policy)"))
        elif isinstance(module, torch.nn.Linear):
            pattern = next((p for p in exclude if fnmatch(name, p)), None)
            if pattern:
                skipped.append(SkippedLayer(name=name, reason=f"matches --exclude {pattern}"))
            elif module is output and tied:
                skipped.append(SkippedLayer(name=name, reason="LM head tied to the input embeddings: kept with them"))
            elif module is output and not quantize_lm_head:
                skipped.append(SkippedLayer(name=name, reason="LM head: kept in the original dtype (policy; --quantize-lm-head to change)"))
            else:
                picked.append(name)
        elif getattr(module, "weight", None) is not None and module.weight.dim() >= 2 and not list(module.children()):
            skipped.append(SkippedLayer(name=name, reason=f"{type(module).__name__}: no quantized kernel for it"))
    policy = {
        "embeddings": "original dtype",
        "lm_head": "tied to embeddings: original dtype" if tied else ("quantized" if quantize_lm_head else "original dtype"),
        "norms_and_biases": "original dtype",
        "exclude": ", ".join(exclude) or "none",
    }
    return picked, skipped, policy


def _probe_inputs(info: ModelInfo, model) -> list:
    """Token ids of the fixed probe texts; fixed pseudo-random ids when the model has no tokenizer."""
    import torch

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(info.path, trust_remote_code=info.trust_remote_code)
        ids = [tokenizer(text, return_tensors="pt")["input_ids"][:, :PROBE_TOKENS] for text in PROBE_TEXTS]
        ids = [t for t in ids if t.shape[1] >= 2]
        if ids:
            return ids
    except Exception:  # noqa: BLE001 - any tokenizer problem: fall back to fixed ids, the probe still works
        pass
    vocab = int(getattr(model.config, "vocab_size", 0) or 256)
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator) for _ in PROBE_TEXTS]


def _run_probes(model, probes: list) -> list:
    import torch

    outputs = []
    # no_grad, not inference_mode: quanto's int4 tensors fail on views of inference tensors.
    with torch.no_grad():
        for ids in probes:
            kwargs = {"input_ids": ids}
            if getattr(model.config, "is_encoder_decoder", False):
                kwargs["decoder_input_ids"] = ids
            out = model(**kwargs)
            if getattr(out, "logits", None) is not None:
                logits = out.logits
            elif getattr(out, "start_logits", None) is not None:
                logits = torch.stack([out.start_logits, out.end_logits], dim=-1)
            else:
                logits = out.last_hidden_state
            outputs.append(logits.float().reshape(-1, logits.shape[-1]))
    return outputs


def _fidelity(reference: list, quantized: list, threshold: float) -> Fidelity:
    import torch

    ref = torch.cat(reference)
    got = torch.cat(quantized)
    diff = (ref - got).abs()
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    top2 = ref.topk(min(2, ref.shape[-1]), dim=-1).values
    finite = bool(torch.isfinite(got).all())
    return Fidelity(
        probes=len(reference),
        positions=ref.shape[0],
        max_logit_diff=round(diff.max().item(), 5) if finite else None,
        mean_logit_diff=round(diff.mean().item(), 5) if finite else None,
        mean_abs_logit=round(ref.abs().mean().item(), 5),
        median_margin=round((top2[:, 0] - top2[:, 1]).median().item(), 5) if ref.shape[-1] > 1 else None,
        agreement=round(agreement, 4),
        threshold=threshold,
        passed=finite and agreement >= threshold,
    )


def _dedupe(state: dict) -> dict:
    """safetensors refuses shared tensors: keep the first name of each (the loader re-ties the rest)."""
    seen: set[tuple[int, int, tuple]] = set()
    tensors = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        tensors[key] = tensor.detach().contiguous()
    return tensors


def _write_shards(tensors: dict, folder: Path) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        names = [f"{WEIGHTS_PREFIX}.safetensors"]
    else:
        names = [f"{WEIGHTS_PREFIX}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        # One metadata key: safetensors writes a dict's keys in no fixed order, and the same
        # weights must give the same bytes on every run (or every CI job re-uploads them).
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    return names


