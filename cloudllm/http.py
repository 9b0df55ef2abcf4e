"""The small HTTP layer for talking to model servers directly (local endpoints, emulators, streamRawPredict)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterator

import httpx

from cloudllm.errors import DeployFailed, UserError
from cloudllm.invocation import iter_sse_tokens

# Generation can take a while; connecting must not. `invoke --timeout` swaps it for one call (read at call time).
TIMEOUT = httpx.Timeout(300.0, connect=5.0)
# The seconds `invoke --timeout` asked for (None: each client's default): for the SDK clients, whose defaults differ.
ASKED_TIMEOUT: float | None = None


@contextmanager
def read_timeout(seconds: float | None) -> Iterator[None]:
    """Requests made inside wait at most `seconds` for the endpoint's answer (None: the default)."""
    global TIMEOUT, ASKED_TIMEOUT
    previous = TIMEOUT, ASKED_TIMEOUT
    if seconds is not None:
        TIMEOUT, ASKED_TIMEOUT = httpx.Timeout(seconds, connect=min(5.0, seconds)), seconds
    try:
        yield
    finally:
        TIMEOUT, ASKED_TIMEOUT = previous


def timed_out(name: str) -> DeployFailed:
    return DeployFailed(
        f"endpoint {name} did not answer within {TIMEOUT.read:g}s",
        f"raise --timeout for long generations, or see whether it is stuck: cloudllm status {name}; cloudllm logs {name}",
    )


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
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
    except httpx.TimeoutException:
        raise timed_out(name) from None
    if response.status_code >= 400:
        raise endpoint_error(name, response.status_code, response.text)
    return response.json()


def stream_tokens(name: str, url: str, body: dict, headers: dict | None = None) -> Iterator[str]:
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=TIMEOUT) as response:
            if response.status_code >= 400:
                response.read()
                raise endpoint_error(name, response.status_code, response.text)
            yield from iter_sse_tokens(response.iter_lines())
    except httpx.TimeoutException:
        raise timed_out(name) from None
