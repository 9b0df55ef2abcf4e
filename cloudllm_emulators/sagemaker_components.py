"""Inference components on the offline SageMaker: several models (and LoRA adapters) on one endpoint,
copy counts that start and stop real model servers, and scale to zero with a wake.

moto has no inference components; this module adds them to the emulator through subclasses of its
backends and responses (installed by `cloudllm_emulators.sagemaker.install`):

- an endpoint config whose variant names no model (ExecutionRoleArn on the config, as SageMaker
  asks) makes an endpoint that hosts inference components; it is InService without a server;
- CreateInferenceComponent / Describe / List / Update / UpdateInferenceComponentRuntimeConfig /
  DeleteInferenceComponent: each copy of a component is one `HostedModel` process serving the
  component's model (the same hosting as endpoints); raising the copy count starts servers,
  lowering it stops them; a changed specification starts the new copies, then stops the old ones;
- an adapter component (Specification.BaseInferenceComponentName + Container.ArtifactUrl) has no
  copies of its own: its artifact is downloaded and registered on every copy of the base with
  `POST /adapters {"name", "src"}` (what SageMaker sends the container) and removed with
  `DELETE /adapters/{name}`; a request for it reaches a base copy with the
  X-Amzn-SageMaker-Adapter-Identifier header;
- InvokeEndpoint(WithResponseStream) with InferenceComponentName reaches one of the component's
  copies; with no copies it answers SageMaker's 400 ("has no capacity"), records the
  NoCapacityInvocationFailures metric in CloudWatch and, when an alarm on that metric has a step
  scaling policy of Application Auto Scaling among its actions, wakes the component: after
  `wake_seconds` (instance provisioning; configurable) the policy's adjustment is applied;
- Application Auto Scaling takes `sagemaker:inference-component:DesiredCopyCount` targets (moto's
  list predates them) for components that exist, MinCapacity 0 included;
- DeleteEndpoint refuses an endpoint that still hosts components, and a base component cannot be
  deleted while adapters use it, as SageMaker refuses both.

- scale-in by idleness: a component with a TargetTrackingScaling policy on its copy-count target
  that has had no invocation for `idle_seconds` is scaled to the target's MinCapacity (0: no copy;
  the next request gets the no-capacity 400 and wakes it as above). Real target tracking scales in
  after its low alarm's 15 one-minute datapoints; `idle_seconds` (default 900, env
  CLOUDLLM_EMULATOR_SAGEMAKER_IDLE_SECONDS, or set on the backend) shortens that for tests.

- placement: a component's copies must fit, beside the endpoint's other components, on the variant's
  MaxInstanceCount instances (sagemaker_capacity.py; ResourceLimitExceeded otherwise) when it is
  created, updated or given a copy count; a wake by Application Auto Scaling places only the copies
  that fit (the rest wait for room; DesiredCopyCount says what was asked).

Left out: rolling-update batch sizes.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from moto.applicationautoscaling.exceptions import AWSValidationException
from moto.applicationautoscaling.responses import ApplicationAutoScalingResponse
from moto.applicationautoscaling.models import ApplicationAutoscalingBackend, FakeScalableTarget, applicationautoscaling_backends
from moto.core.responses import ActionResult, EmptyResult
from moto.core.utils import utcnow
from moto.sagemaker import urls as sagemaker_urls
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.utils import arn_formatter

from cloudllm_emulators.sagemaker_capacity import check_placement, copy_needs, most_copies
from cloudllm_emulators.sagemaker_hosting import (
    EmulatedRuntimeBackend,
    EmulatedRuntimeResponse,
    EmulatedSageMakerBackend,
    EmulatedSageMakerResponse,
    HostedModel,
    RuntimeValidationError,
    copy_s3_prefix,
)

COPY_DIMENSION = "sagemaker:inference-component:DesiredCopyCount"
NO_CAPACITY_METRIC = "NoCapacityInvocationFailures"
ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
COMPONENT_HEADER = "X-Amzn-SageMaker-Inference-Component"
NO_CAPACITY = (
    "Inference Component has no capacity to process this request. ApplicationAutoScaling may be in-progress "
    "(if configured) or try to increase the capacity by invoking UpdateInferenceComponentRuntimeConfig API."
)
DEFAULT_WAKE_SECONDS = 3.0
DEFAULT_IDLE_SECONDS = 900.0


class Component:
    """One inference component: its specification, desired copies and the servers that are its copies."""

    def __init__(self, backend: "ComponentBackend", name: str, endpoint, variant: str, spec: dict, copies: int, tags: list):
        self.name = name
        self.arn = arn_formatter("inference-component", name, backend.account_id, backend.region_name)
        self.endpoint = endpoint
        self.variant = variant
        self.spec = spec
        self.desired = copies
        self.hosts: list[HostedModel] = []
        self.status = "Creating"
        self.failure_reason: str | None = None
        self.created = self.modified = utcnow()
        self.tags = list(tags or [])
        self.adapter_dir: Path | None = None  # an adapter's downloaded artifact
        self.waking: threading.Timer | None = None
        self.last_invoked = time.monotonic()  # idleness counts from creation until the first invocation

    @property
    def base(self) -> str | None:
        return self.spec.get("BaseInferenceComponentName")

    def ready_hosts(self) -> list[HostedModel]:
        return [h for h in self.hosts if h.state == "ready"]

    def describe(self) -> dict[str, Any]:
        spec = {k: v for k, v in self.spec.items() if k != "Container"}
        container = self.spec.get("Container")
        if container:
            summary = {k: v for k, v in container.items() if k in ("ArtifactUrl", "Environment")}
            if container.get("Image"):
                summary["DeployedImage"] = {"SpecifiedImage": container["Image"]}
            spec["Container"] = summary
        described: dict[str, Any] = {
            "InferenceComponentName": self.name,
            "InferenceComponentArn": self.arn,
            "EndpointName": self.endpoint.endpoint_name,
            "EndpointArn": self.endpoint.arn,
            "VariantName": self.variant,
            "Specification": spec,
            "CreationTime": self.created,
            "LastModifiedTime": self.modified,
            "InferenceComponentStatus": self.status,
        }
        if self.base is None:
            described["RuntimeConfig"] = {"DesiredCopyCount": self.desired, "CurrentCopyCount": len(self.ready_hosts())}
        if self.failure_reason:
            described["FailureReason"] = self.failure_reason
        return described

    def summary(self) -> dict[str, Any]:
        described = self.describe()
        keys = ("CreationTime", "InferenceComponentArn", "InferenceComponentName", "EndpointArn", "EndpointName", "VariantName", "InferenceComponentStatus", "LastModifiedTime")
        return {k: described[k] for k in keys}


class ComponentBackend(EmulatedSageMakerBackend):
    """The emulated SageMaker with inference components."""

    wake_seconds = DEFAULT_WAKE_SECONDS
    idle_seconds = float(os.environ.get("CLOUDLLM_EMULATOR_SAGEMAKER_IDLE_SECONDS") or DEFAULT_IDLE_SECONDS)

    def __init__(self, region_name: str, account_id: str):
        super().__init__(region_name, account_id)
        self.components: dict[str, Component] = {}
        self._idle_watcher: threading.Thread | None = None

    def _watch_idle(self) -> None:
        """Target tracking's scale-in: components idle past idle_seconds go to their target's MinCapacity."""
        while True:
            time.sleep(min(max(self.idle_seconds / 4, 0.05), 1.0))
            now = time.monotonic()
            with self.control_lock:
                for component in list(self.components.values()):
                    if component.base is not None or component.desired == 0 or component.waking is not None:
                        continue
                    if now - component.last_invoked < self.idle_seconds:
                        continue
                    floor = self._scale_in_floor(component)
                    if floor is not None and floor < component.desired:
                        self._set_copies(component, floor)

    def _scale_in_floor(self, component: Component) -> int | None:
        """The MinCapacity a target-tracking policy may scale this component in to (None: no such policy)."""
        scaling = applicationautoscaling_backends[self.account_id][self.region_name]
        resource = f"inference-component/{component.name}"
        target = scaling.targets.get(COPY_DIMENSION, {}).get(resource)
        tracking = [p for p in scaling.policies.values() if p.resource_id == resource and p.policy_type == "TargetTrackingScaling"]
        if target is None or not any(not (p.target_tracking_scaling_policy_configuration or {}).get("DisableScaleIn") for p in tracking):
            return None
        return int(target.min_capacity or 0)

    @property
    def _url_module(self) -> Any:
        return SimpleNamespace(url_bases=sagemaker_urls.url_bases, url_paths={"{0}/$": ComponentResponse.dispatch})

    def stop_hosts(self) -> None:
        for component in getattr(self, "components", {}).values():
            self._stop_component(component)
        super().stop_hosts()

    # --- endpoints that host components ------------------------------------------------------
    @staticmethod
    def hosts_components(config: dict) -> bool:
        return not any(v.get("ModelName") for v in config["ProductionVariants"])

    def create_endpoint_config(self, endpoint_config_name, production_variants, *args, **kwargs):
        if all(v.get("ModelName") for v in production_variants):
            return super().create_endpoint_config(endpoint_config_name, production_variants, *args, **kwargs)
        if any(v.get("ModelName") for v in production_variants):
            raise ValidationError(message="Either all production variants name a model, or none do (an endpoint for inference components).")
        # moto looks each variant's model up; an endpoint for inference components has none.
        with self.control_lock:
            check, self.validate_production_variants = self.validate_production_variants, lambda variants: None
            try:
                return super().create_endpoint_config(endpoint_config_name, production_variants, *args, **kwargs)
            finally:
                self.validate_production_variants = check

    def create_endpoint(self, endpoint_name: str, endpoint_config_name: str, tags):
        config = self.describe_endpoint_config(endpoint_config_name)
        if not self.hosts_components(config):
            return super().create_endpoint(endpoint_name, endpoint_config_name, tags)
        with self.control_lock:
            if endpoint_name in self.endpoints:
                arn = arn_formatter("endpoint", endpoint_name, self.account_id, self.region_name)
                raise ValidationError(message=f'Cannot create already existing endpoint "{arn}".')
            endpoint = super(EmulatedSageMakerBackend, self).create_endpoint(endpoint_name, endpoint_config_name, tags)
            endpoint.endpoint_status = "Creating"
            # The instances come up without a model: InService shortly, with nothing to serve yet.
            threading.Timer(0.2, self._components_endpoint_up, args=(endpoint_name,)).start()
            return endpoint

    def _components_endpoint_up(self, name: str) -> None:
        endpoint = self.endpoints.get(name)
        if endpoint is not None and endpoint.endpoint_status == "Creating":
            endpoint.endpoint_status = "InService"
            endpoint.last_modified_time = utcnow()
            self._count_instances(name)

    def delete_endpoint(self, endpoint_name: str) -> None:
        hosted = sorted(c.name for c in self.components.values() if c.endpoint.endpoint_name == endpoint_name)
        if hosted:
            raise ValidationError(
                message=f"Endpoint {endpoint_name} has inference components attached ({', '.join(hosted)}). "
                "Delete the inference components before deleting the endpoint."
            )
        super().delete_endpoint(endpoint_name)

    def _count_instances(self, endpoint_name: str) -> None:
        """With managed instance scaling down to 0, an endpoint whose components have no copies runs no instance."""
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is None or not endpoint.production_variants:
            return
        config = self.endpoint_configs.get(endpoint.endpoint_config_name)
        scaling = (config.production_variants[0].get("ManagedInstanceScaling") or {}) if config else {}
        copies = sum(c.desired for c in self.components.values() if c.endpoint is endpoint and c.base is None)
        variant = endpoint.production_variants[0]
        if scaling.get("Status") == "ENABLED" and scaling.get("MinInstanceCount") == 0 and copies == 0:
            variant["CurrentInstanceCount"] = variant["DesiredInstanceCount"] = 0
        elif variant.get("CurrentInstanceCount") == 0:
            variant["CurrentInstanceCount"] = variant["DesiredInstanceCount"] = 1

    # --- inference components ------------------------------------------------------------------
    def component(self, name: str) -> Component:
        found = self.components.get(name)
        if found is None:
            arn = arn_formatter("inference-component", name, self.account_id, self.region_name)
            raise ValidationError(message=f"Could not find inference component \"{arn}\".")
        return found

    def create_inference_component(self, name: str, endpoint_name: str, variant: str | None, spec: dict, runtime: dict | None, tags) -> Component:
        with self.control_lock:
            if name in self.components:
                raise ValidationError(message=f'Cannot create already existing inference component "{self.components[name].arn}".')
            endpoint = self.endpoints.get(endpoint_name)
            if endpoint is None:
                arn = arn_formatter("endpoint", endpoint_name, self.account_id, self.region_name)
                raise ValidationError(message=f"Could not find endpoint \"{arn}\".")
            config = self.describe_endpoint_config(endpoint.endpoint_config_name)
            if not self.hosts_components(config):
                raise ValidationError(message=f"Endpoint {endpoint_name} hosts a model in its production variant, not inference components.")
            variants = [v["VariantName"] for v in config["ProductionVariants"]]
            variant = variant or variants[0]
            if variant not in variants:
                raise ValidationError(message=f"Could not find variant {variant} in endpoint {endpoint_name}.")
            copies = self._check_spec(endpoint_name, spec, runtime)
            self._check_room(endpoint, name, spec, copies)
            component = Component(self, name, endpoint, variant, spec, copies, tags)
            self.components[name] = component
            if self._idle_watcher is None:
                self._idle_watcher = threading.Thread(target=self._watch_idle, name="sagemaker-idle-scale-in", daemon=True)
                self._idle_watcher.start()
            if component.base is not None:
                threading.Thread(target=self._attach_adapter, args=(component,), daemon=True).start()
            else:
                self._scale(component)
            self._count_instances(endpoint_name)
            return component

    def _check_spec(self, endpoint_name: str, spec: dict, runtime: dict | None) -> int:
        """SageMaker's rules for a specification: a model with resources and copies, or an adapter of a base."""
        base = spec.get("BaseInferenceComponentName")
        if base is not None:
            parent = self.component(base)
            if parent.endpoint.endpoint_name != endpoint_name or parent.base is not None:
                raise ValidationError(message=f"Base inference component {base} must be a model component on endpoint {endpoint_name}.")
            if not (spec.get("Container") or {}).get("ArtifactUrl"):
                raise ValidationError(message="An adapter inference component needs Container.ArtifactUrl.")
            if runtime or spec.get("ComputeResourceRequirements") or spec.get("ModelName"):
                raise ValidationError(message="An adapter inference component takes no ModelName, ComputeResourceRequirements or RuntimeConfig.")
            return 0
        if not spec.get("ModelName"):
            raise ValidationError(message="the emulator hosts inference components that name a model (Specification.ModelName)")
        self.describe_model(spec["ModelName"])  # moto's not-found error
        if not spec.get("ComputeResourceRequirements"):
            raise ValidationError(message="ComputeResourceRequirements is required for an inference component that hosts a model.")
        if runtime is None:
            raise ValidationError(message="RuntimeConfig is required for an inference component that hosts a model.")
        return int(runtime["CopyCount"])

    def update_inference_component(self, name: str, spec: dict | None, runtime: dict | None) -> Component:
        with self.control_lock:
            component = self.component(name)
            self._settled_or_refuse(component)
            if spec:
                merged = {**component.spec, **spec}
                self._check_spec(component.endpoint.endpoint_name, merged, runtime or ({"CopyCount": component.desired} if component.base is None else None))
            if component.base is None and (spec or runtime is not None):
                copies = int(runtime["CopyCount"]) if runtime is not None else component.desired
                self._check_room(component.endpoint, name, {**component.spec, **(spec or {})}, copies)
            if spec:
                changed = merged != component.spec
                component.spec = merged
                if changed and component.base is not None:
                    component.status = "Updating"
                    threading.Thread(target=self._attach_adapter, args=(component,), daemon=True).start()
                elif changed:
                    self._replace_copies(component)
            if runtime is not None:
                self._set_copies(component, int(runtime["CopyCount"]))
            component.modified = utcnow()
            return component

    def update_runtime_config(self, name: str, copies: int) -> Component:
        with self.control_lock:
            component = self.component(name)
            if component.base is not None:
                raise ValidationError(message=f"Inference component {name} is an adapter: it has no copies of its own.")
            self._settled_or_refuse(component)
            self._check_room(component.endpoint, name, component.spec, copies)
            self._set_copies(component, copies)
            component.modified = utcnow()
            return component

    def _room_for(self, component: Component, copies: int) -> int:
        """How many of `copies` fit beside the endpoint's other model components."""
        config = self.endpoint_configs.get(component.endpoint.endpoint_config_name)
        if config is None or not config.production_variants:
            return copies
        return most_copies(config.production_variants[0], copy_needs(component.name, component.spec), copies, self._others(component.endpoint, component.name))

    def _others(self, endpoint, name: str) -> list:
        return [(copy_needs(c.name, c.spec), c.desired) for c in self.components.values() if c.endpoint is endpoint and c.base is None and c.name != name]

    def _check_room(self, endpoint, name: str, spec: dict, copies: int) -> None:
        """ResourceLimitExceeded unless `copies` of component `name` fit beside the endpoint's other model components."""
        config = self.endpoint_configs.get(endpoint.endpoint_config_name)
        if spec.get("BaseInferenceComponentName") or config is None or not config.production_variants:
            return
        check_placement(config.production_variants[0], name, copy_needs(name, spec), copies, self._others(endpoint, name))

    @staticmethod
    def _settled_or_refuse(component: Component) -> None:
        if component.status in ("Creating", "Deleting"):
            raise ValidationError(message=f"Cannot update in-progress inference component \"{component.arn}\".")

    def _set_copies(self, component: Component, copies: int) -> None:
        if component.waking is not None:  # an explicit count replaces a pending wake
            component.waking.cancel()
            component.waking = None
        if component.desired == 0:
            component.last_invoked = time.monotonic()  # idleness counts again from the scale-out
        component.desired = copies
        self._scale(component)
        self._count_instances(component.endpoint.endpoint_name)

    def delete_inference_component(self, name: str) -> None:
        with self.control_lock:
            component = self.component(name)
            adapters = sorted(c.name for c in self.components.values() if c.base == name)
            if adapters:
                raise ValidationError(message=f"Inference component {name} is the base of adapter components ({', '.join(adapters)}): delete them first.")
            del self.components[name]
            component.status = "Deleting"
        self._stop_component(component)
        self._count_instances(component.endpoint.endpoint_name)

    def _stop_component(self, component: Component) -> None:
        if component.waking is not None:
            component.waking.cancel()
        if component.base is not None:
            parent = self.components.get(component.base)
            for host in parent.ready_hosts() if parent else []:
                _unregister(host, component.name)
        for host in component.hosts:
            host.stop()
        component.hosts = []
        if component.adapter_dir is not None:
            shutil.rmtree(component.adapter_dir, ignore_errors=True)

    def list_inference_components(self, endpoint: str | None, name_contains: str | None, status: str | None, sort_by: str, descending: bool) -> list[Component]:
        found = [
            c for c in self.components.values()
            if (endpoint is None or c.endpoint.endpoint_name == endpoint)
            and (name_contains is None or name_contains in c.name)
            and (status is None or c.status == status)
        ]  # fmt: skip
        key = {"Name": lambda c: c.name, "Status": lambda c: c.status}.get(sort_by, lambda c: c.created)
        return sorted(found, key=key, reverse=descending)

    # --- copies: one model server each -----------------------------------------------------------
    def _pseudo_config(self, component: Component) -> dict:
        """What HostedModel reads: the component's model and start-up timeout, as a one-variant config."""
        startup = (component.spec.get("StartupParameters") or {}).get("ContainerStartupHealthCheckTimeoutInSeconds")
        variant = {"VariantName": component.name, "ModelName": component.spec["ModelName"]}
        if startup:
            variant["ContainerStartupHealthCheckTimeoutInSeconds"] = startup
        return {"EndpointConfigName": component.name, "ProductionVariants": [variant]}

    def _scale(self, component: Component) -> None:
        """Start or stop servers until the component has its desired copies (from zero: after the provisioning delay)."""
        live = [h for h in component.hosts if h.state in ("starting", "ready")]
        for host in live[component.desired :]:
            host.stop()
        component.hosts = live[: component.desired]
        missing = component.desired - len(component.hosts)
        if missing <= 0:
            if component.status != "Creating" or not component.hosts:
                component.status = "InService" if all(h.state == "ready" for h in component.hosts) else component.status
            return
        from_zero = not component.hosts and component.status != "Creating"
        if component.status != "Creating":
            component.status = "Updating"
        self._start_copies(component, missing, delay=self.wake_seconds if from_zero else 0.0)

    def _start_copies(self, component: Component, count: int, *, delay: float) -> None:
        for _ in range(count):
            host = HostedModel(self, component.endpoint.endpoint_name, self._pseudo_config(component), self._copy_settled)
            host.component = component.name
            component.hosts.append(host)
            if delay:
                threading.Timer(delay, host.start).start()
            else:
                host.start()

    def _replace_copies(self, component: Component) -> None:
        """A new specification: new copies start; the old ones stop once the new ones serve."""
        old = component.hosts
        component.hosts = []
        component.status = "Updating"
        component.retiring = old
        self._scale(component)
        if not component.hosts:  # no copies wanted: nothing to wait for
            for host in old:
                host.stop()

    def _copy_settled(self, host: HostedModel) -> None:
        with self.control_lock:
            component = self.components.get(getattr(host, "component", ""))
            if component is None or host not in component.hosts:
                host.stop()
                return
            if host.state != "ready":
                component.hosts.remove(host)
                component.status, component.failure_reason = "Failed", host.reason
                host.stop()
                return
            adapters = [c for c in self.components.values() if c.base == component.name and c.adapter_dir is not None]
            pending = any(h.state == "starting" for h in component.hosts)
            if not pending:
                for retired in getattr(component, "retiring", []):
                    retired.stop()
                component.retiring = []
                component.status, component.failure_reason = "InService", None
                component.modified = utcnow()
        for adapter in adapters:  # a new copy (a wake from zero, a scale-out) serves every adapter of its base
            _register(host, adapter)

    # --- adapters --------------------------------------------------------------------------------
    def _attach_adapter(self, component: Component) -> None:
        """Download the adapter's artifact and register it on every copy of its base."""
        try:
            directory = Path(tempfile.mkdtemp(prefix=f"{component.name}-", dir=self.work_dir()))
            self._download_artifact(component.spec["Container"]["ArtifactUrl"], directory)
            parent = self.components.get(component.base or "")
            if parent is not None:
                self._check_lmi_lora(parent, directory)
            old, component.adapter_dir = component.adapter_dir, directory
            for host in parent.ready_hosts() if parent else []:
                _register(host, component)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            component.status, component.failure_reason = "InService", None
        except Exception as exc:  # the reason becomes the component's FailureReason
            component.status, component.failure_reason = "Failed", str(exc)
        component.modified = utcnow()

    def _check_lmi_lora(self, base: Component, adapter_dir: Path) -> None:
        """LMI (djl-inference) loads an adapter only when its vLLM was started with LoRA on
        (OPTION_ENABLE_LORA=true) and a max rank (OPTION_MAX_LORA_RANK, vLLM's default 16) that holds it."""
        import json

        container = self.describe_model(base.spec["ModelName"]).primary_container or {}
        if "djl-inference" not in container.get("Image", ""):
            return
        env = container.get("Environment") or {}
        if str(env.get("OPTION_ENABLE_LORA", "")).lower() != "true":
            raise RuntimeError("the container cannot load adapters: LoRA is not enabled (OPTION_ENABLE_LORA) in the base model")
        rank = json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 0)
        limit = int(env.get("OPTION_MAX_LORA_RANK") or 16)
        if rank > limit:
            raise RuntimeError(f"the container cannot load the adapter: LoRA rank {rank} is greater than max_lora_rank {limit}")

    def _download_artifact(self, url: str, target: Path) -> None:
        """An S3 prefix ending in / (uncompressed files) or one .tar.gz object, into target."""
        from moto.s3.models import s3_backends

        if not url.startswith("s3://"):
            raise RuntimeError(f"ArtifactUrl {url} is not an s3:// location")
        bucket_name, _, key = url[len("s3://") :].partition("/")
        if not key.endswith((".tar.gz", ".tgz")):
            copy_s3_prefix(self, url, target, "the adapter")
            return
        s3 = s3_backends[self.account_id][self.partition]
        try:
            bucket = s3.get_bucket(bucket_name)
        except Exception:
            raise RuntimeError(f"Failed to download the adapter from {url}: the bucket does not exist") from None
        obj = bucket.keys.get(key)
        if obj is None:
            raise RuntimeError(f"Failed to download the adapter from {url}: no such object")
        with tarfile.open(fileobj=io.BytesIO(obj.value), mode="r:gz") as archive:
            archive.extractall(target, filter="data")

    # --- invoking and waking -----------------------------------------------------------------------
    def component_target(self, endpoint_name: str, name: str) -> tuple[HostedModel, str | None]:
        """The copy that serves a request for component `name`, and the adapter it asks for."""
        endpoint = self.endpoints.get(endpoint_name)
        component = self.components.get(name)
        if endpoint is None:
            raise RuntimeValidationError(f"Endpoint {endpoint_name} of account {self.account_id} not found.")
        if component is None or component.endpoint is not endpoint:
            raise RuntimeValidationError(f"Inference Component {name} not found for Endpoint {endpoint_name}.")
        adapter = None
        if component.base is not None:
            if component.status != "InService" or component.adapter_dir is None:
                raise RuntimeValidationError(f"Inference Component {name} is not in service.")
            adapter, component = name, self.components[component.base]
        hosts = component.ready_hosts()
        if not hosts:
            self._no_capacity(component)
            raise RuntimeValidationError(NO_CAPACITY)
        component.last_invoked = time.monotonic()
        component.turn = getattr(component, "turn", -1) + 1
        return hosts[component.turn % len(hosts)], adapter

    def _no_capacity(self, component: Component) -> None:
        """Record NoCapacityInvocationFailures; an alarm on it with a step scaling policy wakes the component."""
        from moto.cloudwatch.models import cloudwatch_backends

        cloudwatch = cloudwatch_backends[self.account_id][self.region_name]
        dimensions = [{"Name": "InferenceComponentName", "Value": component.name}]
        cloudwatch.put_metric_data("AWS/SageMaker", [{"MetricName": NO_CAPACITY_METRIC, "Value": 1.0, "Unit": "Count", "Dimensions": dimensions}])
        with self.control_lock:
            if component.waking is not None or component.desired > 0:
                return
            copies = self._step_scaling_copies(cloudwatch, component)
            if copies:
                component.waking = threading.Timer(self.wake_seconds, self._wake, args=(component.name, copies))
                component.waking.daemon = True
                component.waking.start()

    def _step_scaling_copies(self, cloudwatch, component: Component) -> int:
        """The copy count a firing NoCapacityInvocationFailures alarm's step policy asks for (0: none set up)."""
        scaling = applicationautoscaling_backends[self.account_id][self.region_name]
        resource = f"inference-component/{component.name}"
        target = scaling.targets.get(COPY_DIMENSION, {}).get(resource)
        if target is None:
            return 0
        policies = {p.policy_arn: p for p in scaling.policies.values() if p.resource_id == resource and p.policy_type == "StepScaling"}
        for alarm in cloudwatch.alarms.values():
            if alarm.namespace != "AWS/SageMaker" or alarm.metric_name != NO_CAPACITY_METRIC or not alarm.actions_enabled:
                continue
            if not any(d.name == "InferenceComponentName" and d.value == component.name for d in alarm.dimensions):
                continue
            if not _breaches(alarm.comparison_operator, 1.0, alarm.threshold):
                continue
            for action in alarm.alarm_actions:
                policy = policies.get(action)
                if policy is None:
                    continue
                copies = _step_result(policy.step_scaling_policy_configuration or {}, 1.0 - alarm.threshold, component.desired)
                if copies:
                    alarm.state_value = "ALARM"
                    return max(target.min_capacity or 0, min(target.max_capacity or copies, copies))
        return 0

    def _wake(self, name: str, copies: int) -> None:
        with self.control_lock:
            component = self.components.get(name)
            if component is None or component.waking is None:
                return
            component.waking = None
            if component.desired == 0:
                component.last_invoked = time.monotonic()  # the request that woke it counts
                component.desired = copies
                component.status = "Updating"
                placed = self._room_for(component, copies)
                self._start_copies(component, placed, delay=0.0)  # the provisioning delay has passed already
                if not placed:
                    component.status = "InService"  # nothing fits beside the others: it stays without capacity
                self._count_instances(component.endpoint.endpoint_name)


def _breaches(operator: str, value: float, threshold: float) -> bool:
    return {
        "GreaterThanOrEqualToThreshold": value >= threshold,
        "GreaterThanThreshold": value > threshold,
        "LessThanThreshold": value < threshold,
        "LessThanOrEqualToThreshold": value <= threshold,
    }.get(operator, False)


def _step_result(config: dict, difference: float, current: int) -> int:
    """Apply a StepScalingPolicyConfiguration to the current copies, for a metric `difference` above the threshold."""
    for step in config.get("StepAdjustments", []):
        lower, upper = step.get("MetricIntervalLowerBound"), step.get("MetricIntervalUpperBound")
        if (lower is None or difference >= float(lower)) and (upper is None or difference < float(upper)):
            adjustment = int(step["ScalingAdjustment"])
            kind = config.get("AdjustmentType", "ChangeInCapacity")
            if kind == "ExactCapacity":
                return adjustment
            if kind == "PercentChangeInCapacity":
                return max(current + 1, current + current * adjustment // 100)
            return current + adjustment
    return 0


def _register(host: HostedModel, adapter: Component) -> None:
    """What SageMaker does on a copy for an adapter component: POST /adapters with its name and files."""
    try:
        response = httpx.post(f"{host.url}/adapters", json={"name": adapter.name, "src": str(adapter.adapter_dir)}, timeout=60.0)
    except httpx.HTTPError as exc:
        adapter.status, adapter.failure_reason = "Failed", f"the container did not take adapter {adapter.name}: {exc}"
        return
    if response.status_code >= 400:
        adapter.status, adapter.failure_reason = "Failed", f"the container refused adapter {adapter.name} ({response.status_code}): {response.text[:300]}"


def _unregister(host: HostedModel, name: str) -> None:
    try:
        httpx.delete(f"{host.url}/adapters/{name}", timeout=30.0)
    except httpx.HTTPError:
        pass  # the copy is going away or already gone


class ComponentResponse(EmulatedSageMakerResponse):
    @property
    def _components(self) -> ComponentBackend:
        return self.sagemaker_backend

    def create_endpoint_config(self):
        result = super().create_endpoint_config()
        role = self._get_param("ExecutionRoleArn")
        config = self.sagemaker_backend.endpoint_configs[self._get_param("EndpointConfigName")]
        if role:
            config.execution_role_arn = role  # moto drops it; DescribeEndpointConfig answers it
        elif ComponentBackend.hosts_components({"ProductionVariants": config.production_variants}):
            del self.sagemaker_backend.endpoint_configs[config.endpoint_config_name]
            raise ValidationError(message="An endpoint configuration for inference components needs ExecutionRoleArn.")
        return result

    def create_inference_component(self):
        component = self._components.create_inference_component(
            name=self._get_param("InferenceComponentName"),
            endpoint_name=self._get_param("EndpointName"),
            variant=self._get_param("VariantName"),
            spec=self._get_param("Specification") or {},
            runtime=self._get_param("RuntimeConfig"),
            tags=self._get_param("Tags"),
        )
        return ActionResult({"InferenceComponentArn": component.arn})

    def describe_inference_component(self):
        return ActionResult(self._components.component(self._get_param("InferenceComponentName")).describe())

    def update_inference_component(self):
        component = self._components.update_inference_component(
            self._get_param("InferenceComponentName"), self._get_param("Specification"), self._get_param("RuntimeConfig")
        )
        return ActionResult({"InferenceComponentArn": component.arn})

    def update_inference_component_runtime_config(self):
        runtime = self._get_param("DesiredRuntimeConfig")
        component = self._components.update_runtime_config(self._get_param("InferenceComponentName"), int(runtime["CopyCount"]))
        return ActionResult({"InferenceComponentArn": component.arn})

    def delete_inference_component(self):
        self._components.delete_inference_component(self._get_param("InferenceComponentName"))
        return EmptyResult()

    def list_inference_components(self):
        found = self._components.list_inference_components(
            endpoint=self._get_param("EndpointNameEquals"),
            name_contains=self._get_param("NameContains"),
            status=self._get_param("StatusEquals"),
            sort_by=self._get_param("SortBy") or "CreationTime",
            descending=(self._get_param("SortOrder") or "Descending") == "Descending",
        )
        return ActionResult({"InferenceComponents": [c.summary() for c in found]})


# --- SageMaker Runtime: InferenceComponentName ---------------------------------------------------
class ComponentRuntimeResponse(EmulatedRuntimeResponse):
    def _host(self) -> HostedModel:
        name = self.headers.get(COMPONENT_HEADER)
        endpoint = self.path.split("/")[2]
        backend = self._sagemaker()
        if not name:
            if any(c.endpoint.endpoint_name == endpoint for c in backend.components.values()) or self._hosts_components(backend, endpoint):
                raise RuntimeValidationError(f"Inference Component Name header is required for endpoints to which you plan to deploy inference components. Please include Inference Component Name header or consider using SageMaker models.")
            return super()._host()
        host, self._adapter = backend.component_target(endpoint, name)
        return host

    @staticmethod
    def _hosts_components(backend: ComponentBackend, endpoint_name: str) -> bool:
        endpoint = backend.endpoints.get(endpoint_name)
        config = backend.endpoint_configs.get(endpoint.endpoint_config_name) if endpoint else None
        return config is not None and backend.hosts_components({"ProductionVariants": config.production_variants})

    def _sagemaker(self) -> ComponentBackend:
        from moto.sagemaker.models import sagemaker_backends

        return sagemaker_backends[self.current_account][self.region]

    def _forward_headers(self) -> dict[str, str]:
        headers = super()._forward_headers()
        if getattr(self, "_adapter", None):
            headers[ADAPTER_HEADER] = self._adapter
        return headers


class ComponentRuntimeBackend(EmulatedRuntimeBackend):
    response_class = ComponentRuntimeResponse


# --- Application Auto Scaling: copy counts of components --------------------------------------------
class ComponentScalingResponse(ApplicationAutoScalingResponse):
    def _validate_params(self) -> None:
        if self._get_param("ScalableDimension") != COPY_DIMENSION:
            super()._validate_params()


class ComponentScalingBackend(ApplicationAutoscalingBackend):
    @property
    def _url_module(self) -> Any:
        from moto.applicationautoscaling import urls

        return SimpleNamespace(url_bases=urls.url_bases, url_paths={"{0}/$": ComponentScalingResponse.dispatch})

    def register_scalable_target(self, namespace, r_id, dimension, min_capacity, max_capacity, role_arn, suspended_state):
        if dimension != COPY_DIMENSION:
            return super().register_scalable_target(namespace, r_id, dimension, min_capacity, max_capacity, role_arn, suspended_state)
        from moto.sagemaker.models import sagemaker_backends

        kind, _, name = (r_id or "").partition("/")
        if namespace != "sagemaker" or kind != "inference-component" or not name:
            raise AWSValidationException("Unsupported service namespace, resource type or scalable dimension")
        if name not in sagemaker_backends[self.account_id][self.region_name].components:
            raise AWSValidationException(f"The inference component {name} does not exist.")
        if self._scalable_target_exists(r_id, dimension):
            target = self.targets[dimension][r_id]
            target.update(min_capacity, max_capacity, suspended_state)
            return target
        target = FakeScalableTarget(self, namespace, r_id, dimension, min_capacity, max_capacity, role_arn, suspended_state)
        self._add_scalable_target(target)
        return target
