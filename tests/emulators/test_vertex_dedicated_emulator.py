"""The Vertex AI emulator's dedicated endpoints and invoke-enabled models hold the real service's preconditions,
checked through the real aiplatform clients (REST, anonymous) and plain HTTP to the dedicated DNS on loopback."""

from __future__ import annotations

import httpx
import pytest

from tests.emulators.test_vertex_emulator import _handler_model, _resources, artifact, clients, v1  # noqa: F401  (fixtures)

PROMPT = {"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 4, "do_sample": False}}


def _invoke_enabled_model(v1, artifact: str, display_name: str = "tiny", prefix: str = "/*"):  # noqa: F811
    model = _handler_model(v1, artifact, display_name)
    model.container_spec.predict_route = ""
    model.container_spec.invoke_route_prefix = prefix
    return model


@pytest.mark.parametrize(
    ("predict_route", "prefix", "message"),
    [("", "/v1/*", 'is the only supported value'), ("/predict", "/*", "Only one of container_spec.predict_route or")],
)
def test_upload_takes_only_the_invoke_prefix_vertex_supports(clients, v1, artifact: str, predict_route, prefix, message) -> None:  # noqa: F811
    from google.api_core import exceptions

    model = _invoke_enabled_model(v1, artifact, "bad-prefix", prefix)
    model.container_spec.predict_route = predict_route
    with pytest.raises(exceptions.BadRequest, match=message):
        clients["models"].upload_model(parent=clients["parent"], model=model)


def test_an_invoke_enabled_model_deploys_only_to_a_dedicated_endpoint(clients, v1, artifact: str) -> None:  # noqa: F811
    from google.api_core import exceptions

    models, endpoints, parent = clients["models"], clients["endpoints"], clients["parent"]
    model = models.upload_model(parent=parent, model=_invoke_enabled_model(v1, artifact, "invoke-shared")).result(timeout=30).model
    assert models.get_model(name=model).container_spec.invoke_route_prefix == "/*"
    shared = endpoints.create_endpoint(parent=parent, endpoint=v1.Endpoint(display_name="invoke-shared")).result(timeout=30)
    assert not shared.dedicated_endpoint_enabled and not shared.dedicated_endpoint_dns
    with pytest.raises(exceptions.BadRequest, match="can only be deployed to a dedicated endpoint"):
        endpoints.deploy_model(endpoint=shared.name, deployed_model=v1.DeployedModel(model=model, dedicated_resources=_resources(v1)))
    assert not endpoints.get_endpoint(name=shared.name).deployed_models


def test_a_dedicated_endpoint_answers_on_its_own_dns_only(vertex_emulator, clients, v1, artifact: str) -> None:  # noqa: F811
    from google.api_core import exceptions
    from google.protobuf import json_format, struct_pb2

    models, endpoints, parent = clients["models"], clients["endpoints"], clients["parent"]
    model = models.upload_model(parent=parent, model=_invoke_enabled_model(v1, artifact, "dedicated")).result(timeout=30).model
    endpoint = endpoints.create_endpoint(
        parent=parent, endpoint=v1.Endpoint(display_name="dedicated", dedicated_endpoint_enabled=True, dedicated_endpoint_dns="mine.example")
    ).result(timeout=30)  # fmt: skip
    read = endpoints.get_endpoint(name=endpoint.name)
    assert read.dedicated_endpoint_enabled and read.dedicated_endpoint_dns.startswith("127.0.0.1:")  # output only: the sent value is dropped
    deployed = endpoints.deploy_model(
        endpoint=endpoint.name, deployed_model=v1.DeployedModel(model=model, dedicated_resources=_resources(v1)), traffic_split={"0": 100}
    ).result(timeout=300).deployed_model  # fmt: skip
    dns = f"http://{read.dedicated_endpoint_dns}/v1/{endpoint.name}"

    answer = httpx.post(f"{dns}/deployedModels/{deployed.id}/invoke/invocations", json=PROMPT, timeout=60)
    assert answer.status_code == 200 and answer.json()["deployedModelId"] == deployed.id and len(answer.json()["predictions"]) == 1
    root = httpx.post(f"{dns}/deployedModels/{deployed.id}/invoke/", json=PROMPT, timeout=60)
    assert root.status_code == 400 and "root" in root.json()["error"]["message"]
    # an invoke-enabled model has no predict routes, even where the split sends requests to it
    for verb in (":predict", ":rawPredict"):
        refused = httpx.post(f"{dns}{verb}", json=PROMPT, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["status"] == "FAILED_PRECONDITION", verb

    # the shared host refuses every prediction of a dedicated endpoint, with the real service's words
    with pytest.raises(exceptions.BadRequest, match=f"dedicated endpoint via CloudESF .* '{read.dedicated_endpoint_dns}'"):
        clients["predictions"].predict(endpoint=endpoint.name, instances=[json_format.ParseDict("hi", struct_pb2.Value())])
    shared = httpx.post(f"{vertex_emulator.url}/v1/{endpoint.name}/deployedModels/{deployed.id}/invoke/invocations", json=PROMPT, timeout=60)
    assert shared.status_code == 400 and "dedicated dns name" in shared.json()["error"]["message"]
    # and the dedicated DNS serves that endpoint's predictions only: no control plane, no other endpoint
    assert httpx.get(f"http://{read.dedicated_endpoint_dns}/v1/{endpoint.name}", timeout=10).status_code == 404
    other = endpoint.name.rsplit("/", 1)[0] + "/12345"
    assert httpx.post(f"http://{read.dedicated_endpoint_dns}/v1/{other}:predict", json=PROMPT, timeout=10).status_code == 404

    endpoints.undeploy_model(endpoint=endpoint.name, deployed_model_id=deployed.id).result(timeout=60)
    endpoints.delete_endpoint(name=endpoint.name).result(timeout=30)
    with pytest.raises(httpx.TransportError):  # its listener went with it
        httpx.post(f"{dns}:predict", json=PROMPT, timeout=5)
