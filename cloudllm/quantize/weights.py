"""Offline quantization: int8/int4 weights written to a new model folder with optimum-quanto.

Weight-only: int8 is per-output-channel absmax (s = max|w|/127, q = round(w/s)); int4 is
asymmetric (scale and zero point) per group of 128 inputs, quanto's default (smaller groups
where 128 does not divide a row, one group per row of <= 128). GPT-2's Conv1D projections
become nn.Linear first, so no projection silently stays full precision. Embeddings stay in the
original dtype, and so does the LM head (tied to the embeddings in most models; quantizing it
would untie and duplicate it). Deploy quantizes once per source + method into a cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cloudllm.bundle import copy_file
from cloudllm.console import Reporter
from cloudllm.errors import UserError
from cloudllm.model_source import ModelInfo, inspect_model
from cloudllm.quantize.fidelity import QuantizationReport, SkippedLayer, measure_fidelity, probe_inputs, run_probes, threshold_for
from cloudllm.quantize.methods import ENGINE_METHODS, OFFLINE_METHODS, all_methods, check_method, check_prequantized
from cloudllm_runtime.quantized import (
    FORMAT,
    FORMAT_VERSION,
    MARKER,
    QUANTO_REQUIREMENT,
    WEIGHTS_PREFIX,
    convert_conv1d_to_linear,
)

MAX_SHARD_BYTES = 5 * 1024**3
SOURCE_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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
    probes = probe_inputs(info, model)
    reference = run_probes(model, probes)
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
    fidelity = measure_fidelity(reference, run_probes(reloaded, probes), threshold)
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
