"""OpenAI's wire format on the model server, driven by the real `openai` client.

A tiny GPT-2 with a chat template (written into tokenizer_config.json as transformers saves it)
serves in a real subprocess as a container runs it; the same model without a template serves
in-process to show the refusal and that --chat-template FILE supplies one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import httpx
import openai
import pytest

from cloudllm_runtime.app import create_app
from cloudllm_runtime.openai_api import load_chat_template
from cloudllm_runtime.settings import ServingSettings

from .conftest import ServerProcess, serve_in_thread

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SETTINGS = dict(task="text-generation", max_new_tokens=32, default_max_new_tokens=8, max_input_tokens=64, max_total_tokens=128)
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"}]


def add_chat_template(model_dir: Path, dest: Path, template: str = TEMPLATE) -> Path:
    """A copy of model_dir whose tokenizer_config.json carries a chat template."""
    shutil.copytree(model_dir, dest)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def chat_model(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_chat_template(tiny_gpt2, tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def server(chat_model: Path, artifact_factory: Callable[..., Path]) -> Iterator[ServerProcess]:
    process = ServerProcess(artifact_factory(chat_model, **SETTINGS))
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_answers_in_openai_shape(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 6 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_greedy_is_the_native_route_on_the_rendered_prompt(client: openai.OpenAI, server: ServerProcess, chat_model: Path) -> None:
    answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>Be brief.\n<|user|>Once upon a time\n<|assistant|>"
    native = httpx.post(server.url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 6}}, timeout=60).json()
    assert answer.choices[0].message.content == native["generated_text"]


def test_chat_stream_adds_up_to_the_whole_answer_and_ends_with_done(client: openai.OpenAI, server: ServerProcess) -> None:
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    raw = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3, "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
    ))  # fmt: skip
    assert streamed == answer.choices[0].text
    two = client.completions.create(model="tiny", prompt=["Once upon a time", "The quick brown"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0).choices[0].text  # fmt: skip
    echoed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Once upon a time")


def test_stop_sequences_cut_the_text_streamed_or_not(client: openai.OpenAI) -> None:
    free = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0).choices[0].text
    stop = free[3:6] if len(free) >= 6 else free[-1:]
    cut = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=12, temperature=0, stop=[stop], stream=True
    ))  # fmt: skip
    assert streamed == cut.choices[0].text


def test_seed_n_and_sampling(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, seed=7, n=3)
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, seed=7, n=3)
    assert len(first.choices) == 3 and [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens >= 3  # counted over all choices


def test_models_lists_the_served_model(client: openai.OpenAI, server: ServerProcess) -> None:
    models = client.models.list().data
    assert len(models) == 1 and models[0].object == "model" and models[0].id


def test_the_same_chat_through_invocations_and_vertex_predict(server: ServerProcess) -> None:
    request = {"messages": HELLO, "max_tokens": 6, "temperature": 0}
    direct = httpx.post(server.url + "/v1/chat/completions", json=request, timeout=60).json()
    sagemaker = httpx.post(server.url + "/invocations", json=request, timeout=60).json()
    vertex = httpx.post(server.url + "/predict", json={"instances": [{"@requestFormat": "chatCompletions", **request}]}, timeout=60).json()
    text = direct["choices"][0]["message"]["content"]
    assert sagemaker["choices"][0]["message"]["content"] == text
    assert vertex["predictions"][0]["choices"][0]["message"]["content"] == text
    streamed = httpx.post(server.url + "/invocations", json={**request, "stream": True}, timeout=60)
    assert streamed.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"model": "m"}, "\"messages\" is required"),
        ({"messages": []}, "empty list"),
        ({"messages": "hi"}, "must be a list"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role must be one of"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "tool calls are not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text parts only"),
        ({"messages": [{"role": "user", "content": "x " * 500}]}, "input tokens"),
        ({"messages": HELLO, "max_tokens": 10_000}, "max_tokens"),
        ({"messages": HELLO, "temperature": 5}, "temperature"),
        ({"messages": HELLO, "logprobs": True}, "logprobs"),
        ({"messages": HELLO, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"messages": HELLO, "n": 2, "stream": True}, "n = 1"),
        ({"messages": HELLO, "wat": 1}, "unknown field \"wat\""),
        ({"messages": HELLO, "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_chat_bodies_are_400_in_openai_error_shape(server: ServerProcess, body: dict, fragment: str) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_unparseable_bodies_are_400(server: ServerProcess, raw: bytes) -> None:
    for route in ("/v1/chat/completions", "/v1/completions"):
        response = httpx.post(server.url + route, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == 400 and "message" in response.json()["error"]


def test_openai_client_raises_its_own_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 500}])
    assert caught.value.code == "context_length_exceeded" and "input tokens" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="")


def test_a_model_without_a_template_is_refused_for_chat_but_completes(tiny_gpt2: Path) -> None:
    assert load_chat_template(str(tiny_gpt2), ServingSettings(**SETTINGS)) is None
    with serve_in_thread(create_app(str(tiny_gpt2), ServingSettings(**SETTINGS))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=HELLO)
        assert "no chat template" in caught.value.message and "--chat-template" in caught.value.message
        assert client.completions.create(model="tiny", prompt="Once upon", max_tokens=3).choices[0].text is not None


def test_chat_template_file_given_to_the_server(tiny_gpt2: Path, artifact_factory: Callable[..., Path], tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    process = ServerProcess(
        artifact_factory(tiny_gpt2, **SETTINGS),
        args=["serve", "--host", "127.0.0.1", "--port", "0", "--chat-template", str(template)],
    )
    try:
        process.wait_ready()
        answer = httpx.post(process.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        process.stop()
    missing = ServerProcess(
        artifact_factory(tiny_gpt2, **SETTINGS),
        args=["serve", "--host", "127.0.0.1", "--port", "0", "--chat-template", str(tmp_path / "nope.jinja")],
    )
    assert missing.process.wait(120) == 2
    assert "cannot read --chat-template" in missing.log()
    missing.stop()


def test_templates_in_every_place_transformers_saves_them(tiny_gpt2: Path, tmp_path: Path) -> None:
    settings = ServingSettings(**SETTINGS)
    jinja = shutil.copytree(tiny_gpt2, tmp_path / "jinja")
    (jinja / "chat_template.jinja").write_text(TEMPLATE)
    named = add_chat_template(tiny_gpt2, tmp_path / "named", template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": TEMPLATE}])  # type: ignore[arg-type]
    assert load_chat_template(str(jinja), settings) == TEMPLATE
    assert load_chat_template(str(named), settings) == TEMPLATE
    assert load_chat_template(str(named), ServingSettings(**SETTINGS, chat_template="X")) == "X"


TF4 = Path(os.environ.get("CLOUDLLM_TF4") or Path(sys.prefix) / "tf4")


@pytest.mark.skipif(not (TF4 / ".installed").exists(), reason="transformers 4.x not installed (make test installs it)")
def test_chat_on_transformers_4_renders_as_on_5(chat_model: Path, client: openai.OpenAI, tmp_path: Path) -> None:
    """The HF containers run transformers 4.48: the packaged artifact renders the same template there."""
    from cloudllm import api

    artifact = tmp_path / "artifact"
    api.package(chat_model, artifact)
    process = ServerProcess(artifact, env={"PYTHONPATH": str(TF4)})
    try:
        process.wait_ready()
        old = openai.OpenAI(base_url=process.url + "/v1", api_key="unused", max_retries=0)
        answer = old.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
        assert "Traceback" not in process.log()
        assert answer.choices[0].message.content == client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=6, temperature=0).choices[0].message.content  # fmt: skip
    finally:
        process.stop()


def test_chat_through_the_hf_toolkit_hooks(chat_model: Path, artifact_factory: Callable[..., Path], client: openai.OpenAI) -> None:
    """SageMaker's CPU handler endpoints run the HF inference toolkit: a messages body answers there too."""
    from cloudllm_runtime import toolkit

    model = toolkit.model_fn(str(artifact_factory(chat_model, **SETTINGS)))
    request = {"messages": HELLO, "max_tokens": 6, "temperature": 0}

    def hooks(body: dict) -> dict:
        return json.loads(toolkit.output_fn(toolkit.predict_fn(toolkit.input_fn(json.dumps(body), "application/json"), model)))

    expected = client.chat.completions.create(model="tiny", **request).choices[0].message.content
    assert hooks(request)["choices"][0]["message"]["content"] == expected
    vertex = hooks({"instances": [{"@requestFormat": "chatCompletions", **request}]})
    assert vertex["predictions"][0]["choices"][0]["message"]["content"] == expected
    from cloudllm_runtime.protocol import RequestError

    with pytest.raises(RequestError, match="toolkit"):
        hooks({**request, "stream": True})
