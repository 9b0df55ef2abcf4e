"""Plan: what deploy will do, decided before anything is created.

The plan is the one object every provider executes. It holds the inspected model,
the serving settings, the bundle (artifact) and, compared against what is deployed,
the action (create, update, unchanged) with the reasons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from cloudllm.hashing import sha256_bytes
from cloudllm.model_source import ModelInfo
from cloudllm.providers.base import Endpoint, Feature, ResourceChange
from cloudllm.spec import DeploySpec
from cloudllm_runtime.settings import ServingSettings

if TYPE_CHECKING:
    from cloudllm.bundle import Bundle
    from cloudllm.providers.base import Provider

Action = Literal["create", "update", "unchanged"]

# Spec fields that say how to roll out or where the model came from, not what runs:
# changing them alone does not redeploy anything.
_NOT_DEPLOYED = {"name", "model", "rollout", "timeout", "task", "allow_pickle", "trust_remote_code", "serving"}


@dataclass
class Plan:
    spec: DeploySpec
    model: ModelInfo
    settings: ServingSettings
    bundle: "Bundle"
    runtime: str
    existing: Endpoint | None = None
    action: Action = "create"
    reasons: list[str] = field(default_factory=list)
    changes: list[ResourceChange] = field(default_factory=list)
    wait: bool = True  # False: return once the platform accepted the request (--no-wait)

    @property
    def deploy_digest(self) -> str:
        settings = self.spec.model_dump(mode="json", exclude=_NOT_DEPLOYED)
        settings["runtime"] = self.runtime
        return sha256_bytes(json.dumps(settings, sort_keys=True).encode())

    @property
    def fingerprint(self) -> dict[str, str]:
        """Digests a provider stores with the endpoint, so the next plan can say what changed."""
        manifest = self.bundle.manifest
        parts = {
            "weights_digest": manifest.weights_digest,
            "code_digest": manifest.code_digest,
            "deploy_digest": self.deploy_digest,
        }
        parts["digest"] = sha256_bytes(json.dumps(parts, sort_keys=True).encode())
        return parts

    @property
    def digest(self) -> str:
        return self.fingerprint["digest"]


def required_features(spec: DeploySpec, runtime: str) -> set[Feature]:
    features = set()
    if spec.instance:
        features.add(Feature.INSTANCE_TYPES)
    if spec.max_instances > 1:
        features.add(Feature.AUTOSCALING)
    if spec.min_instances == 0:
        features.add(Feature.SCALE_TO_ZERO)
    if spec.rollout != "all-at-once":
        features.add(Feature.TRAFFIC_SHIFTING)
    if runtime in ("tgi", "vllm"):
        features.add(Feature.ENGINE_RUNTIMES)
    return features


def serving_settings(spec: DeploySpec, model: ModelInfo) -> ServingSettings:
    """The generated server's settings: the model's limits, then the spec's overrides."""
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


def compare(plan: Plan) -> tuple[Action, list[str]]:
    """Create, update or unchanged, with the reasons, from what the provider reports is deployed."""
    existing = plan.existing
    if existing is None:
        return "create", ["new endpoint"]
    if existing.state.lower() in ("failed", "stopped", "dead"):
        return "update", [f"endpoint is {existing.state}"]
    had = existing.details
    now = plan.fingerprint
    reasons = [
        label
        for key, label in (
            ("weights_digest", "weights changed"),
            ("code_digest", "code or serving settings changed"),
            ("deploy_digest", "deployment settings changed"),
        )
        if had.get(key) != now[key]
    ]
    return ("update", reasons) if reasons else ("unchanged", ["nothing changed"])


def make_plan(spec: DeploySpec, provider: "Provider") -> Plan:
    """Inspect, lay out the bundle in memory, and compare with what is deployed. Creates nothing."""
    from cloudllm.bundle import build_bundle
    from cloudllm.model_source import inspect_model

    model = inspect_model(
        spec.model, task=spec.task, allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code
    )
    runtime = spec.runtime or provider.default_runtime(spec, model)
    provider.require(required_features(spec, runtime))
    settings = serving_settings(spec, model)
    bundle = build_bundle(model, settings, build={"runtime": runtime})
    plan = Plan(spec=spec, model=model, settings=settings, bundle=bundle, runtime=runtime)
    provider.validate(plan)
    plan.existing = provider.get(spec.name)
    plan.action, plan.reasons = compare(plan)
    plan.changes = provider.describe_changes(plan)
    return plan
