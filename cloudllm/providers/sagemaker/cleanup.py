"""Undoing a failed deploy, sweeping old versions, deleting endpoints and purging artifacts."""

from __future__ import annotations

from typing import Any

from cloudllm.console import Reporter
from cloudllm.errors import UserError
from cloudllm.providers.kit import Ledger, Pending, undone_on_failure, wait_until
import cloudllm.providers.sagemaker.resources as res
from cloudllm.providers.sagemaker.session import gone_already
from cloudllm.storage.s3 import S3Uri

DELETE_TIMEOUT = 900
ABANDONED_UPLOAD_SECONDS = 3600  # an artifact version no model uses, untouched this long, is a killed deploy's


class SageMakerCleanup:
    """What a failed deploy made is removed; what the endpoint runs never is."""

    # --- clean-up -------------------------------------------------------------------------
    def _undone_on_failure(self, endpoint: str, ledger: Ledger, reporter: Reporter):
        """On failure remove, newest first, what this deploy created (artifacts stay for the retry).

        Ctrl-C and a deadline passed leave it all: the same deploy, run again, resumes. What the
        endpoint runs or is moving to is never removed: with two deploys of one version racing,
        the config both named alike may be the one the other deploy put in service.
        """

        def keep(entry) -> str | None:
            if entry.kind in ("endpoint", "autoscaling") or ledger.has("endpoint", endpoint):
                return None
            if "in_use" not in seen:
                try:
                    with self._aws(f"read endpoint {endpoint}"):
                        seen["in_use"] = self._in_use(endpoint)
                except UserError as exc:
                    seen["in_use"] = None
                    seen["unread"] = f"could not read endpoint {endpoint}: {exc.problem}"
            if seen["in_use"] is None:
                return seen["unread"]
            return f"endpoint {endpoint} uses it" if entry.name in seen["in_use"] else None

        seen: dict[str, Any] = {}
        return undone_on_failure(ledger, reporter, keep_on_interrupt=True, keep=keep)

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
                if not gone_already(exc):
                    raise
                continue
            in_use.update(v["ModelName"] for v in described["ProductionVariants"] if v.get("ModelName"))
            if not all(v.get("ModelName") for v in described["ProductionVariants"]):
                in_use |= self._component_models(endpoint)  # an endpoint of inference components: their models
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
                        self._delete_unless_gone(lambda: deleter(**{arg: resource}))
                        removed.append(f"{kind} {resource}")
            if keep_version is not None:
                artifacts = self._artifacts()
                for version in artifacts.versions(S3Uri.parse(str(keep_version).rstrip("/").rsplit("/", 1)[0])):
                    if version == keep_version or str(version) in kept_versions or version.key().rstrip("/").endswith("/adapters"):
                        continue  # adapters/ holds adapter files by digest, not a version
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
        self._delete_components(name, reporter)  # SageMaker refuses to delete an endpoint that still hosts components
        with self._aws(f"delete endpoint {name}"):
            self._delete_unless_gone(lambda: self._sm.delete_endpoint(EndpointName=name))
            wait_until(
                lambda: Pending(desc["EndpointStatus"]) if (desc := self._describe_endpoint(name)) is not None else None,
                what=f"deleting endpoint {name}", deadline=DELETE_TIMEOUT, reporter=reporter,
                late=lambda last: (f"endpoint {name} is still {last.status} after {DELETE_TIMEOUT}s", "check it in the SageMaker console"),
            )  # fmt: skip

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
