"""Reaching Vertex AI: the project, the REST clients, retries of transient faults, waiting on operations, errors as one line."""

from __future__ import annotations

import functools
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.kit import Backoff, Pending, create_once, delete_unless_gone, wait_until
from cloudllm.retries import RETRY_SECONDS_ENV, retry_seconds

API_ENDPOINT_ENV = "CLOUDLLM_VERTEX_ENDPOINT"
DEFAULT_REGION = "us-central1"
RETRY_INITIAL, RETRY_MAX = 0.5, 30.0  # seconds: capped exponential backoff, jittered


# --- helpers -------------------------------------------------------------------------------------
@dataclass
class Clients:
    endpoints: Any
    models: Any
    predictions: Any

    @classmethod
    def create(cls, region: str, base_url: str | None) -> "Clients":
        from google.cloud import aiplatform_v1 as v1

        kwargs = client_kwargs(region, base_url)
        from google.auth.exceptions import DefaultCredentialsError

        try:
            return cls(Retrying(v1.EndpointServiceClient(**kwargs)), Retrying(v1.ModelServiceClient(**kwargs)), v1.PredictionServiceClient(**kwargs))
        except DefaultCredentialsError as exc:
            raise UserError(
                f"no Google Cloud credentials: {str(exc).splitlines()[0]}",
                "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
            ) from None


def client_kwargs(region: str, base_url: str | None = None) -> dict[str, Any]:
    """What every Vertex client (v1 or v1beta1) is built with: REST, our user agent, the region's host or the emulator."""
    from google.api_core.client_options import ClientOptions
    from google.api_core.gapic_v1.client_info import ClientInfo

    from cloudllm import __version__

    base_url = base_url if base_url is not None else os.environ.get(API_ENDPOINT_ENV)
    kwargs: dict[str, Any] = {"transport": "rest", "client_info": ClientInfo(user_agent=f"cloudllm/{__version__}")}
    if base_url:
        from google.auth.credentials import AnonymousCredentials

        kwargs.update(credentials=AnonymousCredentials(), client_options=ClientOptions(api_endpoint=base_url.rstrip("/")))
    else:
        kwargs["client_options"] = ClientOptions(api_endpoint=f"{region}-aiplatform.googleapis.com")
    return kwargs


def transient_retry(*, refused_only: bool = False):
    """google-api-core's Retry for transient faults: throttling, 5xx, dropped or timed-out connections.

    Capped exponential backoff with jitter (api-core randomizes each sleep). The Vertex clients
    retry nothing by default; reads and idempotent calls get this, creates go through send_once.
    refused_only: only what the service refused before doing anything (429, 503), for a predict
    that must not run twice because an answer was lost.
    """
    import requests
    from google.api_core import exceptions, retry

    if refused_only:
        return retry.Retry(
            predicate=retry.if_exception_type(exceptions.TooManyRequests, exceptions.ServiceUnavailable),
            initial=RETRY_INITIAL, maximum=5.0, multiplier=2.0, timeout=20.0,  # an interactive call: not for long
        )  # fmt: skip
    transient = retry.if_exception_type(
        exceptions.TooManyRequests, exceptions.InternalServerError, exceptions.BadGateway, exceptions.ServiceUnavailable,
        exceptions.GatewayTimeout, requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
        requests.exceptions.Timeout,
    )  # fmt: skip
    return retry.Retry(predicate=transient, initial=RETRY_INITIAL, maximum=RETRY_MAX, multiplier=2.0, timeout=retry_seconds())


def send_once(send, *, find):
    """A non-idempotent call (a create), retried on transient faults without doing it twice.

    Before sending again, find() looks for what an earlier attempt made (its answer lost on the
    way back) and returns it instead; a find that finds nothing leaves it to the service to refuse
    the repeat (ALREADY_EXISTS for a client-chosen id), which the caller handles.
    """
    return create_once(send, find=find, retry=transient_retry())


def unless_gone(call, **kwargs):
    """A delete or undeploy, retried; NOT_FOUND means done (an earlier attempt did it). Returns its operation, or None."""
    from google.api_core import exceptions

    return delete_unless_gone(lambda: call(**kwargs, retry=transient_retry()), gone=lambda exc: isinstance(exc, exceptions.NotFound))


class Retrying:
    """A Vertex client whose reads (get_*, list_*) retry transient faults; everything else as is."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name.startswith(("get_", "list_")) and callable(attr):
            return functools.partial(attr, retry=transient_retry())
        return attr


def api_message(exc: BaseException, limit: int) -> str:
    """An API error's first line, without the "POST http://...: " the REST transport puts before it."""
    text = str(getattr(exc, "message", None) or exc).splitlines()[0]
    return re.sub(r"^(GET|POST|PATCH|PUT|DELETE) \S+: ", "", text)[:limit]


def invoke_error(name: str, exc) -> UserError:
    from google.api_core import exceptions

    message = api_message(exc, 300)
    if isinstance(exc, (exceptions.InvalidArgument, exceptions.BadRequest, exceptions.NotFound)):
        return UserError(f"endpoint {name} rejected the request: {message}", "fix the request body or parameters")
    return DeployFailed(f"endpoint {name} failed: {message}", "see the endpoint's logs in Cloud Logging")


def deploy_error(exc: BaseException, name: str, after: str | None = None) -> BaseException:
    """One line for a failed Vertex call; Ctrl-C and our own errors pass through unchanged."""
    from google.api_core import exceptions

    if isinstance(exc, UserError) or not isinstance(exc, (exceptions.GoogleAPICallError, exceptions.RetryError)):
        return exc
    message = api_message(exc, 500)
    prefix = f"{after}: " if after else ""
    if isinstance(exc, (exceptions.InvalidArgument, exceptions.BadRequest, exceptions.FailedPrecondition)):
        return DeployFailed(f"{prefix}Vertex AI refused the deploy of {name}: {message}", "fix the setting it names and deploy again")
    if isinstance(exc, (exceptions.PermissionDenied, exceptions.Unauthenticated, exceptions.Forbidden)):
        return UserError(
            f"{prefix}Vertex AI denied access: {message}", "check --project and that your account has roles/aiplatform.user"
        )
    return DeployFailed(f"{prefix}deploying {name} on Vertex AI failed: {message}", "deploy again, or see the Vertex AI console")


class VertexSession:
    """The project, region and clients of a VertexProvider, and its waits on operations."""

    # --- settings -------------------------------------------------------------------------
    @property
    def project(self) -> str:
        """--project, GOOGLE_CLOUD_PROJECT, or the project of Application Default Credentials."""
        project = self.options.get("project") or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
        if not project and not os.environ.get(API_ENDPOINT_ENV):
            try:
                import google.auth

                _, project = google.auth.default()
            except Exception:  # no ADC at all: the error below says what to do
                project = None
        if not project:
            raise UserError("no Google Cloud project given", "pass --project PROJECT or set GOOGLE_CLOUD_PROJECT")
        if self.options.get("project") != project:
            self.record_options(project=project)  # kept in the endpoint record, so invoke/delete need no flag
        return project

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    @property
    def api_base(self) -> str:
        return os.environ.get(API_ENDPOINT_ENV, "").rstrip("/") or f"https://{self.region}-aiplatform.googleapis.com"

    def clients(self) -> "Clients":
        if self._clients is None:
            self._clients = Clients.create(self.region, os.environ.get(API_ENDPOINT_ENV))
        return self._clients

    # --- waiting ----------------------------------------------------------------------------
    def _wait(self, op, what: str, deadline_s: float, reporter: Reporter, *, fix: str | None = None):
        """Poll an operation until done or our deadline passes: 0.1 s at first, then up to every 15 s.

        A sleep never exceeds max(0.5 s, a tenth of the time waited): the overshoot past the
        operation's end stays small.

        A failed operation raises DeployFailed with `fix`; without one, the API error itself.
        """
        from google.api_core import exceptions

        wait_until(
            lambda: True if op.done(retry=transient_retry()) else Pending("running"), what=what, deadline=deadline_s, reporter=reporter,
            late=lambda _: (f"{what} did not finish within {deadline_s:.0f}s (operation {op.operation.name}); it goes on in Vertex AI", ""),
        )  # fmt: skip
        try:
            return op.result(timeout=0)
        except exceptions.GoogleAPICallError as exc:
            if fix is None:
                raise
            message = api_message(exc, 500)
            raise DeployFailed(f"{what} failed: {message}", fix) from None

    def _wait_listed(self, endpoint: str, deployed_id: str, what: str, deadline_s: float, reporter: Reporter) -> None:
        """Wait for a deployment whose operation we lost (its DeployModel answer was dropped): poll the endpoint."""
        wait_until(
            lambda: True if deployed_id in {d.id for d in self.clients().endpoints.get_endpoint(name=endpoint).deployed_models} else Pending("deploying"),
            what=what, deadline=deadline_s, reporter=reporter, backoff=Backoff(first=0.5),
            late=lambda _: (f"{what} did not finish within {deadline_s:.0f}s (deployed model {deployed_id}); it may go on in Vertex AI", ""),
        )  # fmt: skip

    # --- reading ------------------------------------------------------------------------
    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Look-ups (status, list, logs, delete's search): an unreachable or refusing API is one line, not a traceback."""
        import requests
        from google.api_core import exceptions

        try:
            yield
        except (exceptions.PermissionDenied, exceptions.Unauthenticated, exceptions.Forbidden) as exc:
            message = api_message(exc, 300)
            raise UserError(f"Vertex AI denied access to {what}: {message}", "check --project and that your account has roles/aiplatform.user") from None
        except (exceptions.GoogleAPICallError, exceptions.RetryError) as exc:
            if isinstance(getattr(exc, "cause", None), requests.exceptions.ConnectionError):
                raise self._unreachable(what) from None  # retried until the budget ran out
            message = api_message(exc, 300)
            raise DeployFailed(f"Vertex AI could not {what}: {message}", "run the same command again, or see the Vertex AI console") from None
        except requests.exceptions.ConnectionError:  # the REST transport's connection failures are not api_core errors
            raise self._unreachable(what) from None

    def _unreachable(self, what: str) -> DeployFailed:
        return DeployFailed(
            f"cannot reach Vertex AI at {self.api_base} to {what} (retried for {retry_seconds():.0f}s)",
            f"check the network, --region and {API_ENDPOINT_ENV}; {RETRY_SECONDS_ENV} sets how long to retry",
        )
