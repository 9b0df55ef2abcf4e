"""One version of a model on Vertex AI: its artifacts, model (version), container, resources and deployed model."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cloudllm.console import Reporter
from cloudllm.providers.base import Endpoint
from cloudllm.providers.kit import Ledger
from cloudllm.providers.vertex.checks import (
    HEALTH_ROUTE, PREDICT_ROUTE, SERVING_PORT, deploy_deadline, deployment_timeout, machine_of, main_deployment,
    resources_line, scale_metric, short_deadline, version_prefix,
)
from cloudllm.providers.vertex.labels import (
    DIGEST_LABELS, MANAGED_BY, NAME_LABEL, RUNTIME_LABEL, RUN_LABEL, decode_digest, encode_digest,
    label_value, with_tags,
)
from cloudllm.providers.vertex.session import deploy_error, send_once, transient_retry, unless_gone

if TYPE_CHECKING:
    from cloudllm.plan import Plan
    from cloudllm.storage.gcs import GcsUri


# Runs in the handler's container (python3 + google-cloud-storage, as the HF inference DLCs have) as `python3 -c`:
# bootstrap.py is real code beside this module (importable, so tests can read it), sent as its source.
HANDLER_BOOTSTRAP = Path(__file__).with_name("bootstrap.py").read_text()
# The handler's Open Inference Protocol v2 gRPC port, declared as the model's grpcPorts: Vertex AI
# forwards DirectRawPredict/StreamDirectRawPredict to the first of them (ModelContainerSpec.grpc_ports).
GRPC_PORT = 8081


class VertexVersions:
    """Creating one version: each create finds what an earlier attempt made before sending again."""

    def _deployed_version(self, endpoint, existing: Endpoint, digest: str):
        """The deployed model on the endpoint that serves exactly this plan (an earlier run deployed it), or None."""
        main = main_deployment(endpoint)
        for deployed in endpoint.deployed_models:
            if main is not None and deployed.id == main.id:
                found = existing.fingerprint.digest
            else:
                labels = self.clients().models.get_model(name=f"{deployed.model}@{deployed.model_version_id}").labels
                found = decode_digest(labels[DIGEST_LABELS["digest"]]) if DIGEST_LABELS["digest"] in labels else None
            if found == digest:
                return deployed
        return None

    def _upload(self, plan: "Plan", reporter: Reporter, ledger: Ledger) -> str:
        from cloudllm.storage.gcs import GcsArtifacts, GcsUri

        self._upload_adapters(plan, reporter)  # content-addressed and shared by versions: never removed on failure
        store = GcsArtifacts(project=self.project)
        dest = version_prefix(plan)
        ledger.add("artifacts", str(dest), lambda: store.delete(dest))  # before the upload: a half-done one is removed too
        result = store.upload(
            plan.bundle.stored, dest, reporter, reuse_from=GcsUri.parse(plan.spec.bucket).child(plan.spec.name), kms_key=self.options.get("kms_key")
        )
        if result.kept:
            ledger.drop("artifacts")  # an earlier run made this version: not ours to remove
        plan.bundle = plan.bundle.with_hashes(result.hashes)  # hashed while uploading: now every digest is exact
        reporter.step(result.summary())
        return str(result.uri)

    def _upload_model(self, plan: "Plan", artifact_uri: str, parent_model: str | None, reporter: Reporter) -> tuple[str, str]:
        from google.cloud import aiplatform_v1 as v1

        model = v1.Model(
            display_name=plan.spec.name,
            description=f"{plan.model.architecture or plan.model.model_type} from {os.path.basename(plan.model.path)}, served by cloudllm ({plan.runtime})",
            artifact_uri=artifact_uri,
            container_spec=self._container_spec(plan, artifact_uri),
            labels=self._labels(plan, digests=True),
        )
        kms = self.options.get("kms_key")
        if kms:
            model.encryption_spec = v1.EncryptionSpec(kms_key_name=kms)
        earlier = self._version_of_this_plan(plan, artifact_uri, parent_model)
        if earlier is not None:  # a deploy of this same plan was killed after registering it
            reporter.step(f"model {earlier[0]} version {earlier[1]}, registered by an earlier deploy of this version")
            return earlier
        request = v1.UploadModelRequest(parent=self.parent, model=model, parent_model=parent_model or "")
        sent = send_once(
            lambda: self.clients().models.upload_model(request=request),
            find=lambda: self._model_of_this_run(plan.spec.name, model.labels[RUN_LABEL]),
        )
        if isinstance(sent, tuple):  # an earlier attempt registered it; only its answer was lost
            model_name, version = sent
        else:
            response = self._wait(sent, f"registering the model{' version' if parent_model else ''}", short_deadline(plan), reporter)
            model_name, version = response.model, response.model_version_id
        reporter.step(f"model {model_name} version {version} ({plan.runtime}, {model.container_spec.image_uri})")
        return model_name, version

    def _create_endpoint(self, plan: "Plan", reporter: Reporter) -> str:
        from google.cloud import aiplatform_v1 as v1

        from cloudllm.providers.vertex.routes import wants_dedicated

        # A dedicated DNS only now: Vertex AI sets it when it creates the endpoint (an added model needs it).
        endpoint = v1.Endpoint(
            display_name=plan.spec.name, labels=self._labels(plan, digests=False), dedicated_endpoint_enabled=bool(wants_dedicated(self.options)),
        )
        kms = self.options.get("kms_key")
        if kms:
            endpoint.encryption_spec = v1.EncryptionSpec(kms_key_name=kms)
        sent = send_once(
            lambda: self.clients().endpoints.create_endpoint(parent=self.parent, endpoint=endpoint),
            find=lambda: self._endpoint_of_this_run(plan.spec.name, endpoint.labels[RUN_LABEL]),
        )
        created = sent if isinstance(sent, str) else self._wait(sent, "creating the endpoint", short_deadline(plan), reporter).name
        reporter.step(f"endpoint {created}")
        return created

    def _deploy_model(self, plan: "Plan", endpoint: str, model: str, split: dict[str, int], reporter: Reporter) -> str:
        from google.cloud import aiplatform_v1 as v1

        from google.api_core import exceptions

        # Our own DeployedModel id, the same for every deploy of this plan to this endpoint: a DeployModel
        # retried after its answer was lost, or sent again by a re-run of a deploy killed while Vertex AI
        # went on deploying, meets ALREADY_EXISTS, and waits for the one under way instead of adding another.
        from cloudllm.providers.vertex.models import deployed_identity

        deployed_id, display_name = deployed_identity(plan)
        deployed = v1.DeployedModel(id=deployed_id, model=model, display_name=display_name, dedicated_resources=self._resources(plan))
        what = f"deploying on {resources_line(plan)}"
        fix = "see the model server's log in Cloud Logging (linked from the endpoint in the Vertex AI console), then deploy again"
        try:
            op = send_once(lambda: self._send_deploy(plan, endpoint, deployed, split), find=lambda: None)
        except exceptions.Conflict:  # 409 ALREADY_EXISTS: our id, so our earlier attempt is deploying it
            if not plan.wait:
                return ""
            self._wait_listed(endpoint, deployed.id, what, deploy_deadline(plan), reporter)
        else:
            if not plan.wait:
                return ""
            self._wait(op, what, deploy_deadline(plan), reporter, fix=fix)
        reporter.step(f"deployed model {deployed.id} serving")
        return deployed.id

    def _undeploy(self, endpoint: str, deployed_model_id: str, plan, reporter: Reporter, split: dict | None = None) -> None:
        op = unless_gone(self.clients().endpoints.undeploy_model, endpoint=endpoint, deployed_model_id=deployed_model_id, traffic_split=split or {})
        if op is not None:
            self._wait(op, f"undeploying {deployed_model_id}", short_deadline(plan), reporter)
        reporter.step(f"undeployed {deployed_model_id}")

    def _container_spec(self, plan: "Plan", artifact_uri: str):
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import duration_pb2

        from cloudllm.catalog.vertex_images import image_for
        from cloudllm.quantize import plan_quantize_env

        machine = machine_of(plan, self.default_instance)
        # Every GPU the attention heads split over: Vertex bills them all, and more KV cache means more throughput.
        gpus = plan.shard_count(machine.gpu_count) if machine.gpu_count else 0
        settings = plan.settings
        image = plan.spec.image or image_for(plan.runtime, gpu=bool(machine.gpu_count)).uri
        env: dict[str, str] = {"HF_HUB_OFFLINE": "1", **plan.bundle.settings_env}  # the artifact (bundle.stored) leaves them out
        command: list[str] = []
        args: list[str] = []
        predict, health, shm = PREDICT_ROUTE, HEALTH_ROUTE, 0
        if plan.runtime == "tgi":
            env.update(NUM_SHARD=str(gpus), MAX_INPUT_TOKENS=str(settings.max_input_tokens), MAX_TOTAL_TOKENS=str(settings.max_total_tokens))
            quantize_env = plan_quantize_env(plan)
            env.update(quantize_env)
            if settings.dtype in ("float16", "bfloat16") and not quantize_env:  # TGI refuses --dtype with --quantize
                env["DTYPE"] = settings.dtype
            if plan.spec.trust_remote_code:
                env["TRUST_REMOTE_CODE"] = "true"
            shm = 16 * 1024 if gpus > 1 else 0
        elif plan.runtime == "vllm":
            args = [
                "python", "-m", "vllm.entrypoints.api_server", "--host=0.0.0.0", f"--port={SERVING_PORT}",
                f"--model={artifact_uri}", f"--tensor-parallel-size={gpus}", f"--max-model-len={settings.max_total_tokens}",
                "--gpu-memory-utilization=0.9", "--swap-space=16", "--disable-log-requests",
            ]  # fmt: skip
            if settings.dtype in ("float16", "bfloat16"):
                args.append(f"--dtype={settings.dtype}")
            if plan.spec.quantize and plan.spec.quantize not in ("int8", "int4"):
                args.append(f"--quantization={plan.spec.quantize}")
            if plan.spec.trust_remote_code:
                args.append("--trust-remote-code")
            self._vllm_lora(plan, env, args)  # models.py: --enable-lora and the adapters' gs:// folders
            predict, health, shm = "/generate", "/ping", 16 * 1024
        else:
            command = ["python3", "-c", HANDLER_BOOTSTRAP]
            env["CLOUDLLM_GRPC_PORT"] = str(GRPC_PORT)  # bootstrap.py serves gRPC there
            self._adapter_env(plan, env)
        invoke_prefix = ""
        if plan.spec.add_model:
            from cloudllm.providers.vertex.routes import INVOKE_ROUTE_PREFIX

            # Reached through its deployed model's invoke route only: Vertex AI takes one of predict_route and
            # invoke_route_prefix, and an invoke-enabled model takes no gRPC.
            predict, invoke_prefix = "", INVOKE_ROUTE_PREFIX
            env.pop("CLOUDLLM_GRPC_PORT", None)
        return v1.ModelContainerSpec(
            image_uri=image,
            command=command,
            args=args,
            env=[v1.EnvVar(name=k, value=v) for k, v in sorted(env.items())],
            ports=[v1.Port(container_port=SERVING_PORT)],
            grpc_ports=[v1.Port(container_port=GRPC_PORT)] if "CLOUDLLM_GRPC_PORT" in env else [],
            predict_route=predict,
            invoke_route_prefix=invoke_prefix,
            health_route=health,
            deployment_timeout=duration_pb2.Duration(seconds=deployment_timeout(plan.bundle.total_bytes)),
            shared_memory_size_mb=shm,
        )

    def _resources(self, plan: "Plan"):
        from google.cloud import aiplatform_v1 as v1

        spec = plan.spec
        machine = machine_of(plan, self.default_instance)
        machine_spec = v1.MachineSpec(machine_type=machine.name)
        if machine.accelerator_type:
            machine_spec.accelerator_type = v1.AcceleratorType[machine.accelerator_type]
            machine_spec.accelerator_count = machine.accelerator_count
        resources = v1.DedicatedResources(machine_spec=machine_spec, min_replica_count=spec.min_instances, max_replica_count=spec.max_instances)
        metric = scale_metric(spec, machine)
        if metric:
            resources.autoscaling_metric_specs = [v1.AutoscalingMetricSpec(metric_name=metric[0], target=metric[1])]
        return resources

    def _labels(self, plan: "Plan", *, digests: bool) -> dict[str, str]:
        labels = {**plan.spec.tags, MANAGED_BY[0]: MANAGED_BY[1], NAME_LABEL: label_value(plan.spec.name)}
        labels[RUN_LABEL] = self._run_token()
        if digests:
            labels[RUNTIME_LABEL] = plan.runtime
            if not plan.spec.add_model:  # the first model's name, which `invoke --model` also takes
                from cloudllm.providers.vertex.models import MODEL_LABEL, first_model_name

                labels[MODEL_LABEL] = label_value(first_model_name(plan))
            labels.update(self._digest_labels(plan))
        return labels

    @staticmethod
    def _digest_labels(plan: "Plan") -> dict[str, str]:
        """The plan's fingerprint as model labels: what `get` reads back to compare."""
        fingerprint = plan.fingerprint
        return {label: encode_digest(fingerprint[key]) for key, label in DIGEST_LABELS.items() if fingerprint[key] is not None}

    # --- relabelling the serving version in place ----------------------------------------------
    def _retag(self, plan: "Plan", endpoint, reporter: Reporter) -> Endpoint:
        """Only the tags changed: the endpoint's labels (UpdateEndpoint), then the serving model version's (UpdateModel).

        The model version goes last: its digest labels say what is deployed, so a run stopped
        before it finds the old digests and relabels again.
        """
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        c = self.clients()
        main = main_deployment(endpoint)
        reporter.step(f"only the tags of {plan.spec.name} changed: relabelling in place, no new model version or copy")
        try:
            now = c.endpoints.get_endpoint(name=endpoint.name, retry=transient_retry())
            c.endpoints.update_endpoint(
                endpoint=v1.Endpoint(name=endpoint.name, labels=with_tags(now.labels, plan.spec.tags), etag=now.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]), retry=transient_retry(),
            )  # fmt: skip
            self._relabel_version(plan, f"{main.model}@{main.model_version_id}")
        except Exception as exc:
            raise deploy_error(exc, plan.spec.name) from None
        return self._endpoint_or_fail(plan.spec.name)

    def _relabel_version(self, plan: "Plan", version: str) -> None:
        """The plan's tags and digests on a model version (UpdateModel), cloudllm's other labels kept."""
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        models = self.clients().models
        labels = {**with_tags(models.get_model(name=version, retry=transient_retry()).labels, plan.spec.tags), **self._digest_labels(plan)}
        models.update_model(model=v1.Model(name=version, labels=labels), update_mask=field_mask_pb2.FieldMask(paths=["labels"]), retry=transient_retry())

    def _run_token(self) -> str:
        """A random token for this provider object's deploys, put on what they create (RUN_LABEL)."""
        if getattr(self, "_token", None) is None:
            self._token = secrets.token_hex(8)
        return self._token

    def _model_of_this_run(self, name: str, token: str) -> tuple[str, str] | None:
        from google.cloud import aiplatform_v1 as v1

        for model in self._models_named(name):
            for version in self.clients().models.list_model_versions(request=v1.ListModelVersionsRequest(name=model)):
                if version.labels.get(RUN_LABEL) == token:
                    return model, version.version_id
        return None

    def _version_of_this_plan(self, plan: "Plan", artifact_uri: str, parent_model: str | None) -> tuple[str, str] | None:
        """A model version an earlier (killed) deploy registered for exactly this plan and these artifacts."""
        from google.cloud import aiplatform_v1 as v1

        digest = encode_digest(plan.digest)
        for model in sorted({parent_model} if parent_model else self._models_named(plan.spec.name)):
            for version in self.clients().models.list_model_versions(request=v1.ListModelVersionsRequest(name=model)):
                if version.labels.get(DIGEST_LABELS["digest"]) == digest and version.artifact_uri.rstrip("/") == artifact_uri.rstrip("/"):
                    return model, version.version_id
        return None

    def _endpoint_of_this_run(self, name: str, token: str) -> str | None:
        from google.cloud import aiplatform_v1 as v1

        request = v1.ListEndpointsRequest(parent=self.parent, filter=f'display_name="{name}"')
        found = [e.name for e in self.clients().endpoints.list_endpoints(request=request) if e.labels.get(RUN_LABEL) == token]
        return found[0] if found else None
