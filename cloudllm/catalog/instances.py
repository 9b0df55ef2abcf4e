"""The instance catalog: GPU type, count and memory, vCPU, RAM and price of every instance/machine type.

The data lives in instances.json beside this module, with its sources, its date and the one
region its prices are for (a row without a known price has none). Providers call `lookup` (GPU
count for NUM_SHARD, accelerator type for Vertex's machine_spec) and `suggest_names` (for "did
you mean", also over the names the platform lists beyond the catalog: `platform_names`); the
planner calls `resolve` and `offers`.

Vertex n1 machines carry no GPU of their own: a T4 or V100 is attached with
`--accelerator NVIDIA_TESLA_T4:2`, so `resolve` and `offers` return the machine with its
accelerators attached, priced as machine + accelerators.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from cloudllm.errors import UserError

DATA_FILE = Path(__file__).with_name("instances.json")
HOURS_PER_30_DAYS = 24 * 30
PROVIDER_LABELS = {"sagemaker": "SageMaker instance type", "vertex": "Vertex AI machine type"}


class InstanceType(BaseModel):
    """One instance (SageMaker) or machine type with its accelerators attached (Vertex)."""

    provider: str
    name: str = Field(description="Instance or machine type, e.g. ml.g5.xlarge or g2-standard-8.")
    kind: Literal["cpu", "gpu", "neuron"] = Field(description="cpu: no accelerator; neuron: AWS Inferentia/Trainium chips.")
    accelerator: str | None = Field(None, description="Accelerator model, e.g. NVIDIA A10G.")
    accelerator_type: str | None = Field(None, description="Vertex machine_spec.accelerator_type, e.g. NVIDIA_L4.")
    accelerator_count: int = Field(0, description="GPUs (or Neuron chips) per instance.")
    accelerator_memory_gib: float = Field(0, description="Nominal memory per GPU (or Neuron chip), GiB.")
    vcpu: int
    memory_gib: float = Field(description="Host RAM, GiB.")
    price_per_hour: float | None = Field(None, description="Indicative on-demand USD per instance-hour in `region`.")
    region: str = Field(description="The region the price is for.")
    note: str | None = None
    attachable: list[str] = Field(default_factory=list, description="Vertex accelerator types this machine can take.")

    @property
    def gpu_count(self) -> int:
        """NVIDIA GPUs per instance (0 for CPU and Neuron types): what NUM_SHARD / SM_NUM_GPUS count."""
        return self.accelerator_count if self.kind == "gpu" else 0

    @property
    def total_accelerator_memory_gib(self) -> float:
        return self.accelerator_count * self.accelerator_memory_gib

    @property
    def accelerator_flag(self) -> str | None:
        """The `--accelerator` value that selects this configuration (Vertex), e.g. NVIDIA_L4:2."""
        if self.provider != "vertex" or not self.accelerator_type:
            return None
        return f"{self.accelerator_type}:{self.accelerator_count}"

    @property
    def label(self) -> str:
        """Name plus attached accelerators, e.g. "n1-standard-8 + 2x NVIDIA_TESLA_T4"."""
        if self.provider == "vertex" and self.accelerator_type and self.name.startswith("n1-"):
            return f"{self.name} + {self.accelerator_count}x {self.accelerator_type}"
        return self.name

    def describe(self) -> str:
        """e.g. "1x NVIDIA A10G 24 GiB, 4 vCPU, 16 GiB RAM"."""
        host = f"{self.vcpu} vCPU, {self.memory_gib:g} GiB RAM"
        if not self.accelerator_count:
            return f"no GPU, {host}"
        return f"{self.accelerator_count}x {self.accelerator} {self.accelerator_memory_gib:g} GiB, {host}"


class CatalogInfo(BaseModel):
    as_of: str
    note: str
    regions: dict[str, str]
    sources: dict[str, list[str]]


@lru_cache(maxsize=1)
def _load() -> dict:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def catalog_info() -> CatalogInfo:
    """Date, note, price regions and sources of the catalog."""
    data = _load()
    providers = data["providers"]
    return CatalogInfo(
        as_of=data["as_of"],
        note=data["note"],
        regions={p: v["region"] for p, v in providers.items()},
        sources={p: v["sources"] for p, v in providers.items()},
    )


def catalog_providers() -> list[str]:
    return sorted(_load()["providers"])


@lru_cache(maxsize=None)
def _instances(provider: str) -> dict[str, InstanceType]:
    section = _load()["providers"].get(provider)
    if section is None:
        return {}
    rows = {}
    for row in section["instances"]:
        kind = row.get("kind", "gpu")
        rows[row["name"]] = InstanceType(provider=provider, region=section["region"], **{**row, "kind": kind})
    return rows


def _accelerators(provider: str) -> dict[str, dict]:
    return _load()["providers"].get(provider, {}).get("accelerators", {})


def lookup(provider: str, name: str | None) -> InstanceType | None:
    """The catalog entry of an instance/machine type (without attached accelerators), or None."""
    if not name:
        return None
    return _instances(provider).get(name)


@lru_cache(maxsize=None)
def platform_names(provider: str) -> frozenset[str]:
    """Instance types the platform itself takes, catalogued or not: for SageMaker, the hosting types of
    botocore's current service model (ProductionVariantInstanceType, not a copy); empty elsewhere or without botocore."""
    if provider != "sagemaker":
        return frozenset()
    try:
        import botocore
    except ImportError:
        return frozenset()
    source = _sagemaker_model_file()
    cached = _cached_names(source)
    if cached is not None:
        return cached
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    names = frozenset(model.shape_for("ProductionVariantInstanceType").enum)
    _cache_names(source, names)
    return names


# Parsing botocore's SageMaker model costs `cloudllm plan` ~0.2 s, for one list of names. The list is kept in
# $CLOUDLLM_HOME/cache, keyed by the model file's path, size and mtime: an upgraded botocore is read afresh.
def _sagemaker_model_file() -> Path | None:
    """The service-2 file botocore loads for SageMaker: its newest API version, customer data paths first."""
    import os

    import botocore

    roots = [Path(p).expanduser() for p in os.environ.get("AWS_DATA_PATH", "").split(os.pathsep) if p]
    roots += [Path("~/.aws/models").expanduser(), Path(botocore.__file__).parent / "data"]
    for root in roots:
        versions = sorted((root / "sagemaker").glob("*/service-2.json*"))
        if versions:
            return versions[-1]
    return None


def _names_key(source: Path | None) -> dict | None:
    try:
        st = source.stat() if source is not None else None
    except OSError:
        return None
    return {"file": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns} if st else None


def _cached_names(source: Path | None) -> frozenset[str] | None:
    from cloudllm.home import home_dir

    key = _names_key(source)
    try:
        cached = json.loads((home_dir("cache") / "sagemaker-instance-types.json").read_text())
    except (OSError, ValueError, UserError):
        return None
    names = cached.get("names") if isinstance(cached, dict) and key and cached.get("source") == key else None
    return frozenset(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def _cache_names(source: Path | None, names: frozenset[str]) -> None:
    from cloudllm.home import home_dir, write_atomic

    key = _names_key(source)
    if key is None:
        return
    try:
        write_atomic(home_dir("cache") / "sagemaker-instance-types.json", json.dumps({"source": key, "names": sorted(names)}) + "\n")
    except UserError:
        pass  # best effort, as the hash cache


def suggest_names(provider: str, name: str, n: int = 3) -> list[str]:
    """Close matches among the provider's instance names (the catalog's, then the platform's own), best first."""
    catalogued = list(_instances(provider))
    names = catalogued + sorted(platform_names(provider) - set(catalogued))
    found = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    lowered = name.lower().removeprefix("ml.")
    for candidate in names:
        if len(found) >= n:
            break
        if candidate not in found and lowered and candidate.removeprefix("ml.").lower() == lowered:
            found.insert(0, candidate)
    return found[:n]


def provider_of(name: str) -> str | None:
    """Which catalog provider has an instance of this name (None when none does)."""
    for provider in catalog_providers():
        if name in _instances(provider):
            return provider
    return None


def instances(provider: str | None = None) -> list[InstanceType]:
    """Catalog rows as listed (Vertex n1 machines without accelerators)."""
    providers = [provider] if provider else catalog_providers()
    return [row for p in providers for row in _instances(p).values()]


def offers(provider: str | None = None) -> list[InstanceType]:
    """Every configuration one can deploy on: catalog rows plus each n1 machine with each valid T4/V100 count."""
    found = []
    for row in instances(provider):
        found.append(row)
        for accel_type in row.attachable:
            for count in _accelerators(row.provider)[accel_type]["counts"]:
                try:
                    found.append(_attach(row, accel_type, count))
                except UserError:
                    continue
    return found


def resolve(provider: str, name: str, accelerator: str | None = None) -> InstanceType:
    """The instance a spec names, with attached accelerators; UserError naming the fix when it is wrong."""
    row = lookup(provider, name)
    if row is None:
        raise unknown_instance_error(provider, name)
    if provider != "vertex" or not accelerator:
        return row
    accel_type, count = parse_accelerator(accelerator)
    if row.attachable:
        return _attach(row, accel_type, count)
    if row.accelerator_type is None:
        raise UserError(
            f"{name} cannot take an accelerator",
            f"attach GPUs to an n1 machine (e.g. n1-standard-8 --accelerator NVIDIA_TESLA_T4:1) or pick a g2/a2/a3 type",
        )
    if accel_type != row.accelerator_type or count not in (None, row.accelerator_count):
        raise UserError(
            f"{name} comes with {row.accelerator_count}x {row.accelerator_type}, not {accelerator}",
            f"drop --accelerator or use --accelerator {row.accelerator_flag}",
        )
    return row


def parse_accelerator(value: str) -> tuple[str, int | None]:
    """"NVIDIA_L4:2" -> ("NVIDIA_L4", 2); "NVIDIA_L4" -> ("NVIDIA_L4", None)."""
    accel_type, _, count = value.partition(":")
    if count and not (count.isdigit() and int(count) > 0):
        raise UserError(f"invalid accelerator {value!r}", "write it as TYPE or TYPE:COUNT, e.g. NVIDIA_TESLA_T4:2")
    return accel_type.strip().upper(), int(count) if count else None


def unknown_instance_error(provider: str, name: str) -> UserError:
    """The error for a name the provider's catalog lacks: says which provider it belongs to, or what is close."""
    other = provider_of(name)
    label = PROVIDER_LABELS.get(provider, f"{provider} instance type")
    if other and other != provider:
        return UserError(
            f"{name} is a {PROVIDER_LABELS.get(other, other)}, not a {label}",
            f"use --provider {other}, or pick a {provider} type (`cloudllm instances --provider {provider}`)",
        )
    close = suggest_names(provider, name)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return UserError(f"unknown {label} {name!r}", f"{hint}see `cloudllm instances --provider {provider}`")


def _attach(row: InstanceType, accel_type: str, count: int | None) -> InstanceType:
    accelerators = _accelerators(row.provider)
    if accel_type not in row.attachable or accel_type not in accelerators:
        raise UserError(
            f"{row.name} cannot take {accel_type}",
            f"use one of: {', '.join(row.attachable) or 'none'}",
        )
    spec = accelerators[accel_type]
    count = count or spec["counts"][0]
    if count not in spec["counts"]:
        raise UserError(f"{accel_type} comes in counts {spec['counts']}, not {count}", f"use {accel_type}:{spec['counts'][0]}")
    max_vcpu = spec.get("max_vcpu", {}).get(str(count))
    if max_vcpu is not None and row.vcpu > max_vcpu:
        raise UserError(
            f"{count}x {accel_type} supports machines with at most {max_vcpu} vCPUs; {row.name} has {row.vcpu}",
            "attach more accelerators or pick a smaller n1 machine",
        )
    price = None
    if row.price_per_hour is not None and spec.get("price_per_hour") is not None:
        price = round(row.price_per_hour + count * spec["price_per_hour"], 4)
    return row.model_copy(
        update={
            "kind": "gpu",
            "accelerator": spec["accelerator"],
            "accelerator_type": accel_type,
            "accelerator_count": count,
            "accelerator_memory_gib": spec["accelerator_memory_gib"],
            "price_per_hour": price,
            "attachable": [],
        }
    )
