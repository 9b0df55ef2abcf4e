"""The local provider's container mode: `deploy --provider local --image build|IMAGE` serves from the image through podman."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from cloudllm.providers.local_container import ROOT_LABEL, VERSION_LABEL
from cloudllm.testing import eventually
from tests.conftest import run_cli
from tests.containers.conftest import TEST_BASE


def _ours(home: Path, name: str) -> list[dict]:
    """The containers carrying this endpoint's label (its folder in this test's CLOUDLLM_HOME)."""
    root = home / "local" / name
    listed = subprocess.run(["podman", "ps", "--all", "--filter", f"label={ROOT_LABEL}={root}", "--format", "json"], capture_output=True, text=True, check=True)
    return json.loads(listed.stdout or "[]")


def _bystander(name: str, labels: dict[str, str] | None = None) -> str:
    """A container that is not this endpoint's (no label, or another home's), which nothing may stop."""
    flags = [arg for key, value in (labels or {}).items() for arg in ("--label", f"{key}={value}")]
    subprocess.run(["podman", "run", "-d", "--rm", "--name", name, *flags, "--entrypoint", "sleep", TEST_BASE, "600"], capture_output=True, check=True)
    return name


def _running(container: str) -> bool:
    return subprocess.run(["podman", "container", "exists", container]).returncode == 0


def _deploy(model: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("deploy", str(model), "--provider", "local", "--name", name, *extra, timeout=600)


@pytest.fixture
def build_base(monkeypatch):
    monkeypatch.setenv("CLOUDLLM_BUILD_BASE", TEST_BASE)


def test_image_build_serves_a_local_endpoint_from_the_container(serving_image, build_base, tiny_gpt2, cloudllm_home) -> None:
    bystanders = [_bystander("h13-unlabelled-bystander"), _bystander("h13-other-home", {ROOT_LABEL: "/elsewhere/local/lc", VERSION_LABEL: "x"})]
    try:
        dry = _deploy(tiny_gpt2, "lc", "--image", "build", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"image: {serving_image.image} FROM {TEST_BASE} (built here, to run on this machine)" in dry.stdout + dry.stderr
        assert _ours(cloudllm_home, "lc") == []

        deployed = _deploy(tiny_gpt2, "lc", "--image", "build", "--json")
        assert deployed.returncode == 0, deployed.stderr
        url = json.loads(deployed.stdout)["endpoint"]["url"]
        [container] = _ours(cloudllm_home, "lc")
        inspected = json.loads(subprocess.run(["podman", "inspect", container["Id"]], capture_output=True, text=True, check=True).stdout)[0]
        # The SageMaker contract: the artifact read-only at /opt/ml/model, as the image's non-root user, on loopback only.
        [mount] = inspected["Mounts"]
        assert (mount["Destination"], mount["RW"]) == ("/opt/ml/model", False)
        assert mount["Source"].startswith(str(cloudllm_home / "local" / "lc"))
        assert inspected["Config"]["User"] == "1000:1000"
        bound = {binding["HostIp"] for bindings in inspected["NetworkSettings"]["Ports"].values() for binding in bindings or []}
        assert bound == {"127.0.0.1"}

        answer = run_cli("invoke", "lc", "Once upon a time", "--max-new-tokens", "3", "--raw")
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)[0]["generated_text"].strip()
        status = json.loads(run_cli("status", "lc", "--json").stdout)
        assert status["state"] == "InService" and status["url"] == url
        assert status["details"]["image"] == serving_image.image and status["details"]["container"] == container["Names"][0]
        assert "lc" in run_cli("list").stdout
        assert '"model_dir": "/opt/ml/model"' in run_cli("logs", "lc").stdout  # the container's own output

        assert run_cli("delete", "lc", "--yes").returncode == 0
        assert _ours(cloudllm_home, "lc") == []
        assert all(_running(name) for name in bystanders)
    finally:
        for name in bystanders:
            subprocess.run(["podman", "rm", "--force", "--time", "0", name], capture_output=True)


def test_a_container_that_exits_fails_the_deploy_and_leaves_nothing(serving_image, tiny_gpt2, cloudllm_home) -> None:
    # The torch base has no `serve` entrypoint: the container exits at once.
    result = _deploy(tiny_gpt2, "lc-exits", "--image", TEST_BASE)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the model server exited with code"), last
    assert "Traceback" not in result.stderr
    assert _ours(cloudllm_home, "lc-exits") == []
    assert not (cloudllm_home / "local" / "lc-exits").exists()
    assert "lc-exits" not in run_cli("list").stdout


def test_an_image_not_in_the_store_is_refused_before_anything_is_created(tiny_gpt2, cloudllm_home) -> None:
    result = _deploy(tiny_gpt2, "lc-missing", "--image", "localhost/no-such-image:1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the plan's line
    assert last.startswith("error: image localhost/no-such-image:1 is not in this machine's image store"), last
    assert not (cloudllm_home / "local" / "lc-missing").exists()
    assert "lc-missing" not in run_cli("list").stdout


@pytest.mark.slow
def test_an_update_keeps_the_url_and_a_killed_supervisor_takes_its_container_down(serving_image, tiny_gpt2, cloudllm_home) -> None:
    deployed = _deploy(tiny_gpt2, "lc-kill", "--image", serving_image.image, "--json")
    assert deployed.returncode == 0, deployed.stderr
    url = json.loads(deployed.stdout)["endpoint"]["url"]
    [container] = _ours(cloudllm_home, "lc-kill")
    # A settings change is a new version in a new container; the endpoint's URL stays, the old container goes.
    updated = _deploy(tiny_gpt2, "lc-kill", "--image", serving_image.image, "--max-new-tokens", "5", "--json")
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["endpoint"]["url"] == url
    [new] = _ours(cloudllm_home, "lc-kill")
    assert new["Id"] != container["Id"]
    assert httpx.post(f"{url}/invocations", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=60).status_code == 200

    pid = json.loads(run_cli("status", "lc-kill", "--json").stdout)["details"]["pid"]
    os.kill(pid, signal.SIGKILL)  # the supervisor alone, as an OOM kill would
    eventually(lambda: _ours(cloudllm_home, "lc-kill") == [], what="the container to stop after its supervisor died")
    status = json.loads(run_cli("status", "lc-kill", "--json").stdout)
    assert status["state"] == "Failed"

    # One whose supervisor and `podman run` were both killed outright stays: delete finds it by its label.
    root = cloudllm_home / "local" / "lc-kill"
    leftover = _bystander("h13-leftover", {ROOT_LABEL: str(root), VERSION_LABEL: "0123456789ab"})
    foreign = _bystander("h13-foreign", {ROOT_LABEL: str(root) + "-other", VERSION_LABEL: "0123456789ab"})
    try:
        assert run_cli("delete", "lc-kill", "--yes").returncode == 0
        assert not _running(leftover)
        assert _running(foreign)
    finally:
        for name in (leftover, foreign):
            subprocess.run(["podman", "rm", "--force", "--time", "0", name], capture_output=True)
