"""Several models on one endpoint, the route to one deployed model, and scale to zero, in the Vertex AI emulator.

What the emulator copies from Vertex AI:
- An endpoint holds several DeployedModels, each with its own DedicatedResources (here: its own
  process). predict, rawPredict and streamRawPredict go where traffic_split sends them.
- `POST /v1/{endpoint}/deployedModels/{id}/invoke/{route}` (PredictionService.Invoke's HTTP form)
  reaches that deployed model whatever the split: the body goes to its container at `/{route}`
  (a TGI or vLLM image: to the engine the emulator speaks for it). The path is Vertex's documented
  REST method projects.locations.endpoints.deployedModels.invoke.invoke (v1 and v1beta1 reference,
  "post .../v1/{endpoint}/deployedModels/{deployedModelId}/invoke/**"). The real service also asks
  the Model's container_spec.invoke_route_prefix "/*" (then :predict/:rawPredict are off for it) and a
  dedicated endpoint (docs: predictions/use-arbitrary-custom-routes); vertex_dedicated.py checks both.
- Scale to zero exists in v1beta1 only: DeployModel with `dedicated_resources.min_replica_count` 0
  and `scale_to_zero_spec {min_scaleup_period, idle_scaledown_period}` (each 300..28800 s). v1's
  DeployModel refuses min 0, and v1's types have no scale_to_zero_spec. A deployment starts with one
  replica; once the idle period has passed it has none, and a request meanwhile is answered 429
  RESOURCE_EXHAUSTED and starts one.

Scale-in by idleness: a deployed model with a scale_to_zero_spec that has had no request for its
idle_scaledown_period (3600 s when unset, Vertex's documented default) is scaled to zero by a watcher
thread. `emulator.tenancy.idle_seconds` (or env CLOUDLLM_EMULATOR_VERTEX_IDLE_SECONDS) overrides every
period so tests take seconds.

Hooks for tests: `emulator.tenancy.scale_to_zero(deployed_model_id)` (its idle period passes now: the
process stops), `emulator.tenancy.wake_seconds` (how long after the first request at zero the replica
starts again; then it loads as at deploy), `emulator.tenancy.wakes` (requests answered 429 at zero).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from cloudllm_emulators.vertex_api import LOCATION as _LOC
from cloudllm_emulators.vertex_api import ApiError
from cloudllm_emulators.vertex_api import parse_message as _parse
from cloudllm_emulators.vertex_api import to_json as _to_json

log = logging.getLogger("cloudllm_emulators.vertex")

IDLE_ENV = "CLOUDLLM_EMULATOR_VERTEX_IDLE_SECONDS"
DEFAULT_IDLE_SCALEDOWN = 3600.0  # seconds: ScaleToZeroSpec.idle_scaledown_period when the request leaves it unset
SCALE_TO_ZERO_PERIODS = (300, 28800)  # seconds: v1beta1 ScaleToZeroSpec's MinValue and MaxValue

ROUTES = [
    ("POST", rf"^/v1beta1/(?P<name>{_LOC}/endpoints/[^/:]+):deployModel$", "deploy_model_v1beta1"),
    ("GET", rf"^/v1beta1/(?P<name>{_LOC}/endpoints/[^/:]+)$", "get_endpoint_v1beta1"),
    ("POST", rf"^/v1/(?P<name>{_LOC}/endpoints/[^/:]+)/deployedModels/(?P<deployed>[^/:]+)/invoke(?P<route>/.*)$", "invoke_deployed"),
]
ACTIONS = {action for _, _, action in ROUTES}


def _beta():
    from google.cloud import aiplatform_v1beta1

    return aiplatform_v1beta1


def _seconds(duration: str) -> float:
    return float(duration.rstrip("s"))


class Tenancy:
    """The emulator's scale-to-zero state: which deployed models may sleep, which sleep, which wake."""

    def __init__(self, emulator: Any):
        self.emulator = emulator
        self.wake_seconds = 0.2
        self.wakes = 0
        self.zero_specs: dict[str, dict] = {}  # deployed model id -> its ScaleToZeroSpec as JSON
        self._asleep: dict[str, threading.Thread | None] = {}  # deployed model id -> its wake (None: none started)
        self._beta_ops: set[str] = set()
        configured = os.environ.get(IDLE_ENV)
        self.idle_seconds: float | None = float(configured) if configured else None  # None: each spec's own period
        self._last_request: dict[str, float] = {}  # deployed model id -> monotonic time of its last request
        self._watcher: threading.Thread | None = None

    # --- v1beta1 -----------------------------------------------------------------------------
    def deploy_v1beta1(self, name: str, body: bytes):
        """DeployModel as v1beta1 takes it: v1's checks, with min_replica_count 0 allowed by a scale_to_zero_spec."""
        request = _parse(_beta().DeployModelRequest, body)  # v1beta1's fields, unknown ones refused
        data = _to_json(request)
        resources = data.get("deployedModel", {}).get("dedicatedResources", {})
        spec = resources.pop("scaleToZeroSpec", None)
        if spec is None and not resources.get("minReplicaCount"):
            raise ApiError("INVALID_ARGUMENT", "dedicated_resources.min_replica_count must be at least 1 unless scale_to_zero_spec is set.")
        if spec is not None and resources.get("minReplicaCount"):
            raise ApiError("INVALID_ARGUMENT", "scale_to_zero_spec needs dedicated_resources.min_replica_count 0.")
        low, high = SCALE_TO_ZERO_PERIODS
        for key, value in (spec or {}).items():
            if not low <= _seconds(value) <= high:
                raise ApiError("INVALID_ARGUMENT", f"scale_to_zero_spec.{key} must be between {low}s and {high}s, not {value}.")
        # The rest is v1's: v1's parser refuses any other v1beta1-only field (this emulator does not model it).
        op = self.emulator.deploy_model(name, json.dumps(data).encode(), scale_to_zero=spec)
        with self.emulator.lock:
            self._beta_ops.add(op.name)
        return self.operation_view(op)

    def operation_view(self, op):
        """An operation as its caller's API version types it: the v1beta1 client unpacks v1beta1 messages."""
        if op.name in self._beta_ops:
            for part in (op.metadata, op.response):
                if part.type_url:
                    part.type_url = part.type_url.replace(".aiplatform.v1.", ".aiplatform.v1beta1.")
        return op

    def get_endpoint_v1beta1(self, name: str) -> dict:
        data = _to_json(self.emulator.get_endpoint(name))
        for deployed in data.get("deployedModels", []):
            spec = self.zero_specs.get(deployed.get("id"))
            if spec is not None:
                deployed.setdefault("dedicatedResources", {})["scaleToZeroSpec"] = spec
        return _to_json(_parse(_beta().Endpoint, data))  # the real v1beta1 type must hold it

    def deployed(self, deployed_model_id: str, spec: dict | None) -> None:
        """A DeployModel finished: remember whether this deployed model may scale to zero."""
        if spec is not None:
            with self.emulator.lock:
                self.zero_specs[deployed_model_id] = spec
                self._last_request[deployed_model_id] = time.monotonic()
                if self._watcher is None:
                    self._watcher = threading.Thread(target=self._watch_idle, name="vertex-idle-scaledown", daemon=True)
                    self._watcher.start()

    def idle_period(self, deployed_model_id: str) -> float:
        """Seconds without a request after which this deployed model has no replica."""
        if self.idle_seconds is not None:
            return self.idle_seconds
        period = self.zero_specs.get(deployed_model_id, {}).get("idleScaledownPeriod")
        return _seconds(period) if period else DEFAULT_IDLE_SCALEDOWN

    def _watch_idle(self) -> None:
        """Vertex's scale-in: each awake deployed model idle past its period goes to zero."""
        while True:
            with self.emulator.lock:
                now = time.monotonic()
                idle = [
                    dm for dm in self.zero_specs
                    if dm not in self._asleep and now - self._last_request.get(dm, now) >= self.idle_period(dm)
                ]
                tick = min([self.idle_period(dm) for dm in self.zero_specs] or [1.0]) / 4
            for deployed_model_id in idle:
                try:
                    self.scale_to_zero(deployed_model_id)
                except (ValueError, ApiError):  # undeployed meanwhile
                    pass
            time.sleep(min(max(tick, 0.05), 1.0))

    # --- at zero -----------------------------------------------------------------------------
    def forget(self, deployed_model_id: str) -> None:
        """Undeployed: nothing of it sleeps or wakes any more."""
        with self.emulator.lock:
            self.zero_specs.pop(deployed_model_id, None)
            self._asleep.pop(deployed_model_id, None)
            self._last_request.pop(deployed_model_id, None)

    def scale_to_zero(self, deployed_model_id: str) -> None:
        """Its idle_scaledown_period passed: no replica is left (the process stops)."""
        e = self.emulator
        with e.lock:
            if deployed_model_id not in self.zero_specs:
                raise ValueError(f"deployed model {deployed_model_id} was not deployed with a scale_to_zero_spec")
            _, deployed = self._find(deployed_model_id)
            deployed.status.available_replica_count = 0
            self._asleep[deployed_model_id] = None
            replica = e.state.replicas.pop(deployed_model_id, None)
        if replica is not None:
            replica.stop()

    def asleep(self, deployed_model_id: str) -> bool:
        with self.emulator.lock:
            return deployed_model_id in self._asleep

    def check_awake(self, deployed_model_id: str) -> None:
        """At zero: 429, and the first such request starts a replica (after wake_seconds, then its load)."""
        with self.emulator.lock:
            if deployed_model_id not in self._asleep:
                if deployed_model_id in self._last_request:
                    self._last_request[deployed_model_id] = time.monotonic()
                return
            self.wakes += 1
            if self._asleep[deployed_model_id] is None:
                thread = threading.Thread(target=self._wake, args=(deployed_model_id,), name=f"wake-{deployed_model_id}", daemon=True)
                self._asleep[deployed_model_id] = thread
                thread.start()
        raise ApiError(
            "RESOURCE_EXHAUSTED",
            f"Deployed model {deployed_model_id} is scaled to zero; a replica is starting for this request. Retry later.",
        )

    def _wake(self, deployed_model_id: str) -> None:
        e = self.emulator
        time.sleep(self.wake_seconds)
        try:
            with e.lock:
                endpoint, deployed = self._find(deployed_model_id)
                model = e._model(f"{deployed.model}@{deployed.model_version_id}")
            e._start_replica(endpoint, deployed, model)
        except Exception:  # the next request starts another try, as the service would
            log.exception("waking %s failed", deployed_model_id)
            with e.lock:
                if deployed_model_id in self._asleep:
                    self._asleep[deployed_model_id] = None
            return
        with e.lock:
            deployed.status.available_replica_count = 1
            self._asleep.pop(deployed_model_id, None)
            self._last_request[deployed_model_id] = time.monotonic()  # the request that woke it counts

    def _find(self, deployed_model_id: str):
        for endpoint in self.emulator.state.endpoints.values():
            for deployed in endpoint.deployed_models:
                if deployed.id == deployed_model_id:
                    return endpoint, deployed
        raise ApiError("NOT_FOUND", f"Deployed model {deployed_model_id} not found.")

    # --- one deployed model --------------------------------------------------------------------
    def deployed_replica(self, name: str, deployed_model_id: str) -> Any:  # vertex._Replica
        e = self.emulator
        with e.lock:
            if deployed_model_id not in {d.id for d in e._endpoint(name).deployed_models}:
                raise ApiError("NOT_FOUND", f"Deployed model {deployed_model_id} not found on {name}.")
        self.check_awake(deployed_model_id)
        with e.lock:
            replica = e.state.replicas.get(deployed_model_id)
        if replica is None or replica.process is None or replica.process.poll() is not None:
            raise ApiError("UNAVAILABLE", f"Deployed model {deployed_model_id} is not serving: {replica.log_tail() if replica else 'no process'}")
        return replica


def serve(handler: Any, emulator: Any, action: str, params: dict, body: bytes) -> None:
    """The HTTP side of the routes above, on the emulator's request handler."""
    t = emulator.tenancy
    if action == "deploy_model_v1beta1":
        handler._send_op(t.deploy_v1beta1(params["name"], body))
    elif action == "get_endpoint_v1beta1":
        handler._send_json(200, t.get_endpoint_v1beta1(params["name"]))
    elif action == "invoke_deployed":
        emulator.dedicated.check_invoke(params["name"], params["deployed"], params["route"])  # vertex_dedicated: its preconditions
        replica = t.deployed_replica(params["name"], params["deployed"])
        if replica.dialect:
            try:
                streamed = any(isinstance(i, dict) and i.get("stream") for i in json.loads(body or b"{}").get("instances", []))
            except (ValueError, AttributeError):
                streamed = False
            handler._engine(replica, body, streamed=streamed)
        else:
            handler._stream(replica, body, handler.headers.get("Content-Type") or "application/json", route=params["route"])
