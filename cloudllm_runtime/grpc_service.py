"""The Open Inference Protocol v2 over gRPC, beside the HTTP routes (``--grpc-port``).

KServe's and Triton's ``inference.GRPCInferenceService``: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer and ModelStreamInfer, with the tensors Triton's LLM
backends (vLLM, TensorRT-LLM) use: a BYTES ``text_input`` in, a BYTES ``text_output`` out, and
optional ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stream`` tensors or a JSON
``sampling_parameters`` (the vLLM backend's), or the same names as request parameters. Sampling
follows the OpenAI routes (temperature 1 unless 0). ModelStreamInfer with ``stream`` true answers
one response per piece of text and a last empty one marked ``triton_final_response``.
A LoRA adapter is picked as the REST routes pick it: the ``adapter_id`` request parameter (TGI's
name) or a ``model_name`` naming the adapter (as OpenAI's "model"); an unknown one is NOT_FOUND.
Also ``grpc.health.v1.Health`` (SERVING once the model is loaded) and server reflection.

The messages come from grpc_protocol (a table built into a descriptor pool of our own), so the
runtime needs only grpcio and protobuf, both optional: without them the server runs HTTP alone and
says so in one log line.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent import futures
from typing import Any, Iterator

from .grpc_protocol import (
    FINAL_RESPONSE, INPUT_TENSOR, MAX_MESSAGE_BYTES, METHODS, OUTPUT_TENSOR, PROTOCOL_VERSION, SAMPLING_TENSORS, SERVICE,
    build_descriptors, encode_bytes_tensor, parameter_value, tensor_values,
)  # fmt: skip

# --- the service --------------------------------------------------------------------------------


class InferenceService:
    """The handlers, over the HTTP app's ServerState; generation goes through the same batcher."""

    def __init__(self, state: Any, loop: asyncio.AbstractEventLoop, classes: dict[str, type]) -> None:
        self.state = state
        self.loop = loop
        self.m = classes
        self.model_name = _model_name(state)

    # Health and metadata.
    def ServerLive(self, request: Any, context: Any) -> Any:
        return self.m["ServerLiveResponse"](live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return self.m["ServerReadyResponse"](ready=self.state.status == "ready")

    def ModelReady(self, request: Any, context: Any) -> Any:
        self._check_model(request.name, context)
        return self.m["ModelReadyResponse"](ready=self.state.status == "ready")

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self.m["ServerMetadataResponse"](name="cloudllm", version=PROTOCOL_VERSION, extensions=[])

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        self._check_model(request.name, context)
        tensor = self.m["ModelMetadataResponse"].TensorMetadata
        return self.m["ModelMetadataResponse"](
            name=self.model_name,
            versions=["1"],
            platform="cloudllm_transformers",
            inputs=[tensor(name=INPUT_TENSOR, datatype="BYTES", shape=[-1]),
                    *(tensor(name=n, datatype=_SAMPLING_TYPES[n], shape=[1]) for n in (*SAMPLING_TENSORS, "stream"))],
            outputs=[tensor(name=OUTPUT_TENSOR, datatype="BYTES", shape=[-1])],
        )  # fmt: skip

    # Inference.
    def ModelInfer(self, request: Any, context: Any) -> Any:
        prompts, parameters, _ = self._parse(request, context)
        engine = self._engine(context)
        self._validate(engine, prompts, parameters, context)
        future = asyncio.run_coroutine_threadsafe(self.state.batcher.submit(prompts, parameters), self.loop)
        predictions = self._result(future, context)
        return self._response(request, [_text(self.state, p, parameters) for p in predictions], parameters)

    def ModelStreamInfer(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        for request in requests:
            try:
                yield from self._stream_one(request, context)
            except _Refused as refused:  # a stream carries many requests: one's refusal is an error message, not the end
                yield self.m["ModelStreamInferResponse"](error_message=refused.message)

    def _stream_one(self, request: Any, context: Any) -> Iterator[Any]:
        prompts, parameters, stream = self._parse(request, context, streaming=True)
        engine = self._engine(context, streaming=True)
        self._validate(engine, prompts, parameters, context, streaming=True)
        wrap = self.m["ModelStreamInferResponse"]
        if not stream:
            future = asyncio.run_coroutine_threadsafe(self.state.batcher.submit(prompts, parameters), self.loop)
            predictions = self._result(future, context, streaming=True)
            yield wrap(infer_response=self._response(request, [_text(self.state, p, parameters) for p in predictions], parameters))
            return
        if len(prompts) != 1:
            raise _Refused(f"streaming takes one {INPUT_TENSOR} element, got {len(prompts)}")
        # Special tokens are not text; a client that leaves closes this generator, which stops generating.
        pieces = engine.stream(prompts[0], parameters, keep=lambda t: not t.special, submit=self.state.stream_executor.submit)
        try:
            while True:
                try:
                    piece = next(pieces)
                except StopIteration:  # the engine counted the tokens as it decoded (engine.on_tokens)
                    break
                except Exception as exc:  # reported to the client as this request's error
                    raise _Refused(f"generation failed: {exc}") from None
                if piece:
                    yield wrap(infer_response=self._response(request, [piece], parameters))
        finally:
            pieces.close()
        flag = request.parameters.get("triton_enable_empty_final_response")
        if flag is not None and parameter_value(flag):
            yield wrap(infer_response=self._response(request, [], parameters, final=True))

    # Pieces.
    def _check_model(self, name: str, context: Any) -> None:
        import grpc

        if name and name != self.model_name and name not in self._adapter_names():
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {name!r} here; this server has: {', '.join([self.model_name, *self._adapter_names()])}")

    def _adapter_names(self) -> list[str]:
        engine = self.state.engine
        return list(engine.adapters.names) if engine is not None and engine.adapters is not None else []

    def _adapter(self, model_name: str, adapter_id: Any, context: Any, streaming: bool) -> str | None:
        """The LoRA adapter a request asks for, as the REST routes read it: the `adapter_id` parameter
        (TGI's name) or a model_name naming an adapter (as OpenAI's "model" does); None for the base."""
        import grpc

        held = self._adapter_names()
        self._check_model(model_name, context)
        by_name = model_name if model_name in held else None
        if adapter_id is None:
            return by_name
        if not isinstance(adapter_id, str) or adapter_id not in held:
            has = f"this server has: {', '.join(held)}" if held else "this server has no adapters"
            self._abort(context, grpc.StatusCode.NOT_FOUND, f"unknown adapter {json.dumps(adapter_id)}; {has}", streaming)
        if by_name is not None and by_name != adapter_id:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"model_name {model_name!r} and adapter_id {adapter_id!r} name different adapters; send one", streaming)
        return adapter_id

    def _engine(self, context: Any, streaming: bool = False) -> Any:
        import grpc

        from .protocol import GENERATION_TASKS

        if self.state.status != "ready":
            self._abort(context, grpc.StatusCode.UNAVAILABLE, f"the model is {self.state.status}; retry when ServerReady is true", streaming)
        if self.state.task not in GENERATION_TASKS:
            self._abort(context, grpc.StatusCode.UNIMPLEMENTED, f"this model serves {self.state.task}; gRPC serves text generation", streaming)
        return self.state.engine

    def _parse(self, request: Any, context: Any, streaming: bool = False) -> tuple[list[str], dict[str, Any], bool]:
        """Prompts, the engine's parameters and whether to stream; triton_* request parameters are the client's, not sampling."""
        import grpc

        from .openai_api import SAMPLING_FIELDS, sampling_parameters
        from .protocol import RequestError

        try:
            fields: dict[str, Any] = {k: parameter_value(v) for k, v in request.parameters.items() if not k.startswith("triton_")}
            adapter = self._adapter(request.model_name, fields.pop("adapter_id", None), context, streaming)
            prompts: list[str] | None = None
            for index, tensor in enumerate(request.inputs):
                values = tensor_values(request, index)
                if tensor.name == INPUT_TENSOR:
                    prompts = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
                elif tensor.name == "sampling_parameters":  # Triton's vLLM backend: one JSON object
                    loaded = json.loads(values[0]) if values else {}
                    if not isinstance(loaded, dict):
                        raise ValueError("sampling_parameters must hold a JSON object")
                    fields.update(loaded)
                elif tensor.name in (*SAMPLING_TENSORS, "stream", "exclude_input_in_output"):
                    if len(values) != 1:
                        raise ValueError(f"input {tensor.name!r} takes one value, got {len(values)}")
                    value = values[0].decode("utf-8") if isinstance(values[0], bytes) else values[0]
                    fields[tensor.name] = float(value) if tensor.datatype.upper() in ("FP32", "FP64") else value
                else:
                    raise ValueError(f"unknown input {tensor.name!r}; this model takes {INPUT_TENSOR} and {', '.join(SAMPLING_TENSORS)}, stream")
            if not prompts:
                raise ValueError(f"the request has no {INPUT_TENSOR} (a BYTES tensor of prompts)")
            fields.pop("exclude_input_in_output", None)  # the output never repeats the prompt
            unknown = sorted(set(fields) - SAMPLING_FIELDS)
            if unknown:
                raise ValueError(f"unknown parameter {unknown[0]!r}; accepted: {', '.join(sorted(SAMPLING_FIELDS))}")
            for key in [k for k, v in fields.items() if isinstance(v, float) and k in ("max_tokens", "top_k", "seed") and v.is_integer()]:
                fields[key] = int(fields[key])
            parameters, n, stream = sampling_parameters(fields, self.state.settings)
            if adapter is not None:
                parameters["adapter_id"] = adapter
            if n != 1:
                raise ValueError("n must be 1 over gRPC (send the prompt several times instead)")
            return prompts, parameters, stream
        except (ValueError, UnicodeDecodeError, RequestError) as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, getattr(exc, "message", None) or str(exc), streaming)
            raise  # not reached: abort raises

    def _validate(self, engine: Any, prompts: list[str], parameters: dict[str, Any], context: Any, streaming: bool = False) -> None:
        import grpc

        from .protocol import RequestError

        try:
            engine.validate(prompts, parameters)
        except RequestError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message, streaming)

    def _result(self, future: Any, context: Any, streaming: bool = False) -> Any:
        import grpc

        from .protocol import RequestError

        try:
            return future.result()
        except RequestError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message, streaming)

    @staticmethod
    def _abort(context: Any, code: Any, message: str, streaming: bool) -> None:
        if streaming:
            raise _Refused(message)
        context.abort(code, message)

    def _response(self, request: Any, texts: list[str], parameters: dict[str, Any], *, final: bool = False) -> Any:
        # model_name says which model answered, as Triton's does: the adapter when one was picked.
        answered_by = parameters.get("adapter_id") or self.model_name
        response = self.m["ModelInferResponse"](model_name=answered_by, model_version="1", id=request.id)
        if final:
            response.parameters[FINAL_RESPONSE].bool_param = True
            return response
        response.outputs.add(name=OUTPUT_TENSOR, datatype="BYTES", shape=[len(texts)])
        response.raw_output_contents.append(encode_bytes_tensor([t.encode("utf-8") for t in texts]))
        return response


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_SAMPLING_TYPES = {"max_tokens": "INT32", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32", "seed": "UINT64",
                   "stop": "BYTES", "repetition_penalty": "FP32", "stream": "BOOL"}  # fmt: skip


def _text(state: Any, prediction: Any, parameters: dict[str, Any]) -> str:
    from .openai_api import text_and_reason

    return text_and_reason(state, prediction, parameters)[0]


def _model_name(state: Any) -> str:
    from .openai_api import model_id

    return model_id(state)


# --- the server ---------------------------------------------------------------------------------


def start(state: Any, loop: asyncio.AbstractEventLoop, host: str, port: int) -> Any:
    """Start the gRPC server on host:port (0 picks a port); None, with one log line, without grpcio."""
    from .log import log_event

    try:
        import grpc
        from google.protobuf import descriptor_pb2  # noqa: F401
    except ImportError as exc:
        log_event("grpc_off", level="warning", reason=f"{exc.name or exc} is not installed in this container; serving HTTP only")
        return None
    pool, classes = build_descriptors()
    service = InferenceService(state, loop, classes)
    handlers = {}
    for name, (request, response, client_streams, server_streams) in METHODS.items():
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(client_streams, server_streams)]
        handlers[name] = make(getattr(service, name), request_deserializer=classes[request].FromString,
                              response_serializer=classes[response].SerializeToString)  # fmt: skip
    workers = max(8, min(64, int(state.settings.max_concurrent_requests)))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloudllm-grpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    names = [SERVICE, *_add_health(server, state, pool), *_add_reflection(server, pool)]
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(target)
    if not bound:
        log_event("grpc_off", level="error", reason=f"cannot listen on {target} for gRPC; serving HTTP only")
        return None
    server.start()
    server.cloudllm_port = bound
    log_event("grpc_listening", host=host, port=bound, services=names)
    return server


def _add_health(server: Any, state: Any, pool: Any) -> list[str]:
    """grpc.health.v1: NOT_SERVING while the model loads, SERVING once it has (for the server and the service)."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:
        return []
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    _copy_file(pool, health_pb2.DESCRIPTOR)

    def follow() -> None:
        while state.status == "loading":
            time.sleep(0.05)
        status = health_pb2.HealthCheckResponse.SERVING if state.status == "ready" else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            servicer.set(name, status)

    for name in ("", SERVICE):
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    threading.Thread(target=follow, name="cloudllm-grpc-health", daemon=True).start()
    return [health.SERVICE_NAME]


def _add_reflection(server: Any, pool: Any) -> list[str]:
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        return []
    names = [SERVICE, reflection.SERVICE_NAME]
    try:
        from grpc_health.v1 import health

        names.append(health.SERVICE_NAME)
    except ImportError:
        pass
    reflection.enable_server_reflection(names, server, pool=pool)
    return [reflection.SERVICE_NAME]


def _copy_file(pool: Any, file_descriptor: Any) -> None:
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    pool.Add(proto)


def stop(server: Any, grace: float = 5.0) -> None:
    if server is not None:
        server.stop(grace).wait(grace + 1)
