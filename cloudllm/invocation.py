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
    if isinstance(result, dict):
        for key in ("generated_text", "summary_text", "translation_text"):
            if isinstance(result.get(key), str):
                return result[key]
    return None


def iter_sse_tokens(lines: Iterable[str]) -> Iterator[str]:
    """Token texts from TGI server-sent events. Skips special tokens; raises on an error event."""
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
            raise DeployFailed(f"the endpoint failed mid-stream: {event['error']}", "check the endpoint's logs (cloudllm logs NAME)")
        token = event.get("token") or {}
        if token.get("special"):
            continue
        text = token.get("text")
        if text:
            yield text


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
