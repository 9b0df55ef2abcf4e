"""What goes wrong around images is one line naming the problem and the fix, a non-zero exit, nothing left."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli
from tests.containers.conftest import TEST_BASE

DEBIAN_BASE_PREFIX = "localhost/cloudllm-debian"


def test_no_builder_names_what_to_install(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("python3", "sh"):
        (bare / tool).symlink_to(shutil.which(tool))
    result = run_cli("build", env={"PATH": str(bare)})
    line = assert_one_line_error(result, code=2, contains="no container builder on this machine")
    assert "make containers" in line and "apt-get install podman buildah" in line


def test_a_base_without_torch_fails_the_build_with_its_last_lines_and_log(serving_image) -> None:
    import subprocess

    bases = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", DEBIAN_BASE_PREFIX], capture_output=True, text=True).stdout.split()
    if not bases:
        pytest.skip("no Debian base image: run `make containers`")
    result = run_cli("build", "--base", bases[0], "-t", "cloudllm-serve:no-torch", timeout=300)
    line = assert_one_line_error(result, code=2, contains="the image build failed")
    assert "the base image has no torch" in line
    log = Path(line.split("full log: ")[1].rstrip("."))
    assert log.is_file() and "STEP" in log.read_text()
    assert subprocess.run(["podman", "image", "exists", "cloudllm-serve:no-torch"]).returncode != 0


def test_a_base_that_cannot_be_pulled_is_one_line() -> None:
    result = run_cli("build", "--base", "127.0.0.1:9/nowhere/base:1", timeout=120)
    assert_one_line_error(result, code=2, contains="base image 127.0.0.1:9/nowhere/base:1 is not here and cannot be pulled")


def test_unknown_builder_is_refused_by_the_cli() -> None:
    assert_one_line_error(run_cli("build", "--builder", "kaniko"), code=2, contains="--builder")


def test_serve_container_with_a_folder_that_is_not_an_artifact(tmp_path: Path) -> None:
    result = run_cli("serve", str(tmp_path), "--container", "--image", TEST_BASE)
    assert_one_line_error(result, code=2, contains="is not a model artifact")


def test_an_image_that_exits_at_once_is_one_line_with_its_last_log_lines(tmp_path: Path, tiny_artifact: Path) -> None:
    from cloudllm.errors import DeployFailed
    from cloudllm.images.contract import start_container
    from tests.containers.conftest import free_port

    # The base has no serving runtime: `serve` is not a command there, so the container exits.
    running = start_container(TEST_BASE, "sagemaker", port=free_port(), log=tmp_path / "c.log", artifact=tiny_artifact)
    with pytest.raises(DeployFailed) as failure:
        running.wait_ready(timeout=120)
    assert "the container exited with code" in str(failure.value) and "serve" in str(failure.value)
    assert str(tmp_path / "c.log") in str(failure.value)


def test_an_image_that_never_answers_ping_is_stopped_with_its_last_log_lines(tmp_path: Path) -> None:
    import subprocess

    from cloudllm.errors import DeployFailed
    from cloudllm.images.builders import find_engine
    from cloudllm.images.contract import RunningContainer
    from tests.containers.conftest import free_port

    # A server that prints and keeps running but never listens.
    name = f"cloudllm-hung-{os.getpid()}"
    log = tmp_path / "hung.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["podman", "run", "--rm", "--network", "host", "--name", name, "--entrypoint", "sh", TEST_BASE, "-c", "echo loading forever; sleep 120"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    hung = RunningContainer(find_engine(), name, f"http://127.0.0.1:{free_port()}", log, process)
    with pytest.raises(DeployFailed) as failure:
        hung.wait_ready(timeout=5)
    assert "did not answer /ping within 5s: loading forever" in str(failure.value)
    assert process.poll() is not None  # stopped, not left running


def test_deploy_image_build_without_a_builder_says_so_and_keeps_the_catalog_image(sagemaker_emulator, tiny_gpt2: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "sh").symlink_to(shutil.which("sh"))
    result = run_cli(
        "deploy", str(tiny_gpt2), "--provider", "sagemaker", "--name", "no-builder", "--instance", "ml.g5.xlarge", "--runtime", "handler",
        "--bucket", f"{sagemaker_emulator.bucket}/models", "--role", sagemaker_emulator.role, "--image", "build", "--dry-run",
        env={"PATH": str(bare)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("image:")]
    assert said == ["image: no container builder here (buildah, podman, docker): deploying with the catalog's image instead"]
    assert "no-builder" not in run_cli("list").stdout
