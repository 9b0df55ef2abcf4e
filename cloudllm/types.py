"""The words the core and every provider share: what an endpoint is, what it runs, what a plan changes.

They live below the providers (cloudllm.providers.base re-exports them for plugins written
against it), so the core can speak of endpoints without importing the provider layer.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Feature(str, Enum):
    """Capabilities a spec may ask for; a provider lists those it lacks in `unsupported`."""

    INSTANCE_TYPES = "choosing an instance type"
    AUTOSCALING = "autoscaling (max_instances > 1)"
    SCALE_TO_ZERO = "scale to zero (min_instances = 0)"
    TRAFFIC_SHIFTING = "canary/linear rollouts"
    ENGINE_RUNTIMES = "the tgi and vllm runtimes"
    GRPC = "gRPC (the Open Inference Protocol v2)"
    ADAPTERS = "LoRA adapters (--adapter)"
    MULTI_MODEL = "several models on one endpoint (--add-model)"

    @property
    def asked_by(self) -> Literal["spec", "request"]:
        """What asks for it: a deploy's spec (refused when planned) or a request (refused by the invoke that sends it)."""
        return "request" if self in REQUEST_FEATURES else "spec"


# Features a request asks for, not a deploy: a provider lacking one still deploys, and refuses the request.
REQUEST_FEATURES = frozenset({Feature.GRPC})


class Fingerprint(BaseModel):
    """The digests a deploy stores with the endpoint, so the next plan can say what changed (None: unknown)."""

    model_config = ConfigDict(frozen=True)

    weights_digest: str | None = None
    code_digest: str | None = None
    deploy_digest: str | None = None
    scaling_digest: str | None = None
    adapters_digest: str | None = Field(None, description="Of the adapters' names and contents (None: no adapters).")
    # The spec's tags, apart from deploy_digest so a provider can change them in place. None on
    # endpoints deployed before it existed: their deploy_digest covers the tags.
    tags_digest: str | None = None
    digest: str | None = Field(None, description="Of the digests above: equal digests mean no change.")


FINGERPRINT_KEYS = tuple(Fingerprint.model_fields)


class Endpoint(BaseModel):
    """What a provider reports about one endpoint."""

    name: str
    provider: str
    state: str = Field(description="InService, Creating, Updating, Failed, ...")
    url: str | None = None
    model: str | None = None
    digest: str | None = Field(None, description="Plan digest of what is deployed; equal digests mean no change.")
    instance: str | None = None
    runtime: str | None = None
    failure_reason: str | None = None
    fingerprint: Fingerprint = Field(default_factory=Fingerprint, description="The digests of what is deployed.")
    unfinished: bool = Field(False, description="An earlier deploy stopped before its last step; deploying again finishes it.")
    unfinished_digest: str | None = Field(None, description="The digest of that unfinished deploy, when known.")
    details: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _typed_from_details(cls, data: Any) -> Any:
        """Providers (plugins too) that still put the digests or "unfinished" in details get them typed."""
        if not isinstance(data, dict) or not isinstance(data.get("details"), dict):
            return data
        details = dict(data["details"])
        lifted = {k: details.pop(k) for k in FINGERPRINT_KEYS if k in details}
        data = {**data, "details": details}
        if lifted and not data.get("fingerprint"):
            data["fingerprint"] = lifted
        for key in ("unfinished", "unfinished_digest"):
            if key in details:
                value = details.pop(key)
                data.setdefault(key, value)
        return data


class ResourceChange(BaseModel):
    """One line of a plan's diff."""

    resource: str = Field(description="Kind of resource, e.g. model, endpoint-config, endpoint, scaling-policy.")
    name: str
    action: Literal["create", "update", "replace", "unchanged", "delete"]
    reason: str = ""


class Waking(Exception):
    """An endpoint scaled to zero has no capacity yet and is (or will be) waking; the caller may retry.

    Raised by a provider's invoke; cloudllm.api waits through it up to wake_timeout.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
