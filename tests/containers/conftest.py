"""Real containers: the serving image built FROM the offline base `make containers` makes, run by podman.

Without the engine or the base (not root, not Debian, `make containers` not run) every test here
skips, naming the target that fixes it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

TEST_BASE = "localhost/cloudllm-torch-base:latest"
SKIP_REASON = "needs podman, buildah and the offline base image: run `make containers` (as root on Debian)"
CLOUDLLM = str(Path(sys.executable).parent / "cloudllm")


def engine_ready() -> bool:
    if not (shutil.which("podman") and shutil.which("buildah")):
        return False
    return subprocess.run(["podman", "image", "exists", TEST_BASE], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items) -> None:
    if engine_ready():
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def serving_image(tmp_path_factory: pytest.TempPathFactory):
    """The serving image FROM the offline base; one build at a time across xdist workers (the rest hit its cache)."""
    from cloudllm.images.build import build_image

    lock_path = Path(os.environ.get("TMPDIR", "/tmp")) / "cloudllm-serving-image.lock"
    home = tmp_path_factory.mktemp("build-home")
    with open(lock_path, "w") as lock, pytest.MonkeyPatch.context() as patch:
        fcntl.flock(lock, fcntl.LOCK_EX)
        patch.setenv("CLOUDLLM_HOME", str(home))
        return build_image(base=TEST_BASE)


@pytest.fixture(scope="session")
def registry_process():
    """One docker-registry on loopback per test session (a second push finds the layers the first sent)."""
    from cloudllm_emulators.containers import LoopbackRegistry

    with LoopbackRegistry() as stand_in:
        yield stand_in


@pytest.fixture(scope="module")
def registry(registry_process):
    """The stand-in for ECR / Artifact Registry, its address in this module's environment only."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in registry_process.env().items():
            patch.setenv(key, value)
        yield registry_process


@pytest.fixture(scope="session")
def small_image(tmp_path_factory: pytest.TempPathFactory):
    """A one-file image: the push path is the same for any image, and this one goes in a second."""
    folder = tmp_path_factory.mktemp("small-image")
    (folder / "hello.txt").write_text("hello\n")
    image = f"localhost/cloudllm-push-probe:{os.getpid()}"  # one per xdist worker: each removes its own
    tar = subprocess.run(["tar", "-C", str(folder), "-c", "."], capture_output=True, check=True).stdout
    made = subprocess.run(["podman", "import", "--quiet", "-", image], input=tar, capture_output=True, check=True)
    yield image
    # By id: also the names a test pulled it back under (registry/repository@digest).
    subprocess.run(["podman", "rmi", "--force", made.stdout.decode().strip()], capture_output=True)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 packaged as `cloudllm package` writes it (what SageMaker mounts at /opt/ml/model)."""
    from cloudllm import api

    out = tmp_path_factory.mktemp("artifacts") / "tiny-gpt2"
    api.package(tiny_gpt2, out)
    # As SageMaker extracts model.tar.gz: readable by the image's non-root user (save_pretrained may write 0600).
    for path in out.rglob("*"):
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until URL answers 200; fails with the process's output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read() if process.stdout else ""
            pytest.fail(f"exited with {process.returncode} before {url} answered: {out[-2000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer 200 within {timeout}s")


def stop(process: subprocess.Popen) -> str:
    """SIGTERM (the engine passes it to the container, which drains and exits), then the output."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.stdout.read() if process.stdout else ""


def serve_container(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [CLOUDLLM, "serve", *args, "--container"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
