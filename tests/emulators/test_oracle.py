"""The emulators are an oracle: they judge cloudllm with their own tables, never with cloudllm's code."""

from __future__ import annotations

import ast
from pathlib import Path

import cloudllm_emulators

PACKAGE = Path(cloudllm_emulators.__file__).parent


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_no_emulator_module_imports_cloudllm():
    """Of cloudllm's packages the emulators use exactly cloudllm_procs (processes, no cloud knowledge)."""
    offenders = {
        f"{path.name}: {module}"
        for path in PACKAGE.rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0].startswith("cloudllm") and module.split(".")[0] not in ("cloudllm_emulators", "cloudllm_procs")
    }
    assert not offenders, offenders
    used = {module.split(".")[0] for path in PACKAGE.rglob("*.py") for module in imported_modules(path)}
    assert "cloudllm_procs" in used


def test_cloudllm_procs_knows_nothing_of_cloudllm_or_the_emulators():
    import cloudllm_procs

    imported = {module for path in Path(cloudllm_procs.__file__).parent.rglob("*.py") for module in imported_modules(path)}
    assert not [m for m in imported if m.split(".")[0] in ("cloudllm", "cloudllm_emulators", "cloudllm_runtime")], imported


def test_vertex_machine_table_agrees_with_the_catalog():
    """cloudllm's catalog offers only what the emulator (Vertex's documented table) accepts, and all of it."""
    from cloudllm.catalog import offers
    from cloudllm_emulators.vertex import MACHINE_ACCELERATORS

    catalogued = {(o.name, o.accelerator_type, o.accelerator_count) for o in offers("vertex")}
    emulated = {(machine, a, c) for machine, pairs in MACHINE_ACCELERATORS.items() for a, c in pairs}
    assert catalogued == emulated


def test_vertex_accelerator_names_are_aiplatform_enum_members():
    from google.cloud import aiplatform_v1

    from cloudllm_emulators.vertex import MACHINE_ACCELERATORS

    names = {a for pairs in MACHINE_ACCELERATORS.values() for a, _ in pairs if a}
    assert names <= set(aiplatform_v1.AcceleratorType.__members__)


def test_sagemaker_tables_agree_with_the_provider():
    from cloudllm.providers.sagemaker import resources
    from cloudllm_emulators import sagemaker_hosting as sagemaker

    assert sagemaker.known_instance_types() == resources.known_instance_types()
    for image in ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:2.3-gpu", "x/tgi:1"):
        assert sagemaker.runs_toolkit(image) == resources.runs_toolkit(image)
