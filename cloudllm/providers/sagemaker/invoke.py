"""Invoking a SageMaker endpoint (whole answers and streams) and reading its CloudWatch logs."""

from __future__ import annotations

import json
from typing import Any, Iterator

from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.kit import SYSTEM_CLOCK, Backoff
import cloudllm.providers.sagemaker.resources as res
from cloudllm.providers.sagemaker.session import DENIED, NOT_FOUND, aws_error, gone_already
from cloudllm.types import Waking

FOLLOW_BACKOFF = Backoff(first=1.0, growth=1.5, floor=1.0, most=10.0)  # `logs --follow`: new lines within seconds


def log_group(name: str) -> str:
    return f"/aws/sagemaker/Endpoints/{name}"


def as_events(lines: Iterator[str]) -> Iterator[str]:
    """TGI sends `data:{json}` lines; LMI sends bare JSON lines. Read both as server-sent events."""
    for line in lines:
        stripped = line.strip()
        yield f"data:{stripped}" if stripped.startswith("{") else line


def needs_component(exc) -> bool:
    """SageMaker's answer to a request without InferenceComponentName on an endpoint of inference components."""
    code, message = aws_error(exc)
    return code == "ValidationError" and "Inference Component Name header is required" in message


class SageMakerInvoke:
    """invoke, invoke_stream and logs of a SageMakerProvider."""

    # --- invoking -------------------------------------------------------------------------
    def invoke(self, name: str, body: dict, *, model: str | None = None) -> Any:
        from botocore.exceptions import ClientError, ConnectTimeoutError, ReadTimeoutError

        from cloudllm import http

        self._session()
        lookup = False
        while True:
            target, sent = self._invoke_target(name, body, model, lookup=lookup)
            try:
                response = self._runtime_client(http.ASKED_TIMEOUT).invoke_endpoint(
                    EndpointName=name, Body=json.dumps(sent).encode(), ContentType="application/json", Accept="application/json", **target
                )
                data = response["Body"].read()
                break
            except ClientError as exc:
                if not lookup and not target and needs_component(exc):
                    lookup = True  # an endpoint of inference components this machine has no record of
                    continue
                raise self._invoke_error(name, exc, target) from None
            except (ReadTimeoutError, ConnectTimeoutError):
                raise http.timed_out(name) from None
        try:
            return json.loads(data)
        except ValueError:
            return data.decode("utf-8", errors="replace")

    def invoke_stream(self, name: str, body: dict, *, model: str | None = None) -> Iterator[str]:
        """Tokens as TGI, LMI or the generated server send them; the whole answer at once from the HF
        inference toolkit (handler runtime on the HF PyTorch DLC), which cannot stream and refuses "stream": true."""
        from botocore.exceptions import ClientError

        from cloudllm.invocation import answer_end, iter_sse_tokens, response_text, split_lines

        self._session()
        if self._runs_toolkit(name):
            result = self.invoke(name, {k: v for k, v in body.items() if k != "stream"}, model=model)
            text = response_text(result)
            yield text if text is not None else json.dumps(result, ensure_ascii=False)
            end = answer_end(result)
            if end is not None:  # how the whole answer ended (a chat's finish_reason and usage, TGI's details)
                yield end
            return
        target, body = self._invoke_target(name, body, model)  # _runs_toolkit found out whether it has components
        try:
            response = self._client("sagemaker-runtime").invoke_endpoint_with_response_stream(
                EndpointName=name, Body=json.dumps({**body, "stream": True}).encode(), ContentType="application/json", **target
            )

            def parts() -> Iterator[bytes]:
                for event in response["Body"]:
                    if "PayloadPart" in event:
                        yield event["PayloadPart"]["Bytes"]

            yield from iter_sse_tokens(as_events(split_lines(parts())))
        except ClientError as exc:  # botocore.exceptions.EventStreamError is one too (ModelStreamError)
            raise self._invoke_error(name, exc, target) from None

    def _runtime_client(self, timeout: float | None):
        """The sagemaker-runtime client; given `invoke --timeout`, one that waits that long for the answer and
        does not send the request again when it passes (botocore would retry a read timeout, each try the full wait)."""
        if timeout is None:
            return self._client("sagemaker-runtime")
        from botocore.config import Config

        from cloudllm import __version__

        config = Config(
            read_timeout=timeout, connect_timeout=min(5.0, timeout), retries={"mode": "standard", "total_max_attempts": 1},
            user_agent_extra=f"cloudllm/{__version__}",
        )  # fmt: skip
        return self._session().client("sagemaker-runtime", config=config)

    def _runs_toolkit(self, name: str) -> bool:
        """The endpoint's container is an HF PyTorch inference DLC (read from the model it runs)."""
        from botocore.exceptions import ClientError

        with self._aws(f"read endpoint {name}"):
            try:
                desc = self._describe_endpoint(name)
                if desc is None:
                    raise UserError(f"SageMaker endpoint {name} does not exist in {self.region}", "see `cloudllm list --provider sagemaker`")
                config = self._sm.describe_endpoint_config(EndpointConfigName=desc["EndpointConfigName"])
                if not config["ProductionVariants"][0].get("ModelName"):  # inference components: the first model's image
                    return res.runs_toolkit((self._layout(name) or {}).get("image") or "")
                model = self._sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
            except ClientError as exc:
                if not (gone_already(exc) or aws_error(exc)[0] in DENIED):
                    raise
                # Credentials that may only invoke, or a config deleted under the endpoint: the stream call says what is wrong.
                return False
        return res.runs_toolkit((model.get("PrimaryContainer") or {}).get("Image", ""))

    def _invoke_error(self, name: str, exc, target: dict | None = None) -> Exception:
        from cloudllm.http import endpoint_error

        code, message = aws_error(exc)
        error = exc.response.get("Error", {})
        component = (target or {}).get("InferenceComponentName")
        if code == "ValidationError" and "no capacity" in message:
            return Waking(f"inference component {component or name} has no copies")
        if code == "ValidationError" and component and "not found" in message:
            return UserError(
                f"endpoint {name} has no inference component {component} (the model or adapter asked for)",
                f"see `cloudllm adapters list {name}` and the models it was deployed with (--model)",
            )
        if code == "ModelError":
            status = exc.response.get("OriginalStatusCode") or error.get("OriginalStatusCode") or 500
            return endpoint_error(name, int(status), exc.response.get("OriginalMessage") or error.get("OriginalMessage") or message)
        if code in ("ModelStreamError", "InternalStreamFailure"):
            return DeployFailed(f"endpoint {name} failed mid-stream: {message}", f"see CloudWatch log group {log_group(name)}")
        if code == "ValidationError" and any(s in message for s in NOT_FOUND):
            return UserError(f"SageMaker endpoint {name} does not exist in {self.region}", "see `cloudllm list --provider sagemaker`")
        if code == "ModelNotReadyException":
            return DeployFailed(f"endpoint {name} is not ready: {message}", f"wait for it (`cloudllm status {name}`)")
        if code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"):
            return UserError(f"AWS refused to invoke {name}: {message}", "check your credentials and their sagemaker:InvokeEndpoint permission")
        return DeployFailed(f"invoking endpoint {name} failed ({code}): {message}", f"see CloudWatch log group {log_group(name)}")

    def logs(self, name: str, *, follow: bool = False, since: float | None = None) -> Iterator[str]:
        """The endpoint's CloudWatch log lines (since a Unix time); with follow, keep polling for new ones."""
        from botocore.exceptions import ClientError

        self._session()
        group = log_group(name)
        client = self._client("logs")
        start = int((since or 0) * 1000)
        seen: set[str] = set()
        quiet = FOLLOW_BACKOFF.delays()
        while True:
            new = []
            with self._aws(f"read the logs of {name}"):
                try:
                    for page in client.get_paginator("filter_log_events").paginate(logGroupName=group, startTime=start):
                        new.extend(e for e in page.get("events", []) if e["eventId"] not in seen)
                except ClientError as exc:
                    if aws_error(exc)[0] != "ResourceNotFoundException":
                        raise
                    raise UserError(f"endpoint {name} has no logs yet ({group} does not exist)", "logs appear once an instance has started") from None
            for event in sorted(new, key=lambda e: (e["timestamp"], e["eventId"])):
                seen.add(event["eventId"])
                start = max(start, event["timestamp"])
                yield event["message"].rstrip("\n")
            if not follow:
                return
            if new:  # lines are coming: poll quickly again
                quiet = FOLLOW_BACKOFF.delays()
            SYSTEM_CLOCK.sleep(next(quiet))
