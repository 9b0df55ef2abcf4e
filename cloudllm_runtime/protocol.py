"""Request bodies in, normalized requests out; predictions in, response bodies out.

Two body forms arrive at the same routes and are told apart by their keys:

- the TGI / Hugging Face form ``{"inputs": str | [str], "parameters": {...}, "stream": bool}``
  (what SageMaker's ``/invocations`` and the HF inference toolkit speak), and
- the Vertex AI form ``{"instances": [...], "parameters": {...}}``, answered as
  ``{"predictions": [...]}``.

Everything a client can get wrong is reported as a :class:`RequestError` (a 4xx with a
JSON body ``{"error": ..., "error_type": ...}``), never as a crash. Stdlib only: the
Hugging Face toolkit path imports this module without starlette or torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# The task names the runtime serves, and the spellings transformers' pipelines also accept.
GENERATION_TASKS = ("text-generation", "text2text-generation", "summarization", "translation")
TASKS = GENERATION_TASKS + (
    "text-classification",
    "token-classification",
    "question-answering",
    "feature-extraction",
)
TASK_ALIASES = {
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
    "sentence-similarity": "feature-extraction",
    "sentence-embeddings": "feature-extraction",
}

# Each generation task answers with one text field per input (the HF pipelines' names).
OUTPUT_KEYS = {
    "text-generation": "generated_text",
    "text2text-generation": "generated_text",
    "summarization": "summary_text",
    "translation": "translation_text",
}

MAX_STOP_SEQUENCES = 4
AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")
CLASSIFICATION_FUNCTIONS = ("softmax", "sigmoid", "none")
POOLING_MODES = ("mean", "cls", "none")


class RequestError(Exception):
    """A request the server will not run: the client's mistake or a limit (4xx), or not ready (503)."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _DEFAULT_ERROR_TYPES.get(status, "bad_request")

    def to_dict(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def __str__(self) -> str:
        return f"{self.status} {self.error_type}: {self.message}"


_DEFAULT_ERROR_TYPES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation",
    429: "overloaded",
    503: "unavailable",
}


def validation_error(message: str) -> RequestError:
    return RequestError(422, message, "validation")


@dataclass(frozen=True)
class InferenceRequest:
    """A validated request, the same whichever body form it came in.

    inputs: one entry per input: a string, or ``{"question", "context"}`` for question answering.
    parameters: only the parameters the client set (nulls dropped), checked and normalized.
    form: "hf" for the inputs/TGI form, "vertex" for instances/predictions.
    single: the client sent one input rather than a list, which shapes the response.
    """

    inputs: list[Any]
    parameters: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    form: str = "hf"
    single: bool = True


def normalize_task(task: str) -> str:
    """The runtime's name for task (accepts the pipeline aliases and ``translation_xx_to_yy``)."""
    task = TASK_ALIASES.get(task, task)
    if task.startswith("translation"):
        return "translation"
    if task not in TASKS:
        raise ValueError(f"the serving runtime does not serve task {task!r}; it serves: {', '.join(TASKS)}")
    return task


# --- bodies -------------------------------------------------------------------------------


def decode_body(body: bytes | str, max_bytes: int | None = None) -> Any:
    """Parse a JSON body: 413 when over max_bytes, 400 when it is not UTF-8 JSON."""
    if max_bytes is not None and len(body) > max_bytes:
        raise RequestError(413, f"the request body is {len(body)} bytes; the limit is {max_bytes}")
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    else:
        text = body
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise RequestError(400, "the request body is empty; send JSON such as {\"inputs\": \"Hello\"}")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RequestError:
        raise
    except ValueError as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "the request body is not valid JSON: nested too deeply") from None


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which no JSON client should send and no parameter accepts.
    raise RequestError(400, f"the request body is not valid JSON: {name} is not a JSON value")


def parse_request(
    body: bytes | str | Mapping[str, Any],
    settings: Any,
    *,
    task: str | None = None,
    content_type: str | None = None,
) -> InferenceRequest:
    """Validate a request body (raw bytes or already-parsed JSON) for settings.task.

    A ``text/plain`` body is taken as one input string, so a bare prompt works too.
    """
    task = normalize_task(task or settings.task)
    data = body if isinstance(body, Mapping) else decode_payload(body, content_type, settings.max_body_bytes)
    if not isinstance(data, Mapping):
        raise validation_error(
            f"the request body must be a JSON object such as {{\"inputs\": ...}} or {{\"instances\": [...]}}, not {_json_type(data)}"
        )
    if "instances" in data:
        return _parse_vertex(data, task, settings)
    return _parse_hf(data, task, settings)


def decode_payload(body: bytes | str, content_type: str | None, max_bytes: int | None = None) -> Any:
    """The body as JSON data; a ``text/plain`` body becomes ``{"inputs": <the text>}``. 400/413 on failure."""
    if _media_type(content_type) == "text/plain":
        return {"inputs": _plain_text(body, max_bytes)}
    return decode_body(body, max_bytes)


def _plain_text(body: bytes | str, max_bytes: int | None) -> str:
    if max_bytes is not None and len(body) > max_bytes:
        raise RequestError(413, f"the request body is {len(body)} bytes; the limit is {max_bytes}")
    if isinstance(body, str):
        return body
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _parse_hf(data: Mapping[str, Any], task: str, settings: Any) -> InferenceRequest:
    allowed = {"inputs", "parameters", "stream"}
    if task == "question-answering":
        allowed |= {"question", "context"}
    _reject_unknown(data, allowed, "body field")
    if "inputs" in data:
        raw = data["inputs"]
    elif task == "question-answering" and ("question" in data or "context" in data):
        raw = {"question": data.get("question"), "context": data.get("context")}
    else:
        raise validation_error("the request body has no \"inputs\" (or \"instances\") field")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise validation_error(f"\"stream\" must be true or false, not {_json_type(stream)}")
    single = not isinstance(raw, list)
    items = [raw] if single else list(raw)
    if not items:
        raise validation_error("\"inputs\" is an empty list; send at least one input")
    _check_count(len(items), settings, "inputs")
    inputs = [_check_input(item, task, f"inputs[{i}]" if not single else "inputs") for i, item in enumerate(items)]
    parameters = validate_parameters(data.get("parameters"), task, settings)
    if stream:
        _check_streamable(task, inputs)
    return InferenceRequest(inputs=inputs, parameters=parameters, stream=stream, form="hf", single=single)


def _check_count(count: int, settings: Any, field: str) -> None:
    limit = getattr(settings, "max_inputs_per_request", None)
    if limit and count > limit:
        raise validation_error(f"\"{field}\" has {count} entries; this server takes at most {limit} per request (split the list)")


def _parse_vertex(data: Mapping[str, Any], task: str, settings: Any) -> InferenceRequest:
    _reject_unknown(data, {"instances", "parameters"}, "body field")
    instances = data["instances"]
    if not isinstance(instances, list):
        raise validation_error(f"\"instances\" must be a list, not {_json_type(instances)}")
    if not instances:
        raise validation_error("\"instances\" is an empty list; send at least one instance")
    _check_count(len(instances), settings, "instances")
    inputs = [_vertex_instance(instance, task, i) for i, instance in enumerate(instances)]
    parameters = validate_parameters(data.get("parameters"), task, settings)
    return InferenceRequest(inputs=inputs, parameters=parameters, stream=False, form="vertex", single=False)


def _vertex_instance(instance: Any, task: str, index: int) -> Any:
    where = f"instances[{index}]"
    if isinstance(instance, Mapping):
        if task == "question-answering" and "inputs" not in instance:
            return _check_input(instance, task, where)
        keys = [k for k in ("inputs", "prompt", "text") if k in instance]
        if len(keys) != 1:
            raise validation_error(f"{where} must be a string or an object with one of \"inputs\", \"prompt\" or \"text\"")
        _reject_unknown(instance, {keys[0]}, f"field of {where}")
        return _check_input(instance[keys[0]], task, f"{where}.{keys[0]}")
    return _check_input(instance, task, where)


def _check_input(item: Any, task: str, where: str) -> Any:
    if task == "question-answering":
        if not isinstance(item, Mapping):
            raise validation_error(f"{where} must be an object {{\"question\": ..., \"context\": ...}} for question-answering")
        _reject_unknown(item, {"question", "context"}, f"field of {where}")
        return {key: _check_text(item.get(key), f"{where}.{key}") for key in ("question", "context")}
    return _check_text(item, where)


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise validation_error(f"{where} must be a string, not {_json_type(value)}")
    if value == "":
        raise validation_error(f"{where} is an empty string; send some text")
    return _scrub_surrogates(value)


def _scrub_surrogates(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"): valid escapes, but no UTF-8 encoding exists
    # for them, so tokenizers and the response encoder would fail. U+FFFD is what browsers do.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


def _check_streamable(task: str, inputs: list[Any]) -> None:
    if task not in GENERATION_TASKS:
        raise validation_error(f"streaming is only available for text generation; this model serves {task}")
    if len(inputs) != 1:
        raise validation_error(f"streaming takes one input, got {len(inputs)}")


# --- parameters -----------------------------------------------------------------------------


Check = Callable[[str, Any, Any], Any]


def _number(
    *, integer: bool = False, gt: float | None = None, ge: float | None = None, le: Callable[[Any], float] | float | None = None
) -> Check:
    """A numeric parameter check; le may be a function of the settings (max_new_tokens' cap)."""
    kind = "an integer" if integer else "a number"

    def check(name: str, value: Any, settings: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise validation_error(f"parameter \"{name}\" must be {kind}, not {_json_type(value)}")
        if not integer:
            value = float(value)
            if not math.isfinite(value):
                raise validation_error(f"parameter \"{name}\" must be a finite number")
        upper = le(settings) if callable(le) else le
        if gt is not None and not value > gt:
            raise validation_error(f"parameter \"{name}\" must be greater than {_show(gt)}, got {_show(value)}")
        if ge is not None and value < ge:
            raise validation_error(f"parameter \"{name}\" must be at least {_show(ge)}, got {_show(value)}")
        if upper is not None and value > upper:
            raise validation_error(f"parameter \"{name}\" must be at most {_show(upper)}, got {_show(value)}")
        return value

    return check


def _show(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def _bool(name: str, value: Any, settings: Any) -> bool:
    if not isinstance(value, bool):
        raise validation_error(f"parameter \"{name}\" must be true or false, not {_json_type(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Check:
    def check(name: str, value: Any, settings: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise validation_error(f"parameter \"{name}\" must be one of {', '.join(options)}; got {json.dumps(value)}")
        return value.lower()

    return check


def _stop(name: str, value: Any, settings: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise validation_error(f"parameter \"{name}\" must be a list of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise validation_error(f"parameter \"{name}\" takes at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}")
    if any(s == "" for s in value):
        raise validation_error(f"parameter \"{name}\" contains an empty string")
    return [_scrub_surrogates(s) for s in value]


def _adapter_id(name: str, value: Any, settings: Any) -> str:
    from .adapters import check_name

    return check_name(value)


_GENERATION_PARAMETERS: dict[str, Check] = {
    "max_new_tokens": _number(integer=True, ge=1, le=lambda s: s.max_new_tokens),
    "temperature": _number(gt=0.0, le=100.0),
    "top_p": _number(gt=0.0, le=1.0),
    "top_k": _number(integer=True, ge=0),
    "do_sample": _bool,
    # Smaller penalties divide a logit past float32's range: NaN probabilities (a CUDA assert on a GPU).
    "repetition_penalty": _number(ge=1e-6),
    "stop": _stop,
    "seed": _number(integer=True, ge=0, le=2**63 - 1),
    "details": _bool,
    "adapter_id": _adapter_id,  # TGI's name: the LoRA adapter to answer with
}

PARAMETERS: dict[str, dict[str, Check]] = {
    "text-generation": {**_GENERATION_PARAMETERS, "return_full_text": _bool},
    "text2text-generation": _GENERATION_PARAMETERS,
    "summarization": _GENERATION_PARAMETERS,
    "translation": _GENERATION_PARAMETERS,
    "text-classification": {"top_k": _number(integer=True, ge=1), "function_to_apply": _choice(CLASSIFICATION_FUNCTIONS)},
    "token-classification": {"aggregation_strategy": _choice(AGGREGATION_STRATEGIES)},
    "question-answering": {"max_answer_len": _number(integer=True, ge=1, le=512)},
    "feature-extraction": {"normalize": _bool, "pooling": _choice(POOLING_MODES)},
}

# Names other clients use for the same thing (huggingface_hub and older TGI clients).
PARAMETER_ALIASES = {"stop_sequences": "stop"}


def validate_parameters(parameters: Any, task: str, settings: Any) -> dict[str, Any]:
    """Check parameters for task; returns only the ones set (nulls mean "not set"), normalized."""
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise validation_error(f"\"parameters\" must be an object, not {_json_type(parameters)}")
    checks = PARAMETERS[normalize_task(task)]
    out: dict[str, Any] = {}
    for raw_name, value in parameters.items():
        name = PARAMETER_ALIASES.get(raw_name, raw_name) if raw_name not in checks else raw_name
        if name not in checks:
            known = ", ".join(sorted(checks))
            raise validation_error(f"unknown parameter {quote_name(raw_name)} for {task}; accepted: {known}")
        if value is None:
            continue
        if name in out:
            raise validation_error(f"parameter \"{name}\" is given twice (as {quote_name(raw_name)} too)")
        out[name] = checks[name](raw_name, value, settings)
    return out


def batch_key(parameters: Mapping[str, Any]) -> str | None:
    """Requests with equal keys can share one model call; None means "run alone".

    A seeded request runs alone so its sampled output depends only on its own prompt
    and seed, not on which other requests happened to share its batch. So does one with a
    repetition penalty: transformers penalizes every token in a row, the left padding a
    longer neighbour forces on it included.
    """
    if "seed" in parameters or parameters.get("repetition_penalty", 1.0) != 1.0:
        return None
    return json.dumps(parameters, sort_keys=True, separators=(",", ":"))


# --- responses ------------------------------------------------------------------------------


def format_response(
    request: InferenceRequest,
    outputs: list[Any],
    task: str,
    *,
    style: str = "tgi",
    deployed_model_id: str | None = None,
) -> Any:
    """The response body for outputs (one per request input).

    style "tgi" (the HTTP server): generation tasks always answer a list of
    ``{"generated_text": ...}`` (one per input, like TGI on SageMaker); other tasks answer
    the output itself for a single input and a list for a list.
    style "pipeline" (the HF toolkit hooks): like a transformers pipeline, where each
    text-generation input answers ``[{"generated_text": ...}]``.
    The Vertex form always answers ``{"predictions": [...]}``.
    """
    task = normalize_task(task)
    if request.form == "vertex":
        body: dict[str, Any] = {"predictions": list(outputs)}
        if deployed_model_id:
            body["deployedModelId"] = deployed_model_id
        return body
    if style == "pipeline" and task == "text-generation":
        outputs = [[out] for out in outputs]
        return outputs[0] if request.single else outputs
    if task in GENERATION_TASKS:
        return list(outputs)
    return outputs[0] if request.single else list(outputs)


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, str]:
    return RequestError(status, message, error_type).to_dict()


def _reject_unknown(data: Mapping[str, Any], allowed: set[str], what: str) -> None:
    for key in data:
        if key not in allowed:
            raise validation_error(f"unknown {what} {quote_name(key)}; accepted: {', '.join(sorted(allowed))}")


def quote_name(name: str, limit: int = 64) -> str:
    """A client's field name for a message: quoted, control characters and lone surrogates escaped, cut short."""
    shown = json.dumps(name[:limit])
    return shown if len(name) <= limit else shown[:-1] + '..."'


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
