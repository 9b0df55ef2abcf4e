"""The serving image, built for real FROM the offline base, and run under both platforms' contracts."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from tests.containers.conftest import TEST_BASE, free_port, serve_container, stop, wait_for


def _inspect(image: str) -> dict:
    return json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True).stdout)[0]


def _in_image(image: str, script: str) -> str:
    result = subprocess.run(["podman", "run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_image_runs_as_a_non_root_user_with_no_credentials_or_pip_settings_inside(serving_image) -> None:
    config = _inspect(serving_image.image)["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["/usr/local/bin/serve"]
    names = {entry.split("=", 1)[0] for entry in config["Env"]}
    leaked = {n for n in names if n.startswith(("AWS_", "GOOGLE_", "CLOUDSDK_", "AIP_", "PIP_CERT", "PIP_INDEX", "PIP_EXTRA", "PIP_FIND", "REQUESTS_CA", "SSL_CERT"))}
    assert not leaked
    # What the build was given (pip.conf, the CA bundle) was a secret of one RUN step, not a file in a layer.
    found = _in_image(
        serving_image.image,
        "id -u; ls -A /run/secrets | wc -l; for f in /etc/pip.conf /etc/xdg/pip /opt/venv/pip.conf /root/.config/pip; do [ -e $f ] && echo $f; done; true",
    ).split()
    assert found == ["1000", "0"]


def test_pip_kept_the_base_images_torch(serving_image) -> None:
    def torch_version(image: str) -> str:
        return _in_image(image, "python -c 'import torch; print(torch.__version__)'").strip()

    assert torch_version(serving_image.image) == torch_version(TEST_BASE)
    assert _in_image(serving_image.image, "python -c 'import transformers; print(transformers.__version__)'").startswith("4.")


def test_an_unchanged_rebuild_gives_the_same_tag_and_image(serving_image) -> None:
    from cloudllm.images.build import build_image

    again = build_image(base=TEST_BASE)
    assert again.image == serving_image.image
    assert again.image_id == serving_image.image_id


def test_sagemaker_contract_serves_the_mounted_artifact(serving_image, tiny_artifact) -> None:
    port = free_port()
    process = serve_container(str(tiny_artifact), "--image", serving_image.image, "--port", str(port))
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 4, "do_sample": False}},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert isinstance(body, list) and body[0]["generated_text"].strip()
    finally:
        output = stop(process)
    assert '"model_dir": "/opt/ml/model"' in output


def test_vertex_contract_downloads_the_model_from_gcs(serving_image, tiny_artifact, vertex_emulator) -> None:
    from google.cloud import storage

    bucket = storage.Client().bucket("cloudllm-test")
    for path in tiny_artifact.rglob("*"):
        if path.is_file():
            bucket.blob(f"container/{path.relative_to(tiny_artifact).as_posix()}").upload_from_filename(str(path))
    port = free_port()
    process = serve_container("gs://cloudllm-test/container", "--contract", "vertex", "--image", serving_image.image, "--port", str(port))
    route = f"http://127.0.0.1:{port}/v1/endpoints/local/deployedModels/local"
    try:
        wait_for(route, process)
        answer = httpx.post(route + ":predict", json={"instances": [{"inputs": "Hello"}], "parameters": {"max_new_tokens": 3}}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 1
    finally:
        output = stop(process)
    assert '"event": "model_downloaded"' in output and "gs://cloudllm-test/container" in output


@pytest.mark.parametrize("contract", ["sagemaker"])
def test_serve_container_refuses_an_image_that_is_not_there(contract, tiny_artifact) -> None:
    result = subprocess.run(
        [serve_container.__globals__["CLOUDLLM"], "serve", str(tiny_artifact), "--container", "--contract", contract, "--image", "localhost/no-such-image:1"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: image localhost/no-such-image:1 is not in this machine's image store")
