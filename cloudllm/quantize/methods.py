"""Which quantization a deploy gets, and which runtime serves it; no torch here.

Three ways a deploy can end up quantized, decided once here:

    offline       int8 | int4         `cloudllm quantize` (or deploy --quantize) writes a new model
                                      folder with optimum-quanto weights; the handler runtime serves it
    engine        bitsandbytes, eetq, fp8 ...   TGI / vLLM quantize full-precision weights at start-up
    pre-quantized config.json quantization_config (awq, gptq, fp8, ...) or our quantization.json:
                                      served as it is, never quantized twice
"""

from __future__ import annotations

from typing import Any

from cloudllm.errors import UserError
from cloudllm.model_source import ModelInfo

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
