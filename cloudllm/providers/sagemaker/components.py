"""Inference components: several models and LoRA adapters on one SageMaker endpoint, and scale to zero.

A spec that asks for adapters, --add-model or --min-instances 0 deploys this way:

    endpoint config: one variant, no model, ManagedInstanceScaling (MinInstanceCount may be 0),
                     RoutingConfig, ExecutionRoleArn
    endpoint
    one inference component per model   <endpoint>-<model>           (ModelName, resources, copies)
    adapters (vllm)                      <endpoint>-<model>-<adapter>  (BaseInferenceComponentName + ArtifactUrl)
    scale to zero, per model component:  scalable target on DesiredCopyCount from 0, target tracking on
                                         invocations per copy, a step policy that adds a copy, and the
                                         CloudWatch alarm on NoCapacityInvocationFailures that runs it

Adapters: the vllm runtime (LMI) loads adapter components at run time: SageMaker registers each on
the base's copies and routes a request for the adapter's component to them, so adding or removing
one restarts nothing. TGI reads LORA_ADAPTERS only when it starts: its adapters ship with the model
(tgi_adapters.py: AdditionalModelDataSources mounted under /opt/ml/additional-model-data-sources/),
so a change is a new model for the component, replaced copy by copy (the endpoint and the other
models stay), and `cloudllm adapters add/remove` refuse it with that redeploy as the fix. The
request names the adapter in `parameters.adapter_id` there; TGI answers an adapter it does not
hold with the base model, without a word, so invoke checks the name first.

InvokeEndpoint names the component (InferenceComponentName). With no copies (scaled to zero)
SageMaker answers a 400 "no capacity": `invoke` raises types.Waking and the API waits
(cloudllm/wake.py) while the alarm's step policy brings a copy back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.base import ResourceChange
from cloudllm.providers.kit import Pending, wait_until
import cloudllm.providers.sagemaker.resources as res
from cloudllm.providers.sagemaker.session import aws_error, gone_already
from cloudllm.providers.sagemaker.tgi_adapters import TgiAdapters, check_tgi_adapters

if TYPE_CHECKING:
    from cloudllm.plan import Plan

COPY_DIMENSION = "sagemaker:inference-component:DesiredCopyCount"
WAKE_POLICY = "cloudllm-wake-from-zero"
NO_CAPACITY_METRIC = "NoCapacityInvocationFailures"
ADAPTER_COMPONENTS = ("vllm",)  # runtimes whose container loads adapter components at run time (LMI)
ADAPTERS_IN_MODEL = ("tgi",)  # runtimes whose adapters ride in the model (LORA_ADAPTERS, read at start)
MiB = 1024**2
NAME_LIMIT = 63
# What SageMaker documents for a wake from zero: an instance, the image, the model (minutes).
EXPECTED_WAKE = "a few minutes"
# Managed instance scaling and inference components are not offered on these (burstable, Inferentia 1).
NO_COMPONENTS_FAMILIES = ("t2", "t3", "inf1")


def uses_components(spec) -> bool:
    """The spec needs inference components: adapters, a second model, or scale to zero."""
    return bool(getattr(spec, "adapters", None)) or bool(getattr(spec, "add_model", None)) or spec.min_instances == 0


def model_component(endpoint: str, model: str) -> str:
    return _component_name(f"{endpoint}-{model}")


def adapter_component(endpoint: str, model: str, adapter: str) -> str:
    return _component_name(f"{endpoint}-{model}-{adapter}")


def _component_name(name: str) -> str:
    if len(name) > NAME_LIMIT:
        raise UserError(
            f"the inference component name {name} is longer than SageMaker's {NAME_LIMIT} characters",
            "use a shorter --name, model name (--add-model) or adapter name",
        )
    return name


def scaling_resource(component: str) -> str:
    return f"inference-component/{component}"


def wake_alarm(component: str) -> str:
    return f"{component}-no-capacity"


def managed_scaling(plan: "Plan") -> dict[str, Any]:
    spec = plan.spec
    return {"Status": "ENABLED", "MinInstanceCount": spec.min_instances, "MaxInstanceCount": max(1, spec.max_instances)}


def component_variant(plan: "Plan", variant: dict[str, Any]) -> dict[str, Any]:
    """The production variant of an endpoint for inference components: instances, no model (the start-up
    timeouts move to each component), managed instance scaling and least-outstanding-requests routing."""
    kept = {k: v for k, v in variant.items() if k in ("VariantName", "InstanceType", "VolumeSizeInGB")}
    return {
        **kept,
        "InitialInstanceCount": 1,
        "ManagedInstanceScaling": managed_scaling(plan),
        "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"},
    }


def compute_requirements(plan: "Plan", instance: str) -> dict[str, Any]:
    """What one copy reserves on an instance, from the plan's fit: accelerators (the shards) and host memory
    (the weights pass through it while loading; on CPU the whole footprint lives there)."""
    memory = plan.fit.memory if plan.fit is not None else None
    on_cpu = res.processor(instance) == "cpu"
    if memory is not None:
        needed = memory.total_bytes if on_cpu else memory.weights_bytes
    else:
        needed = plan.bundle.total_bytes
    requirements: dict[str, Any] = {"MinMemoryRequiredInMb": max(1024, math.ceil(needed * 1.2 / MiB) + 512)}
    if res.processor(instance) == "gpu":
        gpus = res.gpu_count(instance, plan.spec.options) or 1
        requirements["NumberOfAcceleratorDevicesRequired"] = float(plan.shard_count(gpus))
    return requirements


def check_components(plan: "Plan", instance: str) -> None:
    """What SageMaker refuses for inference components, before anything is created."""
    spec = plan.spec
    if res.family(instance) in NO_COMPONENTS_FAMILIES:
        wanted = "scale to zero (--min-instances 0)" if spec.min_instances == 0 else "adapters and several models"
        raise UserError(
            f"{wanted} needs SageMaker inference components, which {instance} cannot host",
            "pick another --instance (e.g. ml.m5.xlarge, ml.g5.xlarge)",
        )
    if spec.rollout not in (None, "all-at-once"):
        raise UserError(
            f"--rollout {spec.rollout} shifts traffic between endpoint configs; inference components update copy by copy",
            "drop --rollout (components are replaced copy by copy), or deploy without adapters, --add-model and --min-instances 0",
        )
    if getattr(spec, "adapters", None):
        from cloudllm.adapters import check_engine_adapters

        check_adapter_runtime(plan.runtime, spec.image)
        check_engine_adapters(plan.runtime, plan.model.architecture, plan.adapters)
        check_tgi_adapters(plan)
    if spec.min_instances == 0 and not plan.wait:
        raise UserError(
            "--no-wait cannot set up scale to zero: its scaling is registered once the component is InService",
            "drop --no-wait, or use --min-instances 1",
        )


def takes_adapter_components(runtime: str | None, image: str | None) -> bool:
    """LMI (vllm) and cloudllm's own server (handler on a non-toolkit image) load adapters while they serve."""
    return runtime in ADAPTER_COMPONENTS or (runtime == "handler" and bool(image) and not res.runs_toolkit(image))


def check_adapter_runtime(runtime: str, image: str | None) -> None:
    if takes_adapter_components(runtime, image) or runtime in ADAPTERS_IN_MODEL:
        return
    raise UserError(
        "adapters on SageMaker are adapter inference components, and the Hugging Face inference container (the handler's "
        "default image) cannot load them while it serves",
        "pass --image with cloudllm's serving image (containers/Dockerfile, `cloudllm push`), or deploy with --runtime vllm",
    )


def refuse_live_change(name: str, layout: dict) -> None:
    """`cloudllm adapters add/remove` on an endpoint whose container reads its adapters only at start."""
    if layout.get("runtime") in ADAPTERS_IN_MODEL:
        raise UserError(
            f"endpoint {name} runs TGI, which reads its adapters (LORA_ADAPTERS) only when it starts, so they cannot change live",
            f"deploy {name} again with the --adapter set you want: a new model for its component, replaced copy by copy (only new adapters are uploaded)",
        )
    check_adapter_runtime(layout.get("runtime") or "", layout.get("image"))


class SageMakerComponents(TgiAdapters):
    """Deploy, read, invoke and delete inference components (mixed into SageMakerProvider)."""

    # --- reading -----------------------------------------------------------------------------------
    def _components(self, endpoint: str) -> list[dict]:
        """The endpoint's inference components, described (oldest first)."""
        names = []
        for page in self._sm.get_paginator("list_inference_components").paginate(EndpointNameEquals=endpoint, SortBy="CreationTime", SortOrder="Ascending"):
            names += [c["InferenceComponentName"] for c in page["InferenceComponents"]]
        found = []
        for name in names:
            described = self._describe_component(name)
            if described is not None:
                found.append(described)
        return found

    def _describe_component(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self._sm.describe_inference_component(InferenceComponentName=name)
        except ClientError as exc:
            if gone_already(exc):
                return None
            raise

    def _component_models(self, endpoint: str) -> set[str]:
        """The models the endpoint's components run (so the sweep keeps them)."""
        return {c["Specification"].get("ModelName") for c in self._components(endpoint)} - {None}

    # --- deploying ---------------------------------------------------------------------------------
    def _deploy_component(self, plan: "Plan", model_name: str, instance: str, sizes: res.Sizing, reporter: Reporter) -> str:
        """Create (or move to model_name) the component of the plan's model, and wait until it serves."""
        spec = plan.spec
        component = model_component(spec.name, self._model_key(plan))
        specification = {
            "ModelName": model_name,
            "StartupParameters": {
                "ModelDataDownloadTimeoutInSeconds": sizes.download_timeout,
                "ContainerStartupHealthCheckTimeoutInSeconds": sizes.startup_timeout,
            },
            "ComputeResourceRequirements": compute_requirements(plan, instance),
        }
        copies = max(1, spec.min_instances)
        existing = self._describe_component(component)
        with self._aws(f"deploy inference component {component}"):
            if existing is None:
                self._create_once(
                    lambda: self._sm.create_inference_component(
                        InferenceComponentName=component, EndpointName=spec.name, VariantName=res.VARIANT,
                        Specification=specification, RuntimeConfig={"CopyCount": copies},
                        Tags=res.tag_list({res.ENDPOINT_TAG: spec.name, res.TAG + "model-name": self._model_key(plan)}),
                    ),
                    ours=lambda: (self._describe_component(component) or {}).get("EndpointName") == spec.name or None,
                )  # fmt: skip
                reporter.step(f"inference component {component}: {copies} cop{'y' if copies == 1 else 'ies'} of {model_name}")
            else:
                self._sm.update_inference_component(InferenceComponentName=component, Specification=specification)
                reporter.step(f"inference component {component} moves to {model_name}, copy by copy")
        self._wait_component(component, sizes.wait_timeout, reporter)
        return component

    def _model_key(self, plan: "Plan") -> str:
        """The model's name on the endpoint: --add-model's, else the first model's, named after its folder."""
        from cloudllm.spec import default_endpoint_name

        return plan.spec.add_model or default_endpoint_name(plan.spec.model)

    def _wait_component(self, component: str, timeout: int, reporter: Reporter) -> dict:
        def poll() -> dict | Pending:
            with self._aws(f"read inference component {component}"):
                described = self._describe_component(component)
            if described is None:
                raise DeployFailed(f"inference component {component} disappeared while deploying", "someone deleted it; deploy again")
            status = described["InferenceComponentStatus"]
            if status == "InService":
                return described
            if status == "Failed":
                raise DeployFailed(
                    f"inference component {component} failed: {described.get('FailureReason') or 'SageMaker gave no reason'}",
                    f"see CloudWatch log group {res_log_group(described['EndpointName'])}",
                )
            return Pending(status)

        return wait_until(
            poll, what=f"waiting for inference component {component}", deadline=timeout, reporter=reporter,
            late=lambda last: (f"inference component {component} is still {last.status} after {timeout}s", f"watch `cloudllm status {component.rsplit('-', 1)[0]}`"),
        )  # fmt: skip

    # --- adapters ----------------------------------------------------------------------------------
    def _adapter_components(self, plan_or_runtime) -> bool:
        runtime = plan_or_runtime if isinstance(plan_or_runtime, str) else plan_or_runtime.runtime
        return runtime in ADAPTER_COMPONENTS

    def _upload_adapter(self, root, adapter) -> str:
        """The adapter's files, content-addressed under <artifact root>/adapters/<digest>/ (sent only when absent)."""
        from cloudllm.adapters import adapter_digest, adapter_files

        digest = adapter_digest(adapter)
        prefix = root.child("adapters", digest)
        s3 = self._client("s3")
        with self._aws(f"upload adapter {adapter.name} to {prefix}"):
            present = {o["Key"] for o in s3.list_objects_v2(Bucket=prefix.bucket, Prefix=prefix.key("")).get("Contents", [])}
            for relative, path in adapter_files(adapter):
                key = prefix.key(relative)
                if key not in present:
                    s3.upload_file(str(path), prefix.bucket, key)
        return str(prefix).rstrip("/") + "/"

    def _put_adapter(self, endpoint: str, model: str, name: str, artifact: str, timeout: int, reporter: Reporter) -> None:
        """Create (or point at new files) the adapter component `name` of model component `model`."""
        component = adapter_component(endpoint, model, name)
        base = model_component(endpoint, model)
        specification = {"BaseInferenceComponentName": base, "Container": {"ArtifactUrl": artifact}}
        with self._aws(f"add adapter {name} to {endpoint}"):
            existing = self._describe_component(component)
            if existing is None:
                self._sm.create_inference_component(InferenceComponentName=component, EndpointName=endpoint, Specification=specification)
            elif (existing["Specification"].get("Container") or {}).get("ArtifactUrl") != artifact:
                self._sm.update_inference_component(InferenceComponentName=component, Specification=specification)
            else:
                return
        self._wait_component(component, timeout, reporter)
        reporter.step(f"adapter {name} is served by {endpoint} (inference component {component})")

    def _delete_component(self, component: str, reporter: Reporter) -> None:
        """Remove a component's scaling and alarm, then the component; wait until it is gone."""
        with self._aws(f"delete inference component {component}"):
            self._remove_component_scaling(component)
            self._delete_unless_gone(lambda: self._sm.delete_inference_component(InferenceComponentName=component))
            wait_until(
                lambda: Pending(d["InferenceComponentStatus"]) if (d := self._describe_component(component)) is not None else None,
                what=f"deleting inference component {component}", deadline=900, reporter=reporter,
                late=lambda last: (f"inference component {component} is still {last.status}", "check it in the SageMaker console"),
            )  # fmt: skip
        reporter.step(f"deleted inference component {component}")

    def _delete_components(self, endpoint: str, reporter: Reporter) -> int:
        """Every component of the endpoint, adapters before their bases (SageMaker refuses the other order)."""
        with self._aws(f"read the inference components of {endpoint}"):
            components = self._components(endpoint)
        ordered = sorted(components, key=lambda c: c["Specification"].get("BaseInferenceComponentName") is None)
        for component in ordered:
            self._delete_component(component["InferenceComponentName"], reporter)
        return len(ordered)

    # --- scale to zero -------------------------------------------------------------------------------
    def _apply_component_scaling(self, plan: "Plan", component: str, reporter: Reporter) -> None:
        """From 0 (or the floor) to max copies: target tracking on invocations per copy, and the wake:
        a step policy adding one copy, run by an alarm on NoCapacityInvocationFailures."""
        spec = plan.spec
        if spec.min_instances != 0 and not res.autoscaled(plan):
            with self._aws(f"remove the scaling of {component}"):
                self._remove_component_scaling(component)
            return
        resource = scaling_resource(component)
        keys = {"ServiceNamespace": "sagemaker", "ResourceId": resource, "ScalableDimension": COPY_DIMENSION}
        target = spec.scale_target or 60.0
        with self._aws(f"set up the scaling of {component}"):
            self._scaling.register_scalable_target(**keys, MinCapacity=spec.min_instances, MaxCapacity=max(1, spec.max_instances))
            self._scaling.put_scaling_policy(
                PolicyName=res.SCALING_POLICY, PolicyType="TargetTrackingScaling", **keys,
                TargetTrackingScalingPolicyConfiguration={
                    "TargetValue": float(target),
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerInferenceComponentInvocationsPerCopy"},
                    "ScaleInCooldown": spec.scale_in_cooldown if spec.scale_in_cooldown is not None else 300,
                    "ScaleOutCooldown": spec.scale_out_cooldown if spec.scale_out_cooldown is not None else 60,
                },
            )  # fmt: skip
            if spec.min_instances == 0:
                policy = self._scaling.put_scaling_policy(
                    PolicyName=WAKE_POLICY, PolicyType="StepScaling", **keys,
                    StepScalingPolicyConfiguration={
                        "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Maximum", "Cooldown": 60,
                        "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
                    },
                )  # fmt: skip
                self._client("cloudwatch").put_metric_alarm(
                    AlarmName=wake_alarm(component), AlarmDescription=f"cloudllm: wake {component} from zero copies",
                    Namespace="AWS/SageMaker", MetricName=NO_CAPACITY_METRIC,
                    Dimensions=[{"Name": "InferenceComponentName", "Value": component}],
                    Statistic="Maximum", Period=30, EvaluationPeriods=1, DatapointsToAlarm=1, Threshold=1.0,
                    ComparisonOperator="GreaterThanOrEqualToThreshold", TreatMissingData="missing",
                    AlarmActions=[policy["PolicyARN"]],
                )  # fmt: skip
        floor = "0 (scale to zero; a request wakes it)" if spec.min_instances == 0 else str(spec.min_instances)
        reporter.step(f"autoscaling {component}: {floor}-{max(1, spec.max_instances)} copies on invocations per copy (target {target:g})")

    def _remove_component_scaling(self, component: str) -> None:
        from botocore.exceptions import ClientError

        keys = {"ServiceNamespace": "sagemaker", "ResourceId": scaling_resource(component), "ScalableDimension": COPY_DIMENSION}
        policies = self._scaling.describe_scaling_policies(**keys)["ScalingPolicies"]
        for policy in policies:
            self._delete_unless_gone(lambda: self._scaling.delete_scaling_policy(PolicyName=policy["PolicyName"], **keys))
        if self._scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[keys["ResourceId"]], ScalableDimension=COPY_DIMENSION)["ScalableTargets"]:
            try:
                self._scaling.deregister_scalable_target(**keys)
            except ClientError as exc:
                if aws_error(exc)[0] != "ObjectNotFoundException":
                    raise
        self._client("cloudwatch").delete_alarms(AlarmNames=[wake_alarm(component)])

    # --- the deploy and update flows -----------------------------------------------------------------
    def _serve_components(self, plan: "Plan", model_name: str, instance: str, sizes: res.Sizing, reporter: Reporter) -> None:
        """After CreateEndpoint: the model's component, its adapters and its scaling."""
        component = self._deploy_component(plan, model_name, instance, sizes, reporter)
        self._sync_adapters(plan, sizes, reporter)
        self._apply_component_scaling(plan, component, reporter)
        self._remember_layout(plan, plan.spec.name)

    def _update_components(self, plan: "Plan", existing, reporter: Reporter):
        """An endpoint of components: a changed model moves its component to a new model copy by copy;
        adapters and scaling change in place; --add-model adds a component. The endpoint stays as it is."""
        from cloudllm.providers.kit import Ledger

        name = plan.spec.name
        if not existing.details.get("inference_components"):
            raise UserError(
                f"endpoint {name} serves its model without inference components, which adapters, --add-model and --min-instances 0 need",
                f"delete it (`cloudllm delete {name}`) and deploy again with these flags",
            )
        instance = self._instance(plan.spec)
        check_components(plan, instance)
        if existing.instance and existing.instance != instance:
            raise UserError(
                f"endpoint {name} runs on {existing.instance}; its inference components cannot move to {instance}",
                f"deploy with --instance {existing.instance}, or delete the endpoint and deploy again",
            )
        sizes = res.sizing(plan, instance)
        component = model_component(name, self._model_key(plan))
        with self._aws(f"read inference component {component}"):
            current = self._describe_component(component)
            model_tags = self._tags(self._sm.describe_model(ModelName=current["Specification"]["ModelName"])["ModelArn"]) if current else {}
        now = plan.fingerprint
        in_model = ("weights_digest", "code_digest", "deploy_digest") + (("adapters_digest",) if plan.runtime in ADAPTERS_IN_MODEL else ())
        same_model = all(model_tags.get(res.FINGERPRINT_TAGS[key]) == now[key] for key in in_model)
        if same_model and current is not None and plan.runtime == "vllm":  # LMI loads adapters only up to the rank its model started with
            with self._aws(f"read the model of {component}"):
                same_model = self._lmi_rank_fits(current["Specification"]["ModelName"], plan.adapters)
        if current is None or not same_model:
            ledger = Ledger()
            with self._undone_on_failure(name, ledger, reporter):
                version = self._upload(plan, reporter)
                model_name = self._create_model(plan, instance, sizes, version, ledger)
                self._deploy_component(plan, model_name, instance, sizes, reporter)
            if current is not None:
                # The endpoint's first model shares its name with the endpoint config, which the sweep keeps.
                old = current["Specification"]["ModelName"]
                self._removing(f"model {old}", lambda: self._sm.delete_model(ModelName=old))
                reporter.step(f"removed model {old}")
            self._sweep(name, keep=set(), keep_version=version, reporter=reporter)
        else:
            reporter.step(f"the model of {component} is unchanged")
        self._sync_adapters(plan, sizes, reporter)
        self._apply_component_scaling(plan, component, reporter)
        self._remember_layout(plan, name)
        if not plan.spec.add_model:  # the endpoint's fingerprint is its first model's
            fingerprint = res.fingerprint_tags(plan)
            with self._aws(f"tag the endpoint config of {name}"):
                arn = self._sm.describe_endpoint_config(EndpointConfigName=existing.details["endpoint_config"])["EndpointConfigArn"]
                stale = [tag for tag in res.FINGERPRINT_TAGS.values() if tag not in fingerprint]  # adapters-digest once none are left
                if stale:
                    self._sm.delete_tags(ResourceArn=arn, TagKeys=stale)
                self._sm.add_tags(ResourceArn=arn, Tags=res.tag_list(fingerprint))
            self._retag_endpoint(plan)
        return self._require(name)

    def _sync_adapters(self, plan: "Plan", sizes: res.Sizing, reporter: Reporter) -> None:
        """Make the model's adapter components exactly the plan's adapters (new files only where they changed)."""
        name, key = plan.spec.name, self._model_key(plan)
        base = model_component(name, key)
        with self._aws(f"read the adapters of {name}"):
            present = {c["InferenceComponentName"] for c in self._components(name) if c["Specification"].get("BaseInferenceComponentName") == base}
        if not plan.adapters and not present:
            return
        root = self._artifact_root(plan)
        wanted = set()
        for adapter in plan.adapters if plan.runtime not in ADAPTERS_IN_MODEL else ():  # TGI's are in its model
            wanted.add(adapter_component(name, key, adapter.name))
            self._put_adapter(name, key, adapter.name, self._upload_adapter(root, adapter), sizes.wait_timeout, reporter)
        for stale in sorted(present - wanted):
            self._delete_component(stale, reporter)

    def _component_changes(self, plan: "Plan") -> list[ResourceChange]:
        """What a deploy of components creates or changes (`cloudllm plan`, --dry-run)."""
        spec = plan.spec
        name, key = spec.name, self._model_key(plan)
        component = model_component(name, key)
        instance = self._instance(spec)
        changes = []
        if plan.action == "create":
            changes += [
                ResourceChange(resource="endpoint-config", name=f"{res.name_prefix(name)}{plan.digest[:8]}-<time>", action="create",
                               reason=f"{instance}, managed instance scaling {spec.min_instances}-{max(1, spec.max_instances)}, no model in the variant"),
                ResourceChange(resource="endpoint", name=name, action="create"),
            ]  # fmt: skip
        needs = compute_requirements(plan, instance)
        reserved = f"{needs['MinMemoryRequiredInMb']} MiB" + (f", {needs['NumberOfAcceleratorDevicesRequired']:g} GPU(s)" if "NumberOfAcceleratorDevicesRequired" in needs else "")
        changes.append(ResourceChange(resource="model", name=f"{res.name_prefix(name)}{plan.digest[:8]}-<time>", action="create", reason=f"{plan.runtime} on {instance}"))
        changes.append(ResourceChange(resource="inference-component", name=component, action="create" if plan.action == "create" else "update",
                                      reason=f"{max(1, spec.min_instances)} cop{'y' if max(1, spec.min_instances) == 1 else 'ies'} of {reserved} each"))  # fmt: skip
        for adapter in plan.adapters if plan.runtime not in ADAPTERS_IN_MODEL else ():
            changes.append(ResourceChange(resource="inference-component", name=adapter_component(name, key, adapter.name), action="create", reason=f"adapter {adapter.name} on {component}"))
        if plan.adapters and plan.runtime in ADAPTERS_IN_MODEL:
            names = ", ".join(a.name for a in plan.adapters)
            changes.append(ResourceChange(resource="model-data-source", name=f"{len(plan.adapters)} adapter channel(s)", action="create",
                                          reason=f"LORA_ADAPTERS={names}: read by TGI at start, so a change of adapters is a new model for {component}"))  # fmt: skip
        if spec.min_instances == 0:
            changes.append(ResourceChange(
                resource="scaling", name=scaling_resource(component), action="create",
                reason=f"scale to zero: $0/h while idle; the first request after idle waits {EXPECTED_WAKE} for the wake (invoke waits, --wake-timeout)",
            ))  # fmt: skip
        return changes

    # --- adapters on a live endpoint ----------------------------------------------------------------
    def _live_layout(self, name: str) -> dict:
        self._session()
        layout = self._layout(name, fresh=True)
        if layout is None:
            raise UserError(
                f"endpoint {name} has no inference components, so it cannot take adapters",
                f"deploy it again with --adapter NAME=PATH (SageMaker serves adapters as inference components)",
            )
        return layout

    def add_adapter(self, name: str, adapter, reporter: Reporter) -> None:
        from cloudllm.storage.s3 import S3Uri

        layout = self._live_layout(name)
        if not layout["adapter_components"]:
            refuse_live_change(name, layout)
        if layout.get("runtime") == "vllm":
            with self._aws(f"read the model of {name}"):
                base = self._describe_component(model_component(name, layout["first_model"]))
                fits = base is not None and self._lmi_rank_fits(base["Specification"]["ModelName"], [adapter])
            if not fits:
                raise UserError(
                    f"endpoint {name}'s LMI was not started to load an adapter of rank {adapter.rank} ({adapter.name}): "
                    "its model's OPTION_ENABLE_LORA / OPTION_MAX_LORA_RANK are read only at start",
                    f"deploy {name} again with --adapter {adapter.name}=PATH: its model is replaced with one that holds that rank",
                )
        with self._aws(f"read endpoint {name}"):
            desc = self._describe_endpoint(name)
            root = self._tags(desc["EndpointArn"]).get(res.ARTIFACTS_TAG) if desc else None
        if not root:
            raise UserError(f"endpoint {name} has no artifact location tag", "deploy it again with cloudllm")
        artifact = self._upload_adapter(S3Uri.parse(root), adapter)
        self._put_adapter(name, layout["first_model"], adapter.name, artifact, 900, reporter)

    def remove_adapter(self, name: str, adapter: str, reporter: Reporter) -> None:
        layout = self._live_layout(name)
        if not layout["adapter_components"]:
            refuse_live_change(name, layout)
        served = {a["name"] for a in self.list_adapters(name)}
        if adapter not in served:
            raise UserError(f"endpoint {name} has no adapter named {adapter}", f"it has: {', '.join(sorted(served)) or 'none'} (`cloudllm adapters list {name}`)")
        self._delete_component(adapter_component(name, layout["first_model"], adapter), reporter)

    def list_adapters(self, name: str) -> list[dict]:
        layout = self._live_layout(name)
        if layout.get("runtime") in ADAPTERS_IN_MODEL:
            return self._model_adapters(name, model_component(name, layout["first_model"]))
        base = model_component(name, layout["first_model"])
        with self._aws(f"read the adapters of {name}"):
            components = [c for c in self._components(name) if c["Specification"].get("BaseInferenceComponentName") == base]
        found = []
        for component in components:
            url = (component["Specification"].get("Container") or {}).get("ArtifactUrl", "")
            found.append({
                "name": component["InferenceComponentName"][len(base) + 1 :],
                "rank": None,  # in the adapter's adapter_config.json on S3; not read back here
                "digest": url.rstrip("/").rsplit("/", 1)[-1],
                "status": component["InferenceComponentStatus"],
            })  # fmt: skip
        return found

    # --- invoking ------------------------------------------------------------------------------------
    def _invoke_target(self, name: str, body: dict, model: str | None, *, lookup: bool = False) -> tuple[dict, dict]:
        """(extra InvokeEndpoint arguments, body) for a request to model `model` and the adapter its body names.

        What the endpoint holds comes from the local record (deploy stores it); without one, a plain
        request goes first and SageMaker's "Inference Component Name header is required" sends it
        here again with lookup=True: an endpoint of one model costs no extra call.
        """
        layout = self._layout(name) if lookup or model is not None else self.options.get("components")
        if layout is None:
            if model is not None:
                raise UserError(f"endpoint {name} serves one model; it has no model named {model}", "invoke without --model")
            return {}, body
        chosen = model or layout["first_model"]
        if chosen not in layout["models"]:
            raise UserError(f"endpoint {name} has no model named {chosen}", f"pick one of: {', '.join(layout['models'])}")
        component = model_component(name, chosen)
        parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        adapter = parameters.get("adapter_id") or (body.get("model") if "messages" in body else None)
        if adapter and adapter != chosen and chosen == layout["first_model"] and layout.get("runtime") in ADAPTERS_IN_MODEL:
            self._check_model_adapter(name, layout, adapter)
        if adapter and adapter != chosen and layout["adapter_components"]:
            # The adapter is a component: SageMaker tells the container which one (X-Amzn-SageMaker-Adapter-Identifier).
            body = {**body, "parameters": {k: v for k, v in parameters.items() if k != "adapter_id"}} if "adapter_id" in parameters else body
            if "messages" in body:
                body = {k: v for k, v in body.items() if k != "model"}
            component = adapter_component(name, chosen, adapter)
        return {"InferenceComponentName": component}, body

    def _layout(self, name: str, *, fresh: bool = False) -> dict | None:
        """The endpoint's models and how it takes adapters; from the provider options the local record keeps,
        else read once from SageMaker (fresh: read it now). None: an endpoint without inference components."""
        if not fresh:
            if name in self._layouts:
                return self._layouts[name]
            if self.options.get("components") is not None:
                return self.options["components"]
        with self._aws(f"read the inference components of {name}"):
            components = self._components(name)
        models = [c["InferenceComponentName"][len(name) + 1 :] for c in components if not c["Specification"].get("BaseInferenceComponentName")]
        layout = None
        if models:
            first = next(c for c in components if not c["Specification"].get("BaseInferenceComponentName"))
            model = self._sm.describe_model(ModelName=first["Specification"]["ModelName"])
            runtime = self._tags(model["ModelArn"]).get(res.TAG + "runtime")
            image = (model.get("PrimaryContainer") or {}).get("Image")
            layout = {"first_model": models[0], "models": models, "runtime": runtime, "image": image,
                      "adapter_components": takes_adapter_components(runtime, image)}
            if runtime in ADAPTERS_IN_MODEL:
                from cloudllm.providers.sagemaker.tgi_adapters import model_adapter_names

                layout["adapters"] = model_adapter_names(model)
        self._layouts[name] = layout
        return layout

    def _remember_layout(self, plan: "Plan", endpoint: str) -> None:
        with self._aws(f"read the inference components of {endpoint}"):
            components = self._components(endpoint)
        models = [c["InferenceComponentName"][len(endpoint) + 1 :] for c in components if not c["Specification"].get("BaseInferenceComponentName")]
        image = self._image(plan, self._instance(plan.spec))
        layout = {
            "first_model": models[0] if models else self._model_key(plan), "models": models, "runtime": plan.runtime, "image": image,
            "adapter_components": takes_adapter_components(plan.runtime, image),
        }
        if plan.runtime in ADAPTERS_IN_MODEL:  # the first model's adapters: an added model's deploy keeps them
            before = self._layouts.get(endpoint) or self.options.get("components") or {}
            layout["adapters"] = before.get("adapters", []) if plan.spec.add_model else sorted(a.name for a in plan.adapters)
        self._layouts[endpoint] = layout
        self.record_options(components=layout)  # the record keeps it: invoke needs no call to find the component


def res_log_group(endpoint: str) -> str:
    return f"/aws/sagemaker/Endpoints/{endpoint}"
