"""The SageMaker provider against the offline emulator: real boto3 (parameter validation on) over
HTTP on loopback, the real CLI in subprocesses, and endpoints served by the generated handler."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from cloudllm import api
from cloudllm.catalog.sagemaker_images import image_uri
from cloudllm.console import Reporter
from cloudllm_emulators.sagemaker import ROLE_ARN
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.kit import Rollout
from cloudllm.providers.sagemaker import resources as res
from cloudllm.testing.faults import FaultProxy
from tests.conftest import assert_one_line_error, run_cli
from tests.storage.request_log import s3_requests, s3_writes

KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SERVE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cloudllm-serve:latest"  # containers/Dockerfile, pushed to ECR
# What sagemaker-core 2.27.0's image_uris.retrieve() answers for the pinned versions (checked by hand).
TGI_IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-tgi-inference:2.7.0-tgi3.3.6-gpu-py311-cu124-ubuntu22.04"
LMI_IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference:0.38.0-lmi29.0.0-cu130"
HF_CPU_IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:2.6.0-transformers4.51.3-cpu-py312-ubuntu22.04"


class Recorder(Reporter):
    """Keeps the steps and the byte totals of the uploads a deploy reports."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.uploaded_bytes = 0

    def step(self, message: str) -> None:
        self.steps.append(message)

    @contextmanager
    def transfer(self, total_bytes: int, description: str):
        self.uploaded_bytes += total_bytes
        yield lambda n: None


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLOUDLLM_HOME for the module's CLI runs, so `invoke NAME` finds the endpoint's record."""
    return {"CLOUDLLM_HOME": str(tmp_path_factory.mktemp("home"))}


@pytest.fixture(scope="module")
def aws(sagemaker_emulator):
    """boto3 clients of the emulator (the fixture's environment points them at it)."""
    return {name: boto3.client(name) for name in ("sagemaker", "s3", "application-autoscaling", "logs")}


def _cli_deploy(emulator, model: Path, name: str, *extra: str, env: dict, runtime: str | None = "handler", instance: str = "ml.m5.xlarge"):
    """`cloudllm deploy` to the emulator; runtime None leaves --runtime out (the provider's default)."""
    return run_cli(
        "deploy", str(model), "--provider", "sagemaker", "--name", name, *(("--runtime", runtime) if runtime else ()),
        "--instance", instance, "--bucket", f"{emulator.bucket}/models", "--role", emulator.role, *extra, env=env,
    )  # fmt: skip


def _deploy(emulator, model: Path, name: str, **kwargs):
    kwargs.setdefault("bucket", f"{emulator.bucket}/models")
    kwargs.setdefault("options", {"role": emulator.role})
    kwargs.setdefault("runtime", "handler")
    kwargs.setdefault("instance", "ml.m5.xlarge")
    return api.deploy(model, provider="sagemaker", name=name, **kwargs)


def _live(aws, name: str) -> tuple[dict, dict, dict]:
    """The endpoint, its endpoint config and its model, as SageMaker describes them."""
    endpoint = aws["sagemaker"].describe_endpoint(EndpointName=name)
    config = aws["sagemaker"].describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = aws["sagemaker"].describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    return endpoint, config, model


def _objects(aws, prefix: str) -> dict[str, tuple]:
    listing = aws["s3"].list_objects_v2(Bucket="cloudllm-emulator", Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing.get("Contents", [])}


def _owned(aws, name: str) -> dict[str, list[str]]:
    """Every resource of endpoint `name` in the emulator: endpoints, configs, models, scaling targets."""
    sm = aws["sagemaker"]
    return {
        "endpoints": [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"] if e["EndpointName"] == name],
        "configs": [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"] if c["EndpointConfigName"].startswith(name + "-")],
        "models": [m["ModelName"] for m in sm.list_models()["Models"] if m["ModelName"].startswith(name + "-")],
        "scaling": [
            t["ResourceId"]
            for t in aws["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
            if t["ResourceId"] == res.scaling_resource_id(name)
        ],
    }


def _gone(aws, name: str) -> None:
    assert _owned(aws, name) == {"endpoints": [], "configs": [], "models": [], "scaling": []}


# --- the handler runtime end to end -----------------------------------------------------------
@pytest.fixture(scope="module")
def handler(sagemaker_emulator, tiny_gpt2: Path, home: dict) -> dict:
    """GPT-2 on a CPU instance without --runtime: the handler (TGI needs a GPU), on the HF PyTorch CPU image."""
    result = _cli_deploy(sagemaker_emulator, tiny_gpt2, "sm-handler", "--json", env=home, runtime=None)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_handler_deploy_serves_uncompressed_artifacts(handler: dict, aws, sagemaker_emulator) -> None:
    assert handler["action"] == "create"
    assert handler["plan"]["runtime"] == "handler"  # chosen for ml.m5.xlarge, though TGI serves gpt2
    assert handler["endpoint"]["state"] == "InService"
    endpoint, config, model = _live(aws, "sm-handler")
    container = model["PrimaryContainer"]
    source = container["ModelDataSource"]["S3DataSource"]
    assert source["S3DataType"] == "S3Prefix" and source["CompressionType"] == "None"
    assert "ModelDataUrl" not in container
    assert container["Image"] == HF_CPU_IMAGE
    assert container["Environment"]["HF_TASK"] == "text-generation"
    assert model["ExecutionRoleArn"] == sagemaker_emulator.role

    # The files themselves, uncompressed, beside their manifest, encrypted, with their sha256.
    prefix = source["S3Uri"][len("s3://cloudllm-emulator/") :]
    assert re.fullmatch(r"models/sm-handler/[0-9a-f]{16}/", prefix)
    keys = {key[len(prefix) :] for key in _objects(aws, prefix)}
    assert {"config.json", "model.safetensors", "code/serve.py", "code/inference.py", "cloudllm.json"} <= keys
    assert not any(key.endswith((".tar.gz", ".tar")) for key in keys)
    manifest = json.loads(aws["s3"].get_object(Bucket="cloudllm-emulator", Key=prefix + "cloudllm.json")["Body"].read())
    head = aws["s3"].head_object(Bucket="cloudllm-emulator", Key=prefix + "model.safetensors")
    assert head["ServerSideEncryption"] == "AES256"
    # Its sha256 when known before the upload, else (hashed while uploading) the file's identity; the manifest has the sha256.
    assert head["Metadata"].get("cloudllm-sha256", manifest["files"]["model.safetensors"]["sha256"]) == manifest["files"]["model.safetensors"]["sha256"]
    assert "cloudllm-sha256" in head["Metadata"] or head["Metadata"]["cloudllm-identity"].startswith("identity:")

    variant = config["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.m5.xlarge" and variant["InitialInstanceCount"] == 1
    assert variant["VolumeSizeInGB"] == 11  # EBS-only instance: sized from the bytes (+10 GB)
    assert 60 <= variant["ModelDataDownloadTimeoutInSeconds"] <= 3600
    assert 60 <= variant["ContainerStartupHealthCheckTimeoutInSeconds"] <= 3600


def test_invoke_text_stream_and_json(handler: dict, home: dict) -> None:
    text = run_cli("invoke", "sm-handler", "Once upon a time", "--max-new-tokens", "12", env=home)
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip()

    # The HF inference toolkit cannot stream (it refuses "stream": true): --stream gets the whole answer, once.
    streamed = run_cli("invoke", "sm-handler", "Once upon a time", "--max-new-tokens", "12", "--stream", env=home)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == text.stdout
    pieces = list(api.invoke_stream("sm-handler", "Once upon a time", parameters={"max_new_tokens": 12}, provider="sagemaker"))
    assert pieces == [text.stdout.strip("\n")]

    body = json.dumps({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 12}})
    raw = run_cli("invoke", "sm-handler", "--json", body, "--raw", "--provider", "sagemaker", env={})  # no record: --provider
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)[0]["generated_text"] == text.stdout.strip("\n")


def test_invoke_timeout_reaches_the_runtime_client(handler: dict, home: dict, sagemaker_emulator) -> None:
    """An invocation the endpoint never answers (the fault proxy parks it): `--timeout` ends it with one line."""
    with FaultProxy(sagemaker_emulator.url, rate=0.0, flavour="aws") as proxy:
        proxy.hold(lambda method, path: path.startswith("/endpoints/sm-handler/invocations"))
        try:
            parked = run_cli("invoke", "sm-handler", "hi", "--timeout", "1", env={**home, "AWS_ENDPOINT_URL": proxy.url})
        finally:
            proxy.release()
    assert_one_line_error(parked, code=1, contains="endpoint sm-handler did not answer within 1s")
    assert proxy.held_count == 1  # sent once: botocore does not retry the read timeout


def test_status_list_and_logs(handler: dict, home: dict) -> None:
    status = run_cli("status", "sm-handler", "--json", env=home)
    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)
    assert found["state"] == "InService" and found["instance"] == "ml.m5.xlarge" and found["runtime"] == "handler"
    assert found["digest"] == handler["digest"]
    assert found["fingerprint"]["digest"] == handler["digest"] and found["fingerprint"]["weights_digest"]

    listed = run_cli("list", "--provider", "sagemaker", "--json", env=home)
    assert "sm-handler" in [ep["name"] for ep in json.loads(listed.stdout)]

    logs = run_cli("logs", "sm-handler", env=home)
    assert logs.returncode == 0, logs.stderr
    assert "toolkit: model_fn loaded" in logs.stdout  # the model server's own log lines, from CloudWatch Logs
    recent = run_cli("logs", "sm-handler", "--since", "1h", env=home)
    assert recent.returncode == 0 and "toolkit: model_fn loaded" in recent.stdout
    future = run_cli("logs", "sm-handler", "--since", "2099-01-01T00:00:00Z", env=home)
    assert future.returncode == 0 and future.stdout == ""  # CloudWatch's startTime filtered them all out


def test_unchanged_redeploy_uploads_and_creates_nothing(handler: dict, aws, sagemaker_emulator, tiny_gpt2: Path, home: dict) -> None:
    before = (_objects(aws, "models/sm-handler/"), _owned(aws, "sm-handler"))
    again = _cli_deploy(sagemaker_emulator, tiny_gpt2, "sm-handler", env=home)
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
    assert "upload" not in again.stderr
    assert (_objects(aws, "models/sm-handler/"), _owned(aws, "sm-handler")) == before


def test_changed_code_is_a_blue_green_update(handler: dict, aws, sagemaker_emulator, tiny_gpt2: Path) -> None:
    _, old_config, old_model = _live(aws, "sm-handler")
    old_prefix = old_model["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]["S3Uri"]
    recorder = Recorder()
    with s3_requests() as log:
        result = _deploy(sagemaker_emulator, tiny_gpt2, "sm-handler", serving={"max_new_tokens": 16}, rollout="canary:25", reporter=recorder)
    assert result.action == "update" and result.reasons == ["code or serving settings changed"]

    # Settings travel in the model's environment: S3 saw no upload and no copy, of weights or anything
    # else (the log is S3's own, server side), and the new model reads the prefix the old one does.
    assert [r for r in log if r[1].startswith("/cloudllm-emulator/")], "the request log recorded nothing"
    assert s3_writes(log) == []
    assert recorder.uploaded_bytes == 0 and not any("copied" in step for step in recorder.steps), recorder.steps

    endpoint, config, model = _live(aws, "sm-handler")
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] != old_config["EndpointConfigName"]
    routing = endpoint["LastDeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing["Type"] == "CANARY" and routing["CanarySize"] == {"Type": "CAPACITY_PERCENT", "Value": 25}
    assert result.endpoint.digest == result.plan.digest

    assert model["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]["S3Uri"] == old_prefix
    assert json.loads(model["PrimaryContainer"]["Environment"]["CLOUDLLM_SETTINGS"])["max_new_tokens"] == 16
    # The old version is gone: config and model; the artifact prefix both read stays.
    with pytest.raises(ClientError):
        aws["sagemaker"].describe_endpoint_config(EndpointConfigName=old_config["EndpointConfigName"])
    with pytest.raises(ClientError):
        aws["sagemaker"].describe_model(ModelName=old_model["ModelName"])
    assert _objects(aws, old_prefix[len("s3://cloudllm-emulator/") :])
    assert _owned(aws, "sm-handler")["configs"] == [endpoint["EndpointConfigName"]]
    assert api.invoke("sm-handler", "Once upon a time", parameters={"max_new_tokens": 4}, provider="sagemaker")


@pytest.fixture(scope="module")
def broken(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-gpt2 with a config.json the server cannot build a model from (it passes inspection)."""
    path = tmp_path_factory.mktemp("broken") / "broken-gpt2"
    shutil.copytree(tiny_gpt2, path)
    config = json.loads((path / "config.json").read_text())
    config["n_head"] = 3  # 64 hidden units do not split into 3 heads
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_failed_update_rolls_back_and_removes_what_it_created(handler: dict, aws, sagemaker_emulator, broken: Path) -> None:
    before = _owned(aws, "sm-handler")
    live_before, _, _ = _live(aws, "sm-handler")

    with pytest.raises(DeployFailed) as failure:
        _deploy(sagemaker_emulator, broken, "sm-handler", options={"role": sagemaker_emulator.role, "force": True})
    message = failure.value.line()
    assert "rolled back" in message and "/aws/sagemaker/Endpoints/sm-handler" in message
    assert "production variant AllTraffic" in message  # SageMaker's FailureReason: what the new fleet failed

    live_after, _, _ = _live(aws, "sm-handler")
    assert live_after["EndpointStatus"] == "InService"
    assert live_after["EndpointConfigName"] == live_before["EndpointConfigName"]
    assert _owned(aws, "sm-handler") == before
    assert api.invoke("sm-handler", "Hello", parameters={"max_new_tokens": 2}, provider="sagemaker")


def test_failed_create_removes_what_it_created(aws, sagemaker_emulator, broken: Path, home: dict) -> None:
    result = _cli_deploy(sagemaker_emulator, broken, "sm-broken", "--force", env=home)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the progress lines
    assert line.startswith("error: endpoint sm-broken failed: ") and "production variant AllTraffic" in line
    assert "/aws/sagemaker/Endpoints/sm-broken" in line  # where to look, beside SageMaker's FailureReason
    assert "cleaned up endpoint sm-broken" in result.stderr
    _gone(aws, "sm-broken")
    assert _objects(aws, "models/sm-broken/")  # the upload stays for the retry; `delete --purge-artifacts` removes it

    # Nothing in SageMaker names the artifacts any more, and this machine has no record: the purge needs the bucket.
    no_bucket = run_cli("delete", "sm-broken", "--provider", "sagemaker", "--purge-artifacts", env=home)
    assert_one_line_error(no_bucket, code=2, contains="pass the --bucket it was deployed with")
    assert _objects(aws, "models/sm-broken/")
    purged = run_cli("delete", "sm-broken", "--provider", "sagemaker", "--purge-artifacts", "--bucket", f"{sagemaker_emulator.bucket}/models/", env=home)
    assert purged.returncode == 0, purged.stderr
    assert not _objects(aws, "models/sm-broken/")
    assert not aws["s3"].list_multipart_uploads(Bucket="cloudllm-emulator", Prefix="models/sm-broken/").get("Uploads")


def test_delete_with_purge_leaves_nothing(handler: dict, aws, home: dict) -> None:
    deleted = run_cli("delete", "sm-handler", "--purge-artifacts", env=home)
    assert deleted.returncode == 0, deleted.stderr
    _gone(aws, "sm-handler")
    assert not _objects(aws, "models/sm-handler/")
    again = run_cli("status", "sm-handler", "--provider", "sagemaker", env=home)
    assert_one_line_error(again, contains="does not exist")


# --- the engine runtimes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tgi(sagemaker_emulator, tiny_gpt2: Path, home: dict) -> dict:
    result = _cli_deploy(
        sagemaker_emulator, tiny_gpt2, "sm-tgi",
        "--min-instances", "1", "--max-instances", "4", "--scale-metric", "concurrency", "--scale-target", "5",
        "--scale-out-cooldown", "30", "--tag", "team=ml", "--network-isolation", "--kms-key", KMS_KEY, "--json",
        env=home, runtime="tgi", instance="ml.g5.12xlarge",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _scaling(aws, name: str) -> tuple[dict, list[dict]]:
    scaling = aws["application-autoscaling"]
    rid = res.scaling_resource_id(name)
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])["ScalableTargets"]
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)["ScalingPolicies"]
    return target, policies


def test_tgi_deploy_records_model_config_env_and_image(tgi: dict, aws) -> None:
    assert tgi["endpoint"]["state"] == "InService"
    endpoint, config, model = _live(aws, "sm-tgi")
    container = model["PrimaryContainer"]
    assert container["Image"] == TGI_IMAGE
    env = container["Environment"]
    assert env["HF_MODEL_ID"] == "/opt/ml/model" and env["SM_NUM_GPUS"] == "4"
    assert int(env["MAX_INPUT_TOKENS"]) < int(env["MAX_TOTAL_TOKENS"])
    assert model["EnableNetworkIsolation"] is True

    variant = config["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.g5.12xlarge"
    assert "VolumeSizeInGB" not in variant and "KmsKeyId" not in config  # g5: local NVMe, hardware-encrypted
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] >= 600  # TGI warms up before /ping
    tags = res.tag_dict(aws["sagemaker"].list_tags(ResourceArn=config["EndpointConfigArn"])["Tags"])
    assert tags["team"] == "ml" and tags[res.FINGERPRINT_TAGS["digest"]] == tgi["digest"]

    prefix = container["ModelDataSource"]["S3DataSource"]["S3Uri"][len("s3://cloudllm-emulator/") :]
    head = aws["s3"].head_object(Bucket="cloudllm-emulator", Key=prefix + "model.safetensors")
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == KMS_KEY


def test_autoscaling_target_and_policy(tgi: dict, aws) -> None:
    target, (policy,) = _scaling(aws, "sm-tgi")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantConcurrentRequestsPerModelHighResolution"
    assert tracking["TargetValue"] == 5.0 and tracking["ScaleOutCooldown"] == 30


def test_update_to_another_instance_type_re_registers_scaling(tgi: dict, aws, sagemaker_emulator, tiny_gpt2: Path) -> None:
    recorder = Recorder()
    result = _deploy(
        sagemaker_emulator, tiny_gpt2, "sm-tgi", runtime="tgi", instance="ml.g5.2xlarge", min_instances=1, max_instances=2,
        tags={"team": "research"}, options={"role": ROLE_ARN, "network_isolation": True, "kms_key": KMS_KEY}, reporter=recorder,
    )  # fmt: skip
    assert result.action == "update"
    assert result.reasons == ["instance ml.g5.12xlarge -> ml.g5.2xlarge", "tags changed (team ml -> research)", "autoscaling changed (now 1-2 instances)"]
    assert recorder.uploaded_bytes == 0  # same artifact: the version prefix is already complete
    assert result.endpoint.details["tags"] == {"team": "research"}
    endpoint, config, model = _live(aws, "sm-tgi")
    assert res.tag_dict(aws["sagemaker"].list_tags(ResourceArn=endpoint["EndpointArn"])["Tags"])["team"] == "research"
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.g5.2xlarge"
    assert model["PrimaryContainer"]["Environment"]["SM_NUM_GPUS"] == "1"
    target, (policy,) = _scaling(aws, "sm-tgi")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 2)
    metric = policy["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]["PredefinedMetricType"]
    assert metric == "SageMakerVariantInvocationsPerInstance"  # the default metric, now that none is given
    assert len(_owned(aws, "sm-tgi")["configs"]) == 1


def test_an_autoscaling_change_alone_is_made_in_place(tgi: dict, aws, sagemaker_emulator, tiny_gpt2: Path) -> None:
    """min/max, metric or target alone: the scalable target and policy change; no new model, config or fleet."""
    same = dict(
        runtime="tgi", instance="ml.g5.2xlarge", tags={"team": "research"},
        options={"role": ROLE_ARN, "network_isolation": True, "kms_key": KMS_KEY},
    )  # fmt: skip  (what the previous test deployed, all but the scaling)
    _, config_before, model_before = _live(aws, "sm-tgi")
    plan = api.plan(tiny_gpt2, provider="sagemaker", name="sm-tgi", bucket=f"{sagemaker_emulator.bucket}/models",
                    min_instances=2, max_instances=3, scale_metric="concurrency", scale_target=3, **same)  # fmt: skip
    assert plan.rescale_only
    assert [(c.resource, c.action) for c in plan.changes] == [("endpoint", "update"), ("scaling-target", "update"), ("scaling-policy", "update")]
    assert "in place" in plan.changes[0].reason

    recorder = Recorder()
    result = _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", min_instances=2, max_instances=3, scale_metric="concurrency",
                     scale_target=3, reporter=recorder, **same)  # fmt: skip
    assert result.action == "update" and result.reasons == ["autoscaling changed (now 2-3 instances)"]
    assert any("in place" in step for step in recorder.steps) and recorder.uploaded_bytes == 0
    endpoint, config, model = _live(aws, "sm-tgi")
    assert (config["EndpointConfigName"], model["ModelName"]) == (config_before["EndpointConfigName"], model_before["ModelName"])
    assert endpoint["EndpointStatus"] == "InService" and "PendingDeploymentSummary" not in endpoint
    target, (policy,) = _scaling(aws, "sm-tgi")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 3)
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"].startswith("SageMakerVariantConcurrentRequests")
    assert tracking["TargetValue"] == 3.0
    for arn in (config["EndpointConfigArn"], model["ModelArn"]):  # the running version's fingerprint says what runs now
        tags = res.tag_dict(aws["sagemaker"].list_tags(ResourceArn=arn)["Tags"])
        assert tags[res.FINGERPRINT_TAGS["digest"]] == result.plan.digest
    again = _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", min_instances=2, max_instances=3, scale_metric="concurrency", scale_target=3, **same)
    assert again.action == "unchanged"

    # Autoscaling off: the target and policy go and the count autoscaling had chosen is set back to one.
    aws["sagemaker"].update_endpoint_weights_and_capacities(
        EndpointName="sm-tgi", DesiredWeightsAndCapacities=[{"VariantName": res.VARIANT, "DesiredInstanceCount": 3}]
    )  # what Application Auto Scaling would have done under load
    off = _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", reporter=(recorder := Recorder()), **same)
    assert off.reasons == ["autoscaling changed (now 1-1 instances)"] and any("3 -> 1 instance" in s for s in recorder.steps)
    endpoint, config, _ = _live(aws, "sm-tgi")
    assert config["EndpointConfigName"] == config_before["EndpointConfigName"]
    assert endpoint["ProductionVariants"][0]["CurrentInstanceCount"] == 1
    assert _owned(aws, "sm-tgi")["scaling"] == [] and len(_owned(aws, "sm-tgi")["configs"]) == 1
    assert _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", **same).action == "unchanged"


def _user_tags(aws, arn: str) -> dict[str, str]:
    return {k: v for k, v in res.tag_dict(aws["sagemaker"].list_tags(ResourceArn=arn)["Tags"]).items() if not k.startswith(res.TAG)}


def _arns(aws, name: str) -> tuple[str, str, str]:
    endpoint, config, model = _live(aws, name)
    return endpoint["EndpointArn"], config["EndpointConfigArn"], model["ModelArn"]


# What the tests above deployed on sm-tgi, all but the tags.
_TGI = dict(runtime="tgi", instance="ml.g5.2xlarge", options={"role": ROLE_ARN, "network_isolation": True, "kms_key": KMS_KEY})


def test_a_tags_change_alone_is_made_in_place(tgi: dict, aws, sagemaker_emulator, tiny_gpt2: Path) -> None:
    """Tags alone (`apply` adopting an endpoint adds its file's tag): AddTags/DeleteTags on the running model,
    endpoint config and endpoint; no new version, no blue/green update."""
    _, config_before, model_before = _live(aws, "sm-tgi")
    wanted = {"team": "platform", "owner": "ml"}  # was {"team": "research"}
    plan = api.plan(tiny_gpt2, provider="sagemaker", name="sm-tgi", bucket=f"{sagemaker_emulator.bucket}/models", tags=wanted, **_TGI)
    assert plan.retag_only and not plan.rescale_only
    assert [(c.resource, c.action) for c in plan.changes] == [("endpoint", "update")]
    assert "tags only, in place" in plan.changes[0].reason

    recorder = Recorder()
    result = _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", tags=wanted, reporter=recorder, **_TGI)
    assert result.action == "update" and result.reasons == ["tags changed (+owner, team research -> platform)"]
    assert any("in place" in step for step in recorder.steps) and recorder.uploaded_bytes == 0
    endpoint, config, model = _live(aws, "sm-tgi")
    assert (config["EndpointConfigName"], model["ModelName"]) == (config_before["EndpointConfigName"], model_before["ModelName"])
    assert endpoint["EndpointStatus"] == "InService" and "PendingDeploymentSummary" not in endpoint
    assert [_user_tags(aws, arn) for arn in _arns(aws, "sm-tgi")] == [wanted] * 3
    for arn in (config["EndpointConfigArn"], model["ModelArn"]):  # the running version's fingerprint says what runs now
        assert res.tag_dict(aws["sagemaker"].list_tags(ResourceArn=arn)["Tags"])[res.FINGERPRINT_TAGS["digest"]] == result.plan.digest
    assert result.endpoint.details["tags"] == wanted and not result.endpoint.unfinished

    # A tag dropped is deleted from all three; the same again changes nothing.
    dropped = _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", tags={"team": "research"}, **_TGI)
    assert dropped.reasons == ["tags changed (team platform -> research, -owner)"]
    assert [_user_tags(aws, arn) for arn in _arns(aws, "sm-tgi")] == [{"team": "research"}] * 3
    assert _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", tags={"team": "research"}, **_TGI).action == "unchanged"
    assert len(_owned(aws, "sm-tgi")["configs"]) == 1


def test_an_endpoint_deployed_before_tags_had_their_own_digest(tgi: dict, aws, sagemaker_emulator, tiny_gpt2: Path) -> None:
    """Its deploy digest covers the tags: the same deploy is still unchanged, and a tags change is still made in place."""
    sm, tags = aws["sagemaker"], {"team": "research"}
    kwargs = dict(provider="sagemaker", name="sm-tgi", bucket=f"{sagemaker_emulator.bucket}/models", **_TGI)
    plan = api.plan(tiny_gpt2, tags=tags, **kwargs)
    assert plan.action == "unchanged"
    _, config_arn, model_arn = _arns(aws, "sm-tgi")
    for arn in (config_arn, model_arn):  # as an older cloudllm tagged them
        sm.delete_tags(ResourceArn=arn, TagKeys=[res.FINGERPRINT_TAGS["tags_digest"]])
        sm.add_tags(ResourceArn=arn, Tags=res.tag_list({res.FINGERPRINT_TAGS["deploy_digest"]: plan.deploy_digest_with_tags(tags)}))
    old = api.status("sm-tgi", provider="sagemaker")
    assert old.fingerprint.tags_digest is None and old.fingerprint.deploy_digest != plan.deploy_digest

    assert api.plan(tiny_gpt2, tags=tags, **kwargs).action == "unchanged"
    other = api.plan(tiny_gpt2, tags={**tags, "owner": "ml"}, **kwargs)
    assert other.reasons == ["tags changed (+owner)"] and other.retag_only
    serving = api.plan(tiny_gpt2, tags=tags, serving={"max_new_tokens": 7}, **kwargs)
    assert serving.reasons == ["code or serving settings changed"]  # a real change still reads as one
    result = _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", tags={**tags, "owner": "ml"}, **_TGI)
    assert result.action == "update" and result.endpoint.fingerprint.tags_digest == result.plan.tags_digest
    assert _deploy(sagemaker_emulator, tiny_gpt2, "sm-tgi", tags={**tags, "owner": "ml"}, **_TGI).action == "unchanged"
    assert len(_owned(aws, "sm-tgi")["configs"]) == 1


def test_delete_removes_scaling_and_keeps_artifacts(tgi: dict, aws, home: dict) -> None:
    deleted = run_cli("delete", "sm-tgi", env=home)
    assert deleted.returncode == 0, deleted.stderr
    _gone(aws, "sm-tgi")
    assert not aws["application-autoscaling"].describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert _objects(aws, "models/sm-tgi/")  # kept without --purge-artifacts: a re-deploy uploads nothing


def test_purge_after_a_plain_delete_finds_the_artifacts_by_bucket(tgi: dict, aws, sagemaker_emulator) -> None:
    assert _objects(aws, "models/sm-tgi/") and not _owned(aws, "sm-tgi")["endpoints"]
    bucket = {"bucket": f"{sagemaker_emulator.bucket}/models"}
    api.delete("sm-tgi", provider="sagemaker", options=bucket, purge_artifacts=True)
    assert not _objects(aws, "models/sm-tgi/")
    with pytest.raises(UserError, match="no SageMaker endpoint named sm-tgi in us-east-1, and no artifacts under s3://cloudllm-emulator/models/sm-tgi/"):
        api.delete("sm-tgi", provider="sagemaker", options=bucket, purge_artifacts=True)


def test_vllm_deploy_no_wait(sagemaker_emulator, aws, tiny_gpt2: Path, home: dict) -> None:
    result = _cli_deploy(sagemaker_emulator, tiny_gpt2, "sm-vllm", "--no-wait", "--json", env=home, runtime="vllm", instance="ml.g5.2xlarge")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["endpoint"]["state"] == "Creating"  # returned without waiting
    _, config, model = _live(aws, "sm-vllm")
    container = model["PrimaryContainer"]
    assert container["Image"] == LMI_IMAGE
    env = container["Environment"]
    assert env["OPTION_ROLLING_BATCH"] == "vllm" and env["TENSOR_PARALLEL_DEGREE"] == "1"
    assert env["HF_MODEL_ID"] == "/opt/ml/model"
    variant = config["ProductionVariants"][0]
    assert int(env["OPTION_MODEL_LOADING_TIMEOUT"]) <= variant["ContainerStartupHealthCheckTimeoutInSeconds"]

    deleted = run_cli("delete", "sm-vllm", "--purge-artifacts", env=home)
    assert deleted.returncode == 0, deleted.stderr
    _gone(aws, "sm-vllm")
    assert not _objects(aws, "models/sm-vllm/")


def test_vllm_deploy_waits_for_in_service_and_records_model_config_env_and_image(sagemaker_emulator, aws, tiny_gpt2: Path, home: dict) -> None:
    """8 GPUs, a model with 4 attention heads: vLLM shards 4 ways (8 does not divide the heads)."""
    result = _cli_deploy(sagemaker_emulator, tiny_gpt2, "sm-vllm-full", "--json", env=home, runtime="vllm", instance="ml.g5.48xlarge")
    assert result.returncode == 0, result.stderr
    deployed = json.loads(result.stdout)
    assert deployed["endpoint"]["state"] == "InService" and deployed["endpoint"]["runtime"] == "vllm"
    endpoint, config, model = _live(aws, "sm-vllm-full")
    container = model["PrimaryContainer"]
    assert container["Image"] == LMI_IMAGE
    assert container["ModelDataSource"]["S3DataSource"]["S3Uri"].startswith("s3://cloudllm-emulator/models/sm-vllm-full/")
    env = container["Environment"]
    assert env["HF_MODEL_ID"] == "/opt/ml/model" and env["OPTION_ROLLING_BATCH"] == "vllm"
    assert env["TENSOR_PARALLEL_DEGREE"] == "4"
    assert env["OPTION_MAX_MODEL_LEN"] == "256"  # the model's n_positions
    assert "SM_NUM_GPUS" not in env and "HF_TASK" not in env
    variant = config["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"], variant["ModelName"]) == ("ml.g5.48xlarge", 1, model["ModelName"])
    assert "VolumeSizeInGB" not in variant  # local NVMe
    assert int(env["OPTION_MODEL_LOADING_TIMEOUT"]) <= variant["ContainerStartupHealthCheckTimeoutInSeconds"]
    tags = res.tag_dict(aws["sagemaker"].list_tags(ResourceArn=config["EndpointConfigArn"])["Tags"])
    assert tags[res.TAG + "runtime"] == "vllm" and tags[res.FINGERPRINT_TAGS["digest"]] == deployed["digest"]
    assert api.invoke("sm-vllm-full", "Once upon a time", parameters={"max_new_tokens": 3}, provider="sagemaker")

    # The endpoint removed behind cloudllm's back (the console): the local record still says where the artifacts are.
    sm = aws["sagemaker"]
    sm.delete_endpoint(EndpointName="sm-vllm-full")
    sm.delete_endpoint_config(EndpointConfigName=config["EndpointConfigName"])
    sm.delete_model(ModelName=model["ModelName"])
    purged = run_cli("delete", "sm-vllm-full", "--purge-artifacts", env=home)
    assert purged.returncode == 0, purged.stderr
    assert not _objects(aws, "models/sm-vllm-full/")


def _plan(tiny: Path, instance: str, runtime: str, **kwargs):
    """A plan as `cloudllm plan` makes it (offline checks only), and the container environment it becomes."""
    kwargs.setdefault("options", {"role": ROLE_ARN})
    plan = api.plan(tiny, provider="sagemaker", name="sm-plan", runtime=runtime, instance=instance, bucket="s3://cloudllm-emulator/models", **kwargs)
    return plan, res.container_env(plan, instance, res.sizing(plan, instance), "us-east-1")


@pytest.mark.parametrize(
    ("instance", "runtime", "key", "shards"),
    [
        ("ml.g5.48xlarge", "tgi", "SM_NUM_GPUS", "4"),  # 8 GPUs, 4 heads: 8 ways would not start
        ("ml.g5.12xlarge", "tgi", "SM_NUM_GPUS", "4"),
        ("ml.p5e.48xlarge", "tgi", "SM_NUM_GPUS", "4"),  # newly catalogued: was taken as 1 GPU
        ("ml.p3.16xlarge", "vllm", "TENSOR_PARALLEL_DEGREE", "4"),
        ("ml.g7.12xlarge", "vllm", "TENSOR_PARALLEL_DEGREE", "2"),
        ("ml.g5.xlarge", "tgi", "SM_NUM_GPUS", "1"),
    ],
)
def test_engines_shard_over_the_gpus_the_attention_heads_split_into(sagemaker_emulator, tiny_gpt2: Path, instance, runtime, key, shards) -> None:
    _, env = _plan(tiny_gpt2, instance, runtime)
    assert env[key] == shards


def test_a_gpu_type_the_catalog_lacks_needs_num_gpus_for_the_engines(sagemaker_emulator, aws, tiny_gpt2: Path, home: dict) -> None:
    refused = _cli_deploy(sagemaker_emulator, tiny_gpt2, "sm-p6", env=home, runtime="tgi", instance="ml.p6-b300.48xlarge")
    assert_one_line_error(refused, contains="--option num_gpus=N")
    _gone(aws, "sm-p6")
    assert not _objects(aws, "models/sm-p6/")
    with pytest.raises(UserError, match="has 8 NVIDIA GPU"):
        _plan(tiny_gpt2, "ml.g5.48xlarge", "tgi", options={"role": ROLE_ARN, "num_gpus": 4})  # the catalog knows better

    result = _cli_deploy(sagemaker_emulator, tiny_gpt2, "sm-p6", "--option", "num_gpus=8", "--no-wait", env=home, runtime="tgi", instance="ml.p6-b300.48xlarge")
    assert result.returncode == 0, result.stderr
    _, config, model = _live(aws, "sm-p6")
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.p6-b300.48xlarge"
    assert model["PrimaryContainer"]["Environment"]["SM_NUM_GPUS"] == "4"
    assert run_cli("delete", "sm-p6", "--purge-artifacts", env=home).returncode == 0
    _gone(aws, "sm-p6")


def test_image_engine_quantize_and_vpc_reach_create_model(sagemaker_emulator, aws, tiny_gpt2: Path, home: dict) -> None:
    result = _cli_deploy(
        sagemaker_emulator, tiny_gpt2, "sm-tgi-bnb", "--quantize", "bitsandbytes", "--no-wait",
        "--vpc-subnets", "subnet-0a1,subnet-0b2", "--vpc-security-groups", "sg-0c3", env=home, runtime="tgi", instance="ml.g5.xlarge",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, _, model = _live(aws, "sm-tgi-bnb")
    env = model["PrimaryContainer"]["Environment"]
    assert env["HF_MODEL_QUANTIZE"] == "bitsandbytes" and "DTYPE" not in env
    assert model["VpcConfig"] == {"Subnets": ["subnet-0a1", "subnet-0b2"], "SecurityGroupIds": ["sg-0c3"]}
    assert model["PrimaryContainer"]["Image"] == TGI_IMAGE
    assert run_cli("delete", "sm-tgi-bnb", "--purge-artifacts", env=home).returncode == 0
    _gone(aws, "sm-tgi-bnb")


def test_image_is_honoured_and_a_server_image_streams(sagemaker_emulator, aws, tiny_gpt2: Path, home: dict) -> None:
    """The handler on cloudllm's own serving image runs code/serve.py, which streams tokens (the DLC cannot)."""
    result = _cli_deploy(sagemaker_emulator, tiny_gpt2, "sm-image", "--image", SERVE_IMAGE, env=home, runtime=None)
    assert result.returncode == 0, result.stderr
    _, _, model = _live(aws, "sm-image")
    assert model["PrimaryContainer"]["Image"] == SERVE_IMAGE
    whole = api.invoke("sm-image", "Once upon a time", parameters={"max_new_tokens": 12}, provider="sagemaker", full_response=True)
    pieces = list(api.invoke_stream("sm-image", "Once upon a time", parameters={"max_new_tokens": 12}, provider="sagemaker"))
    assert len(pieces) > 1 and "".join(pieces) == whole[0]["generated_text"]
    assert run_cli("delete", "sm-image", "--purge-artifacts", env=home).returncode == 0
    _gone(aws, "sm-image")


def test_an_endpoint_removed_elsewhere_leaves_only_a_record_to_delete(sagemaker_emulator, aws, tiny_gpt2: Path, home: dict) -> None:
    assert _cli_deploy(sagemaker_emulator, tiny_gpt2, "sm-orphan", env=home).returncode == 0
    _, config, model = _live(aws, "sm-orphan")
    sm = aws["sagemaker"]  # the console, or another machine's `cloudllm delete`
    sm.delete_endpoint(EndpointName="sm-orphan")
    sm.delete_endpoint_config(EndpointConfigName=config["EndpointConfigName"])
    sm.delete_model(ModelName=model["ModelName"])
    assert ("sm-orphan", "Missing") in [(e["name"], e["state"]) for e in json.loads(run_cli("list", "--json", env=home).stdout)]
    deleted = run_cli("delete", "sm-orphan", env=home)
    assert deleted.returncode == 0, deleted.stderr
    assert "already gone from sagemaker; removed this machine's record" in deleted.stderr
    assert "sm-orphan" not in run_cli("list", env=home).stdout
    assert _objects(aws, "models/sm-orphan/")  # kept without --purge-artifacts
    again = run_cli("delete", "sm-orphan", env=home)
    assert_one_line_error(again, contains="no endpoint named 'sm-orphan' on this machine")
    purged = run_cli("delete", "sm-orphan", "--provider", "sagemaker", "--purge-artifacts", "--bucket", f"{sagemaker_emulator.bucket}/models", env=home)
    assert purged.returncode == 0, purged.stderr
    assert not _objects(aws, "models/sm-orphan/")


def test_network_isolation_refuses_what_the_container_would_pip_install(sagemaker_emulator, tiny_gpt2: Path) -> None:
    isolated = {"role": ROLE_ARN, "network_isolation": True}
    with pytest.raises(UserError) as refused:
        _plan(tiny_gpt2, "ml.m5.xlarge", None, quantize="int8", options=isolated)
    assert "--network-isolation" in refused.value.line() and "optimum-quanto" in refused.value.line()
    plan, _ = _plan(tiny_gpt2, "ml.m5.xlarge", None, quantize="int8", options=isolated, image=SERVE_IMAGE)  # no pip at start
    assert plan.runtime == "handler"
    _plan(tiny_gpt2, "ml.m5.xlarge", None, options=isolated)  # full-precision weights: requirements.txt lists nothing


# --- bad input: one line, non-zero exit, nothing created ------------------------------------------
@pytest.mark.parametrize(
    ("name", "args", "contains"),
    [
        ("sm-bad-type", ["--instance", "ml.g5.xlarg"], "ml.g5.xlarge"),
        ("sm-bad-type", ["--instance", "ml.p6-b300.48xlarg"], "did you mean ml.p6-b300.48xlarge"),  # botocore's, not catalogued
        ("sm-bad-bucket", ["--bucket", "s3://no-such-bucket/models"], "does not exist"),
        # Real regions (botocore's partitions list them) where the runtime's image is not published:
        ("sm-bad-region", ["--region", "mx-central-1"], "not published in region mx-central-1"),
        ("sm-bad-region", ["--runtime", "vllm", "--instance", "ml.g5.xlarge", "--region", "me-west-1"], "not published in region me-west-1"),
        ("sm-bad-region", ["--region", "us-east1"], "unknown AWS region 'us-east1'. did you mean us-east-1?"),
        ("sm-bad-scale", ["--min-instances", "3", "--max-instances", "2"], "min_instances (3) is above max_instances (2)"),
        ("sm-no-role", ["--role", None], "execution role"),
        ("bad_name", [], "invalid endpoint name"),
        ("x" * 64, [], "invalid endpoint name"),
        ("sm-isolated", ["--quantize", "int8", "--network-isolation"], "--network-isolation leaves the container no network"),
    ],
)
def test_bad_input_through_the_cli(sagemaker_emulator, aws, tiny_gpt2: Path, home: dict, name: str, args: list, contains: str) -> None:
    """args follow the base flags (the last value wins); a flag followed by None is left out."""
    base = ["--bucket", f"{sagemaker_emulator.bucket}/models", "--role", sagemaker_emulator.role, "--runtime", "handler", "--instance", "ml.m5.xlarge"]
    dropped = {args[i] for i in range(len(args) - 1) if args[i + 1] is None}
    base = [part for flag, value in zip(base[::2], base[1::2]) if flag not in dropped for part in (flag, value)]
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "sagemaker", "--name", name, *base, *(a for a in args if a is not None and a not in dropped), env=home)
    assert_one_line_error(result, contains=contains)
    _gone(aws, name)
    assert not _objects(aws, f"models/{name}/")


@pytest.mark.parametrize(
    ("overrides", "contains"),
    [
        ({"min_instances": 3, "max_instances": 2}, "min_instances (3) is above max_instances (2)"),
        ({"options": {}}, "execution role"),
        ({"options": {"role": "SageMakerRole"}}, "not an IAM role ARN"),
        ({"options": {"role": "arn:aws:iam::123456789012:role/nobody"}}, "does not exist"),
        ({"name": "bad_name"}, "invalid endpoint name"),
        ({"runtime": "tgi", "instance": "ml.m5.xlarge"}, "needs a GPU"),
        ({"bucket": "gs://wrong-cloud/models"}, "not an s3:// location"),
        ({"scale_metric": "gpu-duty-cycle", "max_instances": 2}, "unknown --scale-metric"),
        ({"quantize": "eetq"}, "cannot apply --quantize eetq"),
        ({"tags": {"aws:owner": "me"}}, "reserved prefix"),
        ({"options": {"role": ROLE_ARN, "vpc_subnets": ["subnet-1"]}}, "both subnets and security groups"),
        ({"options": {"role": ROLE_ARN, "download_timeout": "5"}}, "download_timeout=5"),
        ({"options": {"role": ROLE_ARN, "profile": "nope"}}, "profile 'nope' is not configured"),
    ],
)
def test_bad_input_is_one_user_error(sagemaker_emulator, aws, tiny_gpt2: Path, overrides: dict, contains: str) -> None:
    options = overrides.pop("options", {"role": ROLE_ARN})
    name = overrides.pop("name", "sm-bad")
    with pytest.raises(UserError) as error:
        _deploy(sagemaker_emulator, tiny_gpt2, name, options=options, **overrides)
    assert contains in error.value.line()
    assert "\n" not in error.value.line()
    _gone(aws, name)
    assert not _objects(aws, f"models/{name}/")


def test_no_wait_refuses_autoscaling_before_creating_anything(sagemaker_emulator, aws, tiny_gpt2: Path) -> None:
    with pytest.raises(UserError, match="--no-wait cannot set up autoscaling"):
        _deploy(sagemaker_emulator, tiny_gpt2, "sm-nowait", max_instances=2, wait=False)
    _gone(aws, "sm-nowait")
    assert not _objects(aws, "models/sm-nowait/")


def test_an_endpoint_cloudllm_did_not_create_is_left_alone(sagemaker_emulator, aws, tiny_gpt2: Path) -> None:
    sm = aws["sagemaker"]
    sm.create_model(ModelName="foreign-model", ExecutionRoleArn=sagemaker_emulator.role, PrimaryContainer={"Image": "example/image"})
    sm.create_endpoint_config(
        EndpointConfigName="foreign-config",
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "foreign-model", "InstanceType": "ml.m5.xlarge", "InitialInstanceCount": 1}],
    )
    sm.create_endpoint(EndpointName="foreign", EndpointConfigName="foreign-config")
    with pytest.raises(UserError, match="cloudllm did not create it"):
        _deploy(sagemaker_emulator, tiny_gpt2, "foreign")
    with pytest.raises(UserError, match="was not created by cloudllm"):
        api.delete("foreign", provider="sagemaker")
    assert sm.describe_endpoint(EndpointName="foreign")["EndpointConfigName"] == "foreign-config"
    sm.delete_endpoint(EndpointName="foreign")


# --- pure translation, no AWS ----------------------------------------------------------------
def test_image_uris_are_the_sdks() -> None:
    assert image_uri("tgi", "us-east-1", "gpu").uri == TGI_IMAGE
    assert image_uri("vllm", "us-east-1", "gpu").uri == LMI_IMAGE
    assert image_uri("handler", "us-east-1", "cpu").uri == HF_CPU_IMAGE
    assert image_uri("handler", "cn-north-1", "gpu").uri == (
        "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/huggingface-pytorch-inference:2.6.0-transformers4.51.3-gpu-py312-cu124-ubuntu22.04"
    )
    with pytest.raises(UserError, match="GPU instances only"):
        image_uri("tgi", "us-east-1", "cpu")


def test_rollouts_become_blue_green_deployment_configs() -> None:
    assert res.deployment_config(Rollout("all-at-once", 100, 0), []) == {
        "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}, "TerminationWaitInSeconds": 0}
    }
    canary = res.deployment_config(Rollout("canary", 10, 300), ["p99-latency"])
    assert canary["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "CANARY", "WaitIntervalInSeconds": 300, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
    }  # fmt: skip
    assert canary["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": "p99-latency"}]}
    linear = res.deployment_config(Rollout("linear", 25, 60), [])
    assert linear["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["LinearStepSize"]["Value"] == 25
    assert res.rollout_seconds(linear) == 240


def test_version_names_fit_sagemaker_rules() -> None:
    name = res.version_names("a" * 63, "0123456789abcdef")
    assert len(name) <= 63 and re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name)
    assert name.startswith(res.name_prefix("a" * 63))
