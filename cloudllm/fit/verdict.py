"""Does the model fit an instance (or this machine), on how many devices, and which instances would.

The estimate is memory.estimate_memory's; this module places it on the devices: weights split
over tensor-parallel shards (TGI/vLLM) or layers over a device map (the handler), the KV cache
for the batch, and the usable fraction of each device's memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from pydantic import BaseModel, Field

from cloudllm.catalog.instances import InstanceType, catalog_providers, lookup, offers, resolve
from cloudllm.errors import UserError
from cloudllm.fit.memory import (
    DTYPE_BYTES,
    ENGINE_RUNTIMES,
    QUANTIZE_MODES,
    GiB,
    MemoryEstimate,
    ModelDims,
    Workload,
    activation_bytes,
    check_max_total_tokens,
    estimate_memory,
    generates,
    gib,
    kv_bytes_per_token,
    model_dims,
    quantize_mode,
    workload_from_spec,
)
from cloudllm.model_source import ModelInfo

if TYPE_CHECKING:
    from cloudllm.spec import DeploySpec
    from cloudllm_runtime.settings import ServingSettings

# The stated margin: this much of a GPU's nominal memory is usable (vLLM's default
# gpu_memory_utilization); the rest absorbs fragmentation and driver reservations.
GPU_USABLE_FRACTION = 0.90
# Host RAM on CPU instances and this machine: the OS and page cache keep the rest.
HOST_USABLE_FRACTION = 0.80
MAX_SHARDS_TRIED = (1, 2, 4, 8, 16)
SUGGESTIONS = 3
# The modes worth trying when a model does not fit, per runtime: one 8-bit, one 4-bit
# (int8/int4 are shipped weights, which only the handler serves; engines quantize at load).
QUANTIZE_TO_TRY = {"handler": ("int8", "int4"), "tgi": ("bitsandbytes", "bitsandbytes-nf4"), "vllm": ("fp8",)}


# --- placing the estimate on devices ---------------------------------------------------------------------------------
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
    if not generates(work.model):
        kv_tokens_dev = 0
    elif work.engine:  # tensor parallel: each shard holds its share of the KV heads
        kv_tokens_dev = kv_bytes_per_token(dims, dtype_bytes, kv_heads=math.ceil(dims.kv_heads / shards))
    else:  # accelerate device map: each device holds its share of the layers
        kv_tokens_dev = kv_bytes_per_token(dims, dtype_bytes, layers=math.ceil(dims.decoder_layers / shards))
    tokens = work.max_total_tokens + (work.max_input_tokens if dims.encoder_decoder else 0)
    act_batch = 1 if work.engine else batch
    activations = activation_bytes(work, dims, dtype_bytes, batch=act_batch, shards=shards if work.engine else 1)
    adapters = math.ceil(mem.adapters_bytes / shards)  # split over the shards as the weights they change
    return math.ceil(mem.weights_bytes / shards) + adapters + kv_tokens_dev * tokens * batch + activations + mem.overhead_bytes


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
        concurrent_requests=placement.concurrent if generates(work.model) else None,
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
        current = quantize_mode(work.quantize)
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
    adapters: tuple = (),
) -> FitReport:
    """The fit verdict of a deploy: this machine's RAM for local, the instance's devices for clouds (adapters: AdapterInfo kept beside the model)."""
    work = workload_from_spec(spec, model, settings, runtime, adapters)
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




def machine_ram_bytes() -> int:
    """Physical RAM of this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
