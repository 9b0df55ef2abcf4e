"""Artifacts run on transformers 4.x, as in the Hugging Face inference containers.

The HF PyTorch inference DLCs and the inference toolkit ship transformers 4.x, while
cloudllm itself runs with 5.x. `make test` installs transformers 4.48 (the Vertex image's, the
oldest deployed; SageMaker's 4.51.3 passes too: CLOUDLLM_TF4=<folder> runs these against
another 4.x install) into .venv/tf4 (beside
the venv's own, never over it); these tests put it first on PYTHONPATH and load artifacts
exactly as the toolkit does: import code/inference.py, then model_fn -> input_fn ->
predict_fn -> output_fn. They also run code/serve.py under 4.x over real HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cloudllm import api
from cloudllm.testing.tiny_models import build_tiny_bert

# CLOUDLLM_TF4: another 4.x folder (e.g. the 4.48 of the Vertex images) to run these against.
TF4 = Path(os.environ.get("CLOUDLLM_TF4") or Path(sys.prefix) / "tf4")

pytestmark = pytest.mark.skipif(
    not (TF4 / ".installed").exists(), reason="transformers 4.x not installed: run `make install .venv/tf4/.installed` (make test does)"
)

TOOLKIT_SCRIPT = r"""
import importlib.util, json, sys
import transformers
assert transformers.__version__.startswith("4."), transformers.__version__
model_dir, body, content_type = sys.argv[1], sys.argv[2], "application/json"
spec = importlib.util.spec_from_file_location("inference", f"{model_dir}/code/inference.py")
inference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inference)
model = inference.model_fn(model_dir)
data = inference.input_fn(body, content_type)
prediction = inference.predict_fn(data, model)
out = inference.output_fn(prediction, "application/json")
print("RESULT=" + (out.decode() if isinstance(out, bytes) else out))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(TF4)}


def _toolkit(artifact: Path, body: dict):
    done = subprocess.run(
        [sys.executable, "-c", TOOLKIT_SCRIPT, str(artifact), json.dumps(body)],
        capture_output=True, text=True, env=_env(), timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT=", 1)[1])


def test_generation_artifact_through_the_toolkit_hooks(tiny_gpt2: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    api.package(tiny_gpt2, artifact)
    out = _toolkit(artifact, {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5}})
    assert isinstance(out, list) and isinstance(out[0]["generated_text"], str)


def test_classification_artifact_through_the_toolkit_hooks(tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    api.package(build_tiny_bert(tmp_path / "bert"), artifact)
    out = _toolkit(artifact, {"inputs": "The quick brown fox"})
    flat = out[0] if isinstance(out[0], list) else out
    assert {item["label"] for item in flat} <= {"NEGATIVE", "POSITIVE"} and flat


def test_server_runs_on_transformers_4(tiny_gpt2: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    api.package(tiny_gpt2, artifact)
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, str(artifact / "code" / "serve.py"), "serve", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        url = None
        while time.monotonic() < deadline:
            assert server.poll() is None, "server exited"
            if url is None and port_file.exists() and port_file.read_text().strip():
                url = f"http://127.0.0.1:{int(port_file.read_text())}"
            if url:
                try:
                    if httpx.get(url + "/ping").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        response = httpx.post(url + "/invocations", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}}, timeout=60)
        assert response.status_code == 200, response.text
        assert isinstance(response.json()[0]["generated_text"], str)
    finally:
        server.terminate()
        server.wait(30)
