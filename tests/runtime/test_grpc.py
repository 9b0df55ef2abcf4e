"""The Open Inference Protocol v2 over gRPC, driven by Triton's own client (tritonclient[grpc]).

The server is a real subprocess started as a container starts it, with --grpc-port beside HTTP.
"""

from __future__ import annotations

import json
import queue
import re
from pathlib import Path
from typing import Callable, Iterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from .conftest import ServerProcess, free_port

SETTINGS = dict(task="text-generation", max_new_tokens=32, default_max_new_tokens=8, max_input_tokens=64, max_total_tokens=128)
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> Iterator[ServerProcess]:
    port = free_port()
    process = ServerProcess(artifact_factory(tiny_gpt2, **SETTINGS),
                            args=["serve", "--host", "127.0.0.1", "--port", "0", "--grpc-port", str(port)])  # fmt: skip
    process.grpc_port = port
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")


def text_inputs(prompt: str = PROMPT, **sampling: object) -> list[triton.InferInput]:
    """The inputs Triton's LLM backends take: text_input (BYTES) and scalar sampling tensors."""
    tensors = []
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    tensors.append(text)
    for name, value in sampling.items():
        kind, dtype = {bool: ("BOOL", np.bool_), int: ("INT32", np.int32), float: ("FP32", np.float32)}[type(value)]
        tensor = triton.InferInput(name, [1], kind)
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        tensors.append(tensor)
    return tensors


def native(server: ServerProcess, max_new_tokens: int) -> str:
    return httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens}},
                      timeout=60).json()["generated_text"]  # fmt: skip


def test_live_ready_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    name = client.get_model_metadata("").name
    assert client.is_model_ready(name)
    metadata = client.get_model_metadata(name, as_json=True)
    assert {"name": "text_input", "datatype": "BYTES", "shape": ["-1"]} in metadata["inputs"]
    assert metadata["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": ["-1"]}]
    with pytest.raises(InferenceServerException, match="no model"):
        client.is_model_ready("some-other-model")


def test_infer_answers_text_output_as_the_http_route_does(client: triton.InferenceServerClient, server: ServerProcess) -> None:
    result = client.infer("", text_inputs(max_tokens=6, temperature=0.0), outputs=[triton.InferRequestedOutput("text_output")])
    assert result.as_numpy("text_output")[0].decode() == native(server, 6)
    # Triton's vLLM backend form: the sampling parameters as one JSON string.
    params = triton.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"max_tokens": 6, "temperature": 0}).encode()], dtype=object))
    vllm_style = client.infer("", [text_inputs()[0], params])
    assert vllm_style.as_numpy("text_output")[0].decode() == native(server, 6)
    # Request parameters, as KServe's clients send them.
    assert client.infer("", text_inputs(), parameters={"max_tokens": 6, "temperature": 0}).as_numpy("text_output")[0].decode() == native(server, 6)


def test_stream_infer_sends_pieces_then_a_final_response(client: triton.InferenceServerClient, server: ServerProcess) -> None:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("", text_inputs(max_tokens=8, temperature=0.0, stream=True), enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, (error.message(), server.log()[-3000:])
            response = result.get_response()
            if response.parameters.get("triton_final_response") and response.parameters["triton_final_response"].bool_param:
                break
            pieces.append(result.as_numpy("text_output")[0].decode())
        assert len(pieces) > 1 and "".join(pieces) == native(server, 8)
        # A refused request in the stream is an error message; the stream goes on.
        client.async_stream_infer("", text_inputs("x " * 500, stream=True))
        result, error = results.get(timeout=60)
        assert result is None and "input tokens" in str(error)
        client.async_stream_infer("", text_inputs(max_tokens=4, temperature=0.0))
        result, error = results.get(timeout=60)
        assert error is None and result.as_numpy("text_output")[0].decode() == native(server, 4)
    finally:
        client.stop_stream()


@pytest.mark.parametrize(
    "inputs, parameters, fragment",
    [
        (lambda: text_inputs("x " * 500), None, "input tokens"),
        (lambda: text_inputs(max_tokens=10_000), None, "max_tokens"),
        (lambda: text_inputs(temperature=9.0), None, "temperature"),
        (lambda: [triton.InferInput("prompt", [1], "BYTES")], None, "unknown input"),
        (lambda: text_inputs(), {"frobnicate": 1}, "unknown parameter"),
    ],
)
def test_bad_requests_are_invalid_argument(client: triton.InferenceServerClient, inputs, parameters, fragment: str) -> None:
    tensors = inputs()
    for tensor in tensors:
        if tensor._raw_content is None and tensor.datatype() == "BYTES":
            tensor.set_data_from_numpy(np.array([b"hi"], dtype=object))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("", tensors, parameters=parameters)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and fragment in caught.value.message()


def test_health_and_reflection(server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        ])))  # fmt: skip
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        from google.protobuf import descriptor_pb2

        proto = descriptor_pb2.FileDescriptorProto.FromString(answers[1].file_descriptor_response.file_descriptor_proto[0])
        assert {m.name for m in proto.service[0].method} >= {"ServerLive", "ModelInfer", "ModelStreamInfer"}


def test_without_grpcio_the_server_serves_http_and_says_so(tiny_gpt2: Path, artifact_factory: Callable[..., Path], tmp_path: Path) -> None:
    shadow = tmp_path / "no-grpc" / "grpc"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'grpc'\", name='grpc')\n")
    process = ServerProcess(artifact_factory(tiny_gpt2, **SETTINGS), env={"PYTHONPATH": str(shadow.parent)},
                            args=["serve", "--host", "127.0.0.1", "--port", "0", "--grpc-port", str(free_port())])  # fmt: skip
    try:
        process.wait_ready()
        assert httpx.post(process.url + "/generate", json={"inputs": PROMPT}, timeout=60).status_code == 200
        off = [r for r in process.log_records() if r.get("event") == "grpc_off"]
        assert len(off) == 1 and "grpc is not installed" in off[0]["reason"]
    finally:
        process.stop()


def test_bytes_tensors_and_descriptors() -> None:
    from cloudllm_runtime.grpc_protocol import build_descriptors, decode_bytes_tensor, encode_bytes_tensor

    assert decode_bytes_tensor(encode_bytes_tensor([b"a", b"", "é".encode()])) == [b"a", b"", "é".encode()]
    with pytest.raises(ValueError, match="past the end"):
        decode_bytes_tensor(b"\x09\x00\x00\x00abc")
    _, classes = build_descriptors()
    assert classes["ModelInferRequest"].DESCRIPTOR.full_name == "inference.ModelInferRequest"


def test_one_stream_generator_serves_http_and_grpc(tiny_gpt2: Path) -> None:
    """engine.stream: pieces, then the Prediction as its return value; keep filters tokens; submit runs it in a
    pool; closing it early stops generating (the pool's worker comes back before max_new_tokens)."""
    from concurrent.futures import ThreadPoolExecutor

    from cloudllm_runtime.engine import load_engine
    from cloudllm_runtime.settings import ServingSettings

    engine = load_engine(str(tiny_gpt2), ServingSettings(task="text-generation", max_input_tokens=64, max_total_tokens=200))
    params = {"max_new_tokens": 12}
    whole = engine.predict(["Once upon a time"], params)[0]["generated_text"]
    with ThreadPoolExecutor(1) as pool:
        pieces = engine.stream("Once upon a time", params, keep=lambda t: not t.special, submit=pool.submit)
        texts = []
        while True:
            try:
                texts.append(next(pieces))
            except StopIteration as end:
                prediction = end.value
                break
        assert "".join(texts) == whole == prediction.output["generated_text"] and prediction.generated_tokens >= len(texts) > 1
        tokens: list[int] = []
        engine.on_tokens = tokens.append  # counts each decoding step's tokens: how far generation went
        early = engine.stream("Once upon a time", {"max_new_tokens": 150}, submit=pool.submit)
        next(early)
        early.close()  # cancels and waits for the worker: generation stopped at the next token, not at 150
        assert sum(tokens) < 150
        engine.on_tokens = None


def test_generated_tokens_are_counted_once_over_grpc(client: triton.InferenceServerClient, server: ServerProcess) -> None:
    """The engine counts tokens as it decodes; ModelInfer and ModelStreamInfer must not add them again."""

    def counted() -> float:
        return float(re.search(r"^cloudllm_generated_tokens_total (\S+)$", httpx.get(server.url + "/metrics").text, re.M).group(1))

    made = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True}},
                      timeout=60).json()["details"]["generated_tokens"]  # fmt: skip
    before = counted()
    client.infer("", text_inputs(max_tokens=5, temperature=0.0))
    assert counted() - before == made > 0

    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        before = counted()
        client.async_stream_infer("", text_inputs(max_tokens=5, temperature=0.0, stream=True), enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error.message()
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream()
    assert counted() - before == made
