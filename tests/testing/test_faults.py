"""FaultProxy answers faults in each protocol's own shape, so the SDKs classify them as they would AWS's and Google's."""

from __future__ import annotations

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError

from cloudllm.testing.faults import FaultProxy

NO_RETRIES = Config(retries={"mode": "standard", "max_attempts": 0})  # botocore counts retries here, not attempts


@pytest.fixture(scope="module")
def proxy(sagemaker_emulator):
    with FaultProxy(sagemaker_emulator.url, rate=0.0) as proxy:
        yield proxy


def _client(service: str, proxy: FaultProxy):
    return boto3.client(service, endpoint_url=proxy.url, config=NO_RETRIES)


@pytest.mark.parametrize(
    "service, call, kind, code, status",
    [
        ("sagemaker", lambda c: c.list_models(), "throttle", "ThrottlingException", 400),
        ("sagemaker", lambda c: c.list_models(), "error", "InternalFailure", 500),
        ("s3", lambda c: c.list_objects_v2(Bucket="cloudllm-emulator"), "throttle", "SlowDown", 503),
        ("s3", lambda c: c.list_objects_v2(Bucket="cloudllm-emulator"), "error", "InternalError", 500),
    ],
)
def test_aws_faults_look_like_aws(proxy: FaultProxy, service: str, call, kind: str, code: str, status: int) -> None:
    proxy.fail_next(lambda method, operation: True, kind)
    with pytest.raises(ClientError) as fault:
        call(_client(service, proxy))
    assert fault.value.response["Error"]["Code"] == code
    assert fault.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    call(_client(service, proxy))  # once only: the next call goes through


def test_botocore_retries_what_the_proxy_fails(proxy: FaultProxy) -> None:
    for kind in ("throttle", "error", "drop", "drop_after"):
        proxy.fail_next(lambda method, operation: "ListModels" in operation, kind)
    client = boto3.client("sagemaker", endpoint_url=proxy.url, config=Config(retries={"mode": "standard", "max_attempts": 5}))
    answer = client.list_models()
    assert answer["ResponseMetadata"]["RetryAttempts"] == 4 and proxy.unfired == 0


def test_a_dropped_connection_is_a_closed_connection(proxy: FaultProxy) -> None:
    proxy.fail_next(lambda method, operation: True, "drop")
    with pytest.raises(ConnectionClosedError):
        _client("sagemaker", proxy).list_models()


def test_google_faults_look_like_google(vertex_emulator) -> None:
    with FaultProxy(vertex_emulator.url, rate=0.0, flavour="google") as proxy:
        url = f"{proxy.url}/v1/projects/{vertex_emulator.project}/locations/us-central1/endpoints"
        proxy.fail_next(lambda method, path: True, "throttle")
        throttled = httpx.get(url)
        assert throttled.status_code == 429 and throttled.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert httpx.get(url).status_code == 200
        proxy.fail_next(lambda method, path: True, "drop_after")
        with pytest.raises(httpx.TransportError):
            httpx.get(url)
        assert proxy.counts["drop_after"] == 1
