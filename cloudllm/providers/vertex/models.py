"""Many tenants on one Vertex AI endpoint: more models (--add-model), LoRA adapters, scale to zero.

- Each added model is its own Model and DeployedModel on the endpoint, with its own
  DedicatedResources sized from its plan, and no share of the traffic split: the first model keeps
  it all, and a request for an added model goes to its deployed model directly
  (`{endpoint}/deployedModels/{id}/invoke/{route}` on the dedicated DNS). Vertex AI serves that route
  only for a Model uploaded with invoke_route_prefix "/*" on a dedicated endpoint: routes.py and
  docs/vertex-multi-model.md say why and what is refused.
- Adapters (handler runtime): each is uploaded content-addressed to `<bucket>/<name>/adapters/<digest>/`
  (only when absent); the model version's container copies them beside the model at start
  (CLOUDLLM_ADAPTER_URIS, read by bootstrap.py) and our server loads them (settings.adapters). A
  Vertex model version is immutable and only Vertex reaches the container, so adding or removing
  an adapter is a new model version rolled out blue/green: no base re-upload, but a redeploy.
- Adapters (vllm runtime): the Model Garden vLLM server runs with --enable-lora (--max-loras,
  --max-lora-rank, --max-cpu-loras) and takes an adapter per request as the instance's
  "dynamic-lora" field, a gs:// folder it downloads itself. The names map to those folders in the
  model version's env (LORA_URIS_ENV, which the server ignores): invoke refuses a name that is not
  there, because the server would load any folder it is given. Llama-shaped bases only
  (cloudllm.adapters.check_engine_adapters).
- Scale to zero (--min-instances 0) exists only in v1beta1: DeployModel with min_replica_count 0 and
  a scale_to_zero_spec; while a deployed model has no replica, requests are answered 429 and start
  one, which invoke reports as cloudllm.types.Waking.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterator

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.base import Endpoint, Waking
from cloudllm.providers.vertex.invoke import PREDICT_ROUTE
from cloudllm.providers.vertex.labels import MODEL_LABEL, RUNTIME_LABEL, deployed_model_id, label_value
from cloudllm.providers.vertex.routes import invoke_route
from cloudllm.providers.vertex.session import transient_retry

if TYPE_CHECKING:
    from cloudllm.plan import Plan

ADDED_PREFIX = "model:"  # DeployedModel.display_name of an added model: "model:<name>"
ADAPTER_URIS_ENV = "CLOUDLLM_ADAPTER_URIS"  # bootstrap.py copies each gs://.../adapters/<digest>/ to adapters/<digest>/
SCALE_TO_ZERO_PERIODS = (300, 28800)  # seconds: v1beta1 ScaleToZeroSpec's idle_scaledown_period bounds
LORA_URIS_ENV = "CLOUDLLM_LORA_ADAPTERS"  # vllm: {"name": "gs://.../adapters/<digest>/"}, what "dynamic-lora" is sent
DYNAMIC_LORA = "dynamic-lora"  # the Model Garden vLLM server's per-instance adapter field
ADAPTER_RUNTIMES = {
    "tgi": "TGI's Vertex AI route reads only max_new_tokens and seed from a request, so it cannot pick an adapter",
}


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Text lines of a byte stream, as httpx's iter_lines gives them."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if buffer:
        yield buffer.decode()


def added_name(deployed) -> str | None:
    """The --model name of an added model's deployed model; None for the endpoint's first model."""
    name = deployed.display_name or ""
    return name[len(ADDED_PREFIX) :] if name.startswith(ADDED_PREFIX) else None


def first_models(endpoint) -> list:
    """The deployed models of the endpoint's first model (its versions during an update), added models left out."""
    return [d for d in endpoint.deployed_models if added_name(d) is None]


def first_model_name(plan: "Plan") -> str:
    from cloudllm.spec import default_endpoint_name

    return default_endpoint_name(plan.spec.model)


def deployed_identity(plan: "Plan") -> tuple[str, str]:
    """(DeployedModel id, display_name) of this plan's deployed model: an added model's are its own."""
    spec = plan.spec
    if spec.add_model:
        return deployed_model_id(f"{spec.name}/{spec.add_model}", plan.digest), ADDED_PREFIX + spec.add_model
    return deployed_model_id(spec.name, plan.digest), spec.name


def wake_seconds(plan: "Plan") -> int:
    """A rough figure for a wake from zero: a machine (about 3 minutes for a GPU one), then the copy and load at ~200 MB/s."""
    return int(180 + plan.bundle.total_bytes / 200e6)


def zero_spec(plan: "Plan") -> dict[str, Any]:
    """v1beta1 ScaleToZeroSpec as JSON: --scale-in-cooldown is the idle time before scaling to zero (Vertex's default without it)."""
    idle = plan.spec.scale_in_cooldown
    return {} if idle is None else {"idle_scaledown_period": f"{int(idle)}s"}


class VertexModels:
    """--add-model, adapters and scale to zero of a VertexProvider."""

    # --- checks ---------------------------------------------------------------------------------
    def _check_tenancy(self, plan: "Plan") -> None:
        spec = plan.spec
        if plan.adapters and plan.runtime in ADAPTER_RUNTIMES:
            raise UserError(
                f"LoRA adapters on Vertex AI: {ADAPTER_RUNTIMES[plan.runtime]}", "deploy with --runtime vllm or --runtime handler to serve --adapter"
            )
        if plan.adapters:
            from cloudllm.adapters import check_engine_adapters

            check_engine_adapters(plan.runtime, plan.model.architecture, plan.adapters)
        if spec.min_instances == 0:
            if spec.max_instances < 1:
                raise UserError("--min-instances 0 with --max-instances 0 never serves", "set --max-instances 1 or more")
            low, high = SCALE_TO_ZERO_PERIODS
            if spec.scale_in_cooldown is not None and not low <= spec.scale_in_cooldown <= high:
                raise UserError(
                    f"--scale-in-cooldown {spec.scale_in_cooldown:g} is Vertex AI's idle time before scaling to zero, which takes {low}..{high} s",
                    f"pass --scale-in-cooldown between {low} and {high}",
                )
            if spec.scale_out_cooldown is not None:
                raise UserError("Vertex AI chooses when to scale out", "drop --scale-out-cooldown")
            plan.warnings.append(
                f"scale to zero: idle cost $0/h on Vertex AI; the first request after an idle period waits for a replica "
                f"(about {wake_seconds(plan) // 60 + 1} min: a new machine, then the model loads), and cloudllm invoke waits through it"
            )
        elif spec.scale_in_cooldown is not None or spec.scale_out_cooldown is not None:
            raise UserError("Vertex AI chooses its own scaling cooldowns", "drop --scale-in-cooldown/--scale-out-cooldown")

    # --- scale to zero ----------------------------------------------------------------------------
    def _send_deploy(self, plan: "Plan", endpoint: str, deployed, split: dict[str, int]):
        """DeployModel: v1, or v1beta1 with a scale_to_zero_spec for --min-instances 0 (v1 has none)."""
        if plan.spec.min_instances != 0:
            return self.clients().endpoints.deploy_model(endpoint=endpoint, deployed_model=deployed, traffic_split=split)
        from google.cloud import aiplatform_v1beta1 as beta

        zero = beta.DeployedModel.deserialize(type(deployed).serialize(deployed))  # the fields both versions share
        zero.dedicated_resources.scale_to_zero_spec = beta.DedicatedResources.ScaleToZeroSpec.from_json(json.dumps(zero_spec(plan)))
        return self._beta_endpoints().deploy_model(endpoint=endpoint, deployed_model=zero, traffic_split=split)

    def _beta_endpoints(self):
        if getattr(self, "_beta", None) is None:
            from google.cloud import aiplatform_v1beta1 as beta

            from cloudllm.providers.vertex.session import Retrying, client_kwargs

            self._beta = Retrying(beta.EndpointServiceClient(**client_kwargs(self.region)))
        return self._beta

    def _waking(self, name: str, endpoint: Endpoint, exc: BaseException) -> BaseException:
        """A 429 from a deployed model that scales to zero is its wake; anything else is what it was."""
        from google.api_core import exceptions

        if isinstance(exc, exceptions.TooManyRequests) and endpoint.details.get("scale_to_zero"):
            return Waking(f"{name} is scaled to zero and a replica is starting ({exc.message})")
        return exc

    # --- several models ---------------------------------------------------------------------------
    def _add_model(self, plan: "Plan", existing: Endpoint, reporter: Reporter) -> Endpoint:
        """Deploy plan's model as one more model on the endpoint; the others and the traffic split stay."""
        name, model_name = plan.spec.name, plan.spec.add_model
        endpoint_name = existing.details["endpoint"]
        endpoint = self.clients().endpoints.get_endpoint(name=endpoint_name, retry=transient_retry())
        if model_name == existing.details.get("first_model"):
            raise UserError(f"{model_name} is the name of endpoint {name}'s first model", "pick another --add-model name")
        before = [d for d in endpoint.deployed_models if added_name(d) == model_name]
        new_id = deployed_identity(plan)[0]
        if any(d.id == new_id for d in before):
            reporter.step(f"model {model_name} on {name} is already this version ({new_id})")
        else:
            from cloudllm.providers.kit import Ledger

            ledger = Ledger()
            with self._undone_on_failure(ledger, plan, reporter, update=False):
                artifact_uri = self._upload(plan, reporter, ledger)
                parent = before[0].model if before else None
                model, version = self._upload_model(plan, artifact_uri, parent, reporter)
                if not parent:
                    models = self.clients().models
                    ledger.add("model", model, lambda: self._wait_unless_gone(models.delete_model, Reporter(), name=model))
                # No share of the split: the first model keeps its traffic, this one answers only when asked by name.
                self._deploy_model(plan, endpoint_name, f"{model}@{version}", {**dict(endpoint.traffic_split), "0": 0}, reporter)
            for old in before:
                self._undeploy(endpoint_name, old.id, plan, reporter)
        reporter.step(f"model {model_name} serves on {name}: invoke it with --model {model_name}")
        return self._endpoint_or_fail(name)

    def _model_target(self, name: str, endpoint: Endpoint, model: str | None) -> str | None:
        """The deployed model id a request for `model` goes to directly; None: the endpoint's split (its first model)."""
        models: dict[str, str] = endpoint.details.get("models", {})
        first = endpoint.details.get("first_model")
        if model is None or (first is not None and label_value(model) == first):
            return None
        if model not in models:
            raise UserError(f"endpoint {name} has no model {model!r}", f"use --model {' or '.join(sorted({first, *models} - {None}))}")
        return models[model]

    def _invoke_deployed(self, name: str, endpoint: Endpoint, deployed_id: str, body: dict, *, stream: bool) -> Iterator[bytes]:
        """One request straight to a deployed model (not through the split), its answer as it comes."""
        import httpx

        from cloudllm.http import TIMEOUT, endpoint_error

        route = endpoint.details.get("predict_routes", {}).get(deployed_id, PREDICT_ROUTE)
        # REST reference v1 endpoints.deployedModels.invoke: "post {endpoint}/deployedModels/{id}/invoke/**", on the
        # dedicated DNS, for a Model uploaded with invoke_route_prefix "/*" (routes.py); /invoke/x reaches the container as /x.
        url = f"{self._prediction_base(name, endpoint)}/v1/{endpoint.details['endpoint']}/deployedModels/{deployed_id}/invoke{route}"
        try:
            with httpx.stream("POST", url, json=body, headers=self._auth_headers(), timeout=TIMEOUT) as response:
                if response.status_code >= 400:
                    response.read()
                    if response.status_code == 429 and endpoint.details.get("scale_to_zero"):
                        raise Waking(f"{name} is scaled to zero and a replica is starting")
                    raise endpoint_error(name, response.status_code, response.text)
                yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise DeployFailed(f"cannot reach {self.api_base}: {exc}", "check your network, or CLOUDLLM_VERTEX_ENDPOINT") from None

    def _stream_deployed(self, name: str, endpoint: Endpoint, deployed_id: str, runtime: str, body: dict) -> Iterator[str]:
        """A stream from one deployed model: vLLM's NUL-separated frames, or our server's server-sent events."""
        from cloudllm.providers.vertex.invoke import vllm_frames, vllm_stream_request

        if runtime == "vllm":
            yield from vllm_frames(name, self._invoke_deployed(name, endpoint, deployed_id, vllm_stream_request(body), stream=True))
            return
        from cloudllm.invocation import iter_sse_tokens

        chunks = self._invoke_deployed(name, endpoint, deployed_id, {**body, "stream": True}, stream=True)
        yield from iter_sse_tokens(_lines(chunks))

    def _wake_guard(self, name: str, endpoint: Endpoint, pieces: Iterator[str]) -> Iterator[str]:
        """A stream whose request met the endpoint at zero (429, which cloudllm.http makes a UserError naming it) raises Waking."""
        try:
            yield from pieces
        except UserError as exc:
            if endpoint.details.get("scale_to_zero") and "(429)" in str(exc):
                raise Waking(f"{name} is scaled to zero and a replica is starting") from None
            raise

    def _tenancy_details(self, endpoint, main, model) -> dict[str, Any]:
        """What `get` adds: the models by name, their routes, whether they scale to zero."""
        models, routes = {}, {}
        for deployed in endpoint.deployed_models:
            added = added_name(deployed)
            if added is not None:
                models[added] = deployed.id
        for deployed_id in models.values():
            deployed = next(d for d in endpoint.deployed_models if d.id == deployed_id)
            added = self.clients().models.get_model(name=f"{deployed.model}@{deployed.model_version_id}", retry=transient_retry())
            spec = added.container_spec
            if spec.invoke_route_prefix:  # Vertex sets its own AIP_PREDICT_ROUTE then: a path the runtime always serves
                routes[deployed_id] = invoke_route(added.labels.get(RUNTIME_LABEL))
            else:  # uploaded before added models were invoke-enabled: the shared host's invoke refuses it (see routes.py)
                routes[deployed_id] = spec.predict_route or PREDICT_ROUTE
        lora = next((e.value for e in model.container_spec.env if e.name == LORA_URIS_ENV), None)
        return {
            "lora_adapters": json.loads(lora) if lora else {},  # vllm: name -> gs:// folder ("dynamic-lora")
            "first_model": model.labels.get(MODEL_LABEL),
            "models": models,
            "predict_routes": routes,
            "scale_to_zero": any(d.dedicated_resources.min_replica_count == 0 for d in endpoint.deployed_models),
        }

    # --- adapters -------------------------------------------------------------------------------
    def _adapter_env(self, plan: "Plan", env: dict[str, str]) -> None:
        """The container's adapters: their gs:// copies for bootstrap.py, and settings.adapters for our server."""
        if not plan.adapters:
            return
        from cloudllm_runtime.settings import SETTINGS_ENV

        if SETTINGS_ENV not in env:
            raise UserError(
                "this model's serving settings are too long for the container's environment, where Vertex AI adapters are named",
                "deploy without --adapter, or shorten the settings (e.g. a shorter --chat-template)",
            )
        root = self._adapter_root(plan)
        digests = plan.adapter_digests
        settings = json.loads(env[SETTINGS_ENV])
        settings["adapters"] = {name: f"adapters/{digest}" for name, digest in sorted(digests.items())}
        env[SETTINGS_ENV] = json.dumps(settings, separators=(",", ":"), sort_keys=True)
        env[ADAPTER_URIS_ENV] = " ".join(str(root.child(d)) for d in sorted(set(digests.values())))

    def _vllm_lora(self, plan: "Plan", env: dict[str, str], args: list[str]) -> None:
        """The Model Garden vLLM server's LoRA flags, and the adapters' gs:// folders by name (what invoke sends)."""
        if not plan.adapters:
            return
        from cloudllm.adapters import vllm_max_lora_rank

        count = len(plan.adapters)
        args += ["--enable-lora", f"--max-loras={count}", f"--max-lora-rank={vllm_max_lora_rank(plan.adapters)}", f"--max-cpu-loras={count}"]
        root = self._adapter_root(plan)
        env[LORA_URIS_ENV] = json.dumps({name: str(root.child(digest)) for name, digest in sorted(plan.adapter_digests.items())}, separators=(",", ":"))

    def _dynamic_lora(self, name: str, endpoint: Endpoint, body: dict) -> tuple[dict, str | None]:
        """(body without its adapter_id, the adapter's gs:// folder) for a vllm endpoint; body as it is elsewhere.

        The server downloads and serves whatever folder "dynamic-lora" names, so a name the
        endpoint was not deployed with is refused here."""
        parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        adapter = parameters.get("adapter_id")
        if endpoint.runtime != "vllm" or adapter is None:
            return body, None
        held: dict[str, str] = endpoint.details.get("lora_adapters") or {}
        if adapter not in held:
            raise UserError(
                f"endpoint {name} has no adapter named {adapter}",
                f"use one of: {', '.join(sorted(held))}" if held else f"invoke without --adapter; deploy {name} with --adapter NAME=PATH to add one",
            )
        return {**body, "parameters": {k: v for k, v in parameters.items() if k != "adapter_id"}}, held[adapter]

    def _adapter_root(self, plan: "Plan"):
        from cloudllm.storage.gcs import GcsUri

        return GcsUri.parse(plan.spec.bucket).child(plan.spec.name, "adapters")

    def _upload_adapters(self, plan: "Plan", reporter: Reporter) -> None:
        """Each adapter's files under adapters/<digest>/, sent only when not there already (content-addressed: never replaced)."""
        if not plan.adapters:
            return
        from cloudllm.adapters import adapter_files
        from cloudllm.storage.gcs import storage_client

        root = self._adapter_root(plan)
        bucket = storage_client(self.project).bucket(root.bucket)
        sent = 0
        for adapter in plan.adapters:
            dest = root.child(plan.adapter_digests[adapter.name])
            for relative, path in adapter_files(adapter):
                blob = bucket.blob(dest.object_name(relative), kms_key_name=self.options.get("kms_key"))
                if not blob.exists(retry=None):
                    blob.upload_from_filename(path, checksum="crc32c")
                    sent += 1
        reporter.step(f"{len(plan.adapters)} adapter(s) under {root}: {sent} file(s) uploaded, the rest already there")

    def add_adapter(self, name: str, adapter, reporter: Reporter) -> None:
        raise self._adapters_redeploy(name)

    def remove_adapter(self, name: str, adapter: str, reporter: Reporter) -> None:
        raise self._adapters_redeploy(name)

    def _adapters_redeploy(self, name: str) -> UserError:
        return UserError(
            "Vertex AI cannot change the adapters of a live model version: only Vertex AI reaches the container, and a version is immutable",
            f"deploy {name} again with the --adapter set you want: a new version of the same base, rolled out blue/green (only new adapters are uploaded)",
        )

    def list_adapters(self, name: str) -> list[dict]:
        from cloudllm_runtime.settings import SETTINGS_ENV

        endpoint = self._serving_endpoint(name)
        model = self.clients().models.get_model(name=f"{endpoint.details['model']}@{endpoint.details['model_version_id']}", retry=transient_retry())
        env = {e.name: e.value for e in model.container_spec.env}
        if LORA_URIS_ENV in env:  # vllm
            uris = json.loads(env[LORA_URIS_ENV])
            return [{"name": a, "rank": None, "digest": uri.rstrip("/").rsplit("/", 1)[-1], "status": "serving"} for a, uri in sorted(uris.items())]
        adapters = json.loads(env.get(SETTINGS_ENV) or "{}").get("adapters", {})
        return [{"name": a, "rank": None, "digest": folder.rsplit("/", 1)[-1], "status": "serving"} for a, folder in sorted(adapters.items())]

