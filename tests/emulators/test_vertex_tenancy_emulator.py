"""The Vertex AI emulator's several models per endpoint, route to one deployed model, and v1beta1 scale to zero,
through the real aiplatform clients (v1 and v1beta1, REST, anonymous) and plain HTTP."""

from __future__ import annotations

import httpx
import pytest
from google.protobuf import json_format, struct_pb2

from cloudllm.testing import eventually
from tests.emulators.test_vertex_emulator import _handler_model, _resources, artifact, clients, v1  # noqa: F401  (fixtures)

PROMPT = {"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 4, "do_sample": False}}


@pytest.fixture(scope="module")
def beta(vertex_emulator):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform_v1beta1

    kwargs = dict(transport="rest", credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=vertex_emulator.url))
    return aiplatform_v1beta1, aiplatform_v1beta1.EndpointServiceClient(**kwargs)


def _setup(clients, v1, artifact: str, name: str):  # noqa: F811
    model = clients["models"].upload_model(parent=clients["parent"], model=_handler_model(v1, artifact, name)).result(timeout=30)
    endpoint = clients["endpoints"].create_endpoint(parent=clients["parent"], endpoint=v1.Endpoint(display_name=name)).result(timeout=30)
    return model.model, endpoint.name


def _predict(clients, endpoint: str):
    return clients["predictions"].predict(
        endpoint=endpoint,
        instances=[json_format.ParseDict(i, struct_pb2.Value()) for i in PROMPT["instances"]],
        parameters=json_format.ParseDict(PROMPT["parameters"], struct_pb2.Value()),
    )


def _zero_resources(beta_types, v1, idle: str | None = "600s", min_replicas: int = 0):  # noqa: F811
    resources = beta_types.DedicatedResources.deserialize(v1.DedicatedResources.serialize(_resources(v1, min_replicas=min_replicas)))
    if idle is not None:
        resources.scale_to_zero_spec = beta_types.DedicatedResources.ScaleToZeroSpec.from_json(f'{{"idle_scaledown_period": "{idle}"}}')
    return resources


def test_two_deployed_models_each_with_its_own_server_and_the_route_to_either(vertex_emulator, clients, v1, artifact: str) -> None:  # noqa: F811
    from google.api_core import exceptions

    from tests.emulators.test_vertex_dedicated_emulator import _invoke_enabled_model

    endpoints, parent = clients["endpoints"], clients["parent"]
    model = clients["models"].upload_model(parent=parent, model=_handler_model(v1, artifact, "two-deployed")).result(timeout=30).model
    added = clients["models"].upload_model(parent=parent, model=_invoke_enabled_model(v1, artifact, "two-deployed")).result(timeout=30).model
    endpoint = endpoints.create_endpoint(parent=parent, endpoint=v1.Endpoint(display_name="two-deployed", dedicated_endpoint_enabled=True)).result(timeout=30)
    dns_base = f"http://{endpoint.dedicated_endpoint_dns}/v1/{endpoint.name}"
    first = endpoints.deploy_model(
        endpoint=endpoint.name, deployed_model=v1.DeployedModel(model=model, dedicated_resources=_resources(v1)), traffic_split={"0": 100}
    ).result(timeout=300).deployed_model  # fmt: skip
    second = endpoints.deploy_model(
        endpoint=endpoint.name, deployed_model=v1.DeployedModel(model=added, dedicated_resources=_resources(v1, machine="n1-standard-8")),
        traffic_split={first.id: 100, "0": 0},
    ).result(timeout=300).deployed_model  # fmt: skip
    replicas = vertex_emulator.state.replicas
    assert replicas[first.id].process.pid != replicas[second.id].process.pid  # one server each
    split = {httpx.post(f"{dns_base}:predict", json=PROMPT, timeout=60).json()["deployedModelId"] for _ in range(3)}
    assert split == {first.id}  # the split sends all to the first

    # /invoke/invocations reaches the container as /invocations, a route our server always serves
    direct = httpx.post(f"{dns_base}/deployedModels/{second.id}/invoke/invocations", json=PROMPT, timeout=60)
    assert direct.status_code == 200 and len(direct.json()["predictions"]) == 1
    # the server says who answered (AIP_DEPLOYED_MODEL_ID): the route reached the added deployed model
    assert direct.json()["deployedModelId"] == second.id
    plain = httpx.post(f"{dns_base}/deployedModels/{first.id}/invoke/predict", json=PROMPT, timeout=60)  # uploaded without the prefix
    assert plain.status_code == 400 and "invoke_route_prefix" in plain.json()["error"]["message"]
    missing = httpx.post(f"{dns_base}/deployedModels/123/invoke/invocations", json=PROMPT, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"

    with pytest.raises(exceptions.BadRequest, match="min_replica_count must be at least 1"):
        endpoints.deploy_model(endpoint=endpoint.name, deployed_model=v1.DeployedModel(model=model, dedicated_resources=_resources(v1, min_replicas=0)))
    for deployed in (second, first):
        endpoints.undeploy_model(endpoint=endpoint.name, deployed_model_id=deployed.id).result(timeout=60)
    assert first.id not in replicas and second.id not in replicas


@pytest.mark.parametrize(
    ("idle", "min_replicas", "message"),
    [
        (None, 0, "must be at least 1 unless scale_to_zero_spec is set"),
        ("60s", 0, "must be between 300s and 28800s"),
        ("600s", 1, "scale_to_zero_spec needs dedicated_resources.min_replica_count 0"),
    ],
)
def test_v1beta1_deploy_checks_the_scale_to_zero_spec(clients, v1, beta, artifact: str, idle, min_replicas, message) -> None:  # noqa: F811
    from google.api_core import exceptions

    beta_types, beta_endpoints = beta
    model, endpoint = _setup(clients, v1, artifact, "zero-checks")
    deployed = beta_types.DeployedModel(model=model, dedicated_resources=_zero_resources(beta_types, v1, idle, min_replicas))
    with pytest.raises(exceptions.BadRequest, match=message):
        beta_endpoints.deploy_model(endpoint=endpoint, deployed_model=deployed)
    clients["endpoints"].delete_endpoint(name=endpoint).result(timeout=30)


def test_at_zero_requests_get_429_and_the_first_one_wakes_a_replica(vertex_emulator, clients, v1, beta, artifact: str) -> None:  # noqa: F811
    from google.api_core import exceptions

    beta_types, beta_endpoints = beta
    model, endpoint = _setup(clients, v1, artifact, "zero-wake")
    op = beta_endpoints.deploy_model(endpoint=endpoint, deployed_model=beta_types.DeployedModel(model=model, dedicated_resources=_zero_resources(beta_types, v1)))
    deployed = op.result(timeout=300).deployed_model  # the v1beta1 client unpacks its own types
    seen = beta_endpoints.get_endpoint(name=endpoint).deployed_models[0]
    assert seen.dedicated_resources.min_replica_count == 0
    assert seen.dedicated_resources.scale_to_zero_spec.idle_scaledown_period.total_seconds() == 600
    assert _predict(clients, endpoint).deployed_model_id == deployed.id  # a deployment starts with one replica

    tenancy = vertex_emulator.tenancy
    tenancy.wake_seconds = 0.5
    pid = vertex_emulator.state.replicas[deployed.id].process.pid
    tenancy.scale_to_zero(deployed.id)
    assert deployed.id not in vertex_emulator.state.replicas
    with pytest.raises(exceptions.TooManyRequests, match="scaled to zero"):
        _predict(clients, endpoint)
    raw = httpx.post(f"{vertex_emulator.url}/v1/{endpoint}:rawPredict", json=PROMPT, timeout=60)
    assert raw.status_code in (200, 429)  # 429 until the replica is up

    def woken():
        try:
            return _predict(clients, endpoint)
        except exceptions.TooManyRequests:
            return None

    assert eventually(woken, what="the woken replica answering").deployed_model_id == deployed.id
    assert vertex_emulator.state.replicas[deployed.id].process.pid != pid and not tenancy.asleep(deployed.id)
    with pytest.raises(ValueError, match="not deployed with a scale_to_zero_spec"):
        tenancy.scale_to_zero("123")

    clients["endpoints"].undeploy_model(endpoint=endpoint, deployed_model_id=deployed.id).result(timeout=60)
    assert deployed.id not in tenancy.zero_specs


def test_idle_past_its_period_a_deployed_model_scales_to_zero_by_itself(vertex_emulator, clients, v1, beta, artifact: str) -> None:  # noqa: F811
    """No test hook: the emulator's clock (idle_seconds, as the env var sets it) does what idle_scaledown_period does."""
    from google.api_core import exceptions

    beta_types, beta_endpoints = beta
    tenancy = vertex_emulator.tenancy
    model, endpoint = _setup(clients, v1, artifact, "zero-idle")
    op = beta_endpoints.deploy_model(endpoint=endpoint, deployed_model=beta_types.DeployedModel(model=model, dedicated_resources=_zero_resources(beta_types, v1)))
    deployed = op.result(timeout=300).deployed_model
    assert tenancy.idle_period(deployed.id) == 600  # the spec's own period
    tenancy.idle_seconds = 1.0
    try:
        assert _predict(clients, endpoint).deployed_model_id == deployed.id
        eventually(lambda: tenancy.asleep(deployed.id), what="the idle deployed model scaled to zero")
        assert deployed.id not in vertex_emulator.state.replicas
        assert clients["endpoints"].get_endpoint(name=endpoint).deployed_models[0].dedicated_resources.min_replica_count == 0
        with pytest.raises(exceptions.TooManyRequests, match="scaled to zero"):
            _predict(clients, endpoint)
    finally:
        tenancy.idle_seconds = None
    clients["endpoints"].undeploy_model(endpoint=endpoint, deployed_model_id=deployed.id).result(timeout=60)
    assert deployed.id not in tenancy.zero_specs
