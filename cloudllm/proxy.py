"""`cloudllm proxy NAME`: an OpenAI-compatible server on loopback for an endpoint on any provider.

``OPENAI_BASE_URL=http://127.0.0.1:PORT/v1`` and the `openai` client, LangChain or LiteLLM work
unchanged. A local endpoint already speaks OpenAI's routes, so its requests and streams are
passed through byte for byte. A cloud endpoint is reached through its provider's invoke and
invoke_stream, which sign each request as the platform needs (SigV4 through boto3 for SageMaker,
an ADC token for Vertex AI): chat goes in the form the platform takes (invocation.platform_chat_body),
completions in the TGI form every runtime reads, and a stream's pieces go out as OpenAI chunks as
they arrive, ending with the finish_reason the endpoint gave (TGI's details, the engine's chunks) and,
when the client asks with stream_options.include_usage, the usage it counted. Errors answer in OpenAI's shape: 400 for what the endpoint refused, 502 when it failed.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator

from cloudllm.errors import UserError

DEFAULT_PORT = 8000
LOOPBACK = "127.0.0.1"


def create_proxy_app(name: str, provider: Any, *, upstream: str | None = None) -> Any:
    """The proxy's ASGI app for endpoint NAME; upstream: a local endpoint's URL, to pass requests through."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    proxy = _Proxy(name, provider, upstream)
    routes = [
        Route("/v1/chat/completions", proxy.chat, methods=["POST"]),
        Route("/v1/completions", proxy.completions, methods=["POST"]),
        Route("/v1/models", proxy.models, methods=["GET"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await proxy.close()

    return Starlette(routes=routes, lifespan=lifespan)


def serve_proxy(name: str, provider: Any, *, port: int = DEFAULT_PORT, host: str = LOOPBACK, ready: Any = None) -> None:
    """Serve the proxy in the foreground until Ctrl-C; ready(url) is called once it listens."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("the proxy needs uvicorn and starlette", "install them: pip install 'cloudllm[serve]'") from None
    from cloudllm_runtime.server import StartupError, bind_socket

    upstream = _local_url(name, provider)
    try:
        sock = bind_socket(host, port)
    except StartupError as exc:
        raise UserError(str(exc), "pass another --port (0 picks a free one)") from None
    url = f"http://{host}:{sock.getsockname()[1]}/v1"
    config = uvicorn.Config(create_proxy_app(name, provider, upstream=upstream), log_level="warning", access_log=False, lifespan="on")
    if ready:
        ready(url)
    uvicorn.Server(config).run(sockets=[sock])


def _local_url(name: str, provider: Any) -> str | None:
    if provider.name != "local":
        return None
    endpoint = provider.get(name)
    if endpoint is None or not endpoint.url:
        raise UserError(f"no local endpoint named {name!r} is running", "deploy it first, or see `cloudllm list`")
    return endpoint.url


class _Proxy:
    def __init__(self, name: str, provider: Any, upstream: str | None) -> None:
        self.name = name
        self.provider = provider
        self.upstream = upstream
        self._client: Any = None
        self._runtime: str | None = None
        self._runtime_known = False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # --- routes ---------------------------------------------------------------------------
    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": self.provider.name}]})

    async def chat(self, request: Any) -> Any:
        if self.upstream:
            return await self._pass_through(request)
        body = await self._json(request)
        if isinstance(body, _Error):
            return body.response()
        from cloudllm.invocation import chat_completion, platform_chat_body

        runtime = await self._endpoint_runtime()
        upstream_body = platform_chat_body(self.provider.name, runtime, body)
        if body.get("stream"):
            return await self._stream(upstream_body, "chat.completion.chunk", self._chat_chunk, _usage_wanted(body))
        return await self._call(lambda: chat_completion(self.provider.invoke(self.name, upstream_body)))

    async def completions(self, request: Any) -> Any:
        if self.upstream:
            return await self._pass_through(request)
        body = await self._json(request)
        if isinstance(body, _Error):
            return body.response()
        try:
            native = _native_body(body)
        except UserError as exc:
            return _Error(400, exc.problem).response()
        if body.get("stream"):
            if await self._endpoint_runtime() != "vllm" or self.provider.name != "vertex":  # Model Garden's vLLM stream has no details
                native["parameters"]["details"] = True  # TGI's (and our server's) last event then says why it ended, and the tokens
            return await self._stream(native, "text_completion", self._completion_chunk, _usage_wanted(body))
        return await self._call(lambda: _as_completion(self.provider.invoke(self.name, native), self.name))

    # --- a local endpoint: OpenAI's routes already, passed through --------------------------
    async def _pass_through(self, request: Any) -> Any:
        import httpx
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse

        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(600, connect=5))
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept", "x-request-id")}
        outgoing = self._client.build_request(request.method, request.url.path, content=await request.body(), headers=headers)
        try:
            answer = await self._client.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            return _Error(502, f"endpoint {self.name} is not reachable at {self.upstream}: {exc}").response()
        kept = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "cache-control", "x-request-id")}
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=kept, background=BackgroundTask(answer.aclose))

    # --- a cloud endpoint: through the provider, which signs ------------------------------
    async def _json(self, request: Any) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return _Error(400, f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _Error(400, "the request body must be a JSON object")
        return body

    async def _endpoint_runtime(self) -> str | None:
        from starlette.concurrency import run_in_threadpool

        if not self._runtime_known and self.provider.name == "vertex":
            endpoint = await run_in_threadpool(self.provider.get, self.name)
            self._runtime = endpoint.runtime if endpoint else None
        self._runtime_known = True
        return self._runtime

    async def _call(self, work: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        try:
            return JSONResponse(await run_in_threadpool(work))
        except UserError as exc:
            return _Error(_status(exc), exc.problem).response()

    async def _stream(self, body: dict, kind: str, chunk: Any, usage_wanted: bool) -> Any:
        from starlette.concurrency import iterate_in_threadpool
        from starlette.responses import StreamingResponse

        pieces = iterate_in_threadpool(self.provider.invoke_stream(self.name, {**body, "stream": True}))
        # The first piece is awaited here, so a refused request is an error answer rather than a broken stream.
        try:
            first = await pieces.__anext__()
        except StopAsyncIteration:
            first = None
        except UserError as exc:
            return _Error(_status(exc), exc.problem).response()
        answer_id = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"

        async def events() -> AsyncIterator[bytes]:
            created = int(time.time())
            if kind.startswith("chat"):
                yield _sse(chunk(answer_id, created, {"role": "assistant", "content": ""}, None))
            end = None  # the provider's last, empty piece says how the answer ended (invocation.Piece)
            try:
                async for piece in _chain(first, pieces):
                    if piece:
                        yield _sse(chunk(answer_id, created, piece, None))
                    if getattr(piece, "finish_reason", None) or getattr(piece, "usage", None):
                        end = piece
                # An engine that does not say (Model Garden vLLM's stream) ended by itself, as far as we know.
                yield _sse(chunk(answer_id, created, None, getattr(end, "finish_reason", None) or "stop"))
                usage = getattr(end, "usage", None)
                if usage_wanted and usage and "prompt_tokens" in usage:  # OpenAI's last chunk: no choices, the usage
                    yield _sse({**chunk(answer_id, created, None, None), "choices": [], "usage": usage})
            except UserError as exc:
                yield _sse(_error_body(_status(exc), exc.problem))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _chat_chunk(self, answer_id: str, created: int, piece: Any, reason: str | None) -> dict:
        delta = piece if isinstance(piece, dict) else ({} if piece is None else {"content": piece})
        return {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": self.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}  # fmt: skip

    def _completion_chunk(self, answer_id: str, created: int, piece: Any, reason: str | None) -> dict:
        return {"id": answer_id, "object": "text_completion", "created": created, "model": self.name,
                "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}]}  # fmt: skip


class _Error:
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message

    def response(self) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(_error_body(self.status, self.message), status_code=self.status)


def _error_body(status: int, message: str) -> dict:
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _status(exc: UserError) -> int:
    """What the endpoint refused is the client's 400; an endpoint failing (DeployFailed) is a 502."""
    from cloudllm.errors import DeployFailed

    return 502 if isinstance(exc, DeployFailed) else 400


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for piece in rest:
        yield piece


def _usage_wanted(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _sse(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# --- completions on a cloud endpoint: TGI's form, which every runtime reads ----------------------

_COMPLETION_PARAMETERS = {"max_tokens": "max_new_tokens", "top_p": "top_p", "seed": "seed", "stop": "stop", "top_k": "top_k"}


def _native_body(body: dict) -> dict:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise UserError("\"prompt\" must be a non-empty string (the proxy sends one prompt per request to a cloud endpoint)", "send one prompt")
    unknown = sorted(set(body) - {"model", "prompt", "stream", "temperature", "n", "user", "stream_options", *_COMPLETION_PARAMETERS})
    if unknown:
        raise UserError(f"the proxy cannot pass \"{unknown[0]}\" to a cloud endpoint's completions", "leave it out")
    if body.get("n") not in (None, 1):
        raise UserError("the proxy sends n = 1 to a cloud endpoint's completions", "send the request n times")
    parameters: dict[str, Any] = {new: body[old] for old, new in _COMPLETION_PARAMETERS.items() if body.get(old) is not None}
    temperature = body.get("temperature", 1.0)
    if temperature == 0:
        parameters["do_sample"] = False
    elif temperature is not None:
        parameters.update(do_sample=True, temperature=temperature)
    return {"inputs": prompt, "parameters": parameters}


def _as_completion(result: Any, model: str) -> dict:
    from cloudllm.invocation import response_text

    text = response_text(result)
    if text is None:
        raise UserError(f"the endpoint answered no generated text: {json.dumps(result)[:200]}", "check the endpoint serves text generation")
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}], "usage": None}  # fmt: skip
