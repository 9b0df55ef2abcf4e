"""The engine on real tiny models: every task's output shape, generation semantics, limits, streaming."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx
import pytest

from cloudllm_runtime.engine import Engine, GenerationEngine, load_engine, resolve_dtype, resolve_placement
from cloudllm_runtime.protocol import RequestError
from cloudllm_runtime.settings import ServingSettings

PROMPTS = ["Once upon a time", "The quick brown fox", "Paris is the capital of", "Machine learning engineers ship"]
CONTEXT = "Paris is the capital of France and Berlin is the capital of Germany."


@pytest.fixture(scope="module")
def engines(task_models: dict[str, Path]):
    """One engine per task, loaded on first use."""
    loaded: dict[str, Engine] = {}

    def get(task: str, **settings) -> Engine:
        key = task + json.dumps(settings, sort_keys=True)
        if key not in loaded:
            loaded[key] = load_engine(str(task_models[task]), ServingSettings(task=task, **settings))
        return loaded[key]

    return get


@pytest.fixture(scope="module")
def gpt2(engines) -> GenerationEngine:
    return engines("text-generation", max_input_tokens=64, max_total_tokens=96, default_max_new_tokens=8)


# --- text generation ----------------------------------------------------------------------------


def test_generation_outputs_one_dict_per_input(gpt2: GenerationEngine) -> None:
    outputs = gpt2.predict(PROMPTS, {"max_new_tokens": 6})
    assert len(outputs) == len(PROMPTS)
    for out in outputs:
        assert set(out) == {"generated_text"} and isinstance(out["generated_text"], str)
    json.dumps(outputs)


def test_greedy_is_deterministic_and_batching_does_not_change_answers(gpt2: GenerationEngine) -> None:
    batched = gpt2.predict(PROMPTS, {"max_new_tokens": 10})
    alone = [gpt2.predict([p], {"max_new_tokens": 10})[0] for p in PROMPTS]
    assert batched == alone
    assert gpt2.predict(PROMPTS, {"max_new_tokens": 10}) == batched


def test_return_full_text_prepends_the_prompt(gpt2: GenerationEngine) -> None:
    new = gpt2.predict([PROMPTS[1]], {"max_new_tokens": 5})[0]["generated_text"]
    full = gpt2.predict([PROMPTS[1]], {"max_new_tokens": 5, "return_full_text": True})[0]["generated_text"]
    assert full == PROMPTS[1] + new


def test_details_count_generated_tokens(gpt2: GenerationEngine) -> None:
    predictions = gpt2.run([PROMPTS[0]], {"max_new_tokens": 7, "details": True})
    details = predictions[0].output["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == predictions[0].generated_tokens
    if details["finish_reason"] == "length":
        assert details["generated_tokens"] == 7
    assert gpt2.run([PROMPTS[0]], {"max_new_tokens": 3})[0].generated_tokens <= 3


def test_default_max_new_tokens_comes_from_settings(gpt2: GenerationEngine) -> None:
    prediction = gpt2.run([PROMPTS[0]], {"details": True})[0]
    assert prediction.generated_tokens <= 8


def test_stop_sequence_cuts_the_text_and_stops_early(gpt2: GenerationEngine) -> None:
    text = gpt2.predict([PROMPTS[2]], {"max_new_tokens": 20})[0]["generated_text"]
    assert len(text) >= 4
    stop = text[1:3]
    out = gpt2.predict([PROMPTS[2]], {"max_new_tokens": 20, "stop": [stop], "details": True})[0]
    assert out["generated_text"] == text[: text.find(stop) + len(stop)]
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert out["details"]["generated_tokens"] < 20


def test_stops_in_a_batch_apply_per_row(gpt2: GenerationEngine) -> None:
    plain = gpt2.predict(PROMPTS, {"max_new_tokens": 12})
    stop = plain[0]["generated_text"][:2]
    stopped = gpt2.predict(PROMPTS, {"max_new_tokens": 12, "stop": [stop]})
    for before, after in zip(plain, stopped):
        text = before["generated_text"]
        expected = text[: text.find(stop) + len(stop)] if stop in text else text
        assert after["generated_text"] == expected


def test_seeded_sampling_is_reproducible(gpt2: GenerationEngine) -> None:
    params = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 1234}
    first = gpt2.predict([PROMPTS[0]], params)
    assert gpt2.predict([PROMPTS[0]], params) == first
    other = gpt2.predict([PROMPTS[0]], {**params, "seed": 99})
    assert other != first  # the seed matters, so sampling really happened


def test_temperature_alone_turns_sampling_on(gpt2: GenerationEngine) -> None:
    greedy = gpt2.predict([PROMPTS[0]], {"max_new_tokens": 8})[0]["generated_text"]
    sampled = {gpt2.predict([PROMPTS[0]], {"max_new_tokens": 8, "temperature": 5.0, "seed": s})[0]["generated_text"] for s in (1, 2)}
    assert sampled != {greedy}


def test_stream_pieces_add_up_to_the_greedy_text(gpt2: GenerationEngine) -> None:
    params = {"max_new_tokens": 15}
    pieces = list(gpt2.stream(PROMPTS[3], params))
    assert len(pieces) > 1
    assert "".join(pieces) == gpt2.predict([PROMPTS[3]], params)[0]["generated_text"]


def test_generate_stream_reports_token_ids(gpt2: GenerationEngine) -> None:
    tokens = []
    prediction = gpt2.generate_stream(PROMPTS[0], {"max_new_tokens": 6}, tokens.append)
    ids = [t.id for t in tokens if t.id is not None]
    assert len(ids) == prediction.generated_tokens and all(isinstance(i, int) for i in ids)
    assert "".join(t.text for t in tokens) == prediction.output["generated_text"]
    # The last token is known to be the last as it is produced, so a server can send it at once.
    assert [t.final for t in tokens if t.id is not None] == [False] * (len(ids) - 1) + [True]


def test_generate_stream_ends_at_a_stop_sequence(gpt2: GenerationEngine) -> None:
    text = gpt2.predict([PROMPTS[2]], {"max_new_tokens": 20})[0]["generated_text"]
    stop = text[3:5]
    tokens = []
    prediction = gpt2.generate_stream(PROMPTS[2], {"max_new_tokens": 20, "stop": [stop], "details": True}, tokens.append)
    assert prediction.output["generated_text"] == text[: text.find(stop) + len(stop)]
    assert prediction.output["details"]["finish_reason"] == "stop_sequence"
    assert [t.final for t in tokens if t.id is not None][-1] is True
    assert sum(t.final for t in tokens) == 1


def test_input_over_max_input_tokens_is_422(gpt2: GenerationEngine) -> None:
    long = "word " * 200
    for call in (gpt2.validate, gpt2.predict):
        with pytest.raises(RequestError) as caught:
            call(["short", long], {})
        assert caught.value.status == 422
        assert "input 1" in caught.value.message and "at most 64" in caught.value.message


def test_input_plus_max_new_tokens_over_total_is_422(gpt2: GenerationEngine) -> None:
    prompt = "Once upon a time " * 3
    length = len(gpt2.tokenizer(prompt)["input_ids"])
    assert length <= 64
    gpt2.validate([prompt], {"max_new_tokens": 96 - length})
    with pytest.raises(RequestError) as caught:
        gpt2.validate([prompt], {"max_new_tokens": 97 - length})
    assert caught.value.status == 422 and "max_new_tokens" in caught.value.message
    gpt2.validate([prompt], {})  # the default is clipped to fit instead


def test_position_limit_caps_the_input_limit(task_models: dict[str, Path]) -> None:
    engine = load_engine(str(task_models["text-generation"]), ServingSettings(task="text-generation", max_input_tokens=100_000))
    assert engine.max_input_tokens == 255  # tiny GPT-2 has 256 positions, one kept for the first new token


@pytest.mark.parametrize("text", ["emoji 😀👍🏽 party", "مرحبا بالعالم", "nul\x00char", "\ufffd\ufffd", "   "])
def test_unicode_inputs_generate(gpt2: GenerationEngine, text: str) -> None:
    ids = gpt2._token_ids(text)
    assert ids and gpt2.tokenizer.decode(ids) == text  # byte-level BPE: every character reaches the model
    [prediction] = gpt2.run([text], {"max_new_tokens": 4, "details": True})
    output = prediction.output
    assert set(output) == {"generated_text", "details"} and isinstance(output["generated_text"], str)
    assert 1 <= prediction.generated_tokens <= 4 and output["details"]["generated_tokens"] == prediction.generated_tokens
    # Valid UTF-8 on the wire (no lone surrogates), and the same text back.
    assert json.loads(json.dumps(output, ensure_ascii=False).encode("utf-8")) == output
    # Incremental detokenization of the same prompt adds up to the same text.
    assert "".join(gpt2.stream(text, {"max_new_tokens": 4})) == output["generated_text"]


@pytest.fixture(scope="module")
def stripping_gpt2(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with a tokenizer that strips surrounding whitespace, as some do: "   " becomes no tokens."""
    from tokenizers import Tokenizer, normalizers

    folder = tmp_path_factory.mktemp("stripping") / "gpt2"
    shutil.copytree(tiny_gpt2, folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Strip()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_an_input_that_encodes_to_no_tokens_is_422(stripping_gpt2: Path) -> None:
    from cloudllm_runtime.app import create_app

    from .conftest import serve_in_thread

    engine = load_engine(str(stripping_gpt2), ServingSettings(task="text-generation"))
    assert engine._token_ids("   ") == []
    for call in (engine.validate, engine.predict):
        with pytest.raises(RequestError) as caught:
            call(["fine", "   "], {"max_new_tokens": 2})
        assert caught.value.status == 422 and "input 1 encodes to no tokens" in caught.value.message
    app = create_app(str(stripping_gpt2), ServingSettings(task="text-generation"), engine_loader=lambda d, s: engine)
    with serve_in_thread(app) as url:
        refused = httpx.post(url + "/invocations", json={"inputs": "   "}, timeout=60)
        assert refused.status_code == 422 and "no tokens" in refused.json()["error"]
        assert httpx.post(url + "/invocations", json={"inputs": " fine ", "parameters": {"max_new_tokens": 2}}, timeout=60).status_code == 200


def test_a_tokenizer_without_vocabulary_refuses_to_load(tiny_gpt2: Path, tmp_path: Path) -> None:
    """config.json + weights only: transformers 5 makes an empty tokenizer that would encode every text to nothing."""
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2 / name, folder / name)
    with pytest.raises(ValueError, match="no vocabulary") as caught:
        load_engine(str(folder), ServingSettings(task="text-generation"))
    assert "tokenizer.json" in str(caught.value)


def test_llama_style_model_generates_and_streams(tiny_llama: Path) -> None:
    engine = load_engine(str(tiny_llama), ServingSettings(task="text-generation"))
    batched = engine.predict(PROMPTS[:3], {"max_new_tokens": 6})
    assert batched == [engine.predict([p], {"max_new_tokens": 6})[0] for p in PROMPTS[:3]]
    assert "".join(engine.stream(PROMPTS[0], {"max_new_tokens": 6})) == batched[0]["generated_text"]


# --- seq2seq -------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, key", [("text2text-generation", "generated_text"), ("summarization", "summary_text")])
def test_seq2seq_outputs(engines, task: str, key: str) -> None:
    engine = engines(task)
    outputs = engine.predict(PROMPTS[:2], {"max_new_tokens": 6})
    assert [set(o) for o in outputs] == [{key}, {key}]
    assert all(isinstance(o[key], str) for o in outputs)
    assert outputs == [engine.predict([p], {"max_new_tokens": 6})[0] for p in PROMPTS[:2]]
    predictions = engine.run(PROMPTS[:1], {"max_new_tokens": 6, "details": True})
    assert 0 < predictions[0].generated_tokens <= 6
    assert "".join(engine.stream(PROMPTS[0], {"max_new_tokens": 6})) == outputs[0][key]


# --- encoders ------------------------------------------------------------------------------------


def test_text_classification_ranks_every_label(engines) -> None:
    engine = engines("text-classification")
    outputs = engine.predict(PROMPTS[:2], {})
    for labels in outputs:
        assert {item["label"] for item in labels} == {"NEGATIVE", "POSITIVE"}
        scores = [item["score"] for item in labels]
        assert scores == sorted(scores, reverse=True)
        assert math.isclose(sum(scores), 1.0, rel_tol=1e-5)
    assert len(engine.predict(PROMPTS[:1], {"top_k": 1})[0]) == 1
    raw = engine.predict(PROMPTS[:1], {"function_to_apply": "none"})[0]
    assert not math.isclose(sum(item["score"] for item in raw), 1.0, rel_tol=1e-3)
    sig = engine.predict(PROMPTS[:1], {"function_to_apply": "sigmoid"})[0]
    assert all(0.0 < item["score"] < 1.0 for item in sig)
    alone = [engine.predict([p], {})[0] for p in PROMPTS[:2]]
    for batched, single in zip(outputs, alone):  # padding in the batch does not change the answer
        assert [a["label"] for a in batched] == [b["label"] for b in single]
        assert all(math.isclose(a["score"], b["score"], rel_tol=1e-4) for a, b in zip(batched, single))


def test_token_classification_entities(engines) -> None:
    engine = engines("token-classification")
    grouped = engine.predict([CONTEXT], {})[0]
    assert grouped and all(set(e) == {"entity_group", "score", "word", "start", "end"} for e in grouped)
    for entity in grouped:
        assert isinstance(entity["score"], float) and isinstance(entity["start"], int)
        assert CONTEXT[entity["start"] : entity["end"]].lower().replace(" ", "") == entity["word"].replace(" ", "")
    per_token = engine.predict([CONTEXT], {"aggregation_strategy": "none"})[0]
    assert all({"entity", "score", "index", "word", "start", "end"} <= set(e) for e in per_token)
    json.dumps(engine.predict([CONTEXT, "hello"], {"aggregation_strategy": "first"}))


def test_question_answering_span(engines) -> None:
    engine = engines("question-answering")
    items = [{"question": "What is the capital of France?", "context": CONTEXT}, {"question": "Who?", "context": "Nobody knows 😀."}]
    for item, answer in zip(items, engine.predict(items, {})):
        assert set(answer) == {"answer", "score", "start", "end"}
        assert answer["answer"] == item["context"][answer["start"] : answer["end"]]
        assert 0.0 <= answer["score"] <= 1.0
    short = engine.predict(items[:1], {"max_answer_len": 1})[0]
    assert len(short["answer"].split()) <= 1


def test_question_answering_rejects_long_contexts(engines) -> None:
    engine = engines("question-answering")
    with pytest.raises(RequestError) as caught:
        engine.validate([{"question": "q", "context": "word " * 500}], {})
    assert caught.value.status == 422


def test_feature_extraction_vectors(engines) -> None:
    engine = engines("feature-extraction")
    vectors = engine.predict(PROMPTS[:2], {})
    assert [len(v) for v in vectors] == [32, 32] and all(isinstance(x, float) for x in vectors[0])
    unit = engine.predict(PROMPTS[:1], {"normalize": True})[0]
    assert math.isclose(math.sqrt(sum(x * x for x in unit)), 1.0, rel_tol=1e-4)
    cls = engine.predict(PROMPTS[:1], {"pooling": "cls"})[0]
    assert len(cls) == 32 and cls != vectors[0]
    tokens = engine.predict(PROMPTS[:2], {"pooling": "none"})
    lengths = [len(engine.tokenizer(p)["input_ids"]) for p in PROMPTS[:2]]
    assert [len(t) for t in tokens] == lengths and len(tokens[0][0]) == 32
    alone = engine.predict(PROMPTS[1:2], {})[0]
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(vectors[1], alone))  # padding does not leak in


def test_encoder_input_limit_is_the_position_limit(engines) -> None:
    engine = engines("text-classification")
    assert engine.max_input_tokens == 128
    with pytest.raises(RequestError):
        engine.validate(["word " * 300], {})


# --- placement ------------------------------------------------------------------------------------


def test_placement_and_dtype_on_cpu() -> None:
    import torch

    device, device_map = resolve_placement("auto")
    if not torch.cuda.is_available():
        assert device.type == "cpu" and device_map is None
        assert resolve_dtype("auto", device) is torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("float13", torch.device("cpu"))


def test_loads_in_the_requested_dtype(task_models: dict[str, Path]) -> None:
    import torch

    engine = load_engine(str(task_models["text-classification"]), ServingSettings(task="text-classification", dtype="bfloat16"))
    assert next(engine.model.parameters()).dtype is torch.bfloat16
    assert len(engine.predict(["hello"], {})[0]) == 2
