"""containers/Dockerfile as text: what it copies, its entrypoint, its pins (tests/containers/ build and run it)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "containers" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    return [
        (m.group(1).upper(), m.group(2))
        for m in re.finditer(r"^(\w+)\s+(.*)$", DOCKERFILE.read_text(), re.MULTILINE)
    ]


def test_every_copied_path_exists() -> None:
    copies = [args.split()[:-1] for op, args in _instructions() if op == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source


def test_entrypoint_runs_the_generated_app_on_8080() -> None:
    ops = dict(_instructions())
    entrypoint = json.loads(ops["ENTRYPOINT"])
    assert entrypoint == ["/usr/local/bin/serve"]
    assert "8080" in ops["EXPOSE"]
    script = (ROOT / "containers" / "serve").read_text()
    assert "code/serve.py" in script and "cloudllm_runtime serve" in script


def test_entry_script_is_valid_shell() -> None:
    subprocess.run(["sh", "-n", str(ROOT / "containers" / "serve")], check=True)


def test_image_pins_transformers_4_like_the_hf_containers() -> None:
    requirements = (ROOT / "containers" / "requirements.txt").read_text()
    assert "transformers>=4.45,<5" in requirements
    for needed in ("starlette", "uvicorn", "prometheus-client", "google-cloud-storage"):
        assert needed in requirements


def test_quantized_weights_load_without_replacing_the_base_images_torch() -> None:
    """The artifacts' code/requirements.txt asks for the same optimum-quanto, whose 0.2.7 needs torch >= 2.6."""
    requirements = (ROOT / "containers" / "requirements.txt").read_text()
    template = (ROOT / "templates" / "requirements.txt.j2").read_text()
    (quanto,) = re.findall(r"^optimum-quanto\S*", requirements, re.MULTILINE)
    assert quanto in template
    from cloudllm.images.build import DEFAULT_BASE

    assert f"ARG BASE={DEFAULT_BASE}" in DOCKERFILE.read_text()
    torch = tuple(int(part) for part in re.search(r"pytorch:(\d+)\.(\d+)", DEFAULT_BASE).groups())
    assert torch >= (2, 6), base


def test_runtime_code_is_the_last_layer_so_a_runtime_change_rebuilds_one_small_layer() -> None:
    steps = [op for op, _ in _instructions() if op in ("COPY", "RUN")]
    copies = [args for op, args in _instructions() if op == "COPY"]
    assert steps[-1] == "COPY" and copies[-1].startswith("cloudllm_runtime ")
    assert steps.index("RUN") > 0 and copies[0].startswith("containers/requirements.txt ")
