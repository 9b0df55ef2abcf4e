"""The HTTP server: SageMaker's, Vertex AI's and TGI's routes over one engine.

Routes (all JSON unless noted):

- ``GET /ping``, ``GET /health`` and Vertex's ``AIP_HEALTH_ROUTE``: 200 ``{"status": "ok"}`` once the
  model is loaded; 503 ``{"status": "loading"}`` before, ``{"status": "failed", "error": ...}`` if it
  could not load. The model loads in a background thread, so the port answers at once.
- ``POST /invocations`` (SageMaker) and Vertex's ``AIP_PREDICT_ROUTE`` (default ``/predict``): either
  body form. The TGI/HF form ``{"inputs", "parameters", "stream"}`` answers, for generation tasks,
  ``[{"generated_text": ...}, ...]`` (one per input, a one-element list for a single string);
  other tasks answer the output for one input or a list of outputs for a list. ``"stream": true``
  answers ``text/event-stream``. The Vertex form ``{"instances", "parameters"}`` answers
  ``{"predictions": [...], "deployedModelId": ...}`` (the id only when AIP_DEPLOYED_MODEL_ID is set).
- ``POST /generate`` (TGI): ``{"generated_text": ...}`` for one input; ``POST /generate_stream``: events.
- ``GET /info``: the task and limits. ``GET /metrics``: Prometheus text (404 without prometheus_client).

Streams use TGI's event format, one event per token as it is produced::

    data:{"index":1,"token":{"id":318,"text":" is","logprob":null,"special":false},"generated_text":null,"details":null}

and the last token's event carries ``generated_text`` (and ``details`` when asked for). Errors
are ``{"error": ..., "error_type": ...}`` with a 4xx for the client's mistakes, 429 beyond
max_concurrent_requests being served, 503 while not ready, and 500 (the server stays up) for bugs.

Hostile clients: a request counts toward max_concurrent_requests only once its body has
arrived, and a body must arrive within settings.max_body_seconds (else 408), so slow senders
hold no slot; a prompt is refused by its length before it is tokenized; a client that hangs
up has its generation stopped at the next token (logged with status 499).
Each request writes one JSON line to stderr (health checks and /metrics scrapes excepted); prompt
text only when settings.log_payloads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import threading
import time
import traceback
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .batching import Batcher
from .engine import Engine, Prediction, Token, load_engine
from .http_io import CLIENT_GONE, DRAIN_LIMIT, _dumps, _json, _note, _read_body
from .log import log_event
from . import adapters, openai_api
from .protocol import (
    GENERATION_TASKS,
    OUTPUT_KEYS,
    InferenceRequest,
    RequestError,
    batch_key,
    decode_payload,
    format_response,
    normalize_task,
    parse_request,
    validation_error,
)

EngineLoader = Callable[[str, Any], Engine]

HEALTH_ROUTES = ("/ping", "/health")
SAGEMAKER_PREDICT_ROUTE = "/invocations"
DEFAULT_VERTEX_PREDICT_ROUTE = "/predict"
DEFAULT_VERTEX_HEALTH_ROUTE = "/health"


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps may share a process in tests)."""

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            self.available = False
            return
        self.available = True
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "cloudllm_requests", "HTTP requests by route and status code.", ["route", "status"], registry=self.registry
        )
        self.latency = prom.Histogram(
            "cloudllm_request_latency_seconds",
            "Time from request to the end of the response.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.batch_size = prom.Histogram(
            "cloudllm_batch_size",
            "Inputs per model call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.tokens = prom.Counter("cloudllm_generated_tokens", "Tokens generated.", registry=self.registry)
        prom.Gauge("cloudllm_queue_depth", "Requests waiting for a model call.", registry=self.registry).set_function(queue_depth)
        prom.Gauge("cloudllm_requests_in_flight", "Prediction requests being served.", registry=self.registry).set_function(in_flight)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        if self.available:
            self.requests.labels(route=route, status=str(status)).inc()
            self.latency.labels(route=route).observe(seconds)

    def observe_batch(self, size: int) -> None:
        if self.available:
            self.batch_size.observe(size)

    def add_tokens(self, count: int) -> None:
        if self.available and count > 0:
            self.tokens.inc(count)

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


class ServerState:
    """The app's moving parts: the engine (once loaded), the batcher and the counters."""

    def __init__(self, model_dir: str, settings: Any, engine_loader: EngineLoader) -> None:
        self.model_dir = model_dir
        self.settings = settings
        self.task = normalize_task(settings.task)
        self.engine_loader = engine_loader
        self.engine: Engine | None = None
        self.status = "loading"
        self.error: str | None = None
        self.in_flight = 0  # requests being served: body read, not yet answered
        self.metrics = Metrics(self._queue_depth, lambda: self.in_flight)
        self.batcher = Batcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_batch_wait_ms,
            # The KV cache GPU plans size: max_batch_size sequences of max_total_tokens. Shorter
            # sequences share it, so more of them than max_batch_size run together.
            max_batch_tokens=settings.max_batch_size * settings.max_total_tokens,
            key=batch_key,
            on_batch=self.metrics.observe_batch,
            row_parameter="adapter_id",  # requests for different LoRA adapters share a batch
            # Generation joins the engine's running batch between decode steps (continuous batching).
            schedule=self._schedule,
        )
        # Streams bypass the batcher: each waits in a thread for its tokens from the engine's decode
        # loop (or, where generate() serves it, for the engine's lock), so one thread per stream.
        self.stream_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, settings.max_concurrent_requests), thread_name_prefix="cloudllm-stream"
        )
        self.deployed_model_id = os.environ.get("AIP_DEPLOYED_MODEL_ID") or None

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="cloudllm-load", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        log_event("model_loading", model_dir=self.model_dir, task=self.task)
        try:
            engine = self.engine_loader(self.model_dir, self.settings)
            adapters.load_adapters(engine, self.settings, self.model_dir)
        except BaseException as exc:  # reported through /ping; the server stays up to say why
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"
            log_event("model_load_failed", level="error", error=self.error, traceback=traceback.format_exc())
            return
        engine.on_tokens = self.metrics.add_tokens
        engine.on_batch = self.metrics.observe_batch
        self.engine = engine
        self.status = "ready"
        log_event("model_loaded", task=self.task, seconds=round(time.monotonic() - started, 3), device=str(getattr(engine, "device", "")))

    def _schedule(self, inputs: list[Any], parameters: dict[str, Any], cancels: list[Any]) -> concurrent.futures.Future | None:
        submit = getattr(self.engine, "submit", None)
        return submit(inputs, parameters, cancels) if submit is not None else None

    def _queue_depth(self) -> float:
        loop = getattr(self.engine, "decode_loop", None)
        return self.batcher.queue_depth + (loop.waiting if loop is not None else 0)

    def _run_batch(self, inputs: list[Any], parameters: dict[str, Any], cancels: list[Any]) -> list[Prediction]:
        assert self.engine is not None
        return self.engine.run(inputs, parameters, cancels)

    def admit(self, request: Request) -> None:
        """Count request as being served from now on (the middleware uncounts it), or 429 past the limit."""
        if self.in_flight >= self.settings.max_concurrent_requests:
            raise RequestError(
                429, f"too many requests in flight (limit {self.settings.max_concurrent_requests}); retry shortly", "overloaded"
            )
        self.in_flight += 1
        _note(request, admitted=True)

    def require_engine(self) -> Engine:
        if self.engine is None:
            if self.status == "failed":
                raise RequestError(503, f"the model failed to load: {self.error}", "unavailable")
            raise RequestError(503, "the model is still loading; retry when /ping answers 200", "unavailable")
        return self.engine


def create_app(model_dir: str, settings: Any, engine_loader: EngineLoader = load_engine) -> Starlette:
    """The ASGI app serving model_dir with settings; the model starts loading when the app starts."""
    state = ServerState(model_dir, settings, engine_loader)
    vertex_predict = os.environ.get("AIP_PREDICT_ROUTE") or DEFAULT_VERTEX_PREDICT_ROUTE
    vertex_health = os.environ.get("AIP_HEALTH_ROUTE") or DEFAULT_VERTEX_HEALTH_ROUTE

    routes: list[Route] = []
    known: set[str] = set()
    taken: set[tuple[str, str]] = set()

    def add(path: str, endpoint: Callable[[Request], Awaitable[Response]], methods: list[str]) -> None:
        # The AIP_* routes may repeat ours (AIP_HEALTH_ROUTE=/health): the first wins, per method.
        free = [m for m in methods if (path, m) not in taken]
        if free:
            taken.update((path, m) for m in free)
            known.add(path)
            routes.append(Route(path, _guarded(endpoint), methods=free))

    health = functools.partial(_health, state)
    for path in (*HEALTH_ROUTES, vertex_health):
        add(path, health, ["GET"])
    for path in (SAGEMAKER_PREDICT_ROUTE, vertex_predict):
        add(path, functools.partial(_predict, state, mode="auto"), ["POST"])
    add("/generate", functools.partial(_predict, state, mode="generate"), ["POST"])
    add("/generate_stream", functools.partial(_predict, state, mode="stream"), ["POST"])
    add("/info", functools.partial(_info, state), ["GET"])
    add("/metrics", functools.partial(_metrics, state), ["GET"])
    openai_api.register(add, state)
    adapters.register(add, state)
    quiet_paths = {*HEALTH_ROUTES, vertex_health, "/metrics"}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.batcher.start()
        state.start_loading()
        grpc_server = None
        if settings.grpc_port is not None:
            from . import grpc_service

            grpc_server = grpc_service.start(state, asyncio.get_running_loop(), settings.extra.get("grpc_host", "0.0.0.0"), settings.grpc_port)
        try:
            yield
        finally:
            if grpc_server is not None:
                grpc_service.stop(grpc_server)
            await state.batcher.stop()
            state.stream_executor.shutdown(wait=False)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception},
        middleware=[
            Middleware(_RequestLog, state=state, known=known, quiet_paths=quiet_paths)
        ],
    )
    app.state.cloudllm = state
    return app


# --- endpoints ------------------------------------------------------------------------------


def _guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Client mistakes become their 4xx; anything else a logged 500, and the server keeps serving."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RequestError as exc:
            _note(request, error=exc.message)
            return _error_response(exc)
        except Exception as exc:
            info = _note(request, error=f"{type(exc).__name__}: {exc}")
            log_event(
                "internal_error",
                level="error",
                request_id=info.get("request_id"),
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
            )
            return _json(
                {"error": f"internal server error ({type(exc).__name__}); see the server log for request {info.get('request_id')}",
                 "error_type": "internal_error"},
                500,
            )

    return guarded


async def _health(state: ServerState, request: Request) -> Response:
    if state.status == "ready":
        return _json({"status": "ok"})
    body = {"status": state.status}
    if state.error:
        body["error"] = state.error
    return _json(body, 503)


async def _info(state: ServerState, request: Request) -> Response:
    s = state.settings
    engine = state.engine
    return _json(
        {
            "task": state.task,
            "status": state.status,
            "model_type": s.model_type,
            "architecture": s.architecture,
            "max_input_tokens": engine.max_input_tokens if engine else s.max_input_tokens,
            "max_total_tokens": s.max_total_tokens,
            "max_new_tokens": s.max_new_tokens,
            "max_batch_size": s.max_batch_size,
            "max_concurrent_requests": s.max_concurrent_requests,
            "intra_op_threads": _intra_op_threads(engine, s),
            "streaming": state.task in GENERATION_TASKS,
        }
    )


def _intra_op_threads(engine: Any, settings: Any) -> int:
    """torch's own count once the engine loaded (it set it); before that, what it will set."""
    if engine is None:
        return settings.resolved_intra_op_threads()
    import torch  # already imported by the engine: a dictionary lookup

    return torch.get_num_threads()


async def _metrics(state: ServerState, request: Request) -> Response:
    if not state.metrics.available:
        raise RequestError(404, "metrics are off: prometheus_client is not installed in this container", "not_found")
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


async def _predict(state: ServerState, request: Request, *, mode: str) -> Response:
    settings = state.settings
    engine = state.require_engine()
    if mode in ("generate", "stream") and state.task not in GENERATION_TASKS:
        raise RequestError(404, f"{request.url.path} serves text generation; this model serves {state.task}: use /invocations", "not_found")
    body = await _read_body(request, settings.max_body_bytes, settings.max_body_seconds)
    state.admit(request)
    if mode == "auto" and (b'"messages"' in body or b'"@requestFormat"' in body):
        # A chat request (TGI/LMI's messages, Vertex vLLM's chatCompletions instances) answers as /v1/chat/completions.
        data = decode_payload(body, request.headers.get("content-type"), settings.max_body_bytes)
        if openai_api.is_chat_body(data):
            return await openai_api.answer_platform_chat(state, request, data)
        if isinstance(data, dict):
            body = data
    req: InferenceRequest = await run_in_threadpool(
        parse_request, body, settings, content_type=request.headers.get("content-type")
    )
    if mode == "stream" and not req.stream:
        if req.form != "hf":
            raise validation_error("/generate_stream takes the {\"inputs\": ..., \"parameters\": ...} form")
        if len(req.inputs) != 1:
            raise validation_error(f"streaming takes one input, got {len(req.inputs)}")
        req = InferenceRequest(inputs=req.inputs, parameters=req.parameters, stream=True, form="hf", single=True)
    info = _note(request, inputs=len(req.inputs))
    if settings.log_payloads:
        info["payload"] = {"inputs": req.inputs, "parameters": req.parameters}
    if request.headers.get(adapters.SAGEMAKER_ADAPTER_HEADER) and "adapter_id" not in req.parameters:
        req.parameters["adapter_id"] = adapters.check_adapter_name(request.headers[adapters.SAGEMAKER_ADAPTER_HEADER])
    adapters.require_adapter(engine, req.parameters.get("adapter_id"))
    sizes = await run_in_threadpool(engine.validate, req.inputs, req.parameters)
    if req.stream:
        return StreamingResponse(
            _events(state, engine, req, info),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    predictions = await _unless_client_leaves(request, state.batcher, req, sizes)
    if predictions is None:
        info["error"] = "the client closed the connection; its generation was stopped"
        return Response(status_code=CLIENT_GONE)
    info["tokens"] = sum(p.generated_tokens for p in predictions)
    outputs = [p.output for p in predictions]
    if mode == "generate" and req.form == "hf" and req.single:
        return _json(outputs[0])
    return _json(format_response(req, outputs, state.task, style="tgi", deployed_model_id=state.deployed_model_id))


async def _events(state: ServerState, engine: Engine, req: InferenceRequest, info: dict[str, Any]) -> AsyncIterator[bytes]:
    """TGI's server-sent events: each token is sent as soon as the model produced it."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    finished = object()
    cancel = threading.Event()

    def on_token(token: Token) -> None:
        loop.call_soon_threadsafe(tokens.put_nowait, token)

    job = loop.run_in_executor(
        state.stream_executor,
        functools.partial(engine.generate_stream, req.inputs[0], req.parameters, on_token, cancel),  # type: ignore[attr-defined]
    )
    job.add_done_callback(lambda _: tokens.put_nowait(finished))
    last: Token | None = None  # the final token waits for the finished text it must carry
    index = 0
    try:
        while (item := await tokens.get()) is not finished:
            if item.id is None:  # text completed at the very end belongs to the last token
                last = Token(last.id, last.text + item.text, last.special) if last else item
            elif item.final:
                last = item
            else:
                if last is not None:  # generation went on past a token thought final (defensive)
                    index += 1
                    yield _event(index, last)
                    last = None
                index += 1
                yield _event(index, item)
        try:
            prediction: Prediction = job.result()
        except RequestError as exc:
            yield _sse({"error": exc.message, "error_type": exc.error_type})
            return
        except Exception as exc:
            log_event(
                "internal_error",
                level="error",
                request_id=info.get("request_id"),
                error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            )
            yield _sse({"error": f"generation failed ({type(exc).__name__})", "error_type": "generation"})
            return
        info["tokens"] = prediction.generated_tokens
        output = prediction.output
        index += 1
        yield _event(index, last, output.get(OUTPUT_KEYS[state.task]), output.get("details"))
    finally:
        cancel.set()  # the client went away or we are done: stop generating either way
        job.cancel()  # and if it is still queued behind other streams, never start it


async def _unless_client_leaves(request: Request, batcher: Batcher, req: InferenceRequest, sizes: list[int]) -> list[Prediction] | None:
    """The request's predictions, or None once its client hung up (its work is cancelled then)."""
    cancel = threading.Event()
    work = asyncio.ensure_future(batcher.submit(req.inputs, req.parameters, sizes=sizes, cancel=cancel))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left (or this handler was cancelled): stop the rows at the next token
            cancel.set()
            work.cancel()
    return work.result() if not work.cancelled() else None


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body is read by now, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(index: int, token: Token | None, generated_text: str | None = None, details: Any = None) -> bytes:
    body = {
        "index": index,
        "token": None if token is None else {"id": token.id, "text": token.text, "logprob": None, "special": token.special},
        "generated_text": generated_text,
        "details": details,
    }
    return _sse(body)


def _sse(body: Any) -> bytes:
    return b"data:" + _dumps(body) + b"\n\n"



async def _http_exception(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    if status == 404:
        detail = f"no route {request.method} {request.url.path}"
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    _note(request, error=detail)
    return _error_response(RequestError(status, detail))


def _error_response(exc: RequestError) -> Response:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return _json(exc.to_dict(), exc.status, headers=headers)





# --- per-request log, metrics and concurrency count -------------------------------------------


class _RequestLog:
    """ASGI middleware: request ids, the in-flight count, one log line and metrics per request.

    Pure ASGI rather than BaseHTTPMiddleware, so a stream is counted for its whole
    duration, and whatever escapes the routes still becomes a JSON 500.
    """

    def __init__(self, app: Any, *, state: ServerState, known: set[str], quiet_paths: set[str]) -> None:
        self.app = app
        self.state = state
        self.known = known
        self.quiet_paths = quiet_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = (headers.get("x-request-id") or headers.get("x-amzn-requestid") or uuid.uuid4().hex)[:128]
        info = scope.setdefault("cloudllm", {})
        info["request_id"] = request_id
        path = scope.get("path", "")
        route = path if path in self.known else "other"
        response = {"status": 500, "started": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["started"] = True
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            info.setdefault("error", f"{type(exc).__name__}: {exc}")
            if not response["started"]:
                log_event("internal_error", level="error", request_id=request_id, error=info["error"], traceback=traceback.format_exc())
                body = json.dumps({"error": f"internal server error ({type(exc).__name__})", "error_type": "internal_error"}).encode()
                await send_wrapper({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            # A response already under way (a stream) cannot change its status; the client sees it cut.
        finally:
            if info.pop("admitted", False):
                self.state.in_flight -= 1
            seconds = time.monotonic() - started
            status = response["status"]
            self.state.metrics.observe_request(route, status, seconds)
            # Health checks arrive every few seconds for the container's life; model_loaded / model_load_failed say their story.
            if path not in self.quiet_paths:
                fields = {
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "route": route if route != "other" else path[:200],
                    "status": status,
                    "latency_ms": round(seconds * 1000, 2),
                }
                for key in ("inputs", "tokens", "error", "payload"):
                    if key in info:
                        fields[key] = info[key]
                log_event("request", **fields)
