"""The Vertex AI emulator through the real aiplatform_v1 clients (REST, anonymous) and plain HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from google.protobuf import json_format, struct_pb2

from cloudllm import api
from cloudllm.catalog.vertex_images import IMAGES
from cloudllm.providers.vertex import HANDLER_BOOTSTRAP
from tests.conftest import CLOUDLLM


@pytest.fixture(scope="module")
def v1():
    from google.cloud import aiplatform_v1

    return aiplatform_v1


@pytest.fixture(scope="module")
def clients(vertex_emulator, v1):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    kwargs = dict(transport="rest", credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=vertex_emulator.url))
    return {
        "endpoints": v1.EndpointServiceClient(**kwargs),
        "models": v1.ModelServiceClient(**kwargs),
        "predictions": v1.PredictionServiceClient(**kwargs),
        "parent": f"projects/{vertex_emulator.project}/locations/us-central1",
    }


@pytest.fixture(scope="module")
def artifact(vertex_emulator, tiny_gpt2: Path, tmp_path_factory) -> str:
    """The tiny model's artifact, packaged and uploaded with plain google-cloud-storage."""
    out = tmp_path_factory.mktemp("artifact") / "tiny"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLOUDLLM_HOME", str(tmp_path_factory.mktemp("home")))
        api.package(tiny_gpt2, out)
    bucket = vertex_emulator.storage_client().bucket("cloudllm-test")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        bucket.blob(f"raw/tiny/{path.relative_to(out)}").upload_from_filename(str(path))
    return "gs://cloudllm-test/raw/tiny/"


def _handler_model(v1, artifact: str, display_name: str = "tiny"):
    return v1.Model(
        display_name=display_name,
        artifact_uri=artifact,
        container_spec=v1.ModelContainerSpec(
            image_uri=IMAGES["handler-cpu"].uri,
            command=["python3", "-c", HANDLER_BOOTSTRAP],
            ports=[v1.Port(container_port=8080)],
            predict_route="/predict",
            health_route="/health",
        ),
    )


def _resources(v1, machine="n1-standard-4", accel=None, count=0, min_replicas=1, max_replicas=1, metrics=()):
    spec = v1.MachineSpec(machine_type=machine)
    if accel:
        spec.accelerator_type = v1.AcceleratorType[accel]
        spec.accelerator_count = count
    return v1.DedicatedResources(
        machine_spec=spec, min_replica_count=min_replicas, max_replica_count=max_replicas,
        autoscaling_metric_specs=[v1.AutoscalingMetricSpec(metric_name=m, target=t) for m, t in metrics],
    )  # fmt: skip


def test_models_upload_as_new_models_and_versions(vertex_emulator, clients, v1, artifact: str) -> None:
    from google.api_core import exceptions

    models, parent = clients["models"], clients["parent"]
    first = models.upload_model(parent=parent, model=_handler_model(v1, artifact, "versions")).result(timeout=30)
    assert first.model_version_id == "1"
    # a long-running operation is polled where the REST clients poll: GET /ui/{operation}
    assert any(r.startswith(f"GET /ui/{first.model}/operations/") for r in vertex_emulator.requests)

    second = models.upload_model(
        request=v1.UploadModelRequest(parent=parent, model=_handler_model(v1, artifact, "versions"), parent_model=first.model)
    ).result(timeout=30)
    assert (second.model, second.model_version_id) == (first.model, "2")
    assert models.get_model(name=first.model).version_id == "1"  # the first version stays the default
    assert models.get_model(name=f"{first.model}@2").version_id == "2"
    assert [m.version_id for m in models.list_model_versions(name=first.model)] == ["1", "2"]

    with pytest.raises(exceptions.BadRequest, match="empty or does not exist"):
        models.upload_model(parent=parent, model=_handler_model(v1, "gs://cloudllm-test/nothing-here/"))
    models.delete_model(name=first.model).result(timeout=30)
    with pytest.raises(exceptions.NotFound):
        models.get_model(name=first.model)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (dict(machine="g2-standard-8", accel="NVIDIA_TESLA_T4", count=1), "not supported for machine type \"g2-standard-8\""),
        (dict(machine="g2-standard-8"), "ACCELERATOR_TYPE_UNSPECIFIED"),
        (dict(machine="n1-standard-4", accel="NVIDIA_TESLA_T4", count=3), "NVIDIA_TESLA_T4\" x 3 is not supported"),
        (dict(machine="x9-huge-1"), "Machine type \"x9-huge-1\" is not supported"),
        (dict(min_replicas=0), "min_replica_count must be at least 1"),
        (dict(min_replicas=3, max_replicas=2), "max_replica_count (2) must be at least min_replica_count (3)"),
        (dict(metrics=[("aiplatform.googleapis.com/prediction/online/gpu/memory", 50)]), "is not supported"),
        (dict(metrics=[("aiplatform.googleapis.com/prediction/online/cpu/utilization", 150)]), "must be in 1..100"),
    ],
)
def test_deploy_validates_resources(clients, v1, artifact: str, resources: dict, message: str) -> None:
    from google.api_core import exceptions

    model = clients["models"].upload_model(parent=clients["parent"], model=_handler_model(v1, artifact, "invalid")).result(timeout=30)
    endpoint = clients["endpoints"].create_endpoint(parent=clients["parent"], endpoint=v1.Endpoint(display_name="invalid")).result(timeout=30)
    try:
        deployed = v1.DeployedModel(model=model.model, dedicated_resources=_resources(v1, **resources))
        with pytest.raises(exceptions.BadRequest) as info:
            clients["endpoints"].deploy_model(endpoint=endpoint.name, deployed_model=deployed, traffic_split={"0": 100})
        assert message in info.value.message
        with pytest.raises(exceptions.BadRequest, match="must sum to 100"):
            clients["endpoints"].deploy_model(
                endpoint=endpoint.name, deployed_model=v1.DeployedModel(model=model.model, dedicated_resources=_resources(v1)),
                traffic_split={"0": 90},
            )  # fmt: skip
    finally:
        clients["endpoints"].delete_endpoint(name=endpoint.name).result(timeout=30)
        clients["models"].delete_model(name=model.model).result(timeout=30)


def test_mutate_changes_scaling_in_place_and_refuses_the_rest(vertex_emulator, clients, v1, artifact: str) -> None:
    from google.api_core import exceptions
    from google.protobuf import field_mask_pb2

    endpoints, models = clients["endpoints"], clients["models"]
    model = models.upload_model(parent=clients["parent"], model=_handler_model(v1, artifact, "mutate")).result(timeout=30)
    endpoint = endpoints.create_endpoint(parent=clients["parent"], endpoint=v1.Endpoint(display_name="mutate")).result(timeout=30)
    cpu = "aiplatform.googleapis.com/prediction/online/cpu/utilization"
    try:
        deployed = endpoints.deploy_model(
            endpoint=endpoint.name, deployed_model=v1.DeployedModel(model=model.model, dedicated_resources=_resources(v1)),
            traffic_split={"0": 100},
        ).result(timeout=120).deployed_model  # fmt: skip
        scaling = ["dedicated_resources.min_replica_count", "dedicated_resources.max_replica_count", "dedicated_resources.autoscaling_metric_specs"]
        wanted = v1.DeployedModel(id=deployed.id, dedicated_resources=_resources(v1, min_replicas=2, max_replicas=5, metrics=[(cpu, 40)]))
        endpoints.mutate_deployed_model(endpoint=endpoint.name, deployed_model=wanted, update_mask=field_mask_pb2.FieldMask(paths=scaling)).result(timeout=30)
        (live,) = endpoints.get_endpoint(name=endpoint.name).deployed_models
        assert live.id == deployed.id and (live.dedicated_resources.min_replica_count, live.dedicated_resources.max_replica_count) == (2, 5)
        assert [(m.metric_name, m.target) for m in live.dedicated_resources.autoscaling_metric_specs] == [(cpu, 40)]
        assert live.dedicated_resources.machine_spec.machine_type == "n1-standard-4"

        machine = field_mask_pb2.FieldMask(paths=["dedicated_resources.machine_spec"])
        with pytest.raises(exceptions.BadRequest, match="cannot be mutated"):
            endpoints.mutate_deployed_model(endpoint=endpoint.name, deployed_model=wanted, update_mask=machine)
        backwards = v1.DeployedModel(id=deployed.id, dedicated_resources=_resources(v1, min_replicas=3, max_replicas=2))
        with pytest.raises(exceptions.BadRequest, match="must be at least min_replica_count"):
            endpoints.mutate_deployed_model(endpoint=endpoint.name, deployed_model=backwards, update_mask=field_mask_pb2.FieldMask(paths=scaling))
        with pytest.raises(exceptions.NotFound):
            endpoints.mutate_deployed_model(
                endpoint=endpoint.name, deployed_model=v1.DeployedModel(id="404", dedicated_resources=_resources(v1)),
                update_mask=field_mask_pb2.FieldMask(paths=scaling),
            )  # fmt: skip

        # UpdateModel of one version's labels; a label Vertex would refuse is refused
        version = f"{model.model}@{model.model_version_id}"
        models.update_model(model=v1.Model(name=version, labels={"team": "ml"}), update_mask=field_mask_pb2.FieldMask(paths=["labels"]))
        assert dict(models.get_model(name=version).labels) == {"team": "ml"}
        with pytest.raises(exceptions.BadRequest):
            models.update_model(model=v1.Model(name=version, labels={"Team": "ML"}), update_mask=field_mask_pb2.FieldMask(paths=["labels"]))
        endpoints.undeploy_model(endpoint=endpoint.name, deployed_model_id=deployed.id).result(timeout=60)
    finally:
        endpoints.delete_endpoint(name=endpoint.name).result(timeout=30)
        models.delete_model(name=model.model).result(timeout=30)


def test_a_deployed_model_serves_predict_raw_and_stream(vertex_emulator, clients, v1, artifact: str) -> None:
    from google.api_core import exceptions
    from google.protobuf import json_format, struct_pb2

    endpoints, models = clients["endpoints"], clients["models"]
    model = models.upload_model(parent=clients["parent"], model=_handler_model(v1, artifact, "serving")).result(timeout=30)
    endpoint = endpoints.create_endpoint(parent=clients["parent"], endpoint=v1.Endpoint(display_name="serving")).result(timeout=30)
    deployed = endpoints.deploy_model(
        endpoint=endpoint.name, deployed_model=v1.DeployedModel(model=model.model, dedicated_resources=_resources(v1)),
        traffic_split={"0": 100},
    ).result(timeout=300).deployed_model  # fmt: skip
    assert dict(endpoints.get_endpoint(name=endpoint.name).traffic_split) == {deployed.id: 100}

    # predict: the real PredictionServiceClient, answered by the generated server
    response = clients["predictions"].predict(
        endpoint=endpoint.name,
        instances=[json_format.ParseDict("Once upon a time", struct_pb2.Value())],
        parameters=json_format.ParseDict({"max_new_tokens": 5}, struct_pb2.Value()),
    )
    assert response.deployed_model_id == deployed.id and len(response.predictions) == 1

    # rawPredict passes the body through; streamRawPredict streams the server's events
    url = f"{vertex_emulator.url}/v1/{endpoint.name}"
    raw = httpx.post(f"{url}:rawPredict", json={"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 5}})
    assert raw.status_code == 200 and len(raw.json()["predictions"]) == 1
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 5}, "stream": True}
    with httpx.stream("POST", f"{url}:streamRawPredict", json=body) as stream:
        assert stream.status_code == 200
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert events and all("token" in json.loads(e[len("data:"):]) or "generated_text" in e for e in events)
    bad = httpx.post(f"{url}:rawPredict", json={"instances": "not a list"})
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"

    # what Vertex refuses while a model is deployed
    with pytest.raises(exceptions.BadRequest, match="must sum to 100"):
        from google.protobuf import field_mask_pb2

        endpoints.update_endpoint(
            endpoint=v1.Endpoint(name=endpoint.name, traffic_split={deployed.id: 50}),
            update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
        )
    with pytest.raises(exceptions.BadRequest, match="has deployed models"):
        endpoints.delete_endpoint(name=endpoint.name)
    with pytest.raises(exceptions.BadRequest, match="is deployed"):
        models.delete_model(name=model.model)

    endpoints.undeploy_model(endpoint=endpoint.name, deployed_model_id=deployed.id).result(timeout=60)
    assert deployed.id not in vertex_emulator.state.replicas
    endpoints.delete_endpoint(name=endpoint.name).result(timeout=30)
    models.delete_model(name=model.model).result(timeout=30)


def test_emulate_vertex_prints_the_environment_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [CLOUDLLM, "emulate", "vertex", "--port", "0", "--storage-port", "0", "--bucket", "ci-bucket"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "CLOUDLLM_VERTEX_ENDPOINT")},
    )  # fmt: skip
    try:
        exports = {}
        for line in process.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export "):].strip().partition("=")
                exports[key] = value
            elif line.startswith("#"):
                break
        assert set(exports) == {"STORAGE_EMULATOR_HOST", "CLOUDLLM_VERTEX_ENDPOINT", "CLOUDLLM_VERTEX_GRPC_ENDPOINT", "GOOGLE_CLOUD_PROJECT"}
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        gcs = storage.Client(project="p", credentials=AnonymousCredentials(), client_options={"api_endpoint": exports["STORAGE_EMULATOR_HOST"]})
        assert gcs.lookup_bucket("ci-bucket") is not None
        parent = f"projects/{exports['GOOGLE_CLOUD_PROJECT']}/locations/us-central1"
        listed = httpx.get(f"{exports['CLOUDLLM_VERTEX_ENDPOINT']}/v1/{parent}/endpoints")
        assert listed.status_code == 200 and listed.json() == {}
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def _engine_model(v1, artifact: str, runtime: str):
    routes = {"tgi": ("/predict", "/health"), "vllm": ("/generate", "/ping")}[runtime]
    return v1.Model(
        display_name=f"engine-{runtime}",
        artifact_uri=artifact,
        container_spec=v1.ModelContainerSpec(
            image_uri=IMAGES[runtime].uri, ports=[v1.Port(container_port=8080)], predict_route=routes[0], health_route=routes[1]
        ),
    )


def _deploy_engine(clients, v1, artifact: str, runtime: str):
    model = clients["models"].upload_model(parent=clients["parent"], model=_engine_model(v1, artifact, runtime)).result(timeout=30)
    endpoint = clients["endpoints"].create_endpoint(parent=clients["parent"], endpoint=v1.Endpoint(display_name=f"engine-{runtime}")).result(timeout=30)
    resources = _resources(v1, machine="g2-standard-8", accel="NVIDIA_L4", count=1)
    deployed = clients["endpoints"].deploy_model(
        endpoint=endpoint.name, deployed_model=v1.DeployedModel(model=model.model, dedicated_resources=resources), traffic_split={"0": 100}
    ).result(timeout=300).deployed_model
    return model, endpoint, deployed


def _undeploy_engine(clients, model, endpoint, deployed) -> None:
    clients["endpoints"].undeploy_model(endpoint=endpoint.name, deployed_model_id=deployed.id).result(timeout=60)
    clients["endpoints"].delete_endpoint(name=endpoint.name).result(timeout=30)
    clients["models"].delete_model(name=model.model).result(timeout=30)


def test_a_tgi_image_answers_as_tgi_vertex_route_and_refuses_what_it_refuses(vertex_emulator, clients, v1, artifact: str) -> None:
    """TGI's Vertex route (router/src/vertex.rs): {"instances": [{"inputs", "parameters"}]} only, whole predictions only."""
    model, endpoint, deployed = _deploy_engine(clients, v1, artifact, "tgi")
    url = f"{vertex_emulator.url}/v1/{endpoint.name}"
    body = {"instances": [{"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3}}]}
    raw = httpx.post(f"{url}:rawPredict", json=body)
    assert raw.status_code == 200 and [type(p) for p in raw.json()["predictions"]] == [str]
    streamed = httpx.post(f"{url}:streamRawPredict", json=body)  # TGI's route never streams: one JSON answer
    assert streamed.status_code == 200 and len(streamed.json()["predictions"]) == 1
    for bad, says in [
        ({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3}, "stream": True}, "missing field `instances`"),
        ({"instances": "Once upon a time"}, "invalid type"),
        ({"instances": [{"prompt": "Once upon a time"}]}, "did not match any variant of untagged enum VertexInstance"),
        ({"instances": []}, "Input validation error"),
    ]:
        refused = httpx.post(f"{url}:streamRawPredict", json=bad)
        assert refused.status_code == 400 and "answered 422" in refused.json()["error"]["message"] and says in refused.json()["error"]["message"], bad
    _undeploy_engine(clients, model, endpoint, deployed)


def test_a_vllm_image_answers_as_the_model_garden_server_and_streams_nul_separated_json(vertex_emulator, clients, v1, artifact: str) -> None:
    """The Model Garden vLLM server's /generate: prompt + SamplingParams per instance, raw_response, NUL-separated stream frames."""
    model, endpoint, deployed = _deploy_engine(clients, v1, artifact, "vllm")
    url = f"{vertex_emulator.url}/v1/{endpoint.name}"
    instance = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    raw = httpx.post(f"{url}:rawPredict", json={"instances": [{**instance, "raw_response": True}]}).json()
    (text,) = raw["predictions"]
    assert text and 1 <= raw["output_token_counts"][0] <= 4
    formatted = httpx.post(f"{url}:rawPredict", json={"instances": [instance]}).json()["predictions"][0]
    assert formatted == f"Prompt:\nOnce upon a time\nOutput:\n{text.strip(chr(10))}"  # without raw_response the prompt is echoed

    with httpx.stream("POST", f"{url}:streamRawPredict", json={"instances": [{**instance, "stream": True, "raw_response": True}]}) as stream:
        assert stream.status_code == 200
        frames = [json.loads(f) for f in stream.read().split(b"\0") if f.strip()]
    assert len(frames) > 1 and "".join(f["predictions"][0] for f in frames) == text

    predicted = clients["predictions"].predict(
        endpoint=endpoint.name, instances=[json_format.ParseDict({**instance, "raw_response": True}, struct_pb2.Value())]
    )
    assert list(predicted.predictions) == [text]
    for bad, status in [
        ({"inputs": "Once upon a time", "stream": True}, 500),  # KeyError: 'prompt'
        ({"instances": [{**instance, "max_new_tokens": 4}]}, 500),  # TypeError: SamplingParams got an unexpected keyword
        ({"instances": [{**instance, "stream": True}, instance]}, 400),  # stream=True can only be used with a single prompt
    ]:
        refused = httpx.post(f"{url}:streamRawPredict", json=bad)
        assert refused.status_code == status and f"answered {status}" in refused.json()["error"]["message"], bad
    _undeploy_engine(clients, model, endpoint, deployed)


def test_unknown_fields_are_refused_as_vertex_refuses_them(vertex_emulator, clients) -> None:
    parent = clients["parent"]
    refused = httpx.post(f"{vertex_emulator.url}/v1/{parent}/endpoints", json={"displayName": "strict", "trafficSplitt": {}})
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("Invalid JSON payload received.")
    assert "trafficSplitt" in refused.json()["error"]["message"]
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "strict"]
