"""Will the model fit, on how many GPUs, and at what cost: answered from config.json and the catalog.

memory.py   what the model needs on one device (weights, KV cache, activations, overhead)
verdict.py  placing that on an instance's devices or this machine's RAM; instances that would fit
cost.py     the catalog's indicative price x instances
sharing.py  several models on one endpoint: their reservations placed on its instances together, cost per model

Everything public is importable from cloudllm.fit.
"""

from cloudllm.fit.cost import CostEstimate, estimate_cost, plan_cost
from cloudllm.fit.memory import (
    DTYPE_BYTES,
    ENGINE_RUNTIMES,
    INT4_GROUP_SIZE,
    QUANTIZE_MODES,
    RUNTIME_OVERHEAD_BYTES,
    GiB,
    MemoryEstimate,
    ModelDims,
    Workload,
    check_max_total_tokens,
    estimate_memory,
    gib,
    kv_bytes_per_token,
    max_total_tokens_limit,
    model_dims,
    serving_dtype,
    workload_for_model,
    workload_from_spec,
)
from cloudllm.fit.sharing import ComponentReservation, SharedFit, fit_together
from cloudllm.fit.verdict import (
    GPU_USABLE_FRACTION,
    HOST_USABLE_FRACTION,
    MAX_SHARDS_TRIED,
    QUANTIZE_TO_TRY,
    SUGGESTIONS,
    FitReport,
    InstanceSuggestion,
    cheapest_fits,
    engine_shard_count,
    fit_instance,
    fit_local,
    fit_table,
    machine_ram_bytes,
    plan_fit,
    resolve_instance,
    unknown_fit,
)

__all__ = [
    "DTYPE_BYTES",
    "ENGINE_RUNTIMES",
    "GPU_USABLE_FRACTION",
    "HOST_USABLE_FRACTION",
    "INT4_GROUP_SIZE",
    "MAX_SHARDS_TRIED",
    "QUANTIZE_MODES",
    "QUANTIZE_TO_TRY",
    "RUNTIME_OVERHEAD_BYTES",
    "SUGGESTIONS",
    "ComponentReservation",
    "CostEstimate",
    "FitReport",
    "GiB",
    "InstanceSuggestion",
    "MemoryEstimate",
    "ModelDims",
    "SharedFit",
    "Workload",
    "check_max_total_tokens",
    "cheapest_fits",
    "engine_shard_count",
    "estimate_cost",
    "estimate_memory",
    "fit_instance",
    "fit_local",
    "fit_table",
    "fit_together",
    "gib",
    "kv_bytes_per_token",
    "machine_ram_bytes",
    "max_total_tokens_limit",
    "model_dims",
    "plan_cost",
    "plan_fit",
    "resolve_instance",
    "serving_dtype",
    "unknown_fit",
    "workload_for_model",
    "workload_from_spec",
]
