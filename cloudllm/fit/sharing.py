"""Do an endpoint's models fit its instances together? Per-component reservations, placement and cost per model.

Several models on one endpoint (SageMaker inference components) each reserve, per copy, whole
accelerators, host memory and CPU cores on one instance; a copy never spans instances, and managed
instance scaling adds instances up to the endpoint's maximum to place copies. Each model's own fit
(weights, KV cache and the LoRA adapters it keeps on the GPU against its accelerators' memory) is
verdict.py's; this module answers the other question: do all the components' copies, with their
reservations, fit on max-instances instances at once. Cost per model is its copies' dominant share
of an instance (the largest of its accelerator, memory and CPU fractions) x the instance price.
"""

from __future__ import annotations

import math
from typing import Iterable

from pydantic import BaseModel, Field

from cloudllm.catalog.instances import InstanceType

MiB = 1024**2
# Where placement stops looking for the instance count that would fit (a fix to propose, not a limit).
MOST_INSTANCES_PROPOSED = 64


class ComponentReservation(BaseModel):
    """What one model's copies reserve on the endpoint's instances."""

    component: str = Field(description="Inference component name.")
    model: str = Field(description="The model's name on the endpoint (--add-model's, or the first model's).")
    copies: int = Field(description="Copies placed now (each on one instance).")
    accelerators: float = Field(0, description="Accelerator devices per copy (NumberOfAcceleratorDevicesRequired).")
    memory_mb: int = Field(0, description="Host memory per copy, MiB (MinMemoryRequiredInMb).")
    cpu_cores: float = Field(0, description="CPU cores per copy (NumberOfCpuCoresRequired).")
    planned: bool = Field(False, description="True for the component this plan creates or changes; False for ones already deployed.")
    adapters_bytes: int = Field(0, description="LoRA adapters this model keeps on its GPUs, inside its reservation.")
    per_hour: float | None = Field(None, description="Indicative cost of this model: copies x dominant share of an instance x price.")

    def needs(self) -> str:
        parts = [f"{self.accelerators:g} GPU{'s' if self.accelerators != 1 else ''}"] if self.accelerators else []
        parts.append(f"{self.memory_mb:,} MiB")
        if self.cpu_cores:
            parts.append(f"{self.cpu_cores:g} CPU core{'s' if self.cpu_cores != 1 else ''}")
        return ", ".join(parts)

    def line(self) -> str:
        copies = f"{self.copies} cop{'y' if self.copies == 1 else 'ies'}"
        adapters = f" (adapters {self.adapters_bytes / MiB:,.1f} MiB on its GPUs)" if self.adapters_bytes else ""
        cost = f", ${self.per_hour:,.2f}/h" if self.per_hour is not None else ""
        new = "" if self.planned else " (deployed)"
        return f"{self.model}{new}: {copies} x ({self.needs()}){adapters}{cost}"


class SharedFit(BaseModel):
    """The verdict for all of an endpoint's components together on its instances."""

    fits: bool
    summary: str
    fix: str | None = Field(None, description="What would make them fit (when they do not).")
    instance: str
    max_instances: int = Field(description="Instances copies may be placed on (managed instance scaling's maximum).")
    instances_needed: int | None = Field(None, description="Fewest instances that hold every copy (None: a copy exceeds one instance).")
    accelerators_per_instance: int
    memory_mb_per_instance: int
    cpu_cores_per_instance: int
    components: list[ComponentReservation]

    def lines(self) -> list[str]:
        return [self.summary] + [f"{c.component}: {c.line()}" for c in self.components] + ([f"fix: {self.fix}"] if self.fix else [])


def _capacity(instance: InstanceType) -> tuple[float, float, float]:
    return float(instance.accelerator_count), float(int(instance.memory_gib * 1024)), float(instance.vcpu)


def _placeable(capacity: tuple[float, float, float], instances: int, copies: Iterable[ComponentReservation]) -> bool:
    """First-fit decreasing of every copy onto `instances` instances (what the platform's placement approximates)."""
    free = [list(capacity) for _ in range(instances)]
    for copy in sorted(copies, key=lambda c: (c.accelerators, c.memory_mb, c.cpu_cores), reverse=True):
        need = (copy.accelerators, copy.memory_mb, copy.cpu_cores)
        room = next((f for f in free if all(n <= r for n, r in zip(need, f))), None)
        if room is None:
            return False
        for i, n in enumerate(need):
            room[i] -= n
    return True


def _share(reservation: ComponentReservation, capacity: tuple[float, float, float]) -> float:
    need = (reservation.accelerators, reservation.memory_mb, reservation.cpu_cores)
    return max((n / c for n, c in zip(need, capacity) if c), default=0.0)


def fit_together(instance: InstanceType, max_instances: int, components: list[ComponentReservation], *, endpoint: str) -> SharedFit:
    """Do all `components`' copies fit on `max_instances` of `instance`? With each model's cost and, if not, the fix."""
    capacity = _capacity(instance)
    for reservation in components:
        reservation.per_hour = (
            round(instance.price_per_hour * reservation.copies * _share(reservation, capacity), 2) if instance.price_per_hour is not None else None
        )
    copies = [c for c in components for _ in range(c.copies)]
    totals = [sum(getattr(c, key) * c.copies for c in components) for key in ("accelerators", "memory_mb", "cpu_cores")]
    offered = f"{max_instances} x {instance.name} ({instance.accelerator_count} GPU{'s' if instance.accelerator_count != 1 else ''}, {capacity[1]:,.0f} MiB, {instance.vcpu} vCPUs each)"
    needed = ", ".join(
        part for part, amount in ((f"{totals[0]:g} GPUs", totals[0]), (f"{totals[1]:,.0f} MiB", totals[1]), (f"{totals[2]:g} CPU cores", totals[2])) if amount
    )
    too_big = [c for c in components if not _placeable(capacity, 1, [c])]
    least = None if too_big else next((n for n in range(1, MOST_INSTANCES_PROPOSED + 1) if _placeable(capacity, n, copies)), None)
    models = len(components)
    if least is not None and least <= max_instances:
        summary = f"{models} model{'s' if models != 1 else ''} fit{'s' if models == 1 else ''} {endpoint} together: {len(copies)} copies need {needed}; {offered} hold them on {least}"
        return SharedFit(fits=True, summary=summary, instance=instance.name, max_instances=max_instances, instances_needed=least,
                         accelerators_per_instance=instance.accelerator_count, memory_mb_per_instance=int(capacity[1]),
                         cpu_cores_per_instance=instance.vcpu, components=components)  # fmt: skip
    if too_big:
        big = too_big[0]
        summary = f"one copy of {big.model} needs {big.needs()}, more than one {instance.name} has ({instance.accelerator_count} GPUs, {capacity[1]:,.0f} MiB, {instance.vcpu} vCPUs); a copy cannot span instances"
        fix = f"pick a bigger --instance (at least {big.accelerators:g} GPUs and {math.ceil(big.memory_mb / 1024)} GiB of host memory)"
    else:
        summary = f"the {models} models of {endpoint} do not fit together: {len(copies)} copies need {needed}, more than {offered} hold"
        more = f"--max-instances {least}" if least else "more --max-instances"
        fewer = _fewer_copies(capacity, max_instances, components)
        fix = f"use a bigger --instance, {f'--min-instances {fewer}' if fewer else 'fewer copies (--min-instances)'}, or {more}"
    if any(not c.planned for c in components):
        fix += f" (the endpoint's instance type and maximum are set when it is created: `cloudllm delete {endpoint}` and deploy it again with them)"
    return SharedFit(fits=False, summary=summary, fix=fix, instance=instance.name, max_instances=max_instances, instances_needed=least,
                     accelerators_per_instance=instance.accelerator_count, memory_mb_per_instance=int(capacity[1]),
                     cpu_cores_per_instance=instance.vcpu, components=components)  # fmt: skip


def _fewer_copies(capacity: tuple[float, float, float], instances: int, components: list[ComponentReservation]) -> int | None:
    """The most copies of the planned model that fit beside the others (None: not even one, or nothing planned)."""
    planned = next((c for c in components if c.planned), None)
    if planned is None:
        return None
    others = [c for c in components if c is not planned for _ in range(c.copies)]
    for copies in range(planned.copies - 1, 0, -1):
        if _placeable(capacity, instances, others + [planned] * copies):
            return copies
    return None
