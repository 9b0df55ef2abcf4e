"""What a Plan becomes on SageMaker: names, container environment, sizes, tags, rollout and scaling.

Pure functions of the plan, so `describe_changes` and the tests can read them without AWS.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from cloudllm import __version__
from cloudllm.errors import UserError

if TYPE_CHECKING:
    from cloudllm.plan import Plan
    from cloudllm.providers.kit.rollout import Rollout

VARIANT = "AllTraffic"  # the SDK's variant name; an update keeps it (UpdateEndpoint requires the same name)
MODEL_DIR = "/opt/ml/model"
DEFAULT_INSTANCE = "ml.g5.xlarge"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_POLICY = "cloudllm-target-tracking"
GiB = 1024**3

# Tags: the endpoint carries ENDPOINT and ARTIFACTS; each endpoint config carries the plan's
# fingerprint, so the config an endpoint runs says what is deployed (also after a rollback).
TAG = "cloudllm:"
ENDPOINT_TAG = TAG + "endpoint"
ARTIFACTS_TAG = TAG + "artifacts"  # s3:// root holding every version of this endpoint
VERSION_TAG = TAG + "artifact"  # the version prefix a config's model reads
# On the endpoint, the digest of the last deploy that finished every step (autoscaling, tags).
# A deploy killed after InService but before those steps leaves it behind, and the next run finishes it.
FINISHED_TAG = TAG + "finished"
FINGERPRINT_TAGS = {
    "weights_digest": TAG + "weights-digest",
    "code_digest": TAG + "code-digest",
    "deploy_digest": TAG + "deploy-digest",
    "scaling_digest": TAG + "scaling-digest",
    "adapters_digest": TAG + "adapters-digest",  # absent without adapters
    "tags_digest": TAG + "tags-digest",
    "digest": TAG + "digest",
}
MAX_TAGS = 50
# The HF PyTorch inference DLCs (CPU and GPU builds, Inferentia 1 and 2): repositories in the SDK's huggingface tables.
_TOOLKIT_REPOSITORIES = frozenset({"huggingface-pytorch-inference", "huggingface-pytorch-inference-neuron", "huggingface-pytorch-inference-neuronx"})
_TAG_TEXT = re.compile(r"^[\w\s.:/=+\-@]*$")

# Instance families with local NVMe storage: SageMaker mounts that instead of an EBS volume
# and refuses VolumeSizeInGB (and a volume KmsKeyId) for them.
_NVME_FAMILIES = {
    "g4dn", "g5", "g6", "g6e", "g7", "g7e", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en",
    "p6-b200", "p6-b300", "p6e-gb200", "trn1", "trn1n", "trn2",
}  # fmt: skip


def known_instance_types() -> frozenset[str]:
    """Instance types SageMaker hosting accepts, from botocore's current service model (not a copy)."""
    from cloudllm.catalog.instances import platform_names

    return platform_names("sagemaker")


def family(instance: str) -> str:
    """ml.g5.xlarge -> g5."""
    parts = instance.split(".")
    return parts[1] if len(parts) == 3 else ""


def has_local_storage(instance: str) -> bool:
    fam = family(instance)
    return fam in _NVME_FAMILIES or fam.endswith("d")  # c5d, m5d, r5d, c6gd, ...


def processor(instance: str) -> str:
    """The image processor an instance needs: gpu, cpu, or neuron (Inferentia/Trainium)."""
    fam = family(instance)
    if fam.startswith(("inf", "trn")):
        return "neuron"
    return "gpu" if fam[:1] in ("g", "p") else "cpu"


def gpu_count(instance: str, options: dict | None = None) -> int | None:
    """NVIDIA GPUs per instance: the catalog's count, else `--option num_gpus=N`; None for a GPU type neither knows.

    A guess would be wrong both ways: too few leaves GPUs idle, too many makes TGI/vLLM fail to start.
    """
    from cloudllm.catalog import lookup

    given = None
    if (options or {}).get("num_gpus") is not None:
        given = _int_option(options, "num_gpus", 8, 1, 64)
    row = lookup("sagemaker", instance)
    known = row.gpu_count if row is not None else (None if processor(instance) == "gpu" else 0)
    if given is not None and known is not None and given != known:
        why = "cloudllm's instance catalog knows this type" if row is not None else f"{instance} has no NVIDIA GPU"
        raise UserError(f"--option num_gpus={given} does not match {instance}, which has {known} NVIDIA GPU(s)", f"drop --option num_gpus: {why}")
    return known if known is not None else given


def runs_toolkit(image: str) -> bool:
    """The image is a Hugging Face PyTorch inference DLC: it serves code/inference.py through the HF
    inference toolkit (one whole answer per request, no streaming), not the artifact's code/serve.py."""
    repository = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    return repository in _TOOLKIT_REPOSITORIES


# --- names ---------------------------------------------------------------------------------
def version_names(endpoint: str, digest: str, now: datetime | None = None) -> str:
    """The model and endpoint-config name of one deployed version: <endpoint>-<digest8>-<yymmddHHMMSS>."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%y%m%d%H%M%S")
    suffix = f"-{digest[:8]}-{stamp}"
    base = endpoint[: 63 - len(suffix)].rstrip("-")
    return base + suffix


def name_prefix(endpoint: str) -> str:
    """What every version name of an endpoint starts with (for ListModels NameContains)."""
    return endpoint[: 63 - len("-12345678-yymmddHHMMSS")].rstrip("-") + "-"


# --- sizes and timeouts ---------------------------------------------------------------------
@dataclass(frozen=True)
class Sizing:
    volume_gb: int | None  # None on instances with local NVMe storage
    download_timeout: int  # ModelDataDownloadTimeoutInSeconds
    startup_timeout: int  # ContainerStartupHealthCheckTimeoutInSeconds
    wait_timeout: int  # how long deploy waits for InService


def sizing(plan: "Plan", instance: str) -> Sizing:
    """Volume and timeouts from the artifact's bytes; each overridable with --option.

    Downloads are budgeted at 50 MiB/s (S3 to an instance usually runs faster) and loading at
    100 MiB/s plus the engine's warm-up (TGI and vLLM profile memory and capture CUDA graphs).
    """
    options = plan.spec.options
    gib = (plan.bundle.total_bytes + len(plan.bundle.manifest_bytes)) / GiB
    volume = None
    if not has_local_storage(instance):
        volume = _int_option(options, "volume_size", math.ceil(gib * 1.25) + 10, 1, 512)
        if volume > 512:
            raise UserError(
                f"the model needs a {volume} GB volume, above SageMaker's 512 GB on {instance}",
                "pick an instance with local NVMe storage (ml.g5, ml.g6, ml.p4d, ...), which needs no volume",
            )
    download = _int_option(options, "download_timeout", _clamp(300 + math.ceil(gib * 1024 / 50)), 60, 3600)
    warmup = 600 if plan.runtime in ("tgi", "vllm") else 300
    startup = _int_option(options, "startup_timeout", _clamp(warmup + math.ceil(gib * 1024 / 100)), 60, 3600)
    wait = plan.spec.timeout or download + startup + 900  # + instance provisioning and image pull
    return Sizing(volume_gb=volume, download_timeout=download, startup_timeout=startup, wait_timeout=wait)


def _clamp(seconds: int, low: int = 60, high: int = 3600) -> int:
    return max(low, min(high, seconds))


def _int_option(options: dict, key: str, default: int, low: int, high: int) -> int:
    value = options.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not low <= number <= high:
        raise UserError(f"--option {key}={value} is not a whole number in {low}..{high}", f"pass e.g. --option {key}={default}")
    return number


# --- the container ----------------------------------------------------------------------------
def container_env(plan: "Plan", instance: str, sizes: Sizing, region: str) -> dict[str, str]:
    """Environment of the serving container, per runtime (see CONTRACTS.md).

    TGI and vLLM shard over as many of the instance's GPUs as the attention heads split into
    (plan.shard_count): SageMaker runs one container per instance, so more shards mean more KV
    cache, but a degree that does not divide the heads stops the engine at start.
    """
    settings = plan.settings
    gpus = plan.shard_count(gpu_count(instance, plan.spec.options) or 1)
    from cloudllm.quantize import plan_quantize_env

    quantize_env = plan_quantize_env(plan)
    # TGI's launcher refuses --dtype together with --quantize.
    dtype = settings.dtype if settings.dtype in ("float16", "bfloat16") and not quantize_env else None
    if plan.runtime == "tgi":
        env = {
            "HF_MODEL_ID": MODEL_DIR,
            "SM_NUM_GPUS": str(gpus),
            "MAX_INPUT_TOKENS": str(settings.max_input_tokens),
            "MAX_TOTAL_TOKENS": str(settings.max_total_tokens),
            "MAX_CONCURRENT_REQUESTS": str(settings.max_concurrent_requests),
        }
        env.update(quantize_env)
        if dtype:
            env["DTYPE"] = dtype
        if settings.trust_remote_code:
            env["HF_MODEL_TRUST_REMOTE_CODE"] = "true"
    elif plan.runtime == "vllm":
        env = {
            "HF_MODEL_ID": MODEL_DIR,
            "OPTION_ROLLING_BATCH": "vllm",
            "TENSOR_PARALLEL_DEGREE": str(gpus),
            "OPTION_MAX_ROLLING_BATCH_SIZE": str(settings.max_batch_size),
            "OPTION_MAX_MODEL_LEN": str(settings.max_total_tokens),
            # The startup health check must outlast model loading (CONTRACTS.md).
            "OPTION_MODEL_LOADING_TIMEOUT": str(sizes.startup_timeout),
        }
        env.update(quantize_env)
        if dtype:
            env["OPTION_DTYPE"] = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
        if settings.trust_remote_code:
            env["OPTION_TRUST_REMOTE_CODE"] = "true"
    else:
        # The HF inference toolkit finds code/inference.py under /opt/ml/model by itself; the
        # SAGEMAKER_* names are those the SDK sets for the same layout.
        env = {
            "HF_TASK": settings.task,
            "SAGEMAKER_PROGRAM": "inference.py",
            "SAGEMAKER_SUBMIT_DIRECTORY": f"{MODEL_DIR}/code",
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
            "SAGEMAKER_REGION": region,
            "SAGEMAKER_MODEL_SERVER_WORKERS": "1",  # one copy of an LLM per instance
        }
    env.update(plan.bundle.settings_env)  # the artifact (bundle.stored) leaves them out
    return env


# --- rollout and scaling -----------------------------------------------------------------------
def deployment_config(rollout: "Rollout", alarms: list[str]) -> dict[str, Any]:
    """UpdateEndpoint's blue/green DeploymentConfig for all-at-once, canary:PCT or linear:PCT (bake time watched by the alarms)."""
    wait_seconds = rollout.bake_s
    routing: dict[str, Any] = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": wait_seconds}
    if rollout.kind == "canary":
        routing = {"Type": "CANARY", "WaitIntervalInSeconds": wait_seconds, "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": rollout.percent}}
    elif rollout.kind == "linear":
        routing = {"Type": "LINEAR", "WaitIntervalInSeconds": wait_seconds, "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": rollout.percent}}
    config: dict[str, Any] = {"BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": 0}}
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": name} for name in alarms]}
    return config


def rollout_seconds(config: dict[str, Any]) -> int:
    """How long the traffic shift itself takes (added to the wait deadline of an update)."""
    routing = config["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    wait = routing["WaitIntervalInSeconds"]
    if routing["Type"] == "LINEAR":
        return wait * math.ceil(100 / routing["LinearStepSize"]["Value"])
    return wait * (2 if routing["Type"] == "CANARY" else 1)


SCALE_METRICS = {
    # metric -> (PredefinedMetricType, what the target means)
    "invocations": ("SageMakerVariantInvocationsPerInstance", "invocations per instance per minute"),
    "concurrency": ("SageMakerVariantConcurrentRequestsPerModelHighResolution", "concurrent requests per instance"),
}


def autoscaled(plan: "Plan") -> bool:
    spec = plan.spec
    return spec.max_instances > 1 or spec.min_instances > 1 or bool(spec.scale_metric or spec.scale_target)


def scaling_policy(plan: "Plan") -> dict[str, Any]:
    """TargetTrackingScalingPolicyConfiguration for the spec's metric and target."""
    spec = plan.spec
    metric = spec.scale_metric or "invocations"
    if metric not in SCALE_METRICS:
        raise UserError(f"unknown --scale-metric {metric!r} for SageMaker", f"use one of: {', '.join(SCALE_METRICS)}")
    metric_type = SCALE_METRICS[metric][0]
    # 60/min keeps an LLM instance busy without queueing; concurrency targets one full batch.
    target = spec.scale_target or (60.0 if metric == "invocations" else float(plan.settings.max_batch_size))
    return {
        "TargetValue": float(target),
        "PredefinedMetricSpecification": {"PredefinedMetricType": metric_type},
        "ScaleInCooldown": spec.scale_in_cooldown if spec.scale_in_cooldown is not None else 300,
        "ScaleOutCooldown": spec.scale_out_cooldown if spec.scale_out_cooldown is not None else 60,
    }


def scaling_resource_id(endpoint: str) -> str:
    return f"endpoint/{endpoint}/variant/{VARIANT}"


# --- tags ---------------------------------------------------------------------------------------
def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def tag_dict(tags: list[dict[str, str]]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags}


def endpoint_tags(plan: "Plan", artifacts_root: str) -> dict[str, str]:
    return {**plan.spec.tags, ENDPOINT_TAG: plan.spec.name, ARTIFACTS_TAG: artifacts_root, TAG + "version": __version__}


def version_tags(plan: "Plan", instance: str, artifact: str) -> dict[str, str]:
    """Tags of a version's model and endpoint config: what runs, and the plan's fingerprint."""
    source = re.sub(r"[^\w.:/=+\-@]", "-", plan.model.path.rstrip("/").rsplit("/", 1)[-1])[:256]
    tags = {
        **plan.spec.tags,
        ENDPOINT_TAG: plan.spec.name,
        VERSION_TAG: artifact,
        TAG + "runtime": plan.runtime,
        TAG + "instance": instance,
        TAG + "model": source,
    }
    return {**tags, **fingerprint_tags(plan)}


def fingerprint_tags(plan: "Plan") -> dict[str, str]:
    """The plan's fingerprint as tags of a version's model and config: what `get` reads back to compare."""
    fingerprint = plan.fingerprint
    return {tag: fingerprint[key] for key, tag in FINGERPRINT_TAGS.items() if fingerprint.get(key) is not None}


def check_user_tags(tags: dict[str, str]) -> None:
    """SageMaker's tag rules, checked before anything is created."""
    own = 5 + len(FINGERPRINT_TAGS)  # what version_tags adds on a model and endpoint config
    if len(tags) > MAX_TAGS - own:
        raise UserError(f"{len(tags)} tags are too many", f"SageMaker allows {MAX_TAGS} per resource and cloudllm uses {own}: pass at most {MAX_TAGS - own}")
    for key, value in tags.items():
        if not 1 <= len(key) <= 128 or len(value) > 256 or not _TAG_TEXT.match(key) or not _TAG_TEXT.match(value):
            raise UserError(
                f"tag {key}={value} is not a valid SageMaker tag",
                "keys 1-128 and values up to 256 characters of letters, digits, spaces and _.:/=+-@",
            )
        if key.lower().startswith(("aws:", TAG)):
            raise UserError(f"tag key {key!r} uses a reserved prefix", "tag keys may not start with aws: or cloudllm:")
