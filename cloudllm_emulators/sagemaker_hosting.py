"""SageMaker hosting for the emulator: moto's backends extended to host models for real.

What `sagemaker.py` describes (hosting, UpdateEndpoint, InvokeEndpoint, images) lives here, below
both the emulator's server (`sagemaker.py`) and inference components (`sagemaker_components.py`),
which extend these backends.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
from moto.core.exceptions import ServiceException
from moto.core.utils import utcnow
from moto.sagemaker import urls as sagemaker_urls
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.models import FakeEndpointConfig, SageMakerModelBackend, sagemaker_backends
from moto.sagemaker.responses import SageMakerResponse
from moto.sagemaker.utils import arn_formatter
from moto.sagemakerruntime import urls as runtime_urls
from moto.sagemakerruntime.models import SageMakerRuntimeBackend
from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

from cloudllm_procs import SERVER_BACKOFF, Pending, poll_until
from cloudllm_procs import start as start_process
from cloudllm_procs import stop as stop_process


REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account for any access key it does not know
BUCKET = "cloudllm-emulator"
ROLE_NAME = "cloudllm-emulator-sagemaker"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE_NAME}"
DEFAULT_STARTUP_TIMEOUT = 600
INVOKE_TIMEOUT = 60.0  # SageMaker's limit for a container's answer
CONTENT_TYPE_EVENTSTREAM = "application/vnd.amazon.eventstream"
# The Hugging Face PyTorch inference DLCs (CPU/GPU, Inferentia 1 and 2): they serve code/inference.py
# through the HF inference toolkit. The emulator's own list, not cloudllm's, so it judges cloudllm's.
TOOLKIT_REPOSITORIES = frozenset(
    {"huggingface-pytorch-inference", "huggingface-pytorch-inference-neuron", "huggingface-pytorch-inference-neuronx"}
)


@functools.cache
def known_instance_types() -> frozenset[str]:
    """Hosting instance types SageMaker accepts: the ProductionVariantInstanceType enum of botocore's service model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return frozenset(model.shape_for("ProductionVariantInstanceType").enum)


def runs_toolkit(image: str) -> bool:
    """The image is an HF PyTorch inference DLC (served by the toolkit), not one that runs the artifact's code/serve.py."""
    repository = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    return repository in TOOLKIT_REPOSITORIES


ADDITIONAL_SOURCES = "additional-model-data-sources"  # under /opt/ml in the container, under the host's dir here
CONTAINER_SOURCES = "/opt/ml/" + ADDITIONAL_SOURCES


def copy_s3_prefix(backend, uri: str, dest: Path, what: str) -> int:
    """Every object under an s3:// prefix of moto's S3, written below dest (as SageMaker downloads model data)."""
    bucket_name, _, prefix = uri[len("s3://") :].partition("/")
    from moto.s3.models import s3_backends

    s3 = s3_backends[backend.account_id][backend.partition]
    try:
        bucket = s3.get_bucket(bucket_name)
    except Exception:
        raise RuntimeError(f"Failed to download {what} from {uri}: the bucket does not exist") from None
    count = 0
    for key_name, key in list(bucket.keys.items()):
        if not key_name.startswith(prefix) or key_name.endswith("/") or not hasattr(key, "value"):
            continue
        target = dest / key_name[len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(key.value)
        count += 1
    if count == 0:
        raise RuntimeError(f"Failed to download {what} from {uri}: no objects under that prefix")
    return count


# --- hosting: an endpoint version served by the artifact's generated server ---------------------
class HostedModel:
    """One endpoint config's model running locally: downloaded artifact + `code/serve.py` process."""

    def __init__(self, backend: "EmulatedSageMakerBackend", endpoint: str, config: dict, on_settled):
        self.backend = backend
        self.endpoint = endpoint
        self.config_name = config["EndpointConfigName"]
        self.variant = config["ProductionVariants"][0]
        self.on_settled = on_settled
        self.state = "starting"  # -> ready | failed | stopped
        self.reason: str | None = None
        self.url: str | None = None
        self.process: subprocess.Popen | None = None
        self.marker = f"sagemaker-emulator-{endpoint}-{uuid.uuid4().hex}"  # proves a pid is still this server
        self.dir = Path(tempfile.mkdtemp(prefix=f"{endpoint}-", dir=backend.work_dir()))
        self.log_stream = f"{self.variant['VariantName']}/i-{uuid.uuid4().hex[:17]}"
        self.log_path = self.dir / "server.log"
        self.image = ""

    def start(self) -> "HostedModel":
        threading.Thread(target=self._run, name=f"host-{self.endpoint}", daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            artifact = self._download()
            self._serve(artifact)
            self.state = "ready"
        except Exception as exc:  # the reason becomes the endpoint's FailureReason
            if self.state != "stopped":
                self.state, self.reason = "failed", str(exc)
                self._stop_process()
        if self.state != "stopped":
            self.on_settled(self)

    def _download(self) -> Path:
        model = self.backend.describe_model(self.variant["ModelName"])
        self.image = (model.primary_container or {}).get("Image", "")
        source = (model.primary_container or {}).get("ModelDataSource", {}).get("S3DataSource")
        if not source or source.get("S3DataType") != "S3Prefix" or source.get("CompressionType") != "None":
            raise RuntimeError(
                "the emulator serves uncompressed S3Prefix model data (ModelDataSource) only; "
                f"model {model.model_name} has {json.dumps(source or model.primary_container.get('ModelDataUrl'))}"
            )
        artifact = self.dir / "model"  # what /opt/ml/model holds
        copy_s3_prefix(self.backend, source["S3Uri"], artifact, "model data")
        for extra in (model.primary_container or {}).get("AdditionalModelDataSources") or []:
            # SageMaker copies channel NAME to /opt/ml/additional-model-data-sources/NAME/ (botocore allows up to 5).
            copy_s3_prefix(self.backend, extra["S3DataSource"]["S3Uri"], self.dir / ADDITIONAL_SOURCES / extra["ChannelName"], "model data")
        entry = "inference.py" if runs_toolkit(self.image) else "serve.py"
        if not (artifact / "code" / entry).is_file():
            raise RuntimeError(f"{source['S3Uri']} has no code/{entry}: the emulator serves cloudllm artifacts only")
        return artifact

    def _command(self, artifact: Path, port_file: Path) -> list[str]:
        from cloudllm_emulators.containers import sagemaker_container_command  # the model's image, where an engine runs it

        environment = self.backend.describe_model(self.variant["ModelName"]).primary_container.get("Environment")
        container = sagemaker_container_command(self.image, artifact, port_file, environment)
        if container is not None:
            return container
        if runs_toolkit(self.image):
            # A fresh interpreter with the stand-in's own source: it imports neither moto nor cloudllm, as the DLC has neither.
            source = f"{inspect.getsource(_toolkit_server)}\n_toolkit_server({str(artifact)!r}, {str(port_file)!r})\n"
            return [sys.executable, "-c", source]
        return [sys.executable, str(artifact / "code" / "serve.py"), "serve", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]

    def _serve(self, artifact: Path) -> None:
        port_file = self.dir / "port"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        container_env = self.backend.describe_model(self.variant["ModelName"]).primary_container.get("Environment") or {}
        if runs_toolkit(self.image):
            env.update(container_env)
        elif "CLOUDLLM_SETTINGS" in container_env:  # the stand-in for an engine image serves with the settings deploy gave it
            env["CLOUDLLM_SETTINGS"] = container_env["CLOUDLLM_SETTINGS"]
        if container_env.get("LORA_ADAPTERS") and not runs_toolkit(self.image):
            env["CLOUDLLM_SETTINGS"] = self._tgi_adapters(container_env, env.get("CLOUDLLM_SETTINGS"))
        self.process = start_process(self._command(artifact, port_file), cwd=artifact, env=env, stdout=subprocess.PIPE, marker=self.marker)
        threading.Thread(target=self._pump_logs, name=f"logs-{self.endpoint}", daemon=True).start()
        timeout = self.variant.get("ContainerStartupHealthCheckTimeoutInSeconds") or DEFAULT_STARTUP_TIMEOUT

        def ready() -> object:
            assert self.process is not None
            if self.state == "stopped":
                return "stopped"
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"The primary container for production variant {self.variant['VariantName']} exited with code {code}: "
                    f"{self._last_line() or 'no output'}. Check the CloudWatch logs of this endpoint."
                )
            if self.url is None and port_file.is_file() and port_file.read_text().strip():
                self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
            if self.url:
                healthy, failure = _ping(self.url)
                if healthy:
                    return "healthy"
                if failure:
                    # The generated server reports a load that failed for good on /ping; SageMaker would
                    # only see 503s until the health-check timeout, so the emulator fails at once.
                    raise RuntimeError(
                        f"The primary container for production variant {self.variant['VariantName']} did not pass the ping "
                        f"health check: {failure.rstrip('.')}. Check the CloudWatch logs of this endpoint."
                    )
            return Pending()

        if not isinstance(poll_until(ready, deadline=timeout, backoff=SERVER_BACKOFF), Pending):
            return
        raise RuntimeError(
            f"The primary container for production variant {self.variant['VariantName']} did not pass the ping health check "
            f"within {timeout}s. Check the CloudWatch logs of this endpoint."
        )

    def _tgi_adapters(self, container_env: dict, settings: str | None) -> str:
        """TGI's LORA_ADAPTERS as the stand-in server's adapters: each `id=path` must be a folder the
        container has (a data source channel); TGI stops at start otherwise, and so does this."""
        adapters = {}
        for pair in container_env["LORA_ADAPTERS"].split(","):
            adapter_id, _, path = pair.strip().partition("=")
            path = path.split("@", 1)[0]
            if not path.startswith(CONTAINER_SOURCES + "/"):
                raise RuntimeError(f"LORA_ADAPTERS names {adapter_id}={path or '(a hub id)'}: the emulator has no hub; mount it as an AdditionalModelDataSource")
            local = self.dir / ADDITIONAL_SOURCES / path[len(CONTAINER_SOURCES) + 1 :]
            if not (local / "adapter_config.json").is_file():
                raise RuntimeError(f"The primary container for production variant {self.variant['VariantName']} exited: no adapter_config.json in {path}")
            adapters[adapter_id] = str(local)
        self.tgi_adapters = sorted(adapters)
        loaded = json.loads(settings or "{}")
        loaded["adapters"] = adapters
        return json.dumps(loaded)

    def engine_body(self, body: bytes) -> bytes:
        """A request as TGI reads it: an adapter_id it did not load at start is the base model
        (flash_causal_lm.py: ADAPTER_TO_INDEX.get(adapter_id, 0)), never an error."""
        held = getattr(self, "tgi_adapters", None)
        if held is None or "tgi" not in self.image:
            return body
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return body
        parameters = request.get("parameters") if isinstance(request, dict) else None
        if isinstance(parameters, dict) and parameters.get("adapter_id") is not None and parameters["adapter_id"] not in held:
            del parameters["adapter_id"]
            return json.dumps(request).encode()
        return body

    def _pump_logs(self) -> None:
        """The server's output to a local file and to CloudWatch Logs, line by line."""
        group = f"/aws/sagemaker/Endpoints/{self.endpoint}"
        logs = self.backend.logs()
        try:
            if group not in logs.groups:
                logs.create_log_group(group, {})
            logs.create_log_stream(group, self.log_stream)
        except Exception:
            logs = None
        assert self.process is not None and self.process.stdout is not None
        with open(self.log_path, "ab") as local:
            for raw in iter(self.process.stdout.readline, b""):
                local.write(raw)
                local.flush()
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                if logs is not None and line:
                    try:
                        logs.put_log_events(group, self.log_stream, [{"timestamp": int(time.time() * 1000), "message": line}])
                    except Exception:
                        pass

    def _last_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    @property
    def log_stream_arn(self) -> str:
        group = f"/aws/sagemaker/Endpoints/{self.endpoint}"
        return f"arn:{self.backend.partition}:logs:{self.backend.region_name}:{self.backend.account_id}:log-group:{group}:log-stream:{self.log_stream}"

    def stop(self) -> None:
        self.state = "stopped"
        self._stop_process()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_process(self) -> None:
        if self.process is not None:
            stop_process(self.process.pid, self.marker, grace=10)


def _toolkit_server(model_dir: str, port_file: str) -> None:
    """The HF inference toolkit's model server as the HF PyTorch inference DLCs run an artifact with
    code/inference.py (sagemaker-huggingface-inference-toolkit, handler_service.py), cut down to what
    the emulator needs: the hooks load once, then GET /ping and POST /invocations on 127.0.0.1.

    Like the toolkit: transform_fn beside the other hooks is refused; JSON and CSV bodies are decoded to
    str; Accept */* or none means application/json; input_fn -> predict_fn -> output_fn runs one request
    at a time (one model server worker); any exception a hook raises answers 400 with its message (the
    toolkit wraps everything in PredictionException(str(e), 400)); every answer is whole: no streaming.
    Runs in its own interpreter, from this function's source alone.
    """
    import importlib.util
    import json
    import os
    import sys
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    code_dir = os.path.join(model_dir, "code")
    sys.path.insert(0, code_dir)
    spec = importlib.util.spec_from_file_location("inference", os.path.join(code_dir, "inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hooks = {name: getattr(module, name, None) for name in ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")}
    if hooks["transform_fn"] and any(hooks[name] for name in ("input_fn", "predict_fn", "output_fn")):
        raise ValueError("Cannot use transform_fn implementation in conjunction with input_fn, predict_fn, and/or output_fn implementation")
    if not hooks["model_fn"] or not (hooks["transform_fn"] or all(hooks[name] for name in ("input_fn", "predict_fn", "output_fn"))):
        raise ValueError("the emulator's toolkit stand-in needs model_fn and input_fn/predict_fn/output_fn (or transform_fn) in code/inference.py")
    started = time.monotonic()
    model = hooks["model_fn"](model_dir)
    print(f"toolkit: model_fn loaded {model_dir} in {time.monotonic() - started:.2f}s", flush=True)
    one_worker = threading.Lock()

    def transform(body, content_type: str, accept: str):
        if hooks["transform_fn"]:
            return hooks["transform_fn"](model, body, content_type, accept)
        return hooks["output_fn"](hooks["predict_fn"](hooks["input_fn"](body, content_type), model), accept)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/ping":
                self._answer(200, b"{}", "application/json")
            else:
                self._answer(404, b"", "text/plain")

        def do_POST(self) -> None:
            if self.path != "/invocations":
                return self._answer(404, b"", "text/plain")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            content_type = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
            accept = self.headers.get("Accept")
            if not accept or accept == "*/*":
                accept = "application/json"
            try:
                if content_type in ("application/json", "text/csv"):
                    body = body.decode("utf-8")
                with one_worker:
                    answer = transform(body, content_type, accept)
            except Exception as exc:
                print(f"toolkit: prediction failed: {exc}", flush=True)
                message = json.dumps({"code": 400, "type": "InternalServerException", "message": str(exc)})
                return self._answer(400, message.encode(), "application/json")
            self._answer(200, answer.encode("utf-8") if isinstance(answer, str) else bytes(answer), accept)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as fh:
        fh.write(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    print(f"toolkit: model server listening on port {server.server_address[1]}", flush=True)
    server.serve_forever()


def _ping(url: str) -> tuple[bool, str | None]:
    """(healthy, why the model failed to load for good) from the server's /ping."""
    try:
        response = httpx.get(f"{url}/ping", timeout=2.0)
    except httpx.HTTPError:
        return False, None
    if response.status_code == 200:
        return True, None
    try:
        body = response.json()
    except ValueError:
        return False, None
    if isinstance(body, dict) and body.get("status") == "failed":
        return False, str(body.get("error") or "the model failed to load")
    return False, None


# --- the SageMaker control plane ------------------------------------------------------------
class EmulatedEndpointConfig(FakeEndpointConfig):
    def validate_instance_type(self, instance_type: str) -> None:
        if instance_type not in known_instance_types():
            raise ValidationError(
                message=f"1 validation error detected: Value '{instance_type}' at 'productionVariants.1.member.instanceType' "
                f"failed to satisfy constraint: Member must satisfy enum value set: [{', '.join(sorted(known_instance_types()))}]"
            )


class EmulatedSageMakerBackend(SageMakerModelBackend):
    """moto's SageMaker backend, with real hosting, UpdateEndpoint and SageMaker's duplicate-name rules."""

    _work_dir: str | None = None

    def __init__(self, region_name: str, account_id: str):
        super().__init__(region_name, account_id)
        self.hosts: dict[str, HostedModel] = {}  # endpoint -> the host serving it
        self.pending: dict[str, HostedModel] = {}  # endpoint -> the host an update is starting
        # SageMaker checks a name or an endpoint's state and changes it in one step: two concurrent
        # CreateEndpoint (or UpdateEndpoint) calls never both succeed. moto serves requests on threads.
        self.control_lock = threading.RLock()

    @property
    def _url_module(self) -> Any:
        return SimpleNamespace(url_bases=sagemaker_urls.url_bases, url_paths={"{0}/$": EmulatedSageMakerResponse.dispatch})

    @classmethod
    def work_dir(cls) -> str:
        if cls._work_dir is None:
            cls._work_dir = tempfile.mkdtemp(prefix="cloudllm-sagemaker-emulator-")
        return cls._work_dir

    def logs(self):
        from moto.logs.models import logs_backends

        return logs_backends[self.account_id][self.region_name]

    def reset(self) -> None:
        self.stop_hosts()
        super().reset()

    def stop_hosts(self) -> None:
        for host in [*self.hosts.values(), *self.pending.values()]:
            host.stop()
        self.hosts.clear()
        self.pending.clear()

    # models and configs: SageMaker refuses an existing name (moto overwrites)
    def create_model(self, model_name: str, *args: Any, **kwargs: Any):
        with self.control_lock:
            if model_name in self._models:
                arn = arn_formatter("model", model_name, self.account_id, self.region_name)
                raise ValidationError(message=f'Cannot create already existing model "{arn}".')
            return super().create_model(model_name, *args, **kwargs)

    def create_endpoint_config(
        self, endpoint_config_name, production_variants, data_capture_config, async_inference_config, tags, kms_key_id
    ):
        with self.control_lock:
            if endpoint_config_name in self.endpoint_configs:
                arn = FakeEndpointConfig.arn_formatter(endpoint_config_name, self.account_id, self.region_name)
                raise ValidationError(message=f'Cannot create already existing endpoint configuration "{arn}".')
            config = EmulatedEndpointConfig(
                account_id=self.account_id,
                region_name=self.region_name,
                endpoint_config_name=endpoint_config_name,
                production_variants=production_variants,
                async_inference_config=async_inference_config,
                data_capture_config=data_capture_config,
                tags=tags,
                kms_key_id=kms_key_id,
            )
            self.validate_production_variants(production_variants)
            self.endpoint_configs[endpoint_config_name] = config
            return config

    def add_tags(self, arn: str, tags: list[dict[str, str]]) -> list[dict[str, str]]:
        resource = self._get_resource_from_arn(arn)
        new = {t["Key"] for t in tags}
        resource.tags = [t for t in resource.tags if t["Key"] not in new] + list(tags)  # AddTags overwrites a key
        return resource.tags

    # endpoints: Creating until the model server answers /ping
    def create_endpoint(self, endpoint_name: str, endpoint_config_name: str, tags: list[dict[str, str]]):
        with self.control_lock:
            if endpoint_name in self.endpoints:
                arn = arn_formatter("endpoint", endpoint_name, self.account_id, self.region_name)
                raise ValidationError(message=f'Cannot create already existing endpoint "{arn}".')
            endpoint = super().create_endpoint(endpoint_name, endpoint_config_name, tags)
            endpoint.endpoint_status = "Creating"
            host = HostedModel(self, endpoint_name, self.describe_endpoint_config(endpoint_config_name), self._created)
            self.hosts[endpoint_name] = host  # before it starts: a fast failure reports back at once
            host.start()
            return endpoint

    def _created(self, host: HostedModel) -> None:
        endpoint = self.endpoints.get(host.endpoint)
        if endpoint is None or self.hosts.get(host.endpoint) is not host:
            host.stop()
            return
        endpoint.last_modified_time = utcnow()
        if host.state == "ready":
            endpoint.endpoint_status = "InService"
        else:
            endpoint.endpoint_status, endpoint.failure_reason = "Failed", host.reason

    def update_endpoint(
        self,
        endpoint_name: str,
        endpoint_config_name: str,
        deployment_config: dict | None,
        retain_all_variant_properties: bool,
    ):
        with self.control_lock:
            endpoint = self.endpoints.get(endpoint_name)
            if endpoint is None:
                arn = arn_formatter("endpoint", endpoint_name, self.account_id, self.region_name)
                raise ValidationError(message=f"Could not find endpoint \"{arn}\".")
            if endpoint.endpoint_status != "InService":
                raise ValidationError(message=f"Cannot update in-progress endpoint \"{endpoint.arn}\".")
            config = self.describe_endpoint_config(endpoint_config_name)
            old_variants = {v["VariantName"] for v in endpoint.production_variants}
            new_variants = {v["VariantName"] for v in config["ProductionVariants"]}
            if deployment_config and old_variants != new_variants:
                raise ValidationError(message="A blue/green update needs the same production variant names in the new endpoint configuration.")
            endpoint.endpoint_status = "Updating"
            endpoint.failure_reason = None
            endpoint.last_modified_time = utcnow()
            endpoint.last_deployment_config = deployment_config
            endpoint.pending_deployment_summary = {"EndpointConfigName": endpoint_config_name, "StartTime": utcnow()}
            endpoint.retain_variant_properties = retain_all_variant_properties
            host = HostedModel(self, endpoint_name, config, self._updated)
            self.pending[endpoint_name] = host
            host.start()
            return endpoint

    def _updated(self, host: HostedModel) -> None:
        endpoint = self.endpoints.get(host.endpoint)
        if endpoint is None or self.pending.get(host.endpoint) is not host:
            host.stop()
            return
        del self.pending[host.endpoint]
        endpoint.pending_deployment_summary = None
        endpoint.last_modified_time = utcnow()
        if host.state != "ready":
            # Blue/green: the old fleet keeps serving; the endpoint is back InService on its old config.
            endpoint.endpoint_status, endpoint.failure_reason = "InService", host.reason
            host.stop()
            return
        config = self.describe_endpoint_config(host.config_name)
        counts = {v["VariantName"]: v for v in endpoint.production_variants}
        endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
        if getattr(endpoint, "retain_variant_properties", False):
            for variant in endpoint.production_variants:
                old = counts.get(variant["VariantName"], {})
                for key in ("CurrentInstanceCount", "DesiredInstanceCount", "CurrentWeight", "DesiredWeight"):
                    if key in old:
                        variant[key] = old[key]
        endpoint.endpoint_config_name = host.config_name
        old_host = self.hosts.get(host.endpoint)
        self.hosts[host.endpoint] = host
        endpoint.endpoint_status = "InService"
        if old_host is not None:
            old_host.stop()

    def delete_endpoint(self, endpoint_name: str) -> None:
        super().delete_endpoint(endpoint_name)
        for hosts in (self.hosts, self.pending):
            host = hosts.pop(endpoint_name, None)
            if host is not None:
                host.stop()

    def live_host(self, endpoint_name: str) -> HostedModel:
        """The host serving an endpoint's traffic, or SageMaker Runtime's not-found error."""
        endpoint = self.endpoints.get(endpoint_name)
        host = self.hosts.get(endpoint_name)
        if endpoint is None or host is None or host.state != "ready" or endpoint.endpoint_status not in ("InService", "Updating"):
            raise RuntimeValidationError(f"Endpoint {endpoint_name} of account {self.account_id} not found.")
        return host


class EmulatedSageMakerResponse(SageMakerResponse):
    def create_model(self):
        result = super().create_model()
        model = self.sagemaker_backend.describe_model(self._get_param("ModelName"))
        model.enable_network_isolation = bool(self._get_param("EnableNetworkIsolation"))  # moto drops it
        return result

    def update_endpoint(self):
        from moto.core.responses import ActionResult

        endpoint = self.sagemaker_backend.update_endpoint(
            endpoint_name=self._get_param("EndpointName"),
            endpoint_config_name=self._get_param("EndpointConfigName"),
            deployment_config=self._get_param("DeploymentConfig"),
            retain_all_variant_properties=bool(self._get_param("RetainAllVariantProperties")),
        )
        return ActionResult({"EndpointArn": endpoint.arn})


# --- SageMaker Runtime ----------------------------------------------------------------------
class RuntimeValidationError(ServiceException):
    code = "ValidationError"


class ModelError(ServiceException):
    """The container answered 4xx/5xx (or not at all): SageMaker's 424 with the original status and message."""

    code = "ModelError"

    def __init__(self, host: HostedModel, status: int, message: str):
        super().__init__(
            f"Received {'client' if 400 <= status < 500 else 'server'} error ({status}) from primary with message "
            f'"{message}". See {host.log_stream_arn} in account {host.backend.account_id} for more information.'
        )
        self.OriginalStatusCode = status
        self.OriginalMessage = message
        self.LogStreamArn = host.log_stream_arn


class EmulatedRuntimeBackend(SageMakerRuntimeBackend):
    response_class: Any = None  # the response class moto dispatches to (None: EmulatedRuntimeResponse, below)

    @property
    def _url_module(self) -> Any:
        dispatch = (self.response_class or EmulatedRuntimeResponse).dispatch
        return SimpleNamespace(
            url_bases=runtime_urls.url_bases,
            url_paths={
                "{0}/endpoints/(?P<name>[^/]+)/async-invocations$": dispatch,
                "{0}/endpoints/(?P<name>[^/]+)/invocations$": dispatch,
                "{0}/endpoints/(?P<name>[^/]+)/invocations-response-stream$": dispatch,
            },
        )


class EmulatedRuntimeResponse(SageMakerRuntimeResponse):
    """InvokeEndpoint(WithResponseStream) answered by the endpoint's model server."""

    def _host(self) -> HostedModel:
        name = self.path.split("/")[2]
        return sagemaker_backends[self.current_account][self.region].live_host(name)

    def _forward_headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.headers.get("Content-Type") or "application/json"}
        accept = self.headers.get("Accept") or self.headers.get("X-Amzn-SageMaker-Accept")
        if accept:
            headers["Accept"] = accept
        return headers

    def invoke_endpoint(self):
        host = self._host()
        try:
            response = httpx.post(f"{host.url}/invocations", content=host.engine_body(self.body), headers=self._forward_headers(), timeout=INVOKE_TIMEOUT)
        except httpx.TimeoutException:
            raise ModelError(host, 408, "Your invocation timed out while waiting for a response from container primary.") from None
        except httpx.HTTPError as exc:
            raise ModelError(host, 500, f"the container did not answer: {exc}") from None
        if response.status_code >= 400:
            raise ModelError(host, response.status_code, response.text)
        headers = {
            "Content-Type": response.headers.get("content-type", "application/json"),
            "x-Amzn-Invoked-Production-Variant": host.variant["VariantName"],
        }
        return 200, headers, response.content

    def invoke_endpoint_with_response_stream(self):
        from moto.core.eventstream import EventStreamEncoder

        host = self._host()
        client = httpx.Client(timeout=httpx.Timeout(INVOKE_TIMEOUT, connect=5.0))
        try:
            upstream = client.send(client.build_request("POST", f"{host.url}/invocations", content=host.engine_body(self.body), headers=self._forward_headers()), stream=True)
        except httpx.HTTPError as exc:
            client.close()
            raise ModelError(host, 500, f"the container did not answer: {exc}") from None
        if upstream.status_code >= 400:
            text = upstream.read().decode("utf-8", errors="replace")
            upstream.close()
            client.close()
            raise ModelError(host, upstream.status_code, text)
        encoder = EventStreamEncoder()

        def events() -> Iterator[bytes]:
            try:
                for chunk in upstream.iter_raw():
                    # SageMaker's parts do not follow line boundaries: split every chunk, so a
                    # client that assumes whole lines fails here as it would there.
                    middle = len(chunk) // 2
                    for part in (chunk[:middle], chunk[middle:]):
                        if part:
                            yield encoder.encode_message(
                                {":event-type": "PayloadPart", ":content-type": "application/octet-stream", ":message-type": "event"},
                                part,
                            )
            except httpx.HTTPError as exc:
                yield encoder.encode_message(
                    {":exception-type": "ModelStreamError", ":content-type": "application/json", ":message-type": "exception"},
                    json.dumps({"Message": f"the stream from the container broke: {exc}", "ErrorCode": "StreamBroken"}).encode(),
                )
            finally:
                upstream.close()
                client.close()

        headers = {
            "Content-Type": CONTENT_TYPE_EVENTSTREAM,
            "X-Amzn-SageMaker-Content-Type": upstream.headers.get("content-type", "text/event-stream"),
            "x-Amzn-Invoked-Production-Variant": host.variant["VariantName"],
        }
        return 200, headers, events()


# --- the server ------------------------------------------------------------------------------
