"""VertexProvider: the verbs (deploy, update, get, list, delete) over the session, versions, rollout and clean-up modules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.base import Endpoint, Feature, Fingerprint, Provider
from cloudllm.providers.kit import Ledger, StillRunning, rollout_of
from cloudllm.providers.vertex.checks import (
    DEFAULT_MACHINE, VertexChecks, accelerator_name, deploy_deadline, give_all_to_first, main_deployment, pending_endpoint,
    resources_line,
)
from cloudllm.providers.vertex.cleanup import VertexCleanup
from cloudllm.providers.vertex.invoke import VertexInvoke, predict_url
from cloudllm.providers.vertex.labels import DIGEST_LABELS, LOCK_LABEL, MANAGED_BY, RUNTIME_LABEL, decode_digest, user_tags
from cloudllm.providers.vertex.options import VertexOptions
from cloudllm.providers.vertex.models import VertexModels, first_models
from cloudllm.providers.vertex.rollout import VertexRollout
from cloudllm.providers.vertex.routes import check_endpoint_kind, dedicated_details, prediction_base, wants_dedicated
from cloudllm.providers.vertex.session import Clients, DEFAULT_REGION, VertexSession, deploy_error, transient_retry, unless_gone
from cloudllm.providers.vertex.versions import VertexVersions

if TYPE_CHECKING:
    from cloudllm.plan import Plan


class VertexProvider(VertexSession, VertexChecks, VertexVersions, VertexRollout, VertexCleanup, VertexModels, VertexInvoke, Provider):
    name = "vertex"
    offers = frozenset({Feature.ADAPTERS, Feature.MULTI_MODEL})
    unsupported: dict[Feature, str] = {}  # scale to zero goes through v1beta1, gRPC through grpcPorts
    default_instance = DEFAULT_MACHINE
    Options = VertexOptions
    hashes_while_uploading = True

    def __init__(self, region: str | None = None, options: dict[str, Any] | None = None):
        super().__init__(region or DEFAULT_REGION, options)
        self._clients: Clients | None = None

    # --- deploy / update ------------------------------------------------------------------
    def deploy(self, plan: "Plan", reporter: Reporter) -> Endpoint:
        if plan.spec.add_model:
            raise UserError(
                f"there is no Vertex AI endpoint {plan.spec.name} to add model {plan.spec.add_model} to",
                f"deploy its first model without --add-model, then add this one (see `cloudllm list --provider vertex`)",
            )
        ledger = Ledger()
        with self._undone_on_failure(ledger, plan, reporter, update=False):
            artifact_uri = self._upload(plan, reporter, ledger)
            model, version = self._upload_model(plan, artifact_uri, None, reporter)
            ledger.add("model", model, lambda: self._wait_unless_gone(self.clients().models.delete_model, Reporter(), name=model))
            endpoint = self._create_endpoint(plan, reporter)
            ledger.add("endpoint", endpoint, lambda: self._delete_endpoint_hard(endpoint, reporter))
            if self._find_endpoint(plan.spec.name).name != endpoint:
                # Another deploy created an endpoint of this name at the same time; the older one stays.
                raise DeployFailed(
                    f"endpoint {plan.spec.name} was created by another deploy while this one ran",
                    "run the same deploy again: it will update that endpoint",
                )
            self._deploy_model(plan, endpoint, f"{model}@{version}", {"0": 100}, reporter)
        if not plan.wait:
            reporter.step(f"deploying on {endpoint}; follow it with `cloudllm status {plan.spec.name}`")
            return pending_endpoint(plan, endpoint, self.api_base)
        return self._endpoint_or_fail(plan.spec.name)

    def update(self, plan: "Plan", existing: Endpoint, reporter: Reporter) -> Endpoint:
        if not plan.wait:
            raise UserError(
                "a Vertex AI update cannot return early: the old deployed model is undeployed once the new one serves",
                "deploy without --no-wait",
            )
        check_endpoint_kind(plan, existing, wants_dedicated(self.options))  # also at plan time (describe_changes)
        with self._changing(existing.details["endpoint"], plan):
            if plan.spec.add_model:
                return self._add_model(plan, existing, reporter)
            return self._update(plan, existing, reporter)

    def _update(self, plan: "Plan", existing: Endpoint, reporter: Reporter) -> Endpoint:
        name = plan.spec.name
        endpoint_name = existing.details["endpoint"]
        endpoint = self.clients().endpoints.get_endpoint(name=endpoint_name)
        if plan.rescale_only and plan.spec.min_instances != 0 and not existing.details.get("scale_to_zero"):
            return self._rescale(plan, endpoint, reporter)  # MutateDeployedModel is v1's: a scale to zero goes through a new deploy
        if plan.retag_only:
            return self._retag(plan, endpoint, reporter)
        old = first_models(endpoint)  # the endpoint's other (added) models stay as they are
        main = main_deployment(endpoint)
        before = dict(endpoint.traffic_split)
        rollout = rollout_of(plan.spec, plan.spec.options.get("rollout_wait"))
        ledger = Ledger()
        with self._undone_on_failure(ledger, plan, reporter, update=True):
            ready = self._deployed_version(endpoint, existing, plan.digest)
            if ready is not None:
                new_id = ready.id
                reporter.step(f"the new version is already deployed ({new_id}); an earlier deploy stopped before it finished")
            else:
                parent_model = main.model if main else existing.details.get("model")
                artifact_uri = self._upload(plan, reporter, ledger)
                model, version = self._upload_model(plan, artifact_uri, parent_model, reporter)
                models = self.clients().models
                if parent_model:  # the model was there before: only this version is ours
                    ledger.add("model version", f"{model}@{version}", lambda: self._wait_unless_gone(models.delete_model_version, Reporter(), name=f"{model}@{version}"))
                else:
                    ledger.add("model", model, lambda: self._wait_unless_gone(models.delete_model, Reporter(), name=model))
                # Beside the old version, without traffic: until we move it, the old one serves everything,
                # also when this deploy stops (a timeout, Ctrl-C) while Vertex AI goes on deploying.
                first = {"0": 0, **before} if before else {"0": 100}
                new_id = self._deploy_model(plan, endpoint_name, f"{model}@{version}", first, reporter)
            ledger.add(
                "deployed model", f"{new_id} (traffic back to the old version)", lambda: self._roll_back(endpoint_name, new_id, before)
            )
            if rollout.kind == "canary" and main is not None and main.id != new_id and before.get(main.id):
                self._canary(plan, endpoint_name, new_id, main.id, rollout.percent, reporter)
            if before != {new_id: 100}:
                self._set_traffic(endpoint_name, {new_id: 100})
                reporter.step(f"all traffic on the new version ({new_id})")
        try:
            for deployed in old:
                if deployed.id != new_id:
                    self._undeploy(endpoint_name, deployed.id, plan, reporter)
        except BaseException as exc:
            raise deploy_error(exc, name, after="the new version serves all the traffic, but undeploying the old one failed") from None
        return self._endpoint_or_fail(name)

    def _rescale(self, plan: "Plan", endpoint, reporter: Reporter) -> Endpoint:
        """Only autoscaling changed: MutateDeployedModel on the serving copy; no new model version or DeployModel.

        Replica counts and autoscaling metrics are the fields Vertex AI changes in place. The model
        version's digest labels move to this plan last, so a run stopped before that finds the old
        digests and mutates again (the same values: nothing more changes).
        """
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        c = self.clients()
        main = main_deployment(endpoint)
        reporter.step(f"only the autoscaling of {plan.spec.name} changed: changing it in place on {main.id}, no new copy")
        mask = field_mask_pb2.FieldMask(paths=[f"dedicated_resources.{f}" for f in ("min_replica_count", "max_replica_count", "autoscaling_metric_specs")])
        version = f"{main.model}@{main.model_version_id}"
        try:
            op = c.endpoints.mutate_deployed_model(
                endpoint=endpoint.name, deployed_model=v1.DeployedModel(id=main.id, dedicated_resources=self._resources(plan)),
                update_mask=mask, retry=transient_retry(),  # setting the same values twice is harmless
            )  # fmt: skip
            self._wait(op, f"scaling to {resources_line(plan)}", deploy_deadline(plan), reporter)  # new replicas load the model
            self._relabel_version(plan, version)
        except StillRunning as exc:
            exc.fix = "the old version keeps serving; once the operation has ended, deploy again to finish, or give the deploy a longer --timeout"
            exc.args = (exc.line(),)
            raise
        except Exception as exc:
            raise deploy_error(exc, plan.spec.name) from None
        reporter.step(f"{plan.spec.name}: {resources_line(plan)}")
        return self._endpoint_or_fail(plan.spec.name)

    def _find_endpoint(self, name: str):
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListEndpointsRequest(parent=self.parent, filter=f'display_name="{name}"')
        with self._reading(f"look up endpoint {name}"):
            response = self.clients().endpoints.list_endpoints(request=request)
            found = [e for e in response if e.labels.get(MANAGED_BY[0]) == MANAGED_BY[1]]
        # Two deploys racing may both create one; the older is the endpoint, whoever asks.
        return min(found, key=lambda e: (e.create_time.timestamp() if e.create_time else 0.0, e.name)) if found else None

    def get(self, name: str) -> Endpoint | None:
        endpoint = self._find_endpoint(name)
        return None if endpoint is None else self._describe(name, endpoint)

    def _describe(self, name: str, endpoint) -> Endpoint:
        main = main_deployment(endpoint)
        details: dict[str, Any] = {
            "endpoint": endpoint.name,
            "project": self.project,
            "region": self.region,
            "traffic_split": dict(endpoint.traffic_split),
            "deployed_models": [d.id for d in endpoint.deployed_models],
            "labels": {k: v for k, v in endpoint.labels.items() if k != LOCK_LABEL},  # the spec's tags among them
            **dedicated_details(endpoint),  # where its predictions go (routes.py)
        }
        if main is None:
            return Endpoint(
                name=name, provider=self.name, state="Failed", url=predict_url(prediction_base(self.api_base, endpoint.dedicated_endpoint_dns), endpoint.name),
                failure_reason="no model is deployed on the endpoint (yet, if a deploy is still running)", details=details,
            )  # fmt: skip
        model = self.clients().models.get_model(name=f"{main.model}@{main.model_version_id}")
        res = main.dedicated_resources
        spec = res.machine_spec
        instance = spec.machine_type
        if spec.accelerator_count:
            instance += f" + {spec.accelerator_count}x {accelerator_name(spec.accelerator_type)}"
        details.update(
            model=main.model,
            model_version_id=main.model_version_id,
            deployed_model_id=main.id,
            artifact_uri=model.artifact_uri,
            image=model.container_spec.image_uri,
            replicas=f"{res.min_replica_count}..{res.max_replica_count or res.min_replica_count}",
            **self._tenancy_details(endpoint, main, model),
            tags=user_tags(model.labels),  # the serving version's: set with its digests
        )
        fingerprint = Fingerprint(**{key: decode_digest(model.labels[label]) for key, label in DIGEST_LABELS.items() if label in model.labels})
        state, reason = ("InService" if endpoint.traffic_split.get(main.id) else "Updating"), None
        idle = [d.id for d in first_models(endpoint) if d.id != main.id and not endpoint.traffic_split.get(d.id)]
        if idle:
            # an update that stopped after moving traffic: the next deploy finishes it
            state, reason = "Failed", f"deployed model(s) {', '.join(idle)} take no traffic but are still deployed; deploy again to undeploy them"
        elif len(first_models(endpoint)) > 1:
            state = "Updating"
        return Endpoint(
            failure_reason=reason,
            name=name,
            provider=self.name,
            state=state,
            url=predict_url(prediction_base(self.api_base, endpoint.dedicated_endpoint_dns), endpoint.name),
            model=model.description or model.display_name,
            digest=fingerprint.digest,
            instance=instance,
            runtime=model.labels.get(RUNTIME_LABEL),
            fingerprint=fingerprint,
            details=details,
        )

    def _endpoint_or_fail(self, name: str) -> Endpoint:
        found = self.get(name)
        if found is None:
            raise DeployFailed(f"endpoint {name} vanished right after its deploy", "see the Vertex AI console")
        return found

    def list(self) -> list[Endpoint]:
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListEndpointsRequest(parent=self.parent, filter=f'labels.{MANAGED_BY[0]}="{MANAGED_BY[1]}"')
        with self._reading("list endpoints"):
            response = self.clients().endpoints.list_endpoints(request=request)
            return [self._describe(e.display_name, e) for e in response]

    # --- delete -----------------------------------------------------------------------------
    def delete(self, name: str, *, purge_artifacts: bool = False, reporter: Reporter | None = None) -> None:
        reporter = reporter or Reporter()
        c = self.clients()
        endpoint = self._find_endpoint(name)
        models = self._models_named(name)
        if endpoint is None and not models:
            raise UserError(f"no Vertex AI endpoint named {name!r} in {self.parent}", "see `cloudllm list --provider vertex`")
        deadline = {"s": 1800}
        try:
            if endpoint is not None:
                models |= {d.model for d in endpoint.deployed_models}
                split = dict(endpoint.traffic_split)
                for deployed in sorted(endpoint.deployed_models, key=lambda d: split.get(d.id, 0)):
                    split.pop(deployed.id, None)
                    rest = give_all_to_first(split) if split else {}
                    op = unless_gone(c.endpoints.undeploy_model, endpoint=endpoint.name, deployed_model_id=deployed.id, traffic_split=rest)
                    if op is not None:
                        self._wait(op, f"undeploying {deployed.id}", deadline["s"], reporter)
                    split = rest
                    reporter.step(f"undeployed {deployed.id}")
            artifact_roots = set()
            for model in sorted(models):
                artifact_roots |= self._artifact_roots(model)
                if (op := unless_gone(c.models.delete_model, name=model)) is not None:
                    self._wait(op, f"deleting model {model}", deadline["s"], reporter)
                reporter.step(f"deleted model {model}")
            if endpoint is not None:
                if (op := unless_gone(c.endpoints.delete_endpoint, name=endpoint.name)) is not None:
                    self._wait(op, "deleting the endpoint", deadline["s"], reporter)
                reporter.step(f"deleted endpoint {endpoint.name}")
        except Exception as exc:
            raise deploy_error(exc, name, after="deleting stopped half-way") from None
        if purge_artifacts:
            from cloudllm.storage.gcs import GcsArtifacts

            store = GcsArtifacts(project=self.project)
            for root in sorted(artifact_roots, key=str):
                count = store.delete(root)
                reporter.step(f"deleted {count} object(s) under {root}")
