"""The Hugging Face inference toolkit hooks, loaded the way the toolkit loads them; and the runtime's import hygiene."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from cloudllm_runtime import toolkit
from cloudllm_runtime.protocol import InferenceRequest, RequestError

from .conftest import RUNTIME_DIR

# What the toolkit does with code/inference.py: import it from its path, then call the hooks.
TOOLKIT_SCRIPT = r"""
import importlib.util, json, sys
model_dir = sys.argv[1]
spec = importlib.util.spec_from_file_location("inference", f"{model_dir}/code/inference.py")
inference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inference)
model = inference.model_fn(model_dir)
results = []
for body in json.loads(sys.argv[2]):
    data = inference.input_fn(body.encode("utf-8"), "application/json")
    prediction = inference.predict_fn(data, model)
    results.append(json.loads(inference.output_fn(prediction, "application/json")))
loaded = sorted(m for m in ("starlette", "uvicorn", "prometheus_client", "cloudllm") if m in sys.modules)
print("RESULT=" + json.dumps({"results": results, "loaded": loaded, "runtime": inference.model_fn.__module__,
                              "runtime_file": sys.modules["cloudllm_runtime"].__file__}))
"""


def run_hooks(artifact: Path, bodies: list[dict]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", TOOLKIT_SCRIPT, str(artifact), json.dumps([json.dumps(b) for b in bodies])],
        capture_output=True, text=True, timeout=300, cwd=str(artifact.parent),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT=", 1)[1])


def test_generation_through_the_hooks_in_a_fresh_interpreter(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> None:
    artifact = artifact_factory(tiny_gpt2, task="text-generation", max_new_tokens=16)
    out = run_hooks(
        artifact,
        [
            {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 4}},
            {"inputs": ["Once upon a time", "Paris is"], "parameters": {"max_new_tokens": 4}},
            {"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 4}},
        ],
    )
    single, many, vertex = out["results"]
    assert isinstance(single, list) and len(single) == 1 and isinstance(single[0]["generated_text"], str)
    assert len(many) == 2 and many[0] == single  # pipeline shape: one [{"generated_text"}] per input
    assert vertex == {"predictions": single}
    assert out["loaded"] == []  # no web server, no metrics library, no deploy-time package
    assert out["runtime_file"].startswith(str(artifact / "code"))  # the artifact's own copy of the runtime


@pytest.fixture(scope="module")
def loaded(task_models: dict[str, Path], artifact_factory: Callable[..., Path]) -> Callable[[str], object]:
    """model_fn(artifact) per task, as the toolkit calls it."""
    engines: dict[str, object] = {}

    def get(task: str) -> object:
        if task not in engines:
            engines[task] = toolkit.model_fn(str(artifact_factory(task_models[task], task=task, max_new_tokens=16)))
        return engines[task]

    return get


def hooks(model: object, body: dict | bytes, content_type: str = "application/json", accept: str = "application/json"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return json.loads(toolkit.output_fn(toolkit.predict_fn(toolkit.input_fn(raw, content_type), model), accept))


@pytest.mark.parametrize(
    "task, body, check",
    [
        ("text2text-generation", {"inputs": "Paris is nice", "parameters": {"max_new_tokens": 4}},
         lambda out: isinstance(out[0]["generated_text"], str)),
        ("summarization", {"inputs": ["a b", "c d"], "parameters": {"max_new_tokens": 4}},
         lambda out: [set(o) for o in out] == [{"summary_text"}] * 2),
        ("text-classification", {"inputs": "I love it"},
         lambda out: {o["label"] for o in out} == {"NEGATIVE", "POSITIVE"}),
        ("token-classification", {"inputs": "Paris is in France"},
         lambda out: all("entity_group" in e for e in out)),
        ("question-answering", {"inputs": {"question": "Where?", "context": "In Paris."}},
         lambda out: set(out) == {"answer", "score", "start", "end"}),
        ("feature-extraction", {"inputs": ["embed", "me"]},
         lambda out: [len(v) for v in out] == [32, 32]),
    ],
)  # fmt: skip
def test_every_task_through_the_hooks(loaded, task: str, body: dict, check) -> None:
    model = loaded(task)
    out = hooks(model, body)
    assert check(out), out


def test_hook_errors_are_request_errors(loaded) -> None:
    model = loaded("text-classification")
    with pytest.raises(RequestError) as caught:
        toolkit.input_fn(b"{broken", "application/json")
    assert caught.value.status == 400
    with pytest.raises(RequestError) as caught:
        toolkit.predict_fn(toolkit.input_fn(json.dumps({"inputs": "x", "parameters": {"nope": 1}}), "application/json"), model)
    assert caught.value.status == 422 and "nope" in caught.value.message
    with pytest.raises(RequestError) as caught:
        toolkit.predict_fn(toolkit.input_fn(b'{"inputs": 3}', "application/json"), model)
    assert caught.value.status == 422
    with pytest.raises(RequestError) as caught:
        toolkit.predict_fn(InferenceRequest(inputs=["word " * 500]), model)
    assert caught.value.status == 422
    with pytest.raises(RequestError) as caught:
        toolkit.output_fn([{"label": "A", "score": 1.0}], "text/csv")
    assert caught.value.status == 406
    assert json.loads(toolkit.output_fn({"a": "é"}, "application/json; charset=utf-8")) == {"a": "é"}


def test_streaming_is_refused_through_the_toolkit(loaded) -> None:
    model = loaded("text2text-generation")
    with pytest.raises(RequestError) as caught:
        toolkit.predict_fn(toolkit.input_fn(json.dumps({"inputs": "x", "stream": True}).encode(), "application/json"), model)
    assert caught.value.status == 422 and "stream" in caught.value.message


def test_plain_text_through_the_hooks(loaded) -> None:
    out = hooks(loaded("text-classification"), b"I love it", content_type="text/plain")
    assert len(out) == 2


def test_predict_fn_takes_a_plain_dict_too(loaded) -> None:
    model = loaded("feature-extraction")
    assert len(toolkit.predict_fn({"inputs": "embed"}, model)) == 32


# --- import hygiene ---------------------------------------------------------------------------------


def test_runtime_sources_never_import_cloudllm() -> None:
    for path in sorted(RUNTIME_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] != "cloudllm", f"{path.name} imports {name}"


def test_importing_the_runtime_is_cheap_and_self_contained(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> None:
    artifact = artifact_factory(tiny_gpt2, task="text-generation")
    script = (
        "import json, sys\n"
        "import cloudllm_runtime.toolkit\n"
        "web = sorted(m for m in ('starlette', 'uvicorn', 'prometheus_client') if m in sys.modules)\n"
        "import cloudllm_runtime.app, cloudllm_runtime.server, cloudllm_runtime.batching, cloudllm_runtime.engine\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'cloudllm') if m in sys.modules)\n"
        "print(json.dumps({'web': web, 'heavy': heavy, 'file': cloudllm_runtime.__file__}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=str(artifact / "code"))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["web"] == [] and out["heavy"] == [], out  # the toolkit path needs no web stack; imports stay cheap
    assert out["file"].startswith(str(artifact / "code"))
