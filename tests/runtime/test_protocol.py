"""Request parsing and validation: both body forms in, RequestError (never a crash) for every mistake."""

from __future__ import annotations

import json

import pytest

from cloudllm_runtime.protocol import (
    InferenceRequest,
    RequestError,
    batch_key,
    decode_body,
    format_response,
    normalize_task,
    parse_request,
    validate_parameters,
)
from cloudllm_runtime.settings import ServingSettings

GEN = ServingSettings(task="text-generation", max_new_tokens=100, max_body_bytes=10_000)


def parse(body, task: str = "text-generation", **kwargs):
    settings = ServingSettings(task=task, max_new_tokens=100, max_body_bytes=10_000)
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return parse_request(raw, settings, **kwargs)


def error_of(body, task: str = "text-generation", **kwargs) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(body, task, **kwargs)
    return caught.value


# --- body forms ------------------------------------------------------------------------------


def test_tgi_form_single_string() -> None:
    req = parse({"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert req == InferenceRequest(inputs=["Hello"], parameters={"max_new_tokens": 5}, stream=False, form="hf", single=True)


def test_tgi_form_list_and_stream() -> None:
    assert parse({"inputs": ["a", "b"]}).inputs == ["a", "b"]
    assert parse({"inputs": ["a", "b"]}).single is False
    assert parse({"inputs": "a", "stream": True}).stream is True


def test_vertex_form_instances() -> None:
    req = parse({"instances": ["a", {"inputs": "b"}, {"prompt": "c"}, {"text": "d"}], "parameters": {"top_k": 3}})
    assert req.form == "vertex" and req.inputs == ["a", "b", "c", "d"] and req.parameters == {"top_k": 3}
    assert req.single is False


def test_question_answering_forms() -> None:
    qa = {"question": "Who?", "context": "Me."}
    assert parse({"inputs": qa}, "question-answering").inputs == [qa]
    assert parse(qa, "question-answering").inputs == [qa]
    assert parse({"inputs": [qa, qa]}, "question-answering").inputs == [qa, qa]
    assert parse({"instances": [qa, {"inputs": qa}]}, "question-answering").inputs == [qa, qa]
    assert error_of({"inputs": "just a string"}, "question-answering").status == 422
    assert error_of({"inputs": {"question": "Who?"}}, "question-answering").status == 422
    assert error_of({"inputs": {"question": "Who?", "context": "Me.", "extra": 1}}, "question-answering").status == 422


def test_plain_text_body_is_one_input() -> None:
    req = parse("Tell me a story", content_type="text/plain; charset=utf-8")
    assert req.inputs == ["Tell me a story"] and req.single


def test_null_parameters_mean_unset() -> None:
    req = parse({"inputs": "a", "parameters": {"max_new_tokens": None, "temperature": None, "stop": ["x"]}})
    assert req.parameters == {"stop": ["x"]}
    assert parse({"inputs": "a", "parameters": None, "stream": None}).parameters == {}


def test_stop_sequences_alias_and_single_string() -> None:
    assert parse({"inputs": "a", "parameters": {"stop_sequences": ["\n"]}}).parameters == {"stop": ["\n"]}
    assert parse({"inputs": "a", "parameters": {"stop": "END"}}).parameters == {"stop": ["END"]}


# --- malformed bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{not json", b"", b"   ", b'{"inputs": "a"', b"\xff\xfe{}", b'{"inputs": NaN}', b"[" * 100_000])
def test_malformed_body_is_400(raw: bytes) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(raw, ServingSettings(task="text-generation", max_body_bytes=1_000_000))
    assert caught.value.status == 400
    assert caught.value.to_dict()["error_type"] == "bad_request"


def test_body_over_limit_is_413() -> None:
    err = error_of(json.dumps({"inputs": "x" * 20_000}))
    assert err.status == 413 and err.error_type == "payload_too_large"
    with pytest.raises(RequestError) as caught:
        decode_body(b"{}" * 10, max_bytes=5)
    assert caught.value.status == 413


@pytest.mark.parametrize(
    "body, fragment",
    [
        ([1, 2], "JSON object"),
        ("just a string", "JSON object"),
        ({}, "inputs"),
        ({"parameters": {}}, "inputs"),
        ({"inputs": 42}, "string"),
        ({"inputs": None}, "string"),
        ({"inputs": ["ok", 3]}, "inputs[1]"),
        ({"inputs": []}, "empty"),
        ({"inputs": ""}, "empty"),
        ({"inputs": ["a", ""]}, "empty"),
        ({"inputs": "a", "parameters": [1]}, "object"),
        ({"inputs": "a", "stream": "yes"}, "stream"),
        ({"inputs": "a", "extra": 1}, "extra"),
        ({"instances": "a"}, "list"),
        ({"instances": []}, "empty"),
        ({"instances": [{"foo": "a"}]}, "instances[0]"),
        ({"instances": [{"inputs": "a", "foo": 1}]}, "foo"),
        ({"instances": ["a"], "inputs": "b"}, "inputs"),
    ],
)
def test_invalid_bodies_are_422(body, fragment: str) -> None:
    raw = json.dumps(body)
    err = error_of(raw)
    assert err.status == 422, err
    assert err.error_type == "validation"
    assert fragment.lower() in err.message.lower(), err.message


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameters",
    [
        {"max_new_tokens": 1, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "do_sample": True},
        {"max_new_tokens": 100, "temperature": 100, "top_p": 0.01, "top_k": 50, "repetition_penalty": 1.2},
        {"stop": ["a", "b", "c", "d"], "seed": 0, "return_full_text": True, "details": True},
    ],
)
def test_valid_generation_parameters(parameters: dict) -> None:
    assert validate_parameters(parameters, "text-generation", GEN) == {
        k: (float(v) if k in ("temperature", "top_p", "repetition_penalty") else v) for k, v in parameters.items()
    }


@pytest.mark.parametrize(
    "parameters, fragment",
    [
        ({"max_new_tokens": 101}, "at most 100"),
        ({"max_new_tokens": 0}, "at least 1"),
        ({"max_new_tokens": "10"}, "integer"),
        ({"max_new_tokens": 10.0}, "integer"),
        ({"max_new_tokens": True}, "integer"),
        ({"temperature": 0}, "greater than 0"),
        ({"temperature": -1.0}, "greater than 0"),
        ({"temperature": 100.5}, "at most 100"),
        ({"temperature": "hot"}, "number"),
        ({"top_p": 0}, "greater than 0"),
        ({"top_p": 1.5}, "at most 1"),
        ({"top_k": -1}, "at least 0"),
        ({"do_sample": 1}, "true or false"),
        ({"do_sample": "true"}, "true or false"),
        ({"repetition_penalty": 0}, "at least 1e-06"),
        ({"stop": [1]}, "list of strings"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "empty"),
        ({"seed": -1}, "at least 0"),
        ({"return_full_text": "no"}, "true or false"),
        ({"details": 1}, "true or false"),
        ({"max_tokens": 5}, "unknown parameter \"max_tokens\""),
        ({"aggregation_strategy": "simple"}, "unknown parameter \"aggregation_strategy\""),
        ({"stop": ["a"], "stop_sequences": ["b"]}, "twice"),
    ],
)
def test_invalid_generation_parameters_are_422(parameters: dict, fragment: str) -> None:
    err = error_of({"inputs": "a", "parameters": parameters})
    assert err.status == 422, err
    assert fragment in err.message, err.message


def test_overflowing_number_is_422() -> None:
    err = error_of('{"inputs": "a", "parameters": {"temperature": 1e999}}')
    assert err.status == 422 and "finite" in err.message


def test_parameters_per_task() -> None:
    assert validate_parameters({"top_k": 2, "function_to_apply": "Sigmoid"}, "text-classification", GEN) == {
        "top_k": 2,
        "function_to_apply": "sigmoid",
    }
    assert validate_parameters({"aggregation_strategy": "first"}, "token-classification", GEN) == {"aggregation_strategy": "first"}
    assert validate_parameters({"normalize": True, "pooling": "cls"}, "feature-extraction", GEN) == {"normalize": True, "pooling": "cls"}
    assert validate_parameters({"max_answer_len": 30}, "question-answering", GEN) == {"max_answer_len": 30}
    assert "return_full_text" not in validate_parameters({"max_new_tokens": 3}, "summarization", GEN)
    for task, parameters in [
        ("text-classification", {"top_k": 0}),
        ("text-classification", {"function_to_apply": "relu"}),
        ("token-classification", {"aggregation_strategy": "smart"}),
        ("feature-extraction", {"pooling": "max"}),
        ("feature-extraction", {"normalize": "yes"}),
        ("feature-extraction", {"max_new_tokens": 3}),
        ("summarization", {"return_full_text": True}),
    ]:
        with pytest.raises(RequestError) as caught:
            validate_parameters(parameters, task, GEN)
        assert caught.value.status == 422, (task, parameters)


def test_stream_only_for_one_generation_input() -> None:
    assert error_of({"inputs": "a", "stream": True}, "text-classification").status == 422
    assert error_of({"inputs": ["a", "b"], "stream": True}).status == 422


# --- unicode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["emoji 😀👍🏽", "مرحبا بالعالم", "שלום", "nul\x00char", "mixed \u202e rtl override", "\u00e9\u0301"])
def test_unicode_inputs_pass_through(text: str) -> None:
    assert parse({"inputs": text}).inputs == [text]


def test_lone_surrogates_become_replacement_characters() -> None:
    req = parse('{"inputs": "a\\ud800b\\udfff", "parameters": {"stop": ["\\udc00"]}}')
    assert req.inputs == ["a\ufffdb\ufffd"]
    assert req.parameters["stop"] == ["\ufffd"]
    req.inputs[0].encode("utf-8")  # now encodable
    assert parse('{"inputs": "\\ud83d\\ude00"}').inputs == ["😀"]  # a proper pair stays an emoji


# --- helpers -----------------------------------------------------------------------------------


def test_batch_key_groups_equal_parameters_and_isolates_seeds() -> None:
    assert batch_key({"a": 1, "b": [1]}) == batch_key({"b": [1], "a": 1})
    assert batch_key({"max_new_tokens": 3}) != batch_key({"max_new_tokens": 4})
    assert batch_key({"seed": 1}) is None
    assert batch_key({"repetition_penalty": 1.3}) is None  # it would also penalize a neighbour's padding
    assert batch_key({"repetition_penalty": 1.0}) is not None


def test_normalize_task_aliases() -> None:
    assert normalize_task("sentiment-analysis") == "text-classification"
    assert normalize_task("ner") == "token-classification"
    assert normalize_task("translation_en_to_fr") == "translation"
    with pytest.raises(ValueError):
        normalize_task("image-classification")


def test_response_shapes() -> None:
    gen = [{"generated_text": "x"}]
    single = InferenceRequest(inputs=["a"], single=True)
    many = InferenceRequest(inputs=["a", "b"], single=False)
    vertex = InferenceRequest(inputs=["a"], form="vertex", single=False)
    assert format_response(single, gen, "text-generation") == [{"generated_text": "x"}]
    assert format_response(many, gen * 2, "text-generation") == [{"generated_text": "x"}] * 2
    assert format_response(single, gen, "text-generation", style="pipeline") == [{"generated_text": "x"}]
    assert format_response(many, gen * 2, "text-generation", style="pipeline") == [[{"generated_text": "x"}]] * 2
    assert format_response(vertex, gen, "text-generation", deployed_model_id="42") == {"predictions": gen, "deployedModelId": "42"}
    assert format_response(vertex, gen, "text-generation") == {"predictions": gen}
    labels = [[{"label": "A", "score": 0.9}]]
    assert format_response(single, labels, "text-classification") == labels[0]
    assert format_response(many, labels * 2, "text-classification") == labels * 2
    assert format_response(single, [{"summary_text": "s"}], "summarization") == [{"summary_text": "s"}]


def test_request_error_body() -> None:
    err = RequestError(422, "bad thing")
    assert err.to_dict() == {"error": "bad thing", "error_type": "validation"}
    assert RequestError(429, "busy").to_dict()["error_type"] == "overloaded"
