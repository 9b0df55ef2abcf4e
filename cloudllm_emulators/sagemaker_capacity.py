"""Placement of inference component copies on an endpoint's instances, as SageMaker refuses it.

Each copy of a model component reserves its ComputeResourceRequirements (accelerators, host memory,
CPU cores) on one instance; a copy never spans instances. With ManagedInstanceScaling the service
adds instances up to MaxInstanceCount to place copies, so what must fit is every component's copies
on MaxInstanceCount instances (InitialInstanceCount without managed scaling). What does not fit is
refused with ResourceLimitExceeded (HTTP 400): the one error botocore's SageMaker model gives
CreateInferenceComponent, UpdateInferenceComponent and UpdateInferenceComponentRuntimeConfig. The
message's wording is the emulator's; it names the numbers so a test (or a person) can check them.

What an instance offers comes from EC2's own DescribeInstanceTypes data (moto ships it, from AWS):
an ml.X instance is the EC2 instance X. Adapter components reserve nothing of their own (their
base's reservation covers them, as the API reference says of ComputeResourceRequirements).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable

from moto.sagemaker.exceptions import SagemakerClientError


class ResourceLimitExceeded(SagemakerClientError):
    code = "ResourceLimitExceeded"

    def __init__(self, message: str):
        super().__init__(message)


@dataclass(frozen=True)
class InstanceResources:
    """What one instance offers inference components."""

    instance_type: str
    accelerators: int
    memory_mb: int
    cpu_cores: int


@dataclass(frozen=True)
class CopyNeeds:
    """What one copy of a component reserves (ComputeResourceRequirements)."""

    component: str
    accelerators: float
    memory_mb: int
    cpu_cores: float

    def fits_in(self, free: list[float]) -> bool:
        return self.accelerators <= free[0] and self.memory_mb <= free[1] and self.cpu_cores <= free[2]


@lru_cache(maxsize=1)
def _ec2_instance_types() -> dict[str, dict]:
    data = resources.files("moto.ec2").joinpath("resources/instance_types.json.gz").read_bytes()
    return json.loads(gzip.decompress(data))


def instance_resources(instance_type: str) -> InstanceResources | None:
    """The accelerators (GPUs, Neuron devices), memory and vCPUs of an ml.* instance; None when EC2's data lacks it."""
    found = _ec2_instance_types().get(instance_type.removeprefix("ml."))
    if found is None:
        return None
    gpus = sum(g.get("Count", 0) for g in (found.get("GpuInfo") or {}).get("Gpus", []))
    neuron = sum(d.get("Count", 0) for d in (found.get("NeuronInfo") or {}).get("NeuronDevices", []))
    inferentia = sum(a.get("Count", 0) for a in (found.get("InferenceAcceleratorInfo") or {}).get("Accelerators", []))
    return InstanceResources(
        instance_type=instance_type,
        accelerators=gpus or neuron or inferentia,
        memory_mb=int(found["MemoryInfo"]["SizeInMiB"]),
        cpu_cores=int(found["VCpuInfo"]["DefaultVCpus"]),
    )


def copy_needs(component: str, spec: dict) -> CopyNeeds:
    needs = spec.get("ComputeResourceRequirements") or {}
    return CopyNeeds(
        component=component,
        accelerators=float(needs.get("NumberOfAcceleratorDevicesRequired") or 0),
        memory_mb=int(needs.get("MinMemoryRequiredInMb") or 0),
        cpu_cores=float(needs.get("NumberOfCpuCoresRequired") or 0),
    )


def instance_limit(variant: dict) -> int:
    """Instances the variant may run: MaxInstanceCount under managed scaling, else InitialInstanceCount."""
    scaling = variant.get("ManagedInstanceScaling") or {}
    if scaling.get("Status") == "ENABLED" and scaling.get("MaxInstanceCount"):
        return int(scaling["MaxInstanceCount"])
    return int(variant.get("InitialInstanceCount") or 1)


def _unplaced(instance: InstanceResources, instances: int, copies: Iterable[CopyNeeds]) -> list[CopyNeeds]:
    """First-fit decreasing over `instances` instances; the copies that found no room."""
    free = [[float(instance.accelerators), float(instance.memory_mb), float(instance.cpu_cores)] for _ in range(instances)]
    left = []
    for copy in sorted(copies, key=lambda c: (c.accelerators, c.memory_mb, c.cpu_cores), reverse=True):
        room = next((f for f in free if copy.fits_in(f)), None)
        if room is None:
            left.append(copy)
            continue
        room[0] -= copy.accelerators
        room[1] -= copy.memory_mb
        room[2] -= copy.cpu_cores
    return left


def check_placement(variant: dict, component: str, needs: CopyNeeds, copies: int, others: list[tuple[CopyNeeds, int]]) -> None:
    """ResourceLimitExceeded unless `copies` of `component` fit beside the other components' copies.

    variant: the endpoint config's production variant; others: (needs, desired copies) of the
    endpoint's other model components. An instance type EC2's data lacks is not checked.
    """
    instance = instance_resources(variant.get("InstanceType", ""))
    if instance is None or copies <= 0:
        return
    one = [
        f"{what} {need:g} > {have:g}"
        for what, need, have in (
            ("accelerator devices", needs.accelerators, instance.accelerators),
            ("memory MB", needs.memory_mb, instance.memory_mb),
            ("CPU cores", needs.cpu_cores, instance.cpu_cores),
        )
        if need > have
    ]
    if one:
        raise ResourceLimitExceeded(
            f"One copy of inference component {component} requires more than one {instance.instance_type} instance provides "
            f"({'; '.join(one)}); a copy is placed on a single instance."
        )
    limit = instance_limit(variant)
    wanted = [needs] * copies + [n for n, count in others for _ in range(count)]
    left = _unplaced(instance, limit, wanted)
    if left:
        total = [sum(getattr(n, key) for n in wanted) for key in ("accelerators", "memory_mb", "cpu_cores")]
        raise ResourceLimitExceeded(
            f"Insufficient capacity to place {copies} copies of inference component {component}: {len(left)} of the endpoint's "
            f"{len(wanted)} component copies do not fit on {limit} {instance.instance_type} instance(s) (MaxInstanceCount {limit}). "
            f"All copies together require {total[0]:g} accelerator devices, {total[1]:g} MB memory and {total[2]:g} CPU cores; "
            f"each instance provides {instance.accelerators}, {instance.memory_mb} MB and {instance.cpu_cores}."
        )


def most_copies(variant: dict, needs: CopyNeeds, copies: int, others: list[tuple[CopyNeeds, int]]) -> int:
    """How many of `copies` the instances can place beside the others: what a scale-out by Application Auto
    Scaling gets, the rest waiting for room (it is not refused: nobody is there to answer)."""
    instance = instance_resources(variant.get("InstanceType", ""))
    if instance is None:
        return copies
    placed = copies
    while placed > 0 and _unplaced(instance, instance_limit(variant), [needs] * placed + [n for n, count in others for _ in range(count)]):
        placed -= 1
    return placed
