"""DeploySpec: everything a deploy needs, from CLI flags, the Python API or cloudllm.yaml.

The field descriptions are the documentation: `cloudllm schema` prints them as JSON Schema.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from cloudllm.model_source import ModelInfo
    from cloudllm_runtime.settings import ServingSettings

# The strictest of the providers' rules (SageMaker endpoint names), so one name works everywhere.
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")

Runtime = Literal["handler", "tgi", "vllm"]


def check_endpoint_name(name: str) -> str:
    from cloudllm.errors import UserError

    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise UserError(
            f"invalid endpoint name {name!r}",
            "use 1-63 letters, digits and hyphens, starting and ending with a letter or digit",
        )
    return name


def default_endpoint_name(model_path: str | Path) -> str:
    """A valid endpoint name derived from the model folder's name ("./My_Model.v2" -> "My-Model-v2")."""
    base = Path(model_path).expanduser().resolve().name
    if base.startswith("models--"):  # hub cache folder: models--org--name
        base = base.split("--")[-1]
    name = re.sub(r"[^a-zA-Z0-9]+", "-", base).strip("-")[:63].strip("-")
    return name or "model"


class ServingOptions(BaseModel):
    """Knobs of the generated model server (code/settings.json). Unset fields keep the runtime's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_input_tokens: int | None = Field(None, ge=1, le=1_048_576, description="Longest prompt accepted, in tokens.")
    max_total_tokens: int | None = Field(
        None, ge=2, le=1_048_576, description="Prompt plus generated tokens per request; sizes the KV cache."
    )
    max_new_tokens: int | None = Field(None, ge=1, le=1_048_576, description="Cap on max_new_tokens a request may ask for.")
    max_batch_size: int | None = Field(None, ge=1, le=1024, description="Requests run together in one forward pass.")
    max_batch_wait_ms: float | None = Field(None, ge=0, le=10_000, description="How long the server waits to fill a batch.")
    max_concurrent_requests: int | None = Field(None, ge=1, le=100_000, description="In-flight requests before 429.")
    intra_op_threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads in the handler server; default: the CPUs the container may use."
    )
    dtype: str | None = Field(None, description="Serving dtype: auto, float32, float16, bfloat16.")
    log_payloads: bool | None = Field(None, description="Log prompt text (off by default: prompts can hold secrets).")


class DeploySpec(BaseModel):
    """One endpoint: which model, where, on what, and how it scales."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `--scale-target inf` must not reach a scaling policy

    name: str = Field(description="Endpoint name: 1-63 letters, digits and hyphens (valid on every provider).")
    model: str = Field(description="Path of the model folder (config.json + *.safetensors) or a hub cache folder.")
    provider: str = Field("local", description="Provider plugin: local, sagemaker, vertex, or an installed plugin.")
    task: str | None = Field(None, description="Pipeline task; inferred from config.json architectures when unset.")
    runtime: Runtime | None = Field(
        None, description="handler (generated app), tgi or vllm; default tgi for supported LLMs on clouds, else handler."
    )
    instance: str | None = Field(None, description="Instance or machine type, e.g. ml.g5.xlarge or g2-standard-8.")
    accelerator: str | None = Field(None, description="Vertex accelerator override, e.g. NVIDIA_L4 or NVIDIA_L4:2.")
    image: str | None = Field(None, description="Container image URI; default from the provider's image catalog.")
    quantize: str | None = Field(None, description="int8 / int4 (shipped weights) or an engine mode (bitsandbytes, eetq, fp8).")
    region: str | None = Field(None, description="Cloud region; default from the SDK's configuration.")
    bucket: str | None = Field(None, description="Artifact location: s3://bucket/prefix or gs://bucket/prefix.")
    min_instances: int = Field(1, ge=0, le=1000, description="Autoscaling floor.")
    max_instances: int = Field(1, ge=1, le=1000, description="Autoscaling ceiling.")
    scale_metric: str | None = Field(None, description="invocations|concurrency (SageMaker), cpu|gpu-duty-cycle|requests (Vertex).")
    scale_target: float | None = Field(None, gt=0, description="Target value of the scaling metric per instance.")
    scale_in_cooldown: int | None = Field(None, ge=0, le=86_400, description="Seconds between scale-in steps.")
    scale_out_cooldown: int | None = Field(None, ge=0, le=86_400, description="Seconds between scale-out steps.")
    rollout: str = Field("all-at-once", description="Update traffic shift: all-at-once, canary:PCT or linear:PCT.")
    timeout: int | None = Field(None, ge=60, le=14_400, description="Seconds to wait for the endpoint; sized from model bytes when unset.")
    allow_pickle: bool = Field(False, description="Ship *.bin/*.pt pickle weights (they can run code when loaded).")
    trust_remote_code: bool = Field(False, description="Let the model's own Python code run (config.json auto_map).")
    serving: ServingOptions = Field(default_factory=ServingOptions, description="Model server settings.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags/labels put on every cloud resource.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Provider-specific settings (role, project, profile, kms_key, vpc_subnets, ...).",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served beside the model: name -> PEFT adapter folder (requests pick one by name).",
    )
    add_model: str | None = Field(
        None, description="Deploy this model as one more model, named so, on the existing endpoint `name` (invoke --model picks it)."
    )

    @field_validator("adapters")
    @classmethod
    def _valid_adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        from cloudllm.adapters import ADAPTER_NAME, ADAPTER_NAME_RULE

        for name, path in value.items():
            if not ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r}: {ADAPTER_NAME_RULE}")
            if not path:
                raise ValueError(f"adapter {name!r} has no folder")
        return value

    @field_validator("add_model")
    @classmethod
    def _valid_model_name(cls, value: str | None) -> str | None:
        from cloudllm.adapters import ADAPTER_NAME, ADAPTER_NAME_RULE

        if value is not None and not ADAPTER_NAME.match(value):
            raise ValueError(f"model name {value!r}: {ADAPTER_NAME_RULE}")
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("use 1-63 letters, digits and hyphens, starting and ending with a letter or digit")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_without_trailing_slash(cls, value: str | None) -> str | None:
        # s3://b/models and s3://b/models/ are one location; one spelling keeps the digest stable.
        return value.rstrip("/") if value and value.rstrip("/") not in ("s3:", "gs:") else value

    @field_validator("rollout")
    @classmethod
    def _valid_rollout(cls, value: str) -> str:
        if value == "all-at-once":
            return value
        kind, _, pct = value.partition(":")
        if kind in ("canary", "linear") and pct.isdigit() and 1 <= int(pct) <= 99:
            return value
        raise ValueError("use all-at-once, canary:PCT or linear:PCT with PCT in 1..99")

    @model_validator(mode="after")
    def _min_le_max(self) -> "DeploySpec":
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) is above max_instances ({self.max_instances})")
        return self


def spec_from_kwargs(model: str | Path, **kwargs: Any) -> DeploySpec:
    """Build and validate a DeploySpec, turning pydantic errors into one UserError line."""
    from pydantic import ValidationError

    from cloudllm.errors import UserError

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.setdefault("name", default_endpoint_name(model))
    if "name" in kwargs:
        check_endpoint_name(kwargs["name"])
    try:
        return DeploySpec(model=str(model), **kwargs)
    except ValidationError as exc:
        raise UserError(*describe_validation_error(exc)) from None


def describe_validation_error(exc) -> tuple[str, str]:
    """(problem, fix) for the first error pydantic found."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "value"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown setting {field!r}", "remove it or check its spelling (`cloudllm schema` lists every setting)"
    return f"invalid {field}: {message}", "fix that setting (`cloudllm schema` describes every setting)"


def serving_settings(spec: DeploySpec, model: ModelInfo) -> ServingSettings:
    """The generated server's settings: the model's limits, then the spec's overrides."""
    from cloudllm_runtime.settings import ServingSettings

    config = model.config
    positions = config.get("max_position_embeddings") or config.get("n_positions") or config.get("max_seq_len")
    max_total = min(int(positions), 4096) if isinstance(positions, int) and positions > 1 else 2048
    settings = ServingSettings(
        task=model.task,
        architecture=model.architecture,
        model_type=model.model_type,
        max_total_tokens=max_total,
        max_input_tokens=max(1, max_total // 2),
        max_new_tokens=max(1, min(1024, max_total - 1)),
        trust_remote_code=model.trust_remote_code,
        quantization=model.quantization,
    )
    for key, value in spec.serving.model_dump(exclude_none=True).items():
        setattr(settings, key, value)
    settings.default_max_new_tokens = min(settings.default_max_new_tokens, settings.max_new_tokens)
    return settings
