"""Many tenants on one Vertex AI endpoint, against the emulator: a second model (--add-model), LoRA adapters,
scale to zero. What was created is read back through the real aiplatform clients (v1, and v1beta1 for
scale to zero); the deployed models really serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudllm import api
from cloudllm.errors import UserError
from cloudllm.providers.base import get_provider
from cloudllm.testing import eventually
from cloudllm.types import Waking
from tests.conftest import assert_one_line_error, run_cli

v1 = pytest.importorskip("google.cloud.aiplatform_v1")
GREEDY = {"max_new_tokens": 6, "do_sample": False}


def _clients(emulator, module):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    kwargs = dict(transport="rest", credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=emulator.url))
    return module.EndpointServiceClient(**kwargs), module.ModelServiceClient(**kwargs)


@pytest.fixture(scope="module")
def clients(vertex_emulator):
    return _clients(vertex_emulator, v1)


def _deploy(model: Path, emulator, name: str, **kwargs):
    kwargs = {"runtime": "handler", "instance": "n1-standard-4", "bucket": emulator.bucket, **kwargs}
    return api.deploy(model, provider="vertex", name=name, **kwargs)


def _invoke(name: str, **kwargs):
    return api.invoke(name, "hello there", parameters=GREEDY, provider="vertex", full_response=True, **kwargs)


def test_a_second_model_gets_its_own_deployed_model_and_answers_by_name(vertex_emulator, clients, tiny_gpt2: Path) -> None:
    endpoints, models = clients
    first = _deploy(tiny_gpt2, vertex_emulator, "two-models", options={"dedicated_endpoint": True})
    second = _deploy(tiny_gpt2, vertex_emulator, "two-models", add_model="small", instance="n1-standard-8")
    assert second.action == "update"

    endpoint = endpoints.get_endpoint(name=first.endpoint.details["endpoint"])
    assert endpoint.dedicated_endpoint_enabled and endpoint.dedicated_endpoint_dns  # created so: Vertex AI sets it only then
    by_name = {d.display_name: d for d in endpoint.deployed_models}
    assert set(by_name) == {"two-models", "model:small"}
    main, small = by_name["two-models"], by_name["model:small"]
    # its own resources, sized from its own plan; the first model keeps all the traffic
    assert small.dedicated_resources.machine_spec.machine_type == "n1-standard-8"
    assert main.dedicated_resources.machine_spec.machine_type == "n1-standard-4"
    assert {k: v for k, v in endpoint.traffic_split.items() if v} == {main.id: 100}
    assert small.model != main.model  # its own Model resource
    small_spec = models.get_model(name=f"{small.model}@{small.model_version_id}").container_spec
    main_spec = models.get_model(name=f"{main.model}@{main.model_version_id}").container_spec
    # the added model is invoke-enabled (so no predict route, no gRPC); the first one keeps :predict
    assert (small_spec.invoke_route_prefix, small_spec.predict_route, list(small_spec.grpc_ports)) == ("/*", "", [])
    assert (main_spec.invoke_route_prefix, main_spec.predict_route) == ("", "/predict")
    assert models.get_model(name=small.model).display_name == "two-models"

    described = get_provider("vertex").get("two-models")
    assert described.state == "InService" and described.details["models"] == {"small": small.id}
    assert described.url.startswith(f"http://{endpoint.dedicated_endpoint_dns}/")

    assert _invoke("two-models")["deployed_model_id"] == main.id
    assert _invoke("two-models", model="small")["deployed_model_id"] == small.id
    assert _invoke("two-models", model=described.details["first_model"])["deployed_model_id"] == main.id
    assert "".join(api.invoke_stream("two-models", "hello there", parameters=GREEDY, provider="vertex", model="small"))
    with pytest.raises(UserError, match="has no model 'nope'"):
        _invoke("two-models", model="nope")
    # through the CLI, as a user runs it: the same text from the added model as from the first (the same tiny model, greedy)
    texts = [
        run_cli("invoke", "two-models", "hello there", "--max-new-tokens", "6", "--provider", "vertex", *extra)
        for extra in ((), ("--model", "small"))
    ]
    assert all(t.returncode == 0 for t in texts), [t.stderr for t in texts]
    assert texts[0].stdout.strip() and texts[0].stdout == texts[1].stdout
    assert any(f"/deployedModels/{small.id}/invoke/invocations" in r for r in vertex_emulator.requests)

    versions = sum(len(v) for v in vertex_emulator.state.models.values())
    _deploy(tiny_gpt2, vertex_emulator, "two-models", add_model="small", instance="n1-standard-8")  # "already this version"
    first_again = _deploy(tiny_gpt2, vertex_emulator, "two-models")  # the option is the endpoint's: not repeating it changes nothing
    assert first_again.action == "unchanged"
    assert sum(len(v) for v in vertex_emulator.state.models.values()) == versions
    assert {d.id for d in endpoints.get_endpoint(name=first.endpoint.details["endpoint"]).deployed_models} == {main.id, small.id}

    model_names = {main.model, small.model}
    api.delete("two-models", provider="vertex")
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "two-models"]
    listed = {m.name for m in models.list_models(parent=f"projects/{vertex_emulator.project}/locations/us-central1")}
    assert not model_names & listed


def test_add_model_to_an_endpoint_without_a_dedicated_dns_is_refused_before_anything_is_created(vertex_emulator, clients, tiny_gpt2: Path) -> None:
    endpoints, _ = clients
    first = _deploy(tiny_gpt2, vertex_emulator, "one-model")
    assert _invoke("one-model")["deployed_model_id"]  # not dedicated: predictions through the API host, as before
    common = ("--provider", "vertex", "--name", "one-model", "--runtime", "handler", "--instance", "n1-standard-4", "--bucket", vertex_emulator.bucket)
    models_before = sum(len(v) for v in vertex_emulator.state.models.values())
    for extra, words in (
        (("--add-model", "small"), "was created without a dedicated DNS"),
        (("--option", "dedicated_endpoint=true"), "has no dedicated DNS"),
    ):
        for verb in ("plan", "deploy"):
            refused = run_cli(verb, str(tiny_gpt2), *common, *extra)
            assert_one_line_error(refused, code=2, contains=words)
    assert sum(len(v) for v in vertex_emulator.state.models.values()) == models_before
    assert len(endpoints.get_endpoint(name=first.endpoint.details["endpoint"]).deployed_models) == 1
    api.delete("one-model", provider="vertex")


def test_add_model_needs_the_endpoint_and_a_name_of_its_own(vertex_emulator, tiny_gpt2: Path) -> None:
    with pytest.raises(UserError, match="no Vertex AI endpoint no-such-endpoint to add model"):
        _deploy(tiny_gpt2, vertex_emulator, "no-such-endpoint", add_model="second")
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "no-such-endpoint"]


@pytest.fixture(scope="module")
def loras(tiny_gpt2: Path, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("peft")
    from cloudllm.testing.tiny_adapters import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return {name: build_tiny_lora(tiny_gpt2, root / name, seed=seed) for name, seed in (("support", 1), ("legal", 2))}


def test_adapters_ship_content_addressed_and_answer_per_request(vertex_emulator, clients, tiny_gpt2: Path, loras) -> None:
    endpoints, models = clients
    first = _deploy(tiny_gpt2, vertex_emulator, "with-loras", adapters={"support": str(loras["support"])})
    assert first.endpoint.fingerprint.adapters_digest == first.plan.fingerprint["adapters_digest"]
    # one more adapter: a new model version of the same base, rolled out blue/green
    result = _deploy(tiny_gpt2, vertex_emulator, "with-loras", adapters={k: str(v) for k, v in loras.items()})
    assert result.action == "update" and any("adapters changed" in r for r in result.reasons), result.reasons
    assert _deploy(tiny_gpt2, vertex_emulator, "with-loras", adapters={k: str(v) for k, v in loras.items()}).action == "unchanged"
    plan = result.plan
    objects = vertex_emulator.objects("cloudllm-test", "models/with-loras/adapters/")
    for name, digest in plan.adapter_digests.items():
        assert f"models/with-loras/adapters/{digest}/adapter_config.json" in objects, name
        assert f"models/with-loras/adapters/{digest}/adapter_model.safetensors" in objects, name

    endpoint = endpoints.get_endpoint(name=result.endpoint.details["endpoint"])
    deployed = endpoint.deployed_models[0]
    env = {e.name: e.value for e in models.get_model(name=f"{deployed.model}@{deployed.model_version_id}").container_spec.env}
    assert sorted(env["CLOUDLLM_ADAPTER_URIS"].split()) == sorted(
        f"gs://cloudllm-test/models/with-loras/adapters/{d}/" for d in plan.adapter_digests.values()
    )

    texts = {a: api.invoke("with-loras", "hello there", parameters=GREEDY, provider="vertex", adapter=a) for a in (None, "support", "legal")}
    assert len(set(texts.values())) == 3, texts  # base, and each adapter, answer differently
    with pytest.raises(UserError, match="unknown|no adapter|not found"):
        api.invoke("with-loras", "hello", parameters=GREEDY, provider="vertex", adapter="missing")

    listed = get_provider("vertex").list_adapters("with-loras")
    assert {a["name"]: a["digest"] for a in listed} == plan.adapter_digests
    with pytest.raises(UserError, match="deploy with-loras again with the --adapter set"):
        get_provider("vertex").remove_adapter("with-loras", "legal", None)
    api.delete("with-loras", provider="vertex")


def test_scale_to_zero_deploys_through_v1beta1_and_wakes_on_the_first_request(vertex_emulator, tiny_gpt2: Path) -> None:
    from google.cloud import aiplatform_v1beta1 as beta

    plan = api.plan(tiny_gpt2, provider="vertex", name="sleepy", runtime="handler", instance="n1-standard-4",
                    min_instances=0, max_instances=1, scale_in_cooldown=600, bucket=vertex_emulator.bucket)  # fmt: skip
    assert any("idle cost $0/h" in w and "min" in w for w in plan.warnings)
    result = _deploy(tiny_gpt2, vertex_emulator, "sleepy", min_instances=0, max_instances=1, scale_in_cooldown=600)
    endpoints, _ = _clients(vertex_emulator, beta)
    deployed = endpoints.get_endpoint(name=result.endpoint.details["endpoint"]).deployed_models[0]
    assert deployed.dedicated_resources.min_replica_count == 0
    assert deployed.dedicated_resources.scale_to_zero_spec.idle_scaledown_period.total_seconds() == 600
    assert result.endpoint.details["scale_to_zero"] is True

    assert _invoke("sleepy")["deployed_model_id"] == deployed.id  # awake after the deploy
    vertex_emulator.tenancy.wake_seconds = 0.5
    vertex_emulator.tenancy.scale_to_zero(deployed.id)
    provider = get_provider("vertex")
    with pytest.raises(Waking, match="scaled to zero"):  # the 429 while at zero, as the provider reports it
        provider.invoke("sleepy", {"inputs": "hello there", "parameters": GREEDY})
    answer = eventually(lambda: _woken(provider), what="the woken deployed model answering")  # what api's wait loop does with Waking
    assert answer["predictions"] and vertex_emulator.tenancy.wakes >= 1

    # End to end through api.invoke's wait: the emulator's idle clock scales it to zero by itself.
    tenancy = vertex_emulator.tenancy
    tenancy.idle_seconds, tenancy.wake_seconds = 1.0, 3.0
    try:
        eventually(lambda: tenancy.asleep(deployed.id), what="sleepy idle, scaled to zero")
    finally:
        tenancy.idle_seconds = None
    with pytest.raises(UserError, match="did not wake from zero within 0.1s") as short:
        _invoke("sleepy", wake_timeout=0.1)
    assert "--wake-timeout" in short.value.fix
    assert _invoke("sleepy", wake_timeout=300)["deployed_model_id"] == deployed.id  # waits through the 429s
    assert not tenancy.asleep(deployed.id)
    api.delete("sleepy", provider="vertex")


def _woken(provider):
    try:
        return provider.invoke("sleepy", {"inputs": "hello there", "parameters": GREEDY})
    except Waking:
        return None


@pytest.mark.parametrize(
    ("settings", "contains"),
    [
        (dict(min_instances=0, max_instances=1, scale_in_cooldown=60), "which takes 300..28800 s"),
        (dict(min_instances=0, max_instances=1, scale_out_cooldown=60), "drop --scale-out-cooldown"),
        (dict(runtime="tgi", instance="g2-standard-8", adapters={"support": "LORA"}), "TGI's Vertex AI route reads only"),
        (dict(runtime="vllm", instance="g2-standard-8", adapters={"support": "LORA"}), "only on Llama-shaped models"),  # GPT-2: no SupportsLoRA in vLLM
    ],
)
def test_what_vertex_cannot_do_is_refused_before_anything_is_created(vertex_emulator, tiny_gpt2: Path, loras, settings, contains) -> None:
    if "adapters" in settings:
        settings["adapters"] = {"support": str(loras["support"])}
    with pytest.raises(UserError) as info:
        _deploy(tiny_gpt2, vertex_emulator, "bad-tenancy", **settings)
    assert contains in info.value.line()
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "bad-tenancy"]
    assert vertex_emulator.objects("cloudllm-test", "models/bad-tenancy/") == []
