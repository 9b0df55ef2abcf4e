"""Inference component copies must fit the endpoint's instances (up to MaxInstanceCount) on the offline
SageMaker, through plain boto3: what one instance offers comes from EC2's instance data, and what does
not fit is refused with ResourceLimitExceeded, nothing created or changed."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from cloudllm import api
from cloudllm.testing import eventually
from cloudllm_emulators.sagemaker import ROLE_ARN
from cloudllm_emulators.sagemaker_capacity import instance_resources
from cloudllm_emulators.sagemaker_components import ComponentBackend

BUCKET = "cloudllm-emulator"
SERVE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cloudllm-serve:latest"
ONE_GPU = {"NumberOfAcceleratorDevicesRequired": 1, "MinMemoryRequiredInMb": 2048, "NumberOfCpuCoresRequired": 1}


@pytest.fixture(scope="module")
def sm(sagemaker_emulator, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    s3, client = boto3.client("s3"), boto3.client("sagemaker")
    root = tmp_path_factory.mktemp("artifact") / "a"
    api.package(tiny_gpt2, root)
    for path in root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"cap/{path.relative_to(root)}")
    client.create_model(
        ModelName="cap-model", ExecutionRoleArn=ROLE_ARN,
        PrimaryContainer={"Image": SERVE_IMAGE, "ModelDataSource": {"S3DataSource": {"S3Uri": f"s3://{BUCKET}/cap/", "S3DataType": "S3Prefix", "CompressionType": "None"}}},
    )  # fmt: skip
    return client


def _endpoint(sm, name: str, max_instances: int) -> str:
    sm.create_endpoint_config(
        EndpointConfigName=f"{name}-config", ExecutionRoleArn=ROLE_ARN,
        ProductionVariants=[{
            "VariantName": "AllTraffic", "InstanceType": "ml.g5.xlarge", "InitialInstanceCount": 1,
            "ManagedInstanceScaling": {"Status": "ENABLED", "MinInstanceCount": 1, "MaxInstanceCount": max_instances},
        }],
    )  # fmt: skip
    sm.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config")
    eventually(lambda: sm.describe_endpoint(EndpointName=name)["EndpointStatus"] == "InService", what=f"endpoint {name} InService")
    return name


def _create(sm, endpoint: str, name: str, needs: dict, copies: int = 1) -> None:
    sm.create_inference_component(
        InferenceComponentName=name, EndpointName=endpoint, VariantName="AllTraffic",
        Specification={"ModelName": "cap-model", "ComputeResourceRequirements": needs}, RuntimeConfig={"CopyCount": copies},
    )  # fmt: skip


def _in_service(sm, name: str) -> dict:
    return eventually(
        lambda: (found := sm.describe_inference_component(InferenceComponentName=name))["InferenceComponentStatus"] == "InService" and found,
        what=f"component {name} InService", within=300,
    )


def _refused(call) -> str:
    with pytest.raises(ClientError) as refused:
        call()
    error = refused.value.response["Error"]
    assert error["Code"] == "ResourceLimitExceeded" and refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    return error["Message"]


def _absent(sm, name: str) -> None:
    with pytest.raises(ClientError, match="Could not find inference component"):
        sm.describe_inference_component(InferenceComponentName=name)


def test_what_an_instance_offers_comes_from_ec2s_instance_data() -> None:
    four = instance_resources("ml.g5.12xlarge")
    assert (four.accelerators, four.memory_mb, four.cpu_cores) == (4, 196608, 48)
    assert instance_resources("ml.inf2.xlarge").accelerators == 1  # one Neuron device
    assert instance_resources("ml.m5.xlarge").accelerators == 0
    assert instance_resources("ml.no-such.xlarge") is None


def test_copies_beyond_max_instances_are_refused_and_nothing_changes(sm) -> None:
    endpoint = _endpoint(sm, "cap-one", max_instances=1)
    message = _refused(lambda: _create(sm, endpoint, "cap-two-gpus", {**ONE_GPU, "NumberOfAcceleratorDevicesRequired": 2}))
    assert "accelerator devices 2 > 1" in message and "ml.g5.xlarge" in message
    _absent(sm, "cap-two-gpus")
    message = _refused(lambda: _create(sm, endpoint, "cap-big", {**ONE_GPU, "MinMemoryRequiredInMb": 20000}))
    assert "memory MB 20000 > 16384" in message

    _create(sm, endpoint, "cap-a", ONE_GPU)
    assert _in_service(sm, "cap-a")["RuntimeConfig"] == {"DesiredCopyCount": 1, "CurrentCopyCount": 1}
    message = _refused(lambda: sm.update_inference_component_runtime_config(InferenceComponentName="cap-a", DesiredRuntimeConfig={"CopyCount": 2}))
    assert "2 copies of inference component cap-a" in message and "1 ml.g5.xlarge instance(s) (MaxInstanceCount 1)" in message
    assert "require 2 accelerator devices" in message
    assert sm.describe_inference_component(InferenceComponentName="cap-a")["RuntimeConfig"]["DesiredCopyCount"] == 1

    # A second model on the same single GPU: refused, as --add-model onto a full endpoint would be.
    message = _refused(lambda: _create(sm, endpoint, "cap-b", ONE_GPU))
    assert "1 of the endpoint's 2 component copies do not fit" in message
    _absent(sm, "cap-b")
    message = _refused(
        lambda: sm.update_inference_component(
            InferenceComponentName="cap-a", Specification={"ModelName": "cap-model", "ComputeResourceRequirements": {**ONE_GPU, "NumberOfCpuCoresRequired": 8}}
        )
    )  # fmt: skip
    assert "CPU cores 8 > 4" in message
    sm.delete_inference_component(InferenceComponentName="cap-a")


def test_managed_instance_scaling_places_copies_up_to_max_instances(sm) -> None:
    endpoint = _endpoint(sm, "cap-two", max_instances=2)
    _create(sm, endpoint, "cap-first", ONE_GPU)
    _create(sm, endpoint, "cap-second", ONE_GPU)  # a second instance holds it
    for name in ("cap-first", "cap-second"):
        assert _in_service(sm, name)["RuntimeConfig"]["CurrentCopyCount"] == 1
    message = _refused(lambda: _create(sm, endpoint, "cap-third", ONE_GPU))
    assert "(MaxInstanceCount 2)" in message and "require 3 accelerator devices" in message
    for name in ("cap-first", "cap-second"):
        sm.delete_inference_component(InferenceComponentName=name)


def test_a_wake_with_no_room_left_places_no_copy(sm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Application Auto Scaling asks for a copy; with the only GPU taken by another model meanwhile, none is placed."""
    monkeypatch.setattr(ComponentBackend, "wake_seconds", 0.3)
    endpoint = _endpoint(sm, "cap-wake", max_instances=1)
    _create(sm, endpoint, "cap-sleeper", ONE_GPU)
    _in_service(sm, "cap-sleeper")
    sm.update_inference_component_runtime_config(InferenceComponentName="cap-sleeper", DesiredRuntimeConfig={"CopyCount": 0})
    eventually(lambda: sm.describe_inference_component(InferenceComponentName="cap-sleeper")["RuntimeConfig"]["CurrentCopyCount"] == 0, what="asleep")
    _create(sm, endpoint, "cap-squatter", ONE_GPU)  # the sleeper reserves nothing at zero copies
    _in_service(sm, "cap-squatter")

    scaling, cloudwatch = boto3.client("application-autoscaling"), boto3.client("cloudwatch")
    keys = {"ServiceNamespace": "sagemaker", "ResourceId": "inference-component/cap-sleeper", "ScalableDimension": "sagemaker:inference-component:DesiredCopyCount"}
    scaling.register_scalable_target(**keys, MinCapacity=0, MaxCapacity=1)
    policy = scaling.put_scaling_policy(
        PolicyName="wake", PolicyType="StepScaling", **keys,
        StepScalingPolicyConfiguration={"AdjustmentType": "ChangeInCapacity", "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}]},
    )  # fmt: skip
    cloudwatch.put_metric_alarm(
        AlarmName="cap-sleeper-wake", Namespace="AWS/SageMaker", MetricName="NoCapacityInvocationFailures",
        Dimensions=[{"Name": "InferenceComponentName", "Value": "cap-sleeper"}], Statistic="Maximum", Period=30, EvaluationPeriods=1,
        Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold", AlarmActions=[policy["PolicyARN"]],
    )  # fmt: skip
    runtime = boto3.client("sagemaker-runtime")

    def invoke():
        return runtime.invoke_endpoint(EndpointName=endpoint, InferenceComponentName="cap-sleeper", Body=b'{"inputs": "hi"}', ContentType="application/json")

    with pytest.raises(ClientError, match="no capacity"):
        invoke()  # fires the alarm: the step policy asks for one copy
    woken = eventually(lambda: (d := sm.describe_inference_component(InferenceComponentName="cap-sleeper"))["RuntimeConfig"]["DesiredCopyCount"] == 1 and d,
                       what="the wake's copy count")  # fmt: skip
    assert woken["RuntimeConfig"]["CurrentCopyCount"] == 0  # asked for, not placed: no GPU is free
    with pytest.raises(ClientError, match="no capacity"):
        invoke()
    cloudwatch.delete_alarms(AlarmNames=["cap-sleeper-wake"])
    scaling.deregister_scalable_target(**keys)
    for name in ("cap-squatter", "cap-sleeper"):
        sm.delete_inference_component(InferenceComponentName=name)
