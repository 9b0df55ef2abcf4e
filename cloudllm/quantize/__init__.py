"""Quantization: int8/int4 weights shipped in the artifact, and engine modes passed to TGI/vLLM.

methods.py   which method a deploy gets and which runtime serves it (offline, engine, pre-quantized)
weights.py   offline int8/int4: quantize a folder with optimum-quanto; deploy's cached copy
fidelity.py  the probe run that measures what quantizing changed, and the run's report

Everything public is importable from cloudllm.quantize.
"""

from cloudllm.quantize.fidelity import (
    AGREEMENT_THRESHOLDS,
    PROBE_TEXTS,
    PROBE_TOKENS,
    Fidelity,
    QuantizationReport,
    SkippedLayer,
    measure_fidelity,
    probe_inputs,
    run_probes,
    threshold_for,
)
from cloudllm.quantize.methods import (
    ENGINE_METHODS,
    OFFLINE_METHODS,
    PREQUANTIZED_METHODS,
    all_methods,
    check_method,
    check_prequantized,
    engine_quantize_env,
    plan_quantize_env,
    required_runtime,
)
from cloudllm.quantize.weights import MAX_SHARD_BYTES, SOURCE_WEIGHT_INDEXES, prepare_model, quantize_model, source_digest

__all__ = [
    "AGREEMENT_THRESHOLDS",
    "ENGINE_METHODS",
    "MAX_SHARD_BYTES",
    "OFFLINE_METHODS",
    "PREQUANTIZED_METHODS",
    "PROBE_TEXTS",
    "PROBE_TOKENS",
    "SOURCE_WEIGHT_INDEXES",
    "Fidelity",
    "QuantizationReport",
    "SkippedLayer",
    "all_methods",
    "check_method",
    "check_prequantized",
    "engine_quantize_env",
    "measure_fidelity",
    "plan_quantize_env",
    "prepare_model",
    "probe_inputs",
    "quantize_model",
    "required_runtime",
    "run_probes",
    "source_digest",
    "threshold_for",
]
