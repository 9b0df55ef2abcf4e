"""The instance catalog: its facts (CONTRACTS.md), sources and date, lookups and the errors of bad names."""

from __future__ import annotations

import json
import re

import pytest

from cloudllm.catalog import catalog_info, instances, lookup, offers, provider_of, resolve, suggest_names
from cloudllm.catalog.instances import DATA_FILE
from cloudllm.errors import UserError


def test_data_file_states_date_regions_sources_and_that_prices_are_indicative():
    data = json.loads(DATA_FILE.read_text())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["as_of"])
    assert "indicative" in data["note"].lower()
    info = catalog_info()
    assert info.regions == {"sagemaker": "us-east-1", "vertex": "us-central1"}
    for provider in ("sagemaker", "vertex"):
        assert info.sources[provider], provider


def test_every_row_is_complete_and_names_are_unique_across_providers():
    rows = instances()
    assert len({r.name for r in rows}) == len(rows)
    for row in rows:
        assert row.vcpu > 0 and row.memory_gib > 0, row.name
        # A price only where one is known; a row without says where to look.
        assert (row.price_per_hour is not None and row.price_per_hour > 0) or "pricing" in (row.note or ""), row.name
        if row.kind == "cpu":
            assert row.accelerator_count == 0 and row.gpu_count == 0, row.name
        else:
            assert row.accelerator_count > 0 and row.accelerator_memory_gib > 0 and row.accelerator, row.name


@pytest.mark.parametrize(
    "name, count, memory, accelerator",
    [
        ("ml.g4dn.xlarge", 1, 16, "NVIDIA T4"),
        ("ml.g5.xlarge", 1, 24, "NVIDIA A10G"),  # missing from the SDK's instance_gpu_info.json
        ("ml.g5.16xlarge", 1, 24, "NVIDIA A10G"),
        ("ml.g5.12xlarge", 4, 24, "NVIDIA A10G"),
        ("ml.g5.24xlarge", 4, 24, "NVIDIA A10G"),
        ("ml.g5.48xlarge", 8, 24, "NVIDIA A10G"),
        ("ml.g6.xlarge", 1, 24, "NVIDIA L4"),
        ("ml.g6e.xlarge", 1, 48, "NVIDIA L40S"),
        ("ml.p4d.24xlarge", 8, 40, "NVIDIA A100 40GB"),
        ("ml.p4de.24xlarge", 8, 80, "NVIDIA A100 80GB"),
        ("ml.p5.48xlarge", 8, 80, "NVIDIA H100 80GB"),
        # Types SageMaker hosts that the catalog lacked (their GPU count was taken as 1):
        ("ml.p2.16xlarge", 16, 12, "NVIDIA K80"),
        ("ml.p3.2xlarge", 1, 16, "NVIDIA V100"),
        ("ml.p3.16xlarge", 8, 16, "NVIDIA V100"),
        ("ml.p5.4xlarge", 1, 80, "NVIDIA H100 80GB"),
        ("ml.p5e.48xlarge", 8, 141, "NVIDIA H200"),
        ("ml.p5en.48xlarge", 8, 141, "NVIDIA H200"),
        ("ml.p6-b200.48xlarge", 8, 180, "NVIDIA B200"),
        ("ml.g6e.12xlarge", 4, 48, "NVIDIA L40S"),
        ("ml.g7.12xlarge", 2, 32, "NVIDIA RTX PRO 4500"),
    ],
)
def test_sagemaker_gpu_facts(name, count, memory, accelerator):
    row = lookup("sagemaker", name)
    assert (row.gpu_count, row.accelerator_memory_gib, row.accelerator) == (count, memory, accelerator)


def test_every_sagemaker_row_is_a_type_sagemaker_hosts_and_unpriced_rows_are_sourced():
    from cloudllm.catalog.instances import platform_names

    rows = instances("sagemaker")
    assert {r.name for r in rows} <= platform_names("sagemaker")  # botocore's ProductionVariantInstanceType
    unpriced = [r.name for r in rows if r.price_per_hour is None]
    assert "ml.p5e.48xlarge" in unpriced
    assert any("priced null" in source for source in catalog_info().sources["sagemaker"])


def test_sagemaker_cpu_and_neuron_types():
    for name in ("ml.m5.xlarge", "ml.c5.xlarge"):
        assert lookup("sagemaker", name).kind == "cpu"
    inf2 = lookup("sagemaker", "ml.inf2.xlarge")
    assert inf2.kind == "neuron" and inf2.accelerator_memory_gib == 32
    assert inf2.gpu_count == 0  # Neuron chips are not GPUs: NUM_SHARD must not count them
    assert "neuron" in inf2.note.lower()


@pytest.mark.parametrize(
    "name, count, memory, accelerator_type",
    [
        ("g2-standard-4", 1, 24, "NVIDIA_L4"),
        ("g2-standard-24", 2, 24, "NVIDIA_L4"),
        ("g2-standard-48", 4, 24, "NVIDIA_L4"),
        ("g2-standard-96", 8, 24, "NVIDIA_L4"),
        ("a2-highgpu-1g", 1, 40, "NVIDIA_TESLA_A100"),
        ("a2-highgpu-8g", 8, 40, "NVIDIA_TESLA_A100"),
        ("a2-ultragpu-1g", 1, 80, "NVIDIA_A100_80GB"),
        ("a3-highgpu-8g", 8, 80, "NVIDIA_H100_80GB"),
    ],
)
def test_vertex_machine_facts(name, count, memory, accelerator_type):
    row = lookup("vertex", name)
    assert (row.gpu_count, row.accelerator_memory_gib, row.accelerator_type) == (count, memory, accelerator_type)
    assert row.accelerator_flag == f"{accelerator_type}:{count}"


def test_vertex_n1_takes_t4_or_v100_priced_as_machine_plus_gpus():
    n1 = lookup("vertex", "n1-standard-8")
    assert n1.gpu_count == 0 and set(n1.attachable) == {"NVIDIA_TESLA_T4", "NVIDIA_TESLA_V100"}
    t4 = resolve("vertex", "n1-standard-8", "NVIDIA_TESLA_T4:2")
    assert (t4.gpu_count, t4.accelerator_memory_gib, t4.accelerator_flag) == (2, 16, "NVIDIA_TESLA_T4:2")
    assert t4.price_per_hour == pytest.approx(n1.price_per_hour + 2 * 0.4025)
    assert t4.label == "n1-standard-8 + 2x NVIDIA_TESLA_T4"
    assert resolve("vertex", "n1-standard-8", "NVIDIA_TESLA_V100").gpu_count == 1  # count defaults to the smallest
    with pytest.raises(UserError, match="at most 12 vCPUs"):
        resolve("vertex", "n1-standard-32", "NVIDIA_TESLA_V100:1")
    with pytest.raises(UserError, match="counts"):
        resolve("vertex", "n1-standard-8", "NVIDIA_TESLA_T4:3")
    with pytest.raises(UserError, match="cannot take NVIDIA_L4"):
        resolve("vertex", "n1-standard-8", "NVIDIA_L4:1")


def test_offers_expand_n1_machines_with_each_valid_gpu_count():
    labels = {o.label for o in offers("vertex")}
    assert "n1-standard-4 + 1x NVIDIA_TESLA_T4" in labels
    assert "n1-standard-32 + 8x NVIDIA_TESLA_V100" in labels
    assert "n1-standard-32 + 1x NVIDIA_TESLA_V100" not in labels  # 32 vCPUs need at least 4 V100s
    assert "g2-standard-8" in labels and all(o.provider == "vertex" for o in offers("vertex"))


def test_vertex_accelerator_override_must_match_built_in_gpus():
    assert resolve("vertex", "g2-standard-24", "NVIDIA_L4:2").gpu_count == 2
    assert resolve("vertex", "g2-standard-24", "nvidia_l4").gpu_count == 2
    with pytest.raises(UserError, match="comes with 2x NVIDIA_L4"):
        resolve("vertex", "g2-standard-24", "NVIDIA_L4:4")
    with pytest.raises(UserError, match="invalid accelerator"):
        resolve("vertex", "g2-standard-24", "NVIDIA_L4:two")


def test_lookup_and_suggestions():
    assert lookup("sagemaker", "ml.g5.xlarg") is None
    assert lookup("vertex", "ml.g5.xlarge") is None
    assert suggest_names("sagemaker", "ml.g5.xlarg")[0] == "ml.g5.xlarge"
    assert suggest_names("sagemaker", "g5.xlarge")[0] == "ml.g5.xlarge"  # the ml. prefix forgotten
    assert suggest_names("vertex", "g2-standard-6")[0].startswith("g2-standard-")
    assert suggest_names("sagemaker", "zzzzzz") == []
    assert provider_of("a3-highgpu-8g") == "vertex" and provider_of("ml.p5.48xlarge") == "sagemaker"


def test_unknown_instance_error_suggests_close_names():
    with pytest.raises(UserError) as err:
        resolve("sagemaker", "ml.g5.xlarg")
    assert "unknown SageMaker instance type 'ml.g5.xlarg'" in err.value.line()
    assert "did you mean ml.g5.xlarge" in err.value.line()


def test_suggestions_also_come_from_the_types_sagemaker_lists_beyond_the_catalog():
    assert lookup("sagemaker", "ml.p6-b300.48xlarge") is None  # hosted by SageMaker (botocore), not catalogued
    assert suggest_names("sagemaker", "ml.p6-b300.48xlarg")[0] == "ml.p6-b300.48xlarge"
    with pytest.raises(UserError, match="did you mean ml.p6-b300.48xlarge"):
        resolve("sagemaker", "ml.p6-b300.48xlarg")
    assert suggest_names("vertex", "ml.p6-b300.48xlarg") == []  # botocore's names are SageMaker's only


def test_instance_of_the_other_provider_says_which_provider():
    with pytest.raises(UserError) as err:
        resolve("vertex", "ml.g5.xlarge")
    assert "ml.g5.xlarge is a SageMaker instance type, not a Vertex AI machine type" in err.value.line()
    assert "--provider sagemaker" in err.value.line()
    with pytest.raises(UserError, match="g2-standard-8 is a Vertex AI machine type"):
        resolve("sagemaker", "g2-standard-8")


def test_sagemaker_instance_names_are_cached_by_botocore_s_model_file(monkeypatch):
    """`cloudllm plan` reads botocore's SageMaker model once per botocore: the names are cached, keyed by the file."""
    import importlib
    import os
    from pathlib import Path

    import botocore.session

    catalog = importlib.import_module("cloudllm.catalog.instances")  # the package's `instances` is a function

    def parses():
        catalog.platform_names.cache_clear()
        return catalog.platform_names("sagemaker")

    fresh = parses()
    cache = Path(os.environ["CLOUDLLM_HOME"]) / "cache" / "sagemaker-instance-types.json"
    assert cache.is_file() and "ml.g5.xlarge" in fresh

    def no_parse(*args, **kwargs):
        raise AssertionError("botocore's service model was parsed again")

    with monkeypatch.context() as patch:
        patch.setattr(botocore.session.Session, "get_service_model", no_parse)
        assert parses() == fresh  # from the cache

    # Another botocore (its model file changed): read afresh; a damaged cache file is read afresh too.
    stored = json.loads(cache.read_text())
    stored["source"]["mtime_ns"] -= 1
    stored["names"] = ["ml.stale.xlarge"]
    cache.write_text(json.dumps(stored))
    assert parses() == fresh
    cache.write_text("{not json")
    assert parses() == fresh
