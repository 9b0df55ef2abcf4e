"""The small HTTP layer for talking to model servers directly (local endpoints, emulators, streamRawPredict)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx

from cloudllm.errors import DeployFailed, UserError
from cloudllm.invocation import iter_sse_tokens

# Generation can take a while; connecting must not.
TIMEOUT = httpx.Timeout(300.0, connect=5.0)


def endpoint_error(name: str, status: int, text: str) -> UserError:
    """A 4xx is the caller's request (exit 2); anything else is the endpoint failing (exit 1)."""
    try:
        detail = json.loads(text).get("error") or text
    except (ValueError, AttributeError):
        detail = text
    detail = str(detail).strip().splitlines()[0][:300] if str(detail).strip() else "no detail"
    if 400 <= status < 500:
        return UserError(f"endpoint {name} rejected the request ({status}): {detail}", "fix the request body or parameters")
    return DeployFailed(f"endpoint {name} failed ({status}): {detail}", f"check its logs: cloudllm logs {name}")


def post_json(name: str, url: str, body: dict, headers: dict | None = None) -> Any:
    response = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
    if response.status_code >= 400:
        raise endpoint_error(name, response.status_code, response.text)
    return response.json()


def stream_tokens(name: str, url: str, body: dict, headers: dict | None = None) -> Iterator[str]:
    with httpx.stream("POST", url, json=body, headers=headers, timeout=TIMEOUT) as response:
        if response.status_code >= 400:
            response.read()
            raise endpoint_error(name, response.status_code, response.text)
        yield from iter_sse_tokens(response.iter_lines())
