"""The SageMaker provider through an unreliable network, killed mid-deploy, and raced by a second pipeline.

cloudllm talks to the emulator through cloudllm.testing.faults.FaultProxy (AWS_ENDPOINT_URL points
at it), which throttles, answers 500, drops connections, or performs a request and drops its answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from cloudllm import api
from cloudllm.providers.sagemaker import resources as res
from cloudllm.testing.faults import FAULT_KINDS, FaultProxy, one_wins
from tests.conftest import CLOUDLLM

BUCKET = "cloudllm-emulator"


@pytest.fixture(scope="module")
def aws(sagemaker_emulator):
    """boto3 clients straight to the emulator (not through the proxy): the test's view of what exists."""
    return {name: boto3.client(name, endpoint_url=sagemaker_emulator.url) for name in ("sagemaker", "s3", "application-autoscaling")}


@pytest.fixture(scope="module")
def proxy(sagemaker_emulator):
    with FaultProxy(sagemaker_emulator.url, rate=0.0, flavour="aws") as proxy:
        yield proxy


@pytest.fixture
def flaky(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> FaultProxy:
    """cloudllm in this test goes through the proxy (no faults until the test configures some)."""
    proxy.configure(rate=0.0)
    proxy.release()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.release()
    proxy.configure(rate=0.0)


def _deploy(emulator, model: Path, name: str, **kwargs):
    kwargs.setdefault("bucket", f"{emulator.bucket}/models")
    kwargs.setdefault("options", {"role": emulator.role})
    return api.deploy(model, provider="sagemaker", name=name, runtime="handler", instance="ml.m5.xlarge", **kwargs)


def _cli_args(emulator, model: Path, name: str, *extra: str) -> list[str]:
    return [
        CLOUDLLM, "deploy", str(model), "--provider", "sagemaker", "--name", name, "--runtime", "handler",
        "--instance", "ml.m5.xlarge", "--bucket", f"{emulator.bucket}/models", "--role", emulator.role, *extra,
    ]  # fmt: skip


def _owned(aws, name: str) -> dict[str, list[str]]:
    """Every SageMaker resource of endpoint `name`: endpoints, configs, models, scaling targets."""
    sm = aws["sagemaker"]
    return {
        "endpoints": [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"] if e["EndpointName"] == name],
        "configs": [c["EndpointConfigName"] for c in sm.list_endpoint_configs(MaxResults=100)["EndpointConfigs"] if c["EndpointConfigName"].startswith(name + "-")],
        "models": [m["ModelName"] for m in sm.list_models(MaxResults=100)["Models"] if m["ModelName"].startswith(name + "-")],
        "scaling": [
            t["ResourceId"]
            for t in aws["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
            if t["ResourceId"] == res.scaling_resource_id(name)
        ],
    }


def _keys(aws, prefix: str) -> set[str]:
    listing = aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for o in listing.get("Contents", [])}


def assert_exactly_one_version(aws, name: str, *, digest: str | None = None, unused_uploads: int = 0) -> dict:
    """One endpoint InService on one config and one model, one complete artifact version: nothing orphaned.

    unused_uploads: artifact versions no model uses that may stay (a losing deploy's, kept for its retry).
    """
    owned = _owned(aws, name)
    assert len(owned["endpoints"]) == 1 and len(owned["configs"]) == 1 and len(owned["models"]) == 1, owned
    sm = aws["sagemaker"]
    endpoint = sm.describe_endpoint(EndpointName=name)
    assert endpoint["EndpointStatus"] == "InService", endpoint
    assert endpoint["EndpointConfigName"] == owned["configs"][0]
    config = sm.describe_endpoint_config(EndpointConfigName=owned["configs"][0])
    assert config["ProductionVariants"][0]["ModelName"] == owned["models"][0]
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=config["EndpointConfigArn"])["Tags"]}
    if digest is not None:
        assert tags[res.FINGERPRINT_TAGS["digest"]] == digest
    # The S3 side: one version prefix, complete (its manifest lists exactly the files under it).
    versions = {key.split("/")[2] for key in _keys(aws, f"models/{name}/")}
    prefix = tags[res.VERSION_TAG][len(f"s3://{BUCKET}/") :]
    assert prefix.split("/")[2] in versions
    assert len(versions) - 1 <= unused_uploads, versions
    manifest = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key=prefix + "cloudllm.json")["Body"].read())
    assert _keys(aws, prefix) == {prefix + f for f in manifest["files"]} | {prefix + "cloudllm.json"}
    assert not aws["s3"].list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")
    return tags


def assert_gone(aws, name: str) -> None:
    assert _owned(aws, name) == {"endpoints": [], "configs": [], "models": [], "scaling": []}
    assert not _keys(aws, f"models/{name}/")


# --- transient faults: throttling, 500s, dropped connections ---------------------------------------
@pytest.mark.parametrize(
    "seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]
)
def test_deploy_update_delete_succeed_with_a_fifth_of_requests_failing(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path, seed: int) -> None:
    name = f"flaky-{seed}"
    flaky.configure(rate=0.2, seed=seed)

    created = _deploy(sagemaker_emulator, tiny_gpt2, name)
    assert created.action == "create" and created.endpoint.state == "InService"
    assert_exactly_one_version(aws, name, digest=created.plan.digest)

    updated = _deploy(sagemaker_emulator, tiny_gpt2, name, serving={"max_new_tokens": 16})
    assert updated.action == "update" and updated.endpoint.digest == updated.plan.digest
    assert_exactly_one_version(aws, name, digest=updated.plan.digest)

    api.delete(name, provider="sagemaker", purge_artifacts=True)
    assert_gone(aws, name)

    faults = {kind: flaky.counts[kind] for kind in FAULT_KINDS}
    assert sum(faults.values()) >= 10, (faults, flaky.counts)  # the run really went through faults


def _op(*names: str):
    return lambda method, operation: operation.split(" ")[-1] in names


def test_creates_and_deletes_whose_answer_was_lost_converge(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path) -> None:
    """Each Create*, UpdateEndpoint and Delete* goes through once but its answer is lost: botocore
    retries, meets "already exists" / "in-progress" / "not found", and cloudllm knows it as its own."""
    name = "lost-answers"
    for operation in ("CreateModel", "CreateEndpointConfig", "CreateEndpoint"):
        flaky.fail_next(_op(operation), "drop_after")
    created = _deploy(sagemaker_emulator, tiny_gpt2, name)
    assert flaky.unfired == 0
    assert_exactly_one_version(aws, name, digest=created.plan.digest)

    for operation in ("CreateModel", "CreateEndpointConfig", "UpdateEndpoint", "DeleteModel", "DeleteEndpointConfig"):
        flaky.fail_next(_op(operation), "drop_after")
    updated = _deploy(sagemaker_emulator, tiny_gpt2, name, serving={"max_new_tokens": 16})
    assert flaky.unfired == 0
    assert updated.action == "update"
    assert_exactly_one_version(aws, name, digest=updated.plan.digest)

    for operation in ("DeleteEndpoint", "DeleteModel", "DeleteEndpointConfig"):
        flaky.fail_next(_op(operation), "drop_after")
    api.delete(name, provider="sagemaker", purge_artifacts=True)
    assert flaky.unfired == 0
    assert_gone(aws, name)


# --- SIGKILL mid-deploy, then the same deploy again ---------------------------------------------------
def _after_create_endpoint(operation_name: str):
    """Matches `operation_name` once CreateEndpoint (or UpdateEndpoint) has been seen: the wait for the endpoint."""
    seen = {"started": False}

    def predicate(method: str, operation: str) -> bool:
        op = operation.split(" ")[-1]
        if op in ("CreateEndpoint", "UpdateEndpoint"):
            seen["started"] = True
            return False
        return seen["started"] and op == operation_name

    return predicate


KILL_POINTS = {
    # name: (which request to park, what becomes of it once the client is dead)
    "during-upload": (lambda m, op: m == "PUT" and op.split("?")[0].endswith("/model.safetensors"), "drop"),
    "after-model": (_op("CreateEndpointConfig"), "drop"),
    "after-config": (_op("CreateEndpoint"), "drop"),
    "create-endpoint-in-flight": (_op("CreateEndpoint"), "forward"),
    "while-waiting": ("waiting", "forward"),
}


def _kill_at(flaky: FaultProxy, args: list[str], env: dict, predicate, then: str) -> None:
    flaky.hold(predicate, then=then)
    process = subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reached = flaky.held.wait(timeout=240)
        assert reached, f"the deploy never reached the kill point: {process.poll()} {flaky.log[-5:]}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
        flaky.release()


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("during-upload", marks=pytest.mark.slow),
        pytest.param("after-model", marks=pytest.mark.slow),
        pytest.param("after-config", marks=pytest.mark.slow),
        pytest.param("create-endpoint-in-flight", marks=pytest.mark.slow),
        "while-waiting",
    ],
)
def test_a_deploy_killed_anywhere_converges_when_run_again(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path, tmp_path: Path, point: str) -> None:
    name = f"killed-{point}"
    env = {"CLOUDLLM_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": flaky.url}
    predicate, then = KILL_POINTS[point]
    if predicate == "waiting":
        predicate = _after_create_endpoint("DescribeEndpoint")
    _kill_at(flaky, _cli_args(sagemaker_emulator, tiny_gpt2, name), env, predicate, then)

    again = subprocess.run(_cli_args(sagemaker_emulator, tiny_gpt2, name, "--json"), env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["endpoint"]["state"] == "InService"
    assert_exactly_one_version(aws, name, digest=result["endpoint"]["digest"])

    deleted = subprocess.run([CLOUDLLM, "delete", name, "--purge-artifacts"], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert deleted.returncode == 0, deleted.stderr
    assert_gone(aws, name)


def test_a_deploy_killed_before_autoscaling_finishes_it_when_run_again(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path, tmp_path: Path) -> None:
    """The endpoint is InService with this version, but autoscaling and the sweep never ran: not "unchanged"."""
    name = "killed-before-scaling"
    env = {"CLOUDLLM_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": flaky.url}
    args = _cli_args(sagemaker_emulator, tiny_gpt2, name, "--min-instances", "1", "--max-instances", "3")
    _kill_at(flaky, args, env, _op("RegisterScalableTarget"), "drop")
    assert _owned(aws, name)["scaling"] == []

    again = subprocess.run([*args, "--json"], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["action"] == "update" and "has not finished" in result["reasons"][0]
    assert "finishing it" in again.stderr
    assert_exactly_one_version(aws, name, digest=result["endpoint"]["digest"])
    assert _owned(aws, name)["scaling"] == [res.scaling_resource_id(name)]

    unchanged = subprocess.run([*args, "--json"], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert unchanged.returncode == 0 and json.loads(unchanged.stdout)["action"] == "unchanged", unchanged.stderr
    assert api.delete(name, provider="sagemaker") is None
    assert _owned(aws, name)["endpoints"] == []


@pytest.mark.slow
def test_an_update_killed_while_waiting_converges_when_run_again(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path, tmp_path: Path) -> None:
    name = "killed-update"
    env = {"CLOUDLLM_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": flaky.url}
    first = subprocess.run(_cli_args(sagemaker_emulator, tiny_gpt2, name), env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    update = _cli_args(sagemaker_emulator, tiny_gpt2, name, "--max-new-tokens", "16")
    _kill_at(flaky, update, env, _after_create_endpoint("DescribeEndpoint"), "forward")

    again = subprocess.run([*update, "--json"], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert_exactly_one_version(aws, name, digest=result["endpoint"]["digest"])
    assert api.delete(name, provider="sagemaker", purge_artifacts=True) is None
    assert_gone(aws, name)


def _nth(predicate, n: int):
    """Matches the n-th request `predicate` matches."""
    seen = {"count": 0}

    def nth(method: str, operation: str) -> bool:
        if predicate(method, operation):
            seen["count"] += 1
            return seen["count"] == n
        return False

    return nth


@pytest.mark.parametrize(
    "tagging",
    [
        pytest.param(1, id="before-the-fingerprint-moves"),  # scaling changed, tags still the old version's
        pytest.param(3, id="before-the-endpoint-is-marked-finished", marks=pytest.mark.slow),
    ],
)
def test_an_autoscaling_change_killed_half_way_converges_when_run_again(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path, tmp_path: Path, tagging: int) -> None:
    """The in-place path (no new fleet) killed between its steps: the same deploy again finishes it, nothing new created."""
    name = f"killed-rescale-{tagging}"
    env = {"CLOUDLLM_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": flaky.url}
    first = subprocess.run(_cli_args(sagemaker_emulator, tiny_gpt2, name, "--max-instances", "2"), env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    config = _owned(aws, name)["configs"]
    rescale = _cli_args(sagemaker_emulator, tiny_gpt2, name, "--max-instances", "3")
    _kill_at(flaky, rescale, env, _nth(_op("AddTags"), tagging), "drop")

    again = subprocess.run([*rescale, "--json"], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["action"] == "update"
    assert_exactly_one_version(aws, name, digest=result["endpoint"]["digest"])
    assert _owned(aws, name)["configs"] == config  # still the first version's: no blue/green for a scaling change
    target = aws["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[res.scaling_resource_id(name)])
    assert target["ScalableTargets"][0]["MaxCapacity"] == 3
    unchanged = subprocess.run([*rescale, "--json"], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert unchanged.returncode == 0 and json.loads(unchanged.stdout)["action"] == "unchanged", unchanged.stderr
    assert api.delete(name, provider="sagemaker", purge_artifacts=True) is None
    assert_gone(aws, name)


def test_ctrl_c_during_deploy_says_how_to_resume_or_clean_up(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path, tmp_path: Path) -> None:
    name = "interrupted"
    env = {**os.environ, "CLOUDLLM_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": flaky.url}
    flaky.hold(_after_create_endpoint("DescribeEndpoint"), then="forward")
    process = subprocess.Popen(_cli_args(sagemaker_emulator, tiny_gpt2, name), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert flaky.held.wait(timeout=240), flaky.log[-5:]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        flaky.release()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "run the same command again" in last and f"cloudllm delete {name}" in last, last

    # The line's advice works: the same command resumes.
    again = subprocess.run(_cli_args(sagemaker_emulator, tiny_gpt2, name, "--json"), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert_exactly_one_version(aws, name)
    deleted = subprocess.run([CLOUDLLM, "delete", name, "--purge-artifacts"], env=env, capture_output=True, text=True, timeout=300)
    assert deleted.returncode == 0, deleted.stderr
    assert_gone(aws, name)


# --- SIGKILL mid multipart upload: the parts S3 keeps (and bills) ------------------------------------
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def gpt2_7mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 whose 7 MB model.safetensors goes up in two 5 MiB multipart parts (with _small_parts)."""
    from cloudllm.testing.tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2-7mb", n_embd=256)
    assert (model / "model.safetensors").stat().st_size > 5 * MiB
    return model


def _small_parts(args: list[str]) -> list[str]:
    """The same CLI command, in a Python that sends 5 MiB multipart parts (S3's smallest) instead of 64 MiB."""
    boot = "import cloudllm.storage.s3 as s3; s3.PART_BYTES = 5 * 1024 * 1024; from cloudllm.cli import main; main()"
    return [sys.executable, "-c", boot, *args[1:]]


def _second_part(method: str, operation: str) -> bool:
    return method == "PUT" and "/model.safetensors?" in operation and "partNumber=2" in operation


def _uploads(aws, name: str) -> list[dict]:
    return aws["s3"].list_multipart_uploads(Bucket=BUCKET, Prefix=f"models/{name}/").get("Uploads", [])


def test_a_deploy_killed_mid_multipart_upload_leaves_no_parts_after_a_purge(flaky: FaultProxy, sagemaker_emulator, aws, gpt2_7mb: Path, tmp_path: Path) -> None:
    name = "killed-multipart"
    env = {"CLOUDLLM_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": flaky.url}
    _kill_at(flaky, _small_parts(_cli_args(sagemaker_emulator, gpt2_7mb, name)), env, _second_part, "drop")
    assert _uploads(aws, name)  # what the kill left: an upload with its first part stored
    assert _owned(aws, name)["endpoints"] == []

    # Nothing in SageMaker names the artifacts, and the killed run saved no record: the purge is given the bucket.
    api.delete(name, provider="sagemaker", options={"bucket": f"{sagemaker_emulator.bucket}/models"}, purge_artifacts=True)
    assert _uploads(aws, name) == []
    assert_gone(aws, name)


def test_the_sweep_aborts_the_upload_of_an_abandoned_version(flaky: FaultProxy, sagemaker_emulator, aws, gpt2_7mb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed mid upload, then another version deployed: the killed version's parts go with it."""
    from cloudllm.providers.sagemaker import cleanup as provider  # where the sweep reads ABANDONED_UPLOAD_SECONDS

    name = "killed-then-changed"
    env = {"CLOUDLLM_HOME": str(tmp_path / "home"), "AWS_ENDPOINT_URL": flaky.url}
    _kill_at(flaky, _small_parts(_cli_args(sagemaker_emulator, gpt2_7mb, name)), env, _second_part, "drop")
    assert _uploads(aws, name)
    # An unused version counts as abandoned once untouched for an hour; here at once (its part was just written).
    monkeypatch.setattr(provider, "ABANDONED_UPLOAD_SECONDS", -1)
    changed = _deploy(sagemaker_emulator, gpt2_7mb, name, serving={"max_new_tokens": 16})
    assert changed.action == "create"
    assert _uploads(aws, name) == []
    assert_exactly_one_version(aws, name, digest=changed.plan.digest)
    api.delete(name, provider="sagemaker", purge_artifacts=True)
    assert_gone(aws, name)


# --- two pipelines deploy one endpoint at once ------------------------------------------------------
def test_two_pipelines_creating_one_endpoint_one_wins_and_the_other_fails_clearly(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path, tmp_path: Path) -> None:
    name = "raced"
    runs = [
        (_cli_args(sagemaker_emulator, tiny_gpt2, name, "--max-new-tokens", str(tokens), "--json"),
         {"CLOUDLLM_HOME": str(tmp_path / f"ci-{tokens}"), "AWS_ENDPOINT_URL": flaky.url})
        for tokens in (8, 16)
    ]  # fmt: skip
    results = flaky.race(runs, _op("CreateEndpoint"))
    winner, _ = one_wins(results, "was created by another deploy")
    won = json.loads(results[winner].stdout)
    # The loser removed its model and config; its upload stays for its retry (nothing points at it).
    assert_exactly_one_version(aws, name, digest=won["endpoint"]["digest"], unused_uploads=1)

    # Both update it at once: one moves it, the other refuses and removes what it made.
    runs = [
        (_cli_args(sagemaker_emulator, tiny_gpt2, name, "--max-new-tokens", str(tokens), "--json"),
         {"CLOUDLLM_HOME": str(tmp_path / f"ci-{tokens}"), "AWS_ENDPOINT_URL": flaky.url})
        for tokens in (24, 32)
    ]  # fmt: skip
    results = flaky.race(runs, _op("UpdateEndpoint"))
    winner, _ = one_wins(results, "is being changed by another deploy")
    won = json.loads(results[winner].stdout)
    assert_exactly_one_version(aws, name, digest=won["endpoint"]["digest"], unused_uploads=2)

    api.delete(name, provider="sagemaker", purge_artifacts=True)
    assert_gone(aws, name)


def test_a_deploy_that_finds_its_version_still_creating_waits_for_it(flaky: FaultProxy, sagemaker_emulator, aws, tiny_gpt2: Path) -> None:
    """What a second run sees after the first was killed while waiting, or a --no-wait deploy was followed by
    a deploy: the endpoint Creating. Same version: wait for it and finish. Another version: stop, clearly."""
    from cloudllm.errors import DeployFailed

    name = "still-creating"
    first = _deploy(sagemaker_emulator, tiny_gpt2, name, wait=False)
    if aws["sagemaker"].describe_endpoint(EndpointName=name)["EndpointStatus"] != "Creating":
        pytest.skip("the emulator's model server came up before the second deploy could see it Creating")
    with pytest.raises(DeployFailed) as other:
        _deploy(sagemaker_emulator, tiny_gpt2, name, serving={"max_new_tokens": 16})
    assert "another deploy is changing it to another version" in other.value.line()

    again = _deploy(sagemaker_emulator, tiny_gpt2, name)
    assert again.action == "update" and "an earlier deploy has not finished" in again.reasons[0]
    assert again.endpoint.state == "InService" and again.endpoint.digest == first.plan.digest
    assert_exactly_one_version(aws, name, digest=first.plan.digest)
    api.delete(name, provider="sagemaker", purge_artifacts=True)
    assert_gone(aws, name)
