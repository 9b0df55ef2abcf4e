"""The Vertex AI provider through an unreliable network: cloudllm reaches the Vertex fake and the GCS
emulator through cloudllm.testing.faults.FaultProxy, which answers 429 and 500, drops connections,
or performs a request and drops its answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cloudllm import api
from cloudllm.providers.vertex import API_ENDPOINT_ENV, decode_digest
from cloudllm.testing.faults import FAULT_KINDS, FaultProxy, one_wins
from tests.conftest import CLOUDLLM

v1 = pytest.importorskip("google.cloud.aiplatform_v1")


@pytest.fixture(scope="module")
def proxies(vertex_emulator):
    with FaultProxy(vertex_emulator.url, flavour="google") as api_proxy, FaultProxy(vertex_emulator.storage_url, flavour="google") as gcs_proxy:
        yield api_proxy, gcs_proxy


@pytest.fixture
def flaky(proxies, monkeypatch: pytest.MonkeyPatch):
    api_proxy, gcs_proxy = proxies
    for proxy in proxies:
        proxy.configure(rate=0.0)
    monkeypatch.setenv(API_ENDPOINT_ENV, api_proxy.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_proxy.url)
    yield proxies
    for proxy in proxies:
        proxy.configure(rate=0.0)


def _state(emulator, name: str) -> tuple[list, list]:
    """The emulator's endpoints and model versions for display name `name` (straight from its state)."""
    with emulator.lock:
        endpoints = [e for e in emulator.state.endpoints.values() if e.display_name == name]
        versions = [v for versions in emulator.state.models.values() for v in versions if v.display_name == name]
    return endpoints, versions


def assert_serving_exactly(emulator, name: str, digest: str) -> None:
    """One endpoint, one deployed model taking all the traffic, of the version with `digest`; no stray versions."""
    endpoints, versions = _state(emulator, name)
    assert len(endpoints) == 1, [e.name for e in endpoints]
    (endpoint,) = endpoints
    assert len(endpoint.deployed_models) == 1, endpoint.deployed_models
    deployed = endpoint.deployed_models[0]
    assert dict(endpoint.traffic_split) == {deployed.id: 100}
    serving = [v for v in versions if v.name.endswith(deployed.model.rsplit("/", 1)[-1]) and v.version_id == deployed.model_version_id]
    assert len(serving) == 1 and decode_digest(serving[0].labels["cloudllm-digest"]) == digest
    # A create retried after a lost answer must not leave a second model, or a second version of one upload.
    assert len({v.name for v in versions}) == 1, [v.name for v in versions]
    # (Versions may share an artifact prefix: a settings-only change keeps the files and changes the environment.)
    assert len(versions) == len({v.labels["cloudllm-digest"] for v in versions}), [(v.version_id, v.labels) for v in versions]


def assert_gone(emulator, name: str, prefix: str) -> None:
    assert _state(emulator, name) == ([], [])
    assert emulator.objects("cloudllm-test", prefix) == []


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_deploy_update_delete_succeed_with_a_fifth_of_requests_failing(flaky, vertex_emulator, tiny_gpt2: Path, seed: int) -> None:
    api_proxy, gcs_proxy = flaky
    name = f"flaky-{seed}"
    api_proxy.configure(rate=0.2, seed=seed)
    gcs_proxy.configure(rate=0.2, seed=seed + 1000)

    created = api.deploy(tiny_gpt2, provider="vertex", name=name, bucket=vertex_emulator.bucket)
    assert created.action == "create" and created.endpoint.state == "InService"
    assert_serving_exactly(vertex_emulator, name, created.plan.digest)

    updated = api.deploy(tiny_gpt2, provider="vertex", name=name, bucket=vertex_emulator.bucket, serving={"max_new_tokens": 16})
    assert updated.action == "update" and updated.endpoint.digest == updated.plan.digest
    assert_serving_exactly(vertex_emulator, name, updated.plan.digest)

    api.delete(name, provider="vertex", purge_artifacts=True)
    assert_gone(vertex_emulator, name, f"models/{name}/")

    faults = sum(proxy.counts[kind] for proxy in flaky for kind in FAULT_KINDS)
    assert faults >= 10, (api_proxy.counts, gcs_proxy.counts)


def _call(fragment: str, method: str = "POST"):
    return lambda m, path: m == method and fragment in path.split("?")[0]


@pytest.mark.slow  # the SageMaker twin runs by default
def test_creates_whose_answer_was_lost_are_not_done_twice(flaky, vertex_emulator, tiny_gpt2: Path) -> None:
    """UploadModel, CreateEndpoint, DeployModel, a file's upload and the deletes each go
    through once with their answer dropped: the retry finds (or is refused) what the first did."""
    api_proxy, gcs_proxy = flaky
    name = "lost-answers"
    api_proxy.fail_next(_call("/models:upload"), "drop_after")
    api_proxy.fail_next(lambda m, path: m == "POST" and path.split("?")[0].endswith("/endpoints"), "drop_after")
    api_proxy.fail_next(_call(":deployModel"), "drop_after")
    # Files this small go in one request each (uploadType=multipart); larger ones as resumable uploads.
    gcs_proxy.fail_next(lambda m, path: m == "POST" and "uploadType=multipart" in path, "drop_after")
    created = api.deploy(tiny_gpt2, provider="vertex", name=name, bucket=vertex_emulator.bucket)
    assert api_proxy.unfired == 0 and gcs_proxy.unfired == 0
    assert_serving_exactly(vertex_emulator, name, created.plan.digest)

    api_proxy.fail_next(_call("/models:upload"), "drop_after")  # a new version of the model this time
    api_proxy.fail_next(_call(":deployModel"), "drop_after")
    api_proxy.fail_next(_call(":undeployModel"), "drop_after")
    updated = api.deploy(tiny_gpt2, provider="vertex", name=name, bucket=vertex_emulator.bucket, serving={"max_new_tokens": 16})
    assert api_proxy.unfired == 0
    assert_serving_exactly(vertex_emulator, name, updated.plan.digest)

    api_proxy.fail_next(_call(":undeployModel"), "drop_after")
    api_proxy.fail_next(lambda m, path: m == "DELETE" and "/models/" in path, "drop_after")
    api_proxy.fail_next(lambda m, path: m == "DELETE" and "/endpoints/" in path, "drop_after")
    api.delete(name, provider="vertex", purge_artifacts=True)
    assert api_proxy.unfired == 0
    assert_gone(vertex_emulator, name, f"models/{name}/")


# --- killed mid-deploy (SIGKILL: a lost CI runner), then run again -----------------------------------
def _after(first: str, then):
    """A predicate true for `then` requests once a request containing `first` has gone by."""
    seen = {"first": False}

    def predicate(method: str, path: str) -> bool:
        if first in path:
            seen["first"] = True
            return False
        return seen["first"] and then(method, path)

    return predicate


def _nth(n: int, matches):
    """A predicate true from the n-th request that `matches` on."""
    count = {"seen": 0}

    def predicate(method: str, path: str) -> bool:
        if matches(method, path):
            count["seen"] += 1
        return count["seen"] >= n

    return predicate


VERTEX_KILL_POINTS = {
    # name: (proxy "api" or "gcs", which request to park, what becomes of it once the client is dead)
    "during-upload": ("gcs", _nth(5, lambda m, path: m == "POST" and path.startswith("/upload/")), "drop"),
    "after-model-upload": ("api", lambda m, path: m == "POST" and path.split("?")[0].endswith("/endpoints"), "drop"),
    "deploy-in-flight": ("api", lambda m, path: ":deployModel" in path, "forward"),
    "while-waiting": ("api", _after(":deployModel", lambda m, path: m == "GET" and "/operations/" in path), "forward"),
}


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("during-upload", marks=pytest.mark.slow),
        pytest.param("after-model-upload", marks=pytest.mark.slow),
        pytest.param("deploy-in-flight", marks=pytest.mark.slow),
        "while-waiting",
    ],
)
def test_a_deploy_killed_anywhere_converges_when_run_again(flaky, vertex_emulator, tiny_gpt2: Path, tmp_path: Path, point: str) -> None:
    """SIGKILL at each step; the same command run again serves exactly one version, and delete leaves nothing."""
    import signal

    api_proxy, gcs_proxy = flaky
    name = f"killed-{point}"
    where, predicate, then = VERTEX_KILL_POINTS[point]
    proxy = api_proxy if where == "api" else gcs_proxy
    env = {**os.environ, "CLOUDLLM_HOME": str(tmp_path / "home")}
    args = [CLOUDLLM, "deploy", str(tiny_gpt2), "--provider", "vertex", "--name", name, "--bucket", vertex_emulator.bucket]
    proxy.hold(predicate, then=then)
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2400):
            if proxy.held.wait(timeout=0.1) or process.poll() is not None:
                break
        assert proxy.held.is_set(), f"the deploy never reached {point}: {process.poll()} {proxy.log[-5:]}"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
        proxy.release()

    again = subprocess.run([*args, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["endpoint"]["state"] == "InService", (again.stderr, result)
    assert_serving_exactly(vertex_emulator, name, result["endpoint"]["digest"])
    deleted = subprocess.run([CLOUDLLM, "delete", name, "--purge-artifacts"], env=env, capture_output=True, text=True, timeout=300)
    assert deleted.returncode == 0, deleted.stderr
    assert_gone(vertex_emulator, name, f"models/{name}/")


# --- two pipelines deploy one endpoint at once ------------------------------------------------------
@pytest.mark.slow  # the SageMaker twin runs by default
def test_two_pipelines_deploying_one_endpoint_one_wins_and_the_other_fails_clearly(flaky, vertex_emulator, tiny_gpt2: Path, tmp_path: Path) -> None:
    api_proxy, _ = flaky
    name = "raced"

    def runs(*tokens: int):
        return [
            ([CLOUDLLM, "deploy", str(tiny_gpt2), "--provider", "vertex", "--name", name, "--bucket", vertex_emulator.bucket,
              "--max-new-tokens", str(t), "--json"], {"CLOUDLLM_HOME": str(tmp_path / f"ci-{i}")})
            for i, t in enumerate(tokens)
        ]  # fmt: skip

    # Both create it: both CreateEndpoint calls go through; the older endpoint stays, the other deploy removes its own.
    results = api_proxy.race(runs(8, 16), lambda m, path: m == "POST" and path.split("?")[0].endswith("/endpoints"))
    winner, _ = one_wins(results, "was created by another deploy")
    won = json.loads(results[winner].stdout)
    assert_serving_exactly(vertex_emulator, name, won["endpoint"]["digest"])

    # Both update it: both read the endpoint, both try to take its lock with that etag; one gets it.
    results = api_proxy.race(runs(24, 32), lambda m, path: m == "PATCH" and "/endpoints/" in path and "labels" in path)
    winner, _ = one_wins(results, "is being changed by another deploy")
    won = json.loads(results[winner].stdout)
    assert_serving_exactly(vertex_emulator, name, won["endpoint"]["digest"])
    endpoints, _ = _state(vertex_emulator, name)
    assert "cloudllm-lock" not in endpoints[0].labels  # released

    api.delete(name, provider="vertex", purge_artifacts=True)
    assert_gone(vertex_emulator, name, f"models/{name}/")


# --- what goes over the wire, watched through the proxies (no faults) --------------------------------
def _query(line: str) -> dict[str, list[str]]:
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(line.split()[1]).query)


def test_kms_key_is_on_the_model_the_endpoint_and_every_artifact_write(flaky, vertex_emulator, tiny_gpt2: Path, tmp_path: Path) -> None:
    api_proxy, gcs_proxy = flaky
    key = f"projects/{vertex_emulator.project}/locations/us-central1/keyRings/ring/cryptoKeys/cloudllm"
    name = "cmek"
    api.deploy(tiny_gpt2, provider="vertex", name=name, bucket=vertex_emulator.bucket, options={"kms_key": key})
    (endpoint,), (version,) = _state(vertex_emulator, name)
    assert endpoint.encryption_spec.kms_key_name == key and version.encryption_spec.kms_key_name == key
    uploads = [line for line in gcs_proxy.log if line.startswith("POST /upload/")]
    assert uploads and all(_query(line).get("kmsKeyName") == [key] for line in uploads), uploads

    # an update of one file uploads it and copies the unchanged ones inside GCS: both are written with the key
    for proxy in flaky:
        proxy.configure(rate=0.0)
    changed = tmp_path / "tiny-gpt2"
    shutil.copytree(tiny_gpt2, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 200}))
    api.deploy(changed, provider="vertex", name=name, bucket=vertex_emulator.bucket, options={"kms_key": key})
    copies = [line for line in gcs_proxy.log if "/rewriteTo/" in line]
    uploads = [line for line in gcs_proxy.log if line.startswith("POST /upload/")]
    assert copies and all(_query(line).get("destinationKmsKeyName") == [key] for line in copies), copies
    assert uploads and all(_query(line).get("kmsKeyName") == [key] for line in uploads), uploads
    assert {v.encryption_spec.kms_key_name for v in _state(vertex_emulator, name)[1]} == {key}

    api.delete(name, provider="vertex", purge_artifacts=True)
    assert_gone(vertex_emulator, name, f"models/{name}/")


def test_an_unchanged_deploy_writes_nothing(flaky, vertex_emulator, tiny_gpt2: Path) -> None:
    api_proxy, gcs_proxy = flaky
    name = "steady"
    api.deploy(tiny_gpt2, provider="vertex", name=name, bucket=vertex_emulator.bucket)
    for proxy in flaky:
        proxy.configure(rate=0.0)  # clears the logs
    again = api.deploy(tiny_gpt2, provider="vertex", name=name, bucket=vertex_emulator.bucket)
    assert again.action == "unchanged"
    requests = api_proxy.log + gcs_proxy.log
    assert api_proxy.log and gcs_proxy.log  # it did look (the endpoint, the bucket)
    assert all(line.startswith("GET ") for line in requests), [line for line in requests if not line.startswith("GET ")]
    api.delete(name, provider="vertex", purge_artifacts=True)
    assert_gone(vertex_emulator, name, f"models/{name}/")
