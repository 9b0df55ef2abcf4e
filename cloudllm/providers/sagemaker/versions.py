"""One version on SageMaker: its artifacts, model and endpoint config, each created once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloudllm.console import Reporter
from cloudllm.providers.kit import Ledger, create_once, delete_unless_gone
import cloudllm.providers.sagemaker.resources as res
from cloudllm.providers.sagemaker.session import already_exists, gone_already
from cloudllm.storage.s3 import S3Uri

if TYPE_CHECKING:
    from cloudllm.plan import Plan
    from cloudllm.providers.base import Endpoint


class SageMakerVersions:
    """Upload, CreateModel and CreateEndpointConfig; a create whose answer was lost is recognised as ours."""

    def _upload(self, plan: "Plan", reporter: Reporter) -> S3Uri:
        # The endpoint's local record keeps it: `delete --purge-artifacts` then finds the artifacts
        # even once the endpoint (and its tag naming them) is gone.
        self.record_options(bucket=plan.spec.bucket)
        version = self._version_uri(plan)
        with self._aws(f"upload the artifacts to {version}"):
            result = self._artifacts().upload(
                plan.bundle.stored, version, reporter, reuse_from=self._artifact_root(plan), kms_key=plan.spec.options.get("kms_key")
            )
        plan.bundle = plan.bundle.with_hashes(result.hashes)  # hashed while uploading: now every digest is exact
        reporter.step(result.summary())
        return result.uri

    def _create_version(self, plan: "Plan", instance: str, sizes: res.Sizing, version: S3Uri, ledger: Ledger, *, components: bool = False) -> str:
        """CreateModel + CreateEndpointConfig for one version; returns their (shared) name.

        components: the config's variant hosts inference components (components.py) instead of the model.
        """
        spec = plan.spec
        name = self._create_model(plan, instance, sizes, version, ledger)
        tags = res.tag_list(res.version_tags(plan, instance, str(version)))
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
        if components:
            from cloudllm.providers.sagemaker.components import component_variant

            variant = config["ProductionVariants"][0] = component_variant(plan, variant)
            config["ExecutionRoleArn"] = spec.options["role"]
        if spec.options.get("kms_key") and not res.has_local_storage(instance):
            config["KmsKeyId"] = spec.options["kms_key"]  # instance-store volumes are encrypted by the hardware
        with self._aws(f"create endpoint config {name}"):
            self._create_once(
                lambda: self._sm.create_endpoint_config(**config), ours=lambda: self._same_version(name, tags, config=True) or None
            )
        ledger.add(
            "endpoint-config", name, lambda: self._removing(f"endpoint config {name}", lambda: self._sm.delete_endpoint_config(EndpointConfigName=name))
        )
        return name

    def _create_model(self, plan: "Plan", instance: str, sizes: res.Sizing, version: S3Uri, ledger: Ledger) -> str:
        """CreateModel for one version (named like its endpoint config); returns its name."""
        spec = plan.spec
        name = res.version_names(spec.name if not getattr(spec, "add_model", None) else f"{spec.name}-{spec.add_model}", plan.digest)
        tags = res.tag_list(res.version_tags(plan, instance, str(version)))
        container = {
            "Image": self._image(plan, instance),
            "Environment": res.container_env(plan, instance, sizes, self.region),
            "ModelDataSource": {"S3DataSource": {"S3Uri": str(version), "S3DataType": "S3Prefix", "CompressionType": "None"}},
        }
        from cloudllm.providers.sagemaker.components import uses_components

        # tgi_adapters.py: TGI's adapters ride in its model; LMI on components starts with LoRA on
        adapters = self._model_adapter_container(plan, components=uses_components(spec))
        if adapters:
            container["Environment"].update(adapters.pop("Environment"))
            container.update(adapters)
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
            self._create_once(lambda: self._sm.create_model(**model), ours=lambda: self._same_version(name, tags) or None)
        ledger.add("model", name, lambda: self._removing(f"model {name}", lambda: self._sm.delete_model(ModelName=name)))
        return name

    # --- retagging the running version in place ------------------------------------------
    def _retag(self, plan: "Plan", existing: "Endpoint", reporter: Reporter) -> "Endpoint":
        """Only the tags changed: retag the running model, endpoint config and endpoint; no new version or fleet."""
        name = plan.spec.name
        reporter.step(f"only the tags of {name} changed: retagging in place, no new model, config or instances")
        self._retag_version(plan, existing.details)
        self._retag_endpoint(plan)
        return self._require(name)

    def _retag_version(self, plan: "Plan", details: dict) -> None:
        """The plan's tags and fingerprint on the running model and endpoint config (cloudllm's own tags kept).

        The config goes last: `get` reads what runs from its tags, so a run stopped before it finds
        the old fingerprint and retags again.
        """
        name = plan.spec.name
        with self._aws(f"tag the model and endpoint config of {name}"):
            for arn in (
                self._sm.describe_model(ModelName=details["model_name"])["ModelArn"],
                self._sm.describe_endpoint_config(EndpointConfigName=details["endpoint_config"])["EndpointConfigArn"],
            ):
                ours = {k: v for k, v in self._tags(arn).items() if k.startswith(res.TAG)}
                self._set_tags(arn, {**ours, **plan.spec.tags, **res.fingerprint_tags(plan)})

    def _set_tags(self, arn: str, wanted: dict[str, str]) -> None:
        """Make a resource's tags `wanted` (AWS's own aws: tags left alone): DeleteTags the stale, AddTags the changed."""
        current = self._tags(arn)
        stale = [k for k in current if k not in wanted and not k.startswith("aws:")]
        if stale:
            self._sm.delete_tags(ResourceArn=arn, TagKeys=stale)
        changed = {k: v for k, v in wanted.items() if current.get(k) != v}
        if changed:
            self._sm.add_tags(ResourceArn=arn, Tags=res.tag_list(changed))

    @staticmethod
    def _create_once(create, *, ours) -> Any:
        """Run a Create* call: its answer, or ours() when the resource already exists (None: the original error).

        botocore retries throttling, 5xx and dropped connections. When a create went through but
        its answer was lost, the retry meets "already exists". So does a re-run, within the same
        second, of a deploy that was killed after this create (version names end in the second).
        Either way it is ours when `ours()` confirms the resource is exactly the one we ask for
        (same endpoint, artifact version and digest).
        """
        return create_once(create, find=ours, exists=already_exists)

    def _removing(self, what: str, delete) -> None:
        with self._aws(f"delete {what}"):
            self._delete_unless_gone(delete)

    @staticmethod
    def _delete_unless_gone(delete) -> None:
        """Run a Delete* call; done when the resource is already gone (a retried delete whose first attempt went through)."""
        delete_unless_gone(delete, gone=gone_already)

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
