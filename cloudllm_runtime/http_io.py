"""The HTTP plumbing every route module shares: reading a bounded body, JSON answers, the request's log fields.

Below app and openai_api, so both use it without importing each other.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .protocol import RequestError

# Bodies past the limit are read and dropped (up to this much more) so the client sees the 413
# instead of a connection reset in the middle of its upload.
DRAIN_LIMIT = 64 * 1024 * 1024

# nginx's status for "the client closed the connection before the answer": only ever logged.
CLIENT_GONE = 499


async def _read_body(request: Request, limit: int, seconds: float | None = None) -> bytes:
    """The body, 413 once it passes limit (read to the end first, so the client gets the answer),
    or 408 when it has not all arrived within seconds (a slow sender must not hold the server)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DRAIN_LIMIT:
        raise RequestError(413, f"the request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit + DRAIN_LIMIT:
                break

    try:
        await asyncio.wait_for(read(), seconds)
    except ClientDisconnect:
        raise RequestError(CLIENT_GONE, "the client closed the connection before its body arrived", "client_gone") from None
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {seconds:g} s; send it at once", "timeout") from None
    if size > limit:
        raise RequestError(413, f"the request body is over the limit of {limit} bytes")
    return b"".join(chunks)


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_dumps(content), status_code=status, media_type="application/json", headers=headers)


def _dumps(content: Any) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate a client sent (a key echoed in an error) is escaped, not a 500."""
    text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def _note(request: Request, **fields: Any) -> dict[str, Any]:
    """Fields for this request's log line (the middleware writes it when the response ends)."""
    info = request.scope.setdefault("cloudllm", {})
    info.update(fields)
    return info
