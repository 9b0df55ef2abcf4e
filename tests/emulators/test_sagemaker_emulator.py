"""The offline SageMaker with plain boto3 (no cloudllm provider code): what it adds to moto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError

from cloudllm import api
from cloudllm.testing import eventually
from cloudllm_emulators.sagemaker import ROLE_ARN
from tests.conftest import CLOUDLLM

BUCKET = "cloudllm-emulator"
# The HF PyTorch inference DLC (the toolkit serves code/inference.py), and a custom image (code/serve.py).
TOOLKIT_IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:latest"
SERVE_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cloudllm-serve:latest"


def _variant(model: str, instance: str = "ml.m5.xlarge", count: int = 1) -> list[dict]:
    return [{"VariantName": "AllTraffic", "ModelName": model, "InstanceType": instance, "InitialInstanceCount": count}]


def _model(sm, name: str, prefix: str, image: str = TOOLKIT_IMAGE) -> None:
    sm.create_model(
        ModelName=name,
        ExecutionRoleArn=ROLE_ARN,
        PrimaryContainer={
            "Image": image,
            "ModelDataSource": {"S3DataSource": {"S3Uri": f"s3://{BUCKET}/{prefix}", "S3DataType": "S3Prefix", "CompressionType": "None"}},
        },
    )


def _settle(sm, name: str, timeout: float = 600) -> dict:
    return eventually(
        lambda: (found := sm.describe_endpoint(EndpointName=name))["EndpointStatus"] not in ("Creating", "Updating") and found,
        what=f"endpoint {name} settled", within=timeout,
    )


@pytest.fixture(scope="module")
def sm(sagemaker_emulator):
    return boto3.client("sagemaker")


@pytest.fixture(scope="module")
def artifact(sagemaker_emulator, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """s3://.../raw/: tiny-gpt2's artifact, uploaded file by file with plain boto3."""
    root = tmp_path_factory.mktemp("artifact") / "a"
    api.package(tiny_gpt2, root)
    s3 = boto3.client("s3")
    for path in root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"raw/{path.relative_to(root)}")
    return "raw/"


def _endpoint(sm, name: str, prefix: str, image: str) -> str:
    _model(sm, f"{name}-model", prefix, image)
    sm.create_endpoint_config(EndpointConfigName=f"{name}-config", ProductionVariants=_variant(f"{name}-model"))
    sm.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config")
    assert sm.describe_endpoint(EndpointName=name)["EndpointStatus"] == "Creating"  # moto says InService at once
    endpoint = _settle(sm, name)
    assert endpoint["EndpointStatus"] == "InService", endpoint.get("FailureReason")
    return name


@pytest.fixture(scope="module")
def served(sm, artifact: str) -> str:
    """An endpoint on the HF PyTorch inference image: code/inference.py's hooks serve it, as the toolkit does."""
    return _endpoint(sm, "raw", artifact, TOOLKIT_IMAGE)


@pytest.fixture(scope="module")
def served_by_server(sm, artifact: str) -> str:
    """The same artifact on a custom image: its code/serve.py serves it (TGI's request and stream format)."""
    return _endpoint(sm, "raw-serve", artifact, SERVE_IMAGE)


def test_instance_types_come_from_botocore(sm) -> None:
    _model(sm, "types-model", "nothing/")
    sm.create_endpoint_config(EndpointConfigName="types-g5", ProductionVariants=_variant("types-model", "ml.g5.48xlarge"))
    sm.create_endpoint_config(EndpointConfigName="types-p5", ProductionVariants=_variant("types-model", "ml.p5.48xlarge"))
    with pytest.raises(ClientError) as error:
        sm.create_endpoint_config(EndpointConfigName="types-bad", ProductionVariants=_variant("types-model", "ml.g5.huge"))
    assert error.value.response["Error"]["Code"] == "ValidationException"
    assert "ml.g5.huge" in str(error.value) and "ml.g6e.xlarge" in str(error.value)


def test_existing_names_are_refused(sm) -> None:
    _model(sm, "dup-model", "nothing/")
    with pytest.raises(ClientError, match="Cannot create already existing model"):
        _model(sm, "dup-model", "nothing/")
    sm.create_endpoint_config(EndpointConfigName="dup-config", ProductionVariants=_variant("dup-model"))
    with pytest.raises(ClientError, match="already existing endpoint configuration"):
        sm.create_endpoint_config(EndpointConfigName="dup-config", ProductionVariants=_variant("dup-model"))


def test_model_data_that_is_not_there_fails_the_endpoint(sm) -> None:
    _model(sm, "empty-model", "empty/")
    sm.create_endpoint_config(EndpointConfigName="empty-config", ProductionVariants=_variant("empty-model"))
    sm.create_endpoint(EndpointName="empty", EndpointConfigName="empty-config")
    endpoint = _settle(sm, "empty")
    assert endpoint["EndpointStatus"] == "Failed"
    assert "s3://cloudllm-emulator/empty/" in endpoint["FailureReason"]
    sm.delete_endpoint(EndpointName="empty")


def test_invoke_returns_model_output(served: str) -> None:
    runtime = boto3.client("sagemaker-runtime")
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6}}
    response = runtime.invoke_endpoint(EndpointName=served, Body=json.dumps(body), ContentType="application/json")
    assert response["InvokedProductionVariant"] == "AllTraffic"
    (answer,) = json.loads(response["Body"].read())
    assert answer["generated_text"].strip()

    with pytest.raises(ClientError) as missing:
        runtime.invoke_endpoint(EndpointName="nobody", Body=b"{}", ContentType="application/json")
    assert missing.value.response["Error"]["Code"] == "ValidationError"
    assert "Endpoint nobody of account 123456789012 not found" in str(missing.value)

    with pytest.raises(ClientError) as bad:
        runtime.invoke_endpoint(EndpointName=served, Body=b"not json", ContentType="application/json")
    assert bad.value.response["Error"]["Code"] == "ModelError"
    assert bad.value.response["OriginalStatusCode"] == 400
    assert "/aws/sagemaker/Endpoints/raw" in bad.value.response["LogStreamArn"]


def test_the_toolkit_image_answers_whole_and_refuses_streams_as_the_dlc_does(served: str) -> None:
    runtime = boto3.client("sagemaker-runtime")
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6}}
    # A response stream from a server that cannot stream: the whole JSON answer, in payload parts.
    response = runtime.invoke_endpoint_with_response_stream(EndpointName=served, Body=json.dumps(body), ContentType="application/json")
    whole = json.loads(b"".join(event["PayloadPart"]["Bytes"] for event in response["Body"]))
    assert whole[0]["generated_text"].strip() and not response["ContentType"].startswith("text/event-stream")

    # "stream": true reaches predict_fn, which refuses it; the toolkit answers every hook error with a 400.
    for call in (runtime.invoke_endpoint, runtime.invoke_endpoint_with_response_stream):
        with pytest.raises(ClientError) as refused:
            call(EndpointName=served, Body=json.dumps({**body, "stream": True}), ContentType="application/json")
        assert refused.value.response["Error"]["Code"] == "ModelError"
        assert refused.value.response["OriginalStatusCode"] == 400
        assert "streaming is not available through the Hugging Face inference toolkit" in refused.value.response["OriginalMessage"]


def test_stream_is_amazon_eventstream(sagemaker_emulator, served_by_server: str) -> None:
    served = served_by_server
    body = json.dumps({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6}, "stream": True}).encode()

    # Through boto3: PayloadPart events whose bytes re-join into TGI's server-sent events.
    runtime = boto3.client("sagemaker-runtime")
    response = runtime.invoke_endpoint_with_response_stream(EndpointName=served, Body=body, ContentType="application/json")
    parts = [event["PayloadPart"]["Bytes"] for event in response["Body"]]
    assert len(parts) > 1
    events = [json.loads(line[len("data:") :]) for line in b"".join(parts).decode().splitlines() if line.startswith("data:")]
    assert events and all("token" in e for e in events)
    assert response["ContentType"].startswith("text/event-stream")

    # On the wire: prelude + CRCs + headers exactly as botocore's decoder checks them.
    url = f"{sagemaker_emulator.url}/endpoints/{served}/invocations-response-stream"
    request = AWSRequest("POST", url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(boto3.Session().get_credentials(), "sagemaker", "us-east-1").add_auth(request)
    raw = httpx.post(url, content=body, headers=dict(request.headers))
    assert raw.headers["content-type"] == "application/vnd.amazon.eventstream"
    decoder = EventStreamBuffer()
    decoder.add_data(raw.content)
    messages = list(decoder)
    assert messages and all(m.headers[":message-type"] == "event" and m.headers[":event-type"] == "PayloadPart" for m in messages)
    assert b"".join(m.payload for m in messages).decode().count("data:") == len(events)


@pytest.mark.parametrize(("fixture", "line"), [("served", "toolkit: model_fn loaded"), ("served_by_server", "model_loaded")])
def test_server_output_goes_to_cloudwatch_logs(request: pytest.FixtureRequest, fixture: str, line: str) -> None:
    served = request.getfixturevalue(fixture)
    logs = boto3.client("logs")
    group = f"/aws/sagemaker/Endpoints/{served}"
    (stream,) = logs.describe_log_streams(logGroupName=group)["logStreams"]
    assert stream["logStreamName"].startswith("AllTraffic/i-")
    messages = [e["message"] for e in logs.filter_log_events(logGroupName=group)["events"]]
    assert any(line in m for m in messages), messages


def test_update_endpoint_that_fails_rolls_back(sm, served: str) -> None:
    _model(sm, "raw-model-2", "missing/")
    sm.create_endpoint_config(EndpointConfigName="raw-config-2", ProductionVariants=_variant("raw-model-2"))
    deployment = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "LINEAR", "WaitIntervalInSeconds": 60, "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 50}},
            "TerminationWaitInSeconds": 0,
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "errors"}]},
    }
    sm.update_endpoint(EndpointName=served, EndpointConfigName="raw-config-2", DeploymentConfig=deployment)
    endpoint = _settle(sm, served)
    assert endpoint["EndpointStatus"] == "InService" and endpoint["EndpointConfigName"] == "raw-config"
    assert "s3://cloudllm-emulator/missing/" in endpoint["FailureReason"]
    assert endpoint["LastDeploymentConfig"] == deployment
    runtime = boto3.client("sagemaker-runtime")
    assert runtime.invoke_endpoint(EndpointName=served, Body=b'{"inputs": "Hi"}', ContentType="application/json")["Body"].read()


def test_cli_prints_the_environment_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [CLOUDLLM, "emulate", "sagemaker", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        lines = []
        for line in process.stdout:
            lines.append(line.strip())
            if line.startswith("# SageMaker emulator"):
                break
        exports = dict(line[len("export ") :].split("=", 1) for line in lines if line.startswith("export "))
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(exports)
        assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        client = boto3.client(
            "s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name=exports["AWS_DEFAULT_REGION"],
            aws_access_key_id=exports["AWS_ACCESS_KEY_ID"], aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        assert BUCKET in [b["Name"] for b in client.list_buckets()["Buckets"]]
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # how CI stops a background job
        assert process.wait(timeout=30) == 0
