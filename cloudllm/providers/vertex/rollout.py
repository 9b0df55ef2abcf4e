"""Moving traffic on an endpoint: one deploy at a time (the lock label), a canary's bake and check, the split."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed
from cloudllm.providers.kit import pause
from cloudllm.providers.vertex.checks import CANARY_SAMPLES_MAX, canary_bake_seconds, sample_body
from cloudllm.providers.vertex.invoke import predict_kwargs, vertex_request
from cloudllm.providers.vertex.labels import LOCK_LABEL, LOCK_STALE_SECONDS, lock_time, with_tags
from cloudllm.providers.vertex.session import RETRY_INITIAL, api_message, transient_retry

if TYPE_CHECKING:
    from cloudllm.plan import Plan


class VertexRollout:
    """The lock, the canary and the traffic split of an update."""

    @contextmanager
    def _changing(self, endpoint_name: str, plan: "Plan") -> Iterator[None]:
        """Hold the endpoint's lock label while updating it: one deploy at a time, across machines.

        The label is set with the endpoint's etag (Vertex's read-modify-write guard), so of two
        deploys that read the endpoint at once only one sets it; the other stops, clearly, before
        creating anything. A lock older than LOCK_STALE_SECONDS, or --force, is taken over.
        Releasing it after a successful update also sets the endpoint's labels to the plan's tags.
        """
        from google.api_core import exceptions
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        c = self.clients()
        name = plan.spec.name
        token = f"{self._run_token()}-{int(time.time())}"
        busy = DeployFailed(
            f"endpoint {name} is being changed by another deploy",
            "wait for it to finish, then deploy again (if none is running because one was killed, deploy again with --force)",
        )
        current = c.endpoints.get_endpoint(name=endpoint_name)
        held = current.labels.get(LOCK_LABEL, "")
        if held and not plan.spec.options.get("force") and time.time() - lock_time(held) < LOCK_STALE_SECONDS:
            raise busy
        mask = field_mask_pb2.FieldMask(paths=["labels"])
        try:
            c.endpoints.update_endpoint(
                endpoint=v1.Endpoint(name=endpoint_name, labels={**current.labels, LOCK_LABEL: token}, etag=current.etag),
                update_mask=mask,
                retry=transient_retry(),
            )
        except (exceptions.Aborted, exceptions.FailedPrecondition, exceptions.Conflict):
            # Someone changed the endpoint since we read it -- or our own retried write did.
            if c.endpoints.get_endpoint(name=endpoint_name).labels.get(LOCK_LABEL) != token:
                raise busy from None
        updated = False
        try:
            yield
            updated = True
        finally:
            try:
                now = c.endpoints.get_endpoint(name=endpoint_name)
                if now.labels.get(LOCK_LABEL) == token:
                    labels = {k: v for k, v in now.labels.items() if k != LOCK_LABEL}
                    if updated:  # the tags as the plan declares them (apply --prune finds its endpoints by them)
                        labels = with_tags(labels, plan.spec.tags)
                    c.endpoints.update_endpoint(endpoint=v1.Endpoint(name=endpoint_name, labels=labels, etag=now.etag), update_mask=mask, retry=transient_retry())
            except exceptions.GoogleAPICallError:
                pass  # the lock goes stale; --force takes it over

    def _canary(self, plan: "Plan", endpoint: str, new_id: str, old_id: str, pct: int, reporter: Reporter) -> None:
        """PCT% of the traffic on the new version, a bake period, then sample requests it must answer; DeployFailed if not."""
        self._set_traffic(endpoint, {new_id: pct, old_id: 100 - pct})
        wait = canary_bake_seconds(plan)
        reporter.step(f"canary: {pct}% of the traffic on the new version ({new_id}), {100 - pct}% on {old_id}; baking {wait}s")
        if wait:
            pause(wait, what=f"canary: {pct}% on the new version", reporter=reporter)
        problem = self._canary_problem(plan, endpoint, new_id, pct)
        if problem:
            raise DeployFailed(
                f"the canary of {plan.spec.name} failed: {problem}",
                f"the traffic goes back to {old_id} and the new version is removed; see its log in Cloud Logging "
                f"(`cloudllm logs {plan.spec.name}`), fix it and deploy again",
            )
        reporter.step("canary: the new version answered; moving the rest of the traffic to it")

    def _canary_problem(self, plan: "Plan", endpoint: str, new_id: str, pct: int) -> str | None:
        """Why the new deployed model fails its check, or None: sample requests until one it serves succeeds.

        Vertex AI cannot address one deployed model, so the requests go to the endpoint, which
        gives the new version PCT% of them. A server error fails the check; an answer of 4xx (the
        sample does not fit this model's task) shows a server that answers, so it passes.
        """
        from google.api_core import exceptions, retry

        kwargs = predict_kwargs(endpoint, vertex_request(sample_body(plan), plan.runtime))
        throttled = retry.Retry(
            predicate=retry.if_exception_type(exceptions.TooManyRequests), initial=RETRY_INITIAL, maximum=5.0, timeout=20.0
        )
        attempts = min(CANARY_SAMPLES_MAX, math.ceil(100 / pct) * 5)
        elsewhere = 0
        for _ in range(attempts):
            try:
                response = self.clients().predictions.predict(**kwargs, retry=throttled)
            except (exceptions.InvalidArgument, exceptions.BadRequest):
                continue
            except (exceptions.GoogleAPICallError, exceptions.RetryError) as exc:
                return f"a sample request failed: {api_message(exc, 300)}"
            if response.deployed_model_id == new_id:
                return None
            elsewhere += 1
        if elsewhere:
            return f"none of {attempts} sample requests reached the new version ({elsewhere} went to the old one)"
        return None

    def _set_traffic(self, endpoint: str, split: dict[str, int]) -> None:
        from google.cloud import aiplatform_v1 as v1
        from google.protobuf import field_mask_pb2

        self.clients().endpoints.update_endpoint(
            endpoint=v1.Endpoint(name=endpoint, traffic_split=split),
            update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
            retry=transient_retry(),  # setting a traffic split twice is the same as once
        )
