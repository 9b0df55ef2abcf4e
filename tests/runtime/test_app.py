"""The model server over real HTTP: SageMaker's and Vertex AI's container contracts, TGI's routes and streams.

The gpt2 servers are real subprocesses started as the containers start them
(`python code/serve.py serve`, or with the AIP_* variables Vertex sets); the other tasks
and the failure modes run the same app under uvicorn in this process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from cloudllm_runtime.app import create_app
from cloudllm_runtime.engine import GenerationEngine, load_engine
from cloudllm_runtime.settings import ServingSettings

from .conftest import ServerProcess, free_port, serve_in_thread, sse_events, wait_healthy

GEN_SETTINGS = dict(
    task="text-generation",
    max_new_tokens=32,
    default_max_new_tokens=8,
    max_input_tokens=64,
    max_total_tokens=128,
    max_body_bytes=64 * 1024,
)
VERTEX_PREDICT = "/v1/endpoints/123/deployedModels/7788:predict"
VERTEX_HEALTH = "/v1/endpoints/123/deployedModels/7788"
SECRET = "zebra-quokka-secret-prompt"


@pytest.fixture(scope="module")
def servers(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> Iterator[dict[str, ServerProcess]]:
    """A SageMaker-style and a Vertex-style server on the same tiny GPT-2, started side by side."""
    vertex_port = free_port()
    started = {
        "sagemaker": ServerProcess(artifact_factory(tiny_gpt2, **GEN_SETTINGS)),
        "vertex": ServerProcess(
            artifact_factory(tiny_gpt2, **GEN_SETTINGS),
            args=[],  # Vertex runs the image's command with no arguments
            env={
                "AIP_HTTP_PORT": str(vertex_port),
                "AIP_PREDICT_ROUTE": VERTEX_PREDICT,
                "AIP_HEALTH_ROUTE": VERTEX_HEALTH,
                "AIP_DEPLOYED_MODEL_ID": "7788",
            },
            port=vertex_port,
        ),
    }
    try:
        started["sagemaker"].wait_ready()
        started["vertex"].wait_ready(health_path=VERTEX_HEALTH)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def sm(servers: dict[str, ServerProcess]) -> str:
    return servers["sagemaker"].url


@pytest.fixture(scope="module")
def gpt2_engine(tiny_gpt2: Path) -> GenerationEngine:
    return load_engine(str(tiny_gpt2), ServingSettings(**GEN_SETTINGS))


def post(url: str, body: Any = None, *, raw: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(url, content=raw, headers={"content-type": "application/json", **(headers or {})}, timeout=120)
    return httpx.post(url, json=body, headers=headers, timeout=120)


def assert_error(response: httpx.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str)
    assert fragment.lower() in body["error"].lower(), body
    return body


# --- SageMaker contract (subprocess) -------------------------------------------------------------


def test_ping_and_health(sm: str) -> None:
    for path in ("/ping", "/health"):
        response = httpx.get(sm + path)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
    info = httpx.get(sm + "/info").json()
    assert info["task"] == "text-generation" and info["max_new_tokens"] == 32 and info["streaming"] is True


def test_invocations_single_string_answers_a_one_element_list(sm: str) -> None:
    response = post(sm + "/invocations", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list) and len(body) == 1 and isinstance(body[0]["generated_text"], str)
    assert response.headers["x-request-id"]


def test_invocations_list_answers_one_per_input(sm: str) -> None:
    prompts = ["Once upon a time", "The quick brown fox"]
    body = post(sm + "/invocations", {"inputs": prompts, "parameters": {"max_new_tokens": 5}}).json()
    singles = [post(sm + "/invocations", {"inputs": p, "parameters": {"max_new_tokens": 5}}).json()[0] for p in prompts]
    assert body == singles


def test_details_and_return_full_text(sm: str) -> None:
    body = post(sm + "/invocations", {"inputs": "Paris is", "parameters": {"max_new_tokens": 4, "details": True, "return_full_text": True}}).json()
    assert body[0]["generated_text"].startswith("Paris is")
    assert body[0]["details"]["finish_reason"] in ("length", "eos_token")
    assert 1 <= body[0]["details"]["generated_tokens"] <= 4


def test_generate_answers_an_object(sm: str) -> None:
    body = post(sm + "/generate", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5}}).json()
    assert isinstance(body, dict) and isinstance(body["generated_text"], str)
    assert body == post(sm + "/invocations", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5}}).json()[0]


def test_vertex_body_on_invocations(sm: str) -> None:
    body = post(sm + "/invocations", {"instances": ["Once upon a time", {"prompt": "Hi"}], "parameters": {"max_new_tokens": 3}}).json()
    assert set(body) == {"predictions"} and len(body["predictions"]) == 2
    assert all(isinstance(p["generated_text"], str) for p in body["predictions"])


@pytest.mark.parametrize("route, extra", [("/invocations", {"stream": True}), ("/generate_stream", {})])
def test_stream_sends_tgi_events(sm: str, route: str, extra: dict) -> None:
    params = {"max_new_tokens": 12}
    expected = post(sm + "/invocations", {"inputs": "The quick brown fox", "parameters": params}).json()[0]["generated_text"]
    with httpx.stream("POST", sm + route, json={"inputs": "The quick brown fox", "parameters": params, **extra}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode("utf-8")
    assert all(block.startswith("data:{") for block in text.split("\n\n") if block)
    events = sse_events(text)
    assert len(events) > 1
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    for event in events:
        assert set(event) == {"index", "token", "generated_text", "details"}
        assert set(event["token"]) == {"id", "text", "logprob", "special"}
        assert isinstance(event["token"]["id"], int) and event["token"]["logprob"] is None
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == expected
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == expected


def test_stream_details_in_the_last_event(sm: str) -> None:
    response = post(sm + "/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}})
    events = sse_events(response.text)
    assert events[-1]["details"]["generated_tokens"] == len(events)
    assert all(e["details"] is None for e in events[:-1])


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"raw": b'{"inputs": "a",'}, 400, "not valid json"),
        ({"raw": b"\xff\xfe\x00"}, 400, "utf-8"),
        ({"body": {"parameters": {}}}, 422, "inputs"),
        ({"body": {"inputs": 12}}, 422, "string"),
        ({"body": {"inputs": "a", "parameters": {"max_new_tokens": "5"}}}, 422, "integer"),
        ({"body": {"inputs": "a", "parameters": {"temperature": 0}}}, 422, "temperature"),
        ({"body": {"inputs": "a", "parameters": {"max_new_tokens": 33}}}, 422, "at most 32"),
        ({"body": {"inputs": "a", "parameters": {"frobnicate": True}}}, 422, "frobnicate"),
        ({"body": {"inputs": ""}}, 422, "empty"),
        ({"body": {"inputs": ["a", "b"], "stream": True}}, 422, "one input"),
        ({"body": {"inputs": "word " * 400}}, 422, "at most 64"),
        ({"raw": json.dumps({"inputs": "x" * 70_000}).encode()}, 413, "limit"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_stays_up(sm: str, kwargs: dict, status: int, fragment: str) -> None:
    assert_error(post(sm + "/invocations", **kwargs), status, fragment)
    assert httpx.get(sm + "/ping").status_code == 200


def test_chunked_body_over_the_limit_is_413(sm: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(sm + "/invocations", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert_error(response, 413)
    assert httpx.get(sm + "/ping").status_code == 200


def test_unknown_route_and_wrong_method_are_json(sm: str) -> None:
    assert_error(httpx.get(sm + "/nope"), 404, "/nope")
    assert_error(httpx.get(sm + "/invocations"), 405)


@pytest.mark.parametrize(
    "raw",
    [
        '{"inputs": "emoji 😀👍🏽"}'.encode(),
        '{"inputs": "مرحبا بالعالم שלום"}'.encode(),
        b'{"inputs": "nul \\u0000 char"}',
        b'{"inputs": "lone \\ud800 surrogate"}',
        b'{"inputs": "\\udfff"}',
        b'{"inputs": "ok", "parameters": {"stop": ["\\ud83d"]}}',
    ],
)
def test_unicode_edge_cases_are_served(sm: str, raw: bytes) -> None:
    response = post(sm + "/invocations", raw=raw)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()[0]["generated_text"], str)


def test_plain_text_body(sm: str) -> None:
    response = httpx.post(sm + "/invocations", content="Once upon a time", headers={"content-type": "text/plain"}, timeout=60)
    assert response.status_code == 200 and len(response.json()) == 1


def test_metrics(sm: str) -> None:
    post(sm + "/invocations", {"inputs": "count me", "parameters": {"max_new_tokens": 2}})
    assert_error(post(sm + "/invocations", {"inputs": ""}), 422)
    response = httpx.get(sm + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(r'cloudllm_requests_total\{route="/invocations",status="200"\} [1-9]', text)
    assert re.search(r'cloudllm_requests_total\{route="/invocations",status="422"\} [1-9]', text)
    assert re.search(r'cloudllm_request_latency_seconds_bucket\{le="[^"]+",route="/invocations"\}', text)
    assert float(re.search(r"^cloudllm_generated_tokens_total (\S+)$", text, re.M).group(1)) >= 2
    assert re.search(r"^cloudllm_batch_size_count [1-9]", text, re.M)
    assert re.search(r"^cloudllm_queue_depth 0", text, re.M)


def test_one_json_log_line_per_request_without_prompts(servers: dict[str, ServerProcess]) -> None:
    server = servers["sagemaker"]
    response = post(server.url + "/invocations", {"inputs": SECRET, "parameters": {"max_new_tokens": 2}}, headers={"x-request-id": "req-abc-123"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-abc-123"
    mine = server.wait_for_records(lambda r: r.get("event") == "request" and r.get("request_id") == "req-abc-123")
    assert len(mine) == 1
    records = [r for r in server.log_records() if r.get("event") == "request"]
    line = mine[0]
    assert line["route"] == "/invocations" and line["status"] == 200 and line["latency_ms"] >= 0 and line["tokens"] >= 1
    assert SECRET not in server.log()
    assert not [r for r in records if r.get("route") == "/ping"]  # health checks stay quiet
    assert all(line.startswith("{") for line in server.log().splitlines() if line.strip())  # JSON lines only
    assert "Traceback" not in server.log()


def test_odd_field_names_are_a_422_and_the_log_stays_json(servers: dict[str, ServerProcess]) -> None:
    """`cloudllm logs --json` parses every line: a lone surrogate or control character a client sent cannot break one."""
    server = servers["sagemaker"]
    for raw in (b'{"inputs": "hi", "\\ud800": 1}', b'{"inputs": "hi", "parameters": {"\\udc80\\n\\u0000": 1}}'):
        assert_error(post(server.url + "/invocations", raw=raw, headers={"x-request-id": "odd-name"}), 422, "unknown")
    server.wait_for_records(lambda r: r.get("request_id") == "odd-name", count=2)
    lines = server.log_path.read_bytes().decode("utf-8").splitlines()  # strict UTF-8
    assert [json.loads(line) for line in lines if line.strip()]  # every line is JSON


def test_log_payloads_flag_puts_the_prompt_in_the_request_line(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> None:
    """Off by default (the test above); `serve --log-payloads` (or serving.log_payloads) turns it on."""
    server = ServerProcess(artifact_factory(tiny_gpt2, **GEN_SETTINGS), args=["serve", "--host", "127.0.0.1", "--port", "0", "--log-payloads"])
    try:
        server.wait_ready()
        body = {"inputs": SECRET, "parameters": {"max_new_tokens": 2}}
        assert post(server.url + "/invocations", body, headers={"x-request-id": "with-payload"}).status_code == 200
        mine = server.wait_for_records(lambda r: r.get("request_id") == "with-payload")
        assert len(mine) == 1 and mine[0]["payload"]["inputs"] == [SECRET]
    finally:
        assert server.stop() == 0


# --- Vertex AI contract (subprocess) -----------------------------------------------------------------


def test_vertex_routes_and_port(servers: dict[str, ServerProcess]) -> None:
    server = servers["vertex"]
    assert server.url.endswith(f":{server.port}")
    assert int(server.port_file.read_text()) == server.port  # AIP_HTTP_PORT was honoured
    assert httpx.get(server.url + VERTEX_HEALTH).json() == {"status": "ok"}
    assert httpx.get(server.url + "/ping").status_code == 200
    body = post(
        server.url + VERTEX_PREDICT,
        {"instances": ["Once upon a time", {"inputs": "Paris is"}], "parameters": {"max_new_tokens": 4}},
    ).json()
    assert body["deployedModelId"] == "7788"
    assert [set(p) for p in body["predictions"]] == [{"generated_text"}, {"generated_text"}]
    same = post(server.url + "/invocations", {"inputs": ["Once upon a time", "Paris is"], "parameters": {"max_new_tokens": 4}}).json()
    assert body["predictions"] == same
    assert_error(post(server.url + VERTEX_PREDICT, {"instances": [{"question": "q"}]}), 422)


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(servers: dict[str, ServerProcess]) -> None:
    server = servers["vertex"]
    with httpx.stream("POST", server.url + "/generate_stream", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 32}}, timeout=120) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        server.process.terminate()  # SIGTERM, as SageMaker and Vertex stop a container
        rest = [line for line in lines if line.startswith("data:")]
    events = [json.loads(line[5:]) for line in [first, *rest]]
    assert events[-1]["generated_text"] is not None
    assert server.process.wait(60) == 0
    assert any(r.get("event") == "stopped" for r in server.log_records())
    assert "Traceback" not in server.log()


# --- startup failures (subprocess, no model load) ------------------------------------------------------


def run_entrypoint(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "cloudllm_runtime", *args],
        cwd=str(cwd), capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


def assert_one_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]


def test_port_in_use_is_one_line_and_exit_2(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> None:
    artifact = artifact_factory(tiny_gpt2, task="text-generation")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # From code/ so `-m cloudllm_runtime` is the artifact's own copy.
        result = run_entrypoint(["serve", "--host", "127.0.0.1", "--port", str(port)], cwd=artifact / "code")
    assert_one_line(result, f"port {port} is in use; choose another with --port")


def test_missing_settings_is_one_line(tiny_gpt2: Path, tmp_path: Path) -> None:
    result = run_entrypoint(["--model-dir", str(tiny_gpt2), "--port", "0"], cwd=tmp_path)
    assert_one_line(result, "settings.json")


def test_port_comes_from_the_platform_variables() -> None:
    from cloudllm_runtime.server import resolve_port

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AIP_HTTP_PORT", raising=False)
        patch.setenv("SAGEMAKER_BIND_TO_PORT", "9123")
        assert resolve_port(None) == 9123
        patch.setenv("AIP_HTTP_PORT", "9200")
        assert resolve_port(None) == 9200
        assert resolve_port(0) == 0
        patch.delenv("AIP_HTTP_PORT")
        patch.delenv("SAGEMAKER_BIND_TO_PORT")
        assert resolve_port(None) == 8080


@pytest.mark.parametrize("variable", ["AIP_HTTP_PORT", "SAGEMAKER_BIND_TO_PORT"])
def test_cloudllm_serve_takes_the_platform_port(tiny_gpt2: Path, tmp_path: Path, variable: str) -> None:
    """`cloudllm serve` without --port listens where the container would."""
    from tests.conftest import CLOUDLLM, run_cli

    artifact = tmp_path / "artifact"
    packaged = run_cli("package", str(tiny_gpt2), "-o", str(artifact))
    assert packaged.returncode == 0, packaged.stderr
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("AIP_HTTP_PORT", "SAGEMAKER_BIND_TO_PORT")}
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([CLOUDLLM, "serve", str(artifact), "--host", "127.0.0.1"], env={**env, variable: str(port)},
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", alive=lambda: None if process.poll() is None else (tmp_path / "serve.log").read_text())
    finally:
        process.terminate()
        assert process.wait(60) == 0
        log.close()


# --- the app in-process: loading states, limits, internal errors -------------------------------------


def test_health_is_503_while_loading_then_200(tiny_gpt2: Path, gpt2_engine: GenerationEngine) -> None:
    gate = threading.Event()

    def slow_loader(model_dir: str, settings: Any) -> GenerationEngine:
        gate.wait(120)
        return gpt2_engine

    app = create_app(str(tiny_gpt2), ServingSettings(**GEN_SETTINGS), engine_loader=slow_loader)
    with serve_in_thread(app, wait=False) as url:
        wait_healthy(url, path="/metrics")  # the port answers while the model loads
        response = httpx.get(url + "/ping")
        assert response.status_code == 503 and response.json() == {"status": "loading"}
        assert_error(post(url + "/invocations", {"inputs": "hi"}), 503, "loading")
        gate.set()
        wait_healthy(url)
        assert post(url + "/invocations", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_health_is_503_when_loading_failed(tmp_path: Path) -> None:
    app = create_app(str(tmp_path), ServingSettings(task="text-generation"))  # an empty folder: no model
    with serve_in_thread(app, wait=False) as url:
        wait_healthy(url, path="/metrics")
        for _ in range(600):
            body = httpx.get(url + "/ping").json()
            if body["status"] != "loading":
                break
            time.sleep(0.1)
        response = httpx.get(url + "/ping")
        assert response.status_code == 503 and response.json()["status"] == "failed"
        assert response.json()["error"]
        assert_error(post(url + "/invocations", {"inputs": "hi"}), 503, "failed to load")


def test_too_many_requests_being_served_is_429(tiny_gpt2: Path, gpt2_engine: GenerationEngine) -> None:
    held = _like(HeldEngine, gpt2_engine)
    HeldEngine.release.clear()
    settings = ServingSettings(**{**GEN_SETTINGS, "max_concurrent_requests": 1})
    app = create_app(str(tiny_gpt2), settings, engine_loader=lambda d, s: held)
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, url + "/invocations", {"inputs": "held", "parameters": {"max_new_tokens": 2}})
        assert HeldEngine.entered.wait(60)  # the first request is in the model: it is being served
        response = post(url + "/invocations", {"inputs": "second"})
        assert_error(response, 429, "too many requests")
        assert response.headers["retry-after"] == "1"
        HeldEngine.release.set()
        assert first.result().status_code == 200
        assert post(url + "/invocations", {"inputs": "third", "parameters": {"max_new_tokens": 2}}).status_code == 200


class HeldEngine(GenerationEngine):
    """The real engine, holding every model call until the test lets go (on generate()'s path, not the decode loop's)."""

    entered = threading.Event()
    release = threading.Event()

    def steps(self, parameters):
        return False

    def run(self, inputs, parameters, cancels=None):
        self.entered.set()
        self.release.wait(120)
        return super().run(inputs, parameters, cancels)


class FaultyEngine(GenerationEngine):
    """The real engine, except one magic input hits a bug."""

    def run(self, inputs, parameters, cancels=None):
        if "trigger-a-bug" in inputs:
            raise ZeroDivisionError("a bug in the model code")
        return super().run(inputs, parameters, cancels)

    def submit(self, inputs, parameters, cancels=None):  # the decode loop's way in
        if "trigger-a-bug" in inputs:
            raise ZeroDivisionError("a bug in the model code")
        return super().submit(inputs, parameters, cancels)


class GatedEngine(GenerationEngine):
    """The real engine, holding generation after the first token until the test lets go."""

    gate = threading.Event()

    def generate_stream(self, text, parameters, on_token, cancel=None):
        sent: list[int] = []

        def hold_after_first(token):
            on_token(token)
            if not sent:
                sent.append(1)
                self.gate.wait(120)

        return super().generate_stream(text, parameters, hold_after_first, cancel)


def _like(cls: type, engine: GenerationEngine) -> GenerationEngine:
    return cls(task=engine.task, model=engine.model, tokenizer=engine.tokenizer, settings=engine.settings, model_dir=engine.model_dir)


def test_an_unexpected_error_is_a_json_500_and_the_server_stays_up(tiny_gpt2: Path, gpt2_engine: GenerationEngine) -> None:
    faulty = _like(FaultyEngine, gpt2_engine)
    app = create_app(str(tiny_gpt2), ServingSettings(**GEN_SETTINGS), engine_loader=lambda d, s: faulty)
    with serve_in_thread(app) as url:
        response = post(url + "/invocations", {"inputs": "trigger-a-bug"})
        body = assert_error(response, 500, "internal server error")
        assert body["error_type"] == "internal_error" and "trigger-a-bug" not in body["error"]
        assert httpx.get(url + "/ping").status_code == 200
        assert post(url + "/invocations", {"inputs": "fine", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_stream_tokens_are_sent_as_they_are_produced(tiny_gpt2: Path, gpt2_engine: GenerationEngine) -> None:
    gated = _like(GatedEngine, gpt2_engine)
    GatedEngine.gate.clear()
    app = create_app(str(tiny_gpt2), ServingSettings(**GEN_SETTINGS), engine_loader=lambda d, s: gated)
    with serve_in_thread(app) as url:
        with httpx.stream("POST", url + "/generate_stream", json={"inputs": "Once", "parameters": {"max_new_tokens": 6}}, timeout=120) as response:
            lines = response.iter_lines()
            # Generation is parked after its first token (the event for token 1 leaves once token 2
            # exists), so seeing an event now proves the stream is not buffered to the end.
            first = next(line for line in lines if line.startswith("data:"))
            held = not GatedEngine.gate.is_set()
            GatedEngine.gate.set()
            rest = [line for line in lines if line.startswith("data:")]
    assert held
    events = [json.loads(line[5:]) for line in [first, *rest]]
    assert events[0]["generated_text"] is None and events[-1]["generated_text"] is not None


def test_metrics_404_without_prometheus_client(tiny_gpt2: Path, gpt2_engine: GenerationEngine, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as in an image without it
    app = create_app(str(tiny_gpt2), ServingSettings(**GEN_SETTINGS), engine_loader=lambda d, s: gpt2_engine)
    with serve_in_thread(app) as url:
        assert_error(httpx.get(url + "/metrics"), 404, "prometheus_client")
        assert post(url + "/invocations", {"inputs": "still serves", "parameters": {"max_new_tokens": 2}}).status_code == 200


# --- every task over HTTP --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_urls(task_models: dict[str, Path]) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        urls = {}
        for task, model in task_models.items():
            if task == "text-generation":
                continue  # the subprocess servers cover it
            app = create_app(str(model), ServingSettings(task=task, max_new_tokens=16))
            urls[task] = stack.enter_context(serve_in_thread(app))
        yield urls


@pytest.mark.parametrize("task, key", [("text2text-generation", "generated_text"), ("summarization", "summary_text")])
def test_seq2seq_over_http(task_urls: dict[str, str], task: str, key: str) -> None:
    url = task_urls[task]
    body = post(url + "/invocations", {"inputs": "Paris is the capital of France.", "parameters": {"max_new_tokens": 6}}).json()
    assert len(body) == 1 and isinstance(body[0][key], str)
    pair = post(url + "/invocations", {"inputs": ["a b c", "d e f"], "parameters": {"max_new_tokens": 6}}).json()
    assert [set(item) for item in pair] == [{key}, {key}]
    events = sse_events(post(url + "/invocations", {"inputs": "Paris is the capital of France.", "parameters": {"max_new_tokens": 6}, "stream": True}).text)
    assert events[-1]["generated_text"] == body[0][key]
    assert_error(post(url + "/invocations", {"inputs": "a", "parameters": {"return_full_text": True}}), 422, "return_full_text")


def test_text_classification_over_http(task_urls: dict[str, str]) -> None:
    url = task_urls["text-classification"]
    single = post(url + "/invocations", {"inputs": "I love this"}).json()
    assert [set(item) for item in single] == [{"label", "score"}] * 2
    assert single[0]["score"] >= single[1]["score"]
    many = post(url + "/invocations", {"inputs": ["I love this", "I hate this"], "parameters": {"top_k": 1}}).json()
    assert len(many) == 2 and all(len(labels) == 1 for labels in many)
    vertex = post(url + "/predict", {"instances": ["I love this"]}).json()
    assert vertex["predictions"][0] == single
    assert_error(post(url + "/invocations", {"inputs": "x", "stream": True}), 422, "stream")
    assert_error(post(url + "/generate", {"inputs": "x"}), 404)


def test_token_classification_over_http(task_urls: dict[str, str]) -> None:
    url = task_urls["token-classification"]
    entities = post(url + "/invocations", {"inputs": "Paris is the capital of France"}).json()
    assert entities and all({"entity_group", "score", "word", "start", "end"} == set(e) for e in entities)
    tokens = post(url + "/invocations", {"inputs": "Paris is nice", "parameters": {"aggregation_strategy": "none"}}).json()
    assert all("entity" in e and "index" in e for e in tokens)
    assert_error(post(url + "/invocations", {"inputs": "x", "parameters": {"aggregation_strategy": "best"}}), 422)


def test_question_answering_over_http(task_urls: dict[str, str]) -> None:
    url = task_urls["question-answering"]
    context = "Paris is the capital of France."
    answer = post(url + "/invocations", {"inputs": {"question": "What is the capital?", "context": context}}).json()
    assert set(answer) == {"answer", "score", "start", "end"}
    assert context[answer["start"] : answer["end"]] == answer["answer"]
    vertex = post(url + "/predict", {"instances": [{"question": "What is the capital?", "context": context}]}).json()
    assert vertex["predictions"] == [answer]
    assert_error(post(url + "/invocations", {"inputs": "no context"}), 422, "question")


def test_feature_extraction_over_http(task_urls: dict[str, str]) -> None:
    url = task_urls["feature-extraction"]
    vector = post(url + "/invocations", {"inputs": "embed me"}).json()
    assert len(vector) == 32 and all(isinstance(x, float) for x in vector)
    body = post(url + "/predict", {"instances": ["embed me", "and me"], "parameters": {"normalize": True}}).json()
    assert len(body["predictions"]) == 2 and len(body["predictions"][0]) == 32
    per_token = post(url + "/invocations", {"inputs": "embed me", "parameters": {"pooling": "none"}}).json()
    assert isinstance(per_token[0], list) and len(per_token[0]) == 32


# --- Vertex AI: weights in AIP_STORAGE_URI ----------------------------------------------------------


@pytest.fixture
def storage_emulator(monkeypatch) -> Iterator[str]:
    """gcp-storage-emulator on loopback; google-cloud-storage follows STORAGE_EMULATOR_HOST."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-project")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_model_is_copied_from_aip_storage_uri(storage_emulator: str, tiny_gpt2: Path, tmp_path: Path, monkeypatch) -> None:
    from google.cloud import storage

    from cloudllm_runtime import server

    client = storage.Client()
    bucket = client.create_bucket("models")
    for path in sorted(tiny_gpt2.rglob("*")):
        if path.is_file():
            bucket.blob(f"gpt2/v1/{path.relative_to(tiny_gpt2).as_posix()}").upload_from_filename(str(path))
    monkeypatch.setenv("AIP_STORAGE_URI", "gs://models/gpt2/v1")
    monkeypatch.setattr(server, "GCS_DOWNLOAD_DIR", str(tmp_path / "model"))
    model_dir = server.resolve_model_dir(str(tmp_path / "empty-mount"))
    assert model_dir == str(tmp_path / "model")
    assert sorted(p.name for p in Path(model_dir).iterdir()) == sorted(p.name for p in tiny_gpt2.iterdir())
    monkeypatch.setenv("AIP_STORAGE_URI", "gs://no-such-bucket/x")
    monkeypatch.setattr(server, "GCS_DOWNLOAD_DIR", str(tmp_path / "other"))
    with pytest.raises(server.StartupError):
        server.resolve_model_dir(str(tmp_path / "empty-mount"))


def test_generated_tokens_are_counted_once_on_every_route(sm: str) -> None:
    """The engine counts tokens as it decodes; the protocol routes must not add them again."""

    def counted() -> float:
        return float(re.search(r"^cloudllm_generated_tokens_total (\S+)$", httpx.get(sm + "/metrics").text, re.M).group(1))

    def native() -> int:
        return post(sm + "/invocations", {"inputs": "count me", "parameters": {"max_new_tokens": 3, "details": True}}).json()[0]["details"]["generated_tokens"]

    def openai_completions() -> int:
        return post(sm + "/v1/completions", {"model": "m", "prompt": "count me", "max_tokens": 3}).json()["usage"]["completion_tokens"]

    def openai_stream() -> int:
        body = {"model": "m", "prompt": "count me", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
        events = [json.loads(line[6:]) for line in httpx.post(sm + "/v1/completions", json=body, timeout=60).text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        return next(e["usage"]["completion_tokens"] for e in reversed(events) if e.get("usage"))

    for route in (native, openai_completions, openai_stream):
        before = counted()
        made = route()
        assert made > 0 and counted() - before == made, route.__name__
