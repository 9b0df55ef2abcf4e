"""Dedicated endpoints and invoke-enabled models in the Vertex AI emulator, with the real service's preconditions.

What the real service does (aiplatform_v1 types and docs: predictions/use-arbitrary-custom-routes):
- `Endpoint.dedicated_endpoint_enabled` (set at creation) gives the endpoint `dedicated_endpoint_dns`
  ("https://{endpoint_id}.{region}-{uid}.prediction.vertexai.goog"); its requests are served there only:
  the shared API host answers them 400 FAILED_PRECONDITION "This endpoint is a dedicated endpoint via
  CloudESF and cannot be accessed through the Vertex AI API. Please access the endpoint using its
  dedicated dns name '...'" (the text users have quoted from the real service).
- `ModelContainerSpec.invoke_route_prefix`: "/*" is the only supported value; only one of predict_route
  and invoke_route_prefix can be set; such a Model "can only be deployed to dedicated endpoint"; once
  deployed, :predict, :rawPredict and the rest are off for it and
  `{endpoint}/deployedModels/{id}/invoke/foo/bar` reaches its container as /foo/bar (the root is not exposed).

Here each dedicated endpoint gets a listener of its own on loopback, and its dedicated_endpoint_dns is
that listener's "127.0.0.1:PORT" (a name that resolves on this machine, in the place of Google's).
It serves only that endpoint's prediction routes. The wording of the refusals the docs describe
without quoting is this emulator's.
"""

from __future__ import annotations

import threading
from typing import Any

from cloudllm_emulators.vertex_api import ApiError

INVOKE_ROUTE_PREFIXES = ("/*",)  # ModelContainerSpec.invoke_route_prefix: "/*" is the only supported value right now
PREDICTION_ACTIONS = frozenset({"predict", "raw_predict", "stream_raw_predict", "direct_raw_predict", "invoke_deployed"})
SHARED_HOST_REFUSAL = (
    "This endpoint is a dedicated endpoint via CloudESF and cannot be accessed through the Vertex AI API. "
    "Please access the endpoint using its dedicated dns name '{dns}'"
)


def _endpoint_id(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


class Dedicated:
    """The dedicated listeners of an emulator, and the checks on invoke-enabled models."""

    def __init__(self, emulator: Any, handler_for: Any):
        self.emulator = emulator
        self._handler_for = handler_for  # vertex._handler_for, passed in: this module sits below vertex.py
        self._listeners: dict[str, tuple[Any, threading.Thread]] = {}  # endpoint id -> (ThreadingHTTPServer, its thread)

    # --- endpoints ---------------------------------------------------------------------------
    def created(self, endpoint) -> None:
        """CreateEndpoint: dedicated_endpoint_dns is output only; a dedicated endpoint gets its own listener."""
        endpoint.dedicated_endpoint_dns = ""
        if not endpoint.dedicated_endpoint_enabled:
            return
        from http.server import ThreadingHTTPServer

        endpoint_id = _endpoint_id(endpoint.name)
        httpd = ThreadingHTTPServer((self.emulator.host, 0), self._handler_for(self.emulator, dedicated_for=endpoint_id))
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, name=f"vertex-dedicated-{endpoint_id}", daemon=True)
        thread.start()
        self._listeners[endpoint_id] = (httpd, thread)
        endpoint.dedicated_endpoint_dns = f"{self.emulator.host}:{httpd.server_address[1]}"

    def deleted(self, endpoint_id: str) -> None:
        listener = self._listeners.pop(endpoint_id, None)
        if listener is not None:
            listener[0].shutdown()
            listener[0].server_close()

    def stop(self) -> None:
        for endpoint_id in list(self._listeners):
            self.deleted(endpoint_id)

    # --- models ------------------------------------------------------------------------------
    @staticmethod
    def check_upload(model) -> None:
        spec = model.container_spec
        if not spec.invoke_route_prefix:
            return
        if spec.invoke_route_prefix not in INVOKE_ROUTE_PREFIXES:
            raise ApiError("INVALID_ARGUMENT", f'container_spec.invoke_route_prefix "{spec.invoke_route_prefix}" is not supported: "/*" is the only supported value.')
        if spec.predict_route:
            raise ApiError("INVALID_ARGUMENT", "Only one of container_spec.predict_route or container_spec.invoke_route_prefix can be set.")

    @staticmethod
    def check_deploy(endpoint, model) -> None:
        if model.container_spec.invoke_route_prefix and not endpoint.dedicated_endpoint_enabled:
            raise ApiError(
                "FAILED_PRECONDITION",
                f"Model {model.name} sets container_spec.invoke_route_prefix and can only be deployed to a dedicated endpoint; "
                f"{endpoint.name} was not created with dedicated_endpoint_enabled.",
            )

    # --- requests ----------------------------------------------------------------------------
    def gate(self, action: str, name: str | None, dedicated_for: str | None) -> None:
        """Which host may serve a request: a dedicated endpoint's predictions on its DNS only, and nothing else there."""
        e = self.emulator
        if dedicated_for is not None:
            if action not in PREDICTION_ACTIONS or name is None or _endpoint_id(name) != dedicated_for:
                raise ApiError("NOT_FOUND", f"The dedicated DNS of endpoint {dedicated_for} serves only its prediction routes, not {action} of {name}.")
            return
        if action not in PREDICTION_ACTIONS or name is None:
            return
        with e.lock:
            endpoint = e._endpoint(name)
            dedicated, dns = endpoint.dedicated_endpoint_enabled, endpoint.dedicated_endpoint_dns
        if dedicated:
            raise ApiError("FAILED_PRECONDITION", SHARED_HOST_REFUSAL.format(dns=dns))

    def _model_of(self, name: str, deployed_model_id: str):
        e = self.emulator
        with e.lock:
            deployed = next((d for d in e._endpoint(name).deployed_models if d.id == deployed_model_id), None)
            if deployed is None:
                raise ApiError("NOT_FOUND", f"Deployed model {deployed_model_id} not found on {name}.")
            return e._model(f"{deployed.model}@{deployed.model_version_id}")

    def check_predict(self, name: str, deployed_model_id: str) -> None:
        """:predict, :rawPredict, :streamRawPredict, directRawPredict: off for an invoke-enabled model."""
        if self._model_of(name, deployed_model_id).container_spec.invoke_route_prefix:
            raise ApiError(
                "FAILED_PRECONDITION",
                f"Deployed model {deployed_model_id} sets container_spec.invoke_route_prefix: only its invoke route serves it, not predict routes.",
            )

    def check_invoke(self, name: str, deployed_model_id: str, route: str) -> None:
        """deployedModels/{id}/invoke/**: an invoke-enabled model, and a path below the root."""
        if not self._model_of(name, deployed_model_id).container_spec.invoke_route_prefix:
            raise ApiError(
                "FAILED_PRECONDITION",
                f"Invoke is not enabled for deployed model {deployed_model_id}: its Model was uploaded without container_spec.invoke_route_prefix.",
            )
        if route.strip("/") == "":
            raise ApiError("INVALID_ARGUMENT", "The invoke route must name a path below the root: the root of the model server is not exposed.")
