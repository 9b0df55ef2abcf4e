"""What a deploy costs: the catalog's indicative price x instances, per hour and per 30 days."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from cloudllm.catalog.instances import HOURS_PER_30_DAYS, InstanceType, catalog_info

if TYPE_CHECKING:
    from cloudllm.spec import DeploySpec


def plan_cost(spec: "DeploySpec", instance: InstanceType | None) -> "CostEstimate | None":
    """Price x min..max instances; None where there is no instance (local) or no catalog entry."""
    if instance is None:
        return None
    return estimate_cost(instance, spec.min_instances, spec.max_instances)



class CostEstimate(BaseModel):
    """Indicative on-demand cost: price x instances, per hour and per 30 days."""

    currency: Literal["USD"] = "USD"
    region: str = Field(description="Region the catalog price is for (not necessarily the deploy region).")
    instance: str
    price_per_hour: float | None
    min_instances: int
    max_instances: int
    per_hour_min: float | None
    per_hour_max: float | None
    per_30_days_min: float | None
    per_30_days_max: float | None
    as_of: str = Field(description="Date of the catalog's prices.")
    note: str

    def line(self) -> str:
        if self.price_per_hour is None:
            return f"{self.instance}: no price in the catalog"
        count = f"{self.min_instances}" if self.min_instances == self.max_instances else f"{self.min_instances}..{self.max_instances}"
        return (
            f"${self.price_per_hour:,.2f}/h x {count} instance(s) = {_span(self.per_hour_min, self.per_hour_max)}/h, "
            f"{_span(self.per_30_days_min, self.per_30_days_max)} per 30 days ({self.note})"
        )


def _span(low: float | None, high: float | None) -> str:
    return f"${low:,.2f}" if low == high else f"${low:,.2f}-${high:,.2f}"


def estimate_cost(instance: InstanceType, min_instances: int, max_instances: int) -> CostEstimate:
    price = instance.price_per_hour
    info = catalog_info()

    def total(count: int, hours: float) -> float | None:
        return None if price is None else round(price * count * hours, 2)

    return CostEstimate(
        region=instance.region,
        instance=instance.label,
        price_per_hour=price,
        min_instances=min_instances,
        max_instances=max_instances,
        per_hour_min=total(min_instances, 1),
        per_hour_max=total(max_instances, 1),
        per_30_days_min=total(min_instances, HOURS_PER_30_DAYS),
        per_30_days_max=total(max_instances, HOURS_PER_30_DAYS),
        as_of=info.as_of,
        note=f"indicative on-demand price in {instance.region} as of {info.as_of}; storage, traffic and taxes not included",
    )

