"""Continuous batching with the real tiny GPT-2: requests join and leave a running batch between decode steps,
and each answer is the one the request gets alone (generate() on its own is the reference)."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import pytest

from cloudllm_runtime.engine import GenerationEngine, Token, load_engine
from cloudllm_runtime.settings import ServingSettings

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog near the river bank and",
    "Paris",
    "Machine learning engineers ship fine-tuned models to GPU endpoints, and then they",
    "It dreamed of serving requests",
    "Summarise this contract: the party of the first part agrees to",
]


@pytest.fixture(scope="module")
def engine(tiny_gpt2: Path) -> GenerationEngine:
    return load_engine(str(tiny_gpt2), ServingSettings(task="text-generation", max_input_tokens=64, max_total_tokens=200))


def alone_with_generate(engine: GenerationEngine, prompt: str, parameters: dict) -> Any:
    """The reference: transformers' generate() on this one prompt, no decode loop, no neighbours."""
    twin = GenerationEngine(task=engine.task, model=engine.model, tokenizer=engine.tokenizer, settings=engine.settings)
    twin.decode_loop = None
    return twin.run([prompt], parameters)[0]


def test_generation_runs_through_the_decode_loop(engine) -> None:
    assert engine.decode_loop is not None
    assert engine.steps({"max_new_tokens": 4}) and engine.steps({"temperature": 0.7})
    # A seeded draw or a repetition penalty runs alone on generate(), as the batcher runs it.
    assert not engine.steps({"seed": 1}) and not engine.steps({"repetition_penalty": 1.2})


def test_mixed_length_concurrent_requests_get_their_greedy_answer_alone(engine) -> None:
    """Different prompt lengths and budgets, arriving together and while others decode: each answer equals generate() alone."""
    jobs = [(PROMPTS[i % len(PROMPTS)], {"max_new_tokens": 3 + (i * 7) % 25, "details": True}) for i in range(12)]
    expected = [alone_with_generate(engine, prompt, params) for prompt, params in jobs]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda job: engine.run([job[0]], job[1])[0], jobs))
    assert [a.output for a in answers] == [e.output for e in expected]
    assert [a.generated_tokens for a in answers] == [e.generated_tokens for e in expected]


def test_a_request_joins_a_running_batch_and_leaves_before_it_ends(engine) -> None:
    """A short request submitted while a long one decodes finishes while the long one is still decoding."""
    long_tokens: list[int] = []
    short_done_at: list[int] = []
    short: list[Any] = []

    def on_long_token(token: Token) -> None:
        long_tokens.append(token.id)
        if len(long_tokens) == 2:  # the long request is running now: send the short one
            future = engine.submit(["Paris"], {"max_new_tokens": 3})
            future.add_done_callback(lambda _: short_done_at.append(len(long_tokens)))
            short.append(future)

    prediction = engine.generate_stream(PROMPTS[1], {"max_new_tokens": 40}, on_long_token)
    assert prediction.generated_tokens == 40
    assert short_done_at and short_done_at[0] < 40  # it did not wait for the long request's whole batch
    assert short[0].result()[0].output == alone_with_generate(engine, "Paris", {"max_new_tokens": 3}).output
    assert prediction.output == alone_with_generate(engine, PROMPTS[1], {"max_new_tokens": 40}).output


def test_streamed_tokens_add_up_to_the_answer_and_the_last_is_final(engine) -> None:
    params = {"max_new_tokens": 20, "details": True}
    tokens: list[Token] = []
    prediction = engine.generate_stream(PROMPTS[0], params, tokens.append)
    assert "".join(t.text for t in tokens) == prediction.output["generated_text"]
    assert [t.final for t in tokens if t.id is not None][-1] and not any(t.final for t in tokens[:-1] if t.id is not None)
    assert prediction.output == alone_with_generate(engine, PROMPTS[0], params).output


def test_stop_sequences_end_a_row_as_generate_does(engine) -> None:
    plain = engine.run([PROMPTS[3]], {"max_new_tokens": 30})[0].output["generated_text"]
    stop = plain[5:7]  # a piece of text the answer is known to contain
    assert len(stop) == 2
    params = {"max_new_tokens": 30, "stop": [stop], "details": True}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda p: engine.run([p], params)[0].output, [PROMPTS[3], PROMPTS[0], PROMPTS[3]]))
    assert answers[0]["generated_text"].endswith(stop) and answers[0]["details"]["finish_reason"] == "stop_sequence"
    assert answers[0] == answers[2] == alone_with_generate(engine, PROMPTS[3], params).output
    assert answers[1] == alone_with_generate(engine, PROMPTS[0], params).output


def test_a_caller_leaving_mid_generation_stops_its_row_only(tiny_gpt2: Path, engine) -> None:
    made: list[int] = []
    counting = GenerationEngine(task=engine.task, model=engine.model, tokenizer=engine.tokenizer, settings=engine.settings)
    counting.on_tokens = made.append
    gone = threading.Event()
    seen: list[int] = []

    def leave_after_three(token: Token) -> None:
        seen.append(token.id)
        if len(seen) == 3:
            gone.set()

    other = counting.submit([PROMPTS[2]], {"max_new_tokens": 30})
    left = counting.generate_stream(PROMPTS[0], {"max_new_tokens": 30}, leave_after_three, gone)
    kept = other.result()[0]
    assert left.generated_tokens == 3  # nothing was made for it after its caller left
    assert kept.output == alone_with_generate(engine, PROMPTS[2], {"max_new_tokens": 30}).output
    assert sum(made) == 3 + kept.generated_tokens  # every token counted once


def test_a_model_failure_fails_its_step_and_the_loop_goes_on(tiny_gpt2: Path) -> None:
    engine = load_engine(str(tiny_gpt2), ServingSettings(task="text-generation", max_input_tokens=64))
    broken = threading.Event()
    broken.set()

    def fail_once(module: Any, args: Any, kwargs: Any) -> None:
        if broken.is_set():
            broken.clear()
            raise RuntimeError("a model bug")

    hook = engine.model.register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="a model bug"):
            engine.run([PROMPTS[0]], {"max_new_tokens": 4})
        assert engine.run([PROMPTS[0]], {"max_new_tokens": 4})[0].output == alone_with_generate(engine, PROMPTS[0], {"max_new_tokens": 4}).output
    finally:
        hook.remove()


def test_batch_size_one_runs_one_sequence_at_a_time(tiny_gpt2: Path, engine) -> None:
    single = load_engine(str(tiny_gpt2), ServingSettings(task="text-generation", max_input_tokens=64, max_batch_size=1))
    rows: list[int] = []
    single.on_batch = rows.append
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: single.run([p], {"max_new_tokens": 5})[0].output, PROMPTS[:4]))
    assert set(rows) == {1}
    assert answers == [alone_with_generate(engine, p, {"max_new_tokens": 5}).output for p in PROMPTS[:4]]


def test_sampling_rows_share_steps_with_greedy_ones(engine) -> None:
    greedy = {"max_new_tokens": 8}
    sampled = {"max_new_tokens": 8, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(engine.run, [p], sampled if i % 2 else greedy) for i, p in enumerate(PROMPTS[:4])]
        answers = [f.result()[0] for f in futures]
    assert all(a.generated_tokens >= 1 for a in answers)
    assert answers[0].output == alone_with_generate(engine, PROMPTS[0], greedy).output
    assert answers[2].output == alone_with_generate(engine, PROMPTS[2], greedy).output
