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

The package: provider.py holds the verbs; session.py (session, clients, errors), checks.py
(validate, preflight, describe_changes), versions.py (artifacts, model, endpoint config),
scaling.py (autoscaling), cleanup.py (undo, sweep, delete), invoke.py (invoke, logs);
resources.py turns a plan into names, environment, sizes, tags and rollout settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.base import Endpoint, Feature, Fingerprint, Provider
from cloudllm.providers.kit import Ledger, Pending, wait_until
import cloudllm.providers.sagemaker.resources as res
from cloudllm.providers.sagemaker.checks import SageMakerChecks
from cloudllm.providers.sagemaker.cleanup import SageMakerCleanup
from cloudllm.providers.sagemaker.components import SageMakerComponents, check_components, uses_components
from cloudllm.providers.sagemaker.invoke import SageMakerInvoke, log_group
from cloudllm.providers.sagemaker.options import SageMakerOptions
from cloudllm.providers.sagemaker.scaling import SageMakerScaling
from cloudllm.providers.sagemaker.sharing import SageMakerSharing
from cloudllm.providers.sagemaker.session import NOT_FOUND, SageMakerSession, aws_error, in_progress, message_of, retried
from cloudllm.providers.sagemaker.versions import SageMakerVersions
from cloudllm.storage.s3 import S3Uri

if TYPE_CHECKING:
    from cloudllm.plan import Plan


UNFINISHED = ("Creating", "Updating", "SystemUpdating")  # SageMaker is still working on the endpoint


class SageMakerProvider(
    SageMakerSession, SageMakerChecks, SageMakerVersions, SageMakerScaling, SageMakerCleanup, SageMakerComponents, SageMakerSharing, SageMakerInvoke, Provider
):
    name = "sagemaker"
    offers = frozenset({Feature.ADAPTERS, Feature.MULTI_MODEL})  # as inference components (components.py)
    unsupported = {
        Feature.GRPC: "SageMaker real-time endpoints take HTTPS only (InvokeEndpoint); invoke without --grpc",
    }
    default_instance = res.DEFAULT_INSTANCE  # what the planner sizes against when --instance is not given
    Options = SageMakerOptions
    hashes_while_uploading = True

    def __init__(self, region: str | None = None, options: dict[str, Any] | None = None):
        super().__init__(region, options)
        self._boto_session = None
        self._has_credentials = False
        self._clients: dict[str, Any] = {}
        self._layouts: dict[str, dict | None] = {}  # endpoint -> its inference components, read once per run

    # --- deploy and update ----------------------------------------------------------------
    def deploy(self, plan: "Plan", reporter: Reporter) -> Endpoint:
        name = plan.spec.name
        self._refuse_no_wait_scaling(plan)
        instance = self._instance(plan.spec)
        components = uses_components(plan.spec)
        if plan.spec.add_model:
            raise UserError(f"--add-model adds a model to an existing endpoint, and there is no endpoint {name}", "deploy its first model without --add-model")
        if components:
            check_components(plan, instance)
        sizes = res.sizing(plan, instance)
        ledger = Ledger()
        with self._undone_on_failure(name, ledger, reporter):
            version = self._upload(plan, reporter)
            config_name = self._create_version(plan, instance, sizes, version, ledger, components=components)
            with self._aws(f"create endpoint {name}"):
                fresh = self._create_once(
                    lambda: self._sm.create_endpoint(
                        EndpointName=name,
                        EndpointConfigName=config_name,
                        Tags=res.tag_list(res.endpoint_tags(plan, str(self._artifact_root(plan)))),
                    ),
                    # Someone else's endpoint of this name is no error of ours to raise: we say so below.
                    ours=lambda: self._endpoint_targets(name, config_name),
                )  # fmt: skip
            if not fresh:
                raise DeployFailed(
                    f"endpoint {name} was created by another deploy while this one ran",
                    "run the same deploy again: it will update that endpoint once it is InService",
                )
            ledger.add("endpoint", name, lambda: self._delete_endpoint(name, Reporter()))  # _delete_endpoint reads as one line itself
            reporter.step(f"endpoint {name} is being created on {plan.spec.min_instances or 1}x {instance} ({plan.runtime})")
            if not plan.wait:
                return self._require(name)
            self._wait(name, sizes.wait_timeout, reporter)
            if components:
                self._serve_components(plan, config_name, instance, sizes, reporter)
            else:
                self._apply_scaling(plan, reporter)
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
        if existing.state == "InService" and (uses_components(plan.spec) or existing.details.get("inference_components")):
            return self._update_components(plan, existing, reporter)  # also what an interrupted deploy of components left
        if existing.state in UNFINISHED or existing.unfinished_digest == plan.digest:
            return self._finish(plan, reporter)
        if existing.state != "InService":
            raise UserError(f"endpoint {name} is {existing.state}", f"wait until it is InService (`cloudllm status {name}`), then deploy again")
        if plan.rescale_only:
            return self._rescale(plan, existing, reporter)
        if plan.retag_only:
            return self._retag(plan, existing, reporter)
        instance = self._instance(plan.spec)
        sizes = res.sizing(plan, instance)
        with self._aws(f"read endpoint {name}"):
            old_instance = existing.instance
            saved_scaling = self._scaling_state(name)
        ledger = Ledger()
        removed_scaling = False
        deployment = res.deployment_config(self._rollout(plan), self._alarms(plan))
        with self._undone_on_failure(name, ledger, reporter):
            version = self._upload(plan, reporter)
            config_name = self._create_version(plan, instance, sizes, version, ledger)
            if saved_scaling and (instance != old_instance or not res.autoscaled(plan)):
                # Application Auto Scaling refuses an update that changes a scaled variant's instance type.
                with self._aws(f"remove autoscaling of {name}"):
                    self._remove_scaling(name)
                removed_scaling = True
                # Undone first (added last): a failed update leaves the old fleet autoscaled as it was.
                ledger.add("autoscaling", f"of {name} (put back as it was)", lambda: self._restore_scaling(saved_scaling))
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
                    if not in_progress(exc):
                        raise
                    if not (retried(exc) and self._endpoint_targets(name, config_name)):
                        # Another deploy (another pipeline, another machine) is changing the endpoint.
                        raise DeployFailed(
                            f"endpoint {name} is being changed by another deploy ({message_of(exc)})",
                            f"wait until it is InService (`cloudllm status {name}`), then deploy again",
                        ) from None
                    # else: our own UpdateEndpoint went through and only its answer was lost.
            reporter.step(f"blue/green update of {name} started ({plan.spec.rollout}, {'; '.join(plan.reasons)})")
            if not plan.wait:
                return self._require(name)
            self._wait(name, sizes.wait_timeout + res.rollout_seconds(deployment), reporter, target_config=config_name)
            self._apply_scaling(plan, reporter)
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
        self._retag_version(plan, details)
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
            self._set_tags(arn, {**res.endpoint_tags(plan, str(self._artifact_root(plan))), res.FINISHED_TAG: plan.digest})

    # --- waiting --------------------------------------------------------------------------------
    def _wait(self, name: str, timeout: int, reporter: Reporter, *, target_config: str | None = None) -> dict:
        """Poll until InService (on target_config), quickly at first, then every 15 s at most."""

        def poll() -> dict | Pending:
            with self._aws(f"read endpoint {name}"):
                desc = self._describe_endpoint(name)
            if desc is None:
                raise DeployFailed(f"endpoint {name} disappeared while deploying", "someone deleted it; deploy again")
            status = desc["EndpointStatus"]
            if status == "InService":
                if target_config is None or desc.get("EndpointConfigName") == target_config:
                    return desc
                raise self._failure(name, desc, "update was rolled back")
            if status in ("Failed", "UpdateRollbackFailed", "OutOfService"):
                raise self._failure(name, desc, "failed" if status == "Failed" else status)
            return Pending(status)

        return wait_until(
            poll, what=f"waiting for endpoint {name}", deadline=timeout, reporter=reporter,
            late=lambda last: (
                f"endpoint {name} is still {last.status} after {timeout}s",
                f"it may still come up: watch `cloudllm status {name}` and `cloudllm logs {name}`; raise --timeout for large models",
            ),
        )  # fmt: skip

    def _failure(self, name: str, desc: dict, what: str) -> DeployFailed:
        return DeployFailed(
            f"endpoint {name} {what}: {desc.get('FailureReason') or 'SageMaker gave no reason'}",
            f"see CloudWatch log group {log_group(name)} (`cloudllm logs {name}`)",
        )

    # --- reading --------------------------------------------------------------------------
    def _describe_endpoint(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self._sm.describe_endpoint(EndpointName=name)
        except ClientError as exc:
            code, message = aws_error(exc)
            if code == "ValidationException" and any(s in message for s in NOT_FOUND):
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
        self._session()  # first: without a region it refuses before botocore is imported (`cloudllm plan` offline)
        from botocore.exceptions import ClientError

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
        fingerprint = Fingerprint(**{key: tags.get(tag) for key, tag in res.FINGERPRINT_TAGS.items()})
        unfinished, unfinished_digest = False, None
        details: dict[str, Any] = dict(
            region=self.region,
            endpoint_config=desc.get("EndpointConfigName"),
            model_name=variant.get("ModelName"),
            instances=live.get("CurrentInstanceCount"),
            artifact=tags.get(res.VERSION_TAG),
            inference_components=True if config and not variant.get("ModelName") else None,
            log_group=log_group(name),
            tags={k: v for k, v in tags.items() if not k.startswith(res.TAG)},
        )
        if desc["EndpointStatus"] in UNFINISHED:
            unfinished = True  # the next deploy waits for it (or refuses, if another version is coming)
        elif desc["EndpointStatus"] == "InService" and tags.get(res.FINGERPRINT_TAGS["digest"]):
            with self._aws(f"read endpoint {name}"):
                finished = self._tags(desc["EndpointArn"]).get(res.FINISHED_TAG)
            if finished != tags[res.FINGERPRINT_TAGS["digest"]]:
                # Killed (or --no-wait) after the endpoint came up: autoscaling, tags or the sweep may be missing.
                unfinished, unfinished_digest = True, fingerprint.digest
        return Endpoint(
            name=name,
            provider=self.name,
            state=desc["EndpointStatus"],
            url=f"{self._client('sagemaker-runtime').meta.endpoint_url}/endpoints/{name}/invocations",
            model=tags.get(res.TAG + "model"),
            digest=fingerprint.digest,
            instance=variant.get("InstanceType"),
            runtime=tags.get(res.TAG + "runtime"),
            failure_reason=desc.get("FailureReason"),
            fingerprint=fingerprint,
            unfinished=unfinished,
            unfinished_digest=unfinished_digest,
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
