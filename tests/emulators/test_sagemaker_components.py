"""Inference components on the offline SageMaker, through plain boto3 (no cloudllm provider code):
copies that are real servers, invoke by component, scale to zero and the wake, and SageMaker's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from cloudllm import api
from cloudllm.testing import eventually
from cloudllm_emulators.sagemaker import ROLE_ARN
from cloudllm_emulators.sagemaker_components import NO_CAPACITY, ComponentBackend

BUCKET = "cloudllm-emulator"
SERVE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cloudllm-serve:latest"
RESOURCES = {"MinMemoryRequiredInMb": 1024, "NumberOfCpuCoresRequired": 1}


@pytest.fixture(scope="module")
def aws(sagemaker_emulator) -> dict:
    return {name: boto3.client(name) for name in ("sagemaker", "sagemaker-runtime", "application-autoscaling", "cloudwatch", "s3")}


@pytest.fixture(scope="module")
def endpoint(aws, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An endpoint for inference components (no model in its variant) and a model that serves tiny-gpt2."""
    root = tmp_path_factory.mktemp("artifact") / "a"
    api.package(tiny_gpt2, root)
    for path in root.rglob("*"):
        if path.is_file():
            aws["s3"].upload_file(str(path), BUCKET, f"ic/{path.relative_to(root)}")
    sm = aws["sagemaker"]
    sm.create_model(
        ModelName="ic-model", ExecutionRoleArn=ROLE_ARN,
        PrimaryContainer={"Image": SERVE_IMAGE, "ModelDataSource": {"S3DataSource": {"S3Uri": f"s3://{BUCKET}/ic/", "S3DataType": "S3Prefix", "CompressionType": "None"}}},
    )  # fmt: skip
    sm.create_endpoint_config(
        EndpointConfigName="ic-config",
        ExecutionRoleArn=ROLE_ARN,
        ProductionVariants=[{
            "VariantName": "AllTraffic", "InstanceType": "ml.m5.xlarge", "InitialInstanceCount": 1,
            "ManagedInstanceScaling": {"Status": "ENABLED", "MinInstanceCount": 0, "MaxInstanceCount": 2},
            "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"},
        }],
    )  # fmt: skip
    sm.create_endpoint(EndpointName="ic", EndpointConfigName="ic-config")
    eventually(lambda: sm.describe_endpoint(EndpointName="ic")["EndpointStatus"] == "InService", what="endpoint ic InService")
    return "ic"


def _settled(sm, name: str) -> dict:
    return eventually(
        lambda: (found := sm.describe_inference_component(InferenceComponentName=name))["InferenceComponentStatus"] not in ("Creating", "Updating") and found,
        what=f"component {name} settled", within=300,
    )


def _component(aws, endpoint: str, name: str, copies: int = 1) -> dict:
    aws["sagemaker"].create_inference_component(
        InferenceComponentName=name, EndpointName=endpoint, VariantName="AllTraffic",
        Specification={"ModelName": "ic-model", "ComputeResourceRequirements": RESOURCES}, RuntimeConfig={"CopyCount": copies},
    )  # fmt: skip
    return _settled(aws["sagemaker"], name)


def _invoke(aws, endpoint: str, component: str | None) -> dict:
    extra = {"InferenceComponentName": component} if component else {}
    body = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 3, "do_sample": False}})
    answer = aws["sagemaker-runtime"].invoke_endpoint(EndpointName=endpoint, Body=body, ContentType="application/json", **extra)
    return json.loads(answer["Body"].read())


@pytest.fixture(scope="module")
def served(aws, endpoint: str) -> str:
    described = _component(aws, endpoint, "ic-base")
    assert described["InferenceComponentStatus"] == "InService", described.get("FailureReason")
    return "ic-base"


def test_a_component_serves_its_model_by_name(aws, endpoint: str, served: str) -> None:
    described = aws["sagemaker"].describe_inference_component(InferenceComponentName=served)
    assert described["RuntimeConfig"] == {"DesiredCopyCount": 1, "CurrentCopyCount": 1}
    assert described["Specification"]["ComputeResourceRequirements"]["MinMemoryRequiredInMb"] == 1024
    listed = aws["sagemaker"].list_inference_components(EndpointNameEquals=endpoint)["InferenceComponents"]
    assert served in [c["InferenceComponentName"] for c in listed]
    assert _invoke(aws, endpoint, served)
    config = aws["sagemaker"].describe_endpoint_config(EndpointConfigName="ic-config")
    assert config["ExecutionRoleArn"] == ROLE_ARN
    assert config["ProductionVariants"][0]["ManagedInstanceScaling"]["MinInstanceCount"] == 0


def test_an_endpoint_of_components_needs_the_component_name(aws, endpoint: str, served: str) -> None:
    with pytest.raises(ClientError, match="Inference Component Name header is required"):
        _invoke(aws, endpoint, None)
    with pytest.raises(ClientError, match="not found"):
        _invoke(aws, endpoint, "no-such-component")


def test_refusals_match_sagemakers(aws, endpoint: str, served: str) -> None:
    sm = aws["sagemaker"]
    with pytest.raises(ClientError, match="already existing"):
        sm.create_inference_component(
            InferenceComponentName=served, EndpointName=endpoint,
            Specification={"ModelName": "ic-model", "ComputeResourceRequirements": RESOURCES}, RuntimeConfig={"CopyCount": 1},
        )  # fmt: skip
    with pytest.raises(ClientError, match="ComputeResourceRequirements"):
        sm.create_inference_component(InferenceComponentName="ic-bare", EndpointName=endpoint, Specification={"ModelName": "ic-model"}, RuntimeConfig={"CopyCount": 1})
    with pytest.raises(ClientError, match="inference components attached"):
        sm.delete_endpoint(EndpointName=endpoint)
    with pytest.raises(ClientError, match="ExecutionRoleArn"):
        sm.create_endpoint_config(EndpointConfigName="ic-norole", ProductionVariants=[{"VariantName": "AllTraffic", "InstanceType": "ml.m5.xlarge", "InitialInstanceCount": 1}])


def test_copies_are_servers_that_start_and_stop(aws, endpoint: str, served: str) -> None:
    sm = aws["sagemaker"]
    sm.update_inference_component_runtime_config(InferenceComponentName=served, DesiredRuntimeConfig={"CopyCount": 2})
    assert _settled(sm, served)["RuntimeConfig"] == {"DesiredCopyCount": 2, "CurrentCopyCount": 2}
    assert _invoke(aws, endpoint, served) == _invoke(aws, endpoint, served)  # both copies serve the same model
    sm.update_inference_component_runtime_config(InferenceComponentName=served, DesiredRuntimeConfig={"CopyCount": 1})
    assert _settled(sm, served)["RuntimeConfig"] == {"DesiredCopyCount": 1, "CurrentCopyCount": 1}


def test_zero_copies_answer_no_capacity_and_the_step_policy_wakes_them(aws, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ComponentBackend, "wake_seconds", 0.5)
    sm, scaling = aws["sagemaker"], aws["application-autoscaling"]
    _component(aws, endpoint, "ic-zero", copies=1)
    resource = "inference-component/ic-zero"
    scaling.register_scalable_target(
        ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension="sagemaker:inference-component:DesiredCopyCount", MinCapacity=0, MaxCapacity=2
    )
    policy = scaling.put_scaling_policy(
        PolicyName="wake", ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension="sagemaker:inference-component:DesiredCopyCount",
        PolicyType="StepScaling",
        StepScalingPolicyConfiguration={"AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Maximum", "Cooldown": 60,
                                        "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}]},
    )  # fmt: skip
    scaling.put_scaling_policy(
        PolicyName="track", ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension="sagemaker:inference-component:DesiredCopyCount",
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={"TargetValue": 4.0, "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerInferenceComponentInvocationsPerCopy"}},
    )  # fmt: skip
    # Target tracking scales the idle component in to MinCapacity 0 by itself, on the emulator's short idle clock.
    monkeypatch.setattr(ComponentBackend, "idle_seconds", 1.0)
    eventually(lambda: sm.describe_inference_component(InferenceComponentName="ic-zero")["RuntimeConfig"]["DesiredCopyCount"] == 0, what="ic-zero scaled in", within=120)
    assert _settled(sm, "ic-zero")["RuntimeConfig"]["CurrentCopyCount"] == 0
    assert _settled(sm, "ic-base")["RuntimeConfig"]["DesiredCopyCount"] >= 1  # no scaling policy: never scaled in
    monkeypatch.setattr(ComponentBackend, "idle_seconds", 900.0)  # the wake below must not be scaled in again meanwhile
    assert sm.describe_endpoint(EndpointName=endpoint)["ProductionVariants"][0]["CurrentInstanceCount"] >= 1  # ic-base still runs
    with pytest.raises(ClientError) as refused:
        _invoke(aws, endpoint, "ic-zero")
    assert refused.value.response["Error"]["Code"] == "ValidationError"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert NO_CAPACITY in refused.value.response["Error"]["Message"]
    # No alarm yet: the failure is recorded, nothing wakes.
    metrics = aws["cloudwatch"].list_metrics(Namespace="AWS/SageMaker", MetricName="NoCapacityInvocationFailures")["Metrics"]
    assert {"Name": "InferenceComponentName", "Value": "ic-zero"} in metrics[0]["Dimensions"]
    assert sm.describe_inference_component(InferenceComponentName="ic-zero")["RuntimeConfig"]["DesiredCopyCount"] == 0
    aws["cloudwatch"].put_metric_alarm(
        AlarmName="ic-zero-wake", Namespace="AWS/SageMaker", MetricName="NoCapacityInvocationFailures",
        Dimensions=[{"Name": "InferenceComponentName", "Value": "ic-zero"}], Statistic="Maximum", Period=30, EvaluationPeriods=1,
        Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold", TreatMissingData="missing", AlarmActions=[policy["PolicyARN"]],
    )  # fmt: skip
    with pytest.raises(ClientError, match="no capacity"):
        _invoke(aws, endpoint, "ic-zero")  # this one fires the alarm; the wake takes a while
    answer = eventually(lambda: _try_invoke(aws, endpoint, "ic-zero"), what="ic-zero woke", within=300)
    assert answer
    assert sm.describe_inference_component(InferenceComponentName="ic-zero")["RuntimeConfig"]["DesiredCopyCount"] == 1
    sm.delete_inference_component(InferenceComponentName="ic-zero")


def _try_invoke(aws, endpoint: str, component: str):
    try:
        return _invoke(aws, endpoint, component)
    except ClientError as exc:
        if "no capacity" in str(exc):
            return None
        raise


def test_copy_count_targets_need_a_component(aws) -> None:
    with pytest.raises(ClientError, match="does not exist"):
        aws["application-autoscaling"].register_scalable_target(
            ServiceNamespace="sagemaker", ResourceId="inference-component/nothing", ScalableDimension="sagemaker:inference-component:DesiredCopyCount",
            MinCapacity=0, MaxCapacity=1,
        )  # fmt: skip


def _upload_adapter(aws, tiny_gpt2: Path, root: Path, name: str, seed: int, *, tarball: bool) -> str:
    import tarfile

    from cloudllm.testing.tiny_adapters import build_tiny_lora

    folder = build_tiny_lora(tiny_gpt2, root / name, seed=seed)
    if tarball:  # what the vLLM container standard's examples upload
        archive = root / f"{name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in folder.iterdir():
                tar.add(path, arcname=path.name)
        aws["s3"].upload_file(str(archive), BUCKET, f"lora/{name}.tar.gz")
        return f"s3://{BUCKET}/lora/{name}.tar.gz"
    for path in folder.iterdir():
        aws["s3"].upload_file(str(path), BUCKET, f"lora/{name}/{path.name}")
    return f"s3://{BUCKET}/lora/{name}/"


def test_adapter_components_ride_on_their_base(aws, endpoint: str, served: str, tiny_gpt2: Path, tmp_path: Path) -> None:
    sm = aws["sagemaker"]
    for name, seed, tarball in (("ic-legal", 1, False), ("ic-support", 2, True)):
        url = _upload_adapter(aws, tiny_gpt2, tmp_path, name, seed, tarball=tarball)
        sm.create_inference_component(
            InferenceComponentName=name, EndpointName=endpoint, Specification={"BaseInferenceComponentName": served, "Container": {"ArtifactUrl": url}}
        )
        described = _settled(sm, name)
        assert described["InferenceComponentStatus"] == "InService", described.get("FailureReason")
        assert "RuntimeConfig" not in described  # an adapter has no copies of its own
    answers = {name: json.dumps(_invoke(aws, endpoint, name)) for name in (served, "ic-legal", "ic-support")}
    assert len(set(answers.values())) == 3, answers
    with pytest.raises(ClientError, match="base of adapter components"):
        sm.delete_inference_component(InferenceComponentName=served)
    with pytest.raises(ClientError, match="takes no ModelName"):
        sm.create_inference_component(
            InferenceComponentName="ic-bad", EndpointName=endpoint, RuntimeConfig={"CopyCount": 1},
            Specification={"BaseInferenceComponentName": served, "Container": {"ArtifactUrl": "s3://x/y/"}},
        )  # fmt: skip
    for name in ("ic-legal", "ic-support"):
        sm.delete_inference_component(InferenceComponentName=name)
    with pytest.raises(ClientError, match="not found"):
        _invoke(aws, endpoint, "ic-legal")


def test_delete_components_then_the_endpoint(aws, endpoint: str, served: str) -> None:
    sm = aws["sagemaker"]
    sm.delete_inference_component(InferenceComponentName=served)
    eventually(lambda: not sm.list_inference_components(EndpointNameEquals=endpoint)["InferenceComponents"], what="components gone")
    sm.delete_endpoint(EndpointName=endpoint)
    with pytest.raises(ClientError):
        sm.describe_endpoint(EndpointName=endpoint)
