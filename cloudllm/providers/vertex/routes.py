"""Where a request to a Vertex AI endpoint goes: the shared regional host or the endpoint's dedicated DNS,
and the container path an added model's invoke route reaches.

Vertex AI reaches one deployed model of an endpoint (rather than the traffic split's pick) only through
the invoke route, `POST {endpoint}/deployedModels/{id}/invoke/**` (REST reference v1
endpoints.deployedModels.invoke), and only where (docs: predictions/use-arbitrary-custom-routes):
- the Model was uploaded with `container_spec.invoke_route_prefix = "/*"` (the only value taken; then
  predict_route must be unset, and :predict/:rawPredict are off for that model), and
- the endpoint was created with `dedicated_endpoint_enabled`, whose requests go to its
  `dedicated_endpoint_dns`; the shared host then answers FAILED_PRECONDITION for all of them.
`/invoke/foo/bar` reaches the container as `/foo/bar`. There is no other per-deployed-model target on a
public endpoint (PredictRequest has no deployed model id), and dedicated_endpoint_enabled is set when
the endpoint is created, so an endpoint made without it cannot take an added model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloudllm.errors import UserError

if TYPE_CHECKING:
    from cloudllm.plan import Plan
    from cloudllm.providers.base import Endpoint

INVOKE_ROUTE_PREFIX = "/*"  # ModelContainerSpec.invoke_route_prefix: "/*" is the only supported value
# The container path an added model's requests take through invoke, per runtime: a path each server
# always serves, whatever AIP_PREDICT_ROUTE Vertex AI sets once predict_route is unset.
INVOKE_ROUTES = {
    "handler": "/invocations",  # cloudllm_runtime.app: the same handler as the Vertex predict route
    "tgi": "/vertex",  # TGI's router: base route of its {"instances": [...]} handler (vertex_compatibility)
    "vllm": "/generate",  # vllm.entrypoints.api_server
}
DEDICATED_OPTION = "dedicated_endpoint"


def invoke_route(runtime: str | None) -> str:
    return INVOKE_ROUTES.get(runtime or "handler", INVOKE_ROUTES["handler"])


def prediction_base(api_base: str, dedicated_dns: str | None) -> str:
    """The host predictions go to: the dedicated DNS where the endpoint has one (same scheme as the API's:
    https on Google, http for the emulator on loopback), else the API host."""
    if not dedicated_dns:
        return api_base
    scheme = api_base.split("://", 1)[0] if "://" in api_base else "https"
    return f"{scheme}://{dedicated_dns}"


def dedicated_details(endpoint) -> dict[str, Any]:
    """What `get` reports of an aiplatform_v1 Endpoint's DNS."""
    return {"dedicated": bool(endpoint.dedicated_endpoint_enabled), "dedicated_endpoint_dns": endpoint.dedicated_endpoint_dns or None}


def wants_dedicated(options) -> bool | None:
    """--option dedicated_endpoint as a bool ("true" from the command line included); None when not given."""
    from cloudllm.providers.vertex.options import VertexOptions

    value = options.get(DEDICATED_OPTION)
    return None if value is None else VertexOptions.model_validate({DEDICATED_OPTION: value}).dedicated_endpoint


def check_endpoint_kind(plan: "Plan", existing: "Endpoint | None", wanted: bool | None) -> None:
    """Refuse, before anything is created, what the existing endpoint cannot become: dedicated_endpoint_enabled
    is fixed when Vertex AI creates an endpoint, and an added model needs it."""
    if existing is None or "dedicated" not in existing.details:
        return
    name, dedicated = plan.spec.name, existing.details["dedicated"]
    if plan.spec.add_model and not dedicated:
        raise UserError(
            f"endpoint {name} was created without a dedicated DNS, and Vertex AI reaches an added model ({plan.spec.add_model}) only through "
            "the invoke route of a dedicated endpoint, which an endpoint cannot become once created",
            f"delete it (cloudllm delete {name}) and deploy its first model again with --option {DEDICATED_OPTION}=true, then --add-model",
        )
    if wanted is not None and wanted != dedicated:
        raise UserError(
            f"endpoint {name} {'has no' if not dedicated else 'has a'} dedicated DNS, and Vertex AI fixes that when it creates an endpoint",
            f"drop --option {DEDICATED_OPTION}, or delete {name} (cloudllm delete {name}) and deploy it again with the option you want",
        )
