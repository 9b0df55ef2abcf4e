"""A plan checked for SageMaker before anything is created, and the changes it would make."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cloudllm.catalog.tgi import TGI_MODEL_TYPES
from cloudllm.errors import UserError
from cloudllm.providers.base import ResourceChange
from cloudllm.providers.kit import Rollout, rollout_of
import cloudllm.providers.sagemaker.resources as res
from cloudllm.providers.sagemaker.session import aws_error
from cloudllm.storage.s3 import S3Uri

if TYPE_CHECKING:
    from cloudllm.model_source import ModelInfo
    from cloudllm.plan import Plan
    from cloudllm.spec import DeploySpec


ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/[\w+=,.@/\-]{1,512}$")


def start_up_installs(plan: "Plan") -> list[str]:
    """The packages code/requirements.txt lists, which the HF inference container pip-installs when it starts.

    int8/int4 weights that are not quantized yet (plan, --dry-run) get the file their quantized bundle will have.
    """
    if plan.quantize_pending:
        from dataclasses import replace

        from cloudllm.bundle import render_code

        text = render_code(plan.model, replace(plan.settings, quantization=plan.quantize_pending))["code/requirements.txt"]
    else:
        text = next((f.read_bytes() for f in plan.bundle.files if f.name == "code/requirements.txt"), b"")
    lines = (line.strip() for line in text.decode().splitlines())
    return [re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0] for line in lines if line and not line.startswith("#")]


class SageMakerChecks:
    """Offline and account checks, and describe_changes."""

    # --- checks, before anything is created -------------------------------------------------
    def default_runtime(self, spec: "DeploySpec", model: "ModelInfo") -> str:
        """TGI for the LLMs it serves, on a GPU instance; the generated handler for the rest (and on CPU)."""
        if res.processor(self._instance(spec)) != "gpu":
            return "handler"
        if model.task == "text-generation" and model.model_type in TGI_MODEL_TYPES:
            return "tgi"
        return "handler"

    def _instance(self, spec: "DeploySpec") -> str:
        return spec.instance or res.DEFAULT_INSTANCE

    def accepts_uncatalogued_instance(self, name: str) -> bool:
        return name in res.known_instance_types()

    def validate(self, plan: "Plan") -> None:
        """Offline checks (`cloudllm plan` runs them without credentials): region, instance, role ARN,
        runtime and image, GPU count, tags, VPC, scaling, sizes, rollout, bucket, network isolation."""
        spec = plan.spec
        regional = self._region_configured()  # without one, `cloudllm plan` skips the image look-up; deploy refuses
        instance = self._instance(spec)
        if instance not in res.known_instance_types():
            from cloudllm.catalog import unknown_instance_error

            raise unknown_instance_error("sagemaker", instance)
        role = spec.options.get("role")
        if role is not None and (not isinstance(role, str) or not ROLE_ARN.match(role)):
            raise UserError(f"--role {role!r} is not an IAM role ARN", "write it as arn:aws:iam::123456789012:role/NAME")
        if plan.runtime in ("tgi", "vllm") and res.processor(instance) != "gpu":
            raise UserError(f"the {plan.runtime} runtime needs a GPU instance, not {instance}", "pick e.g. --instance ml.g5.xlarge, or --runtime handler")
        gpus = res.gpu_count(instance, spec.options)
        if gpus is None and plan.runtime in ("tgi", "vllm"):
            raise UserError(
                f"cloudllm's catalog does not know how many GPUs {instance} has, and {plan.runtime} must be told how many to shard over",
                "pass --option num_gpus=N with the instance's GPU count (see https://aws.amazon.com/ec2/instance-types/)",
            )
        image = self._image(plan, instance) if regional else plan.spec.image
        res.check_user_tags(spec.tags)
        subnets, groups = spec.options.get("vpc_subnets"), spec.options.get("vpc_security_groups")
        if bool(subnets) != bool(groups):
            raise UserError("a VPC needs both subnets and security groups", "pass --vpc-subnets and --vpc-security-groups together")
        if res.autoscaled(plan):
            res.scaling_policy(plan)
        from cloudllm.providers.sagemaker.components import check_components, uses_components

        if uses_components(spec):
            check_components(plan, instance)
        res.sizing(plan, instance)
        self._rollout(plan)
        if spec.bucket:
            root = self._artifact_root(plan)
            if len(str(root)) > 200:
                raise UserError(f"the artifact location {root} is too long", "use a shorter --bucket prefix")
        if spec.options.get("network_isolation") and image and res.runs_toolkit(image) and (packages := start_up_installs(plan)):
            raise UserError(
                f"--network-isolation leaves the container no network, but the Hugging Face inference container "
                f"pip-installs code/requirements.txt ({', '.join(packages)}) when it starts",
                "drop --network-isolation, or pass --image with a serving image that has them installed (containers/Dockerfile)",
            )

    def preflight(self, plan: "Plan") -> None:
        """Checks against the account: credentials, the bucket (exists, ours to use, in the endpoint's
        region), the execution role, and that the name is not an endpoint cloudllm did not create."""
        spec = plan.spec
        if not spec.options.get("role"):
            raise UserError(
                "SageMaker needs an execution role to read the artifacts and pull the image",
                "pass --role arn:aws:iam::ACCOUNT:role/NAME (a role SageMaker may assume, with S3 read on --bucket)",
            )
        if not spec.bucket:
            raise UserError("SageMaker reads the model from S3 and no bucket was given", "pass --bucket s3://BUCKET/PREFIX")
        self._image(plan, self._instance(spec))  # the region is known now: is the image published there?
        self._session()
        root = self._artifact_root(plan)
        with self._aws(f"check bucket {root}"):
            self._artifacts().check_bucket(root, self.region)
        with self._aws(f"check role {spec.options['role']}"):
            self._check_role(spec.options["role"])
        with self._aws(f"read endpoint {spec.name}"):
            self._check_not_foreign(spec.name)

    def _check_role(self, role: str) -> None:
        """The role must exist; without permission to look (iam:GetRole) the check is skipped."""
        from botocore.exceptions import ClientError

        try:
            self._client("iam").get_role(RoleName=role.rsplit("/", 1)[-1])
        except ClientError as exc:
            if aws_error(exc)[0] == "NoSuchEntity":
                raise UserError(f"IAM role {role} does not exist", "create it (with the AmazonSageMakerFullAccess policy) or pass another --role") from None

    def _check_not_foreign(self, name: str) -> None:
        desc = self._describe_endpoint(name)
        if desc is not None and res.ENDPOINT_TAG not in self._tags(desc["EndpointArn"]):
            raise UserError(
                f"a SageMaker endpoint named {name} exists in {self.region} and cloudllm did not create it",
                "pick another --name (cloudllm will not change an endpoint it does not manage)",
            )

    def _image(self, plan: "Plan", instance: str) -> str:
        if plan.spec.image:
            return plan.spec.image
        from cloudllm.catalog.sagemaker_images import image_uri

        kind = res.processor(instance)
        if kind == "neuron":
            raise UserError(
                f"{instance} runs Neuron-compiled models with a neuronx image, which cloudllm does not pick",
                "pass --image with a Neuron image, or choose a GPU or CPU instance",
            )
        return image_uri(plan.runtime, self.region, kind).uri

    def _artifact_root(self, plan: "Plan") -> S3Uri:
        return S3Uri.parse(plan.spec.bucket).child(plan.spec.name)

    def _version_uri(self, plan: "Plan") -> S3Uri | str:
        if not plan.spec.bucket:  # `cloudllm plan` without --bucket
            return f"s3://<--bucket>/{plan.spec.name}/{plan.bundle.stored.version_name}/"
        return self._artifact_root(plan).child(plan.bundle.stored.version_name)

    def describe_changes(self, plan: "Plan") -> list[ResourceChange]:
        name = plan.spec.name
        if plan.action == "unchanged":
            return [ResourceChange(resource="endpoint", name=name, action="unchanged", reason="nothing changed")]
        from cloudllm.providers.sagemaker.components import uses_components

        if uses_components(plan.spec) or (plan.existing and plan.existing.details.get("inference_components")):
            return self._component_changes(plan)
        if plan.rescale_only:
            changes = [ResourceChange(resource="endpoint", name=name, action="update", reason="autoscaling only, in place: no new model, config or instances")]
            return changes + self._scaling_changes(plan)
        if plan.retag_only:
            return [ResourceChange(resource="endpoint", name=name, action="update", reason="tags only, in place: the running model, endpoint config and endpoint are retagged")]
        version = f"{res.name_prefix(name)}{plan.digest[:8]}-<time>"
        old = (plan.existing.details if plan.existing else {}) or {}
        artifacts = str(self._version_uri(plan))
        if old.get("artifact") == artifacts:  # same bundle: the files the endpoint runs already
            upload = ResourceChange(resource="artifacts", name=artifacts, action="unchanged", reason="the same files")
        else:
            upload = ResourceChange(resource="artifacts", name=artifacts, action="create", reason="upload changed files, copy the rest inside S3")
        changes = [
            upload,
            ResourceChange(resource="model", name=version, action="create", reason=f"{plan.runtime} on {self._instance(plan.spec)}"),
            ResourceChange(resource="endpoint-config", name=version, action="create"),
        ]
        if plan.action == "create":
            changes.append(ResourceChange(resource="endpoint", name=name, action="create"))
        else:
            changes.append(ResourceChange(resource="endpoint", name=name, action="update", reason=f"blue/green {plan.spec.rollout}: {'; '.join(plan.reasons)}"))
            for kind, key in (("endpoint-config", "endpoint_config"), ("model", "model_name")):
                if old.get(key):
                    changes.append(ResourceChange(resource=kind, name=old[key], action="delete", reason="replaced"))
        return changes + self._scaling_changes(plan)

    def _scaling_changes(self, plan: "Plan") -> list[ResourceChange]:
        name = plan.spec.name
        changes = []
        had_scaling = False
        if plan.existing is not None:
            with self._aws(f"read autoscaling of {name}"):
                had_scaling = self._scaling_state(name) is not None
        if res.autoscaled(plan):
            policy = res.scaling_policy(plan)
            metric = policy["PredefinedMetricSpecification"]["PredefinedMetricType"]
            action = "update" if had_scaling else "create"
            changes.append(ResourceChange(resource="scaling-target", name=res.scaling_resource_id(name), action=action, reason=f"{max(1, plan.spec.min_instances)}-{plan.spec.max_instances} instances"))
            changes.append(ResourceChange(resource="scaling-policy", name=res.SCALING_POLICY, action=action, reason=f"{metric} target {policy['TargetValue']:g}"))
        elif had_scaling:
            changes.append(ResourceChange(resource="scaling-target", name=res.scaling_resource_id(name), action="delete", reason="max_instances is 1"))
        return changes

    def _refuse_no_wait_scaling(self, plan: "Plan") -> None:
        if not plan.wait and res.autoscaled(plan):
            raise UserError(
                "--no-wait cannot set up autoscaling: SageMaker registers a variant for scaling once the endpoint is InService",
                "drop --no-wait, or deploy without the scaling flags",
            )

    @staticmethod
    def _alarms(plan: "Plan") -> list[str]:
        return list(plan.spec.options.get("rollback_alarms") or [])

    def _rollout(self, plan: "Plan") -> Rollout:
        """The spec's rollout; rollback alarms watch a bake time even for all-at-once."""
        return rollout_of(plan.spec, plan.spec.options.get("rollout_wait"), watched=bool(self._alarms(plan)))
