"""gRPC on Vertex AI: the handler's model declares grpcPorts, and the Open Inference Protocol v2 goes
through PredictionService's DirectRawPredict / StreamDirectRawPredict (the real aiplatform_v1
client, over gRPC) to the container's gRPC port, in the Vertex AI emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from cloudllm import api
from cloudllm.errors import UserError

from .conftest import assert_one_line_error, run_cli

NAME = "grpc-vx"


@pytest.fixture(scope="module")
def grpc_endpoint(vertex_emulator, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLOUDLLM_HOME", str(home))
        result = api.deploy(tiny_gpt2, provider="vertex", name=NAME, runtime="handler", instance="n1-standard-4", bucket=vertex_emulator.bucket)
        yield result.endpoint, home


def _model_spec(endpoint: Any):
    """The real client's view of the deployed model's container spec (and the clients, for raw calls)."""
    import os

    from google.cloud import aiplatform_v1 as v1

    from cloudllm.providers.vertex.session import Clients

    clients = Clients.create("us-central1", os.environ["CLOUDLLM_VERTEX_ENDPOINT"])
    deployed = clients.endpoints.get_endpoint(name=endpoint.details["endpoint"]).deployed_models[0]
    return clients, clients.models.get_model(request=v1.GetModelRequest(name=f"{deployed.model}@{deployed.model_version_id}")).container_spec


@pytest.mark.slow  # ~25 s: a Vertex AI deploy to the emulator
def test_invoke_grpc_goes_through_direct_raw_predict(vertex_emulator, grpc_endpoint) -> None:
    endpoint, home = grpc_endpoint
    env = {"CLOUDLLM_HOME": str(home)}
    clients, spec = _model_spec(endpoint)
    assert [p.container_port for p in spec.grpc_ports] == [8081] and [p.container_port for p in spec.ports] == [8080]

    native = run_cli("invoke", NAME, "Once upon a time", "--max-new-tokens", "6", env=env)
    assert native.returncode == 0, native.stderr
    whole = run_cli("invoke", NAME, "Once upon a time", "--max-new-tokens", "6", "--grpc", env=env)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == native.stdout
    streamed = run_cli("invoke", NAME, "Once upon a time", "--max-new-tokens", "6", "--grpc", "--stream", env=env)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == native.stdout
    from tests.test_proxy import status_routes

    routes = status_routes(NAME, home)
    assert routes["grpc"]["available"] and "DirectRawPredict" in routes["grpc"]["how"]
    assert routes["openai"]["route"] == endpoint.url and "chatCompletions" in routes["openai"]["how"]
    requests = list(vertex_emulator.requests)
    assert not any(":predict" in r or "RawPredict" in r for r in requests[-3:]), "gRPC went over REST predict"

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLOUDLLM_HOME", str(home))
        pieces = list(api.invoke_grpc(NAME, "Once upon a time", parameters={"max_new_tokens": 6}, stream=True))
        assert len(pieces) > 1 and "".join(pieces) == native.stdout.rstrip("\n")

    # The same request through the REST transport's directRawPredict, with the real client and message types.
    from google.cloud import aiplatform_v1 as v1

    from cloudllm_runtime.grpc_protocol import SERVICE, build_descriptors, decode_bytes_tensor, encode_bytes_tensor

    _, m = build_descriptors()
    infer = m["ModelInferRequest"]()
    infer.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    infer.raw_input_contents.append(encode_bytes_tensor([b"Once upon a time"]))
    infer.parameters["max_tokens"].int64_param = 6
    infer.parameters["temperature"].double_param = 0.0
    answer = clients.predictions.direct_raw_predict(
        request=v1.DirectRawPredictRequest(endpoint=endpoint.details["endpoint"], method_name=f"/{SERVICE}/ModelInfer/", input=infer.SerializeToString())
    )
    response = m["ModelInferResponse"].FromString(answer.output)
    assert decode_bytes_tensor(response.raw_output_contents[0])[0].decode() == native.stdout.rstrip("\n")

    # The container's own refusal (INVALID_ARGUMENT) comes back as one line, and a method that is not a gRPC path is the API's.
    assert_one_line_error(run_cli("invoke", NAME, "hi", "--grpc", "--max-new-tokens", "100000", env=env), contains="max_tokens")
    from google.api_core import exceptions

    with pytest.raises(exceptions.BadRequest, match="namespace.Service/Method"):
        clients.predictions.direct_raw_predict(request=v1.DirectRawPredictRequest(endpoint=endpoint.details["endpoint"], method_name="ModelInfer"))


def test_engines_without_grpc_are_refused_with_the_reason(vertex_emulator, tiny_gpt2: Path, tmp_path) -> None:
    """TGI and vLLM serve no Open Inference Protocol gRPC: their models declare no grpcPorts and invoke --grpc says so."""
    vertex_emulator.serve_engine_images = False
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CLOUDLLM_HOME", str(tmp_path))
            result = api.deploy(tiny_gpt2, provider="vertex", name="grpc-tgi", runtime="tgi", instance="g2-standard-8", bucket=vertex_emulator.bucket)
            _, spec = _model_spec(result.endpoint)
            assert not spec.grpc_ports and "CLOUDLLM_GRPC_PORT" not in {e.name for e in spec.env}
            with pytest.raises(UserError, match="runs tgi, whose server speaks no Open Inference Protocol gRPC"):
                list(api.invoke_grpc("grpc-tgi", "hi"))
            from tests.test_proxy import status_routes

            assert "no Open Inference Protocol gRPC" in status_routes("grpc-tgi", tmp_path)["grpc"]["how"]
            api.delete("grpc-tgi", provider="vertex", purge_artifacts=True)
    finally:
        vertex_emulator.serve_engine_images = True
