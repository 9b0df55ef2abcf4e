"""The docker code path, for real: a `docker` that checks docker's own command line, then runs podman.

PATH holds only that `docker` (no podman, buildah or skopeo), so cloudllm takes its docker branch
for build, inspect, push and run, and every command it sends must be one the docker CLI accepts
(tests/containers/docker_shim.py refuses podman-only flags as docker does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli
from tests.containers.conftest import TEST_BASE

SHIM = Path(__file__).with_name("docker_shim.py")


@pytest.fixture
def docker_only(tmp_path: Path) -> dict[str, str]:
    """The environment of a machine whose only container tool is docker."""
    bin_dir = tmp_path / "docker-bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    # podman itself keeps the machine's PATH (conmon, runc, netavark): that is the engine's business, not the CLI's.
    docker.write_text(f'#!/bin/sh\nPATH="{os.environ["PATH"]}" exec "{sys.executable}" "{SHIM}" "$@"\n')
    docker.chmod(0o755)
    return {"PATH": str(bin_dir), "PODMAN": shutil.which("podman")}


def _docker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, env={**os.environ, **env})


def test_the_shim_refuses_what_docker_would(docker_only) -> None:
    refused = _docker(docker_only, "push", "--tls-verify=false", "example.com/x:1")
    assert refused.returncode == 125 and "unknown flag: --tls-verify" in refused.stderr
    assert _docker(docker_only, "image", "inspect", "--format", "{{.Id}}", TEST_BASE).stdout.strip()


def test_docker_builds_the_image(serving_image, docker_only) -> None:
    built = run_cli("build", "--base", TEST_BASE, "--builder", "docker", "--json", env=docker_only, timeout=900)
    assert built.returncode == 0, built.stderr
    result = json.loads(built.stdout)
    assert result["builder"] == "docker"
    assert result["image"] == serving_image.image  # the tag is the content's, whichever tool built it
    # This machine's local pip folders cannot be mounted into a docker build: said, not silently dropped.
    from cloudllm.images.build import host_pip_settings

    folders = [v for key in ("find-links", "extra-index-url") for v in host_pip_settings().get(key, "").split() if v.startswith(("/", "file://"))]
    assert all(folder in built.stderr for folder in folders), built.stderr
    assert _docker(docker_only, "image", "inspect", "--format", "{{.Id}}", result["image"]).stdout.strip()


def test_docker_pushes_to_ecr_and_the_digest_is_the_registrys(small_image, sagemaker_emulator, registry, docker_only) -> None:
    first = run_cli("push", small_image, "--provider", "sagemaker", "--region", "us-east-1", "--json", env=docker_only, timeout=900)
    assert first.returncode == 0, first.stderr
    pushed = json.loads(first.stdout)
    assert pushed["tool"] == "docker"
    repository, tag = pushed["uri"].split("/", 1)[1].rsplit(":", 1)
    held = httpx.head(
        f"http://{registry.endpoint}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"},
    )
    assert held.headers["docker-content-digest"] == pushed["digest"]
    # The tag made for the push is gone; the image keeps its own name.
    assert _docker(docker_only, "image", "inspect", "--format", "{{.Id}}", f"{registry.endpoint}/{repository}:{tag}").returncode != 0
    assert _docker(docker_only, "image", "inspect", "--format", "{{.Id}}", small_image).returncode == 0

    by_digest = f"{registry.endpoint}/{repository}@{pushed['digest']}"
    subprocess.run(["podman", "rmi", "--ignore", by_digest], capture_output=True)
    assert _docker(docker_only, "pull", "--quiet", by_digest).returncode == 0
    local_id = _docker(docker_only, "image", "inspect", "--format", "{{.Id}}", small_image).stdout.strip()
    assert _docker(docker_only, "image", "inspect", "--format", "{{.Id}}", by_digest).stdout.strip() == local_id

    second = run_cli("push", small_image, "--provider", "sagemaker", "--region", "us-east-1", env=docker_only, timeout=900)
    assert second.returncode == 0, second.stderr
    assert f"pushed {pushed['uri']} {pushed['digest']} (0 layers sent" in second.stdout


def test_docker_push_sends_the_ecr_login_and_a_refusal_is_one_line(small_image, sagemaker_emulator, docker_only, tmp_path, monkeypatch) -> None:
    import crypt
    import warnings

    from cloudllm_emulators.containers import LoopbackRegistry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        hashed = crypt.crypt("right-password", crypt.mksalt(crypt.METHOD_BLOWFISH))
    (tmp_path / "htpasswd").write_text(f"someone:{hashed}\n")
    with LoopbackRegistry(htpasswd=tmp_path / "htpasswd") as guarded:
        monkeypatch.setenv("CLOUDLLM_REGISTRY_ENDPOINT", guarded.endpoint)
        result = run_cli("push", small_image, "--provider", "sagemaker", "--region", "us-east-1", env=docker_only)
        log = (guarded.dir / "registry.log").read_text()
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: the registry refused the login for 123456789012.dkr.ecr.us-east-1.amazonaws.com/")
    assert len(result.stderr.strip().splitlines()) == 1
    assert 'error authenticating user \\"AWS\\"' in log  # the ECR login (from DOCKER_CONFIG) reached the registry and was refused


@pytest.mark.slow
def test_a_local_endpoint_runs_its_container_through_docker(serving_image, docker_only, tiny_gpt2, cloudllm_home) -> None:
    deployed = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "lc-docker", "--image", serving_image.image, env=docker_only, timeout=600)
    assert deployed.returncode == 0, deployed.stderr
    answer = run_cli("invoke", "lc-docker", "Hello", "--max-new-tokens", "2", env=docker_only)
    assert answer.returncode == 0, answer.stderr
    assert (cloudllm_home / "local" / "lc-docker" / "container-engine").read_text().strip() == "docker"
    assert run_cli("delete", "lc-docker", "--yes", env=docker_only).returncode == 0
    listed = subprocess.run(["podman", "ps", "--all", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert "cloudllm-local-lc-docker-" not in listed
