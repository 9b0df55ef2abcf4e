"""Request bodies and responses on the client side, shared by every provider.

The wire format is TGI's (`{"inputs", "parameters", "stream"}`), which the generated
server, TGI and the HF inference toolkit all accept; streams are TGI's server-sent
events, one JSON object per `data:` line.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Iterator

from cloudllm.errors import DeployFailed, UserError


def loads_finite(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and numbers too large for a float (1e999): no model
    server accepts them, and Python's json would send them on as invalid JSON."""

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise ValueError(f"{literal} is too large")
        return value

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number JSON allows")

    return json.loads(text, parse_float=number, parse_constant=constant)


def parse_param(key: str, value: str) -> Any:
    """A --param value: JSON where it parses (numbers, true, lists), else the string itself."""
    try:
        return loads_finite(value)
    except json.JSONDecodeError:
        return value
    except ValueError as exc:
        raise UserError(f"--param {key}={value}: {exc}", "give a finite number, e.g. --param temperature=0.7") from None


def build_body(inputs: str | None, parameters: dict | None = None, json_body: str | dict | None = None) -> dict:
    """The request body from a prompt (+parameters) or a raw JSON body given by the user."""
    if json_body is not None:
        if isinstance(json_body, str):
            try:
                body = loads_finite(json_body)
            except json.JSONDecodeError as exc:
                raise UserError(f"--body is not valid JSON ({exc.msg} at column {exc.colno})", "pass a JSON object, e.g. '{\"inputs\": \"Hi\"}'") from None
            except ValueError as exc:
                raise UserError(f"--body: {exc}", "use finite numbers") from None
        else:
            body = json_body
        if not isinstance(body, dict):
            raise UserError("--body must be a JSON object", "pass e.g. '{\"inputs\": \"Hi\", \"parameters\": {\"max_new_tokens\": 20}}'")
        return body
    if inputs is None:
        raise UserError("nothing to send", "give a prompt (cloudllm invoke NAME \"text\") or --body JSON")
    body: dict[str, Any] = {"inputs": inputs}
    if parameters:
        body["parameters"] = parameters
    return body


def with_adapter(body: dict, adapter: str | None) -> dict:
    """body asking for LoRA adapter `adapter` (parameters.adapter_id, TGI's field, which our server reads too)."""
    if adapter is None:
        return body
    from cloudllm.adapters import check_adapter_name

    check_adapter_name(adapter)
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise UserError("the body's \"parameters\" is not a JSON object", "pass parameters as an object, e.g. {\"max_new_tokens\": 20}")
    if parameters.get("adapter_id") not in (None, adapter):
        raise UserError(f"--adapter {adapter} and the body's adapter_id {parameters['adapter_id']!r} disagree", "give the adapter once")
    return {**body, "parameters": {**parameters, "adapter_id": adapter}}


def response_text(result: Any) -> str | None:
    """The generated text of a response, if it is a generation; None for other tasks."""
    if isinstance(result, dict) and "predictions" in result:
        result = result["predictions"]
    if isinstance(result, list) and len(result) == 1:
        result = result[0]
    if isinstance(result, str):  # TGI and vLLM behind Vertex: {"predictions": ["text"]}
        return result
    if isinstance(result, list) and result and isinstance(result[0], dict) and len(result[0]) == 1 and "generated_text" in result[0]:
        result = result[0]
    if isinstance(result, dict) and isinstance(result.get("choices"), list) and result["choices"]:
        return openai_choice_text(result["choices"][0])
    if isinstance(result, dict):
        for key in ("generated_text", "summary_text", "translation_text"):
            if isinstance(result.get(key), str):
                return result[key]
    return None


class Piece(str):
    """Streamed text; the empty piece a stream ends with says how it ended, in OpenAI's terms (finish_reason, usage)."""

    finish_reason: str | None = None
    usage: dict | None = None


# TGI's FinishReason (and the generated server's, which follows it) in OpenAI's words.
_FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop", "stop": "stop"}


def stream_end(finish_reason: str | None, usage: dict | None) -> Piece:
    end = Piece("")
    end.finish_reason, end.usage = finish_reason, usage
    return end


def tgi_stream_end(details: Any) -> Piece | None:
    """How a TGI-form answer ended, from its "details" (StreamDetails: finish_reason, generated_tokens; the
    prompt's tokens as input_length or prompt_tokens where the server sends them); None without details."""
    if not isinstance(details, dict):
        return None
    reason = _FINISH_REASONS.get(str(details.get("finish_reason")))
    generated = details.get("generated_tokens")
    prompt = details.get("input_length", details.get("prompt_tokens"))
    usage = None
    if isinstance(generated, int) and isinstance(prompt, int):
        usage = {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
    elif isinstance(generated, int):
        usage = {"completion_tokens": generated}  # the prompt's count is not in TGI's or our server's stream
    return stream_end(reason, usage)


def answer_end(result: Any) -> Piece | None:
    """How a whole (non-streamed) answer ended: an OpenAI completion's finish_reason and usage, or TGI's details."""
    first = result[0] if isinstance(result, list) and len(result) == 1 else result
    if not isinstance(first, dict):
        return None
    choices = first.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        usage = first.get("usage") if isinstance(first.get("usage"), dict) else None
        return stream_end(choices[0].get("finish_reason"), usage)
    return tgi_stream_end(first.get("details"))


def iter_sse_tokens(lines: Iterable[str]) -> Iterator[str]:
    """Token texts from TGI server-sent events (or OpenAI's chunks). Skips special tokens; raises on an error event.

    When the stream says how it ended (TGI's details, an OpenAI chunk's finish_reason or usage),
    an empty Piece carrying that comes last.
    """
    end: Piece | None = None
    for line in lines:
        line = line.strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if not payload or payload == "[DONE]":
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            raise DeployFailed(f"the endpoint sent a stream event that is not JSON: {payload[:100]}", "check the endpoint's logs (cloudllm logs NAME)") from None
        if "error" in event:  # the endpoint failing, as a non-streamed 5xx is: the same exit code (1)
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error  # OpenAI's shape, or TGI's
            raise DeployFailed(f"the endpoint failed mid-stream: {message}", "check the endpoint's logs (cloudllm logs NAME)")
        if isinstance(event.get("choices"), list):  # OpenAI's chunks, chat or completions
            choice = event["choices"][0] if event["choices"] else None
            text = openai_choice_text(choice)
            if text:
                yield text
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            usage = event.get("usage") if isinstance(event.get("usage"), dict) else None
            if reason or usage:  # (a Piece is "", so never tested for truth)
                end = stream_end(reason or getattr(end, "finish_reason", None), usage or getattr(end, "usage", None))
            continue
        details_end = tgi_stream_end(event.get("details"))
        if details_end is not None:
            end = details_end
        token = event.get("token") or {}
        if token.get("special"):
            continue
        text = token.get("text")
        if text:
            yield text
    if end is not None:
        yield end


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Re-join byte chunks into lines: a stream may split a line (even a UTF-8 character) across chunks."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")


# --- OpenAI's chat format -------------------------------------------------------------------------


def chat_messages(prompt: str | list, system: str | None = None) -> list[dict]:
    """OpenAI messages from a prompt (or a history already in that form) and an optional system line."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system is not None:
        messages = [{"role": "system", "content": system}, *[m for m in messages if m.get("role") != "system"]]
    return messages


def chat_body(messages: list[dict], parameters: dict | None = None, *, stream: bool = False) -> dict:
    """An OpenAI chat request from messages and TGI-named parameters (what `invoke --param` takes).

    Greedy unless the caller asks for sampling, as a plain invoke is: OpenAI's default is temperature 1.
    """
    params = {k: v for k, v in (parameters or {}).items() if v is not None}
    body: dict[str, Any] = {"messages": messages}
    if "max_new_tokens" in params:
        body["max_tokens"] = params.pop("max_new_tokens")
    sampling = params.pop("do_sample", None)
    if sampling is False or (sampling is None and "temperature" not in params and "top_p" not in params and "top_k" not in params):
        params["temperature"] = 0
    if "stop_sequences" in params:
        params["stop"] = params.pop("stop_sequences")
    body.update(params)
    if stream:
        body["stream"] = True
    return body


def openai_choice_text(choice: Any) -> str | None:
    """The text of one OpenAI choice: a chat message, a chat chunk's delta or a completion's text."""
    if not isinstance(choice, dict):
        return None
    for holder in (choice.get("message"), choice.get("delta")):
        if isinstance(holder, dict):
            return holder.get("content")
    text = choice.get("text")
    return text if isinstance(text, str) else None


def platform_chat_body(provider: str, runtime: str | None, body: dict) -> dict:
    """A chat request in the form the endpoint's platform and engine take.

    SageMaker's /invocations takes OpenAI's body as is (the generated server, TGI's Messages API and
    LMI's chat schema all read "messages"); Vertex AI's predict takes instances: Model Garden vLLM's
    and the generated server's {"@requestFormat": "chatCompletions", ...}, TGI's route the chat request itself.
    """
    if provider != "vertex":
        return body
    instance = {k: v for k, v in body.items() if k != "stream"}
    if runtime != "tgi":
        instance = {"@requestFormat": "chatCompletions", **instance}
    if body.get("stream"):
        instance["stream"] = True
    return {"instances": [instance]}


def chat_completion(result: Any) -> Any:
    """The chat completion in a platform's answer: {"predictions": [completion]} from Vertex AI's predict
    (the generated server, TGI), {"predictions": completion} from Model Garden's vLLM (through rawPredict).

    Model Garden's vLLM server is Google's build, not upstream vLLM's (vllm-project/vllm
    vllm/entrypoints/api_server.py has no Vertex route, and no "@requestFormat"); its chat answer's
    shape is the one public Vertex AI clients read: response["predictions"]["choices"][0]["message"].
    """
    predictions = result.get("predictions") if isinstance(result, dict) else None
    if isinstance(predictions, list) and len(predictions) == 1:
        return predictions[0]
    if isinstance(predictions, dict) and "choices" in predictions:
        return predictions
    return result


# --- gRPC (the Open Inference Protocol v2 the model server speaks beside HTTP) --------------------


def grpc_generate(name: str, target: str, prompt: str, parameters: dict | None = None, *, stream: bool = False) -> Iterator[str]:
    """Text from endpoint NAME's gRPC port (target "host:port"): the whole answer, or pieces as they come."""
    import grpc

    def send(method: str, payload: bytes, streamed: bool) -> Iterator[bytes]:
        with grpc.insecure_channel(target) as channel:
            try:
                if not streamed:  # no serializers: the bytes go and come as they are
                    yield channel.unary_unary(method)(payload, timeout=300)
                    return
                yield from channel.stream_stream(method)(iter([payload]), timeout=300)
            except grpc.RpcError as exc:
                detail = exc.details() if hasattr(exc, "details") else str(exc)
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise UserError(f"endpoint {name} rejected the request: {detail}", "fix the prompt or parameters") from None
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise UserError(f"endpoint {name}: {detail}", f"pick one it has (see `cloudllm adapters list {name}`)") from None
                raise DeployFailed(f"endpoint {name}'s gRPC port {target} failed ({exc.code().name}): {detail}",
                                   f"check its logs: cloudllm logs {name}") from None  # fmt: skip

    return oip_generate(name, send, prompt, parameters, stream=stream)


def oip_generate(name: str, send, prompt: str, parameters: dict | None = None, *, stream: bool = False) -> Iterator[str]:
    """Text of an Open Inference Protocol v2 ModelInfer (or ModelStreamInfer with stream) sent through send.

    send(method, request bytes, streamed) yields the serialized answers: a channel to the
    server's port, or a platform that forwards raw gRPC (Vertex AI's directRawPredict).
    """
    from cloudllm_runtime.grpc_protocol import INPUT_TENSOR, OUTPUT_TENSOR, SERVICE, build_descriptors, decode_bytes_tensor, encode_bytes_tensor

    _, m = build_descriptors()
    request = m["ModelInferRequest"]()
    request.inputs.add(name=INPUT_TENSOR, datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_tensor([prompt.encode("utf-8")]))
    sampling = chat_body([], parameters)
    sampling.pop("messages")
    for key, value in {**sampling, **({"stream": True} if stream else {})}.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}.get(type(value))
        if field is None:
            raise UserError(f"parameter {key!r} cannot go over gRPC as {type(value).__name__}", "give a number, a string or true/false")
        setattr(request.parameters[key], field, value)

    def texts(response: Any) -> Iterator[str]:
        for index, tensor in enumerate(response.outputs):
            if tensor.name == OUTPUT_TENSOR and index < len(response.raw_output_contents):
                for item in decode_bytes_tensor(response.raw_output_contents[index]):
                    yield item.decode("utf-8", errors="replace")

    if not stream:
        for answer in send(f"/{SERVICE}/ModelInfer", request.SerializeToString(), False):
            yield from texts(m["ModelInferResponse"].FromString(answer))
        return
    for raw in send(f"/{SERVICE}/ModelStreamInfer", request.SerializeToString(), True):
        answer = m["ModelStreamInferResponse"].FromString(raw)
        if answer.error_message:
            raise UserError(f"endpoint {name} rejected the request: {answer.error_message}", "fix the prompt or parameters")
        yield from texts(answer.infer_response)
