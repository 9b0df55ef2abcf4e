"""Instance catalog for the cloud providers (instances.json: specs, indicative prices, sources, date)."""

from cloudllm.catalog.instances import (
    HOURS_PER_30_DAYS,
    InstanceType,
    catalog_info,
    instances,
    lookup,
    offers,
    parse_accelerator,
    provider_of,
    resolve,
    suggest_names,
    unknown_instance_error,
)

__all__ = [
    "HOURS_PER_30_DAYS",
    "InstanceType",
    "catalog_info",
    "instances",
    "lookup",
    "offers",
    "parse_accelerator",
    "provider_of",
    "resolve",
    "suggest_names",
    "unknown_instance_error",
]
