"""The Vertex AI provider against the offline emulator: real google-cloud-storage and aiplatform_v1
clients over HTTP on loopback, the real CLI in subprocesses, and a model server that really serves."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from cloudllm import api
from cloudllm.catalog.vertex_images import IMAGES
from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.vertex import decode_digest, deployment_timeout, encode_digest
from cloudllm.spec import spec_from_kwargs
from cloudllm.testing import eventually
from cloudllm.testing.faults import FaultProxy
from tests.conftest import assert_one_line_error, run_cli
from tests.storage.request_log import gcs_requests, gcs_writes

DUTY_CYCLE = "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle"
v1 = pytest.importorskip("google.cloud.aiplatform_v1")


class Recorder(Reporter):
    """Keeps the step lines a deploy reports (what was uploaded, copied, cleaned up)."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def step(self, message: str) -> None:
        self.steps.append(message)


@pytest.fixture(scope="module")
def clients(vertex_emulator):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform_v1 as v1

    kwargs = dict(transport="rest", credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=vertex_emulator.url))
    return v1.EndpointServiceClient(**kwargs), v1.ModelServiceClient(**kwargs)


def _deployed(clients, result):
    endpoints, models = clients
    endpoint = endpoints.get_endpoint(name=result.endpoint.details["endpoint"])
    assert len(endpoint.deployed_models) == 1
    deployed = endpoint.deployed_models[0]
    model = models.get_model(name=f"{deployed.model}@{deployed.model_version_id}")
    return endpoint, deployed, model


def _deploy(tiny_gpt2: Path, emulator, name: str, reporter: Reporter | None = None, **kwargs):
    kwargs.setdefault("bucket", emulator.bucket)
    return api.deploy(tiny_gpt2, provider="vertex", name=name, reporter=reporter, **kwargs)


@pytest.fixture
def no_engine_servers(vertex_emulator):
    """TGI/vLLM deployments complete without starting the stand-in server (these tests only read what was deployed)."""
    vertex_emulator.serve_engine_images = False
    yield
    vertex_emulator.serve_engine_images = True


def test_tgi_deploy_uploads_the_container_spec_and_resources(vertex_emulator, clients, tiny_gpt2: Path, no_engine_servers) -> None:
    result = _deploy(
        tiny_gpt2, vertex_emulator, "tgi-demo", runtime="tgi", instance="g2-standard-24",
        min_instances=1, max_instances=3, scale_metric="gpu-duty-cycle", scale_target=70,
    )  # fmt: skip
    assert result.action == "create" and result.endpoint.state == "InService"
    endpoint, deployed, model = _deployed(clients, result)

    spec = model.container_spec
    env = {e.name: e.value for e in spec.env}
    assert spec.image_uri == IMAGES["tgi"].uri
    assert env["NUM_SHARD"] == "2"  # g2-standard-24 has two L4s
    assert env["MAX_TOTAL_TOKENS"] == str(result.plan.settings.max_total_tokens)
    assert env["MAX_INPUT_TOKENS"] == str(result.plan.settings.max_input_tokens)
    assert [p.container_port for p in spec.ports] == [8080]
    assert spec.predict_route and spec.health_route
    assert spec.deployment_timeout.total_seconds() == deployment_timeout(result.plan.bundle.total_bytes)
    assert model.artifact_uri.startswith(f"{vertex_emulator.bucket}/tgi-demo/")
    assert {decode_digest(model.labels[k]) for k in ("cloudllm-weights", "cloudllm-code", "cloudllm-deploy")} == {
        result.plan.fingerprint[k] for k in ("weights_digest", "code_digest", "deploy_digest")
    }

    resources = deployed.dedicated_resources
    assert resources.machine_spec.machine_type == "g2-standard-24"
    assert resources.machine_spec.accelerator_type.name == "NVIDIA_L4"
    assert resources.machine_spec.accelerator_count == 2
    assert (resources.min_replica_count, resources.max_replica_count) == (1, 3)
    assert [(m.metric_name, m.target) for m in resources.autoscaling_metric_specs] == [(DUTY_CYCLE, 70)]
    assert dict(endpoint.traffic_split) == {deployed.id: 100}

    # get() reads the digests back, so the same deploy again is a no-op
    same = dict(runtime="tgi", instance="g2-standard-24", min_instances=1, max_instances=3, scale_metric="gpu-duty-cycle", scale_target=70)
    assert _deploy(tiny_gpt2, vertex_emulator, "tgi-demo", **same).action == "unchanged"

    # an update that stopped after moving traffic leaves an idle deployed model: the next deploy only removes it
    endpoints, _ = clients
    leftover = v1.DeployedModel(model=f"{deployed.model}@{deployed.model_version_id}", dedicated_resources=resources)
    endpoints.deploy_model(endpoint=endpoint.name, deployed_model=leftover, traffic_split={deployed.id: 100, "0": 0}).result(timeout=60)
    assert api.status("tgi-demo", provider="vertex").state == "Failed"
    reporter = Recorder()
    finished = _deploy(tiny_gpt2, vertex_emulator, "tgi-demo", reporter, **same)
    assert finished.action == "update" and finished.endpoint.state == "InService"
    assert [d.id for d in endpoints.get_endpoint(name=endpoint.name).deployed_models] == [deployed.id]
    assert not any(s.startswith("uploaded ") for s in reporter.steps)


def test_an_autoscaling_change_alone_is_made_in_place(vertex_emulator, clients, tiny_gpt2: Path, no_engine_servers) -> None:
    """Replica counts or the metric alone: MutateDeployedModel on the serving copy, no new model version or DeployModel."""
    base = dict(runtime="tgi", instance="g2-standard-24", scale_metric="gpu-duty-cycle")
    first = _deploy(tiny_gpt2, vertex_emulator, "tgi-rescale", min_instances=1, max_instances=2, scale_target=70, **base)
    _, deployed, model = _deployed(clients, first)
    wanted = dict(min_instances=2, max_instances=4, scale_target=50, **base)
    plan = api.plan(tiny_gpt2, provider="vertex", name="tgi-rescale", bucket=vertex_emulator.bucket, **wanted)
    assert plan.rescale_only and [(c.resource, c.action) for c in plan.changes] == [("deployed-model", "update")]
    assert "in place" in plan.changes[0].reason

    reporter = Recorder()
    result = _deploy(tiny_gpt2, vertex_emulator, "tgi-rescale", reporter, **wanted)
    assert result.action == "update" and result.reasons == ["autoscaling changed (now 2-4 instances)"]
    assert any("in place" in s for s in reporter.steps) and not any(s.startswith("uploaded ") for s in reporter.steps)
    endpoint, now, model_now = _deployed(clients, result)
    assert (now.id, model_now.version_id) == (deployed.id, model.version_id)  # the same copy, the same version
    resources = now.dedicated_resources
    assert (resources.min_replica_count, resources.max_replica_count) == (2, 4)
    assert [(m.metric_name, m.target) for m in resources.autoscaling_metric_specs] == [(DUTY_CYCLE, 50)]
    assert decode_digest(model_now.labels["cloudllm-digest"]) == result.plan.digest
    assert result.endpoint.details["replicas"] == "2..4" and "cloudllm-lock" not in endpoint.labels
    assert _deploy(tiny_gpt2, vertex_emulator, "tgi-rescale", **wanted).action == "unchanged"
    api.delete("tgi-rescale", provider="vertex", purge_artifacts=True)


def test_a_tags_change_alone_is_made_in_place(vertex_emulator, clients, tiny_gpt2: Path, no_engine_servers) -> None:
    """Tags alone: UpdateEndpoint and UpdateModel relabel the endpoint and its serving version; no new version or DeployModel."""
    from google.protobuf import field_mask_pb2

    endpoints, models = clients
    base = dict(runtime="tgi", instance="g2-standard-8")
    first = _deploy(tiny_gpt2, vertex_emulator, "tgi-retag", tags={"team": "research"}, **base)
    _, deployed, model = _deployed(clients, first)
    wanted = {"team": "platform", "owner": "ml"}
    plan = api.plan(tiny_gpt2, provider="vertex", name="tgi-retag", bucket=vertex_emulator.bucket, tags=wanted, **base)
    assert plan.retag_only and [(c.resource, c.action) for c in plan.changes] == [("endpoint", "update")]
    assert "tags only, in place" in plan.changes[0].reason

    reporter = Recorder()
    result = _deploy(tiny_gpt2, vertex_emulator, "tgi-retag", reporter, tags=wanted, **base)
    assert result.action == "update" and result.reasons == ["tags changed (+owner, team research -> platform)"]
    assert any("in place" in s for s in reporter.steps) and not any(s.startswith("uploaded ") for s in reporter.steps)
    endpoint, now, model_now = _deployed(clients, result)
    assert (now.id, model_now.version_id) == (deployed.id, model.version_id)  # the same copy, the same version
    assert {k: endpoint.labels[k] for k in wanted} == wanted and "cloudllm-lock" not in endpoint.labels
    assert {k: model_now.labels[k] for k in wanted} == wanted and decode_digest(model_now.labels["cloudllm-digest"]) == result.plan.digest
    assert result.endpoint.details["tags"] == wanted

    # A tag dropped goes from both; the same again changes nothing.
    dropped = _deploy(tiny_gpt2, vertex_emulator, "tgi-retag", tags={"owner": "ml"}, **base)
    assert dropped.reasons == ["tags changed (-team)"]
    endpoint, _, model_now = _deployed(clients, dropped)
    assert "team" not in endpoint.labels and "team" not in model_now.labels and dropped.endpoint.details["tags"] == {"owner": "ml"}
    assert _deploy(tiny_gpt2, vertex_emulator, "tgi-retag", tags={"owner": "ml"}, **base).action == "unchanged"

    # Deployed before tags had their own digest (its deploy digest covers them): still unchanged, still retagged in place.
    kwargs = dict(provider="vertex", name="tgi-retag", bucket=vertex_emulator.bucket, **base)
    plan = api.plan(tiny_gpt2, tags={"owner": "ml"}, **kwargs)
    labels = {k: v for k, v in model_now.labels.items() if k != "cloudllm-tags"}
    labels["cloudllm-deploy"] = encode_digest(plan.deploy_digest_with_tags({"owner": "ml"}))
    models.update_model(model=v1.Model(name=model_now.name + "@" + model_now.version_id, labels=labels), update_mask=field_mask_pb2.FieldMask(paths=["labels"]))
    assert api.status("tgi-retag", provider="vertex").fingerprint.tags_digest is None
    assert api.plan(tiny_gpt2, tags={"owner": "ml"}, **kwargs).action == "unchanged"
    other = api.plan(tiny_gpt2, tags={"owner": "ml", "team": "x"}, **kwargs)
    assert other.retag_only and other.reasons == ["tags changed (+team)"]
    assert _deploy(tiny_gpt2, vertex_emulator, "tgi-retag", tags={"owner": "ml", "team": "x"}, **base).endpoint.fingerprint.tags_digest
    assert len(endpoints.get_endpoint(name=endpoint.name).deployed_models) == 1
    api.delete("tgi-retag", provider="vertex", purge_artifacts=True)


def test_vllm_deploy_with_an_accelerator_override_and_delete_to_nothing(vertex_emulator, clients, tiny_gpt2: Path, no_engine_servers) -> None:
    result = _deploy(tiny_gpt2, vertex_emulator, "vllm-demo", runtime="vllm", instance="n1-standard-8", accelerator="NVIDIA_TESLA_T4:2")
    _, deployed, model = _deployed(clients, result)

    spec = model.container_spec
    assert spec.image_uri == IMAGES["vllm"].uri
    assert "--tensor-parallel-size=2" in spec.args
    assert f"--model={model.artifact_uri}" in spec.args
    assert f"--max-model-len={result.plan.settings.max_total_tokens}" in spec.args
    assert (spec.predict_route, spec.health_route, spec.shared_memory_size_mb) == ("/generate", "/ping", 16384)
    machine = deployed.dedicated_resources.machine_spec
    assert (machine.machine_type, machine.accelerator_type.name, machine.accelerator_count) == ("n1-standard-8", "NVIDIA_TESLA_T4", 2)

    assert vertex_emulator.objects("cloudllm-test", "models/vllm-demo/")
    deleted = run_cli("delete", "vllm-demo", "--provider", "vertex", "--purge-artifacts")
    assert deleted.returncode == 0, deleted.stderr
    assert "endpoint vllm-demo deleted" in deleted.stdout
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "vllm-demo"]
    assert not [v for vs in vertex_emulator.state.models.values() for v in vs if v.display_name == "vllm-demo"]
    assert vertex_emulator.objects("cloudllm-test", "models/vllm-demo/") == []
    assert not vertex_emulator.state.replicas.get(deployed.id)
    with pytest.raises(UserError, match="no Vertex AI endpoint named 'vllm-demo'"):
        api.delete("vllm-demo", provider="vertex")


def test_engines_shard_over_the_gpus_the_attention_heads_split_over(vertex_emulator, clients, tiny_gpt2: Path, no_engine_servers) -> None:
    """tiny-gpt2 has 4 attention heads: on 8 GPUs TGI and vLLM shard 4 ways (8 would not start)."""
    tgi = _deploy(tiny_gpt2, vertex_emulator, "shard-tgi", runtime="tgi", instance="g2-standard-96")
    env = {e.name: e.value for e in _deployed(clients, tgi)[2].container_spec.env}
    assert env["NUM_SHARD"] == "4" and tgi.plan.shard_count(8) == 4
    assert _deployed(clients, tgi)[1].dedicated_resources.machine_spec.accelerator_count == 8  # the machine keeps its 8 GPUs

    vllm = _deploy(tiny_gpt2, vertex_emulator, "shard-vllm", runtime="vllm", instance="a2-highgpu-8g")
    spec = _deployed(clients, vllm)[2].container_spec
    assert "--tensor-parallel-size=4" in spec.args
    assert "MODEL_ID" not in {e.name for e in spec.env}  # the vLLM server reads --model, nothing reads MODEL_ID
    for name in ("shard-tgi", "shard-vllm"):
        api.delete(name, provider="vertex", purge_artifacts=True)


def test_tgi_serves_predict_and_refuses_stream(vertex_emulator, tiny_gpt2: Path) -> None:
    """The emulator stands in for TGI with the generated server behind TGI's Vertex route."""
    result = _deploy(tiny_gpt2, vertex_emulator, "tgi-serving", runtime="tgi", instance="g2-standard-8")
    assert vertex_emulator.state.replicas[result.endpoint.details["deployed_model_id"]].dialect == "tgi"
    answer = api.invoke("tgi-serving", "Once upon a time", parameters={"max_new_tokens": 4}, provider="vertex", full_response=True)
    assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0], str)

    # TGI's Vertex route answers {"instances": [...]} with whole predictions only: --stream is refused, in one line
    streamed = run_cli("invoke", "tgi-serving", "Once upon a time", "--provider", "vertex", "--stream")
    assert_one_line_error(streamed, code=2, contains="runs TGI, whose Vertex AI route answers whole predictions only")
    # ... as the route itself refuses the TGI-form body cloudllm sent before
    url = f"{vertex_emulator.url}/v1/{result.endpoint.details['endpoint']}:streamRawPredict"
    refused = httpx.post(url, json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 4}, "stream": True})
    assert refused.status_code == 400 and "missing field `instances`" in refused.json()["error"]["message"]
    api.delete("tgi-serving", provider="vertex", purge_artifacts=True)


def test_vllm_answers_without_the_prompt_and_streams_the_same_text(vertex_emulator, tiny_gpt2: Path) -> None:
    result = _deploy(tiny_gpt2, vertex_emulator, "vllm-serving", runtime="vllm", instance="g2-standard-8")
    assert vertex_emulator.state.replicas[result.endpoint.details["deployed_model_id"]].dialect == "vllm"
    text = run_cli("invoke", "vllm-serving", "Once upon a time", "--max-new-tokens", "6", "--provider", "vertex")
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() and "Prompt:" not in text.stdout  # raw_response: the generated text alone

    streamed = run_cli("invoke", "vllm-serving", "Once upon a time", "--max-new-tokens", "6", "--provider", "vertex", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == text.stdout  # greedy (temperature 0): the stream adds up to the same text

    bad = run_cli("invoke", "vllm-serving", "Once upon a time", "--param", "watermark=true", "--provider", "vertex")
    assert_one_line_error(bad, code=2, contains="the vllm runtime takes no parameter 'watermark'")
    # the body cloudllm used to stream, refused by the vLLM server (KeyError: 'prompt')
    url = f"{vertex_emulator.url}/v1/{result.endpoint.details['endpoint']}:streamRawPredict"
    refused = httpx.post(url, json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 4}, "stream": True})
    assert refused.status_code == 500
    api.delete("vllm-serving", provider="vertex", purge_artifacts=True)


@pytest.fixture(scope="module")
def handler_demo(vertex_emulator, tiny_gpt2: Path, tmp_path_factory):
    """One handler deploy (in the HF inference image, emulated) shared by the invoke and update tests."""
    with pytest.MonkeyPatch.context() as patch:  # set up before any test's own CLOUDLLM_HOME
        patch.setenv("CLOUDLLM_HOME", str(tmp_path_factory.mktemp("home")))
        return _deploy(tiny_gpt2, vertex_emulator, "handler-demo", runtime="handler", instance="n1-standard-4")


def test_handler_deploy_runs_the_generated_server_in_the_inference_image(clients, handler_demo) -> None:
    _, deployed, model = _deployed(clients, handler_demo)
    assert model.container_spec.image_uri == IMAGES["handler-cpu"].uri  # n1-standard-4 has no GPU
    assert model.container_spec.command[:2] == ["python3", "-c"]
    machine = deployed.dedicated_resources.machine_spec
    assert machine.machine_type == "n1-standard-4" and not machine.accelerator_count


def test_invoke_and_stream_through_the_cli(vertex_emulator, handler_demo) -> None:
    text = run_cli("invoke", "handler-demo", "Once upon a time", "--max-new-tokens", "8", "--provider", "vertex")
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip()

    streamed = run_cli("invoke", "handler-demo", "Once upon a time", "--max-new-tokens", "8", "--provider", "vertex", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == text.stdout  # greedy decoding: the stream adds up to the same text

    raw = api.invoke("handler-demo", "Once upon a time", parameters={"max_new_tokens": 4}, provider="vertex", full_response=True)
    assert len(raw["predictions"]) == 1 and raw["deployed_model_id"]


def test_invoke_timeout_reaches_the_predict_call(vertex_emulator, handler_demo) -> None:
    """A predict the endpoint never answers (the fault proxy parks it): `--timeout` ends it with one line."""
    with FaultProxy(vertex_emulator.url, rate=0.0, flavour="google") as proxy:
        proxy.hold(lambda method, path: path.split("?")[0].endswith(":predict"))
        try:
            parked = run_cli("invoke", "handler-demo", "hi", "--provider", "vertex", "--timeout", "1", env={"CLOUDLLM_VERTEX_ENDPOINT": proxy.url})
        finally:
            proxy.release()
    assert_one_line_error(parked, code=1, contains="endpoint handler-demo did not answer within 1s")
    assert proxy.held_count == 1  # sent once: a lost answer is not asked for again


def test_changed_deploy_adds_a_version_moves_traffic_and_undeploys_the_old(vertex_emulator, clients, handler_demo, tiny_gpt2) -> None:
    endpoints, models = clients
    before = handler_demo.endpoint.details
    old_id = before["deployed_model_id"]
    reporter = Recorder()
    logged = len(vertex_emulator.traffic_log)
    with gcs_requests() as log:
        result = _deploy(
            tiny_gpt2, vertex_emulator, "handler-demo", reporter, runtime="handler", instance="n1-standard-4",
            rollout="canary:25", serving={"max_new_tokens": 64}, options={"rollout_wait": 0},
        )  # fmt: skip
    assert result.action == "update" and "code or serving settings changed" in result.reasons

    endpoint = endpoints.get_endpoint(name=before["endpoint"])
    assert len(endpoint.deployed_models) == 1
    new = endpoint.deployed_models[0]
    assert new.id != old_id
    assert new.model == before["model"] and new.model_version_id == "2"
    assert dict(endpoint.traffic_split) == {new.id: 100}
    # the new version came up without traffic, took 25% while the old one kept 75%, then all of it
    splits = [split for name, split in vertex_emulator.traffic_log[logged:] if name == before["endpoint"]]
    assert splits[:3] == [{new.id: 0, old_id: 100}, {new.id: 25, old_id: 75}, {new.id: 100}], splits
    assert any("canary: 25%" in s for s in reporter.steps)
    assert any("canary: the new version answered" in s for s in reporter.steps)
    assert any(f"undeployed {before['deployed_model_id']}" in s for s in reporter.steps)
    # Settings travel in the container's environment: GCS saw no upload and no copy (its own request
    # log, server side), and the new version reads the artifact_uri the old one does.
    assert [r for r in log if "/b/cloudllm-test/o" in r[1]], "the request log recorded nothing"
    assert gcs_writes(log) == []
    upload = next(s for s in reporter.steps if s.startswith("uploaded "))
    assert upload.startswith("uploaded 0 file(s)") and "copied" not in upload, upload
    versions = {v.version_id: v for v in models.list_model_versions(name=new.model)}
    assert versions["2"].artifact_uri == versions["1"].artifact_uri
    env = {e.name: e.value for e in versions["2"].container_spec.env}
    assert json.loads(env["CLOUDLLM_SETTINGS"])["max_new_tokens"] == 64
    assert [v.version_id for v in models.list_model_versions(name=new.model)] == ["1", "2"]

    assert api.invoke("handler-demo", "Once upon a time", parameters={"max_new_tokens": 4}, provider="vertex", full_response=True)["predictions"]
    unchanged = _deploy(tiny_gpt2, vertex_emulator, "handler-demo", runtime="handler", instance="n1-standard-4",
                        rollout="canary:25", serving={"max_new_tokens": 64})  # fmt: skip
    assert unchanged.action == "unchanged"


def test_a_failed_update_leaves_the_old_version_serving(vertex_emulator, clients, handler_demo, tiny_gpt2, tmp_path: Path) -> None:
    endpoints, models = clients
    name = handler_demo.endpoint.details["endpoint"]
    serving = endpoints.get_endpoint(name=name)
    (old,) = serving.deployed_models
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_gpt2, broken)
    (broken / "tokenizer.json").write_text("{not json")
    reporter = Recorder()
    with pytest.raises(DeployFailed, match="Model server reports it cannot serve"):
        _deploy(broken, vertex_emulator, "handler-demo", reporter, runtime="handler", instance="n1-standard-4", serving={"max_new_tokens": 64})
    after = endpoints.get_endpoint(name=name)
    assert [d.id for d in after.deployed_models] == [old.id] and dict(after.traffic_split) == {old.id: 100}
    assert [v.version_id for v in models.list_model_versions(name=old.model)] == ["1", old.model_version_id]  # the new one is gone
    assert [s.split()[2] for s in reporter.steps if s.startswith("cleaned up ")] == ["model", "artifacts"]
    answer = api.invoke("handler-demo", "Once upon a time", parameters={"max_new_tokens": 4}, provider="vertex", full_response=True)
    assert answer["deployed_model_id"] == old.id


def test_a_failing_canary_moves_the_traffic_back_and_removes_the_new_version(vertex_emulator, clients, tiny_gpt2: Path) -> None:
    endpoints, models = clients
    first = _deploy(tiny_gpt2, vertex_emulator, "canary-fail", runtime="handler", instance="n1-standard-4")
    old_id, endpoint_name = first.endpoint.details["deployed_model_id"], first.endpoint.details["endpoint"]
    # version 2 passes its health check, then its server dies: it fails the requests the canary sends it
    vertex_emulator.crash_when_ready = lambda deployed: deployed.display_name == "canary-fail" and deployed.model_version_id == "2"
    logged = len(vertex_emulator.traffic_log)
    try:
        with pytest.raises(DeployFailed) as info:
            _deploy(tiny_gpt2, vertex_emulator, "canary-fail", runtime="handler", instance="n1-standard-4",
                    rollout="canary:25", serving={"max_new_tokens": 16}, options={"rollout_wait": 0})  # fmt: skip
    finally:
        vertex_emulator.crash_when_ready = None
    assert info.value.line().startswith("the canary of canary-fail failed: a sample request failed: Deployed model ")
    assert f"the traffic goes back to {old_id}" in info.value.line()
    splits = [split for name, split in vertex_emulator.traffic_log[logged:] if name == endpoint_name]
    new_id = next(k for k in splits[0] if k != old_id)
    assert {new_id: 25, old_id: 75} in splits and splits[-1] == {old_id: 100}
    endpoint = endpoints.get_endpoint(name=endpoint_name)
    assert [d.id for d in endpoint.deployed_models] == [old_id] and dict(endpoint.traffic_split) == {old_id: 100}
    assert [v.version_id for v in models.list_model_versions(name=first.endpoint.details["model"])] == ["1"]
    version_prefixes = {o.split("/")[2] for o in vertex_emulator.objects("cloudllm-test", "models/canary-fail/")}
    assert version_prefixes == {first.plan.bundle.stored.version_name}  # the live prefix, which the failed version shared, is kept
    assert api.invoke("canary-fail", "Hello", parameters={"max_new_tokens": 2}, provider="vertex", full_response=True)["deployed_model_id"] == old_id

    # delete without --purge-artifacts removes the endpoint and the model, and keeps the artifacts
    deleted = run_cli("delete", "canary-fail", "--provider", "vertex")
    assert deleted.returncode == 0, deleted.stderr
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "canary-fail"]
    assert not [v for vs in vertex_emulator.state.models.values() for v in vs if v.display_name == "canary-fail"]
    assert {o.split("/")[2] for o in vertex_emulator.objects("cloudllm-test", "models/canary-fail/")} == version_prefixes


def test_a_deploy_past_its_timeout_leaves_the_operation_running_and_says_how_to_remove_it(vertex_emulator, tiny_gpt2: Path) -> None:
    """A model server slower than --timeout: nothing is deleted under the running operation; once it ends, delete works."""
    def spec(timeout: int | None = 2, **kwargs):
        spec = spec_from_kwargs(tiny_gpt2, provider="vertex", name="slow", runtime="handler", instance="n1-standard-4",
                                bucket=vertex_emulator.bucket, **kwargs)  # fmt: skip
        return spec.model_copy(update={"timeout": timeout})  # 2 s: below the 60 s --timeout accepts, to keep the test short

    vertex_emulator.replica_gate = threading.Event()  # the model server loads until the gate opens
    try:
        with pytest.raises(DeployFailed) as info:
            api.deploy(spec=spec())
        line = info.value.line()
        assert line.startswith("deploying on 1x n1-standard-4 did not finish within 2s (operation projects/"), line
        assert "it goes on in Vertex AI. nothing was removed" in line
        assert "`cloudllm delete slow --provider vertex --region us-central1 --project cloudllm-emulator --purge-artifacts`" in line
        endpoints = [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "slow"]
        assert len(endpoints) == 1 and [v.display_name for vs in vertex_emulator.state.models.values() for v in vs].count("slow") == 1
        assert vertex_emulator.objects("cloudllm-test", "models/slow/")
    finally:
        vertex_emulator.replica_gate.set()
    eventually(lambda: api.status("slow", provider="vertex").state == "InService")

    # an update past its timeout: the old version keeps all the traffic; the next deploy moves it to the new one
    old_id = api.status("slow", provider="vertex").details["deployed_model_id"]
    vertex_emulator.replica_gate = threading.Event()
    try:
        with pytest.raises(DeployFailed) as info:
            api.deploy(spec=spec(serving={"max_new_tokens": 16}))
        assert "nothing was removed and the old version keeps all the traffic" in info.value.line()
        assert dict(api.status("slow", provider="vertex").details["traffic_split"]) == {old_id: 100}
    finally:
        vertex_emulator.replica_gate.set()
    eventually(lambda: len(api.status("slow", provider="vertex").details["deployed_models"]) == 2)  # it arrives without traffic
    reporter = Recorder()
    again = api.deploy(spec=spec(None, serving={"max_new_tokens": 16}), reporter=reporter)
    assert again.action == "update" and any(s.startswith("the new version is already deployed") for s in reporter.steps)
    assert not any(s.startswith("uploaded ") or s.startswith("model ") for s in reporter.steps)  # nothing made twice
    (new_id,) = again.endpoint.details["deployed_models"]
    assert new_id != old_id and again.endpoint.details["traffic_split"] == {new_id: 100} and again.endpoint.digest == again.plan.digest
    deleted = run_cli("delete", "slow", "--provider", "vertex", "--purge-artifacts")
    assert deleted.returncode == 0, deleted.stderr
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "slow"]
    assert vertex_emulator.objects("cloudllm-test", "models/slow/") == []
    vertex_emulator.replica_gate = None


def test_no_wait_returns_while_it_deploys_and_image_is_honoured(vertex_emulator, clients, tiny_gpt2: Path) -> None:
    image = "europe-docker.pkg.dev/my-proj/serving/cloudllm-serve:1"
    vertex_emulator.replica_gate = threading.Event()
    try:
        result = api.deploy(tiny_gpt2, provider="vertex", name="no-wait", runtime="handler", instance="n1-standard-4",
                            bucket=vertex_emulator.bucket, image=image, wait=False)  # fmt: skip
        assert result.action == "create" and result.endpoint.state == "Creating"
        endpoint = clients[0].get_endpoint(name=result.endpoint.details["endpoint"])
        assert list(endpoint.deployed_models) == []  # still deploying when deploy returned
    finally:
        vertex_emulator.replica_gate.set()
    eventually(lambda: api.status("no-wait", provider="vertex").state == "InService")
    _, deployed, model = _deployed(clients, api.deploy(tiny_gpt2, provider="vertex", name="no-wait", runtime="handler",
                                                       instance="n1-standard-4", bucket=vertex_emulator.bucket, image=image))  # fmt: skip
    assert model.container_spec.image_uri == image
    assert api.invoke("no-wait", "Hello", parameters={"max_new_tokens": 2}, provider="vertex", full_response=True)["deployed_model_id"] == deployed.id
    api.delete("no-wait", provider="vertex", purge_artifacts=True)
    vertex_emulator.replica_gate = None


def test_a_corrupted_upload_fails_the_deploy_in_one_line(vertex_emulator, tiny_gpt2: Path) -> None:
    vertex_emulator.corrupt_next_upload(lambda name: name.startswith("models/corrupt/") and name.endswith("/config.json"))
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "vertex", "--name", "corrupt", "--runtime", "handler",
                     "--instance", "n1-standard-4", "--bucket", vertex_emulator.bucket)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the progress lines: one error line
    assert line.startswith("error: an upload to gs://cloudllm-test/models/corrupt/") and "arrived corrupted: Provided CRC32C" in line, line
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "corrupt"]
    assert not [v for vs in vertex_emulator.state.models.values() for v in vs if v.display_name == "corrupt"]
    assert vertex_emulator.objects("cloudllm-test", "models/corrupt/") == []


def test_a_server_that_cannot_start_fails_the_deploy_and_is_cleaned_up(vertex_emulator, tiny_gpt2: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_gpt2, broken)
    (broken / "tokenizer.json").write_text("{not json")
    reporter = Recorder()
    with pytest.raises(DeployFailed) as info:
        _deploy(broken, vertex_emulator, "broken", reporter, runtime="handler", instance="n1-standard-4")
    assert info.value.line().startswith("deploying on 1x n1-standard-4 failed: Model server reports it cannot serve: JSONDecodeError")
    assert [s.split()[2] for s in reporter.steps if s.startswith("cleaned up ")] == ["endpoint", "model", "artifacts"]
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "broken"]
    assert not [v for vs in vertex_emulator.state.models.values() for v in vs if v.display_name == "broken"]
    assert vertex_emulator.objects("cloudllm-test", "models/broken/") == []


@pytest.mark.parametrize(
    ("flags", "contains"),
    [
        (["--instance", "g2-standard-7"], "did you mean g2-standard-8"),
        (["--instance", "g2-standard-8", "--accelerator", "NVIDIA_TESLA_T4"], "g2-standard-8 comes with 1x NVIDIA_L4"),
        (["--instance", "g2-standard-8", "--bucket", "gs://no-such-bucket/models"], "bucket gs://no-such-bucket does not exist"),
    ],
)
def test_bad_input_through_the_cli_is_one_line_and_creates_nothing(vertex_emulator, tiny_gpt2: Path, flags: list[str], contains: str) -> None:
    args = ["deploy", str(tiny_gpt2), "--provider", "vertex", "--name", "bad-input", *flags]
    if "--bucket" not in flags:
        args += ["--bucket", vertex_emulator.bucket]
    assert_one_line_error(run_cli(*args), contains=contains)
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "bad-input"]
    assert vertex_emulator.objects("cloudllm-test", "models/bad-input/") == []


@pytest.mark.parametrize(
    ("settings", "contains"),
    [
        (dict(instance="n1-standard-4", accelerator="NVIDIA_L4"), "n1-standard-4 cannot take NVIDIA_L4"),
        (dict(instance="n1-standard-4", accelerator="NVIDIA_TESLA_T4:3"), "comes in counts [1, 2, 4], not 3"),
        (dict(instance="g2-standard-8", min_instances=3, max_instances=2), "min_instances (3) is above max_instances (2)"),
        (dict(instance="n1-standard-4", runtime="tgi"), "needs a GPU"),
        (dict(instance="n1-standard-4", max_instances=2, scale_metric="invocations"), "not a Vertex AI metric"),
        (dict(instance="n1-standard-4", max_instances=2, scale_metric="gpu-duty-cycle"), "has no GPU to measure a duty cycle on"),
        (dict(instance="g2-standard-8", rollout="linear:10"), "use --rollout all-at-once or --rollout canary:PCT"),
        (dict(instance="g2-standard-8", tags={"Team": "ML"}), "is not a valid Vertex label"),
        (dict(instance="g2-standard-8", bucket="s3://wrong-cloud/models"), "is not a gs:// location"),
        (dict(instance="g2-standard-8", min_instances=0, scale_in_cooldown=10), "idle time before scaling to zero"),
        (dict(instance="n1-standard-4", quantize="int8"), "pass --image with an image that carries optimum-quanto"),
        (dict(instance="n1-standard-4", rollout="canary:10", options={"rollout_wait": "soon"}), "rollout_wait=soon is not a number"),
    ],
)
def test_bad_input_is_refused_before_anything_is_created(vertex_emulator, tiny_gpt2: Path, settings: dict, contains: str) -> None:
    settings = {"runtime": "handler", "bucket": vertex_emulator.bucket, **settings}
    with pytest.raises(UserError) as info:
        api.deploy(tiny_gpt2, provider="vertex", name="bad-api-input", **settings)
    assert contains in info.value.line()
    assert not [e for e in vertex_emulator.state.endpoints.values() if e.display_name == "bad-api-input"]
    assert vertex_emulator.objects("cloudllm-test", "models/bad-api-input/") == []


def test_quantized_handler_weights_plan_with_an_image_that_can_load_them(vertex_emulator, tiny_gpt2: Path) -> None:
    plan = api.plan(tiny_gpt2, provider="vertex", name="int8-image", runtime="handler", instance="n1-standard-4",
                    quantize="int8", image="europe-docker.pkg.dev/p/r/cloudllm-serve:1", bucket=vertex_emulator.bucket)  # fmt: skip
    assert plan.runtime == "handler" and plan.quantize_pending == "int8"


def test_missing_project_is_one_line(vertex_emulator, tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT")
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "vertex", "--name", "no-project", "--instance", "n1-standard-4",
                     "--runtime", "handler", "--bucket", vertex_emulator.bucket)  # fmt: skip
    assert_one_line_error(result, contains="no Google Cloud project given")
    assert vertex_emulator.objects("cloudllm-test", "models/no-project/") == []


def test_status_and_list(vertex_emulator, handler_demo) -> None:
    status = run_cli("status", "handler-demo", "--provider", "vertex", "--json")
    assert status.returncode == 0, status.stderr
    endpoint = json.loads(status.stdout)
    assert endpoint["state"] == "InService" and endpoint["runtime"] == "handler"
    assert endpoint["url"].startswith(vertex_emulator.url) and endpoint["url"].endswith(":predict")
    assert "handler-demo" in {e.name for e in api.list_endpoints(provider="vertex")}


def test_logs_print_the_exact_cloud_logging_filter_and_link(vertex_emulator, handler_demo) -> None:
    details = handler_demo.endpoint.details
    endpoint_id, region = details["endpoint"].rsplit("/", 1)[-1], details["region"]
    result = run_cli("logs", "handler-demo", "--provider", "vertex", "--since", "2026-01-31T12:00:00Z")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == (
        'resource.type="aiplatform.googleapis.com/Endpoint" AND '
        f'resource.labels.endpoint_id="{endpoint_id}" AND resource.labels.location="{region}" AND '
        'timestamp>="2026-01-31T12:00:00Z"'
    )
    assert lines[2].startswith("console: https://console.cloud.google.com/logs/query;query=resource.type%3D")
    assert lines[3].startswith("read: gcloud logging read 'resource.type=")
    missing = run_cli("logs", "nothing-here", "--provider", "vertex")
    assert_one_line_error(missing, code=2, contains="no vertex ai endpoint named 'nothing-here'")
