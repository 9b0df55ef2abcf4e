"""A change to cloudllm_runtime alone rebuilds one small layer: every layer below it is the same."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.containers.conftest import TEST_BASE


def _layers(image: str) -> list[str]:
    out = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["RootFS"]["Layers"]


def test_a_runtime_only_change_rebuilds_only_the_runtime_layer(serving_image, tmp_path: Path) -> None:
    from cloudllm.images.build import REPO_ROOT, build_image

    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "containers", source / "containers")
    shutil.copytree(REPO_ROOT / "cloudllm_runtime", source / "cloudllm_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    with open(source / "cloudllm_runtime" / "__init__.py", "a") as fh:
        fh.write("\n# a runtime-only change\n")
    changed = build_image(base=TEST_BASE, root=source)
    try:
        assert changed.image != serving_image.image  # the content tag follows the change
        before, after = _layers(serving_image.image), _layers(changed.image)
        assert len(before) == len(after)
        assert before[:-1] == after[:-1] and before[-1] != after[-1]
    finally:
        subprocess.run(["podman", "rmi", changed.image], capture_output=True)
