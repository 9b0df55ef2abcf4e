"""Vertex AI with --image: the emulator pulls the image from an Artifact Registry stand-in and runs it with AIP_*."""

from __future__ import annotations

import subprocess

import pytest

from cloudllm_emulators.containers import LoopbackRegistry
from tests.conftest import run_cli


@pytest.mark.slow
def test_vertex_deploy_with_the_image_is_served_by_the_container(serving_image, vertex_emulator, tiny_gpt2, monkeypatch) -> None:
    from cloudllm.images.registry import RegistryLogin, copy_image, split_image

    with LoopbackRegistry() as registry:
        monkeypatch.setenv("CLOUDLLM_REGISTRY_ENDPOINT", registry.endpoint)
        # Pushed as `cloudllm push --provider vertex` pushes; the token ADC would give is the only stand-in.
        name, tag = split_image(serving_image.image)
        uri = f"us-central1-docker.pkg.dev/cloudllm-emulator/cloudllm/{name}:{tag}"
        pushed = copy_image(serving_image.image_id, uri, RegistryLogin("us-central1-docker.pkg.dev", "oauth2accesstoken", "token"))
        deployed = run_cli(
            "deploy", str(tiny_gpt2), "--provider", "vertex", "--name", "image-demo", "--runtime", "handler",
            "--instance", "n1-standard-4", "--bucket", vertex_emulator.bucket, "--image", pushed.by_digest, timeout=900,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr
        text = run_cli("invoke", "image-demo", "Once upon a time", "--max-new-tokens", "4", "--provider", "vertex")
        assert text.returncode == 0, text.stderr
        assert text.stdout.strip()
        # The replica answering is the image itself, pulled from the stand-in by digest.
        running = subprocess.run(["podman", "ps", "--filter", "name=cloudllm-emulated-", "--format", "{{.Image}}"], capture_output=True, text=True).stdout
        assert f"{registry.endpoint}/cloudllm-emulator/cloudllm/{name}@{pushed.digest}" in running
        assert run_cli("delete", "image-demo", "--provider", "vertex").returncode == 0
