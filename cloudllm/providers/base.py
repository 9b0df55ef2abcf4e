"""The provider interface, and the registry that finds providers through entry points.

A provider translates a Plan into its platform's calls; it never decides what to do
(create, update or nothing: the core decides once, in cloudllm.api). Built-ins and
third-party plugins register the same way, in the `cloudllm.providers` entry-point group:

    [project.entry-points."cloudllm.providers"]
    myprovider = "my_package.provider:MyProvider"
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping

from cloudllm.console import Reporter
from cloudllm.errors import PlanRefused, UserError
from cloudllm.providers.options import ProviderOptions, StrictOptions, check_options
from cloudllm.types import Endpoint, Feature, Fingerprint, ResourceChange, Waking  # re-exported: plugins import them from here

if TYPE_CHECKING:
    from cloudllm.adapters import AdapterInfo
    from cloudllm.model_source import ModelInfo
    from cloudllm.plan import Plan
    from cloudllm.spec import DeploySpec

GROUP = "cloudllm.providers"
# Features a provider has only when it lists them in `offers`: one written before they existed
# would otherwise take the flags and quietly do something else (--add-model would replace the
# endpoint's model, --adapter would deploy the base alone).
OPT_IN_FEATURES = frozenset({Feature.ADAPTERS, Feature.MULTI_MODEL})
__all__ = ["Endpoint", "Feature", "Fingerprint", "Provider", "ProviderOptions", "ResourceChange", "StrictOptions", "Waking", "get_provider", "provider_names"]


class Provider(ABC):
    """A platform that hosts endpoints. Keep implementations to translating calls."""

    name: ClassVar[str]
    unsupported: ClassVar[dict[Feature, str]] = {}
    offers: ClassVar[frozenset[Feature]] = frozenset()  # the OPT_IN_FEATURES this provider implements
    # The instance the planner sizes against when the spec names none (None: the provider has no choice of instance).
    default_instance: ClassVar[str | None] = None
    # The options it reads (spec.options, --option KEY=VALUE), checked when the provider is made.
    Options: ClassVar[type[ProviderOptions]] = ProviderOptions
    # True: deploy hashes the weights while uploading them (cloudllm.storage), so a first deploy
    # reads each byte once; the plan hashes them beforehand only to compare with a deployed endpoint.
    hashes_while_uploading: ClassVar[bool] = False

    def __init__(self, region: str | None = None, options: dict[str, Any] | None = None):
        self.region = region
        self._options = check_options(self.name, self.Options, options)

    @property
    def options(self) -> Mapping[str, Any]:
        """The options given, and those recorded since: read-only (what deploy finds goes through record_options)."""
        return MappingProxyType(self._options)

    def record_options(self, **found: Any) -> None:
        """Keep what this run found (the bucket, the project credentials chose) with the endpoint's record,
        so later commands reach the endpoint without the flags."""
        self._options = check_options(self.name, self.Options, {**self._options, **found})

    # --- checks, before anything is created -------------------------------------------------
    def require(self, features: set[Feature]) -> None:
        """Refuse, with the provider's reason, a spec that needs what this provider cannot do."""
        for feature in sorted(features, key=lambda f: f.value):
            if feature in self.unsupported or (feature in OPT_IN_FEATURES and feature not in self.offers):
                reason = self.unsupported.get(feature, "the provider does not implement it")
                raise PlanRefused(f"{feature.value} is not available on the {self.name} provider: {reason}")

    def validate(self, plan: "Plan") -> None:
        """Provider-specific input checks that need no account (instance names, scaling, name rules); raise UserError.

        `cloudllm plan` runs these on a machine with no credentials, so a plan always shows fit and cost.
        """

    def preflight(self, plan: "Plan") -> None:
        """Checks against the account that deploy (and --dry-run) needs to pass: credentials, role, bucket, project.

        Runs after `validate`, before anything is created; raise UserError. `cloudllm plan` skips it.
        """

    def accepts_uncatalogued_instance(self, name: str) -> bool:
        """True when the platform takes an instance type cloudllm's catalog lacks (planned without fit or cost)."""
        return False

    def default_runtime(self, spec: "DeploySpec", model: "ModelInfo") -> str:
        """The runtime used when the spec names none."""
        return "handler"

    def describe_changes(self, plan: "Plan") -> list[ResourceChange]:
        """The resources deploy will create or change; read-only."""
        action = {"create": "create", "update": "update", "unchanged": "unchanged"}[plan.action]
        return [ResourceChange(resource="endpoint", name=plan.spec.name, action=action, reason="; ".join(plan.reasons))]

    # --- the verbs ------------------------------------------------------------------------
    @abstractmethod
    def deploy(self, plan: "Plan", reporter: Reporter) -> Endpoint:
        """Create the endpoint described by plan; on failure delete what this call created."""

    @abstractmethod
    def update(self, plan: "Plan", existing: Endpoint, reporter: Reporter) -> Endpoint:
        """Move an existing endpoint to plan, keeping it serving until the new version is healthy."""

    @abstractmethod
    def get(self, name: str) -> Endpoint | None:
        """The endpoint, or None when it does not exist."""

    @abstractmethod
    def list(self) -> list[Endpoint]: ...

    @abstractmethod
    def delete(self, name: str, *, purge_artifacts: bool = False, reporter: Reporter | None = None) -> None: ...

    @abstractmethod
    def invoke(self, name: str, body: dict, *, model: str | None = None) -> Any:
        """Send one request body (to the endpoint's model `model`; None: its first); return the decoded JSON response.

        An endpoint scaled to zero that is waking raises cloudllm.types.Waking (the caller waits and retries).
        """

    def invoke_stream(self, name: str, body: dict, *, model: str | None = None) -> Iterator[str]:
        """Yield generated text pieces as they arrive."""
        raise UserError(f"the {self.name} provider cannot stream", "invoke without --stream")

    # --- adapters on a live endpoint (Feature.ADAPTERS): no restart of the base -----------------
    def add_adapter(self, name: str, adapter: "AdapterInfo", reporter: Reporter) -> None:
        """Add LoRA adapter `adapter.name` to endpoint `name`, or replace the one of that name, without restarting the base."""
        raise self._no_live_adapters()

    def remove_adapter(self, name: str, adapter: str, reporter: Reporter) -> None:
        """Remove adapter `adapter` from endpoint `name`; an adapter it does not have is a UserError."""
        raise self._no_live_adapters()

    def list_adapters(self, name: str) -> list[dict]:
        """The adapters endpoint `name` serves: [{"name", "rank", "digest", "status"}]."""
        raise self._no_live_adapters()

    def _no_live_adapters(self) -> PlanRefused:
        self.require({Feature.ADAPTERS})
        return PlanRefused(f"{Feature.ADAPTERS.value} is not available on the {self.name} provider: it cannot change them on a live endpoint")

    # --- more models on one endpoint (Feature.MULTI_MODEL, --add-model) --------------------------
    def remove_model(self, name: str, model: str, reporter: Reporter) -> None:
        """Remove the model `model` added to endpoint `name`; the endpoint and its other models keep serving."""
        self.require({Feature.MULTI_MODEL})
        raise PlanRefused(f"the {self.name} provider cannot remove one model of an endpoint yet", f"delete the endpoint with `cloudllm delete {name}`")

    def logs(self, name: str, *, follow: bool = False, since: float | None = None) -> Iterator[str]:
        raise UserError(f"the {self.name} provider has no logs command", "look in the platform's console")



def provider_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def options_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each installed provider's options (`cloudllm schema`); providers that cannot load are left out."""
    schemas = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            provider = ep.load()
        except Exception:  # noqa: BLE001 - a plugin missing its dependencies: the schema still covers the rest
            continue
        schemas.setdefault(ep.name, getattr(provider, "Options", ProviderOptions).model_json_schema())
    return schemas


def get_provider(name: str, *, region: str | None = None, options: dict[str, Any] | None = None) -> Provider:
    """Instantiate a provider plugin by name."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        raise UserError(f"unknown provider {name!r}", f"use one of: {', '.join(provider_names())} (or install a provider plugin)")
    try:
        cls = matches[0].load()
    except ImportError as exc:
        raise UserError(
            f"the {name} provider cannot load: {exc}",
            f"install its dependencies: pip install 'cloudllm[{name}]'",
        ) from None
    return cls(region=region, options=options)
