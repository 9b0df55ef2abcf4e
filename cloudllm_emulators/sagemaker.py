"""An offline SageMaker: moto in server mode on loopback, extended where moto falls short.

    emulator = SageMakerEmulator(port=0).start()
    os.environ.update(emulator.env())      # AWS_ENDPOINT_URL, dummy credentials, region
    ...                                    # cloudllm (or any boto3 code) talks to it over HTTP
    emulator.stop()

moto serves S3, IAM, CloudWatch Logs, Application Auto Scaling and the SageMaker control plane.
The extensions go through moto's own classes (subclasses of its backends and responses,
installed in its BackendDicts), not a fork:

- instance types are checked against botocore's current SageMaker model (moto's list predates ml.g5);
- CreateModel/CreateEndpointConfig/CreateEndpoint refuse an existing name, as SageMaker does;
- an endpoint is hosted for real: CreateEndpoint downloads the model's S3 prefix from moto's S3,
  starts the artifact's generated server (`code/serve.py`), and stays Creating until it answers
  /ping (Failed with the reason when it does not); its output goes to the CloudWatch Logs group
  /aws/sagemaker/Endpoints/<name>;
- UpdateEndpoint (moto has none) takes the blue/green DeploymentConfig, starts the new config's
  server beside the old one, switches when it is healthy and stops the old one; if the new one
  fails the endpoint stays on the old config with a FailureReason (a rollback);
- InvokeEndpoint and InvokeEndpointWithResponseStream reach that server, so invoke returns real
  model output, and streams come back as application/vnd.amazon.eventstream PayloadPart events.

What serves an endpoint follows its image, as far as a CPU machine can: a Hugging Face PyTorch
inference DLC image runs the artifact's code/inference.py hooks the way the HF inference toolkit
does (`_toolkit_server`: whole answers only, any hook error a 400, so "stream": true is refused as
the real container refuses it); any other image (TGI, LMI/vLLM, a custom one) runs the artifact's
`code/serve.py`, which speaks TGI's request and stream format (TGI and vLLM need their GPU
containers): the emulator checks cloudllm's side of the contract, not the engines'.
One emulator per process: moto keeps its state in module-level backends.
"""

from __future__ import annotations

import atexit
import json
import shutil
from typing import Any

from moto.sagemaker.models import sagemaker_backends
from moto.sagemakerruntime.models import sagemakerruntime_backends
from moto.server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

from cloudllm_emulators.containers import own_registry, registry_env, stop_own_registry
from cloudllm_emulators.sagemaker_hosting import (  # re-exported: the emulator's names live here too
    ACCOUNT,
    BUCKET,
    EmulatedSageMakerBackend,
    HostedModel,
    REGION,
    ROLE_ARN,
    ROLE_NAME,
)


class _Dispatcher(DomainDispatcherApplication):
    """moto routes signed `sagemaker` requests whose path ends in `invocations` to the runtime; add the stream path."""

    def infer_service_region_host(self, environ: dict[str, Any], path: str) -> str | None:
        host = super().infer_service_region_host(environ, path)
        if host and host.startswith("api.sagemaker.") and environ.get("PATH_INFO", "").endswith("/invocations-response-stream"):
            return "runtime." + host[len("api.") :]
        return host


class _QuietRequestHandler(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Server(ThreadedMotoServer):
    def __init__(self, *args: Any, log_requests: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._handler = MotoRequestHandler if log_requests else _QuietRequestHandler

    def _server_entry(self) -> None:
        from werkzeug.serving import make_server

        self._server = make_server(self._ip_address, self._port, _Dispatcher(create_backend_app), True, request_handler=self._handler)
        self._server_ready_event.set()
        self._server.serve_forever()


def install() -> None:
    """Make moto build the emulated backends (idempotent; replaces region backends of moto's own class)."""
    from moto.applicationautoscaling.models import applicationautoscaling_backends

    # Inference components (sagemaker_components.py) extend the backends above; they are what moto builds.
    from cloudllm_emulators.sagemaker_components import ComponentBackend, ComponentRuntimeBackend, ComponentScalingBackend

    installed = ((sagemaker_backends, ComponentBackend), (sagemakerruntime_backends, ComponentRuntimeBackend), (applicationautoscaling_backends, ComponentScalingBackend))
    for backend_dict, cls in installed:
        backend_dict.backend = cls
        for account in backend_dict.values():
            account.backend = cls
            for region in list(account.keys()):
                if not isinstance(account[region], cls):
                    dict.__setitem__(account, region, cls(region, account_id=account.account_id))


class SageMakerEmulator:
    """The emulator: moto on 127.0.0.1 plus the extensions above, with a bucket and a role ready."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", region: str = REGION, *, log_requests: bool = False):
        self.host = host
        self.port = port
        self.region = region
        self.log_requests = log_requests
        self._server: _Server | None = None
        self._registry = None  # the image registry it started itself (containers.own_registry)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    bucket = f"s3://{BUCKET}"
    role = ROLE_ARN

    def env(self) -> dict[str, str]:
        """What a client needs to reach the emulator (boto3 honours AWS_ENDPOINT_URL)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            **registry_env(self._registry),
        }

    def start(self) -> "SageMakerEmulator":
        from moto.core.base_backend import BackendDict

        install()
        BackendDict.reset()  # a fresh account: what an earlier emulator in this process left is gone
        self._server = _Server(ip_address=self.host, port=self.port, verbose=False, log_requests=self.log_requests)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        atexit.register(self.stop)
        self._prepare()
        self._registry = own_registry()
        return self

    def _prepare(self) -> None:
        import boto3

        session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=self.region)
        s3 = session.client("s3", endpoint_url=self.url)
        if BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=BUCKET)
        iam = session.client("iam", endpoint_url=self.url)
        trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
        try:
            iam.create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument=json.dumps(trust))
        except iam.exceptions.EntityAlreadyExistsException:
            pass

    def stop(self) -> None:
        for account in list(sagemaker_backends.values()):
            for backend in list(account.values()):
                if isinstance(backend, EmulatedSageMakerBackend):
                    backend.stop_hosts()
        if self._server is not None:
            self._server.stop()
            self._server = None
        if EmulatedSageMakerBackend._work_dir is not None:
            shutil.rmtree(EmulatedSageMakerBackend._work_dir, ignore_errors=True)
            EmulatedSageMakerBackend._work_dir = None
        stop_own_registry(self._registry)
        self._registry = None

    def __enter__(self) -> "SageMakerEmulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
