"""Plan: what deploy will do, decided before anything is created.

The plan is the one object every provider executes. It holds the inspected model,
the serving settings, the bundle (artifact) and, compared against what is deployed,
the action (create, update, unchanged) with the reasons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, Field

from cloudllm.adapters import AdapterInfo
from cloudllm.catalog.instances import InstanceType
from cloudllm.errors import PlanRefused, UserError
from cloudllm.fit import CostEstimate, FitReport
from cloudllm.fit.sharing import SharedFit
from cloudllm.hashing import sha256_bytes
from cloudllm.model_source import ModelInfo
from cloudllm.types import Endpoint, Feature, ResourceChange
from cloudllm.spec import DeploySpec, serving_settings  # serving_settings: also read from here
from cloudllm_runtime.settings import ServingSettings

if TYPE_CHECKING:
    from cloudllm.bundle import Bundle
    from cloudllm.console import Reporter

Action = Literal["create", "update", "unchanged", "unknown"]
PlanMode = Literal["plan", "check", "deploy"]

# Spec fields that say how to roll out, where the model came from or where the endpoint lives,
# not what runs: changing them alone does not redeploy anything. (Another region or project
# holds another endpoint: `get` there finds none and the plan says create.)
_NOT_DEPLOYED = {"name", "model", "rollout", "timeout", "task", "allow_pickle", "trust_remote_code", "serving", "region"}
# Adapters are digested by content (adapters_digest), not by the folders they came from, so a
# provider can add or remove them in place (plan.adapters_only) and a moved folder changes nothing.
_ADAPTERS = {"adapters"}
# Provider options of the same kind: credentials, rollout pacing and safety nets.
# dedicated_endpoint: the endpoint's own, fixed when it is created and checked against it (vertex/routes.py).
_OPTIONS_NOT_DEPLOYED = {"dedicated_endpoint", "force", "profile", "project", "rollback_alarms", "rollout_wait"}
# How the fleet scales: digested apart, so a provider can change autoscaling in place
# (SageMaker: the scalable target and policy; Vertex AI: MutateDeployedModel) instead of
# standing up a second fleet for it.
_SCALING = {"min_instances", "max_instances", "scale_metric", "scale_target", "scale_in_cooldown", "scale_out_cooldown"}
# The fingerprint's parts: each says what kind of change a plan makes ("digest" is of them all).
_PARTS = ("weights_digest", "code_digest", "deploy_digest", "scaling_digest", "tags_digest", "adapters_digest")


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
    instance: InstanceType | None = None  # catalog entry of spec.instance (None: local, or not in the catalog)
    fit: FitReport | None = None
    cost: CostEstimate | None = None
    quantize_pending: str | None = None  # "int8"/"int4": not quantized yet (plan, --dry-run); sizes are estimates
    adapters: list[AdapterInfo] = field(default_factory=list)  # spec.adapters, inspected and checked against the base
    warnings: list[str] = field(default_factory=list)  # worth saying, not worth refusing (an adapter trained on another base name)
    sharing: SharedFit | None = None  # several models on one endpoint: do all their reservations fit its instances together

    @property
    def deploy_digest(self) -> str:
        return self.deploy_digest_with_tags(tags=None)

    def deploy_digest_with_tags(self, tags: dict[str, str] | None) -> str:
        """deploy_digest; given tags, as endpoints deployed before tags_digest existed have it (the tags inside)."""
        settings = self.spec.model_dump(mode="json", exclude=_NOT_DEPLOYED | _SCALING | _ADAPTERS | {"tags"})
        for key in _OPTIONS_NOT_DEPLOYED:  # --force overrides the fit check; it deploys nothing different
            settings.get("options", {}).pop(key, None)
        settings["runtime"] = self.runtime
        if tags is not None:
            settings["tags"] = tags
        return sha256_bytes(json.dumps(settings, sort_keys=True).encode())

    @property
    def tags_digest(self) -> str:
        return sha256_bytes(json.dumps(self.spec.tags, sort_keys=True).encode())

    @property
    def scaling_digest(self) -> str:
        return sha256_bytes(json.dumps(self.spec.model_dump(mode="json", include=_SCALING), sort_keys=True).encode())

    @property
    def adapter_digests(self) -> dict[str, str]:
        """{adapter name: content digest} of the plan's adapters (what a provider uploads to adapters/<digest>/)."""
        from cloudllm.adapters import adapter_digest

        if getattr(self, "_adapter_digests", None) is None:
            self._adapter_digests = {a.name: adapter_digest(a) for a in self.adapters}
        return self._adapter_digests

    @property
    def fingerprint(self) -> dict[str, str | None]:
        """Digests a provider stores with the endpoint, so the next plan can say what changed."""
        from cloudllm.adapters import adapters_digest

        manifest = self.bundle.manifest
        parts = {
            "weights_digest": manifest.weights_digest,
            "code_digest": manifest.code_digest,
            "deploy_digest": self.deploy_digest,
            "scaling_digest": self.scaling_digest,
            "adapters_digest": adapters_digest(self.adapter_digests),
            "tags_digest": self.tags_digest,
        }
        parts["digest"] = fingerprint_digest(parts)
        return parts

    @property
    def digest(self) -> str:
        return self.fingerprint["digest"]

    @property
    def rescale_only(self) -> bool:
        """An update of an InService endpoint whose only change is autoscaling (min/max instances,
        metric, target, cooldowns), tags perhaps too: what runs is the same, so a provider that can
        may apply it in place (and retag on the way)."""
        changed = self._changed_in_place()
        return "scaling_digest" in changed and changed <= {"scaling_digest", "tags_digest"}

    @property
    def retag_only(self) -> bool:
        """An update of an InService endpoint whose only change is its tags: a provider that can retags it in place."""
        return self._changed_in_place() == {"tags_digest"}

    def _changed_in_place(self) -> set[str]:
        """changed_parts() of an update a provider may make in place (InService, nothing unfinished); else empty."""
        existing = self.existing
        if self.action != "update" or existing is None or existing.state != "InService" or existing.unfinished:
            return set()
        return self.changed_parts()

    def changed_parts(self) -> set[str]:
        """The fingerprint keys (weights_digest ... tags_digest) whose digest differs from what is deployed.

        An endpoint deployed before tags_digest existed has its tags inside deploy_digest: that digest
        is recomputed with the tags the provider reports it has (so a change of tags alone is still
        told apart), or, where it reports none, with the spec's tags (a tags change then reads as a
        deployment change, as it did when that endpoint was deployed).
        """
        if self.existing is None:
            return set(_PARTS)
        had, now = self.existing.fingerprint, self.fingerprint
        changed = {key for key in _PARTS if getattr(had, key) != now[key]}
        if had.tags_digest is None:
            reported = reported_tags(self.existing)
            changed -= {"deploy_digest", "tags_digest"}
            if had.deploy_digest != self.deploy_digest_with_tags(tags=self.spec.tags if reported is None else reported):
                changed.add("deploy_digest")
            if reported is not None and reported != self.spec.tags:
                changed.add("tags_digest")
        return changed

    @property
    def adapters_only(self) -> bool:
        """An update of an InService endpoint whose only change is its adapters: the base stays as it
        runs, so a provider that can adds and removes adapters in place (no restart, no new fleet)."""
        return self._changed_in_place() == {"adapters_digest"}

    @property
    def shards(self) -> int | None:
        """GPUs to shard over (TGI NUM_SHARD / vLLM tensor parallel degree); None when unknown or on CPU."""
        return self.fit.shards if self.fit else None

    def shard_count(self, gpus: int) -> int:
        """GPUs the tgi/vllm engine shards over on an instance with `gpus` GPUs (NUM_SHARD, SM_NUM_GPUS, tensor parallel degree)."""
        from cloudllm.fit import engine_shard_count

        return engine_shard_count(self.model, gpus)

    def report(self) -> "PlanReport":
        """The plan as its stable JSON document (docs/plan-schema.json)."""
        return PlanReport.from_plan(self)

    def _gpu_use(self) -> str:
        """Engines shard over every GPU of their instance (the instance is theirs alone, and the
        spare memory becomes KV cache); `shards` is the fewest that would hold the model."""
        gpus = self.shard_count(self.instance.gpu_count) if self.instance and self.instance.gpu_count else 0
        if self.runtime in ("tgi", "vllm") and gpus > (self.shards or 0):
            return f"sharded over {gpus} GPUs, fits on {self.shards}"
        return f"{self.shards} GPU{'s' if self.shards != 1 else ''}"

    def headline(self) -> str:
        """One line: the action, where, and the verdict ("create endpoint demo on ml.g5.xlarge (tgi, 1 GPU): fits ...")."""
        where = f" on {self.instance.label}" if self.instance else (f" on {self.spec.instance}" if self.spec.instance else "")
        shards = f", {self._gpu_use()}" if self.shards else ""
        line = f"{self.action} endpoint {self.spec.name} ({self.spec.provider}){where} ({self.runtime}{shards})"
        if self.fit:
            line += f": {self.fit.summary}"
        if self.sharing:
            line += "; its models together: " + (f"fit on {self.sharing.instances_needed} instance(s)" if self.sharing.fits else "do not fit")
        if self.cost and self.cost.per_hour_min is not None:
            line += f"; ${self.cost.per_hour_min:,.2f}" + (
                f"-${self.cost.per_hour_max:,.2f}/h" if self.cost.per_hour_max != self.cost.per_hour_min else "/h"
            )
        return line

    def describe(self) -> list[str]:
        """The plan for people: model, resources, memory and verdict, cost, and the diff with reasons."""
        model = self.model
        params = "parameters unknown"
        if model.parameters:
            params = f"{model.parameters / 1e9:,.2f}B" if model.parameters >= 1e9 else f"{model.parameters / 1e6:,.1f}M"
            params += " parameters"
        lines = [f"plan for endpoint {self.spec.name} on {self.spec.provider}" + (f" ({self.spec.region})" if self.spec.region else "")]
        lines.append(f"  model:    {model.path}: {model.architecture or model.model_type}, {params}, {model.dtype}")
        where = f"{self.instance.label}: {self.instance.describe()}" if self.instance else (self.spec.instance or "this machine")
        count = self.spec.min_instances if self.spec.min_instances == self.spec.max_instances else f"{self.spec.min_instances}..{self.spec.max_instances}"
        shards = f", {self._gpu_use()}" if self.shards else ""
        lines.append(f"  runtime:  {self.runtime} on {where}, {count} instance(s){shards}")
        if self.fit:
            fit_lines = self.fit.lines()
            lines.append(f"  fit:      {fit_lines[0]}")
            lines += [f"            {line}" for line in fit_lines[1:]]
        if self.sharing:
            shared = self.sharing.lines()
            lines.append(f"  shared:   {shared[0]}")
            lines += [f"            {line}" for line in shared[1:]]
        for adapter in self.adapters:
            lines.append(f"  adapter:  {adapter.name}: rank {adapter.rank}, {len(adapter.target_modules)} modules, {adapter.weight_bytes:,} bytes ({adapter.path})")
        for warning in self.warnings:
            lines.append(f"  warning:  {warning}")
        if self.quantize_pending:
            lines.append(f"  weights:  {self.quantize_pending} estimated, not quantized yet: deploy quantizes them (once; cached in $CLOUDLLM_HOME/quantized)")
        if self.cost:
            lines.append(f"  cost:     {self.cost.line()}")
        elif self.spec.provider == "local":
            lines.append("  cost:     none (this machine)")
        lines.append(f"  action:   {self.action} ({'; '.join(self.reasons)})")
        for change in self.changes:
            reason = f"  ({change.reason})" if change.reason else ""
            lines.append(f"  {change.action:>9} {change.resource} {change.name}{reason}")
        return lines


def fingerprint_digest(parts: dict[str, str | None]) -> str:
    """The one digest of a fingerprint's parts; parts that are None (no adapters) are left out, so
    endpoints deployed before a part existed keep their digest."""
    present = {k: v for k, v in parts.items() if v is not None and k != "digest"}
    return sha256_bytes(json.dumps(present, sort_keys=True).encode())


def refuse_unless_fits(plan: Plan) -> None:
    """PlanRefused when the verdict is "does not fit" (the model alone, or the endpoint's models together) and the spec has no force option."""
    shared = plan.sharing
    if shared is not None and not shared.fits and not plan.spec.options.get("force"):
        raise PlanRefused(shared.summary, f"{shared.fix}, or pass --force to deploy anyway")
    fit = plan.fit
    if fit is None or fit.fits is not False or plan.spec.options.get("force"):
        return
    fixes = [f"--instance {s.instance}" + (f" --accelerator {s.accelerator}" if s.accelerator else "") for s in fit.suggestions[:1]]
    fixes += [f"--quantize {mode}" for mode, ok in fit.quantize_would_fit.items() if ok][:1]
    if fit.max_batch_that_fits and fit.max_batch_that_fits < fit.max_batch:
        fixes.append(f"--max-batch {fit.max_batch_that_fits}")
    fix = f"try {', '.join(fixes)}, or pass --force to deploy anyway" if fixes else "pass --force to deploy anyway"
    raise PlanRefused(fit.summary, fix)


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
    if spec.adapters:
        features.add(Feature.ADAPTERS)
    if spec.add_model:
        features.add(Feature.MULTI_MODEL)
    return features


def compare(plan: Plan) -> tuple[Action, list[str]]:
    """Create, update or unchanged, with the reasons, from what the provider reports is deployed."""
    existing = plan.existing
    if existing is None:
        return "create", ["new endpoint"]
    if plan.quantize_pending:
        return "unknown", [f"the {plan.quantize_pending} weights are not quantized on this machine yet: deploy quantizes them, then compares"]
    if plan.spec.add_model:  # existing's fingerprint is its first model's: the provider's changes say what happens to this one
        return "update", [f"model {plan.spec.add_model} beside the endpoint's first model"]
    if existing.state.lower() in ("failed", "stopped", "dead"):
        return "update", [f"endpoint is {existing.state}"]
    if existing.unfinished:
        return "update", [f"endpoint is {existing.state}: an earlier deploy has not finished"]
    changed = plan.changed_parts()
    reasons = [
        label
        for key, label in (
            ("weights_digest", "weights changed"),
            ("code_digest", "code or serving settings changed"),
        )
        if key in changed
    ]
    weights_unknown = "weights changed" in reasons and not plan.bundle.exact
    if weights_unknown:  # identities, not hashes: they cannot match a deployed digest
        reasons.remove("weights changed")
    if "deploy_digest" in changed:
        reasons += _deployment_changes(plan, existing) or ["deployment settings changed"]
    if "tags_digest" in changed:
        reasons.append(_tag_changes(plan, existing))
    if "scaling_digest" in changed:
        spec = plan.spec
        reasons.append(f"autoscaling changed (now {spec.min_instances}-{spec.max_instances} instances)")
    if "adapters_digest" in changed:
        names = ", ".join(a.name for a in plan.adapters) or "none"
        reasons.append(f"adapters changed (now: {names})")
    if weights_unknown:
        unhashed = "the weights are not hashed on this machine yet: deploy hashes them (while it checks the account) and compares (`cloudllm package` hashes them now)"
        return ("update", [*reasons, unhashed]) if reasons else ("unknown", [unhashed])
    return ("update", reasons) if reasons else ("unchanged", ["nothing changed"])


def _deployment_changes(plan: Plan, existing: Endpoint) -> list[str]:
    """The deployment settings that changed, where the provider reports them ("instance ml.g5.xlarge -> ml.g6.xlarge")."""
    asked = plan.instance.name if plan.instance else plan.spec.instance
    changed = []
    if existing.instance and asked and existing.instance != asked:
        changed.append(f"instance {existing.instance} -> {asked}")
    if existing.runtime and existing.runtime != plan.runtime:
        changed.append(f"runtime {existing.runtime} -> {plan.runtime}")
    return changed


def reported_tags(existing: Endpoint) -> dict[str, str] | None:
    """The user's tags a provider reports an endpoint has (details["tags"]); None when it reports none."""
    tags = existing.details.get("tags")
    return tags if isinstance(tags, dict) else None


def _tag_changes(plan: Plan, existing: Endpoint) -> str:
    """"tags changed (team a -> b, +owner, -old)", from the tags (or, failing them, the labels) the provider reports."""
    # Labels hold the provider's own among the user's: removals only from tags.
    reported = existing.details.get("tags", existing.details.get("labels"))
    moved = []
    if isinstance(reported, dict):
        moved = [f"{k} {reported[k]} -> {v}" if k in reported else f"+{k}" for k, v in sorted(plan.spec.tags.items()) if reported.get(k) != v]
        if reported_tags(existing) is not None:
            moved += [f"-{k}" for k in sorted(reported) if k not in plan.spec.tags]
    return f"tags changed ({', '.join(moved)})" if moved else "tags changed"


class Planner(Protocol):
    """What make_plan asks of a provider. cloudllm.providers.base.Provider is one; this module
    cannot import it (the provider interface takes a Plan), so the planner names what it uses."""

    default_instance: str | None

    def default_runtime(self, spec: DeploySpec, model: ModelInfo) -> str: ...
    def require(self, features: set[Feature]) -> None: ...
    def validate(self, plan: Plan) -> None: ...
    def preflight(self, plan: Plan) -> None: ...
    def accepts_uncatalogued_instance(self, name: str) -> bool: ...
    def get(self, name: str) -> Endpoint | None: ...
    def describe_changes(self, plan: Plan) -> list[ResourceChange]: ...


def make_plan(spec: DeploySpec, provider: Planner, reporter: "Reporter | None" = None, *, mode: PlanMode = "deploy") -> Plan:
    """Inspect, lay out the bundle in memory, check, and compare with what is deployed. Creates nothing.

    mode "plan" (`cloudllm plan`) needs no account: the provider's account checks (`preflight`)
    are skipped, and a deployment that cannot be read makes the diff "unknown", not an error.
    "check" (`deploy --dry-run`, apply's planning pass) runs every check deploy runs. Neither
    quantizes: int8/int4 weights are sized by arithmetic (or taken from the cache if quantized
    earlier). "deploy" also quantizes them (once; cached in $CLOUDLLM_HOME/quantized), after
    the checks and the fit verdict, so a bad flag or a model that cannot fit costs no hours.
    """
    from cloudllm.model_source import inspect_model
    from cloudllm.quantize import prepare_model, required_runtime

    source = inspect_model(
        spec.model, task=spec.task, allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code
    )
    runtime = spec.runtime or required_runtime(spec, source) or provider.default_runtime(spec, source)
    provider.require(required_features(spec, runtime))
    model = prepare_model(spec, source, runtime, reporter, run=False)
    plan = _assemble(spec, model, runtime, provider, exact=False)
    provider.validate(plan)
    if mode != "plan" and provider.hashes_while_uploading:
        provider.preflight(plan)  # a first deploy hashes while it uploads; an update hashes below, to compare
    elif mode != "plan":
        plan.bundle = _hashed_during(lambda: provider.preflight(plan), model, plan.settings, runtime)
    if plan.quantize_pending and mode == "deploy":
        refuse_unless_fits(plan)
        plan = _assemble(spec, prepare_model(spec, source, runtime, reporter), runtime, provider)
        provider.validate(plan)
    try:
        plan.existing = provider.get(spec.name)
    except UserError as exc:
        if mode != "plan":
            raise
        plan.action, plan.reasons = "unknown", [f"cannot read what is deployed: {exc.line()}"]
        return plan
    shared_fit = getattr(provider, "shared_fit", None)  # providers whose endpoints hold several models' reservations
    plan.sharing = shared_fit(plan) if shared_fit else None
    if mode != "plan" and plan.existing is not None and not plan.bundle.exact:
        from cloudllm.bundle import build_bundle

        plan.bundle = build_bundle(plan.model, plan.settings, build={"runtime": runtime})
    plan.action, plan.reasons = compare(plan)
    plan.changes = provider.describe_changes(plan) if plan.action != "unknown" else []
    return plan


def _hashed_during(checks, model: ModelInfo, settings: ServingSettings, runtime: str) -> "Bundle":
    """The exact bundle (every file's sha256), hashed while `checks` (the account's round trips) run.

    A daemon thread: a failed check ends the command without waiting for a 140 GB hash.
    """
    import threading

    from cloudllm.bundle import build_bundle

    done: dict = {}

    def hash_all() -> None:
        try:
            done["bundle"] = build_bundle(model, settings, build={"runtime": runtime})
        except BaseException as exc:  # re-raised in the caller's thread
            done["error"] = exc

    worker = threading.Thread(target=hash_all, name="cloudllm-hash-bundle", daemon=True)
    worker.start()
    checks()
    worker.join()
    if "error" in done:
        raise done["error"]
    return done["bundle"]


def _assemble(spec: DeploySpec, model: ModelInfo, runtime: str, provider: Planner, *, exact: bool = True) -> Plan:
    """Settings, instance, fit, cost and bundle of `model` served by `runtime` (exact: see build_bundle)."""
    from cloudllm.bundle import build_bundle
    from cloudllm.fit import plan_cost, plan_fit, resolve_instance
    from cloudllm.adapters import inspect_adapters
    from cloudllm.quantize import OFFLINE_METHODS

    settings = serving_settings(spec, model)
    instance = resolve_instance(spec, provider.default_instance, provider.accepts_uncatalogued_instance)
    bundle = build_bundle(model, settings, build={"runtime": runtime}, exact=exact)
    plan = Plan(spec=spec, model=model, settings=settings, bundle=bundle, runtime=runtime)
    plan.adapters, plan.warnings = inspect_adapters(spec.adapters, model)
    plan.instance, plan.cost = instance, plan_cost(spec, instance)
    plan.fit = plan_fit(spec, model, settings, runtime, instance, adapters=tuple(plan.adapters))
    if spec.quantize in OFFLINE_METHODS and model.quantization != spec.quantize:
        plan.quantize_pending = spec.quantize
    return plan


# --- the plan as a document (cloudllm plan --json; schema in docs/plan-schema.json) ------------
PLAN_SCHEMA_VERSION = 1


class PlanModel(BaseModel):
    path: str
    architecture: str | None
    task: str
    parameters: int | None
    dtype: str | None
    weight_bytes: int
    quantization: str | None = Field(description="Quantization the checkpoint already has (quant_method).")


class PlanResources(BaseModel):
    """What the endpoint runs on."""

    instance: str | None = Field(description="Instance or machine type (None: this machine).")
    accelerator: str | None = Field(None, description="Accelerator model, e.g. NVIDIA A10G.")
    gpus_per_instance: int = 0
    gpu_memory_gib: float = 0
    min_instances: int
    max_instances: int
    shards: int | None = Field(description="GPUs the model is split across on each instance.")


class PlanDiff(BaseModel):
    """What deploy would change, from read-only describe calls."""

    action: Action
    reasons: list[str]
    changes: list[ResourceChange]


class PlanAdapter(BaseModel):
    """One LoRA adapter of the plan."""

    name: str
    path: str
    rank: int
    modules: int = Field(description="Modules of the base it changes.")
    weight_bytes: int
    digest: str = Field(description="Content digest (sha256 of its files): equal digests mean the same adapter.")


class PlanReport(BaseModel):
    """The plan of one deploy: fit, memory breakdown, shards, cost, resources and diff. Stable for CI gates."""

    schema_version: int = Field(PLAN_SCHEMA_VERSION, description="Bumped only on incompatible changes.")
    name: str
    provider: str
    region: str | None
    runtime: str
    model: PlanModel
    resources: PlanResources
    fit: FitReport | None
    cost: CostEstimate | None = Field(description="None for the local provider and instances without a catalog price.")
    diff: PlanDiff
    digest: str = Field(description="Digest of what would be deployed; equal digests mean nothing changes.")
    quantize_pending: str | None = Field(
        None, description="int8/int4 weights not quantized on this machine yet: fit is estimated and digest is of the source weights."
    )
    adapters: list[PlanAdapter] = Field(default_factory=list, description="LoRA adapters served beside the model.")
    warnings: list[str] = Field(default_factory=list, description="Checks that passed with a remark (an adapter trained on another base name).")
    sharing: SharedFit | None = Field(
        None, description="Several models on one endpoint: each component's reservation and cost, and whether they fit its instances together."
    )

    @classmethod
    def from_plan(cls, plan: Plan) -> "PlanReport":
        spec, model, instance = plan.spec, plan.model, plan.instance
        return cls(
            name=spec.name,
            provider=spec.provider,
            region=spec.region,
            runtime=plan.runtime,
            model=PlanModel(
                path=model.path,
                architecture=model.architecture,
                task=model.task,
                parameters=model.parameters,
                dtype=model.dtype,
                weight_bytes=model.weight_bytes,
                quantization=model.quantization,
            ),
            resources=PlanResources(
                instance=instance.label if instance else spec.instance,
                accelerator=instance.accelerator if instance else None,
                gpus_per_instance=instance.accelerator_count if instance else 0,
                gpu_memory_gib=instance.accelerator_memory_gib if instance else 0,
                min_instances=spec.min_instances,
                max_instances=spec.max_instances,
                shards=plan.shards,
            ),
            fit=plan.fit,
            cost=plan.cost,
            diff=PlanDiff(action=plan.action, reasons=plan.reasons, changes=plan.changes),
            digest=plan.digest,
            quantize_pending=plan.quantize_pending,
            adapters=[
                PlanAdapter(name=a.name, path=a.path, rank=a.rank, modules=len(a.target_modules), weight_bytes=a.weight_bytes,
                            digest=plan.adapter_digests[a.name])  # fmt: skip
                for a in plan.adapters
            ],
            warnings=plan.warnings,
            sharing=plan.sharing,
        )


def plan_json_schema() -> dict:
    """JSON Schema of `cloudllm plan --json` (docs/plan-schema.json is this, written out)."""
    schema = PlanReport.model_json_schema(mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://cloudllm.dev/schemas/plan-v1.json", **schema}
