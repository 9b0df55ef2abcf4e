"""The Vertex AI provider: artifacts on GCS, a Model in the registry, an Endpoint serving it.

    deploy:  upload gs://BUCKET/PREFIX/<name>/<version>/  ->  UploadModel  ->  CreateEndpoint  ->  DeployModel
    update:  upload the new version  ->  UploadModel(parent_model=...)  ->  DeployModel beside the old one,
             without traffic  ->  all traffic to it, or canary: PCT% to it, bake (--option
             rollout_wait=SECONDS, default 300), check that it answers sample requests, then
             the rest (a failing canary moves the traffic back and undeploys it)  ->  UndeployModel the old one
    delete:  UndeployModel each  ->  DeleteModel  ->  DeleteEndpoint  [->  delete the artifacts]

Runtimes: `tgi` (Hugging Face TGI DLC; it copies AIP_STORAGE_URI itself; NUM_SHARD = the
GPUs the model's attention heads split over), `vllm` (the Vertex Model Garden vLLM image,
`--model=gs://...`, tensor parallel over as many GPUs) and `handler` (the generated server in
the HF PyTorch inference DLC: a short bootstrap copies the artifact, then runs code/serve.py).
Images come from cloudllm/catalog/vertex_images.py; `--image` overrides them.

Streaming (streamRawPredict, which Vertex forwards to the container's predict route as is):
the handler answers TGI's server-sent events; the Model Garden vLLM server takes
{"instances": [{"prompt", "stream": true, ...}]} and answers NUL-separated JSON objects
{"predictions": [text]}; TGI's Vertex route (AIP_PREDICT_ROUTE) only answers whole
predictions, so `--stream` is refused for tgi endpoints.

Every long-running operation is waited on with our own deadline (--timeout, or sized from
the model's bytes), never google-api-core's 900 s default, polling less often as it goes.
When that deadline passes the operation goes on in Vertex AI, which refuses to delete what
an operation is still changing: nothing is cleaned up, and the error says how to follow it
and how to remove it afterwards.
The plan's digests are stored as labels on each model version (base32, so a sha256 fits a
label value) and read back by get(), which is how an unchanged deploy is a no-op.

Credentials are Application Default Credentials; the project comes from --project,
GOOGLE_CLOUD_PROJECT or ADC, the region from --region (default us-central1).

Environment:
    CLOUDLLM_VERTEX_ENDPOINT  Base URL of the Vertex AI API, e.g. http://127.0.0.1:8090 for
                              `cloudllm emulate vertex`. When set, every Vertex call (REST) and
                              streamRawPredict go there with anonymous credentials.
    STORAGE_EMULATOR_HOST     google-cloud-storage's own variable: artifacts go to that emulator.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import re
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import quote

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.retries import RETRY_SECONDS_ENV, retry_seconds
from cloudllm.providers.base import Endpoint, Feature, Provider, ResourceChange

if TYPE_CHECKING:
    from cloudllm.plan import Plan
    from cloudllm.storage.gcs import GcsUri

API_ENDPOINT_ENV = "CLOUDLLM_VERTEX_ENDPOINT"
DEFAULT_REGION = "us-central1"
MANAGED_BY = ("managed-by", "cloudllm")
NAME_LABEL = "cloudllm-name"
LOCK_LABEL = "cloudllm-lock"  # "<run token>-<unix time>" while a deploy updates the endpoint
LOCK_STALE_SECONDS = 4 * 3600  # longer than any deploy's deadline: a lock this old is a killed deploy's
RUN_LABEL = "cloudllm-run"  # one deploy run's random token: finds what a create whose answer was lost made
RETRY_INITIAL, RETRY_MAX = 0.5, 30.0  # seconds: capped exponential backoff, jittered
RUNTIME_LABEL = "cloudllm-runtime"
SYSTEM_LABELS = (MANAGED_BY[0], NAME_LABEL, RUN_LABEL)  # the endpoint labels that are ours, not the spec's tags
# plan.fingerprint key -> label key; values are base32 sha256 (52 chars, label-safe).
DIGEST_LABELS = {
    "weights_digest": "cloudllm-weights",
    "code_digest": "cloudllm-code",
    "deploy_digest": "cloudllm-deploy",
    "scaling_digest": "cloudllm-scaling",
    "digest": "cloudllm-digest",
}
SCALE_METRICS = {
    "cpu": "aiplatform.googleapis.com/prediction/online/cpu/utilization",
    "gpu-duty-cycle": "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle",
    "requests": "aiplatform.googleapis.com/prediction/online/request_count",
}
DEFAULT_SCALE_TARGET = 60
DEFAULT_ROLLOUT_WAIT = 300  # seconds a canary bakes before the rest of the traffic moves (SageMaker's default too)
MAX_ROLLOUT_WAIT = 3600
CANARY_SAMPLES_MAX = 200  # sample requests a canary check sends at most, looking for one the new version serves
# TGI-form generation parameters -> the Model Garden vLLM server's (vllm SamplingParams keyword arguments).
VLLM_PARAMETERS = {
    "max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
    "repetition_penalty": "repetition_penalty", "stop": "stop", "stop_sequences": "stop",
}  # fmt: skip
SERVING_PORT = 8080
PREDICT_ROUTE = "/predict"
HEALTH_ROUTE = "/health"
MAX_DEPLOYMENT_TIMEOUT = 7200  # Vertex's limit for container_spec.deployment_timeout
PROVISIONING_ALLOWANCE = 1800  # getting GPU machines can take longer than loading the model
# The model types TGI serves with its own kernels (text-generation-inference supported_models).
TGI_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "qwen2", "qwen2_moe", "qwen3", "phi", "phi3",
    "gpt2", "gpt_neox", "gpt_bigcode", "falcon", "starcoder2", "mpt", "bloom", "opt", "olmo", "cohere", "dbrx",
    "deepseek_v2", "deepseek_v3", "granite",
}  # fmt: skip

# Runs in the handler's container (python3 + google-cloud-storage, as the HF inference DLCs
# have): copy AIP_STORAGE_URI into a fresh folder, then become the generated server.
HANDLER_BOOTSTRAP = """\
import os, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
from google.cloud import storage
bucket, _, prefix = os.environ["AIP_STORAGE_URI"][len("gs://"):].partition("/")
prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
dest = tempfile.mkdtemp(prefix="cloudllm-artifact-")
client = storage.Client()
blobs = [b for b in client.list_blobs(bucket, prefix=prefix) if not b.name.endswith("/")]
def fetch(blob):
    path = os.path.abspath(os.path.join(dest, blob.name[len(prefix):]))
    if not path.startswith(dest + os.sep):
        return  # an object name with ".." must not write outside the artifact folder
    os.makedirs(os.path.dirname(path), exist_ok=True)
    blob.download_to_filename(path)
with ThreadPoolExecutor(8) as pool:
    list(pool.map(fetch, blobs))
print(f"cloudllm: copied {len(blobs)} files from {os.environ['AIP_STORAGE_URI']} to {dest}", flush=True)
os.chdir(dest)
host = os.environ.get("CLOUDLLM_SERVE_HOST", "0.0.0.0")
port = os.environ.get("AIP_HTTP_PORT", "8080")
os.execv(sys.executable, [sys.executable, os.path.join(dest, "code", "serve.py"), "serve", "--host", host, "--port", port])
"""


class VertexProvider(Provider):
    name = "vertex"
    unsupported = {
        Feature.SCALE_TO_ZERO: "Vertex AI's scale to zero is a v1beta1 preview; use min_instances 1",
    }
    default_instance = "g2-standard-8"

    def __init__(self, region: str | None = None, options: dict[str, Any] | None = None):
        super().__init__(region or DEFAULT_REGION, options)
        self._clients: _Clients | None = None

    # --- settings -------------------------------------------------------------------------
    @property
    def project(self) -> str:
        """--project, GOOGLE_CLOUD_PROJECT, or the project of Application Default Credentials."""
        project = self.options.get("project") or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
        if not project and not os.environ.get(API_ENDPOINT_ENV):
            try:
                import google.auth

                _, project = google.auth.default()
            except Exception:  # no ADC at all: the error below says what to do
                project = None
        if not project:
            raise UserError("no Google Cloud project given", "pass --project PROJECT or set GOOGLE_CLOUD_PROJECT")
        self.options["project"] = project  # kept in the endpoint record, so invoke/delete need no flag
        return project

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    @property
    def api_base(self) -> str:
        return os.environ.get(API_ENDPOINT_ENV, "").rstrip("/") or f"https://{self.region}-aiplatform.googleapis.com"

    def clients(self) -> "_Clients":
        if self._clients is None:
            self._clients = _Clients.create(self.region, os.environ.get(API_ENDPOINT_ENV))
        return self._clients

    def default_runtime(self, spec, model) -> str:
        from cloudllm.catalog import lookup

        machine = lookup("vertex", spec.instance or self.default_instance)
        gpu = bool(spec.accelerator) or bool(machine and machine.gpu_count)
        return "tgi" if gpu and model.task == "text-generation" and model.model_type in TGI_MODEL_TYPES else "handler"

    # --- checks ---------------------------------------------------------------------------
    def validate(self, plan: "Plan") -> None:
        """Offline checks: machine and accelerator, scaling, rollout, labels, key and bucket names, image."""
        from cloudllm.storage.gcs import GcsUri

        spec = plan.spec
        machine = _machine(plan, self.default_instance)
        if plan.runtime in ("tgi", "vllm") and not machine.gpu_count:
            raise UserError(
                f"the {plan.runtime} runtime needs a GPU and {machine.label} has none",
                "pick a GPU machine (e.g. --instance g2-standard-8) or --runtime handler",
            )
        _scale_metric(spec, machine)
        if spec.rollout.startswith("linear"):
            raise UserError("Vertex AI moves traffic in one step or a canary", "use --rollout all-at-once or --rollout canary:PCT")
        _rollout_wait(plan)
        if spec.scale_in_cooldown is not None or spec.scale_out_cooldown is not None:
            raise UserError("Vertex AI chooses its own scaling cooldowns", "drop --scale-in-cooldown/--scale-out-cooldown")
        for key, value in spec.tags.items():
            if not _label_ok(key) or not _label_ok(value) or not key[:1].isalpha():
                raise UserError(
                    f"tag {key}={value} is not a valid Vertex label",
                    "use lowercase letters, digits, '-' and '_' (at most 63), keys starting with a letter",
                )
        kms = self.options.get("kms_key")
        key = re.fullmatch(r"projects/[^/]+/locations/([^/]+)/keyRings/[^/]+/cryptoKeys/[^/]+", kms) if kms else None
        if kms and not key:
            raise UserError(
                f"--kms-key {kms!r} is not a Cloud KMS key name",
                "write it as projects/P/locations/REGION/keyRings/RING/cryptoKeys/KEY (in the endpoint's region)",
            )
        if key and key.group(1) != self.region:
            raise UserError(
                f"--kms-key is in {key.group(1)}, and Vertex AI encrypts resources in {self.region} only with a key there",
                f"use a key of projects/P/locations/{self.region}/keyRings/..., or deploy with --region {key.group(1)}",
            )
        if spec.bucket:  # required by preflight: `cloudllm plan` needs no account, so no bucket either
            GcsUri.parse(spec.bucket)
        _check_quantized_image(plan)

    def preflight(self, plan: "Plan") -> None:
        """Checks against the account: a project, credentials, and a bucket we may list and write."""
        from cloudllm.storage.gcs import GcsArtifacts, GcsUri

        if not plan.spec.bucket:
            raise UserError("the vertex provider needs a bucket for the artifacts", "pass --bucket gs://BUCKET/PREFIX")
        GcsArtifacts(project=self.project).check_bucket(GcsUri.parse(plan.spec.bucket))

    def describe_changes(self, plan: "Plan") -> list[ResourceChange]:
        name = plan.spec.name
        if plan.action == "unchanged":
            return [ResourceChange(resource="endpoint", name=name, action="unchanged")]
        version = _version_prefix(plan) if plan.spec.bucket else "gs://BUCKET/..."
        changes = [ResourceChange(resource="artifacts", name=str(version), action="create", reason="only files not already in GCS are uploaded")]
        if plan.action == "create":
            changes += [
                ResourceChange(resource="model", name=name, action="create"),
                ResourceChange(resource="endpoint", name=name, action="create"),
                ResourceChange(resource="deployed-model", name=name, action="create", reason=_resources_line(plan)),
            ]
        elif plan.rescale_only:
            return [ResourceChange(resource="deployed-model", name=name, action="update", reason=f"autoscaling only, in place: {_resources_line(plan)}")]
        else:
            changes += [
                ResourceChange(resource="model-version", name=name, action="create", reason="; ".join(plan.reasons)),
                ResourceChange(resource="deployed-model", name=name, action="replace", reason=f"{_rollout_line(plan)}; {_resources_line(plan)}"),
            ]
        return changes

    # --- deploy / update ------------------------------------------------------------------
    def deploy(self, plan: "Plan", reporter: Reporter) -> Endpoint:
        created = _Created()
        with self._undone_on_failure(created, plan, reporter):
            artifact_uri = self._upload(plan, reporter, created)
            model, version = self._upload_model(plan, artifact_uri, None, reporter)
            created.model = model
            endpoint = self._create_endpoint(plan, reporter)
            created.endpoint = endpoint
            if self._find_endpoint(plan.spec.name).name != endpoint:
                # Another deploy created an endpoint of this name at the same time; the older one stays.
                raise DeployFailed(
                    f"endpoint {plan.spec.name} was created by another deploy while this one ran",
                    "run the same deploy again: it will update that endpoint",
                )
            self._deploy_model(plan, endpoint, f"{model}@{version}", {"0": 100}, reporter)
        if not plan.wait:
            reporter.step(f"deploying on {endpoint}; follow it with `cloudllm status {plan.spec.name}`")
            return _pending(plan, endpoint, self.api_base)
        return self._endpoint_or_fail(plan.spec.name)

    def update(self, plan: "Plan", existing: Endpoint, reporter: Reporter) -> Endpoint:
        if not plan.wait:
            raise UserError(
                "a Vertex AI update cannot return early: the old deployed model is undeployed once the new one serves",
                "deploy without --no-wait",
            )
        with self._changing(existing.details["endpoint"], plan):
            return self._update(plan, existing, reporter)

    @contextmanager
    def _changing(self, endpoint_name: str, plan: "Plan") -> Iterator[None]:
        """Hold the endpoint's lock label while updating it: one deploy at a time, across machines.

        The label is set with the endpoint's etag (Vertex's read-modify-write guard), so of two
        deploys that read the endpoint at once only one sets it; the other stops, clearly, before
        creating anything. A lock older than LOCK_STALE_SECONDS, or --force, is taken over.
        Releasing it after a successful update also sets the endpoint's labels to the plan's tags.
        """
        from google.api_core import exceptions
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        c = self.clients()
        name = plan.spec.name
        token = f"{self._run_token()}-{int(time.time())}"
        busy = DeployFailed(
            f"endpoint {name} is being changed by another deploy",
            "wait for it to finish, then deploy again (if none is running because one was killed, deploy again with --force)",
        )
        current = c.endpoints.get_endpoint(name=endpoint_name)
        held = current.labels.get(LOCK_LABEL, "")
        if held and not plan.spec.options.get("force") and time.time() - _lock_time(held) < LOCK_STALE_SECONDS:
            raise busy
        mask = field_mask_pb2.FieldMask(paths=["labels"])
        try:
            c.endpoints.update_endpoint(
                endpoint=v1.Endpoint(name=endpoint_name, labels={**current.labels, LOCK_LABEL: token}, etag=current.etag),
                update_mask=mask,
                retry=_retry(),
            )
        except (exceptions.Aborted, exceptions.FailedPrecondition, exceptions.Conflict):
            # Someone changed the endpoint since we read it -- or our own retried write did.
            if c.endpoints.get_endpoint(name=endpoint_name).labels.get(LOCK_LABEL) != token:
                raise busy from None
        updated = False
        try:
            yield
            updated = True
        finally:
            try:
                now = c.endpoints.get_endpoint(name=endpoint_name)
                if now.labels.get(LOCK_LABEL) == token:
                    labels = {k: v for k, v in now.labels.items() if k != LOCK_LABEL}
                    if updated:  # the tags as the plan declares them (apply --prune finds its endpoints by them)
                        labels = {**{k: v for k, v in labels.items() if k in SYSTEM_LABELS}, **plan.spec.tags}
                    c.endpoints.update_endpoint(endpoint=v1.Endpoint(name=endpoint_name, labels=labels, etag=now.etag), update_mask=mask, retry=_retry())
            except exceptions.GoogleAPICallError:
                pass  # the lock goes stale; --force takes it over

    def _update(self, plan: "Plan", existing: Endpoint, reporter: Reporter) -> Endpoint:
        name = plan.spec.name
        endpoint_name = existing.details["endpoint"]
        endpoint = self.clients().endpoints.get_endpoint(name=endpoint_name)
        if plan.rescale_only:
            return self._rescale(plan, endpoint, reporter)
        old = list(endpoint.deployed_models)
        main = _main_deployment(endpoint)
        before = dict(endpoint.traffic_split)
        kind, _, pct = plan.spec.rollout.partition(":")
        created = _Created(update=True)
        with self._undone_on_failure(created, plan, reporter):
            ready = self._deployed_version(endpoint, existing, plan.digest)
            if ready is not None:
                new_id = ready.id
                reporter.step(f"the new version is already deployed ({new_id}); an earlier deploy stopped before it finished")
            else:
                parent_model = main.model if main else existing.details.get("model")
                artifact_uri = self._upload(plan, reporter, created)
                model, version = self._upload_model(plan, artifact_uri, parent_model, reporter)
                created.model, created.version = model, (version if parent_model else None)
                # Beside the old version, without traffic: until we move it, the old one serves everything,
                # also when this deploy stops (a timeout, Ctrl-C) while Vertex AI goes on deploying.
                first = {"0": 0, **before} if before else {"0": 100}
                new_id = self._deploy_model(plan, endpoint_name, f"{model}@{version}", first, reporter)
            created.deployed, created.on_endpoint, created.traffic_before = new_id, endpoint_name, before
            if kind == "canary" and main is not None and main.id != new_id and before.get(main.id):
                self._canary(plan, endpoint_name, new_id, main.id, int(pct), reporter)
            if before != {new_id: 100}:
                self._set_traffic(endpoint_name, {new_id: 100})
                reporter.step(f"all traffic on the new version ({new_id})")
        try:
            for deployed in old:
                if deployed.id != new_id:
                    self._undeploy(endpoint_name, deployed.id, plan, reporter)
        except BaseException as exc:
            raise _deploy_error(exc, name, after="the new version serves all the traffic, but undeploying the old one failed") from None
        return self._endpoint_or_fail(name)

    def _rescale(self, plan: "Plan", endpoint, reporter: Reporter) -> Endpoint:
        """Only autoscaling changed: MutateDeployedModel on the serving copy; no new model version or DeployModel.

        Replica counts and autoscaling metrics are the fields Vertex AI changes in place. The model
        version's digest labels move to this plan last, so a run stopped before that finds the old
        digests and mutates again (the same values: nothing more changes).
        """
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        c = self.clients()
        main = _main_deployment(endpoint)
        reporter.step(f"only the autoscaling of {plan.spec.name} changed: changing it in place on {main.id}, no new copy")
        mask = field_mask_pb2.FieldMask(paths=[f"dedicated_resources.{f}" for f in ("min_replica_count", "max_replica_count", "autoscaling_metric_specs")])
        version = f"{main.model}@{main.model_version_id}"
        try:
            op = c.endpoints.mutate_deployed_model(
                endpoint=endpoint.name, deployed_model=v1.DeployedModel(id=main.id, dedicated_resources=self._resources(plan)),
                update_mask=mask, retry=_retry(),  # setting the same values twice is harmless
            )  # fmt: skip
            self._wait(op, f"scaling to {_resources_line(plan)}", _deploy_deadline(plan), reporter)  # new replicas load the model
            labels = {**c.models.get_model(name=version, retry=_retry()).labels, **self._digest_labels(plan)}
            c.models.update_model(model=v1.Model(name=version, labels=labels), update_mask=field_mask_pb2.FieldMask(paths=["labels"]), retry=_retry())
        except _StillRunning as exc:
            exc.fix = "the old version keeps serving; once the operation has ended, deploy again to finish, or give the deploy a longer --timeout"
            exc.args = (exc.line(),)
            raise
        except Exception as exc:
            raise _deploy_error(exc, plan.spec.name) from None
        reporter.step(f"{plan.spec.name}: {_resources_line(plan)}")
        return self._endpoint_or_fail(plan.spec.name)

    def _deployed_version(self, endpoint, existing: Endpoint, digest: str):
        """The deployed model on the endpoint that serves exactly this plan (an earlier run deployed it), or None."""
        main = _main_deployment(endpoint)
        for deployed in endpoint.deployed_models:
            if main is not None and deployed.id == main.id:
                found = existing.details.get("digest")
            else:
                labels = self.clients().models.get_model(name=f"{deployed.model}@{deployed.model_version_id}").labels
                found = decode_digest(labels[DIGEST_LABELS["digest"]]) if DIGEST_LABELS["digest"] in labels else None
            if found == digest:
                return deployed
        return None

    def _canary(self, plan: "Plan", endpoint: str, new_id: str, old_id: str, pct: int, reporter: Reporter) -> None:
        """PCT% of the traffic on the new version, a bake period, then sample requests it must answer; DeployFailed if not."""
        self._set_traffic(endpoint, {new_id: pct, old_id: 100 - pct})
        wait = _rollout_wait(plan)
        reporter.step(f"canary: {pct}% of the traffic on the new version ({new_id}), {100 - pct}% on {old_id}; baking {wait}s")
        if wait:
            start = time.monotonic()
            with reporter.waiting(f"canary: {pct}% on the new version") as update:
                while (left := wait - (time.monotonic() - start)) > 0:
                    update(f"{left:.0f}s left")
                    time.sleep(min(5.0, left))
        problem = self._canary_problem(plan, endpoint, new_id, pct)
        if problem:
            raise DeployFailed(
                f"the canary of {plan.spec.name} failed: {problem}",
                f"the traffic goes back to {old_id} and the new version is removed; see its log in Cloud Logging "
                f"(`cloudllm logs {plan.spec.name}`), fix it and deploy again",
            )
        reporter.step("canary: the new version answered; moving the rest of the traffic to it")

    def _canary_problem(self, plan: "Plan", endpoint: str, new_id: str, pct: int) -> str | None:
        """Why the new deployed model fails its check, or None: sample requests until one it serves succeeds.

        Vertex AI cannot address one deployed model, so the requests go to the endpoint, which
        gives the new version PCT% of them. A server error fails the check; an answer of 4xx (the
        sample does not fit this model's task) shows a server that answers, so it passes.
        """
        from google.api_core import exceptions, retry

        kwargs = _predict_kwargs(endpoint, vertex_request(_sample_body(plan), plan.runtime))
        throttled = retry.Retry(
            predicate=retry.if_exception_type(exceptions.TooManyRequests), initial=RETRY_INITIAL, maximum=5.0, timeout=20.0
        )
        attempts = min(CANARY_SAMPLES_MAX, math.ceil(100 / pct) * 5)
        elsewhere = 0
        for _ in range(attempts):
            try:
                response = self.clients().predictions.predict(**kwargs, retry=throttled)
            except (exceptions.InvalidArgument, exceptions.BadRequest):
                continue
            except (exceptions.GoogleAPICallError, exceptions.RetryError) as exc:
                return f"a sample request failed: {_message(exc, 300)}"
            if response.deployed_model_id == new_id:
                return None
            elsewhere += 1
        if elsewhere:
            return f"none of {attempts} sample requests reached the new version ({elsewhere} went to the old one)"
        return None

    @contextmanager
    def _undone_on_failure(self, created: "_Created", plan: "Plan", reporter: Reporter) -> Iterator[None]:
        """On any failure (Ctrl-C included) remove what this deploy created, then raise one line.

        Except when our deadline passed while a Vertex AI operation still runs: Vertex refuses to
        delete what an operation is changing (and the artifacts are what it is copying), so
        everything is left as it is and the error says how to follow it and remove it later.
        """
        try:
            yield
        except _StillRunning as exc:
            exc.fix = self._still_running_advice(plan, created)
            exc.args = (exc.line(),)
            raise
        except BaseException as exc:
            self._clean_up(created, reporter)
            raise _with_leftovers(_deploy_error(exc, plan.spec.name), created) from None

    def _still_running_advice(self, plan: "Plan", created: "_Created") -> str:
        name = plan.spec.name
        where = f" --provider vertex --region {self.region} --project {self.project}"
        if created.update:
            return (
                "nothing was removed and the old version keeps all the traffic; once the operation has ended, "
                f"deploy again to move the traffic to the new version (`cloudllm status {name}{where}` shows the endpoint), "
                "or give the deploy a longer --timeout"
            )
        return (
            f"nothing was removed; `cloudllm status {name}{where}` shows when it serves, and once the operation has ended "
            f"`cloudllm delete {name}{where} --purge-artifacts` removes it all; or give the deploy a longer --timeout"
        )

    def _upload(self, plan: "Plan", reporter: Reporter, created: "_Created") -> str:
        from cloudllm.storage.gcs import GcsArtifacts, GcsUri

        store = GcsArtifacts(project=self.project)
        dest = _version_prefix(plan)
        created.store, created.artifacts = store, dest
        result = store.upload(
            plan.bundle, dest, reporter, reuse_from=GcsUri.parse(plan.spec.bucket).child(plan.spec.name), kms_key=self.options.get("kms_key")
        )
        if result.kept:
            created.artifacts = None  # an earlier run made this version: not ours to remove
        reporter.step(result.summary())
        return str(dest)

    def _upload_model(self, plan: "Plan", artifact_uri: str, parent_model: str | None, reporter: Reporter) -> tuple[str, str]:
        from google.cloud import aiplatform_v1 as v1

        model = v1.Model(
            display_name=plan.spec.name,
            description=f"{plan.model.architecture or plan.model.model_type} from {os.path.basename(plan.model.path)}, served by cloudllm ({plan.runtime})",
            artifact_uri=artifact_uri,
            container_spec=self._container_spec(plan, artifact_uri),
            labels=self._labels(plan, digests=True),
        )
        kms = self.options.get("kms_key")
        if kms:
            model.encryption_spec = v1.EncryptionSpec(kms_key_name=kms)
        earlier = self._version_of_this_plan(plan, artifact_uri, parent_model)
        if earlier is not None:  # a deploy of this same plan was killed after registering it
            reporter.step(f"model {earlier[0]} version {earlier[1]}, registered by an earlier deploy of this version")
            return earlier
        request = v1.UploadModelRequest(parent=self.parent, model=model, parent_model=parent_model or "")
        sent = _send_once(
            lambda: self.clients().models.upload_model(request=request),
            find=lambda: self._model_of_this_run(plan.spec.name, model.labels[RUN_LABEL]),
        )
        if isinstance(sent, tuple):  # an earlier attempt registered it; only its answer was lost
            model_name, version = sent
        else:
            response = self._wait(sent, f"registering the model{' version' if parent_model else ''}", _short_deadline(plan), reporter)
            model_name, version = response.model, response.model_version_id
        reporter.step(f"model {model_name} version {version} ({plan.runtime}, {model.container_spec.image_uri})")
        return model_name, version

    def _create_endpoint(self, plan: "Plan", reporter: Reporter) -> str:
        from google.cloud import aiplatform_v1 as v1

        endpoint = v1.Endpoint(display_name=plan.spec.name, labels=self._labels(plan, digests=False))
        kms = self.options.get("kms_key")
        if kms:
            endpoint.encryption_spec = v1.EncryptionSpec(kms_key_name=kms)
        sent = _send_once(
            lambda: self.clients().endpoints.create_endpoint(parent=self.parent, endpoint=endpoint),
            find=lambda: self._endpoint_of_this_run(plan.spec.name, endpoint.labels[RUN_LABEL]),
        )
        created = sent if isinstance(sent, str) else self._wait(sent, "creating the endpoint", _short_deadline(plan), reporter).name
        reporter.step(f"endpoint {created}")
        return created

    def _deploy_model(self, plan: "Plan", endpoint: str, model: str, split: dict[str, int], reporter: Reporter) -> str:
        from google.cloud import aiplatform_v1 as v1

        from google.api_core import exceptions

        # Our own DeployedModel id, the same for every deploy of this plan to this endpoint: a DeployModel
        # retried after its answer was lost, or sent again by a re-run of a deploy killed while Vertex AI
        # went on deploying, meets ALREADY_EXISTS, and waits for the one under way instead of adding another.
        deployed = v1.DeployedModel(
            id=deployed_model_id(plan.spec.name, plan.digest), model=model, display_name=plan.spec.name, dedicated_resources=self._resources(plan)
        )
        what = f"deploying on {_resources_line(plan)}"
        fix = "see the model server's log in Cloud Logging (linked from the endpoint in the Vertex AI console), then deploy again"
        try:
            op = _send_once(lambda: self.clients().endpoints.deploy_model(endpoint=endpoint, deployed_model=deployed, traffic_split=split), find=None)
        except exceptions.Conflict:  # 409 ALREADY_EXISTS: our id, so our earlier attempt is deploying it
            if not plan.wait:
                return ""
            self._wait_listed(endpoint, deployed.id, what, _deploy_deadline(plan), reporter)
        else:
            if not plan.wait:
                return ""
            self._wait(op, what, _deploy_deadline(plan), reporter, fix=fix)
        reporter.step(f"deployed model {deployed.id} serving")
        return deployed.id

    def _set_traffic(self, endpoint: str, split: dict[str, int]) -> None:
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        self.clients().endpoints.update_endpoint(
            endpoint=v1.Endpoint(name=endpoint, traffic_split=split),
            update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
            retry=_retry(),  # setting a traffic split twice is the same as once
        )

    def _undeploy(self, endpoint: str, deployed_model_id: str, plan, reporter: Reporter, split: dict | None = None) -> None:
        op = _unless_gone(self.clients().endpoints.undeploy_model, endpoint=endpoint, deployed_model_id=deployed_model_id, traffic_split=split or {})
        if op is not None:
            self._wait(op, f"undeploying {deployed_model_id}", _short_deadline(plan), reporter)
        reporter.step(f"undeployed {deployed_model_id}")

    def _container_spec(self, plan: "Plan", artifact_uri: str):
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import duration_pb2

        from cloudllm.catalog.vertex_images import image_for
        from cloudllm.quantize import plan_quantize_env

        machine = _machine(plan, self.default_instance)
        # Every GPU the attention heads split over: Vertex bills them all, and more KV cache means more throughput.
        gpus = plan.shard_count(machine.gpu_count) if machine.gpu_count else 0
        settings = plan.settings
        image = plan.spec.image or image_for(plan.runtime, gpu=bool(machine.gpu_count)).uri
        env: dict[str, str] = {"HF_HUB_OFFLINE": "1"}
        command: list[str] = []
        args: list[str] = []
        predict, health, shm = PREDICT_ROUTE, HEALTH_ROUTE, 0
        if plan.runtime == "tgi":
            env.update(NUM_SHARD=str(gpus), MAX_INPUT_TOKENS=str(settings.max_input_tokens), MAX_TOTAL_TOKENS=str(settings.max_total_tokens))
            quantize_env = plan_quantize_env(plan)
            env.update(quantize_env)
            if settings.dtype in ("float16", "bfloat16") and not quantize_env:  # TGI refuses --dtype with --quantize
                env["DTYPE"] = settings.dtype
            if plan.spec.trust_remote_code:
                env["TRUST_REMOTE_CODE"] = "true"
            shm = 16 * 1024 if gpus > 1 else 0
        elif plan.runtime == "vllm":
            args = [
                "python", "-m", "vllm.entrypoints.api_server", "--host=0.0.0.0", f"--port={SERVING_PORT}",
                f"--model={artifact_uri}", f"--tensor-parallel-size={gpus}", f"--max-model-len={settings.max_total_tokens}",
                "--gpu-memory-utilization=0.9", "--swap-space=16", "--disable-log-requests",
            ]  # fmt: skip
            if settings.dtype in ("float16", "bfloat16"):
                args.append(f"--dtype={settings.dtype}")
            if plan.spec.quantize and plan.spec.quantize not in ("int8", "int4"):
                args.append(f"--quantization={plan.spec.quantize}")
            if plan.spec.trust_remote_code:
                args.append("--trust-remote-code")
            predict, health, shm = "/generate", "/ping", 16 * 1024
        else:
            command = ["python3", "-c", HANDLER_BOOTSTRAP]
        return v1.ModelContainerSpec(
            image_uri=image,
            command=command,
            args=args,
            env=[v1.EnvVar(name=k, value=v) for k, v in sorted(env.items())],
            ports=[v1.Port(container_port=SERVING_PORT)],
            predict_route=predict,
            health_route=health,
            deployment_timeout=duration_pb2.Duration(seconds=deployment_timeout(plan.bundle.total_bytes)),
            shared_memory_size_mb=shm,
        )

    def _resources(self, plan: "Plan"):
        from google.cloud import aiplatform_v1 as v1

        spec = plan.spec
        machine = _machine(plan, self.default_instance)
        machine_spec = v1.MachineSpec(machine_type=machine.name)
        if machine.accelerator_type:
            machine_spec.accelerator_type = v1.AcceleratorType[machine.accelerator_type]
            machine_spec.accelerator_count = machine.accelerator_count
        resources = v1.DedicatedResources(machine_spec=machine_spec, min_replica_count=spec.min_instances, max_replica_count=spec.max_instances)
        metric = _scale_metric(spec, machine)
        if metric:
            resources.autoscaling_metric_specs = [v1.AutoscalingMetricSpec(metric_name=metric[0], target=metric[1])]
        return resources

    def _labels(self, plan: "Plan", *, digests: bool) -> dict[str, str]:
        labels = {**plan.spec.tags, MANAGED_BY[0]: MANAGED_BY[1], NAME_LABEL: _label_value(plan.spec.name)}
        labels[RUN_LABEL] = self._run_token()
        if digests:
            labels[RUNTIME_LABEL] = plan.runtime
            labels.update(self._digest_labels(plan))
        return labels

    @staticmethod
    def _digest_labels(plan: "Plan") -> dict[str, str]:
        """The plan's fingerprint as model labels: what `get` reads back to compare."""
        fingerprint = plan.fingerprint
        return {label: encode_digest(fingerprint[key]) for key, label in DIGEST_LABELS.items()}

    # --- waiting ----------------------------------------------------------------------------
    def _wait(self, op, what: str, deadline_s: float, reporter: Reporter, *, fix: str | None = None):
        """Poll an operation until done or our deadline passes: 0.1 s at first, then up to every 15 s.

        A sleep never exceeds max(0.5 s, a tenth of the time waited): the overshoot past the
        operation's end stays small.

        A failed operation raises DeployFailed with `fix`; without one, the API error itself.
        """
        from google.api_core import exceptions

        start = time.monotonic()
        delay = 0.1
        with reporter.waiting(what) as update:
            while not op.done(retry=_retry()):
                elapsed = time.monotonic() - start
                if elapsed > deadline_s:
                    raise _StillRunning(f"{what} did not finish within {deadline_s:.0f}s (operation {op.operation.name}); it goes on in Vertex AI")
                update("running")
                time.sleep(min(delay, max(0.0, deadline_s - elapsed)))
                # Never sleep much past the operation's end: at most a tenth of the time waited so far
                # (0.5 s early on), 15 s at most: short waits stay snappy, long ones cheap.
                delay = min(delay * 1.6, max(0.5, elapsed / 10), 15.0)
        try:
            return op.result(timeout=0)
        except exceptions.GoogleAPICallError as exc:
            if fix is None:
                raise
            message = _message(exc, 500)
            raise DeployFailed(f"{what} failed: {message}", fix) from None

    def _run_token(self) -> str:
        """A random token for this provider object's deploys, put on what they create (RUN_LABEL)."""
        if getattr(self, "_token", None) is None:
            self._token = secrets.token_hex(8)
        return self._token

    def _model_of_this_run(self, name: str, token: str) -> tuple[str, str] | None:
        from google.cloud import aiplatform_v1 as v1

        for model in self._models_named(name):
            for version in self.clients().models.list_model_versions(request=v1.ListModelVersionsRequest(name=model)):
                if version.labels.get(RUN_LABEL) == token:
                    return model, version.version_id
        return None

    def _version_of_this_plan(self, plan: "Plan", artifact_uri: str, parent_model: str | None) -> tuple[str, str] | None:
        """A model version an earlier (killed) deploy registered for exactly this plan and these artifacts."""
        from google.cloud import aiplatform_v1 as v1

        digest = encode_digest(plan.digest)
        for model in sorted({parent_model} if parent_model else self._models_named(plan.spec.name)):
            for version in self.clients().models.list_model_versions(request=v1.ListModelVersionsRequest(name=model)):
                if version.labels.get(DIGEST_LABELS["digest"]) == digest and version.artifact_uri.rstrip("/") == artifact_uri.rstrip("/"):
                    return model, version.version_id
        return None

    def _endpoint_of_this_run(self, name: str, token: str) -> str | None:
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListEndpointsRequest(parent=self.parent, filter=f'display_name="{name}"')
        found = [e.name for e in self.clients().endpoints.list_endpoints(request=request) if e.labels.get(RUN_LABEL) == token]
        return found[0] if found else None

    def _wait_listed(self, endpoint: str, deployed_id: str, what: str, deadline_s: float, reporter: Reporter) -> None:
        """Wait for a deployment whose operation we lost (its DeployModel answer was dropped): poll the endpoint."""
        start = time.monotonic()
        delay = 0.5
        with reporter.waiting(what) as update:
            while deployed_id not in {d.id for d in self.clients().endpoints.get_endpoint(name=endpoint).deployed_models}:
                elapsed = time.monotonic() - start
                if elapsed > deadline_s:
                    raise _StillRunning(f"{what} did not finish within {deadline_s:.0f}s (deployed model {deployed_id}); it may go on in Vertex AI")
                update(f"{elapsed:.0f}s")
                time.sleep(delay)
                delay = min(delay * 1.6, 15.0)

    # --- reading ------------------------------------------------------------------------
    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Look-ups (status, list, logs, delete's search): an unreachable or refusing API is one line, not a traceback."""
        import requests
        from google.api_core import exceptions

        try:
            yield
        except (exceptions.PermissionDenied, exceptions.Unauthenticated, exceptions.Forbidden) as exc:
            message = _message(exc, 300)
            raise UserError(f"Vertex AI denied access to {what}: {message}", "check --project and that your account has roles/aiplatform.user") from None
        except (exceptions.GoogleAPICallError, exceptions.RetryError) as exc:
            if isinstance(getattr(exc, "cause", None), requests.exceptions.ConnectionError):
                raise self._unreachable(what) from None  # retried until the budget ran out
            message = _message(exc, 300)
            raise DeployFailed(f"Vertex AI could not {what}: {message}", "run the same command again, or see the Vertex AI console") from None
        except requests.exceptions.ConnectionError:  # the REST transport's connection failures are not api_core errors
            raise self._unreachable(what) from None

    def _unreachable(self, what: str) -> DeployFailed:
        return DeployFailed(
            f"cannot reach Vertex AI at {self.api_base} to {what} (retried for {retry_seconds():.0f}s)",
            f"check the network, --region and {API_ENDPOINT_ENV}; {RETRY_SECONDS_ENV} sets how long to retry",
        )

    def _find_endpoint(self, name: str):
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListEndpointsRequest(parent=self.parent, filter=f'display_name="{name}"')
        with self._reading(f"look up endpoint {name}"):
            response = self.clients().endpoints.list_endpoints(request=request)
            found = [e for e in response if e.labels.get(MANAGED_BY[0]) == MANAGED_BY[1]]
        # Two deploys racing may both create one; the older is the endpoint, whoever asks.
        return min(found, key=lambda e: (e.create_time.timestamp() if e.create_time else 0.0, e.name)) if found else None

    def get(self, name: str) -> Endpoint | None:
        endpoint = self._find_endpoint(name)
        return None if endpoint is None else self._describe(name, endpoint)

    def _describe(self, name: str, endpoint) -> Endpoint:
        main = _main_deployment(endpoint)
        details: dict[str, Any] = {
            "endpoint": endpoint.name,
            "project": self.project,
            "region": self.region,
            "traffic_split": dict(endpoint.traffic_split),
            "deployed_models": [d.id for d in endpoint.deployed_models],
            "labels": {k: v for k, v in endpoint.labels.items() if k != LOCK_LABEL},  # the spec's tags among them
        }
        if main is None:
            return Endpoint(
                name=name, provider=self.name, state="Failed", url=_predict_url(self.api_base, endpoint.name),
                failure_reason="no model is deployed on the endpoint (yet, if a deploy is still running)", details=details,
            )  # fmt: skip
        model = self.clients().models.get_model(name=f"{main.model}@{main.model_version_id}")
        res = main.dedicated_resources
        spec = res.machine_spec
        instance = spec.machine_type
        if spec.accelerator_count:
            instance += f" + {spec.accelerator_count}x {_accelerator_name(spec.accelerator_type)}"
        details.update(
            model=main.model,
            model_version_id=main.model_version_id,
            deployed_model_id=main.id,
            artifact_uri=model.artifact_uri,
            image=model.container_spec.image_uri,
            replicas=f"{res.min_replica_count}..{res.max_replica_count or res.min_replica_count}",
        )
        for key, label in DIGEST_LABELS.items():
            if label in model.labels:
                details[key] = decode_digest(model.labels[label])
        state, reason = ("InService" if endpoint.traffic_split.get(main.id) else "Updating"), None
        idle = [d.id for d in endpoint.deployed_models if d.id != main.id and not endpoint.traffic_split.get(d.id)]
        if idle:
            # an update that stopped after moving traffic: the next deploy finishes it
            state, reason = "Failed", f"deployed model(s) {', '.join(idle)} take no traffic but are still deployed; deploy again to undeploy them"
        elif len(endpoint.deployed_models) > 1:
            state = "Updating"
        return Endpoint(
            failure_reason=reason,
            name=name,
            provider=self.name,
            state=state,
            url=_predict_url(self.api_base, endpoint.name),
            model=model.description or model.display_name,
            digest=details.get("digest"),
            instance=instance,
            runtime=model.labels.get(RUNTIME_LABEL),
            details=details,
        )

    def _endpoint_or_fail(self, name: str) -> Endpoint:
        found = self.get(name)
        if found is None:
            raise DeployFailed(f"endpoint {name} vanished right after its deploy", "see the Vertex AI console")
        return found

    def list(self) -> list[Endpoint]:
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListEndpointsRequest(parent=self.parent, filter=f'labels.{MANAGED_BY[0]}="{MANAGED_BY[1]}"')
        with self._reading("list endpoints"):
            response = self.clients().endpoints.list_endpoints(request=request)
            return [self._describe(e.display_name, e) for e in response]

    # --- delete -----------------------------------------------------------------------------
    def delete(self, name: str, *, purge_artifacts: bool = False, reporter: Reporter | None = None) -> None:
        reporter = reporter or Reporter()
        c = self.clients()
        endpoint = self._find_endpoint(name)
        models = self._models_named(name)
        if endpoint is None and not models:
            raise UserError(f"no Vertex AI endpoint named {name!r} in {self.parent}", "see `cloudllm list --provider vertex`")
        deadline = {"s": 1800}
        try:
            if endpoint is not None:
                models |= {d.model for d in endpoint.deployed_models}
                split = dict(endpoint.traffic_split)
                for deployed in sorted(endpoint.deployed_models, key=lambda d: split.get(d.id, 0)):
                    split.pop(deployed.id, None)
                    rest = _give_all_to_first(split) if split else {}
                    op = _unless_gone(c.endpoints.undeploy_model, endpoint=endpoint.name, deployed_model_id=deployed.id, traffic_split=rest)
                    if op is not None:
                        self._wait(op, f"undeploying {deployed.id}", deadline["s"], reporter)
                    split = rest
                    reporter.step(f"undeployed {deployed.id}")
            artifact_roots = set()
            for model in sorted(models):
                artifact_roots |= self._artifact_roots(model)
                if (op := _unless_gone(c.models.delete_model, name=model)) is not None:
                    self._wait(op, f"deleting model {model}", deadline["s"], reporter)
                reporter.step(f"deleted model {model}")
            if endpoint is not None:
                if (op := _unless_gone(c.endpoints.delete_endpoint, name=endpoint.name)) is not None:
                    self._wait(op, "deleting the endpoint", deadline["s"], reporter)
                reporter.step(f"deleted endpoint {endpoint.name}")
        except Exception as exc:
            raise _deploy_error(exc, name, after="deleting stopped half-way") from None
        if purge_artifacts:
            from cloudllm.storage.gcs import GcsArtifacts

            store = GcsArtifacts(project=self.project)
            for root in sorted(artifact_roots, key=str):
                count = store.delete(root)
                reporter.step(f"deleted {count} object(s) under {root}")

    def _models_named(self, name: str) -> set[str]:
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListModelsRequest(parent=self.parent, filter=f'display_name="{name}"')
        with self._reading(f"look up the models of {name}"):
            response = self.clients().models.list_models(request=request)
            return {m.name for m in response if m.labels.get(MANAGED_BY[0]) == MANAGED_BY[1]}

    def _artifact_roots(self, model: str) -> set["GcsUri"]:
        """gs://.../<name>/ of every version of a model (each version is gs://.../<name>/<version>/)."""
        from google.cloud import aiplatform_v1 as v1

        from cloudllm.storage.gcs import GcsUri

        roots = set()
        for version in self.clients().models.list_model_versions(request=v1.ListModelVersionsRequest(name=model)):
            if version.artifact_uri.startswith("gs://"):
                uri = GcsUri.parse(version.artifact_uri)
                roots.add(GcsUri(uri.bucket, uri.prefix.rsplit("/", 1)[0] if "/" in uri.prefix else ""))
        return roots

    def _clean_up(self, created: "_Created", reporter: Reporter) -> None:
        """Remove what a failed deploy created, newest first; say what could not be removed."""
        c = self.clients()
        left = []
        steps = []
        if created.deployed and not created.endpoint:
            steps.append((f"deployed model {created.deployed} (traffic back to the old version)", lambda: self._roll_back(created)))
        if created.endpoint:
            steps.append(("endpoint " + created.endpoint, lambda: self._delete_endpoint_hard(created.endpoint, reporter)))
        quiet = Reporter()
        if created.model:
            if created.version:
                name = f"{created.model}@{created.version}"
                steps.append((f"model version {name}", lambda: self._wait_unless_gone(c.models.delete_model_version, quiet, name=name)))
            else:
                steps.append((f"model {created.model}", lambda: self._wait_unless_gone(c.models.delete_model, quiet, name=created.model)))
        if created.artifacts and created.store:
            steps.append((f"artifacts {created.artifacts}", lambda: created.store.delete(created.artifacts)))
        for what, step in steps:
            try:
                step()
                reporter.step(f"cleaned up {what}")
            except Exception as exc:  # keep cleaning; report what is left
                left.append(f"{what} ({str(exc).splitlines()[0][:120]})")
        created.left = left

    def _roll_back(self, created: "_Created") -> None:
        """The traffic as it was before the update, and the update's deployed model undeployed (one call)."""
        endpoint = self.clients().endpoints.get_endpoint(name=created.on_endpoint)
        if created.deployed not in {d.id for d in endpoint.deployed_models}:
            return
        others = [d.id for d in endpoint.deployed_models if d.id != created.deployed]
        split = {k: v for k, v in (created.traffic_before or {}).items() if k in others and v}
        if others and sum(split.values()) != 100:
            split = _give_all_to_first({k: 0 for k in (split or others)})
        self._wait_unless_gone(
            self.clients().endpoints.undeploy_model, Reporter(), endpoint=endpoint.name, deployed_model_id=created.deployed, traffic_split=split
        )

    def _delete_endpoint_hard(self, endpoint: str, reporter: Reporter) -> None:
        c = self.clients()
        quiet = Reporter()
        current = c.endpoints.get_endpoint(name=endpoint)
        for deployed in current.deployed_models:
            self._wait_unless_gone(c.endpoints.undeploy_model, quiet, endpoint=endpoint, deployed_model_id=deployed.id, traffic_split={})
        self._wait_unless_gone(c.endpoints.delete_endpoint, quiet, name=endpoint)

    def _wait_unless_gone(self, call, reporter: Reporter, **kwargs) -> None:
        if (op := _unless_gone(call, **kwargs)) is not None:
            self._wait(op, "", 600, reporter)

    # --- invoke ---------------------------------------------------------------------------
    def logs(self, name: str, *, follow: bool = False, since: float | None = None) -> Iterator[str]:
        """Where the endpoint's logs are: the Cloud Logging filter, its console link and the gcloud command.

        Reading them here would need google-cloud-logging (and its gRPC stack) for one command;
        the filter is exact, so gcloud or the console show the same lines.
        """
        endpoint = self._find_endpoint(name)
        if endpoint is None:
            raise UserError(f"no Vertex AI endpoint named {name!r} in {self.parent}", "see `cloudllm list --provider vertex`")
        query = logging_filter(endpoint.name.rsplit("/", 1)[-1], self.region, since)
        yield f"Vertex AI keeps endpoint {name}'s model server log in Cloud Logging. Filter:"
        yield query
        yield "console: https://console.cloud.google.com/logs/query;query=" + quote(query, safe="") + f"?project={self.project}"
        if follow:
            yield f"follow: gcloud beta logging tail '{query}' --project {self.project}"
        else:
            yield f"read: gcloud logging read '{query}' --project {self.project} --order asc"

    def invoke(self, name: str, body: dict) -> Any:
        from google.api_core import exceptions
        from google.protobuf import json_format

        endpoint = self._serving_endpoint(name)
        kwargs = _predict_kwargs(endpoint.details["endpoint"], vertex_request(body, endpoint.runtime or "handler"))
        try:
            response = self.clients().predictions.predict(**kwargs, retry=_retry(refused_only=True))
        except exceptions.GoogleAPICallError as exc:
            raise _invoke_error(name, exc) from None
        result = json_format.MessageToDict(type(response).pb(response))
        return {"predictions": result.get("predictions", []), "deployed_model_id": response.deployed_model_id}

    def invoke_stream(self, name: str, body: dict) -> Iterator[str]:
        """streamRawPredict with our own HTTP client (the SDK's raw_predict hard-codes Google's host), in the body each engine takes."""
        import httpx

        endpoint = self._serving_endpoint(name)
        runtime = endpoint.runtime or "handler"
        if runtime == "tgi":
            raise UserError(
                f"endpoint {name} runs TGI, whose Vertex AI route answers whole predictions only and cannot stream",
                "invoke without --stream, or deploy with --runtime vllm or --runtime handler to stream",
            )
        url = f"{self.api_base}/v1/{endpoint.details['endpoint']}:streamRawPredict"
        try:
            if runtime == "vllm":
                yield from _vllm_stream(name, url, vllm_stream_request(body), self._auth_headers())
            else:
                from cloudllm.http import stream_tokens

                yield from stream_tokens(name, url, {**body, "stream": True}, headers=self._auth_headers())
        except httpx.TransportError as exc:
            raise DeployFailed(f"cannot reach {self.api_base}: {exc}", "check your network, or CLOUDLLM_VERTEX_ENDPOINT") from None

    def _serving_endpoint(self, name: str) -> Endpoint:
        endpoint = self.get(name)
        if endpoint is None:
            raise UserError(f"no Vertex AI endpoint named {name!r} in {self.parent}", "see `cloudllm list --provider vertex`")
        if "deployed_model_id" not in endpoint.details:
            raise DeployFailed(f"endpoint {name} has no deployed model", "deploy it again with `cloudllm deploy` or delete it")
        return endpoint

    def _auth_headers(self) -> dict[str, str]:
        if os.environ.get(API_ENDPOINT_ENV):
            return {}
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        return {"Authorization": f"Bearer {credentials.token}"}


# --- helpers -------------------------------------------------------------------------------------
@dataclass
class _Clients:
    endpoints: Any
    models: Any
    predictions: Any

    @classmethod
    def create(cls, region: str, base_url: str | None) -> "_Clients":
        from google.api_core.gapic_v1.client_info import ClientInfo
        from google.api_core.client_options import ClientOptions
        from google.cloud import aiplatform_v1 as v1

        from cloudllm import __version__

        kwargs: dict[str, Any] = {"transport": "rest", "client_info": ClientInfo(user_agent=f"cloudllm/{__version__}")}
        if base_url:
            from google.auth.credentials import AnonymousCredentials

            kwargs.update(credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=base_url.rstrip("/")))
        else:
            kwargs["client_options"] = ClientOptions(api_endpoint=f"{region}-aiplatform.googleapis.com")
        from google.auth.exceptions import DefaultCredentialsError

        try:
            return cls(_Retrying(v1.EndpointServiceClient(**kwargs)), _Retrying(v1.ModelServiceClient(**kwargs)), v1.PredictionServiceClient(**kwargs))
        except DefaultCredentialsError as exc:
            raise UserError(
                f"no Google Cloud credentials: {str(exc).splitlines()[0]}",
                "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
            ) from None


@dataclass
class _Created:
    """What one deploy created, so a failure can remove exactly that."""

    store: Any = None
    artifacts: Any = None
    model: str | None = None
    version: str | None = None  # set when the model existed and only this version is ours
    endpoint: str | None = None
    deployed: str | None = None  # an update's new deployed model, its endpoint, and the traffic split before it
    on_endpoint: str | None = None
    traffic_before: dict[str, int] | None = None
    update: bool = False
    left: list[str] | None = None


class _StillRunning(DeployFailed):
    """Our deadline passed while a Vertex AI operation still runs (it cannot be cancelled or cleaned up now)."""


def _lock_time(label: str) -> float:
    stamp = label.rsplit("-", 1)[-1]
    return float(stamp) if stamp.isdigit() else 0.0


def _retry(*, refused_only: bool = False):
    """google-api-core's Retry for transient faults: throttling, 5xx, dropped or timed-out connections.

    Capped exponential backoff with jitter (api-core randomizes each sleep). The Vertex clients
    retry nothing by default; reads and idempotent calls get this, creates go through _send_once.
    refused_only: only what the service refused before doing anything (429, 503), for a predict
    that must not run twice because an answer was lost.
    """
    import requests
    from google.api_core import exceptions, retry

    if refused_only:
        return retry.Retry(
            predicate=retry.if_exception_type(exceptions.TooManyRequests, exceptions.ServiceUnavailable),
            initial=RETRY_INITIAL, maximum=5.0, multiplier=2.0, timeout=20.0,  # an interactive call: not for long
        )  # fmt: skip
    transient = retry.if_exception_type(
        exceptions.TooManyRequests, exceptions.InternalServerError, exceptions.BadGateway, exceptions.ServiceUnavailable,
        exceptions.GatewayTimeout, requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
        requests.exceptions.Timeout,
    )  # fmt: skip
    return retry.Retry(predicate=transient, initial=RETRY_INITIAL, maximum=RETRY_MAX, multiplier=2.0, timeout=retry_seconds())



def _send_once(send, *, find):
    """A non-idempotent call (a create), retried on transient faults without doing it twice.

    Before sending again, find() looks for what an earlier attempt made (its answer lost on the
    way back) and returns it instead; with find=None the service itself refuses the repeat
    (ALREADY_EXISTS for a client-chosen id), which the caller handles.
    """
    tried = False

    def attempt():
        nonlocal tried
        if tried and find is not None and (found := find()) is not None:
            return found
        tried = True
        return send()

    return _retry()(attempt)()


def _unless_gone(call, **kwargs):
    """A delete or undeploy, retried; NOT_FOUND means done (an earlier attempt did it). Returns its operation, or None."""
    from google.api_core import exceptions

    try:
        return call(**kwargs, retry=_retry())
    except exceptions.NotFound:
        return None


class _Retrying:
    """A Vertex client whose reads (get_*, list_*) retry transient faults; everything else as is."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name.startswith(("get_", "list_")) and callable(attr):
            return functools.partial(attr, retry=_retry())
        return attr


def _machine(plan: "Plan", default: str):
    instance = getattr(plan, "instance", None)
    if instance is not None:
        return instance
    from cloudllm.catalog import resolve

    return resolve("vertex", plan.spec.instance or default, plan.spec.accelerator)


def _scale_metric(spec, machine) -> tuple[str, int] | None:
    """(metric name, target) for autoscaling_metric_specs; None leaves Vertex's default (CPU 60%)."""
    if not spec.scale_metric and spec.scale_target is None and spec.max_instances <= spec.min_instances:
        return None
    key = spec.scale_metric or ("gpu-duty-cycle" if machine.gpu_count else "cpu")
    if key not in SCALE_METRICS:
        raise UserError(f"--scale-metric {key} is not a Vertex AI metric", f"use one of: {', '.join(SCALE_METRICS)}")
    if key == "gpu-duty-cycle" and not machine.gpu_count:
        raise UserError(f"{machine.label} has no GPU to measure a duty cycle on", "use --scale-metric cpu or requests")
    target = DEFAULT_SCALE_TARGET if spec.scale_target is None else spec.scale_target
    if key in ("cpu", "gpu-duty-cycle") and not 1 <= target <= 100:
        raise UserError(f"--scale-target {target:g} is not a percentage", f"use 1..100 for {key}")
    return SCALE_METRICS[key], max(1, round(target))


def deployment_timeout(total_bytes: int) -> int:
    """Seconds a replica may take to copy and load the model: 10 min + 1 min per 2 GB, at most 2 h."""
    return int(min(MAX_DEPLOYMENT_TIMEOUT, 600 + math.ceil(total_bytes / 2e9) * 60))


def _deploy_deadline(plan: "Plan") -> float:
    return float(plan.spec.timeout or min(14_400, deployment_timeout(plan.bundle.total_bytes) + PROVISIONING_ALLOWANCE))


def _short_deadline(plan: "Plan") -> float:
    """Registry and endpoint operations: minutes, whatever the model's size."""
    return float(max(600, plan.spec.timeout or 0))


def _version_prefix(plan: "Plan") -> "GcsUri":
    from cloudllm.storage.gcs import GcsUri

    return GcsUri.parse(plan.spec.bucket).child(plan.spec.name, plan.bundle.digest[:16])


def _resources_line(plan: "Plan") -> str:
    try:
        machine = _machine(plan, VertexProvider.default_instance)
    except UserError:
        return plan.spec.instance or "?"
    count = plan.spec.min_instances if plan.spec.min_instances == plan.spec.max_instances else f"{plan.spec.min_instances}..{plan.spec.max_instances}"
    return f"{count}x {machine.label}"


def _main_deployment(endpoint):
    """The deployed model taking the most traffic (the newest on a tie), or None."""
    if not endpoint.deployed_models:
        return None
    split = endpoint.traffic_split
    return max(endpoint.deployed_models, key=lambda d: (split.get(d.id, 0), d.create_time or 0))


def _give_all_to_first(split: dict[str, int]) -> dict[str, int]:
    keys = sorted(split)
    return {k: (100 if i == 0 else 0) for i, k in enumerate(keys)}


def _pending(plan: "Plan", endpoint: str, api_base: str) -> Endpoint:
    return Endpoint(
        name=plan.spec.name, provider="vertex", state="Creating", url=_predict_url(api_base, endpoint),
        runtime=plan.runtime, details={"endpoint": endpoint},
    )  # fmt: skip


def logging_filter(endpoint_id: str, region: str, since: float | None = None) -> str:
    """The Cloud Logging filter for one Vertex AI endpoint's container logs."""
    parts = [
        'resource.type="aiplatform.googleapis.com/Endpoint"',
        f'resource.labels.endpoint_id="{endpoint_id}"',
        f'resource.labels.location="{region}"',
    ]
    if since is not None:
        stamp = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        parts.append(f'timestamp>="{stamp}"')
    return " AND ".join(parts)


def _predict_url(api_base: str, endpoint: str) -> str:
    return f"{api_base}/v1/{endpoint}:predict"


def _accelerator_name(value) -> str:
    return getattr(value, "name", str(value))


def deployed_model_id(name: str, digest: str) -> str:
    """A DeployedModel id (10 digits, what Vertex AI allows) derived from the endpoint name and plan digest."""
    import hashlib

    value = int.from_bytes(hashlib.sha256(f"{name}:{digest}".encode()).digest()[:8], "big")
    return str(value % (9 * 10**9) + 10**9)


def encode_digest(hex_digest: str) -> str:
    """A sha256 hex digest as a label value: lowercase base32 without padding (52 chars)."""
    return base64.b32encode(bytes.fromhex(hex_digest)).decode().rstrip("=").lower()


def decode_digest(label: str) -> str:
    raw = label.upper()
    return base64.b32decode(raw + "=" * (-len(raw) % 8)).hex()


def _label_ok(value: str) -> bool:
    return len(value) <= 63 and all(ch.islower() or ch.isdigit() or ch in "-_" for ch in value)


def _label_value(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name.lower())[:63]


def vertex_request(body: dict, runtime: str) -> dict:
    """The predict body for a runtime from our TGI-form body; a body with "instances" goes as is.

    handler: {"instances": [prompt], "parameters": {...}}; tgi (its Vertex route, which reads
    only max_new_tokens and seed, and samples): {"instances": [{"inputs", "parameters"}]}; vllm
    (the Model Garden server): {"instances": [{"prompt", "max_tokens", ..., "raw_response": true}]}:
    without raw_response it answers "Prompt:\n<prompt>\nOutput:\n<text>".
    """
    if "instances" in body:
        return {k: v for k, v in body.items() if k in ("instances", "parameters")}
    inputs = body.get("inputs")
    prompts = inputs if isinstance(inputs, list) else [inputs]
    parameters = dict(body.get("parameters") or {})
    if runtime == "tgi":
        return {"instances": [{"inputs": p, **({"parameters": parameters} if parameters else {})} for p in prompts]}
    if runtime == "vllm":
        sampling = _vllm_parameters(parameters)
        return {"instances": [{"prompt": p, **sampling, "raw_response": True} for p in prompts]}
    request: dict[str, Any] = {"instances": prompts}
    if parameters:
        request["parameters"] = parameters
    return request


def vllm_stream_request(body: dict) -> dict:
    """The Model Garden vLLM server's streaming body: one instance with "stream": true (it streams one prompt at a time)."""
    request = vertex_request(body, "vllm")
    instances = request.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        raise UserError("the vllm runtime streams one prompt at a time", "send one prompt, or invoke without --stream")
    return {"instances": [{**instances[0], "stream": True}]}


def _vllm_parameters(parameters: dict) -> dict:
    """TGI-form generation parameters as vLLM sampling parameters: greedy unless asked to sample, as TGI and the handler."""
    params = {k: v for k, v in parameters.items() if v is not None}  # null means "not set", as the handler reads it
    sampling = params.pop("do_sample", None)
    unknown = sorted(set(params) - set(VLLM_PARAMETERS))
    if unknown:
        raise UserError(
            f"the vllm runtime takes no parameter {unknown[0]!r}", f"use {', '.join(sorted({*VLLM_PARAMETERS, 'do_sample'}))}"
        )
    if sampling is None:
        sampling = params.get("temperature", 1.0) != 1.0 or params.get("top_p", 1.0) < 1.0 or params.get("top_k", 0) > 0
    out = {VLLM_PARAMETERS[k]: v for k, v in params.items()}
    if not sampling:
        out["temperature"] = 0.0  # vLLM samples at temperature 1.0 unless told otherwise
        out.pop("top_p", None)
        out.pop("top_k", None)
    return out


def _vllm_stream(name: str, url: str, body: dict, headers: dict) -> Iterator[str]:
    """The Model Garden vLLM server's stream: JSON objects {"predictions": [text since the last one]}, each ended by NUL."""
    import json

    import httpx

    from cloudllm.http import TIMEOUT, endpoint_error

    with httpx.stream("POST", url, json=body, headers=headers, timeout=TIMEOUT) as response:
        if response.status_code >= 400:
            response.read()
            raise endpoint_error(name, response.status_code, response.text)
        buffer = b""
        for chunk in response.iter_bytes():
            buffer += chunk
            *frames, buffer = buffer.split(b"\0")
            for frame in frames:
                if frame.strip():
                    yield from _vllm_pieces(name, json.loads(frame))
        if buffer.strip():
            yield from _vllm_pieces(name, json.loads(buffer))


def _vllm_pieces(name: str, frame: Any) -> Iterator[str]:
    pieces = frame.get("predictions") if isinstance(frame, dict) else None
    if not isinstance(pieces, list):
        raise DeployFailed(f"endpoint {name} streamed something that is not vLLM's: {str(frame)[:200]}", f"check its logs: cloudllm logs {name}")
    for piece in pieces[:1]:  # one prompt, one sequence
        if isinstance(piece, str) and piece:
            yield piece


def _predict_kwargs(endpoint: str, request: dict) -> dict[str, Any]:
    """PredictionService.predict's arguments for a {"instances", "parameters"} body."""
    from google.protobuf import json_format, struct_pb2

    kwargs: dict[str, Any] = {"endpoint": endpoint, "instances": [json_format.ParseDict(i, struct_pb2.Value()) for i in request["instances"]]}
    if "parameters" in request:
        kwargs["parameters"] = json_format.ParseDict(request["parameters"], struct_pb2.Value())
    return kwargs


def _sample_body(plan: "Plan") -> dict:
    """A small request for a canary check: one generated token for generation tasks, one short text otherwise."""
    task = plan.model.task or ""
    if task in ("text-generation", "text2text-generation", "summarization") or task.startswith("translation"):
        return {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}
    return {"inputs": "Hello"}


def _rollout_line(plan: "Plan") -> str:
    if plan.spec.rollout.startswith("canary"):
        return f"{plan.spec.rollout}, baking {_rollout_wait(plan)}s before the rest moves"
    return plan.spec.rollout


def _rollout_wait(plan: "Plan") -> int:
    """--option rollout_wait: seconds a canary bakes before the rest of the traffic moves."""
    value = plan.spec.options.get("rollout_wait")
    if value is None:
        return DEFAULT_ROLLOUT_WAIT
    if not str(value).isdigit() or int(value) > MAX_ROLLOUT_WAIT:
        raise UserError(
            f"--option rollout_wait={value} is not a number of seconds in 0..{MAX_ROLLOUT_WAIT}", "pass e.g. --option rollout_wait=300"
        )
    return int(value)


def _check_quantized_image(plan: "Plan") -> None:
    """The stock handler image cannot load int8/int4 weights; an --image that can is the user's to name."""
    from cloudllm.quantize import OFFLINE_METHODS

    method = plan.spec.quantize if plan.spec.quantize in OFFLINE_METHODS else plan.model.quantization
    if plan.runtime != "handler" or method not in OFFLINE_METHODS or plan.spec.image:
        return
    raise UserError(
        f"the Vertex AI handler image cannot load {method} weights: it starts the server without installing "
        "code/requirements.txt, and lacks optimum-quanto (its torch is older than optimum-quanto needs)",
        "pass --image with an image that carries optimum-quanto (e.g. one built from containers/Dockerfile), or deploy without --quantize",
    )


def _message(exc: BaseException, limit: int) -> str:
    """An API error's first line, without the "POST http://...: " the REST transport puts before it."""
    text = str(getattr(exc, "message", None) or exc).splitlines()[0]
    return re.sub(r"^(GET|POST|PATCH|PUT|DELETE) \S+: ", "", text)[:limit]


def _with_leftovers(exc: BaseException, created: _Created) -> BaseException:
    """Name what the clean-up could not remove in the error's fix."""
    if created.left and isinstance(exc, UserError):
        exc.fix = f"{exc.fix}; not cleaned up: {'; '.join(created.left)}"
        exc.args = (exc.line(),)
    return exc


def _invoke_error(name: str, exc) -> UserError:
    from google.api_core import exceptions

    message = _message(exc, 300)
    if isinstance(exc, (exceptions.InvalidArgument, exceptions.BadRequest, exceptions.NotFound)):
        return UserError(f"endpoint {name} rejected the request: {message}", "fix the request body or parameters")
    return DeployFailed(f"endpoint {name} failed: {message}", "see the endpoint's logs in Cloud Logging")


def _deploy_error(exc: BaseException, name: str, after: str | None = None) -> BaseException:
    """One line for a failed Vertex call; Ctrl-C and our own errors pass through unchanged."""
    from google.api_core import exceptions

    if isinstance(exc, UserError) or not isinstance(exc, (exceptions.GoogleAPICallError, exceptions.RetryError)):
        return exc
    message = _message(exc, 500)
    prefix = f"{after}: " if after else ""
    if isinstance(exc, (exceptions.InvalidArgument, exceptions.BadRequest, exceptions.FailedPrecondition)):
        return DeployFailed(f"{prefix}Vertex AI refused the deploy of {name}: {message}", "fix the setting it names and deploy again")
    if isinstance(exc, (exceptions.PermissionDenied, exceptions.Unauthenticated, exceptions.Forbidden)):
        return UserError(
            f"{prefix}Vertex AI denied access: {message}", "check --project and that your account has roles/aiplatform.user"
        )
    return DeployFailed(f"{prefix}deploying {name} on Vertex AI failed: {message}", "deploy again, or see the Vertex AI console")


__all__ = ["API_ENDPOINT_ENV", "VertexProvider", "deployment_timeout", "encode_digest", "decode_digest", "vertex_request"]
