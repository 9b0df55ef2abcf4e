"""LoRA adapters of the vllm runtime on Vertex AI, against the emulator.

The Model Garden vLLM server runs with --enable-lora and takes an adapter per request as the
instance's "dynamic-lora" (a gs:// folder it downloads). What was created is read back with the
real aiplatform client. No GPU here: the emulator stands in for vLLM with the artifact's own
server, which downloads the gs:// folder and loads it with peft, and refuses dynamic-lora without
--enable-lora or above --max-lora-rank as vLLM does. GPT-2 (no SupportsLoRA in vLLM) and TGI
(whose Vertex route cannot pick an adapter) are refused at plan time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudllm import api
from cloudllm.errors import EXIT_BAD_INPUT, UserError
from cloudllm.providers.base import get_provider
from cloudllm.providers.vertex.models import LORA_URIS_ENV
from cloudllm.testing.tiny_adapters import build_tiny_lora
from tests.conftest import assert_one_line_error, run_cli

v1 = pytest.importorskip("google.cloud.aiplatform_v1")
GREEDY = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def models(vertex_emulator):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    return v1.ModelServiceClient(transport="rest", credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=vertex_emulator.url))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"CLOUDLLM_HOME": str(tmp_path_factory.mktemp("home"))}


@pytest.fixture(scope="module")
def loras(llama_loras: dict[str, Path]) -> dict[str, Path]:
    return {name: llama_loras[name] for name in ("support", "legal")}  # tests/conftest.py


def _deploy(model: Path, emulator, name: str, **kwargs):
    kwargs = {"runtime": "vllm", "instance": "g2-standard-8", "bucket": emulator.bucket, **kwargs}
    return api.deploy(model, provider="vertex", name=name, **kwargs)


def _answer(name: str, adapter: str | None = None, **kwargs) -> str:
    return api.invoke(name, "hello there", parameters=GREEDY, provider="vertex", adapter=adapter, **kwargs)


@pytest.fixture(scope="module")
def served(vertex_emulator, tiny_llama: Path, loras) -> str:
    result = _deploy(tiny_llama, vertex_emulator, "vllm-loras", adapters={k: str(v) for k, v in loras.items()})
    assert result.endpoint.state == "InService"
    return "vllm-loras"


def test_vllm_runs_with_lora_enabled_and_the_adapters_folders_named(served: str, vertex_emulator, models, tiny_llama: Path) -> None:
    endpoint = get_provider("vertex").get(served)
    model = models.get_model(name=f"{endpoint.details['model']}@{endpoint.details['model_version_id']}")
    args = list(model.container_spec.args)
    assert "--enable-lora" in args and "--max-loras=2" in args and "--max-cpu-loras=2" in args
    assert "--max-lora-rank=8" in args  # the tiny adapters have rank 4: vLLM's next allowed rank
    env = {e.name: e.value for e in model.container_spec.env}
    uris = json.loads(env[LORA_URIS_ENV])
    assert set(uris) == {"support", "legal"}
    objects = vertex_emulator.objects("cloudllm-test", f"models/{served}/adapters/")
    for name, uri in uris.items():
        prefix = uri.removeprefix("gs://cloudllm-test/")
        assert uri.startswith(f"gs://cloudllm-test/models/{served}/adapters/") and uri.endswith("/"), uri
        assert {f"{prefix}adapter_config.json", f"{prefix}adapter_model.safetensors"} <= set(objects), name
    assert {a["name"] for a in api.list_adapters(served, provider="vertex")} == {"support", "legal"}


def test_each_adapter_answers_through_dynamic_lora(served: str, vertex_emulator) -> None:
    texts = {a: _answer(served, a) for a in (None, "support", "legal")}
    assert len(set(texts.values())) == 3, texts
    assert _answer(served, "legal") == texts["legal"]
    streamed = "".join(api.invoke_stream(served, "hello there", parameters=GREEDY, provider="vertex", adapter="support"))
    assert streamed == texts["support"]
    # the server was sent each adapter's gs:// folder, the one the model version names
    endpoint = get_provider("vertex").get(served)
    replica = vertex_emulator.state.replicas[endpoint.details["deployed_model_id"]]
    assert set(replica.loras) == set(endpoint.details["lora_adapters"].values())


def test_an_unknown_adapter_is_one_line_and_never_sent(served: str, home: dict) -> None:
    with pytest.raises(UserError) as unknown:
        _answer(served, "missing")
    assert "has no adapter named missing" in unknown.value.line() and "legal, support" in unknown.value.line()
    by_cli = run_cli("invoke", served, "hello", "--provider", "vertex", "--adapter", "missing", env=home)
    assert_one_line_error(by_cli, code=EXIT_BAD_INPUT, contains="has no adapter named missing")


def test_adapters_change_by_redeploy(served: str, vertex_emulator, tiny_llama: Path, loras) -> None:
    with pytest.raises(UserError, match=f"deploy {served} again with the --adapter set"):
        api.add_adapter(served, "extra", loras["legal"], provider="vertex")
    changed = _deploy(tiny_llama, vertex_emulator, served, adapters={"legal": str(loras["legal"])})
    assert changed.action == "update"
    assert {a["name"] for a in api.list_adapters(served, provider="vertex")} == {"legal"}
    assert _answer(served, "legal") != _answer(served)
    with pytest.raises(UserError, match="has no adapter named support"):
        _answer(served, "support")
    api.delete(served, provider="vertex")


def test_the_stand_in_refuses_dynamic_lora_without_enable_lora(vertex_emulator, tiny_llama: Path, loras) -> None:
    """The emulator's side of the edge: a vLLM started without --enable-lora fails a dynamic-lora request (500)."""
    import httpx

    plain = _deploy(tiny_llama, vertex_emulator, "vllm-plain")
    uri = "gs://cloudllm-test/models/vllm-plain/adapters/none/"
    url = f"{vertex_emulator.url}/v1/{plain.endpoint.details['endpoint']}:rawPredict"
    answer = httpx.post(url, json={"instances": [{"prompt": "hello", "max_tokens": 2, "dynamic-lora": uri}]}, timeout=120)
    assert answer.status_code >= 500, answer.text
    api.delete("vllm-plain", provider="vertex")


@pytest.fixture(scope="module")
def gpt2_lora(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora(tiny_gpt2, tmp_path_factory.mktemp("gpt2-lora") / "lora")


@pytest.mark.parametrize(
    ("runtime", "contains"),
    [("vllm", "the vllm runtime serves LoRA adapters only on Llama-shaped models"), ("tgi", "TGI's Vertex AI route reads only")],
)
def test_what_the_engines_cannot_serve_is_refused_at_plan_time(vertex_emulator, tiny_gpt2: Path, gpt2_lora: Path, runtime: str, contains: str) -> None:
    with pytest.raises(UserError) as refused:
        api.plan(tiny_gpt2, provider="vertex", name="bad-lora", runtime=runtime, instance="g2-standard-8",
                 bucket=vertex_emulator.bucket, adapters={"legal": str(gpt2_lora)})  # fmt: skip
    assert contains in refused.value.line() and "\n" not in refused.value.line()
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "bad-lora"]
    assert vertex_emulator.objects("cloudllm-test", "models/bad-lora/") == []
