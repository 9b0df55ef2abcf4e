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


def test_the_content_tag_follows_the_base_and_every_file_and_nothing_else(tmp_path: Path) -> None:
    import shutil

    from cloudllm.images.build import context_files, content_tag

    shutil.copytree(ROOT / "containers", tmp_path / "containers")
    shutil.copytree(ROOT / "cloudllm_runtime", tmp_path / "cloudllm_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    files = context_files(tmp_path)
    tag = content_tag("sha256:base", files)
    assert tag == content_tag("sha256:base", context_files(ROOT)) == content_tag("sha256:base", context_files(tmp_path))
    assert content_tag("sha256:other-base", files) != tag
    (tmp_path / "cloudllm_runtime" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "cloudllm_runtime" / "__pycache__" / "x.pyc").write_bytes(b"bytecode is not source")
    assert content_tag("sha256:base", context_files(tmp_path)) == tag
    with open(tmp_path / "cloudllm_runtime" / "settings.py", "a") as fh:
        fh.write("\n")
    assert content_tag("sha256:base", context_files(tmp_path)) != tag


def test_pip_settings_reach_the_build_as_secrets_and_read_only_mounts(tmp_path: Path) -> None:
    from cloudllm.images.build import pip_build_inputs

    cert = tmp_path / "ca.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    settings = {"cert": str(cert), "find-links": str(tmp_path), "extra-index-url": f"file://{index} https://mirror.example/simple"}
    flags, notes = pip_build_inputs(settings, "buildah", tmp_path)
    assert ["--secret", f"id=pip-cert,src={cert}"] == flags[:2]
    assert f"{tmp_path / 'pypi'}:{tmp_path / 'pypi'}:ro" in flags  # the index's ../files too
    conf = (tmp_path / "pip.conf").read_text()
    assert "cert = /run/secrets/pip-cert" in conf and "BEGIN CERTIFICATE" not in conf
    assert f"extra-index-url = file://{index} https://mirror.example/simple" in conf
    _, docker_notes = pip_build_inputs(settings, "docker", tmp_path)
    assert any("not a folder a docker build can mount" in note for note in docker_notes) and not notes
