"""LoRA adapters on the model server: chosen per request (native, Vertex, OpenAI), changed live, batched together.

Real peft adapters on a real tiny GPT-2, served by the real app under uvicorn on loopback and
driven with httpx and the openai client.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

pytest.importorskip("peft")

from cloudllm.testing.tiny_adapters import build_tiny_lora  # noqa: E402
from cloudllm_runtime.app import create_app  # noqa: E402
from cloudllm_runtime.batching import Batcher  # noqa: E402
from cloudllm_runtime.settings import ServingSettings  # noqa: E402

from .conftest import serve_in_thread  # noqa: E402

PROMPT = "Once upon a time"
GREEDY = {"max_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_gpt2: Path, tiny_llama: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served-adapters")
    dirs = {name: build_tiny_lora(tiny_gpt2, root / name, seed=seed) for name, seed in (("support", 1), ("legal", 2))}
    dirs["llama"] = build_tiny_lora(tiny_llama, root / "llama", seed=3)
    pickled = root / "pickled"
    shutil.copytree(dirs["support"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    dirs["pickled"] = pickled
    return dirs


@pytest.fixture(scope="module")
def url(tiny_gpt2: Path, adapter_dirs: dict[str, Path]) -> Iterator[str]:
    settings = ServingSettings(
        task="text-generation", max_input_tokens=64, max_total_tokens=128, max_batch_size=8, max_batch_wait_ms=20,
        adapters={"support": str(adapter_dirs["support"]), "legal": str(adapter_dirs["legal"])},
    )  # fmt: skip
    with serve_in_thread(create_app(str(tiny_gpt2), settings)) as base_url:
        yield base_url


def _generate(url: str, adapter: str | None = None, route: str = "/invocations") -> httpx.Response:
    parameters = {**GREEDY, **({"adapter_id": adapter} if adapter else {})}
    return httpx.post(f"{url}{route}", json={"inputs": PROMPT, "parameters": parameters}, timeout=60)


def _text(url: str, adapter: str | None = None) -> str:
    response = _generate(url, adapter)
    assert response.status_code == 200, response.text
    return response.json()[0]["generated_text"]


def test_each_adapter_answers_differently_from_the_base_and_each_other(url):
    answers = {name: _text(url, name) for name in (None, "support", "legal")}
    assert len(set(answers.values())) == 3, answers
    assert _text(url, None) == answers[None]  # the base stays itself beside its adapters
    vertex = httpx.post(f"{url}/predict", json={"instances": [PROMPT], "parameters": {**GREEDY, "adapter_id": "legal"}}, timeout=60)
    assert vertex.status_code == 200 and vertex.json()["predictions"][0]["generated_text"] == answers["legal"]


def test_unknown_adapter_is_a_404_naming_those_it_has(url):
    response = _generate(url, "nope")
    assert response.status_code == 404
    assert "unknown adapter \"nope\"; this server has: legal, support" in response.json()["error"]
    assert _generate(url, "bad name!").status_code == 422


def test_openai_model_selects_the_adapter(url, tiny_gpt2):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    ids = [m.id for m in client.models.list().data]
    assert ids == [tiny_gpt2.name, "legal", "support"]
    for model, adapter in ((tiny_gpt2.name, None), ("support", "support"), ("legal", "legal")):
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        assert answer.model == model
        assert answer.choices[0].text == _text(url, adapter)
    with pytest.raises(openai.NotFoundError, match="this server has: .*legal, support"):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)


def test_a_streamed_answer_uses_the_adapter(url):
    with httpx.stream("POST", f"{url}/invocations", json={"inputs": PROMPT, "parameters": {**GREEDY, "adapter_id": "support"}, "stream": True},
                      timeout=60) as response:  # fmt: skip
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert '"generated_text":' in events[-1]
    import json

    assert json.loads(events[-1][5:])["generated_text"] == _text(url, "support")


def test_adapters_are_added_and_removed_while_serving(url, adapter_dirs):
    support = _text(url, "support")
    added = httpx.post(f"{url}/adapters", json={"name": "copy", "path": str(adapter_dirs["support"])}, timeout=60)
    assert added.status_code == 200, added.text
    assert [a["name"] for a in added.json()["adapters"]] == ["copy", "legal", "support"]
    assert _text(url, "copy") == support
    listed = httpx.get(f"{url}/adapters").json()["adapters"]
    assert {a["name"]: a["rank"] for a in listed} == {"copy": 4, "legal": 4, "support": 4}
    assert httpx.delete(f"{url}/adapters/copy").status_code == 200
    assert _generate(url, "copy").status_code == 404
    assert httpx.delete(f"{url}/adapters/copy").status_code == 404
    assert _text(url, "support") == support  # the others kept serving


@pytest.mark.parametrize(
    "body, message",
    [
        ({"name": "other", "path": "LLAMA"}, "cannot load adapter 'other'"),
        ({"name": "other", "path": "PICKLED"}, "only safetensors"),
        ({"name": "bad name", "path": "LLAMA"}, "adapter name \"bad name\" is not valid"),
        ({"name": "other"}, '{"name": ADAPTER, "path": FOLDER ON THE SERVER}'),
    ],
)
def test_bad_adapters_are_refused_and_the_server_keeps_its_own(url, adapter_dirs, body, message):
    before = _text(url, "legal")
    body = {k: str(adapter_dirs["llama"]) if v == "LLAMA" else str(adapter_dirs["pickled"]) if v == "PICKLED" else v for k, v in body.items()}
    response = httpx.post(f"{url}/adapters", json=body, timeout=60)
    assert response.status_code == 422 and message in response.json()["error"], response.text
    assert [a["name"] for a in httpx.get(f"{url}/adapters").json()["adapters"]] == ["legal", "support"]
    assert _generate(url, "other").status_code == 404
    assert _text(url, "legal") == before


def test_requests_for_different_adapters_share_one_call():
    """The batcher leaves the row parameter out of the batch key and hands run_batch one value per input."""
    calls: list[tuple[list[str], dict]] = []

    def run_batch(inputs, parameters, cancels):
        calls.append((list(inputs), dict(parameters)))
        return [f"{text}/{name}" for text, name in zip(inputs, parameters.get("adapter_id") or [None] * len(inputs))]

    async def main() -> list:
        batcher = Batcher(run_batch, max_batch_size=3, max_wait_ms=10_000, row_parameter="adapter_id")
        try:
            return await asyncio.gather(
                batcher.submit(["a"], {"max_new_tokens": 4, "adapter_id": "support"}),
                batcher.submit(["b"], {"max_new_tokens": 4}),
                batcher.submit(["c"], {"max_new_tokens": 4, "adapter_id": "legal"}),
            )
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results == [["a/support"], ["b/None"], ["c/legal"]]
    assert calls == [(["a", "b", "c"], {"max_new_tokens": 4, "adapter_id": ["support", None, "legal"]})]


def test_a_mixed_batch_on_the_server_answers_each_as_alone(url):
    alone = {name: _text(url, name) for name in (None, "support", "legal")}
    results: dict[int, str] = {}

    def ask(index: int, adapter: str | None) -> None:
        results[index] = _text(url, adapter)

    order = [None, "support", "legal"] * 3
    threads = [threading.Thread(target=ask, args=(i, name)) for i, name in enumerate(order)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(order))] == [alone[name] for name in order]
