"""The dynamic batcher with real tiny models (GPT-2, and BERT for token classification and question answering):
concurrent callers share model calls and each gets its own answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
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

    def __call__(self, inputs: list[Any], parameters: dict, cancels: list | None = None) -> list[Any]:
        with self.lock:
            self.calls.append((list(inputs), dict(parameters)))
        return self.engine.predict(inputs, parameters, cancels)


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
    def run_batch(inputs: list[Any], parameters: dict, cancels: list) -> list[Any]:
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
    # Each decode step is a model call making one token per running row: 32 answers of 6 tokens.
    assert total == 32 * PARAMS["max_new_tokens"] and count < total  # some step served more than one request


# --- a request's answer does not depend on who shares its batch -----------------------------------

ROOMY = dict(task="text-generation", max_input_tokens=64, max_total_tokens=80, default_max_new_tokens=64)


@pytest.fixture(scope="module")
def roomy_engine(engine: GenerationEngine) -> GenerationEngine:
    """The same model with max_total_tokens 80: a 50-token prompt leaves room for only 30 new tokens."""
    return GenerationEngine(task=engine.task, model=engine.model, tokenizer=engine.tokenizer, settings=ServingSettings(**ROOMY))


def test_default_length_is_the_same_batched_next_to_a_long_prompt(roomy_engine: GenerationEngine) -> None:
    short, long = "Once upon a time", "x" * 50
    assert roomy_engine.validate([long], {}) == [80]  # the long prompt's default budget is clipped to its room
    alone = roomy_engine.run([short], {"details": True})[0]
    assert alone.generated_tokens > 30  # more than the long prompt's room: a shared budget would have cut it
    batcher = Batcher(roomy_engine.run, max_batch_size=8, max_batch_tokens=8 * 80, max_wait_ms=100, key=batch_key)
    sizes = [roomy_engine.validate([text], {"details": True}) for text in (short, long)]
    results = asyncio.run(submit_all_sized(batcher, [([short], sizes[0]), ([long], sizes[1])], {"details": True}))
    assert batcher.batch_sizes == [2]  # they did share one call
    assert results[0][0].output == alone.output
    assert results[1][0].output == roomy_engine.run([long], {"details": True})[0].output


async def submit_all_sized(batcher: Batcher, requests: list[tuple[list[Any], list[int]]], params: dict) -> list[Any]:
    try:
        return await asyncio.gather(*(batcher.submit(inputs, params, sizes=sizes) for inputs, sizes in requests))
    finally:
        await batcher.stop()


def test_the_batch_is_sized_from_the_tokens_it_holds(engine, sequential) -> None:
    """max_batch_size sequences of max_total_tokens is the budget: short requests fill it many at a time."""
    batcher = Batcher(Recorder(engine), max_batch_size=2, max_batch_tokens=2 * 256, max_wait_ms=100, key=batch_key)
    short = [([p], engine.validate([p], PARAMS)) for p in PROMPTS]
    assert max(size for _, sizes in short for size in sizes) * 8 <= 2 * 256
    answers = asyncio.run(submit_all_sized(batcher, short, PARAMS))
    assert max(batcher.batch_sizes) > 2  # more rows than max_batch_size, in the same tokens
    assert answers == [[s] for s in sequential]

    batcher = Batcher(Recorder(engine), max_batch_size=2, max_batch_tokens=2 * 256, max_wait_ms=100, key=batch_key)
    asyncio.run(submit_all_sized(batcher, [([p], [200]) for p in PROMPTS[:6]], PARAMS))
    assert max(batcher.batch_sizes) == 2  # long sequences: no more than the budget holds


def test_a_cancelled_row_stops_and_the_others_finish(engine) -> None:
    made: list[int] = []
    counting = GenerationEngine(task=engine.task, model=engine.model, tokenizer=engine.tokenizer, settings=engine.settings)
    counting.on_tokens = made.append
    gone = threading.Event()
    gone.set()
    prompts = ["Once upon a time", "The quick brown fox"]
    alone = counting.run([prompts[1]], {"max_new_tokens": 40})[0]
    made.clear()
    results = counting.run(prompts, {"max_new_tokens": 40}, [gone, None])
    assert results[1].output == alone.output  # the other row is untouched
    # Its caller had left before it was prefilled: the decode loop made nothing for it.
    assert results[0].generated_tokens == 0
    assert sum(made) == alone.generated_tokens


# --- encoders: a shared call is one forward pass, and each caller's answer is its answer alone --------

SENTENCES = [
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "hello",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Machine learning engineers ship models.",
    "Once upon a time there was a tiny model that lived on a laptop.",
    "Berlin 😀",
]
QUESTIONS = [
    {"question": "What is the capital of France?", "context": SENTENCES[0]},
    {"question": "Who?", "context": "Nobody knows 😀."},
    {"question": "What did the fox jump over?", "context": SENTENCES[2]},
    {"question": "Where did the tiny model live?", "context": SENTENCES[4] + " " + SENTENCES[3]},
    {"question": "Which river?", "context": "the river bank"},
]


class ForwardBatches:
    """Records the batch dimension of every forward pass the model runs (a real torch forward hook)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.sizes: list[int] = []

    def __enter__(self) -> list[int]:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.sizes.append(int(ids.shape[0]))

        self.handle = self.model.register_forward_hook(hook, with_kwargs=True)
        return self.sizes

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def assert_same_answer(batched: Any, alone: Any) -> None:
    """Equal, except scores, which padding may move in the last float32 digits."""
    if isinstance(alone, dict):
        assert set(batched) == set(alone)
        for key in alone:
            assert_same_answer(batched[key], alone[key])
    elif isinstance(alone, list):
        assert len(batched) == len(alone)
        for b, a in zip(batched, alone):
            assert_same_answer(b, a)
    elif isinstance(alone, float):
        assert math.isclose(batched, alone, rel_tol=1e-4, abs_tol=1e-6), (batched, alone)
    else:
        assert batched == alone


@pytest.fixture(scope="module")
def encoders(tiny_bert) -> Any:
    """encoders(task) -> (engine, inputs of several lengths), loaded on first use."""
    heads = {"token-classification": ("token-classification", SENTENCES), "question-answering": ("question-answering", QUESTIONS)}
    loaded: dict[str, Any] = {}

    def get(task: str) -> tuple[Any, list[Any]]:
        head, inputs = heads[task]
        if task not in loaded:
            loaded[task] = load_engine(str(tiny_bert(head)), ServingSettings(task=task))
        return loaded[task], inputs

    return get


@pytest.mark.parametrize(
    ("task", "params"),
    [
        ("token-classification", {}),
        ("token-classification", {"aggregation_strategy": "none"}),
        ("token-classification", {"aggregation_strategy": "first"}),
        ("question-answering", {}),
        ("question-answering", {"max_answer_len": 2}),
    ],
)
def test_encoder_batches_reach_the_model(encoders, task: str, params: dict) -> None:
    engine, inputs = encoders(task)
    alone = [engine.predict([item], params)[0] for item in inputs]
    batcher = Batcher(engine.predict, max_batch_size=8, max_wait_ms=50, key=batch_key)
    with ForwardBatches(engine.model) as forward:
        results = asyncio.run(submit_all(batcher, [([item], params) for item in inputs]))
    assert max(batcher.batch_sizes) > 1
    assert forward == batcher.batch_sizes  # one forward pass per shared call, as wide as the call
    for result, single in zip(results, alone):
        assert_same_answer(result[0], single)


def test_question_answering_a_long_item_fails_only_itself(encoders) -> None:
    qa_engine, _ = encoders("question-answering")
    batcher = Batcher(qa_engine.predict, max_batch_size=8, max_wait_ms=50, key=batch_key)
    too_long = {"question": "q", "context": "word " * 500}
    results = asyncio.run(submit_all(batcher, [([QUESTIONS[0]], {}), ([too_long], {}), ([QUESTIONS[2]], {})]))
    assert isinstance(results[1], RequestError) and results[1].status == 422
    assert_same_answer(results[0][0], qa_engine.predict([QUESTIONS[0]], {})[0])
    assert_same_answer(results[2][0], qa_engine.predict([QUESTIONS[2]], {})[0])
