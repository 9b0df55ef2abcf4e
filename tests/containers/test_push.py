"""`cloudllm push` to ECR for real: moto serves the ECR API, Debian's docker-registry the image on loopback."""

from __future__ import annotations

import json
import subprocess
import warnings

import boto3
import pytest

from cloudllm_emulators.containers import LoopbackRegistry
from tests.containers.conftest import CLOUDLLM


def _push(image: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLOUDLLM, "push", image, "--provider", "sagemaker", "--region", "us-east-1", *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _image_id(reference: str) -> str:
    return subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", reference], capture_output=True, text=True, check=True).stdout.strip()


def test_push_creates_the_repository_and_pulls_back_by_digest_and_a_second_push_sends_nothing(serving_image, sagemaker_emulator, registry) -> None:
    first = _push(serving_image.image, "--json")
    assert first.returncode == 0, first.stderr
    pushed = json.loads(first.stdout)
    repository = serving_image.image.split(":")[0]
    assert pushed["uri"] == f"123456789012.dkr.ecr.us-east-1.amazonaws.com/{repository}:{serving_image.image.split(':')[1]}"
    # The registry lives for the test session: another module may have sent these layers already.
    assert pushed["digest"].startswith("sha256:") and pushed["layers_sent"] + pushed["layers_skipped"] > 0
    ecr = boto3.client("ecr", region_name="us-east-1")
    assert ecr.describe_repositories(repositoryNames=[repository])["repositories"][0]["repositoryName"] == repository

    by_digest = f"{registry.endpoint}/{repository}@{pushed['digest']}"
    subprocess.run(["podman", "rmi", "--ignore", by_digest], capture_output=True)
    pulled = subprocess.run(["podman", "pull", "--quiet", "--tls-verify=false", by_digest], capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    assert _image_id(by_digest) == serving_image.image_id

    second = _push(serving_image.image)
    assert second.returncode == 0, second.stderr
    assert f"pushed {pushed['uri']} {pushed['digest']} (0 layers sent" in second.stdout
    assert "already there" in second.stdout


def test_registry_refusing_the_login_is_one_line(serving_image, sagemaker_emulator, tmp_path, monkeypatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        hashed = crypt.crypt("right-password", crypt.mksalt(crypt.METHOD_BLOWFISH))
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"someone:{hashed}\n")
    with LoopbackRegistry(htpasswd=htpasswd) as guarded:
        monkeypatch.setenv("CLOUDLLM_REGISTRY_ENDPOINT", guarded.endpoint)
        result = _push(serving_image.image)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the registry refused the login for 123456789012.dkr.ecr.us-east-1.amazonaws.com/")
    assert len(result.stderr.strip().splitlines()) == 1


def test_push_of_an_image_that_is_not_here_is_one_line(sagemaker_emulator) -> None:
    result = _push("localhost/never-built:1")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: image localhost/never-built:1 is not in this machine's image store. build it first with `cloudllm build`"
