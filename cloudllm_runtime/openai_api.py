"""OpenAI's wire format on the model server: chat completions, completions and the model list.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``. The same chat
request also arrives through the platforms' own routes, as the managed engines take it there:
SageMaker's ``/invocations`` with a body holding ``messages`` (TGI's Messages API, LMI's chat
schema) and Vertex AI's predict with ``{"instances": [{"@requestFormat": "chatCompletions",
"messages": [...], ...}]}`` (Model Garden's vLLM), answered as ``{"predictions": [completion, ...]}``.

``messages`` are rendered with the model's chat template: ``settings.chat_template`` (what
``--chat-template FILE`` sets), else ``chat_template.jinja`` / ``chat_template.json`` /
``tokenizer_config.json`` in the model folder, as transformers 4.4x and 5.x save it. A model
without one is refused for chat with the way to give one; /v1/completions needs none.

Sampling follows OpenAI, not TGI: a request samples at temperature 1 unless it sets
``temperature: 0`` (greedy). Parameters the engine cannot honour (logprobs, tools, penalties
other than 0) are refused with a 400 naming them, never dropped. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``; the client's mistakes are 400 (413, 429, 503
keep their status), never a 5xx.

The parsing, rendering and answer bodies need only the stdlib and the engine, so the HF inference
toolkit's hooks (toolkit.py) answer a chat body too; the routes import starlette when they run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Mapping

from .engine import Engine, Prediction, Token
from .log import log_event
from .protocol import (
    GENERATION_TASKS,
    OUTPUT_KEYS,
    PARAMETERS,
    RequestError,
    _json_type,
    _number,
    _stop,
    decode_body,
    validation_error,
)

if TYPE_CHECKING:  # the HF toolkit's container has no starlette: the HTTP pieces import it when they run
    from starlette.requests import Request
    from starlette.responses import Response

ServerState = Any  # app.ServerState, which is not imported: app imports this module

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
VERTEX_CHAT_FORMAT = "chatCompletions"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
NO_TEMPLATE_FIX = (
    "give one: `cloudllm serve/deploy --chat-template FILE` (a Jinja file as in tokenizer_config.json's "
    "\"chat_template\"), or send a plain prompt to /v1/completions"
)

# OpenAI fields taken as sent but with nothing to do on one model behind one endpoint.
_IGNORED = {"model", "user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls"}
# OpenAI fields the engine cannot honour unless they ask for the default.
_DEFAULTS_ONLY = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "best_of": (1,),
    "suffix": ("",),
    "modalities": (["text"],),
}
SAMPLING_FIELDS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "top_k", "repetition_penalty"}
CHAT_FIELDS = _IGNORED | set(_DEFAULTS_ONLY) | SAMPLING_FIELDS | {"messages", "response_format"}
COMPLETION_FIELDS = _IGNORED | set(_DEFAULTS_ONLY) | SAMPLING_FIELDS | {"prompt", "echo"}

_temperature = _number(ge=0.0, le=2.0)
_top_p = _number(gt=0.0, le=1.0)
_n = _number(integer=True, ge=1)


Endpoint = Callable[["Request"], Awaitable["Response"]]


def _http() -> Any:
    from . import http_io  # starlette: only where an HTTP route runs (the toolkit's container has none)

    return http_io


async def run_in_threadpool(function: Callable[..., Any], *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool as run

    return await run(function, *args)


def register(add: Callable[[str, Endpoint, list[str]], None], state: ServerState) -> set[str]:
    """Add the OpenAI routes through the app's add(path, endpoint, methods); returns the predict paths."""
    state.openai_created = int(time.time())  # type: ignore[attr-defined]
    add(CHAT_ROUTE, _openai_errors(functools.partial(_chat_route, state)), ["POST"])
    add(COMPLETIONS_ROUTE, _openai_errors(functools.partial(_completions_route, state)), ["POST"])
    add(MODELS_ROUTE, _openai_errors(functools.partial(_models_route, state)), ["GET"])
    return {CHAT_ROUTE, COMPLETIONS_ROUTE}


def is_chat_body(data: Any) -> bool:
    """A body for the platforms' predict routes that is a chat request (TGI/LMI or Vertex vLLM form)."""
    if not isinstance(data, Mapping):
        return False
    if "messages" in data and "inputs" not in data and "instances" not in data:
        return True
    instances = data.get("instances")
    return (
        isinstance(instances, list)
        and bool(instances)
        and all(isinstance(i, Mapping) and i.get("@requestFormat") == VERTEX_CHAT_FORMAT for i in instances)
    )


async def answer_platform_chat(state: ServerState, request: Request, data: Mapping[str, Any]) -> Response:
    """A chat request that came through /invocations or Vertex predict: the same answer as /v1/chat/completions."""
    try:
        if "instances" not in data:
            return await _chat(state, request, data)
        extra = sorted(set(data) - {"instances", "parameters", "stream"})
        if extra:
            raise validation_error(f"unknown body field \"{extra[0]}\" beside chatCompletions instances")
        instances = [{k: v for k, v in i.items() if k != "@requestFormat"} for i in data["instances"]]
        if data.get("stream") is True and len(instances) == 1:  # streamRawPredict callers may mark the body, not the instance
            instances[0]["stream"] = True
        if len(instances) == 1 and instances[0].get("stream"):
            return await _chat(state, request, instances[0])  # streamRawPredict passes the events through
        if any(i.get("stream") for i in instances):
            raise validation_error("streaming takes one chatCompletions instance")
        answers = await asyncio.gather(*(_chat(state, request, i, as_dict=True) for i in instances))
        body: dict[str, Any] = {"predictions": list(answers)}
        if state.deployed_model_id:
            body["deployedModelId"] = state.deployed_model_id
        return _http()._json(body)
    except RequestError as exc:
        return _error_response(request, exc)


# --- routes -------------------------------------------------------------------------------------


def _openai_errors(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The app's guard, in OpenAI's error shape: 4xx for the client's mistakes, a logged 500 for bugs."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RequestError as exc:
            return _error_response(request, exc)
        except Exception as exc:
            info = _http()._note(request, error=f"{type(exc).__name__}: {exc}")
            log_event("internal_error", level="error", request_id=info.get("request_id"), error=info["error"],
                      traceback=traceback.format_exc())  # fmt: skip
            message = f"internal server error ({type(exc).__name__}); see the server log for request {info.get('request_id')}"
            return _http()._json(error_body(500, message), 500)

    return guarded


async def _chat_route(state: ServerState, request: Request) -> Response:
    data = await _read_json(state, request)
    return await _chat(state, request, data)


async def _completions_route(state: ServerState, request: Request) -> Response:
    engine = _generation_engine(state)
    data = await _read_json(state, request)
    _check_fields(data, COMPLETION_FIELDS)
    prompts = _prompts(data.get("prompt"))
    parameters, n, stream = sampling_parameters(data, state.settings)
    served = select_adapter(state, engine, data, parameters)
    if data.get("echo") not in (None, False, True):
        raise validation_error(f"\"echo\" must be true or false, not {_json_type(data['echo'])}")
    echo = bool(data.get("echo"))
    for prompt in prompts:
        await run_in_threadpool(engine.validate, [prompt], parameters)
    _http()._note(request, inputs=len(prompts) * n)
    _log_payload(state, request, prompts, parameters)
    completion = Completion("cmpl", "text_completion", served)
    if stream:
        if len(prompts) * n != 1:
            raise validation_error("streaming takes one prompt and n = 1")
        prefix = prompts[0] if echo else ""
        return _sse_response(_stream_completion(state, request, engine, prompts[0], parameters, completion, prefix, _usage_wanted(data)))
    predictions = await _run(state, request, [p for p in prompts for _ in range(n)], parameters)
    choices = []
    for index, prediction in enumerate(predictions):
        text, reason = text_and_reason(state, prediction, parameters)
        prompt = prompts[index // n]
        choices.append({"index": index, "text": (prompt + text) if echo else text, "logprobs": None, "finish_reason": reason})
    prompt_tokens = sum([await run_in_threadpool(_prompt_tokens, engine, p) for p in prompts])
    return _http()._json(completion.body(choices, _usage(prompt_tokens, predictions)))


async def _models_route(state: ServerState, request: Request) -> Response:
    """The base model, then each LoRA adapter (its id is what a request's "model" names to use it)."""
    base = model_id(state)
    entries = [{"id": base, "object": "model", "created": state.openai_created, "owned_by": "cloudllm"}]  # type: ignore[attr-defined]
    adapters = state.engine.adapters if state.engine is not None else None
    for name in adapters.names if adapters is not None else []:
        entries.append({"id": name, "object": "model", "created": state.openai_created, "owned_by": "cloudllm", "parent": base, "root": base})  # type: ignore[attr-defined]
    return _http()._json({"object": "list", "data": entries})


def select_adapter(state: ServerState, engine: Engine, data: Mapping[str, Any], parameters: dict[str, Any]) -> str:
    """OpenAI's "model" picks a LoRA adapter (parameters["adapter_id"]); the base's own id is the base.
    Returns the id the answer names. A server without adapters takes any "model", as it always did."""
    base, wanted = model_id(state), data.get("model")
    if engine.adapters is None or wanted is None or wanted == base:
        return base
    if not isinstance(wanted, str) or wanted not in engine.adapters.names:
        has = ", ".join([base, *engine.adapters.names])
        raise RequestError(404, f"the model {json.dumps(wanted)[:80]} does not exist; this server has: {has}", "model_not_found")
    parameters["adapter_id"] = wanted
    return wanted


# --- chat ---------------------------------------------------------------------------------------


async def _chat(state: ServerState, request: Request, data: Any, *, as_dict: bool = False) -> Any:
    """One chat request: a Response, or (as_dict) the completion body for a Vertex prediction."""
    engine = _generation_engine(state)
    chat = await run_in_threadpool(parse_chat, engine, data)
    served = select_adapter(state, engine, data, chat.parameters)
    _http()._note(request, inputs=chat.n)
    _log_payload(state, request, chat.messages, chat.parameters)
    completion = Completion("chatcmpl", "chat.completion", served)
    if chat.stream:
        if as_dict:
            raise validation_error("streaming takes one chatCompletions instance")
        return _sse_response(_stream_chat(state, request, engine, chat.prompt, chat.parameters, completion, _usage_wanted(data)))
    predictions = await _run(state, request, [chat.prompt] * chat.n, chat.parameters)
    body = await run_in_threadpool(chat_answer, engine, completion, chat, predictions)
    return body if as_dict else _http()._json(body)


class ChatRequest:
    """A checked chat request: the messages, the prompt they render to, the engine's parameters, n and stream."""

    def __init__(self, messages: list[dict[str, str]], prompt: str, parameters: dict[str, Any], n: int, stream: bool) -> None:
        self.messages, self.prompt, self.parameters, self.n, self.stream = messages, prompt, parameters, n, stream


def parse_chat(engine: Engine, data: Any) -> ChatRequest:
    """Check an OpenAI chat body, render its messages and check the prompt fits (RequestError otherwise)."""
    if not isinstance(data, Mapping):
        raise validation_error(f"the request body must be a JSON object with \"messages\", not {_json_type(data)}")
    _check_fields(data, CHAT_FIELDS)
    _check_response_format(data.get("response_format"))
    messages = _messages(data.get("messages"))
    parameters, n, stream = sampling_parameters(data, engine.settings)
    if stream and n != 1:
        raise validation_error("streaming takes n = 1")
    prompt = render_chat(engine, messages)
    engine.validate([prompt], parameters)
    return ChatRequest(messages, prompt, parameters, n, stream)


def chat_answer(engine: Engine, completion: "Completion", chat: ChatRequest, predictions: list[Prediction]) -> dict[str, Any]:
    """The chat.completion body for the predictions (one per choice)."""
    choices = []
    for index, prediction in enumerate(predictions):
        text, reason = text_and_reason(engine, prediction, chat.parameters)
        choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason})
    return completion.body(choices, _usage(_prompt_tokens(engine, chat.prompt), predictions))


def answer_chat_sync(engine: Engine, data: Mapping[str, Any]) -> Any:
    """A chat body (OpenAI's, or Vertex's chatCompletions instances) answered without the server: the HF toolkit's path."""
    if "instances" not in data:
        return _chat_sync(engine, data)
    return {"predictions": [_chat_sync(engine, {k: v for k, v in i.items() if k != "@requestFormat"}) for i in data["instances"]]}


def _chat_sync(engine: Engine, data: Any) -> dict[str, Any]:
    chat = parse_chat(engine, data)
    if chat.stream:
        raise validation_error("streaming is not available through the Hugging Face inference toolkit; send \"stream\": false")
    predictions = engine.run([chat.prompt] * chat.n, chat.parameters)
    return chat_answer(engine, Completion("chatcmpl", "chat.completion", model_id(engine)), chat, predictions)


def render_chat(engine: Engine, messages: list[dict[str, str]]) -> str:
    """The prompt text for messages, from the model's chat template (400 when it has none or refuses them)."""
    template = chat_template(engine)
    if template is None:
        raise RequestError(400, f"this model has no chat template, so it cannot take \"messages\"; {NO_TEMPLATE_FIX}")
    from jinja2 import TemplateError

    try:
        prompt = engine.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # templates raise_exception() on conversations they refuse ("roles must alternate")
        raise RequestError(400, f"the model's chat template refused these messages: {exc}") from None
    bos = getattr(engine.tokenizer, "bos_token", None)
    # The template writes BOS itself; the tokenizer would add a second one when it adds special tokens.
    if bos and prompt.startswith(bos) and _adds_bos(engine):
        prompt = prompt[len(bos):]
    return prompt


def chat_template(engine: Engine) -> str | None:
    """The chat template, looked up once: settings, else the files transformers saves it in."""
    if not hasattr(engine, "chat_template"):
        engine.chat_template = load_chat_template(engine.model_dir, engine.settings)  # type: ignore[attr-defined]
    return engine.chat_template  # type: ignore[attr-defined]


def load_chat_template(model_dir: str, settings: Any) -> str | None:
    """settings.chat_template, else chat_template.jinja, chat_template.json or tokenizer_config.json's "chat_template"."""
    explicit = getattr(settings, "chat_template", None)
    if explicit:
        return explicit
    for name in (*CHAT_TEMPLATE_FILES, "tokenizer_config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as fh:
            if name.endswith(".jinja"):
                return fh.read()
            try:
                template = json.load(fh).get("chat_template")
            except (ValueError, AttributeError):
                continue
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template:
            return template
    return None


def _adds_bos(engine: Engine) -> bool:
    if not hasattr(engine, "_openai_adds_bos"):
        ids = engine._encode("")["input_ids"]
        engine._openai_adds_bos = bool(ids) and ids[0] == engine.tokenizer.bos_token_id  # type: ignore[attr-defined]
    return engine._openai_adds_bos  # type: ignore[attr-defined]


def _messages(raw: Any) -> list[dict[str, str]]:
    if raw is None:
        raise validation_error("\"messages\" is required: a list such as [{\"role\": \"user\", \"content\": \"Hello\"}]")
    if not isinstance(raw, list):
        raise validation_error(f"\"messages\" must be a list, not {_json_type(raw)}")
    if not raw:
        raise validation_error("\"messages\" is an empty list; send at least one message")
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise validation_error(f"{where} must be an object with \"role\" and \"content\", not {_json_type(message)}")
        role = message.get("role")
        if role not in ROLES:
            if role == "tool" or message.get("tool_calls") or message.get("function_call"):
                raise validation_error(f"{where}: tool calls are not supported by this endpoint")
            raise validation_error(f"{where}.role must be one of {', '.join(ROLES)}, not {json.dumps(role)}")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise validation_error(f"{where} has an unknown field \"{unknown[0]}\"; accepted: role, content, name")
        messages.append({"role": ROLES[role], "content": _content(message.get("content"), where)})
    return messages


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else _json_type(part)
                raise validation_error(f"{where}.content[{j}] is {json.dumps(kind)}; this model takes text parts only")
            texts.append(part["text"])
        return "".join(texts)
    raise validation_error(f"{where}.content must be a string or a list of text parts, not {_json_type(content)}")


def _check_response_format(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping) or value.get("type") != "text":
        raise validation_error("\"response_format\" other than {\"type\": \"text\"} is not supported by this endpoint (no constrained decoding)")


# --- completions --------------------------------------------------------------------------------


def _prompts(raw: Any) -> list[str]:
    if raw is None:
        raise validation_error("\"prompt\" is required: a string or a list of strings")
    single = isinstance(raw, str)
    items = [raw] if single else raw
    if not isinstance(items, list) or not items:
        raise validation_error(f"\"prompt\" must be a string or a non-empty list of strings, not {_json_type(raw)}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise validation_error(f"prompt[{i}] must be a string (token id lists are not accepted), not {_json_type(item)}")
        if item == "":
            raise validation_error("\"prompt\" is an empty string; send some text")
    return list(items)


# --- shared pieces ------------------------------------------------------------------------------


class Completion:
    """The id, object type and model every body and chunk of one answer carries."""

    def __init__(self, prefix: str, kind: str, model: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.kind = kind
        self.model = model
        self.created = int(time.time())

    def body(self, choices: list[dict], usage: dict | None, *, chunk: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": self.kind + (".chunk" if chunk and self.kind == "chat.completion" else ""),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if usage is not None or not chunk:
            body["usage"] = usage
        return body


def _check_fields(data: Mapping[str, Any], accepted: set[str]) -> None:
    for key in data:
        if key not in accepted:
            raise validation_error(f"unknown field \"{key}\"; accepted: {', '.join(sorted(accepted))}")
    for key, defaults in _DEFAULTS_ONLY.items():
        value = data.get(key)
        if value is not None and value not in defaults:
            raise validation_error(f"\"{key}\" is not supported by this endpoint's engine; leave it out")


def sampling_parameters(data: Mapping[str, Any], settings: Any) -> tuple[dict[str, Any], int, bool]:
    """The engine's parameters from OpenAI's, plus n and stream."""
    checks = PARAMETERS["text-generation"]
    parameters: dict[str, Any] = {"details": True}
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    if data.get(name) is not None:
        parameters["max_new_tokens"] = checks["max_new_tokens"](name, data[name], settings)
    temperature = 1.0 if data.get("temperature") is None else _temperature("temperature", data["temperature"], settings)
    if temperature == 0:
        parameters["do_sample"] = False
    else:
        parameters.update(do_sample=True, temperature=temperature)
    if data.get("top_p") is not None:
        parameters["top_p"] = _top_p("top_p", data["top_p"], settings)
    if data.get("stop") is not None:
        parameters["stop"] = _stop("stop", data["stop"], settings)
    for key in ("seed", "top_k", "repetition_penalty"):  # the last two as vLLM takes them (extra_body)
        if data.get(key) is not None:
            parameters[key] = checks[key](key, data[key], settings)
    n = 1 if data.get("n") is None else _n("n", data["n"], settings)
    limit = getattr(settings, "max_inputs_per_request", None)
    if limit and n > limit:
        raise validation_error(f"\"n\" is {n}; this server makes at most {limit} choices per request")
    stream = data.get("stream")
    if stream not in (None, True, False):
        raise validation_error(f"\"stream\" must be true or false, not {_json_type(stream)}")
    return parameters, n, bool(stream)


def _usage_wanted(data: Mapping[str, Any]) -> bool:
    options = data.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def _generation_engine(state: ServerState) -> Engine:
    engine = state.require_engine()
    if state.task not in GENERATION_TASKS or not getattr(engine, "streaming", False):
        raise RequestError(404, f"this model serves {state.task}, not text generation: use /invocations", "not_found")
    return engine


async def _read_json(state: ServerState, request: Request) -> Any:
    body = await _http()._read_body(request, state.settings.max_body_bytes, state.settings.max_body_seconds)
    state.admit(request)  # counted toward the 429 limit only once its body has arrived
    data = decode_body(body)
    if not isinstance(data, Mapping):
        raise validation_error(f"the request body must be a JSON object, not {_json_type(data)}")
    return data


async def _run(state: ServerState, request: Request, prompts: list[str], parameters: dict[str, Any]) -> list[Prediction]:
    predictions: list[Prediction] = await state.batcher.submit(prompts, parameters)
    tokens = sum(p.generated_tokens for p in predictions)
    _http()._note(request, tokens=tokens)  # the metric is counted by the engine as it decodes (engine.on_tokens)
    return predictions


def text_and_reason(state: ServerState, prediction: Prediction, parameters: dict[str, Any]) -> tuple[str, str]:
    """The answer's text and OpenAI's finish_reason; OpenAI leaves the stop sequence out, where TGI keeps it."""
    output = prediction.output
    text = output[OUTPUT_KEYS[state.task]]
    reason = (output.get("details") or {}).get("finish_reason", "length")
    if reason == "stop_sequence":
        stop = next((s for s in parameters.get("stop") or () if text.endswith(s)), "")
        text = text[: len(text) - len(stop)]
    return text, FINISH_REASONS.get(reason, "stop")


def _prompt_tokens(engine: Engine, prompt: str) -> int:
    return engine._input_length(prompt)


def _usage(prompt_tokens: int, predictions: list[Prediction]) -> dict[str, int]:
    completion_tokens = sum(p.generated_tokens for p in predictions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def model_id(state: ServerState) -> str:
    extra = getattr(state.settings, "extra", None) or {}
    return str(extra.get("served_model_name") or os.path.basename(os.path.normpath(state.model_dir)) or "model")


def _log_payload(state: ServerState, request: Request, inputs: Any, parameters: dict[str, Any]) -> None:
    if state.settings.log_payloads:
        _http()._note(request, payload={"inputs": inputs, "parameters": parameters})


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                      429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}  # fmt: skip


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "invalid_request_error"), "param": None, "code": code}}


def _error_response(request: Request, exc: RequestError) -> Response:
    _http()._note(request, error=exc.message)
    status = 400 if exc.status == 422 else exc.status  # OpenAI answers 400 for every invalid request
    code = "context_length_exceeded" if "input tokens" in exc.message else exc.error_type
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return _http()._json(error_body(status, exc.message, code), status, headers=headers)


# --- streams ------------------------------------------------------------------------------------


def _sse_response(events: AsyncIterator[bytes]) -> Response:
    from starlette.responses import StreamingResponse

    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(body: Any) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def generated_pieces(state: ServerState, engine: Engine, prompt: str, parameters: dict[str, Any]) -> AsyncIterator[Any]:
    """Text pieces as the model makes them, stop sequences held back and cut; then the Prediction.

    Each piece is safe to show: text that might begin a stop sequence waits until it cannot.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()
    cancel = threading.Event()
    hold = max((len(s) for s in parameters.get("stop") or ()), default=1) - 1

    def on_token(token: Token) -> None:
        if not token.special:
            loop.call_soon_threadsafe(queue.put_nowait, token.text)

    job = loop.run_in_executor(
        state.stream_executor,
        functools.partial(engine.generate_stream, prompt, parameters, on_token, cancel),  # type: ignore[attr-defined]
    )
    job.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, finished))
    text, sent = "", 0
    try:
        while (piece := await queue.get()) is not finished:
            text += piece
            if parameters.get("stop") and any(s in text for s in parameters["stop"]):
                continue  # the stop sequence is here: what comes before it goes out with the end
            safe = len(text) - hold
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        prediction: Prediction = job.result()
        final = text_and_reason(state, prediction, parameters)[0]
        if len(final) > sent:
            yield final[sent:]
        yield prediction
    finally:
        cancel.set()  # the client went away or we are done: stop generating either way
        job.cancel()


async def _stream_chat(state, request, engine, prompt, parameters, completion: Completion, usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict, reason: str | None = None) -> bytes:
        return _sse(completion.body([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}], None, chunk=True))

    yield chunk({"role": "assistant", "content": ""})
    async for event in _streamed(state, request, engine, prompt, parameters):
        if isinstance(event, str):
            yield chunk({"content": event})
        elif isinstance(event, Prediction):
            yield chunk({}, text_and_reason(state, event, parameters)[1])
            if usage:
                yield _sse(completion.body([], _usage(await run_in_threadpool(_prompt_tokens, engine, prompt), [event]), chunk=True))
        else:
            yield event
    yield DONE


async def _stream_completion(state, request, engine, prompt, parameters, completion: Completion, prefix: str, usage: bool) -> AsyncIterator[bytes]:
    def chunk(text: str, reason: str | None = None) -> bytes:
        return _sse(completion.body([{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}], None, chunk=True))

    if prefix:
        yield chunk(prefix)
    async for event in _streamed(state, request, engine, prompt, parameters):
        if isinstance(event, str):
            yield chunk(event)
        elif isinstance(event, Prediction):
            yield chunk("", text_and_reason(state, event, parameters)[1])
            if usage:
                yield _sse(completion.body([], _usage(await run_in_threadpool(_prompt_tokens, engine, prompt), [event]), chunk=True))
        else:
            yield event
    yield DONE


async def _streamed(state, request, engine, prompt, parameters) -> AsyncIterator[Any]:
    """generated_pieces, with a failure turned into one error event (a stream cannot change its status)."""
    try:
        async for event in generated_pieces(state, engine, prompt, parameters):
            if isinstance(event, Prediction):
                _http()._note(request, tokens=event.generated_tokens)
            yield event
    except RequestError as exc:
        yield _sse(error_body(400 if exc.status == 422 else exc.status, exc.message, exc.error_type))
    except Exception as exc:
        info = _http()._note(request, error=f"{type(exc).__name__}: {exc}")
        log_event("internal_error", level="error", request_id=info.get("request_id"), error=info["error"],
                  traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))  # fmt: skip
        yield _sse(error_body(500, f"generation failed ({type(exc).__name__})"))
