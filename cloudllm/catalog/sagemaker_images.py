"""Serving images for SageMaker, one per runtime, from the SageMaker SDK's own image tables.

The SDK keeps the table of Deep Learning Container URIs (`image_uri_config/*.json`: repository,
tag and the ECR account of every region). Every distribution that carries it is heavy
(sagemaker-core pulls pandas, scipy, paramiko and ~40 packages; sagemaker v3 is 937 MB), so
cloudllm reads the JSON files themselves, never importing the SDK:

- from an installed `sagemaker-core` / `sagemaker` when there is one (its tables are newer),
- else from sagemaker_images.json beside this module: verbatim subsets of the SDK's tables
  for the versions pinned below, with the SDK version and date they were taken from.

The URI is built as the SDK's `image_uris.retrieve` builds it for these three frameworks:
`{account}.dkr.ecr.{region}.{dns suffix}/{repository}:{tag}`.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cloudllm.errors import UserError

DATA_FILE = Path(__file__).with_name("sagemaker_images.json")
COMMON_REGIONS = ("us-east-1", "us-west-2", "eu-west-1")


@dataclass(frozen=True)
class ImagePin:
    """The SDK framework and version a runtime runs."""

    framework: str  # the SDK table: huggingface-llm, djl-lmi, huggingface
    version: str
    base_framework: str | None = None  # huggingface only: the PyTorch build, e.g. pytorch2.6.0
    what: str = ""


PINS: dict[str, ImagePin] = {
    # TGI 3.3.6: the newest TGI in the table (alias "3.3").
    "tgi": ImagePin("huggingface-llm", "3.3.6", what="Hugging Face TGI"),
    # LMI (DJL Serving) with vLLM: the table's "latest" alias.
    "vllm": ImagePin("djl-lmi", "0.38.0", what="LMI (vLLM)"),
    # The HF inference toolkit and code/inference.py need transformers 4.x (toolkit 2.6 imports
    # names transformers 5 removed): 4.51.3 is the newest 4.x build in the table.
    "handler": ImagePin("huggingface", "4.51.3", base_framework="pytorch2.6.0", what="Hugging Face PyTorch inference"),
}


@dataclass(frozen=True)
class ResolvedImage:
    uri: str
    source: str  # which table it came from


def image_uri(runtime: str, region: str, processor: str) -> ResolvedImage:
    """The image for runtime in region on a cpu|gpu instance; UserError when there is none."""
    pin = PINS[runtime]
    table, source = _table(pin.framework)
    config = table.get("inference", table)
    version = config.get("version_aliases", {}).get(pin.version, pin.version)
    entry = config.get("versions", {}).get(version)
    if entry is None:  # an installed SDK that no longer lists our pin: use the vendored copy
        table, source = _vendored(pin.framework), f"vendored table ({catalog_source()})"
        config = table.get("inference", table)
        entry = config["versions"][version]
    tag_prefix = None
    if pin.base_framework:
        entry = entry[entry.get("version_aliases", {}).get(pin.base_framework, pin.base_framework)]
        tag_prefix = f"{pin.base_framework.removeprefix('pytorch')}-transformers{version}"
    processors = config.get("processors") or entry.get("processors")
    if processors and processor not in processors:
        raise UserError(
            f"the {runtime} runtime's image ({pin.what}) runs on {' or '.join(p.upper() for p in processors)} instances only",
            "choose a GPU instance (e.g. --instance ml.g5.xlarge)" if "gpu" in processors else "choose another --instance",
        )
    registries = entry["registries"]
    if region not in registries:
        raise UserError(
            f"the {runtime} runtime's image ({pin.what} {pin.version}) is not published in region {region}",
            f"deploy to a region that has it (e.g. --region {' / '.join(r for r in COMMON_REGIONS if r in registries)}) or pass --image URI",
        )
    py_version = (entry.get("py_versions") or [None])[0]
    container = (entry.get("container_version") or {}).get(processor)
    tag_prefix = tag_prefix or entry.get("tag_prefix", version)
    tag = "-".join(part for part in (tag_prefix, processor if processors else None, py_version, container) if part)
    uri = f"{registries[region]}.dkr.ecr.{region}.{dns_suffix(region)}/{entry['repository']}:{tag}"
    return ResolvedImage(uri=uri, source=source)


def dns_suffix(region: str) -> str:
    """amazonaws.com, amazonaws.com.cn, ... from botocore's partition table."""
    import re

    import botocore.loaders

    for partition in botocore.loaders.create_loader().load_data("partitions")["partitions"]:
        if region in partition.get("regions", {}) or re.match(partition["regionRegex"], region):
            return partition["outputs"]["dnsSuffix"]
    return "amazonaws.com"


@lru_cache(maxsize=None)
def _table(framework: str) -> tuple[dict, str]:
    """The SDK's table for framework, from an installed SDK if any, else the vendored subset."""
    for path, source in _installed_sdk_files(framework):
        try:
            return json.loads(path.read_text(encoding="utf-8")), source
        except (OSError, ValueError):
            continue
    return _vendored(framework), f"vendored table ({catalog_source()})"


def _installed_sdk_files(framework: str) -> list[tuple[Path, str]]:
    """image_uri_config/<framework>.json of an installed sagemaker-core (v3) or sagemaker (v2), not imported."""
    try:
        spec = importlib.util.find_spec("sagemaker")
    except (ImportError, ValueError):
        return []
    found = []
    for location in (spec.submodule_search_locations or []) if spec else []:
        for relative, dist in (("core/image_uri_config", "sagemaker-core"), ("image_uri_config", "sagemaker")):
            path = Path(location) / relative / f"{framework}.json"
            if path.is_file():
                found.append((path, f"installed {dist}"))
    return found


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def _vendored(framework: str) -> dict:
    return _data()["tables"][framework]


def catalog_source() -> str:
    """Where the vendored tables came from and when, e.g. "sagemaker-core 2.27.0 ..., 2026-11-22"."""
    data = _data()
    return f"{data['source'].split(' (')[0]}, taken {data['generated']}"
