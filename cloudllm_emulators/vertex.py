"""An offline Vertex AI: Google Cloud Storage and the Vertex AI REST API on loopback.

    with VertexEmulator() as emulator:
        os.environ.update(emulator.env)        # STORAGE_EMULATOR_HOST, CLOUDLLM_VERTEX_ENDPOINT, GOOGLE_CLOUD_PROJECT
        emulator.create_bucket("my-bucket")
        cloudllm.deploy("./model", provider="vertex", bucket="gs://my-bucket/models", ...)

Storage is gcp-storage-emulator, in process. The Vertex fake speaks the v1 REST API the
real `google.cloud.aiplatform_v1` clients use (JSON of the real proto types, enums as
integers, long-running operations polled at `GET /ui/{operation}`): models (upload as a
new model or a new version, get, list, update, delete), endpoints (create, get, list, update,
delete, deploy, undeploy, mutate a deployed model's scaling), predict, rawPredict and streamRawPredict;
and PredictionService over gRPC as well (`grpc_address`): DirectRawPredict and StreamDirectRawPredict
forward their bytes to the gRPC method they name on the first of the model's grpcPorts, as Vertex
does (directRawPredict also over REST). A model without grpcPorts gets FAILED_PRECONDITION: "If
you do not specify this field, gRPC requests to the container will be disabled" (ModelContainerSpec).
v1beta1 DeployModel with scale to zero, and the route to one deployed model (vertex_tenancy.py).

A deployed model really serves. The emulator cannot run GPU engines, so:
- an image of the Hugging Face PyTorch inference family runs its container command on this
  machine's Python, with the AIP_* variables Vertex sets (the handler runtime's bootstrap
  downloads AIP_STORAGE_URI from the storage emulator itself, as in the cloud);
- any other image (TGI, vLLM, a custom one) is stood in for by the artifact's generated
  handler (`code/serve.py`), downloaded from the model's artifact_uri. For TGI and vLLM
  images the emulator speaks the engine's own protocol in front of it, and refuses what the
  engine refuses: TGI's Vertex route takes {"instances": [{"inputs", "parameters"}]} only
  (422 otherwise), reads only max_new_tokens and seed, samples, and never streams; the
  Model Garden vLLM server takes {"instances": [{"prompt", <SamplingParams>, "stream",
  "raw_response"}]} (500 on a missing prompt or an unknown parameter, as its KeyError and
  TypeError), prefixes "Prompt:/Output:" unless raw_response, and streams NUL-separated
  {"predictions": [text]} objects; an instance's "dynamic-lora" (a gs:// adapter folder) is
  downloaded and served when the server was started with --enable-lora, up to --max-lora-rank.
One process stands for all replicas of a deployed model. Traffic is split by smooth weighted
round-robin, so a test sees exactly the share it set (one of every four requests at 25%).

Hooks for tests: `traffic_log` (every traffic split an endpoint took), `requests` (every
call), `replica_gate` (a threading.Event model servers wait for before they start: a slow
model), `crash_when_ready` (a predicate on the DeployedModel: its server dies right after it
becomes ready, as a version that fails under traffic) and `corrupt_next_upload` (the
storage emulator receives one upload with a flipped byte).

What Vertex validates and a deploy can get wrong is validated here too: machine types and
their accelerators (the emulator's own table, accelerator names checked against aiplatform_v1's
AcceleratorType), replica counts, autoscaling metric
names and targets, traffic splits summing to 100, undeploying a model that still takes
traffic, deleting an endpoint with deployed models or a model that is deployed.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from cloudllm_procs import SERVER_BACKOFF, Pending, poll_until
from cloudllm_procs import kill as kill_process
from cloudllm_procs import start as start_process
from cloudllm_procs import stop as stop_process
from cloudllm_emulators.containers import own_registry, registry_env, stop_own_registry
from cloudllm_emulators.vertex_api import LOCATION as _LOC
from cloudllm_emulators.vertex_api import ApiError
from cloudllm_emulators.vertex_api import aiplatform_types as _types
from cloudllm_emulators.vertex_api import parse_message as _parse
from cloudllm_emulators.vertex_api import to_json as _to_json

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_PROJECT = "cloudllm-emulator"
ENDPOINT_ENV = "CLOUDLLM_VERTEX_ENDPOINT"
GRPC_ENDPOINT_ENV = "CLOUDLLM_VERTEX_GRPC_ENDPOINT"  # host:port of PredictionService over gRPC
# The emulator runs model servers on this machine's network, so a model's declared gRPC port is moved
# to a free one (as AIP_HTTP_PORT moves the HTTP port); cloudllm's handler reads it from here.
GRPC_PORT_ENV = "CLOUDLLM_GRPC_PORT"
DEFAULT_DEPLOYMENT_TIMEOUT = 1200.0
AUTOSCALING_METRICS = {
    "aiplatform.googleapis.com/prediction/online/cpu/utilization": (1, 100),
    "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle": (1, 100),
    "aiplatform.googleapis.com/prediction/online/request_count": (1, 1_000_000),
}
# MutateDeployedModelRequest.deployed_model: what may change in place (aiplatform_v1 endpoint_service.proto).
MUTABLE_DEPLOYED_MODEL_FIELDS = (
    "dedicated_resources.min_replica_count", "dedicated_resources.max_replica_count",
    "dedicated_resources.required_replica_count", "dedicated_resources.autoscaling_metric_specs", "disable_container_logging",
)  # fmt: skip
# Images the emulator runs as they are: the HF PyTorch inference DLCs are python + transformers.
RUNNABLE_IMAGES = re.compile(r"huggingface-pytorch-inference")
# Vertex online prediction's machine types and the accelerators each takes (cloud.google.com/vertex-ai/docs/
# predictions/configure-compute): the emulator's own copy, not cloudllm's catalog, so it judges that catalog.
_N1_ACCELERATORS = {
    "n1-standard-4": {"NVIDIA_TESLA_T4": (1, 2, 4), "NVIDIA_TESLA_V100": (1, 2, 4, 8)},
    "n1-standard-8": {"NVIDIA_TESLA_T4": (1, 2, 4), "NVIDIA_TESLA_V100": (1, 2, 4, 8)},
    "n1-standard-16": {"NVIDIA_TESLA_T4": (1, 2, 4), "NVIDIA_TESLA_V100": (2, 4, 8)},
    "n1-standard-32": {"NVIDIA_TESLA_T4": (1, 2, 4), "NVIDIA_TESLA_V100": (4, 8)},
}
_FIXED_ACCELERATORS = {
    **{f"a2-highgpu-{n}g": ("NVIDIA_TESLA_A100", n) for n in (1, 2, 4, 8)},
    **{f"a2-ultragpu-{n}g": ("NVIDIA_A100_80GB", n) for n in (1, 2, 4, 8)},
    **{f"a3-highgpu-{n}g": ("NVIDIA_H100_80GB", n) for n in (1, 2, 4, 8)},
    **{f"g2-standard-{cpus}": ("NVIDIA_L4", n) for cpus, n in ((4, 1), (8, 1), (12, 1), (16, 1), (24, 2), (32, 1), (48, 4), (96, 8))},
}
MACHINE_ACCELERATORS: dict[str, set[tuple[str | None, int]]] = {
    **{m: {(None, 0)} | {(a, c) for a, counts in accels.items() for c in counts} for m, accels in _N1_ACCELERATORS.items()},
    **{m: {fixed} for m, fixed in _FIXED_ACCELERATORS.items()},
}

log = logging.getLogger("cloudllm_emulators.vertex")


def _sse_texts(lines) -> Any:
    """Token texts of TGI-style server-sent events (data: {"token": {"text", "special"}}); an error event raises."""
    for line in lines:
        payload = line.strip().removeprefix("data:").strip() if line.strip().startswith("data:") else ""
        if not payload or payload == "[DONE]":
            continue
        event = json.loads(payload)
        if "error" in event:
            raise RuntimeError(f"the model server failed mid-stream: {event['error']}")
        token = event.get("token") or {}
        if token.get("text") and not token.get("special"):
            yield token["text"]


def _new_id() -> str:
    return str(random.randint(10**17, 10**18 - 1))


def _now():
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- state ---------------------------------------------------------------------------------
@dataclass
class _Replica:
    """The process serving one deployed model."""

    deployed_model_id: str
    workdir: Path
    port: int
    predict_route: str
    health_route: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    dialect: str | None = None  # "tgi" or "vllm": the engine the generated handler stands in for
    marker: str = field(default_factory=lambda: f"vertex-emulator-{uuid.uuid4().hex}")  # proves a pid is still this server
    grpc_port: int | None = None  # where the model's first grpcPorts port is served; None: gRPC disabled
    engine_args: list = field(default_factory=list)  # the container's args: what the engine was started with (--enable-lora)
    fetch: Callable[[str, Path], Path] | None = None  # copies a gs:// folder to a local one (the vLLM server's dynamic-lora)
    loras: dict = field(default_factory=dict)  # dynamic-lora gs:// folder -> the adapter name the stand-in holds it under

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def send(self, sig: int) -> None:
        if self.process is not None:
            kill_process(self.process.pid, self.marker, sig)

    def stop(self, grace: float = 10.0) -> None:
        if self.process is not None:
            stop_process(self.process.pid, self.marker, grace=grace)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:500] if lines else ""


@dataclass
class _State:
    models: dict[str, list] = field(default_factory=dict)  # model id -> versions (aiplatform_v1.Model)
    endpoints: dict[str, Any] = field(default_factory=dict)  # endpoint id -> aiplatform_v1.Endpoint
    operations: dict[str, Any] = field(default_factory=dict)  # name -> operations_pb2.Operation
    replicas: dict[str, _Replica] = field(default_factory=dict)  # deployed model id -> process
    deploying: dict[str, set] = field(default_factory=dict)  # endpoint id -> model names being deployed
    deploying_ids: set = field(default_factory=set)  # ids of DeployedModels whose DeployModel is running


def _remember_finished_uploads() -> None:
    """A resumable upload's last PUT, sent again, answers with the object, as GCS does.

    gcp-storage-emulator forgets a session once it completes and answers a repeat with 404; GCS
    keeps it, so a client whose final PUT lost its answer on the network and retries it succeeds.
    Installed once, into the emulator's routing table (its handlers are plain functions).
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.upload_partial, "remembers_finished", False):
        return
    original = objects.upload_partial
    finished: dict[str, dict] = {}

    def upload_partial(request, response, storage, *args, **kwargs):
        upload_id = (request.query.get("upload_id") or [""])[0]
        if upload_id in finished:
            response.json(finished[upload_id])
            return
        try:
            session = storage.get_resumable_file_obj(upload_id)
        except NotFound:
            session = None
        original(request, response, storage, *args, **kwargs)
        if session is not None and response.status == HTTPStatus.OK:
            try:
                storage.get_resumable_file_obj(upload_id)
            except NotFound:  # the upload completed with this request
                finished[upload_id] = storage.get_file_obj(session["bucket"], session["name"])

    upload_partial.remembers_finished = True
    objects.upload_partial = upload_partial
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = upload_partial


class VertexEmulator:
    """GCS emulator + Vertex AI REST fake on loopback; a context manager."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_port: int = 0,
        project: str = DEFAULT_PROJECT,
        workdir: str | Path | None = None,
        objects_on_disk: bool = False,
    ):
        self.host = host
        # Objects in workdir/storage rather than in memory: a multi-GB model then costs this process disk,
        # not memory (gcp-storage-emulator still holds one upload's bytes while it appends a chunk).
        self.objects_on_disk = objects_on_disk
        self.port = port
        self.storage_port = storage_port
        self.project = project
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="cloudllm-vertex-emulator-"))
        self.state = _State()
        self.lock = threading.RLock()
        self._storage = None
        self._httpd: ThreadingHTTPServer | None = None
        self._grpc = None  # grpc.Server of PredictionService, when grpcio is installed
        self.grpc_port: int | None = None
        self._threads: list[threading.Thread] = []
        self.bucket: str | None = None  # set by the pytest fixture: a gs:// location to deploy to
        # False: deployments of TGI/vLLM images complete without a server (predict answers UNAVAILABLE);
        # for tests that only check what was deployed, and machines that cannot spare a model server.
        self.serve_engine_images = True
        self.requests: collections.deque[str] = collections.deque(maxlen=1000)  # "METHOD /path", newest last
        self.traffic_log: list[tuple[str, dict[str, int]]] = []  # (endpoint name, split) each time a split is set, oldest first
        self.replica_gate: threading.Event | None = None  # set: model servers start only once it is set
        self.crash_when_ready: Callable[[Any], bool] | None = None  # DeployedModel -> True: its server dies once ready
        self._rotation: dict[str, dict[str, int]] = {}  # endpoint id -> smooth weighted round-robin state
        self._registry = None  # the image registry it started itself (containers.own_registry)
        from cloudllm_emulators.vertex_tenancy import Tenancy

        self.tenancy = Tenancy(self)  # v1beta1 scale to zero, the route to one deployed model
        from cloudllm_emulators.vertex_dedicated import Dedicated

        self.dedicated = Dedicated(self, _handler_for)  # dedicated endpoints' own DNS on loopback, invoke-enabled models

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "VertexEmulator":
        from gcp_storage_emulator.server import create_server

        logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
        _remember_finished_uploads()
        on_disk = str(self.workdir / "storage") if self.objects_on_disk else None
        self._storage = create_server(self.host, self.storage_port, in_memory=not self.objects_on_disk, data_dir=on_disk)
        self._storage.start()
        self.storage_port = self._storage._api._httpd.server_address[1]
        from http.server import ThreadingHTTPServer

        self._httpd = ThreadingHTTPServer((self.host, self.port), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        thread = threading.Thread(target=self._httpd.serve_forever, name="vertex-emulator", daemon=True)
        thread.start()
        self._threads.append(thread)
        self._registry = own_registry()
        self._start_grpc()
        return self

    def _start_grpc(self) -> None:
        """PredictionService's DirectRawPredict and StreamDirectRawPredict over gRPC (the REST transport has no bidi stream)."""
        try:
            import grpc
        except ImportError:  # the REST API alone, as before
            return
        from concurrent import futures

        t = _types()

        def aborting(context, exc: ApiError):
            context.abort(getattr(grpc.StatusCode, exc.status), exc.message)

        def direct(request, context):
            try:
                return t.DirectRawPredictResponse(output=self.direct_raw_predict(request.endpoint, request.method_name, request.input))
            except ApiError as exc:
                aborting(context, exc)

        def streamed(requests, context):
            first = next(requests, None)
            if first is None:
                return
            def inputs():
                if first.input:
                    yield first.input
                for later in requests:
                    yield later.input
            try:
                for output in self.stream_direct_raw_predict(first.endpoint, first.method_name, inputs()):
                    yield t.StreamDirectRawPredictResponse(output=output)
            except ApiError as exc:
                aborting(context, exc)

        handlers = {
            "DirectRawPredict": grpc.unary_unary_rpc_method_handler(
                direct, request_deserializer=t.DirectRawPredictRequest.deserialize, response_serializer=t.DirectRawPredictResponse.serialize
            ),
            "StreamDirectRawPredict": grpc.stream_stream_rpc_method_handler(
                streamed, request_deserializer=t.StreamDirectRawPredictRequest.deserialize,
                response_serializer=t.StreamDirectRawPredictResponse.serialize,
            ),
        }  # fmt: skip
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("google.cloud.aiplatform.v1.PredictionService", handlers)])
        self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:0")
        self._grpc.start()

    def stop(self) -> None:
        with self.lock:
            replicas = list(self.state.replicas.values())
            self.state.replicas.clear()
        for replica in replicas:
            replica.send(signal.SIGTERM)
        for replica in replicas:
            replica.stop(grace=5.0)
        self.dedicated.stop()
        if self._grpc is not None:
            self._grpc.stop(grace=1.0).wait()
            self._grpc = None
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._storage:
            self._storage.stop()
            self._storage = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        stop_own_registry(self._registry)
        self._registry = None

    def __enter__(self) -> "VertexEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what clients need ---------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        return f"http://{self.host}:{self.storage_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment that points google-cloud-storage and cloudllm's Vertex provider here."""
        env = {"STORAGE_EMULATOR_HOST": self.storage_url, ENDPOINT_ENV: self.url, "GOOGLE_CLOUD_PROJECT": self.project, **registry_env(self._registry)}
        if self.grpc_port:
            env[GRPC_ENDPOINT_ENV] = f"{self.host}:{self.grpc_port}"
        return env

    def storage_client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project, credentials=AnonymousCredentials(), client_options={"api_endpoint": self.storage_url}
        )

    def create_bucket(self, name: str) -> None:
        self.storage_client().create_bucket(name)

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(b.name for b in self.storage_client().list_blobs(bucket, prefix=prefix or None))

    def corrupt_next_upload(self, name_matches: Callable[[str], bool]) -> None:
        """The next upload of an object whose name matches arrives with one byte flipped (the server sees other bytes than were sent)."""
        _install_corruption()
        with _CORRUPTION_LOCK:
            _CORRUPTIONS.append(name_matches)

    def _download(self, gs_uri: str, dest: Path) -> Path:
        """Every object under gs://bucket/prefix into dest, as a serving container copies AIP_STORAGE_URI at start."""
        bucket, _, prefix = gs_uri.removeprefix("gs://").partition("/")
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        for blob in self.storage_client().list_blobs(bucket, prefix=prefix or None):
            if blob.name.endswith("/"):
                continue
            target = dest / blob.name[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
        return dest

    def replica_log(self, deployed_model_id: str) -> str:
        replica = self.state.replicas.get(deployed_model_id)
        return replica.log_path.read_text(errors="replace") if replica and replica.log_path else ""

    # --- operations ---------------------------------------------------------------------
    def _operation(self, parent: str, work: Callable[[], Any], metadata=None):
        """Start work in the background; the returned operation completes when it does."""
        from google.longrunning import operations_pb2

        name = f"{parent}/operations/{_new_id()}"
        op = operations_pb2.Operation(name=name, done=False)
        meta = metadata or _types().GenericOperationMetadata(create_time=_now(), update_time=_now())
        op.metadata.Pack(type(meta).pb(meta))
        with self.lock:
            self.state.operations[name] = op
        snapshot = operations_pb2.Operation()
        snapshot.CopyFrom(op)

        def run() -> None:
            try:
                result = work()
            except ApiError as exc:
                outcome = ("error", exc)
            except Exception as exc:  # a bug in the emulator still ends the operation
                log.exception("operation %s failed", name)
                outcome = ("error", ApiError("INTERNAL", f"{type(exc).__name__}: {exc}"))
            else:
                outcome = ("ok", result)
            with self.lock:
                if outcome[0] == "ok":
                    if outcome[1] is not None:
                        op.response.Pack(type(outcome[1]).pb(outcome[1]))
                    else:
                        from google.protobuf import empty_pb2

                        op.response.Pack(empty_pb2.Empty())
                else:
                    op.error.code = outcome[1].rpc_code
                    op.error.message = outcome[1].message
                op.done = True

        thread = threading.Thread(target=run, name=f"op-{name.rsplit('/', 1)[-1]}", daemon=True)
        thread.start()
        return snapshot

    def get_operation(self, name: str):
        from google.longrunning import operations_pb2

        with self.lock:
            op = self.state.operations.get(name)
            if op is None:
                raise ApiError("NOT_FOUND", f"Operation {name} not found.")
            copy = operations_pb2.Operation()
            copy.CopyFrom(op)
            return self.tenancy.operation_view(copy)

    # --- models -------------------------------------------------------------------------
    def upload_model(self, parent: str, body: bytes):
        t = _types()
        request = _parse(t.UploadModelRequest, body)
        model = request.model
        if not model.display_name:
            raise ApiError("INVALID_ARGUMENT", "Model display_name must be set.")
        if not model.container_spec.image_uri:
            raise ApiError("INVALID_ARGUMENT", "Model container_spec.image_uri must be set.")
        _check_labels(model.labels, "Model")
        _check_encryption(model.encryption_spec, parent)
        if model.container_spec.deployment_timeout and model.container_spec.deployment_timeout.total_seconds() > 7200:
            raise ApiError("INVALID_ARGUMENT", "container_spec.deployment_timeout must be at most 2 hours.")
        self.dedicated.check_upload(model)
        if model.artifact_uri:
            self._check_artifacts(model.artifact_uri)
        with self.lock:
            if request.parent_model:
                model_id = _last(request.parent_model)
                if model_id not in self.state.models:
                    raise ApiError("NOT_FOUND", f"Parent model {request.parent_model} not found.")
                version = str(max(int(v.version_id) for v in self.state.models[model_id]) + 1)
            else:
                model_id = request.model_id or _new_id()
                if model_id in self.state.models:
                    raise ApiError("ALREADY_EXISTS", f"Model {model_id} already exists.")
                version = "1"
                self.state.models[model_id] = []
            stored = t.Model(model)
            stored.name = f"{parent}/models/{model_id}"
            stored.version_id = version
            aliases = [a for a in stored.version_aliases if a != "default"]
            if version == "1" or "default" in stored.version_aliases:
                for other in self.state.models[model_id]:
                    other.version_aliases = [a for a in other.version_aliases if a != "default"]
                aliases.insert(0, "default")
            stored.version_aliases = aliases
            stored.create_time = stored.update_time = stored.version_create_time = stored.version_update_time = _now()
            self.state.models[model_id].append(stored)
        response = t.UploadModelResponse(model=stored.name, model_version_id=version)
        return self._operation(stored.name, lambda: response)

    def _check_artifacts(self, uri: str) -> None:
        if not uri.startswith("gs://"):
            raise ApiError("INVALID_ARGUMENT", f"artifact_uri {uri} must be a gs:// URI.")
        bucket, _, prefix = uri[5:].partition("/")
        client = self.storage_client()
        if client.lookup_bucket(bucket) is None:
            raise ApiError("INVALID_ARGUMENT", f"Bucket {bucket} of artifact_uri {uri} does not exist.")
        if not any(True for _ in client.list_blobs(bucket, prefix=prefix or None, max_results=1)):
            raise ApiError("INVALID_ARGUMENT", f"Model directory {uri} is empty or does not exist.")

    def _model(self, name: str):
        """A model version by resource name: models/ID (the default version) or models/ID@VERSION."""
        model_id, _, version = _last(name).partition("@")
        versions = self.state.models.get(model_id)
        if not versions:
            raise ApiError("NOT_FOUND", f"Model {name} not found.")
        for v in versions:
            if (version and (v.version_id == version or version in v.version_aliases)) or (
                not version and "default" in v.version_aliases
            ):
                return v
        raise ApiError("NOT_FOUND", f"Model {name} not found.")

    def get_model(self, name: str):
        with self.lock:
            model = _types().Model(self._model(name))
            model.deployed_models = self._deployments_of(_last(name).partition("@")[0], model.version_id)
            return model

    def list_models(self, parent: str, query: dict):
        with self.lock:
            models = [_types().Model(v) for vs in self.state.models.values() for v in vs if "default" in v.version_aliases]
        models = [m for m in models if _matches(m, query.get("filter", [""])[0])]
        return _types().ListModelsResponse(models=models)

    def update_model(self, name: str, body: bytes, query: dict):
        """UpdateModel: labels, display_name or description of one version (models/ID@VERSION; the default without)."""
        t = _types()
        patch = _parse(t.Model, body)
        paths = [_snake(p) for p in ",".join(query.get("updateMask", query.get("update_mask", [""]))).split(",") if p]
        if not paths:
            raise ApiError("INVALID_ARGUMENT", "update_mask must be set.")
        with self.lock:
            model = self._model(name)
            for path in paths:
                if path == "labels":
                    _check_labels(patch.labels, "Model")
                    model.labels = dict(patch.labels)
                elif path in ("display_name", "description", "version_description"):
                    setattr(model, path, getattr(patch, path))
                else:
                    raise ApiError("INVALID_ARGUMENT", f"Updating {path} is not supported by the emulator.")
            model.update_time = model.version_update_time = _now()
            return t.Model(model)

    def list_model_versions(self, name: str):
        with self.lock:
            versions = self.state.models.get(_last(name).partition("@")[0])
            if not versions:
                raise ApiError("NOT_FOUND", f"Model {name} not found.")
            return _types().ListModelVersionsResponse(models=[_types().Model(v) for v in versions])

    def _deployments_of(self, model_id: str, version: str | None = None) -> list:
        t = _types()
        found = []
        for endpoint in self.state.endpoints.values():
            for dm in endpoint.deployed_models:
                if _last(dm.model) == model_id and (version is None or dm.model_version_id == version):
                    found.append(t.DeployedModelRef(endpoint=endpoint.name, deployed_model_id=dm.id))
        for endpoint_id, names in self.state.deploying.items():
            for name in names:
                mid, _, ver = _last(name).partition("@")
                if mid == model_id and (version is None or not ver or ver == version):
                    found.append(t.DeployedModelRef(endpoint=self.state.endpoints[endpoint_id].name, deployed_model_id=""))
        return found

    def delete_model(self, name: str, *, version_only: bool = False):
        model_id, _, version = _last(name).partition("@")
        with self.lock:
            versions = self.state.models.get(model_id)
            if not versions:
                raise ApiError("NOT_FOUND", f"Model {name} not found.")
            if version_only:
                target = self._model(name)
                if len(versions) == 1:
                    raise ApiError("FAILED_PRECONDITION", "Cannot delete the only version of a model; use DeleteModel.")
                if "default" in target.version_aliases:
                    raise ApiError("FAILED_PRECONDITION", "Cannot delete the default version of a model.")
                refs = self._deployments_of(model_id, target.version_id)
            else:
                refs = self._deployments_of(model_id)
            if refs:
                where = ", ".join(sorted({r.endpoint for r in refs}))
                raise ApiError("FAILED_PRECONDITION", f"Model {name} is deployed or being deployed at the following Endpoint(s): {where}.")
            if version_only:
                versions.remove(target)
            else:
                del self.state.models[model_id]
        return self._operation(name.partition("@")[0], lambda: None, _types().DeleteOperationMetadata())

    # --- endpoints ------------------------------------------------------------------------
    def create_endpoint(self, parent: str, body: bytes, query: dict):
        t = _types()
        endpoint = _parse(t.Endpoint, body)
        if not endpoint.display_name:
            raise ApiError("INVALID_ARGUMENT", "Endpoint display_name must be set.")
        _check_labels(endpoint.labels, "Endpoint")
        _check_encryption(endpoint.encryption_spec, parent)
        endpoint_id = (query.get("endpointId") or query.get("endpoint_id") or [""])[0] or _new_id()
        with self.lock:
            if endpoint_id in self.state.endpoints:
                raise ApiError("ALREADY_EXISTS", f"Endpoint {endpoint_id} already exists.")
            endpoint.name = f"{parent}/endpoints/{endpoint_id}"
            endpoint.deployed_models = []
            endpoint.traffic_split = {}
            endpoint.create_time = endpoint.update_time = _now()
            endpoint.etag = uuid.uuid4().hex
            self.dedicated.created(endpoint)
            self.state.endpoints[endpoint_id] = endpoint
        created = t.Endpoint(endpoint)
        return self._operation(endpoint.name, lambda: created, t.CreateEndpointOperationMetadata())

    def _set_split(self, endpoint, split: dict[str, int]) -> None:
        endpoint.traffic_split = dict(split)
        self.traffic_log.append((endpoint.name, dict(split)))

    def _endpoint(self, name: str):
        endpoint = self.state.endpoints.get(_last(name))
        if endpoint is None:
            raise ApiError("NOT_FOUND", f"Endpoint {name} not found.")
        return endpoint

    def get_endpoint(self, name: str):
        with self.lock:
            return _types().Endpoint(self._endpoint(name))

    def list_endpoints(self, parent: str, query: dict):
        t = _types()
        flt = query.get("filter", [""])[0]
        with self.lock:
            found = [t.Endpoint(e) for e in self.state.endpoints.values() if e.name.startswith(parent + "/")]
        return t.ListEndpointsResponse(endpoints=[e for e in found if _matches(e, flt)])

    def update_endpoint(self, name: str, body: bytes, query: dict):
        t = _types()
        patch = _parse(t.Endpoint, body)
        paths = [p for p in ",".join(query.get("updateMask", query.get("update_mask", [""]))).split(",") if p]
        if not paths:
            raise ApiError("INVALID_ARGUMENT", "update_mask must be set.")
        with self.lock:
            endpoint = self._endpoint(name)
            if patch.etag and patch.etag != endpoint.etag:
                raise ApiError("ABORTED", f"The etag of {name} does not match: it changed since it was read.")
            for path in paths:
                if path in ("trafficSplit", "traffic_split"):
                    _check_traffic(dict(patch.traffic_split), {dm.id for dm in endpoint.deployed_models})
                    self._set_split(endpoint, dict(patch.traffic_split))
                elif path == "labels":
                    _check_labels(patch.labels, "Endpoint")
                    endpoint.labels = dict(patch.labels)
                elif path in ("displayName", "display_name", "description"):
                    setattr(endpoint, _snake(path), getattr(patch, _snake(path)))
                else:
                    raise ApiError("INVALID_ARGUMENT", f"Updating {path} is not supported by the emulator.")
            endpoint.update_time = _now()
            endpoint.etag = uuid.uuid4().hex
            return t.Endpoint(endpoint)

    def delete_endpoint(self, name: str):
        with self.lock:
            endpoint = self._endpoint(name)
            if endpoint.deployed_models or self.state.deploying.get(_last(name)):
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Endpoint {name} has deployed models; undeploy them before deleting the endpoint.",
                )
            del self.state.endpoints[_last(name)]
            self.state.deploying.pop(_last(name), None)
            self.dedicated.deleted(_last(name))
        return self._operation(name, lambda: None, _types().DeleteOperationMetadata())

    # --- deploy / undeploy --------------------------------------------------------------
    def deploy_model(self, name: str, body: bytes, scale_to_zero: dict | None = None):
        """DeployModel; scale_to_zero: the v1beta1 request's ScaleToZeroSpec (vertex_tenancy), min_replica_count 0 allowed."""
        t = _types()
        request = _parse(t.DeployModelRequest, body)
        dm = request.deployed_model
        with self.lock:
            endpoint = self._endpoint(name)
            model = self._model(dm.model)
            self.dedicated.check_deploy(endpoint, model)
            self._check_resources(dm, zero_ok=scale_to_zero is not None)
            existing = {d.id for d in endpoint.deployed_models}
            if dm.id and (dm.id in existing or dm.id in self.state.deploying_ids):
                raise ApiError("ALREADY_EXISTS", f"DeployedModel {dm.id} already exists on {name}.")
            if dm.id:
                self.state.deploying_ids.add(dm.id)
            split = dict(request.traffic_split)
            if split:
                _check_traffic(split, existing | {"0"})
            model_ref = f"{dm.model.partition('@')[0]}@{model.version_id}"
            self.state.deploying.setdefault(_last(name), set()).add(model_ref)
        deployed = t.DeployedModel(dm)
        deployed.id = dm.id or _new_id()
        deployed.model = dm.model.partition("@")[0]
        deployed.model_version_id = model.version_id
        deployed.display_name = dm.display_name or model.display_name
        deployed.create_time = _now()
        metadata = t.DeployModelOperationMetadata(generic_metadata=t.GenericOperationMetadata(create_time=_now()))

        def work():
            try:
                self._start_replica(endpoint, deployed, model)
                self.tenancy.deployed(deployed.id, scale_to_zero)
            finally:
                with self.lock:
                    self.state.deploying.get(_last(name), set()).discard(model_ref)
                    self.state.deploying_ids.discard(deployed.id)
            with self.lock:
                live = self._endpoint(name)
                deployed.status = t.DeployedModel.Status(
                    available_replica_count=deployed.dedicated_resources.min_replica_count or 1,
                    last_update_time=_now(),
                )
                live.deployed_models.append(deployed)
                if split:
                    self._set_split(live, {(deployed.id if k == "0" else k): v for k, v in split.items()})
                elif not live.traffic_split:
                    self._set_split(live, {deployed.id: 100})
                live.update_time = _now()
            return t.DeployModelResponse(deployed_model=deployed)

        return self._operation(name, work, metadata)

    def mutate_deployed_model(self, name: str, body: bytes):
        """MutateDeployedModel: replica counts and autoscaling metrics of a deployed model, in place."""
        t = _types()
        request = _parse(t.MutateDeployedModelRequest, body)
        paths = list(request.update_mask.paths)
        if not paths:
            raise ApiError("INVALID_ARGUMENT", "update_mask must be set.")
        wrong = [p for p in paths if p not in MUTABLE_DEPLOYED_MODEL_FIELDS]
        if wrong:
            raise ApiError("INVALID_ARGUMENT", f"Field {wrong[0]} of a DeployedModel cannot be mutated; only {', '.join(MUTABLE_DEPLOYED_MODEL_FIELDS)}.")
        with self.lock:
            endpoint = self._endpoint(name)
            deployed = next((d for d in endpoint.deployed_models if d.id == request.deployed_model.id), None)
            if deployed is None:
                raise ApiError("NOT_FOUND", f"Deployed model {request.deployed_model.id} not found on {name}.")
            mutated = t.DeployedModel(deployed)
            for path in paths:
                if path == "disable_container_logging":
                    mutated.disable_container_logging = request.deployed_model.disable_container_logging
                else:
                    field_name = path.rsplit(".", 1)[-1]
                    setattr(mutated.dedicated_resources, field_name, getattr(request.deployed_model.dedicated_resources, field_name))
            self._check_resources(mutated)
        metadata = t.MutateDeployedModelOperationMetadata(generic_metadata=t.GenericOperationMetadata(create_time=_now()))

        def work():
            with self.lock:
                live = next((d for d in self._endpoint(name).deployed_models if d.id == mutated.id), None)
                if live is None:
                    raise ApiError("NOT_FOUND", f"Deployed model {mutated.id} was undeployed from {name}.")
                live.dedicated_resources = mutated.dedicated_resources
                live.disable_container_logging = mutated.disable_container_logging
                live.status.available_replica_count = mutated.dedicated_resources.min_replica_count or 1
                live.status.last_update_time = _now()
                return t.MutateDeployedModelResponse(deployed_model=t.DeployedModel(live))

        return self._operation(name, work, metadata)

    def _check_resources(self, dm, zero_ok: bool = False) -> None:
        t = _types()
        if not dm.dedicated_resources or not dm.dedicated_resources.machine_spec.machine_type:
            raise ApiError("INVALID_ARGUMENT", "deployed_model.dedicated_resources.machine_spec.machine_type must be set.")
        res = dm.dedicated_resources
        spec = res.machine_spec
        valid = MACHINE_ACCELERATORS.get(spec.machine_type)
        if valid is None:
            raise ApiError("INVALID_ARGUMENT", f"Machine type \"{spec.machine_type}\" is not supported.")
        accel = t.AcceleratorType(spec.accelerator_type).name if spec.accelerator_type else None
        if (accel, spec.accelerator_count if accel else 0) not in valid:
            options = sorted(f"{a} x {c}" if a else "no accelerator" for (a, c) in valid)
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Accelerator \"{accel or 'ACCELERATOR_TYPE_UNSPECIFIED'}\" x {spec.accelerator_count} is not supported "
                f"for machine type \"{spec.machine_type}\"; supported: {', '.join(options)}.",
            )
        if res.min_replica_count < (0 if zero_ok else 1):
            raise ApiError("INVALID_ARGUMENT", "dedicated_resources.min_replica_count must be at least 1.")
        if res.max_replica_count and res.max_replica_count < res.min_replica_count:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"max_replica_count ({res.max_replica_count}) must be at least min_replica_count ({res.min_replica_count}).",
            )
        for metric in res.autoscaling_metric_specs:
            bounds = AUTOSCALING_METRICS.get(metric.metric_name)
            if bounds is None:
                raise ApiError(
                    "INVALID_ARGUMENT",
                    f"Autoscaling metric \"{metric.metric_name}\" is not supported; use one of {', '.join(AUTOSCALING_METRICS)}.",
                )
            if metric.target and not bounds[0] <= metric.target <= bounds[1]:
                raise ApiError("INVALID_ARGUMENT", f"Target {metric.target} of {metric.metric_name} must be in {bounds[0]}..{bounds[1]}.")
            if metric.metric_name.endswith("accelerator/duty_cycle") and not accel:
                raise ApiError("INVALID_ARGUMENT", "The accelerator duty cycle metric needs a machine with accelerators.")

    def _start_replica(self, endpoint, deployed, model) -> None:
        """Run the deployed model's server and wait until its health route answers 200."""
        spec = model.container_spec
        endpoint_id = _last(endpoint.name)
        port = _free_port()
        workdir = Path(tempfile.mkdtemp(prefix=f"dm-{deployed.id}-", dir=self.workdir))
        default_route = f"/v1/endpoints/{endpoint_id}/deployedModels/{deployed.id}"
        replica = _Replica(
            deployed_model_id=deployed.id,
            workdir=workdir,
            port=port,
            predict_route=spec.predict_route or f"{default_route}:predict",
            health_route=spec.health_route or default_route,
            log_path=workdir / "server.log",
        )
        env = {
            **os.environ,
            **{e.name: e.value for e in spec.env},
            "AIP_MODE": "PREDICTION",
            "AIP_MODE_VERSION": "1.0.0",
            "AIP_HTTP_PORT": str(port),
            "AIP_PREDICT_ROUTE": replica.predict_route,
            "AIP_HEALTH_ROUTE": replica.health_route,
            "AIP_STORAGE_URI": model.artifact_uri,
            "AIP_ENDPOINT_ID": endpoint_id,
            "AIP_DEPLOYED_MODEL_ID": deployed.id,
            "AIP_MACHINE_TYPE": deployed.dedicated_resources.machine_spec.machine_type,
            "AIP_PROJECT_NUMBER": self.project,
            "STORAGE_EMULATOR_HOST": self.storage_url,
            "CLOUDLLM_SERVE_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop(ENDPOINT_ENV, None)
        env.pop(GRPC_ENDPOINT_ENV, None)
        if spec.grpc_ports:
            replica.grpc_port = _free_port()
            env[GRPC_PORT_ENV] = str(replica.grpc_port)
        timeout = spec.deployment_timeout.total_seconds() if spec.deployment_timeout else DEFAULT_DEPLOYMENT_TIMEOUT
        if self.replica_gate is not None and not self.replica_gate.wait(timeout):
            shutil.rmtree(workdir, ignore_errors=True)
            raise ApiError("DEADLINE_EXCEEDED", f"Model server never became ready within {timeout:.0f}s: it was still loading")
        argv = [*spec.command, *spec.args]
        from cloudllm_emulators.containers import vertex_container_command  # the model's image, where an engine runs it

        aip = {k: v for k, v in env.items() if k.startswith("AIP_") or k == "STORAGE_EMULATOR_HOST" or k in {e.name for e in spec.env}}
        container = vertex_container_command(spec.image_uri, list(spec.command), list(spec.args), aip)
        if container is not None:
            argv, cwd = container, workdir
        elif RUNNABLE_IMAGES.search(spec.image_uri) and argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
            cwd = workdir
        else:
            if not model.artifact_uri:
                raise ApiError("FAILED_PRECONDITION", f"The emulator cannot run image {spec.image_uri} without an artifact_uri.")
            artifact = self._download(model.artifact_uri, workdir / "artifact")
            entry = artifact / "code" / "serve.py"
            if not entry.is_file():
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"The emulator stands in for {spec.image_uri} with the artifact's code/serve.py, which {model.artifact_uri} lacks.",
                )
            argv = [sys.executable, str(entry), "serve", "--host", "127.0.0.1", "--port", str(port)]
            cwd = artifact
            replica.dialect = "tgi" if "text-generation-inference" in spec.image_uri else "vllm" if "vllm" in spec.image_uri else None
            replica.engine_args, replica.fetch = list(spec.args), self._download
            if replica.dialect and not self.serve_engine_images:
                shutil.rmtree(workdir, ignore_errors=True)
                return
        with self.lock:
            self.state.replicas[deployed.id] = replica
        replica.process = start_process(argv, cwd=cwd, env=env, log_path=replica.log_path, marker=replica.marker)
        import httpx

        def ready() -> object:
            code = replica.process.poll()
            if code is not None:
                tail = replica.log_tail()
                self._drop_replica(deployed.id)
                raise ApiError(
                    "FAILED_PRECONDITION", f"Model server exited with code {code} before it became ready: {tail or 'no output'}"
                )
            try:
                health = httpx.get(replica.url + replica.health_route, timeout=2.0)
            except httpx.HTTPError:
                health = None
            if health is not None and health.status_code == 200:
                return health
            failed = _failed_health(health)
            if failed:
                # Vertex would keep probing until deployment_timeout; a CI run wants the reason now
                self._drop_replica(deployed.id)
                raise ApiError("FAILED_PRECONDITION", f"Model server reports it cannot serve: {failed}")
            return Pending()

        if not isinstance(poll_until(ready, deadline=timeout, backoff=SERVER_BACKOFF), Pending):
            if self.crash_when_ready is not None and self.crash_when_ready(deployed):
                replica.send(signal.SIGKILL)
                replica.process.wait()
            return
        tail = replica.log_tail()
        self._drop_replica(deployed.id)
        raise ApiError("DEADLINE_EXCEEDED", f"Model server never became ready within {timeout:.0f}s: {tail or 'no output'}")

    def _drop_replica(self, deployed_model_id: str) -> None:
        with self.lock:
            replica = self.state.replicas.pop(deployed_model_id, None)
        if replica:
            replica.stop()

    def undeploy_model(self, name: str, body: bytes):
        t = _types()
        request = _parse(t.UndeployModelRequest, body)
        with self.lock:
            endpoint = self._endpoint(name)
            ids = {d.id for d in endpoint.deployed_models}
            if request.deployed_model_id not in ids:
                raise ApiError("NOT_FOUND", f"Deployed model {request.deployed_model_id} not found on {name}.")
            remaining = ids - {request.deployed_model_id}
            split = dict(request.traffic_split) if request.traffic_split else dict(endpoint.traffic_split)
            if request.traffic_split:
                _check_traffic(split, ids)
            if remaining and split.get(request.deployed_model_id, 0) > 0:
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Deployed model {request.deployed_model_id} still takes {split[request.deployed_model_id]}% of the "
                    "traffic; move it to other deployed models first (or pass traffic_split).",
                )
            endpoint.deployed_models = [d for d in endpoint.deployed_models if d.id != request.deployed_model_id]
            split.pop(request.deployed_model_id, None)
            self._set_split(endpoint, split if remaining else {})
            endpoint.update_time = _now()

        def work():
            self._drop_replica(request.deployed_model_id)
            self.tenancy.forget(request.deployed_model_id)
            return t.UndeployModelResponse()

        return self._operation(name, work, t.UndeployModelOperationMetadata())

    # --- prediction ---------------------------------------------------------------------
    def _pick_replica(self, name: str) -> _Replica:
        """The deployed model the traffic split sends this request to (smooth weighted round-robin)."""
        with self.lock:
            endpoint = self._endpoint(name)
            split = {k: v for k, v in endpoint.traffic_split.items() if v > 0}
            if not split:
                raise ApiError("FAILED_PRECONDITION", f"Endpoint {name} has no deployed model taking traffic.")
            rotation = self._rotation.setdefault(_last(name), {})
            for key in list(rotation):
                if key not in split:
                    del rotation[key]
            for key, weight in split.items():
                rotation[key] = rotation.get(key, 0) + weight
            chosen = max(sorted(split), key=lambda k: rotation[k])
            rotation[chosen] -= sum(split.values())
        self.tenancy.check_awake(chosen)  # scaled to zero: 429 while it wakes
        with self.lock:
            replica = self.state.replicas.get(chosen)
        if replica is None or replica.process is None or replica.process.poll() is not None:
            raise ApiError("UNAVAILABLE", f"Deployed model {chosen} is not serving: {replica.log_tail() if replica else 'no process'}")
        return replica

    def predict(self, name: str, body: bytes):
        import httpx

        t = _types()
        from google.protobuf import json_format

        data = json.loads(body or b"{}")
        replica = self._pick_replica(name)
        self.dedicated.check_predict(name, replica.deployed_model_id)
        forward = _integral({"instances": data.get("instances", [])})
        if "parameters" in data:
            forward["parameters"] = _integral(data["parameters"])
        if replica.dialect:
            answer, stream = _Engine(replica).call(forward)
            if stream is not None:
                raise ApiError("INTERNAL", "The model server answered a stream, which predict cannot return; use streamRawPredict.")
        else:
            response = httpx.post(replica.url + replica.predict_route, json=forward, timeout=httpx.Timeout(600, connect=5))
            if response.status_code != 200:
                raise _container_error(response.status_code, response.text)
            try:
                answer = response.json()
            except ValueError:
                answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("predictions"), list):  # PredictResponse holds a list only
            raise ApiError("INTERNAL", f"The model server answered without a \"predictions\" list (use rawPredict): {str(answer)[:300]}")
        with self.lock:
            dm = next((d for d in self._endpoint(name).deployed_models if d.id == replica.deployed_model_id), None)
        result = {"predictions": answer["predictions"], "deployedModelId": replica.deployed_model_id}
        if dm is not None:
            result.update(model=dm.model, modelVersionId=dm.model_version_id, modelDisplayName=dm.display_name)
        json_format.ParseDict(result, t.PredictResponse.pb(t.PredictResponse()))  # the real type must hold it
        return result

    def _grpc_target(self, name: str, method_name: str) -> tuple[str, str]:
        """The replica's gRPC address and the method a direct(Raw)Predict names ("/package.Service/Method/")."""
        method = "/" + method_name.strip("/")
        if not re.fullmatch(r"/[\w.]+/\w+", method):
            raise ApiError("INVALID_ARGUMENT", f"method_name {method_name!r} is not of the form /namespace.Service/Method/.")
        self.dedicated.gate("direct_raw_predict", name, None)  # this gRPC server is the shared host's
        replica = self._pick_replica(name)
        self.dedicated.check_predict(name, replica.deployed_model_id)
        if replica.grpc_port is None:
            raise ApiError("FAILED_PRECONDITION", f"gRPC requests to deployed model {replica.deployed_model_id} are disabled: its model declares no grpcPorts.")
        return f"127.0.0.1:{replica.grpc_port}", method

    def direct_raw_predict(self, name: str, method_name: str, payload: bytes) -> bytes:
        import grpc

        target, method = self._grpc_target(name, method_name)
        with grpc.insecure_channel(target) as channel:
            try:
                return channel.unary_unary(method)(payload, timeout=600)
            except grpc.RpcError as exc:
                raise _grpc_error(exc) from None

    def stream_direct_raw_predict(self, name: str, method_name: str, inputs) -> Any:
        import grpc

        target, method = self._grpc_target(name, method_name)
        with grpc.insecure_channel(target) as channel:
            try:
                yield from channel.stream_stream(method)(inputs, timeout=600)
            except grpc.RpcError as exc:
                raise _grpc_error(exc) from None

    def raw_request(self, name: str, body: bytes, content_type: str | None) -> tuple[_Replica, bytes, str]:
        """The container request of raw/streamRawPredict: the HTTP body as is (or an SDK's httpBody)."""
        import base64

        payload, ctype = body, content_type or "application/json"
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and set(parsed) == {"httpBody"}:
            payload = base64.b64decode(parsed["httpBody"].get("data", ""))
            ctype = parsed["httpBody"].get("contentType", ctype)
        replica = self._pick_replica(name)
        self.dedicated.check_predict(name, replica.deployed_model_id)
        return replica, payload, ctype


def _grpc_error(exc) -> ApiError:
    """The container's gRPC status, passed on (a code the emulator has no HTTP twin for is INTERNAL)."""
    status = exc.code().name
    return ApiError(status if status in ApiError.CODES else "INTERNAL", exc.details() or status)


def _failed_health(response) -> str | None:
    """The error of a health answer that says loading failed for good ({"status": "failed", "error": ...})."""
    if response is None or response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("status") == "failed":
        return str(body.get("error") or "no reason given")[:500]
    return None


def _integral(value: Any) -> Any:
    """Vertex holds instances and parameters as protobuf Values (numbers are doubles) and hands them
    to the container as JSON, where a whole number prints as 8, not 8.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


# --- the engines the generated handler stands in for ----------------------------------------
# vllm.SamplingParams' keyword arguments: anything else in an instance is its TypeError (a 500).
_VLLM_SAMPLING = frozenset({
    "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
    "min_p", "seed", "use_beam_search", "length_penalty", "early_stopping", "stop", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "detokenize",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
})  # fmt: skip
_VLLM_DEFAULT_MAX_TOKENS = 16  # SamplingParams' default


def _engine_body(payload: bytes, dialect: str) -> Any:
    """A raw request body as the engine's JSON parser sees it."""
    try:
        return json.loads(payload or b"")
    except ValueError as exc:
        if dialect == "tgi":  # axum's Json extractor
            raise _container_error(400, f"Failed to parse the request body as JSON: {exc}") from None
        raise _container_error(500, "Internal Server Error") from None  # fastapi: request.json() raised


class _Engine:
    """TGI's Vertex route or the Model Garden vLLM server, in front of the generated handler of one replica.

    call(body) -> (JSON answer, None) or (None, the stream's chunks); a body the engine refuses
    raises the container error the engine answers.
    """

    def __init__(self, replica: _Replica):
        self.replica = replica

    def call(self, body: Any):
        return self._tgi(body) if self.replica.dialect == "tgi" else self._vllm(body)

    # TGI (router/src/vertex.rs): VertexRequest {instances: Vec<VertexInstance>}; an instance is
    # {inputs: String, parameters?} (or a chat request); generate with do_sample, max_new_tokens and seed only.
    def _tgi(self, body: Any):
        def refuse(why: str) -> ApiError:
            return _container_error(422, json.dumps({"error": f"Failed to deserialize the JSON body into the target type: {why}", "error_type": "validation"}))

        if not isinstance(body, dict):
            raise refuse("invalid type: expected struct VertexRequest")
        if "instances" not in body:
            raise refuse("missing field `instances`")
        if not isinstance(body["instances"], list):
            raise refuse("instances: invalid type: expected a sequence")
        if not body["instances"]:
            raise _container_error(422, json.dumps({"error": "Input validation error", "error_type": "Input validation error"}))
        predictions = []
        for i, instance in enumerate(body["instances"]):
            if isinstance(instance, dict) and "messages" in instance and "inputs" not in instance:
                predictions.append(self._chat(instance))  # TGI's VertexInstance::Chat: a ChatRequest, answered by its chat route
                continue
            parameters = instance.get("parameters") if isinstance(instance, dict) else None
            if not isinstance(instance, dict) or not isinstance(instance.get("inputs"), str) or not isinstance(parameters, (dict, type(None))):
                raise refuse(f"instances[{i}]: data did not match any variant of untagged enum VertexInstance")
            chosen = {k: parameters[k] for k in ("max_new_tokens", "seed") if (parameters or {}).get(k) is not None}
            predictions.append(self._generate(instance["inputs"], {"do_sample": True, **chosen})[0])
        return {"predictions": predictions}, None

    # vLLM (the Model Garden entrypoints/api_server.py /generate): {"instances": [...]} or one bare instance.
    def _vllm(self, body: Any):
        if not isinstance(body, dict):
            raise _container_error(500, "Internal Server Error")
        items = body["instances"] if "instances" in body else [body]
        if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
            raise _container_error(500, "Internal Server Error")
        answers = []
        for item in items:
            item = dict(item)
            if item.pop("@requestFormat", "") == "chatCompletions":
                if item.get("stream"):
                    raise ApiError("UNIMPLEMENTED", "The emulator's vLLM stand-in answers chatCompletions whole, not streamed.")
                # The completion itself, not a list: what public Vertex AI clients of Model Garden's vLLM read
                # (response["predictions"]["choices"]); its server is Google's build, not upstream vLLM's api_server.py.
                answers.append({"predictions": self._chat(item)})
                continue
            if "prompt" not in item:
                raise _container_error(500, "Internal Server Error")  # KeyError: 'prompt'
            prompt = item.pop("prompt")
            stream, raw = item.pop("stream", False), item.pop("raw_response", False)
            lora = item.pop("dynamic-lora", None)
            if stream and len(items) > 1:
                raise _container_error(400, json.dumps({"detail": "stream=True can only be used with a single prompt."}))
            unknown = sorted(set(item) - _VLLM_SAMPLING)
            if unknown:
                raise _container_error(500, "Internal Server Error")  # TypeError: SamplingParams got an unexpected keyword argument
            parameters = _vllm_to_handler(item)
            if lora is not None:
                parameters["adapter_id"] = self._dynamic_lora(lora)
            if stream:
                return None, self._vllm_stream(prompt, parameters, raw)
            text, tokens = self._generate(prompt, parameters)
            if raw:
                answers.append({"predictions": [text], "output_token_counts": [tokens], "cumulative_logprobs": [None]})
            else:
                answers.append({"predictions": [f"Prompt:\n{str(prompt).strip()}\nOutput:\n{text.strip(chr(10))}"]})
        return (answers[0] if len(answers) == 1 else {"predictions": answers}), None

    def _dynamic_lora(self, uri: Any) -> str:
        """The Model Garden server's per-request adapter: a folder it downloads once and serves as a LoRARequest.

        vLLM refuses a LoRARequest without --enable-lora ("Got lora_request ... but LoRA is not
        enabled!") and an adapter above --max-lora-rank (default 16), each a ValueError: a 500."""
        import httpx

        replica = self.replica
        if uri in replica.loras:
            return replica.loras[uri]
        if "--enable-lora" not in replica.engine_args:
            raise _container_error(500, "Internal Server Error")  # ValueError: LoRA is not enabled
        if not isinstance(uri, str) or not uri.startswith("gs://") or replica.fetch is None:
            raise _container_error(500, "Internal Server Error")  # the stand-in reads gs:// folders only
        folder = replica.fetch(uri, replica.workdir / "loras" / uuid.uuid5(uuid.NAMESPACE_URL, uri).hex)
        try:
            rank = json.loads((folder / "adapter_config.json").read_text())["r"]
        except (OSError, ValueError, KeyError):
            raise _container_error(500, "Internal Server Error") from None  # no adapter there
        limit = next((int(a.split("=", 1)[1]) for a in replica.engine_args if a.startswith("--max-lora-rank=")), 16)
        if rank > limit:
            raise _container_error(500, "Internal Server Error")  # ValueError: LoRA rank is greater than max_lora_rank
        name = f"lora-{uuid.uuid5(uuid.NAMESPACE_URL, uri).hex[:16]}"
        response = httpx.post(replica.url + "/adapters", json={"name": name, "path": str(folder)}, timeout=httpx.Timeout(600, connect=5))
        if response.status_code != 200:
            raise _container_error(500, "Internal Server Error")
        replica.loras[uri] = name
        return name

    def _vllm_stream(self, prompt: str, parameters: dict, raw: bool):
        """The stream's chunks; the handler is asked first, so a refusal is an error answer, not a broken stream."""
        import httpx

        client = httpx.Client(timeout=httpx.Timeout(600, connect=5))
        body = {"inputs": prompt, "parameters": parameters, "stream": True}
        response = client.send(client.build_request("POST", self.replica.url + self.replica.predict_route, json=body), stream=True)
        if response.status_code != 200:
            response.read()
            client.close()
            raise _container_error(response.status_code, response.text)

        def frames():
            try:
                for text in _sse_texts(response.iter_lines()):
                    frame = {"predictions": [text]}
                    if raw:
                        frame.update(output_token_counts=[1], cumulative_logprobs=[None])
                    yield (json.dumps(frame) + "\0").encode()
            finally:
                response.close()
                client.close()

        return frames()

    # --- chat (issue 16): both engines answer OpenAI's chat request with their own chat route ---
    def _chat(self, request: dict) -> Any:
        """A chat request as the engine's OpenAI route answers it (the generated handler's /v1/chat/completions)."""
        import httpx

        response = httpx.post(self.replica.url + "/v1/chat/completions", json=request, timeout=httpx.Timeout(600, connect=5))
        if response.status_code != 200:
            raise _container_error(response.status_code, response.text)
        return response.json()

    # --- end of chat ---

    def _generate(self, prompt: Any, parameters: dict) -> tuple[str, int | None]:
        """The handler's generated text for one prompt, and how many tokens it generated."""
        import httpx

        body = {"instances": [prompt], "parameters": {**parameters, "details": True}}
        response = httpx.post(self.replica.url + self.replica.predict_route, json=body, timeout=httpx.Timeout(600, connect=5))
        if response.status_code != 200:
            raise _container_error(response.status_code, response.text)
        prediction = response.json()["predictions"][0]
        if isinstance(prediction, dict):
            return str(prediction.get("generated_text", "")), (prediction.get("details") or {}).get("generated_tokens")
        return str(prediction), None


def _vllm_to_handler(sampling: dict) -> dict:
    """vLLM sampling parameters as the handler's: temperature 0 is greedy; max_tokens defaults to 16."""
    temperature = sampling.get("temperature", 1.0)
    out: dict[str, Any] = {"max_new_tokens": sampling.get("max_tokens") or _VLLM_DEFAULT_MAX_TOKENS}
    if temperature == 0:
        out["do_sample"] = False
    else:
        out.update(do_sample=True, temperature=temperature)
        if sampling.get("top_p") not in (None, 1.0):
            out["top_p"] = sampling["top_p"]
        if (sampling.get("top_k") or -1) > 0:
            out["top_k"] = sampling["top_k"]
    for key in ("seed", "stop"):
        if sampling.get(key) is not None:
            out[key] = sampling[key]
    if sampling.get("repetition_penalty") not in (None, 1.0):
        out["repetition_penalty"] = sampling["repetition_penalty"]
    return out


# --- uploads that arrive corrupted --------------------------------------------------------------
_CORRUPTIONS: list[Callable[[str], bool]] = []
_CORRUPTION_LOCK = threading.Lock()


def _install_corruption() -> None:
    """Wrap gcp-storage-emulator's checksum step (every upload passes it with the bytes received):
    a pending corruption flips one byte of what it checks, as if the bytes changed on the way."""
    from gcp_storage_emulator.handlers import objects

    if getattr(objects._checksums, "corrupts", False):
        return
    original = objects._checksums

    def checksums(content, file_obj):
        with _CORRUPTION_LOCK:
            match = next((m for m in _CORRUPTIONS if m(file_obj.get("name", ""))), None)
            if match is not None:
                _CORRUPTIONS.remove(match)
        if match is not None and content:
            data = content.encode() if isinstance(content, str) else bytes(content)
            content = bytes([data[0] ^ 0xFF]) + data[1:]
        return original(content, file_obj)

    checksums.corrupts = True
    objects._checksums = checksums


def _container_error(status: int, text: str) -> ApiError:
    kind = "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL"
    return ApiError(kind, f"The model server answered {status}: {text[:1000]}")


def _check_traffic(split: dict, known: set) -> None:
    unknown = sorted(set(split) - known)
    if unknown:
        raise ApiError("INVALID_ARGUMENT", f"traffic_split names deployed models that do not exist: {', '.join(unknown)}.")
    if any(v < 0 or v > 100 for v in split.values()):
        raise ApiError("INVALID_ARGUMENT", "traffic_split percentages must be between 0 and 100.")
    if sum(split.values()) != 100:
        raise ApiError("INVALID_ARGUMENT", f"traffic_split must sum to 100, not {sum(split.values())}.")


_LABEL = re.compile(r"^[\w-]{0,63}$")


def _check_labels(labels, what: str) -> None:
    for key, value in dict(labels).items():
        if not (key and key[0].isalpha() and key == key.lower() and _LABEL.match(key) and value == value.lower() and _LABEL.match(value)):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"{what} label {key}={value} is invalid: keys and values hold at most 63 lowercase letters, digits, "
                "underscores and dashes, and keys start with a letter.",
            )


_KMS_KEY = re.compile(r"^projects/[^/]+/locations/(?P<location>[^/]+)/keyRings/[^/]+/cryptoKeys/[^/]+$")


def _check_encryption(spec, parent: str) -> None:
    """A customer-managed key is a Cloud KMS key name in the resource's own region, as Vertex AI requires."""
    key = spec.kms_key_name if spec else ""
    if not key:
        return
    match = _KMS_KEY.match(key)
    if not match:
        raise ApiError("INVALID_ARGUMENT", f"encryption_spec.kms_key_name {key!r} is not of the form projects/*/locations/*/keyRings/*/cryptoKeys/*.")
    region = parent.split("/locations/", 1)[1].split("/", 1)[0]
    if match.group("location") != region:
        raise ApiError("INVALID_ARGUMENT", f"The KMS key {key} is in {match.group('location')}; resources in {region} need a key in {region}.")


_CLAUSE = re.compile(r'^\s*(display_name|labels\.[\w-]+)\s*=\s*"([^"]*)"\s*$')


def _matches(resource, flt: str) -> bool:
    """The subset of AIP-160 filters cloudllm uses: display_name="x" and labels.k="v", joined by AND."""
    if not flt.strip():
        return True
    for clause in re.split(r"\s+AND\s+", flt.strip()):
        match = _CLAUSE.match(clause)
        if not match:
            raise ApiError("INVALID_ARGUMENT", f"Unsupported filter {clause!r} (the emulator supports display_name= and labels.KEY=).")
        key, value = match.groups()
        actual = resource.display_name if key == "display_name" else dict(resource.labels).get(key[len("labels.") :])
        if actual != value:
            return False
    return True


def _last(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


# --- HTTP -----------------------------------------------------------------------------------
_ROUTE_PATTERNS = [
    ("GET", rf"^/(?:ui|v1)/(?P<name>{_LOC}(?:/[^/]+/[^/]+)?/operations/[^/:]+)$", "get_operation"),
    ("POST", rf"^/v1/(?P<parent>{_LOC})/models:upload$", "upload_model"),
    ("GET", rf"^/v1/(?P<parent>{_LOC})/models$", "list_models"),
    ("GET", rf"^/v1/(?P<name>{_LOC}/models/[^/:]+)$", "get_model"),
    ("GET", rf"^/v1/(?P<name>{_LOC}/models/[^/:]+):listVersions$", "list_model_versions"),
    ("DELETE", rf"^/v1/(?P<name>{_LOC}/models/[^/:]+):deleteVersion$", "delete_model_version"),
    ("DELETE", rf"^/v1/(?P<name>{_LOC}/models/[^/:]+)$", "delete_model"),
    ("POST", rf"^/v1/(?P<parent>{_LOC})/endpoints$", "create_endpoint"),
    ("GET", rf"^/v1/(?P<parent>{_LOC})/endpoints$", "list_endpoints"),
    ("GET", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+)$", "get_endpoint"),
    ("PATCH", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+)$", "update_endpoint"),
    ("DELETE", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+)$", "delete_endpoint"),
    ("POST", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+):deployModel$", "deploy_model"),
    ("POST", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+):undeployModel$", "undeploy_model"),
    ("POST", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+):mutateDeployedModel$", "mutate_deployed_model"),
    ("PATCH", rf"^/v1/(?P<name>{_LOC}/models/[^/:]+)$", "update_model"),
    ("POST", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+):predict$", "predict"),
    ("POST", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+):rawPredict$", "raw_predict"),
    ("POST", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+):streamRawPredict$", "stream_raw_predict"),
    ("POST", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+):directRawPredict$", "direct_raw_predict"),
]  # + vertex_tenancy.ROUTES (v1beta1 deploy, the route to one deployed model), added where _routes() compiles them


@functools.lru_cache(maxsize=1)
def _routes() -> list[tuple[str, re.Pattern, str]]:
    from cloudllm_emulators.vertex_tenancy import ROUTES

    return [(method, re.compile(pattern), action) for method, pattern, action in [*_ROUTE_PATTERNS, *ROUTES]]


def _handler_for(emulator: VertexEmulator, dedicated_for: str | None = None) -> type["BaseHTTPRequestHandler"]:
    """The request handler of the API host, or (dedicated_for: an endpoint id) of that endpoint's dedicated DNS."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cloudllm-vertex-emulator"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PATCH(self) -> None:
            self._dispatch("PATCH")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def _dispatch(self, method: str) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            emulator.requests.append(f"{method} {path}")
            query = parse_qs(parts.query.replace(";", "&"))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                for route_method, pattern, action in _routes():
                    match = pattern.match(path) if route_method == method else None
                    if match:
                        self._run(action, match.groupdict(), body, query)
                        return
                raise ApiError("NOT_FOUND", f"The emulator has no route {method} {path}.")
            except ApiError as exc:
                self._send_json(exc.http_status, exc.body())
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:  # keep serving; the client sees a 500 with the reason
                log.exception("%s %s failed", method, self.path)
                self._send_json(500, ApiError("INTERNAL", f"{type(exc).__name__}: {exc}").body())

        def _run(self, action: str, params: dict, body: bytes, query: dict) -> None:
            import httpx

            from cloudllm_emulators import vertex_tenancy as tenancy

            e = emulator
            e.dedicated.gate(action, params.get("name"), dedicated_for)  # which host may answer it (vertex_dedicated)
            if action == "get_operation":
                from google.protobuf import json_format

                self._send_json(200, json.loads(json_format.MessageToJson(e.get_operation(params["name"]))))
            elif action == "upload_model":
                self._send_op(e.upload_model(params["parent"], body))
            elif action == "list_models":
                self._send_json(200, _to_json(e.list_models(params["parent"], query)))
            elif action == "get_model":
                self._send_json(200, _to_json(e.get_model(params["name"])))
            elif action == "list_model_versions":
                self._send_json(200, _to_json(e.list_model_versions(params["name"])))
            elif action == "delete_model":
                self._send_op(e.delete_model(params["name"]))
            elif action == "delete_model_version":
                self._send_op(e.delete_model(params["name"], version_only=True))
            elif action == "create_endpoint":
                self._send_op(e.create_endpoint(params["parent"], body, query))
            elif action == "list_endpoints":
                self._send_json(200, _to_json(e.list_endpoints(params["parent"], query)))
            elif action == "get_endpoint":
                self._send_json(200, _to_json(e.get_endpoint(params["name"])))
            elif action == "update_endpoint":
                self._send_json(200, _to_json(e.update_endpoint(params["name"], body, query)))
            elif action == "delete_endpoint":
                self._send_op(e.delete_endpoint(params["name"]))
            elif action == "deploy_model":
                self._send_op(e.deploy_model(params["name"], body))
            elif action == "undeploy_model":
                self._send_op(e.undeploy_model(params["name"], body))
            elif action == "mutate_deployed_model":
                self._send_op(e.mutate_deployed_model(params["name"], body))
            elif action == "update_model":
                self._send_json(200, _to_json(e.update_model(params["name"], body, query)))
            elif action == "predict":
                self._send_json(200, e.predict(params["name"], body))
            elif action == "direct_raw_predict":
                request = _parse(_types().DirectRawPredictRequest, body)
                output = e.direct_raw_predict(params["name"], request.method_name, request.input)
                self._send_json(200, _to_json(_types().DirectRawPredictResponse(output=output)))
            elif action in tenancy.ACTIONS:
                tenancy.serve(self, e, action, params, body)
            elif action in ("raw_predict", "stream_raw_predict"):
                replica, payload, ctype = e.raw_request(params["name"], body, self.headers.get("Content-Type"))
                if replica.dialect:
                    self._engine(replica, payload, streamed=action == "stream_raw_predict")
                elif action == "stream_raw_predict":
                    self._stream(replica, payload, ctype)
                else:
                    response = httpx.post(
                        replica.url + replica.predict_route, content=payload, headers={"Content-Type": ctype},
                        timeout=httpx.Timeout(600, connect=5),
                    )  # fmt: skip
                    if response.status_code != 200:
                        raise _container_error(response.status_code, response.text)
                    self._send_bytes(200, response.content, response.headers.get("content-type", "application/json"))

        def _engine(self, replica: _Replica, payload: bytes, *, streamed: bool) -> None:
            """raw/streamRawPredict to a TGI or vLLM image: the engine's own answer (rawPredict collects a stream)."""
            answer, stream = _Engine(replica).call(_engine_body(payload, replica.dialect))
            if stream is None:
                self._send_json(200, answer)
            elif streamed:
                self._send_chunks(stream, "application/json")
            else:
                self._send_bytes(200, b"".join(stream), "application/json")

        def _stream(self, replica: _Replica, payload: bytes, ctype: str, route: str | None = None) -> None:
            import httpx

            with httpx.stream(
                "POST", replica.url + (route or replica.predict_route), content=payload, headers={"Content-Type": ctype},
                timeout=httpx.Timeout(600, connect=5),
            ) as response:  # fmt: skip
                if response.status_code != 200:
                    response.read()
                    raise _container_error(response.status_code, response.text)
                self._send_chunks(response.iter_raw(), response.headers.get("content-type", "text/event-stream"))

        def _send_chunks(self, chunks, content_type: str) -> None:
            """A streamed answer (chunked transfer encoding), each chunk as the model server sent it."""
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in chunks:
                if chunk:
                    self.wfile.write(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _send_op(self, op) -> None:
            from google.protobuf import json_format

            self._send_json(200, json.loads(json_format.MessageToJson(op)))

        def _send_json(self, status: int, data: dict) -> None:
            self._send_bytes(status, json.dumps(data).encode(), "application/json")

        def _send_bytes(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler
