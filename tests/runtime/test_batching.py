"""The dynamic batcher with the real tiny GPT-2: concurrent callers share model calls and each gets its own answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudllm_runtime.app import create_app
from cloudllm_runtime.batching import Batcher
from cloudllm_runtime.engine import GenerationEngine, load_engine
from cloudllm_runtime.protocol import RequestError, batch_key
from cloudllm_runtime.settings import ServingSettings

from .conftest import serve_in_thread

PROMPTS = [f"Prompt number {i}: the quick brown fox" if i % 2 else f"Once upon a time {i} models" for i in range(16)]
PARAMS = {"max_new_tokens": 6, "return_full_text": True}


@pytest.fixture(scope="module")
def engine(tiny_gpt2: Path) -> GenerationEngine:
    return load_engine(str(tiny_gpt2), ServingSettings(task="text-generation", max_input_tokens=64))


@pytest.fixture(scope="module")
def sequential(engine: GenerationEngine) -> list[dict]:
    """Each prompt alone: the answers batching must reproduce."""
    return [engine.predict([p], PARAMS)[0] for p in PROMPTS]


class Recorder:
    """run_batch that records what each model call was given, then runs the real engine."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[list[Any], dict]] = []
        self.lock = threading.Lock()

    def __call__(self, inputs: list[Any], parameters: dict) -> list[Any]:
        with self.lock:
            self.calls.append((list(inputs), dict(parameters)))
        return self.engine.predict(inputs, parameters)


async def submit_all(batcher: Batcher, requests: list[tuple[list[Any], dict]]) -> list[Any]:
    try:
        return await asyncio.gather(*(batcher.submit(inputs, params) for inputs, params in requests), return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_requests_get_their_own_answers_in_batches(engine, sequential) -> None:
    recorder = Recorder(engine)
    batcher = Batcher(recorder, max_batch_size=8, max_wait_ms=50, key=batch_key)
    results = asyncio.run(submit_all(batcher, [([p], PARAMS) for p in PROMPTS]))
    assert [r[0] for r in results] == sequential
    for prompt, result in zip(PROMPTS, results):
        assert result[0]["generated_text"].startswith(prompt)  # return_full_text: each answer names its prompt
    assert max(batcher.batch_sizes) > 1
    assert max(batcher.batch_sizes) <= 8
    assert sum(batcher.batch_sizes) == len(PROMPTS)


def test_requests_with_several_inputs_keep_their_order(engine, sequential) -> None:
    batcher = Batcher(Recorder(engine), max_batch_size=4, max_wait_ms=50, key=batch_key)
    groups = [PROMPTS[0:3], PROMPTS[3:4], PROMPTS[4:10], PROMPTS[10:16]]  # one request is bigger than a batch
    results = asyncio.run(submit_all(batcher, [(g, PARAMS) for g in groups]))
    assert [item for r in results for item in r] == sequential
    assert max(batcher.batch_sizes) <= 4


def test_only_equal_parameters_share_a_call(engine) -> None:
    recorder = Recorder(engine)
    batcher = Batcher(recorder, max_batch_size=8, max_wait_ms=50, key=batch_key)
    short, longer = {"max_new_tokens": 2}, {"max_new_tokens": 5, "details": True}
    requests = [([p], short if i % 2 else longer) for i, p in enumerate(PROMPTS[:8])]
    results = asyncio.run(submit_all(batcher, requests))
    for (inputs, params), result in zip(requests, results):
        assert result == engine.predict(inputs, params)
    for inputs, params in recorder.calls:
        assert params in (short, longer)
    assert {len(inputs) for inputs, _ in recorder.calls} != {1}  # some calls were shared


def test_seeded_requests_run_alone(engine) -> None:
    recorder = Recorder(engine)
    batcher = Batcher(recorder, max_batch_size=8, max_wait_ms=50, key=batch_key)
    params = {"max_new_tokens": 4, "do_sample": True, "seed": 7}
    results = asyncio.run(submit_all(batcher, [([p], params) for p in PROMPTS[:4]]))
    assert all(len(inputs) == 1 for inputs, _ in recorder.calls)
    assert results[0] == engine.predict(PROMPTS[:1], params)


def test_batch_size_one_means_no_batching(engine, sequential) -> None:
    batcher = Batcher(Recorder(engine), max_batch_size=1, max_wait_ms=50, key=batch_key)
    results = asyncio.run(submit_all(batcher, [([p], PARAMS) for p in PROMPTS[:6]]))
    assert [r[0] for r in results] == sequential[:6]
    assert batcher.batch_sizes == [1] * 6


def test_a_bad_input_fails_only_its_caller(engine) -> None:
    batcher = Batcher(engine.predict, max_batch_size=8, max_wait_ms=50, key=batch_key)
    too_long = "word " * 500  # over max_input_tokens: the shared call fails, then each runs alone
    requests = [(["fine one"], PARAMS), ([too_long], PARAMS), (["fine two"], PARAMS)]
    results = asyncio.run(submit_all(batcher, requests))
    assert isinstance(results[1], RequestError) and results[1].status == 422
    assert results[0] == engine.predict(["fine one"], PARAMS)
    assert results[2] == engine.predict(["fine two"], PARAMS)


def test_a_failing_call_fails_only_its_own_batch(engine) -> None:
    def run_batch(inputs: list[Any], parameters: dict) -> list[Any]:
        if parameters.get("max_new_tokens") == 3:
            raise RuntimeError("device fell over")
        return engine.predict(inputs, parameters)

    batcher = Batcher(run_batch, max_batch_size=8, max_wait_ms=50, key=batch_key)
    requests = [(["a"], {"max_new_tokens": 3}), (["b"], {"max_new_tokens": 2}), (["c"], {"max_new_tokens": 3})]
    results = asyncio.run(submit_all(batcher, requests))
    assert isinstance(results[0], RuntimeError) and isinstance(results[2], RuntimeError)
    assert results[1] == engine.predict(["b"], {"max_new_tokens": 2})


def test_http_concurrency_matches_sequential_answers(engine, sequential, tiny_gpt2: Path) -> None:
    """Over real HTTP: 16 concurrent clients, the same answers as one at a time, and batches > 1 in /metrics."""
    settings = ServingSettings(task="text-generation", max_input_tokens=64, max_batch_size=8, max_batch_wait_ms=100)
    app = create_app(str(tiny_gpt2), settings, engine_loader=lambda model_dir, s: engine)
    with serve_in_thread(app) as url:
        def ask(prompt: str) -> Any:
            response = httpx.post(url + "/invocations", json={"inputs": prompt, "parameters": PARAMS}, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()

        one_at_a_time = [ask(p) for p in PROMPTS]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            concurrent_answers = list(pool.map(ask, PROMPTS))
        metrics = httpx.get(url + "/metrics").text
    assert one_at_a_time == [[s] for s in sequential]
    assert concurrent_answers == one_at_a_time
    count = float(re.search(r"^cloudllm_batch_size_count (\S+)$", metrics, re.M).group(1))
    total = float(re.search(r"^cloudllm_batch_size_sum (\S+)$", metrics, re.M).group(1))
    assert total == 32 and count < total  # some model call served more than one request
