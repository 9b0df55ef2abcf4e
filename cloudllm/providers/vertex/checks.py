"""A plan as Vertex AI settings, checked before anything is created: machines, scaling, deadlines, rollout."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from cloudllm.catalog.tgi import TGI_MODEL_TYPES
from cloudllm.errors import UserError
from cloudllm.providers.base import Endpoint, ResourceChange
from cloudllm.providers.kit import DEFAULT_BAKE_SECONDS, rollout_of
from cloudllm.providers.vertex.invoke import PREDICT_ROUTE, predict_url
from cloudllm.providers.vertex.labels import label_ok

if TYPE_CHECKING:
    from cloudllm.plan import Plan
    from cloudllm.storage.gcs import GcsUri


SCALE_METRICS = {
    "cpu": "aiplatform.googleapis.com/prediction/online/cpu/utilization",
    "gpu-duty-cycle": "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle",
    "requests": "aiplatform.googleapis.com/prediction/online/request_count",
}


DEFAULT_SCALE_TARGET = 60
DEFAULT_ROLLOUT_WAIT = DEFAULT_BAKE_SECONDS  # seconds a canary bakes before the rest of the traffic moves
CANARY_SAMPLES_MAX = 200  # sample requests a canary check sends at most, looking for one the new version serves
SERVING_PORT = 8080
HEALTH_ROUTE = "/health"
MAX_DEPLOYMENT_TIMEOUT = 7200  # Vertex's limit for container_spec.deployment_timeout
PROVISIONING_ALLOWANCE = 1800  # getting GPU machines can take longer than loading the model
DEFAULT_MACHINE = "g2-standard-8"  # what the planner sizes against when --instance is not given


def machine_of(plan: "Plan", default: str):
    instance = getattr(plan, "instance", None)
    if instance is not None:
        return instance
    from cloudllm.catalog import resolve

    return resolve("vertex", plan.spec.instance or default, plan.spec.accelerator)


def scale_metric(spec, machine) -> tuple[str, int] | None:
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


def deploy_deadline(plan: "Plan") -> float:
    return float(plan.spec.timeout or min(14_400, deployment_timeout(plan.bundle.total_bytes) + PROVISIONING_ALLOWANCE))


def short_deadline(plan: "Plan") -> float:
    """Registry and endpoint operations: minutes, whatever the model's size."""
    return float(max(600, plan.spec.timeout or 0))


def version_prefix(plan: "Plan") -> "GcsUri":
    from cloudllm.storage.gcs import GcsUri

    return GcsUri.parse(plan.spec.bucket).child(plan.spec.name, plan.bundle.stored.version_name)


def resources_line(plan: "Plan") -> str:
    try:
        machine = machine_of(plan, DEFAULT_MACHINE)
    except UserError:
        return plan.spec.instance or "?"
    count = plan.spec.min_instances if plan.spec.min_instances == plan.spec.max_instances else f"{plan.spec.min_instances}..{plan.spec.max_instances}"
    return f"{count}x {machine.label}"


def main_deployment(endpoint):
    """The deployed model taking the most traffic (the newest on a tie), or None."""
    from cloudllm.providers.vertex.models import first_models

    candidates = first_models(endpoint)  # an added model (--add-model) is never the endpoint's main one
    if not candidates:
        return None
    split = endpoint.traffic_split
    return max(candidates, key=lambda d: (split.get(d.id, 0), d.create_time or 0))


def give_all_to_first(split: dict[str, int]) -> dict[str, int]:
    keys = sorted(split)
    return {k: (100 if i == 0 else 0) for i, k in enumerate(keys)}


def pending_endpoint(plan: "Plan", endpoint: str, api_base: str) -> Endpoint:
    return Endpoint(
        name=plan.spec.name, provider="vertex", state="Creating", url=predict_url(api_base, endpoint),
        runtime=plan.runtime, details={"endpoint": endpoint},
    )  # fmt: skip


def accelerator_name(value) -> str:
    return getattr(value, "name", str(value))


def sample_body(plan: "Plan") -> dict:
    """A small request for a canary check: one generated token for generation tasks, one short text otherwise."""
    task = plan.model.task or ""
    if task in ("text-generation", "text2text-generation", "summarization") or task.startswith("translation"):
        return {"inputs": "Hello", "parameters": {"max_new_tokens": 1}}
    return {"inputs": "Hello"}


def rollout_line(plan: "Plan") -> str:
    if plan.spec.rollout.startswith("canary"):
        return f"{plan.spec.rollout}, baking {canary_bake_seconds(plan)}s before the rest moves"
    return plan.spec.rollout


def canary_bake_seconds(plan: "Plan") -> int:
    """--option rollout_wait: seconds a canary bakes before the rest of the traffic moves."""
    return rollout_of(plan.spec, plan.spec.options.get("rollout_wait"), watched=True).bake_s


def check_quantized_image(plan: "Plan") -> None:
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


class VertexChecks:
    """Offline and account checks of a plan, and the changes it would make."""

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
        machine = machine_of(plan, self.default_instance)
        if plan.runtime in ("tgi", "vllm") and not machine.gpu_count:
            raise UserError(
                f"the {plan.runtime} runtime needs a GPU and {machine.label} has none",
                "pick a GPU machine (e.g. --instance g2-standard-8) or --runtime handler",
            )
        scale_metric(spec, machine)
        if spec.rollout.startswith("linear"):
            raise UserError("Vertex AI moves traffic in one step or a canary", "use --rollout all-at-once or --rollout canary:PCT")
        canary_bake_seconds(plan)
        self._check_tenancy(plan)  # models.py: adapters per runtime, scale to zero (its idle period is --scale-in-cooldown)
        for key, value in spec.tags.items():
            if not label_ok(key) or not label_ok(value) or not key[:1].isalpha():
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
        check_quantized_image(plan)

    def preflight(self, plan: "Plan") -> None:
        """Checks against the account: a project, credentials, and a bucket we may list and write."""
        from cloudllm.storage.gcs import GcsArtifacts, GcsUri

        if not plan.spec.bucket:
            raise UserError("the vertex provider needs a bucket for the artifacts", "pass --bucket gs://BUCKET/PREFIX")
        GcsArtifacts(project=self.project).check_bucket(GcsUri.parse(plan.spec.bucket))

    def describe_changes(self, plan: "Plan") -> list[ResourceChange]:
        from cloudllm.providers.vertex.routes import check_endpoint_kind, wants_dedicated

        check_endpoint_kind(plan, plan.existing, wants_dedicated(self.options))  # an endpoint's DNS is fixed once it exists
        name = plan.spec.name
        if plan.action == "unchanged":
            return [ResourceChange(resource="endpoint", name=name, action="unchanged")]
        version = version_prefix(plan) if plan.spec.bucket else "gs://BUCKET/..."
        changes = [ResourceChange(resource="artifacts", name=str(version), action="create", reason="only files not already in GCS are uploaded")]
        if plan.action == "create":
            changes += [
                ResourceChange(resource="model", name=name, action="create"),
                ResourceChange(resource="endpoint", name=name, action="create"),
                ResourceChange(resource="deployed-model", name=name, action="create", reason=resources_line(plan)),
            ]
        elif plan.rescale_only:
            return [ResourceChange(resource="deployed-model", name=name, action="update", reason=f"autoscaling only, in place: {resources_line(plan)}")]
        elif plan.retag_only:
            return [ResourceChange(resource="endpoint", name=name, action="update", reason="tags only, in place: the endpoint and its serving model version are relabelled")]
        else:
            changes += [
                ResourceChange(resource="model-version", name=name, action="create", reason="; ".join(plan.reasons)),
                ResourceChange(resource="deployed-model", name=name, action="replace", reason=f"{rollout_line(plan)}; {resources_line(plan)}"),
            ]
        return changes
