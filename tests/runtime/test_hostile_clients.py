"""The model server under hostile clients, over real sockets on loopback.

Slow senders, clients that hang up, huge prompts and odd values must neither stall the
others nor turn a client's mistake into a 5xx. The app runs under uvicorn in this process,
so the tests can hold the model at a known point; nothing here asserts a duration.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from cloudllm_runtime.app import create_app
from cloudllm_runtime.engine import GenerationEngine, load_engine
from cloudllm_runtime.settings import ServingSettings

from .conftest import serve_in_thread
from .test_app import GEN_SETTINGS

# The app tests' settings, with room for a long generation and a 6.6 MB body.
SETTINGS = {**GEN_SETTINGS, "max_new_tokens": 100, "max_body_bytes": 8 * 1024 * 1024}


@pytest.fixture(scope="module")
def engine(tiny_gpt2: Path) -> GenerationEngine:
    return load_engine(str(tiny_gpt2), ServingSettings(**SETTINGS))


def _like(cls: type, engine: GenerationEngine, **settings: Any) -> Any:
    return cls(task=engine.task, model=engine.model, tokenizer=engine.tokenizer,
               settings=ServingSettings(**{**SETTINGS, **settings}), model_dir=engine.model_dir)  # fmt: skip


@pytest.fixture
def serve(tiny_gpt2: Path) -> Iterator[Any]:
    """serve(engine) -> the URL of an app serving that engine (with the engine's settings)."""
    with contextlib.ExitStack() as stack:
        yield lambda engine: stack.enter_context(
            serve_in_thread(create_app(str(tiny_gpt2), engine.settings, engine_loader=lambda d, s: engine))
        )


def raw_request(url: str, body: bytes, *, send: int | None = None) -> socket.socket:
    """A POST /invocations on a raw socket, its body sent up to `send` bytes (all by default)."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    head = (f"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    sock.sendall(head + body[: len(body) if send is None else send])
    return sock


def read_reply(sock: socket.socket) -> str:
    """One whole HTTP response (head and Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace")


def _length(data: bytes) -> int:
    match = re.search(rb"content-length: (\d+)", data, re.I)
    return int(match.group(1)) if match else 0


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def test_slow_senders_hold_no_slot_and_are_cut_off(engine: GenerationEngine, serve) -> None:
    url = serve(_like(GenerationEngine, engine, max_concurrent_requests=2, max_body_seconds=1.0))
    body = json.dumps({"inputs": "slow", "parameters": {"max_new_tokens": 2}}).encode()
    slow = [raw_request(url, body, send=5) for _ in range(6)]  # three times the limit, each mid-body
    try:
        fast = httpx.post(url + "/invocations", json={"inputs": "fast", "parameters": {"max_new_tokens": 2}}, timeout=120)
        assert fast.status_code == 200, fast.text
        for sock in slow:  # each slow body is refused once its time is up, and says why
            reply = read_reply(sock)
            assert reply.startswith("HTTP/1.1 408"), reply
            assert "did not arrive within 1 s" in reply
    finally:
        for sock in slow:
            sock.close()
    assert metric(url, "cloudllm_requests_in_flight") == 0


class CountingTokenizerEngine(GenerationEngine):
    """The real engine, recording the length of every text its tokenizer is given."""

    def __init__(self, **kwargs: Any) -> None:
        self.seen: list[int] = []
        super().__init__(**kwargs)

    def _encode(self, text: str, pair: str | None = None, **kwargs: Any) -> Any:
        self.seen.append(len(text) + len(pair or ""))
        return super()._encode(text, pair, **kwargs)


def test_a_huge_prompt_is_refused_before_the_tokenizer(engine: GenerationEngine, serve) -> None:
    counting = _like(CountingTokenizerEngine, engine)
    url = serve(counting)
    huge = "All work and no play makes Jack a dull boy. " * 150_000  # 6.6 MB, under the body limit
    response = httpx.post(url + "/invocations", json={"inputs": huge}, timeout=120)
    assert response.status_code == 422, response.text
    assert "characters long" in response.json()["error"] and "64 input tokens" in response.json()["error"]
    both = httpx.post(url + "/invocations", json={"inputs": ["fine", huge]}, timeout=120)
    assert both.status_code == 422 and "input 1 is" in both.json()["error"]
    assert max(counting.seen) <= counting.max_input_chars  # the tokenizer never saw it
    ok = httpx.post(url + "/invocations", json={"inputs": "still serving", "parameters": {"max_new_tokens": 2}}, timeout=120)
    assert ok.status_code == 200


class GatedEngine(GenerationEngine):
    """The real engine, pausing a generation after its first token until the test lets go."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _stopping_criteria(self, parameters, start, budgets, cancels):  # type: ignore[override]
        criteria = super()._stopping_criteria(parameters, start, budgets, cancels)
        gate = self

        class Pause:
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                if not gate.entered.is_set():
                    gate.entered.set()
                    gate.release.wait(120)
                return input_ids[:, -1] < 0  # never stops a row itself

        criteria.append(Pause())
        return criteria

    def _sequence(self, *args: Any, **kwargs: Any) -> Any:  # the decode loop's rows: pause at the first token's checks
        row = super()._sequence(*args, **kwargs)
        stop_check, gate = row.finished, self

        def finished(generated: list[int]) -> bool:
            if not gate.entered.is_set():
                gate.entered.set()
                gate.release.wait(120)
            return stop_check(generated)

        row.finished = finished
        return row


def test_a_client_that_hangs_up_has_its_generation_stopped(engine: GenerationEngine, serve) -> None:
    prompt, parameters = "Once upon a time", {"max_new_tokens": 100}
    full = engine.run([prompt], parameters)[0].generated_tokens
    assert full > 20  # uncancelled, this request makes many tokens
    gated = _like(GatedEngine, engine)
    url = serve(gated)
    sock = raw_request(url, json.dumps({"inputs": prompt, "parameters": parameters}).encode())
    try:
        assert gated.entered.wait(120)  # its first token is made
        assert metric(url, "cloudllm_requests_in_flight") == 1
    finally:
        sock.close()  # ... and the client hangs up
    _eventually(lambda: metric(url, "cloudllm_requests_in_flight") == 0)  # the server saw it go
    gated.release.set()
    # The model runs one call at a time: the next answer comes once the abandoned one has stopped.
    after = httpx.post(url + "/invocations", json={"inputs": "next", "parameters": {"max_new_tokens": 3, "details": True}}, timeout=120)
    assert after.status_code == 200
    made = metric(url, "cloudllm_generated_tokens_total")
    abandoned = made - after.json()[0]["details"]["generated_tokens"]
    assert abandoned <= 2, (abandoned, full)  # the token before the pause, at most one after it


def _eventually(condition: Any, attempts: int = 1200) -> None:
    for _ in range(attempts):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition never held")


@pytest.mark.parametrize(
    "parameters",
    [
        {"temperature": 1e-30},  # greedy in the limit
        {"temperature": 1e-300, "do_sample": True},
        {"temperature": 100.0, "repetition_penalty": 1e-6, "do_sample": True},
        {"repetition_penalty": 1e6, "do_sample": True},
        {"top_p": 1e-300, "do_sample": True},
        {"top_k": 10**12, "do_sample": True},
        {"seed": 2**63 - 1, "do_sample": True},
        {"stop": ["\u0000", "\ud800"]},
    ],
)
def test_valid_extreme_parameters_are_served(engine: GenerationEngine, serve, parameters: dict) -> None:
    url = serve(engine)
    body = json.dumps({"inputs": "Hello hello", "parameters": {**parameters, "max_new_tokens": 4}})  # \ud800 escaped
    response = httpx.post(url + "/invocations", content=body, headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"inputs": "hi", "parameters": {"repetition_penalty": 1e-300, "do_sample": true}}', "at least 1e-06"),
        (b'{"inputs": "hi", "\\ud800\\u0000\\n": 1}', r'unknown body field "\ud800\u0000\n"'),
        (b'{"inputs": "hi", "parameters": {"\\udfff": 1}}', "unknown parameter"),
        (b'{"inputs": "hi", "parameters": {"' + b"k" * 100_000 + b'": 1}}', '..."'),
        (b'{"instances": [{"\\ud800": "x"}]}', "instances[0]"),
    ],
)
def test_odd_values_and_field_names_are_a_422(engine: GenerationEngine, serve, raw: bytes, fragment: str) -> None:
    url = serve(engine)
    response = httpx.post(url + "/invocations", content=raw, headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code == 422, response.text
    body = response.json()
    assert fragment in body["error"], body
    assert len(body["error"]) < 1000  # a 100 kB name is not echoed whole
