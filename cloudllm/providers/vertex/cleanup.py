"""Undoing a failed deploy and removing endpoints, models and their artifacts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloudllm.console import Reporter
from cloudllm.providers.kit import Ledger, undone_on_failure
from cloudllm.providers.vertex.checks import give_all_to_first
from cloudllm.providers.vertex.labels import MANAGED_BY
from cloudllm.providers.vertex.session import deploy_error, unless_gone

if TYPE_CHECKING:
    from cloudllm.plan import Plan
    from cloudllm.storage.gcs import GcsUri


class VertexCleanup:
    """What a failed deploy leaves is removed; what cannot be is named in the error."""

    def _undone_on_failure(self, ledger: Ledger, plan: "Plan", reporter: Reporter, *, update: bool):
        """On any failure (Ctrl-C included) remove what this deploy created, then raise one line.

        Except when our deadline passed while a Vertex AI operation still runs: Vertex refuses to
        delete what an operation is changing (and the artifacts are what it is copying), so
        everything is left as it is and the error says how to follow it and remove it later.
        """
        return undone_on_failure(
            ledger, reporter,
            still_running_fix=lambda: self._still_running_advice(plan, update),
            translate=lambda exc: deploy_error(exc, plan.spec.name),
        )  # fmt: skip

    def _still_running_advice(self, plan: "Plan", update: bool) -> str:
        name = plan.spec.name
        where = f" --provider vertex --region {self.region} --project {self.project}"
        if update:
            return (
                "nothing was removed and the old version keeps all the traffic; once the operation has ended, "
                f"deploy again to move the traffic to the new version (`cloudllm status {name}{where}` shows the endpoint), "
                "or give the deploy a longer --timeout"
            )
        return (
            f"nothing was removed; `cloudllm status {name}{where}` shows when it serves, and once the operation has ended "
            f"`cloudllm delete {name}{where} --purge-artifacts` removes it all; or give the deploy a longer --timeout"
        )

    def _models_named(self, name: str) -> set[str]:
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListModelsRequest(parent=self.parent, filter=f'display_name="{name}"')
        with self._reading(f"look up the models of {name}"):
            response = self.clients().models.list_models(request=request)
            return {m.name for m in response if m.labels.get(MANAGED_BY[0]) == MANAGED_BY[1]}

    def _artifact_roots(self, model: str) -> set["GcsUri"]:
        """gs://.../<name>/ of every version of a model (each version is gs://.../<name>/<version>/)."""
        from google.cloud import aiplatform_v1 as v1

        from cloudllm.storage.gcs import GcsUri

        roots = set()
        for version in self.clients().models.list_model_versions(request=v1.ListModelVersionsRequest(name=model)):
            if version.artifact_uri.startswith("gs://"):
                uri = GcsUri.parse(version.artifact_uri)
                roots.add(GcsUri(uri.bucket, uri.prefix.rsplit("/", 1)[0] if "/" in uri.prefix else ""))
        return roots

    def _roll_back(self, endpoint_name: str, deployed_id: str, traffic_before: dict[str, int]) -> None:
        """The traffic as it was before the update, and the update's deployed model undeployed (one call)."""
        endpoint = self.clients().endpoints.get_endpoint(name=endpoint_name)
        if deployed_id not in {d.id for d in endpoint.deployed_models}:
            return
        others = [d.id for d in endpoint.deployed_models if d.id != deployed_id]
        split = {k: v for k, v in (traffic_before or {}).items() if k in others and v}
        if others and sum(split.values()) != 100:
            split = give_all_to_first({k: 0 for k in (split or others)})
        self._wait_unless_gone(
            self.clients().endpoints.undeploy_model, Reporter(), endpoint=endpoint.name, deployed_model_id=deployed_id, traffic_split=split
        )

    def _delete_endpoint_hard(self, endpoint: str, reporter: Reporter) -> None:
        c = self.clients()
        quiet = Reporter()
        current = c.endpoints.get_endpoint(name=endpoint)
        for deployed in current.deployed_models:
            self._wait_unless_gone(c.endpoints.undeploy_model, quiet, endpoint=endpoint, deployed_model_id=deployed.id, traffic_split={})
        self._wait_unless_gone(c.endpoints.delete_endpoint, quiet, name=endpoint)

    def _wait_unless_gone(self, call, reporter: Reporter, **kwargs) -> None:
        if (op := unless_gone(call, **kwargs)) is not None:
            self._wait(op, "", 600, reporter)
