"""SageMakerProvider: a Plan as SageMaker real-time endpoint calls (boto3).

    upload (storage/s3.py) -> CreateModel (ModelDataSource S3Prefix, uncompressed)
      -> CreateEndpointConfig -> CreateEndpoint -> wait InService -> autoscaling

A deploy to a name that exists makes a new model and endpoint config and moves the endpoint
with a blue/green UpdateEndpoint; once it is InService on the new config, the old config,
model and artifact version are removed. Each endpoint config is tagged with the plan's
fingerprint, so `get` reads what runs from the config the endpoint uses: after a rollback
that is the old one, and the next deploy tries again.

Credentials and region come from boto3's default chain (`--profile`, `--region`); boto3
honours AWS_ENDPOINT_URL, which is how `cloudllm emulate sagemaker` is reached. `validate` needs
the region but no credentials (`cloudllm plan`); `preflight` checks the account.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from cloudllm import __version__
from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.base import Endpoint, Feature, Provider, ResourceChange
from cloudllm.providers.sagemaker import resources as res
from cloudllm.storage.s3 import S3Artifacts, S3Uri

NO_REGION = "no AWS region is set"

if TYPE_CHECKING:
    from cloudllm.model_source import ModelInfo
    from cloudllm.plan import Plan
    from cloudllm.spec import DeploySpec

ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/[\w+=,.@/\-]{1,512}$")
MAX_POLL_SECONDS = 15.0
DELETE_TIMEOUT = 900
ABANDONED_UPLOAD_SECONDS = 3600  # an artifact version no model uses, untouched this long, is a killed deploy's
UNFINISHED = ("Creating", "Updating", "SystemUpdating")  # SageMaker is still working on the endpoint
_NOT_FOUND = ("Could not find", "does not exist", "not found", "No scaling policy found")
_DENIED = ("AccessDenied", "AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId", "ExpiredTokenException")


class StillWaiting(DeployFailed):
    """The endpoint did not settle within the deadline: it may still come up, so nothing is deleted."""


class SageMakerProvider(Provider):
    name = "sagemaker"
    unsupported = {
        Feature.SCALE_TO_ZERO: "it needs inference components, which cloudllm does not create yet; use --min-instances 1",
    }

    default_instance = res.DEFAULT_INSTANCE  # what the planner sizes against when --instance is not given

    def __init__(self, region: str | None = None, options: dict[str, Any] | None = None):
        super().__init__(region, options)
        self._boto_session = None
        self._has_credentials = False
        self._clients: dict[str, Any] = {}

    # --- AWS access -------------------------------------------------------------------------
    def _configured(self):
        """The boto3 session with its profile and region resolved: local configuration only, no credentials needed."""
        if self._boto_session is None:
            import boto3
            from botocore.exceptions import ProfileNotFound

            try:
                session = boto3.Session(profile_name=self.options.get("profile"), region_name=self.region)
            except ProfileNotFound:
                raise UserError(f"AWS profile {self.options.get('profile')!r} is not configured", "see `aws configure list-profiles`") from None
            if not session.region_name:
                raise UserError(NO_REGION, "pass --region, or set AWS_DEFAULT_REGION or a region in ~/.aws/config")
            check_region(session.region_name)
            self.region = session.region_name
            self._boto_session = session
        return self._boto_session

    def _region_configured(self) -> bool:
        """True when a region is given or configured (and valid); False when none is, which only deploy refuses."""
        try:
            self._configured()
        except UserError as exc:
            if exc.problem == NO_REGION:
                return False
            raise
        return True

    def _session(self):
        """The boto3 session, once it has credentials to sign with."""
        session = self._configured()
        if not self._has_credentials:
            if session.get_credentials() is None:
                raise UserError(
                    "no AWS credentials found",
                    "run `aws configure` or `aws sso login`, pass --profile, or point AWS_ENDPOINT_URL at `cloudllm emulate sagemaker`",
                )
            self._has_credentials = True
        return session

    def _client(self, service: str):
        if service not in self._clients:
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": 8},
                user_agent_extra=f"cloudllm/{__version__}",
                # Invocations may take SageMaker's full 60 s; the SDK docs advise a 70 s socket timeout.
                read_timeout=70 if service == "sagemaker-runtime" else 60,
            )
            self._clients[service] = self._session().client(service, config=config)
        return self._clients[service]

    @property
    def _sm(self):
        return self._client("sagemaker")

    @property
    def _scaling(self):
        return self._client("application-autoscaling")

    def _artifacts(self) -> S3Artifacts:
        return S3Artifacts(self._client("s3"))

    @contextmanager
    def _aws(self, what: str) -> Iterator[None]:
        """Turn AWS errors into one line: what failed, what AWS said, and what to do."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        try:
            yield
        except NoCredentialsError:
            raise UserError("no AWS credentials found", "run `aws configure`, or pass --profile") from None
        except EndpointConnectionError as exc:
            raise DeployFailed(f"cannot reach AWS to {what}: {exc}", "check the network, --region and AWS_ENDPOINT_URL") from None
        except ClientError as exc:
            code, message = _error(exc)
            if code in _DENIED:
                raise UserError(f"AWS refused to {what}: {message}", "check your credentials and the IAM permissions they carry") from None
            if code == "ResourceLimitExceeded":
                raise UserError(f"cannot {what}: {message}", "request a quota increase in Service Quotas, or pick another --instance") from None
            raise DeployFailed(f"cannot {what}: {message}", "fix what SageMaker names, then deploy again") from None
        except BotoCoreError as exc:
            raise DeployFailed(f"cannot {what}: {exc}", "run the same command again") from None

    # --- checks, before anything is created -------------------------------------------------
    def default_runtime(self, spec: "DeploySpec", model: "ModelInfo") -> str:
        """TGI for the LLMs it serves, on a GPU instance; the generated handler for the rest (and on CPU)."""
        if res.processor(self._instance(spec)) != "gpu":
            return "handler"
        if model.task == "text-generation" and model.model_type in res.TGI_MODEL_TYPES:
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
        res.sizing(plan, instance)
        _rollout_wait(plan)
        if spec.bucket:
            root = self._artifact_root(plan)
            if len(str(root)) > 200:
                raise UserError(f"the artifact location {root} is too long", "use a shorter --bucket prefix")
        if spec.options.get("network_isolation") and image and res.runs_toolkit(image) and (packages := _start_up_installs(plan)):
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
            if _error(exc)[0] == "NoSuchEntity":
                raise UserError(f"IAM role {role} does not exist", "create it (with the AmazonSageMakerFullAccess policy) or pass another --role") from None
            # Not allowed to look (AccessDenied) or IAM unreachable: SageMaker itself checks the role at CreateModel.

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
            return f"s3://<--bucket>/{plan.spec.name}/{plan.bundle.stored.digest[:16]}/"
        return self._artifact_root(plan).child(plan.bundle.stored.digest[:16])

    def describe_changes(self, plan: "Plan") -> list[ResourceChange]:
        name = plan.spec.name
        if plan.action == "unchanged":
            return [ResourceChange(resource="endpoint", name=name, action="unchanged", reason="nothing changed")]
        if plan.rescale_only:
            changes = [ResourceChange(resource="endpoint", name=name, action="update", reason="autoscaling only, in place: no new model, config or instances")]
            return changes + self._scaling_changes(plan)
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

    # --- deploy and update ----------------------------------------------------------------
    def deploy(self, plan: "Plan", reporter: Reporter) -> Endpoint:
        name = plan.spec.name
        self._refuse_no_wait_scaling(plan)
        instance = self._instance(plan.spec)
        sizes = res.sizing(plan, instance)
        created: list[tuple[str, str]] = []
        try:
            version = self._upload(plan, reporter)
            config_name = self._create_version(plan, instance, sizes, version, created)
            with self._aws(f"create endpoint {name}"):
                fresh = self._create_once(
                    "endpoint", name, lambda: self._sm.create_endpoint(
                        EndpointName=name,
                        EndpointConfigName=config_name,
                        Tags=res.tag_list(res.endpoint_tags(plan, str(self._artifact_root(plan)))),
                    ),
                    ours=lambda: self._endpoint_targets(name, config_name),
                )  # fmt: skip
            if not fresh:
                raise DeployFailed(
                    f"endpoint {name} was created by another deploy while this one ran",
                    "run the same deploy again: it will update that endpoint once it is InService",
                )
            created.append(("endpoint", name))
            reporter.step(f"endpoint {name} is being created on {plan.spec.min_instances or 1}x {instance} ({plan.runtime})")
            if not plan.wait:
                return self._require(name)
            self._wait(name, sizes.wait_timeout, reporter)
            self._apply_scaling(plan, reporter)
        except StillWaiting:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if not isinstance(exc, KeyboardInterrupt):  # on Ctrl-C, leave it: the same deploy resumes
                self._remove_created(name, created, reporter)
            raise
        self._sweep(name, keep={config_name}, keep_version=version, reporter=reporter)
        self._retag_endpoint(plan)
        return self._require(name)

    def update(self, plan: "Plan", existing: Endpoint, reporter: Reporter) -> Endpoint:
        from botocore.exceptions import ClientError

        name = plan.spec.name
        self._refuse_no_wait_scaling(plan)
        if existing.state == "Failed":
            # SageMaker cannot update a Failed endpoint: replace it.
            reporter.step(f"endpoint {name} is Failed ({existing.failure_reason or 'no reason given'}): replacing it")
            self._delete_endpoint(name, reporter)
            return self.deploy(plan, reporter)
        if existing.state in UNFINISHED or existing.details.get("unfinished_digest") == plan.digest:
            return self._finish(plan, reporter)
        if existing.state != "InService":
            raise UserError(f"endpoint {name} is {existing.state}", f"wait until it is InService (`cloudllm status {name}`), then deploy again")
        if plan.rescale_only:
            return self._rescale(plan, existing, reporter)
        instance = self._instance(plan.spec)
        sizes = res.sizing(plan, instance)
        with self._aws(f"read endpoint {name}"):
            old_instance = existing.instance
            saved_scaling = self._scaling_state(name)
        created: list[tuple[str, str]] = []
        removed_scaling = False
        deployment = res.deployment_config(plan.spec.rollout, list(plan.spec.options.get("rollback_alarms") or []), _rollout_wait(plan))
        try:
            version = self._upload(plan, reporter)
            config_name = self._create_version(plan, instance, sizes, version, created)
            if saved_scaling and (instance != old_instance or not res.autoscaled(plan)):
                # Application Auto Scaling refuses an update that changes a scaled variant's instance type.
                with self._aws(f"remove autoscaling of {name}"):
                    self._remove_scaling(name)
                removed_scaling = True
            with self._aws(f"update endpoint {name}"):
                try:
                    self._sm.update_endpoint(
                        EndpointName=name,
                        EndpointConfigName=config_name,
                        DeploymentConfig=deployment,
                        # Keep the instance count autoscaling chose while the new fleet comes up.
                        RetainAllVariantProperties=bool(saved_scaling) and not removed_scaling,
                    )
                except ClientError as exc:
                    if not _in_progress(exc):
                        raise
                    if not (_retried(exc) and self._endpoint_targets(name, config_name)):
                        # Another deploy (another pipeline, another machine) is changing the endpoint.
                        raise DeployFailed(
                            f"endpoint {name} is being changed by another deploy ({_message_of(exc)})",
                            f"wait until it is InService (`cloudllm status {name}`), then deploy again",
                        ) from None
                    # else: our own UpdateEndpoint went through and only its answer was lost.
            reporter.step(f"blue/green update of {name} started ({plan.spec.rollout}, {'; '.join(plan.reasons)})")
            if not plan.wait:
                return self._require(name)
            self._wait(name, sizes.wait_timeout + res.rollout_seconds(deployment), reporter, target_config=config_name)
            self._apply_scaling(plan, reporter)
        except StillWaiting:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if not isinstance(exc, KeyboardInterrupt):
                self._remove_created(name, created, reporter)
                if removed_scaling:
                    self._restore_scaling(saved_scaling)
            raise
        self._sweep(name, keep={config_name}, keep_version=version, reporter=reporter)
        self._retag_endpoint(plan)
        return self._require(name)

    def _rescale(self, plan: "Plan", existing: Endpoint, reporter: Reporter) -> Endpoint:
        """Only autoscaling changed: set it on the running variant; no new model, config or fleet.

        A blue/green update would stand up a second fleet for minutes to change two numbers.
        Application Auto Scaling moves the instance count into the new min..max itself; without
        autoscaling any more, the count is set back with UpdateEndpointWeightsAndCapacities.
        The fingerprint tags move to the running config last, so a run killed half-way finds
        the old fingerprint and does the same steps again.
        """
        name = plan.spec.name
        details = existing.details
        reporter.step(f"only the autoscaling of {name} changed: changing it in place, no new instances")
        self._apply_scaling(plan, reporter)
        desired = max(1, plan.spec.min_instances)
        if not res.autoscaled(plan) and details.get("instances") not in (None, desired):
            with self._aws(f"set the instance count of {name}"):
                self._sm.update_endpoint_weights_and_capacities(
                    EndpointName=name, DesiredWeightsAndCapacities=[{"VariantName": res.VARIANT, "DesiredInstanceCount": desired}]
                )
            reporter.step(f"{name}: {details['instances']} -> {desired} instance(s)")
            self._wait(name, res.sizing(plan, self._instance(plan.spec)).wait_timeout, reporter)
        fingerprint = res.tag_list(res.fingerprint_tags(plan))
        with self._aws(f"tag the model and endpoint config of {name}"):
            for arn in (
                self._sm.describe_model(ModelName=details["model_name"])["ModelArn"],
                self._sm.describe_endpoint_config(EndpointConfigName=details["endpoint_config"])["EndpointConfigArn"],
            ):
                self._sm.add_tags(ResourceArn=arn, Tags=fingerprint)
        self._retag_endpoint(plan)
        return self._require(name)

    def _finish(self, plan: "Plan", reporter: Reporter) -> Endpoint:
        """The endpoint is Creating or Updating: finish an earlier, interrupted deploy of this same version.

        A deploy killed while waiting (or on another machine, or Ctrl-C) leaves SageMaker working;
        running it again waits for that work, then does what the first run had left: autoscaling,
        tags, removing old versions. When the endpoint is moving to another version, another
        deploy is changing it: this one stops, clearly, and changes nothing.
        """
        name = plan.spec.name
        with self._aws(f"read endpoint {name}"):
            desc = self._describe_endpoint(name)
            if desc is None:
                raise DeployFailed(f"endpoint {name} disappeared while deploying", "someone deleted it; deploy again")
            status = desc["EndpointStatus"]
            target = (desc.get("PendingDeploymentSummary") or {}).get("EndpointConfigName") or desc["EndpointConfigName"]
            config = self._sm.describe_endpoint_config(EndpointConfigName=target)
            tags = self._tags(config["EndpointConfigArn"])
        if tags.get(res.FINGERPRINT_TAGS["digest"]) != plan.digest:
            raise DeployFailed(
                f"endpoint {name} is {status}: another deploy is changing it to another version",
                f"wait until it is InService (`cloudllm status {name}`), then deploy again",
            )
        if status == "InService":
            reporter.step(f"endpoint {name} is InService with this version, but an earlier deploy did not finish: finishing it")
        else:
            reporter.step(f"endpoint {name} is already {status} with this version (an earlier deploy did not finish): waiting for it")
        if not plan.wait and status != "InService":
            return self._require(name)
        sizes = res.sizing(plan, self._instance(plan.spec))
        self._wait(name, sizes.wait_timeout, reporter, target_config=target)
        self._apply_scaling(plan, reporter)
        version = S3Uri.parse(tags[res.VERSION_TAG]) if tags.get(res.VERSION_TAG) else None
        self._sweep(name, keep={target}, keep_version=version, reporter=reporter)
        self._retag_endpoint(plan)
        return self._require(name)

    def _retag_endpoint(self, plan: "Plan") -> None:
        """Give the endpoint the plan's tags (the user's may have changed) and mark this deploy finished: the last step."""
        name = plan.spec.name
        with self._aws(f"tag endpoint {name}"):
            arn = self._sm.describe_endpoint(EndpointName=name)["EndpointArn"]
            wanted = {**res.endpoint_tags(plan, str(self._artifact_root(plan))), res.FINISHED_TAG: plan.digest}
            stale = [k for k in self._tags(arn) if k not in wanted and not k.startswith("aws:")]
            if stale:
                self._sm.delete_tags(ResourceArn=arn, TagKeys=stale)
            self._sm.add_tags(ResourceArn=arn, Tags=res.tag_list(wanted))

    def _refuse_no_wait_scaling(self, plan: "Plan") -> None:
        if not plan.wait and res.autoscaled(plan):
            raise UserError(
                "--no-wait cannot set up autoscaling: SageMaker registers a variant for scaling once the endpoint is InService",
                "drop --no-wait, or deploy without the scaling flags",
            )

    def _upload(self, plan: "Plan", reporter: Reporter) -> S3Uri:
        # The endpoint's local record keeps the provider options: `delete --purge-artifacts` then finds
        # the artifacts even once the endpoint (and its tag naming them) is gone.
        self.options["bucket"] = plan.spec.bucket
        version = self._version_uri(plan)
        with self._aws(f"upload the artifacts to {version}"):
            result = self._artifacts().upload(
                plan.bundle.stored, version, reporter, reuse_from=self._artifact_root(plan), kms_key=plan.spec.options.get("kms_key")
            )
        reporter.step(result.summary())
        return version

    def _create_version(self, plan: "Plan", instance: str, sizes: res.Sizing, version: S3Uri, created: list) -> str:
        """CreateModel + CreateEndpointConfig for one version; returns their (shared) name."""
        spec = plan.spec
        name = res.version_names(spec.name, plan.digest)
        tags = res.tag_list(res.version_tags(plan, instance, str(version)))
        container = {
            "Image": self._image(plan, instance),
            "Environment": res.container_env(plan, instance, sizes, self.region),
            "ModelDataSource": {"S3DataSource": {"S3Uri": str(version), "S3DataType": "S3Prefix", "CompressionType": "None"}},
        }
        model: dict[str, Any] = {
            "ModelName": name,
            "ExecutionRoleArn": spec.options["role"],
            "PrimaryContainer": container,
            "Tags": tags,
            "EnableNetworkIsolation": bool(spec.options.get("network_isolation")),
        }
        if spec.options.get("vpc_subnets"):
            model["VpcConfig"] = {"Subnets": list(spec.options["vpc_subnets"]), "SecurityGroupIds": list(spec.options["vpc_security_groups"])}
        with self._aws(f"create model {name}"):
            self._create_once("model", name, lambda: self._sm.create_model(**model), ours=lambda: self._same_version(name, tags))
        created.append(("model", name))
        variant: dict[str, Any] = {
            "VariantName": res.VARIANT,
            "ModelName": name,
            "InstanceType": instance,
            "InitialInstanceCount": max(1, spec.min_instances),
            "ModelDataDownloadTimeoutInSeconds": sizes.download_timeout,
            "ContainerStartupHealthCheckTimeoutInSeconds": sizes.startup_timeout,
        }
        if sizes.volume_gb is not None:
            variant["VolumeSizeInGB"] = sizes.volume_gb
        config: dict[str, Any] = {"EndpointConfigName": name, "ProductionVariants": [variant], "Tags": tags}
        if spec.options.get("kms_key") and not res.has_local_storage(instance):
            config["KmsKeyId"] = spec.options["kms_key"]  # instance-store volumes are encrypted by the hardware
        with self._aws(f"create endpoint config {name}"):
            self._create_once(
                "endpoint-config", name, lambda: self._sm.create_endpoint_config(**config), ours=lambda: self._same_version(name, tags, config=True)
            )
        created.append(("endpoint-config", name))
        return name

    def _create_once(self, kind: str, name: str, create, *, ours) -> bool:
        """Run a Create* call; True when it created the resource, False when it already existed.

        botocore retries throttling, 5xx and dropped connections. When a create went through but
        its answer was lost, the retry meets "already exists". So does a re-run, within the same
        second, of a deploy that was killed after this create (version names end in the second).
        Either way it is ours when `ours()` confirms the resource is exactly the one we ask for
        (same endpoint, artifact version and digest). Anything else (the name taken by someone
        else) raises the original error.
        """
        from botocore.exceptions import ClientError

        try:
            create()
            return True
        except ClientError as exc:
            if not _already_exists(exc):
                raise
            if ours():
                return True
            if kind == "endpoint":
                return False
            raise

    def _same_version(self, name: str, tags: list[dict[str, str]], *, config: bool = False) -> bool:
        """The model (or endpoint config) called name carries exactly the version tags we create it with."""
        describe = self._sm.describe_endpoint_config(EndpointConfigName=name) if config else self._sm.describe_model(ModelName=name)
        found = self._tags(describe["EndpointConfigArn" if config else "ModelArn"])
        return all(found.get(t["Key"]) == t["Value"] for t in tags)

    def _endpoint_targets(self, name: str, config_name: str) -> bool:
        """The endpoint runs, or is moving to, config_name."""
        desc = self._describe_endpoint(name) or {}
        pending = (desc.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
        return config_name in (desc.get("EndpointConfigName"), pending)

    # --- waiting --------------------------------------------------------------------------------
    def _wait(self, name: str, timeout: int, reporter: Reporter, *, target_config: str | None = None) -> dict:
        """Poll until InService (on target_config), quickly at first, then every 15 s at most."""
        start = time.monotonic()
        with reporter.waiting(f"waiting for endpoint {name}") as update:
            while True:
                with self._aws(f"read endpoint {name}"):
                    desc = self._describe_endpoint(name)
                if desc is None:
                    raise DeployFailed(f"endpoint {name} disappeared while deploying", "someone deleted it; deploy again")
                status = desc["EndpointStatus"]
                elapsed = time.monotonic() - start
                update(status)
                if status == "InService":
                    if target_config is None or desc.get("EndpointConfigName") == target_config:
                        return desc
                    raise self._failure(name, desc, "update was rolled back")
                if status in ("Failed", "UpdateRollbackFailed", "OutOfService"):
                    raise self._failure(name, desc, "failed" if status == "Failed" else status)
                if elapsed >= timeout:
                    raise StillWaiting(
                        f"endpoint {name} is still {status} after {timeout}s",
                        f"it may still come up: watch `cloudllm status {name}` and `cloudllm logs {name}`; raise --timeout for large models",
                    )
                # Poll at a tenth of the time waited so far: every 0.5 s at first, every 15 s after 2.5 minutes.
                time.sleep(min(max(0.5, elapsed / 10), MAX_POLL_SECONDS, timeout - elapsed + 0.1))

    def _failure(self, name: str, desc: dict, what: str) -> DeployFailed:
        return DeployFailed(
            f"endpoint {name} {what}: {desc.get('FailureReason') or 'SageMaker gave no reason'}",
            f"see CloudWatch log group {log_group(name)} (`cloudllm logs {name}`)",
        )

    # --- autoscaling ----------------------------------------------------------------------
    def _scaling_state(self, name: str) -> dict | None:
        """The variant's scalable target and policies, or None when it is not autoscaled."""
        rid = res.scaling_resource_id(name)
        targets = self._scaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[rid], ScalableDimension=res.SCALABLE_DIMENSION
        )["ScalableTargets"]
        if not targets:
            return None
        policies = self._scaling.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=res.SCALABLE_DIMENSION
        )["ScalingPolicies"]
        return {"target": targets[0], "policies": policies}

    def _apply_scaling(self, plan: "Plan", reporter: Reporter) -> None:
        name = plan.spec.name
        if not res.autoscaled(plan):
            with self._aws(f"remove autoscaling of {name}"):
                self._remove_scaling(name)
            return
        rid = res.scaling_resource_id(name)
        policy = res.scaling_policy(plan)
        with self._aws(f"set up autoscaling of {name}"):
            self._scaling.register_scalable_target(
                ServiceNamespace="sagemaker",
                ResourceId=rid,
                ScalableDimension=res.SCALABLE_DIMENSION,
                MinCapacity=max(1, plan.spec.min_instances),
                MaxCapacity=plan.spec.max_instances,
            )
            self._scaling.put_scaling_policy(
                PolicyName=res.SCALING_POLICY,
                ServiceNamespace="sagemaker",
                ResourceId=rid,
                ScalableDimension=res.SCALABLE_DIMENSION,
                PolicyType="TargetTrackingScaling",
                TargetTrackingScalingPolicyConfiguration=policy,
            )
        metric = plan.spec.scale_metric or "invocations"
        reporter.step(
            f"autoscaling {max(1, plan.spec.min_instances)}-{plan.spec.max_instances} instances on "
            f"{res.SCALE_METRICS[metric][1]} (target {policy['TargetValue']:g})"
        )

    def _remove_scaling(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        state = self._scaling_state(name)
        if state is None:
            return False
        for policy in state["policies"]:
            _unless_gone(lambda: self._scaling.delete_scaling_policy(
                PolicyName=policy["PolicyName"], ServiceNamespace="sagemaker",
                ResourceId=policy["ResourceId"], ScalableDimension=policy["ScalableDimension"],
            ))  # fmt: skip
        try:
            self._scaling.deregister_scalable_target(
                ServiceNamespace="sagemaker", ResourceId=res.scaling_resource_id(name), ScalableDimension=res.SCALABLE_DIMENSION
            )
        except ClientError as exc:
            if _error(exc)[0] != "ObjectNotFoundException":
                raise
        return True

    def _restore_scaling(self, state: dict) -> None:
        """Put back a scalable target and its policies removed for an update that then failed."""
        target = state["target"]
        keys = {k: target[k] for k in ("ServiceNamespace", "ResourceId", "ScalableDimension")}
        with self._aws("restore autoscaling"):
            self._scaling.register_scalable_target(**keys, MinCapacity=target["MinCapacity"], MaxCapacity=target["MaxCapacity"])
            for policy in state["policies"]:
                config = {k: v for k, v in policy.items() if k in ("StepScalingPolicyConfiguration", "TargetTrackingScalingPolicyConfiguration")}
                self._scaling.put_scaling_policy(PolicyName=policy["PolicyName"], PolicyType=policy["PolicyType"], **keys, **config)

    # --- clean-up -------------------------------------------------------------------------
    def _remove_created(self, endpoint: str, created: list[tuple[str, str]], reporter: Reporter) -> None:
        """Delete, newest first, what a failed deploy created (artifacts stay for the retry).

        What the endpoint runs or is moving to is never removed: with two deploys of one version
        racing, the config both named alike may be the one the other deploy put in service.
        """
        removed = []
        in_use: set[str] = set()
        if ("endpoint", endpoint) not in created:
            try:
                with self._aws(f"read endpoint {endpoint}"):
                    in_use = self._in_use(endpoint)
            except UserError as exc:
                reporter.step(f"could not read endpoint {endpoint}: {exc.problem}; removing nothing")
                return
        for kind, name in reversed(created):
            if name in in_use and kind != "endpoint":
                reporter.step(f"kept {kind} {name}: endpoint {endpoint} uses it")
                continue
            try:
                with self._aws(f"delete {kind} {name}"):
                    if kind == "endpoint":
                        self._delete_endpoint(name, reporter)
                    elif kind == "endpoint-config":
                        _unless_gone(lambda: self._sm.delete_endpoint_config(EndpointConfigName=name))
                    else:
                        _unless_gone(lambda: self._sm.delete_model(ModelName=name))
                removed.append(f"{kind} {name}")
            except UserError as exc:
                reporter.step(f"could not remove {kind} {name}: {exc.problem}")
        if removed:
            reporter.step(f"removed what this deploy created: {', '.join(removed)}")

    def _in_use(self, endpoint: str) -> set[str]:
        """Names of the configs and models the endpoint runs or is moving to."""
        from botocore.exceptions import ClientError

        desc = self._describe_endpoint(endpoint) or {}
        configs = {desc.get("EndpointConfigName"), (desc.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")} - {None}
        in_use = set(configs)
        for config in configs:
            try:
                described = self._sm.describe_endpoint_config(EndpointConfigName=config)
            except ClientError as exc:
                if not _gone_already(exc):
                    raise
                continue
            in_use.update(v["ModelName"] for v in described["ProductionVariants"])
        return in_use

    def _sweep(self, name: str, *, keep: set[str], keep_version: S3Uri | None, reporter: Reporter) -> tuple[list[str], set[str]]:
        """Delete this endpoint's cloudllm configs and models except `keep`, and artifact versions except keep_version.

        Returns what it removed and the artifact versions the configs and models it saw pointed at.
        """
        removed = []
        versions: set[str] = set()
        with self._aws(f"remove old versions of {name}"):
            # Never what the endpoint runs or is moving to: another deploy may have changed it since.
            keep = keep | self._in_use(name)
            kept_versions: set[str] = set()
            for kind, lister, key, deleter, arg in (
                ("endpoint-config", "list_endpoint_configs", "EndpointConfigs", self._sm.delete_endpoint_config, "EndpointConfigName"),
                ("model", "list_models", "Models", self._sm.delete_model, "ModelName"),
            ):
                for page in self._sm.get_paginator(lister).paginate(NameContains=res.name_prefix(name)):
                    for item in page[key]:
                        resource = item[arg]
                        tags = self._tags(item["EndpointConfigArn" if kind == "endpoint-config" else "ModelArn"])
                        if tags.get(res.ENDPOINT_TAG) != name:
                            continue
                        if tags.get(res.VERSION_TAG):
                            versions.add(tags[res.VERSION_TAG])
                        if resource in keep:
                            if tags.get(res.VERSION_TAG):
                                kept_versions.add(tags[res.VERSION_TAG])
                            continue
                        _unless_gone(lambda: deleter(**{arg: resource}))
                        removed.append(f"{kind} {resource}")
            if keep_version is not None:
                artifacts = self._artifacts()
                for version in artifacts.versions(S3Uri.parse(str(keep_version).rstrip("/").rsplit("/", 1)[0])):
                    if version == keep_version or str(version) in kept_versions:
                        continue
                    # A version no model points at may be another pipeline's upload in progress:
                    # only one untouched for a while is abandoned (a killed deploy's).
                    if str(version) in versions or artifacts.idle_seconds(version) > ABANDONED_UPLOAD_SECONDS:
                        artifacts.delete(version)
                        removed.append(f"artifacts {version}")
        if removed:
            reporter.step(f"removed {', '.join(removed)}")
        return removed, versions

    def _delete_endpoint(self, name: str, reporter: Reporter) -> None:
        """DeleteEndpoint, then wait until it is gone (a name in Deleting cannot be reused)."""
        with self._aws(f"delete endpoint {name}"):
            _unless_gone(lambda: self._sm.delete_endpoint(EndpointName=name))
            start = time.monotonic()
            delay = 0.25
            with reporter.waiting(f"deleting endpoint {name}") as update:
                while (desc := self._describe_endpoint(name)) is not None:
                    update(desc["EndpointStatus"])
                    if time.monotonic() - start > DELETE_TIMEOUT:
                        raise DeployFailed(f"endpoint {name} is still {desc['EndpointStatus']} after {DELETE_TIMEOUT}s", "check it in the SageMaker console")
                    time.sleep(delay)
                    delay = min(delay * 1.5, MAX_POLL_SECONDS)

    # --- reading --------------------------------------------------------------------------
    def _describe_endpoint(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self._sm.describe_endpoint(EndpointName=name)
        except ClientError as exc:
            code, message = _error(exc)
            if code == "ValidationException" and any(s in message for s in _NOT_FOUND):
                return None
            raise

    def _tags(self, arn: str) -> dict[str, str]:
        tags: list[dict[str, str]] = []
        for page in self._sm.get_paginator("list_tags").paginate(ResourceArn=arn):
            tags.extend(page.get("Tags", []))
        return res.tag_dict(tags)

    def _require(self, name: str) -> Endpoint:
        endpoint = self.get(name)
        if endpoint is None:
            raise DeployFailed(f"endpoint {name} disappeared", "deploy again")
        return endpoint

    def get(self, name: str) -> Endpoint | None:
        from botocore.exceptions import ClientError

        self._session()
        with self._aws(f"read endpoint {name}"):
            desc = self._describe_endpoint(name)
            if desc is None:
                return None
            config: dict = {}
            tags: dict[str, str] = {}
            try:
                config = self._sm.describe_endpoint_config(EndpointConfigName=desc["EndpointConfigName"])
                tags = self._tags(config["EndpointConfigArn"])
            except ClientError:
                pass  # the config was deleted under the endpoint: nothing to compare with
        variant = (config.get("ProductionVariants") or [{}])[0]
        live = (desc.get("ProductionVariants") or [{}])[0]
        details: dict[str, Any] = {key: tags[tag] for key, tag in res.FINGERPRINT_TAGS.items() if key != "digest" and tag in tags}
        details.update(
            region=self.region,
            endpoint_config=desc.get("EndpointConfigName"),
            model_name=variant.get("ModelName"),
            instances=live.get("CurrentInstanceCount"),
            artifact=tags.get(res.VERSION_TAG),
            log_group=log_group(name),
            tags={k: v for k, v in tags.items() if not k.startswith(res.TAG)},
        )
        if desc["EndpointStatus"] in UNFINISHED:
            details["unfinished"] = True  # the next deploy waits for it (or refuses, if another version is coming)
        elif desc["EndpointStatus"] == "InService" and tags.get(res.FINGERPRINT_TAGS["digest"]):
            with self._aws(f"read endpoint {name}"):
                finished = self._tags(desc["EndpointArn"]).get(res.FINISHED_TAG)
            if finished != tags[res.FINGERPRINT_TAGS["digest"]]:
                # Killed (or --no-wait) after the endpoint came up: autoscaling, tags or the sweep may be missing.
                details.update(unfinished=True, unfinished_digest=tags[res.FINGERPRINT_TAGS["digest"]])
        return Endpoint(
            name=name,
            provider=self.name,
            state=desc["EndpointStatus"],
            url=f"{self._client('sagemaker-runtime').meta.endpoint_url}/endpoints/{name}/invocations",
            model=tags.get(res.TAG + "model"),
            digest=tags.get(res.FINGERPRINT_TAGS["digest"]),
            instance=variant.get("InstanceType"),
            runtime=tags.get(res.TAG + "runtime"),
            failure_reason=desc.get("FailureReason"),
            details={k: v for k, v in details.items() if v is not None},
        )

    def list(self) -> list[Endpoint]:
        self._session()
        found = []
        with self._aws("list endpoints"):
            for page in self._sm.get_paginator("list_endpoints").paginate():
                for summary in page["Endpoints"]:
                    if res.ENDPOINT_TAG in self._tags(summary["EndpointArn"]):
                        found.append(summary["EndpointName"])
        return [ep for name in sorted(found) if (ep := self.get(name))]

    def delete(self, name: str, *, purge_artifacts: bool = False, reporter: Reporter | None = None) -> None:
        """Remove the endpoint, its autoscaling, configs and models; with purge_artifacts its S3 prefix too.

        The purge works without the endpoint (after a plain delete, or a create that failed): the
        artifact root comes from the endpoint's tag, the versions its models pointed at, or
        `options["bucket"]` (the --bucket the endpoint was deployed with; deploy keeps it in the
        provider options, which the endpoint's local record stores).
        """
        reporter = reporter or Reporter()
        self._session()
        with self._aws(f"read endpoint {name}"):
            desc = self._describe_endpoint(name)
            endpoint_tags = self._tags(desc["EndpointArn"]) if desc else {}
        if desc is not None and res.ENDPOINT_TAG not in endpoint_tags:
            raise UserError(f"endpoint {name} was not created by cloudllm", f"delete it with `aws sagemaker delete-endpoint --endpoint-name {name}`")
        with self._aws(f"remove autoscaling of {name}"):
            if self._remove_scaling(name):
                reporter.step(f"removed autoscaling of {name}")
        if desc is not None:
            self._delete_endpoint(name, reporter)
            reporter.step(f"deleted endpoint {name}")
        removed, versions = self._sweep(name, keep=set(), keep_version=None, reporter=reporter)
        purged = self._purge(name, endpoint_tags, versions, reporter) if purge_artifacts else 0
        if purge_artifacts and purged is None and (desc is not None or removed):
            reporter.step("no artifact location is recorded for this endpoint: nothing to purge (pass the --bucket it was deployed with)")
        if desc is None and not removed and not purged:
            problem, fix = f"no SageMaker endpoint named {name} in {self.region}", "see `cloudllm list --provider sagemaker`"
            if purge_artifacts and self.options.get("bucket"):
                problem += f", and no artifacts under {S3Uri.parse(self.options['bucket']).child(name)}"
            elif purge_artifacts:
                fix += "; to purge the artifacts of an endpoint that is gone, pass the --bucket it was deployed with"
            raise UserError(problem, fix)

    def _purge(self, name: str, endpoint_tags: dict[str, str], versions: set[str], reporter: Reporter) -> int | None:
        """Delete every object and abort every unfinished multipart upload under the endpoint's artifact roots;
        how many (None: no root is known)."""
        roots = {S3Uri.parse(v.rstrip("/").rsplit("/", 1)[0]) for v in versions}
        if endpoint_tags.get(res.ARTIFACTS_TAG):
            roots.add(S3Uri.parse(endpoint_tags[res.ARTIFACTS_TAG]))
        if self.options.get("bucket"):
            roots.add(S3Uri.parse(self.options["bucket"]).child(name))
        if not roots:
            return None
        total = 0
        artifacts = self._artifacts()
        for root in sorted(roots, key=str):
            with self._aws(f"delete the artifacts under {root}"):
                objects, uploads = artifacts.delete(root)
            if objects or uploads:
                aborted = f" and aborted {uploads} unfinished upload(s)" if uploads else ""
                reporter.step(f"deleted {objects} artifact object(s){aborted} under {root}")
            total += objects + uploads
        return total

    # --- invoking -------------------------------------------------------------------------
    def invoke(self, name: str, body: dict) -> Any:
        from botocore.exceptions import ClientError

        self._session()
        try:
            response = self._client("sagemaker-runtime").invoke_endpoint(
                EndpointName=name, Body=json.dumps(body).encode(), ContentType="application/json", Accept="application/json"
            )
        except ClientError as exc:
            raise self._invoke_error(name, exc) from None
        data = response["Body"].read()
        try:
            return json.loads(data)
        except ValueError:
            return data.decode("utf-8", errors="replace")

    def invoke_stream(self, name: str, body: dict) -> Iterator[str]:
        """Tokens as TGI, LMI or the generated server send them; the whole answer at once from the HF
        inference toolkit (handler runtime on the HF PyTorch DLC), which cannot stream and refuses "stream": true."""
        from botocore.exceptions import ClientError

        from cloudllm.invocation import iter_sse_tokens, response_text, split_lines

        self._session()
        if self._runs_toolkit(name):
            result = self.invoke(name, {k: v for k, v in body.items() if k != "stream"})
            text = response_text(result)
            yield text if text is not None else json.dumps(result, ensure_ascii=False)
            return
        try:
            response = self._client("sagemaker-runtime").invoke_endpoint_with_response_stream(
                EndpointName=name, Body=json.dumps({**body, "stream": True}).encode(), ContentType="application/json"
            )

            def parts() -> Iterator[bytes]:
                for event in response["Body"]:
                    if "PayloadPart" in event:
                        yield event["PayloadPart"]["Bytes"]

            yield from iter_sse_tokens(_as_events(split_lines(parts())))
        except ClientError as exc:  # botocore.exceptions.EventStreamError is one too (ModelStreamError)
            raise self._invoke_error(name, exc) from None

    def _runs_toolkit(self, name: str) -> bool:
        """The endpoint's container is an HF PyTorch inference DLC (read from the model it runs)."""
        from botocore.exceptions import ClientError

        with self._aws(f"read endpoint {name}"):
            try:
                desc = self._describe_endpoint(name)
                if desc is None:
                    raise UserError(f"SageMaker endpoint {name} does not exist in {self.region}", "see `cloudllm list --provider sagemaker`")
                config = self._sm.describe_endpoint_config(EndpointConfigName=desc["EndpointConfigName"])
                model = self._sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
            except ClientError as exc:
                if not (_gone_already(exc) or _error(exc)[0] in _DENIED):
                    raise
                # Credentials that may only invoke, or a config deleted under the endpoint: the stream call says what is wrong.
                return False
        return res.runs_toolkit((model.get("PrimaryContainer") or {}).get("Image", ""))

    def _invoke_error(self, name: str, exc) -> UserError:
        from cloudllm.http import endpoint_error

        code, message = _error(exc)
        error = exc.response.get("Error", {})
        if code == "ModelError":
            status = exc.response.get("OriginalStatusCode") or error.get("OriginalStatusCode") or 500
            return endpoint_error(name, int(status), exc.response.get("OriginalMessage") or error.get("OriginalMessage") or message)
        if code in ("ModelStreamError", "InternalStreamFailure"):
            return DeployFailed(f"endpoint {name} failed mid-stream: {message}", f"see CloudWatch log group {log_group(name)}")
        if code == "ValidationError" and any(s in message for s in _NOT_FOUND):
            return UserError(f"SageMaker endpoint {name} does not exist in {self.region}", "see `cloudllm list --provider sagemaker`")
        if code == "ModelNotReadyException":
            return DeployFailed(f"endpoint {name} is not ready: {message}", f"wait for it (`cloudllm status {name}`)")
        if code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"):
            return UserError(f"AWS refused to invoke {name}: {message}", "check your credentials and their sagemaker:InvokeEndpoint permission")
        return DeployFailed(f"invoking endpoint {name} failed ({code}): {message}", f"see CloudWatch log group {log_group(name)}")

    def logs(self, name: str, *, follow: bool = False, since: float | None = None) -> Iterator[str]:
        """The endpoint's CloudWatch log lines (since a Unix time); with follow, keep polling for new ones."""
        from botocore.exceptions import ClientError

        self._session()
        group = log_group(name)
        client = self._client("logs")
        start = int((since or 0) * 1000)
        seen: set[str] = set()
        delay = 1.0
        while True:
            new = []
            with self._aws(f"read the logs of {name}"):
                try:
                    for page in client.get_paginator("filter_log_events").paginate(logGroupName=group, startTime=start):
                        new.extend(e for e in page.get("events", []) if e["eventId"] not in seen)
                except ClientError as exc:
                    if _error(exc)[0] != "ResourceNotFoundException":
                        raise
                    raise UserError(f"endpoint {name} has no logs yet ({group} does not exist)", "logs appear once an instance has started") from None
            for event in sorted(new, key=lambda e: (e["timestamp"], e["eventId"])):
                seen.add(event["eventId"])
                start = max(start, event["timestamp"])
                yield event["message"].rstrip("\n")
            if not follow:
                return
            delay = 1.0 if new else min(delay * 1.5, 10.0)
            time.sleep(delay)


def log_group(name: str) -> str:
    return f"/aws/sagemaker/Endpoints/{name}"


def _rollout_wait(plan: "Plan") -> int | None:
    value = plan.spec.options.get("rollout_wait")
    if value is None:
        return None
    if not str(value).isdigit() or int(value) > 3600:
        raise UserError(f"--option rollout_wait={value} is not a number of seconds in 0..3600", "pass e.g. --option rollout_wait=300")
    return int(value)


def check_region(region: str) -> None:
    """UserError for a name that is no AWS region (a typo like us-east1), from botocore's partitions.

    A name listed there, or shaped like a partition's regions (one newer than this botocore), passes.
    """
    import difflib

    import botocore.loaders

    partitions = botocore.loaders.create_loader().load_data("partitions")["partitions"]
    listed = sorted(r for p in partitions for r in p.get("regions", {}) if not r.endswith("-global"))
    if region in listed or any(re.match(p["regionRegex"], region) for p in partitions):
        return
    close = difflib.get_close_matches(region, listed, n=1, cutoff=0.8)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(f"unknown AWS region {region!r}", f"{hint}pass --region with a region name like us-east-1")


def _start_up_installs(plan: "Plan") -> list[str]:
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


def _as_events(lines: Iterator[str]) -> Iterator[str]:
    """TGI sends `data:{json}` lines; LMI sends bare JSON lines. Read both as server-sent events."""
    for line in lines:
        stripped = line.strip()
        yield f"data:{stripped}" if stripped.startswith("{") else line


def _error(exc) -> tuple[str, str]:
    error = exc.response.get("Error", {})
    message = str(error.get("Message") or exc).strip().splitlines()
    return str(error.get("Code", "")), (message[0] if message else "")


def _already_exists(exc) -> bool:
    code, message = _error(exc)
    return code == "ValidationException" and "already existing" in message


def _in_progress(exc) -> bool:
    code, message = _error(exc)
    return code == "ValidationException" and "in-progress" in message


def _retried(exc) -> bool:
    """botocore sent the call more than once (a throttled, failed or dropped attempt came first)."""
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts") or 0) > 0


def _message_of(exc) -> str:
    return _error(exc)[1]


def _gone_already(exc) -> bool:
    """A delete whose earlier attempt went through: SageMaker says the resource does not exist."""
    code, message = _error(exc)
    return code in ("ValidationException", "ObjectNotFoundException") and any(s in message for s in _NOT_FOUND)


def _unless_gone(delete) -> None:
    """Run a Delete* call; done when the resource is already gone (a retried delete whose first attempt went through)."""
    from botocore.exceptions import ClientError

    try:
        delete()
    except ClientError as exc:
        if not _gone_already(exc):
            raise
