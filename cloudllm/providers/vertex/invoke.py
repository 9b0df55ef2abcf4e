"""Requests to a Vertex AI endpoint in each runtime's dialect (predict, streamRawPredict), and where its logs are."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Iterator
from urllib.parse import quote

from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.base import Endpoint
from cloudllm.providers.vertex.labels import deployed_model_id
from cloudllm.providers.vertex.session import API_ENDPOINT_ENV, invoke_error, transient_retry

PREDICT_ROUTE = "/predict"  # where our container takes predictions (AIP_PREDICT_ROUTE)

# Where the Vertex AI emulator serves PredictionService over gRPC (the REST API is at API_ENDPOINT_ENV):
# StreamDirectRawPredict is a bidirectional stream, which the REST transport cannot carry.
GRPC_ENDPOINT_ENV = "CLOUDLLM_VERTEX_GRPC_ENDPOINT"

# TGI-form generation parameters -> the Model Garden vLLM server's (vllm SamplingParams keyword arguments).
VLLM_PARAMETERS = {
    "max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
    "repetition_penalty": "repetition_penalty", "stop": "stop", "stop_sequences": "stop",
}  # fmt: skip


def logging_filter(endpoint_id: str, region: str, since: float | None = None) -> str:
    """The Cloud Logging filter for one Vertex AI endpoint's container logs."""
    parts = [
        'resource.type="aiplatform.googleapis.com/Endpoint"',
        f'resource.labels.endpoint_id="{endpoint_id}"',
        f'resource.labels.location="{region}"',
    ]
    if since is not None:
        stamp = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        parts.append(f'timestamp>="{stamp}"')
    return " AND ".join(parts)


def predict_url(api_base: str, endpoint: str) -> str:
    return f"{api_base}/v1/{endpoint}:predict"


_TGI_VERTEX_PARAMETERS = ("max_new_tokens", "seed")  # router/src/vertex.rs: the rest of an instance's parameters is dropped


def vertex_request(body: dict, runtime: str) -> dict:
    """The predict body for a runtime from our TGI-form body; a body with "instances" goes as is.

    handler: {"instances": [prompt], "parameters": {...}}; tgi (its Vertex route, which reads
    only max_new_tokens and seed, and samples): {"instances": [{"inputs", "parameters"}]}; vllm
    (the Model Garden server): {"instances": [{"prompt", "max_tokens", ..., "raw_response": true}]}:
    without raw_response it answers "Prompt:\n<prompt>\nOutput:\n<text>".
    """
    if "instances" in body:
        return {k: v for k, v in body.items() if k in ("instances", "parameters")}
    inputs = body.get("inputs")
    prompts = inputs if isinstance(inputs, list) else [inputs]
    parameters = dict(body.get("parameters") or {})
    if runtime == "tgi":
        ignored = sorted(k for k, v in parameters.items() if v is not None and k not in _TGI_VERTEX_PARAMETERS)
        if ignored:  # TGI's Vertex route would drop them without a word
            raise UserError(
                f"TGI's Vertex AI route ignores {', '.join(ignored)}: it always samples, reading only max_new_tokens and seed",
                "drop them, chat with --chat (TGI reads a chat request's parameters), or deploy with --runtime vllm or handler",
            )
        return {"instances": [{"inputs": p, **({"parameters": parameters} if parameters else {})} for p in prompts]}
    if runtime == "vllm":
        sampling = vllm_parameters(parameters)
        return {"instances": [{"prompt": p, **sampling, "raw_response": True} for p in prompts]}
    request: dict[str, Any] = {"instances": prompts}
    if parameters:
        request["parameters"] = parameters
    return request


def is_chat_request(body: dict) -> bool:
    """A body of chatCompletions instances (invocation.platform_chat_body's form for Vertex AI)."""
    instances = body.get("instances")
    return isinstance(instances, list) and any(isinstance(i, dict) and i.get("@requestFormat") == "chatCompletions" for i in instances)


def vllm_stream_request(body: dict) -> dict:
    """The Model Garden vLLM server's streaming body: one instance with "stream": true (it streams one prompt at a time)."""
    request = vertex_request(body, "vllm")
    instances = request.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        raise UserError("the vllm runtime streams one prompt at a time", "send one prompt, or invoke without --stream")
    return {"instances": [{**instances[0], "stream": True}]}


def with_dynamic_lora(request: dict, lora: str | None) -> dict:
    """The Model Garden vLLM server's request with its per-instance adapter (a gs:// folder), when one is asked for."""
    if lora is None:
        return request
    return {**request, "instances": [{**i, "dynamic-lora": lora} for i in request["instances"]]}


def vllm_parameters(parameters: dict) -> dict:
    """TGI-form generation parameters as vLLM sampling parameters: greedy unless asked to sample, as TGI and the handler."""
    params = {k: v for k, v in parameters.items() if v is not None}  # null means "not set", as the handler reads it
    sampling = params.pop("do_sample", None)
    unknown = sorted(set(params) - set(VLLM_PARAMETERS))
    if unknown:
        raise UserError(
            f"the vllm runtime takes no parameter {unknown[0]!r}", f"use {', '.join(sorted({*VLLM_PARAMETERS, 'do_sample'}))}"
        )
    if sampling is None:
        sampling = params.get("temperature", 1.0) != 1.0 or params.get("top_p", 1.0) < 1.0 or params.get("top_k", 0) > 0
    out = {VLLM_PARAMETERS[k]: v for k, v in params.items()}
    if not sampling:
        out["temperature"] = 0.0  # vLLM samples at temperature 1.0 unless told otherwise
        out.pop("top_p", None)
        out.pop("top_k", None)
    return out


def vllm_stream(name: str, url: str, body: dict, headers: dict) -> Iterator[str]:
    """The Model Garden vLLM server's stream: JSON objects {"predictions": [text since the last one]}, each ended by NUL."""
    import json

    import httpx

    from cloudllm.http import TIMEOUT, endpoint_error

    with httpx.stream("POST", url, json=body, headers=headers, timeout=TIMEOUT) as response:
        if response.status_code >= 400:
            response.read()
            raise endpoint_error(name, response.status_code, response.text)
        yield from vllm_frames(name, response.iter_bytes())


def vllm_frames(name: str, chunks: Iterator[bytes]) -> Iterator[str]:
    import json

    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *frames, buffer = buffer.split(b"\0")
        for frame in frames:
            if frame.strip():
                yield from vllm_pieces(name, json.loads(frame))
    if buffer.strip():
        yield from vllm_pieces(name, json.loads(buffer))


def vllm_pieces(name: str, frame: Any) -> Iterator[str]:
    pieces = frame.get("predictions") if isinstance(frame, dict) else None
    if not isinstance(pieces, list):
        raise DeployFailed(f"endpoint {name} streamed something that is not vLLM's: {str(frame)[:200]}", f"check its logs: cloudllm logs {name}")
    for piece in pieces[:1]:  # one prompt, one sequence
        if isinstance(piece, str) and piece:
            yield piece


def predict_kwargs(endpoint: str, request: dict) -> dict[str, Any]:
    """PredictionService.predict's arguments for a {"instances", "parameters"} body."""
    from google.protobuf import json_format, struct_pb2

    kwargs: dict[str, Any] = {"endpoint": endpoint, "instances": [json_format.ParseDict(i, struct_pb2.Value()) for i in request["instances"]]}
    if "parameters" in request:
        kwargs["parameters"] = json_format.ParseDict(request["parameters"], struct_pb2.Value())
    return kwargs


def grpc_prediction_client(region: str):
    """PredictionServiceClient over gRPC: the emulator's plain channel, or Google's with Application Default Credentials."""
    from google.cloud import aiplatform_v1 as v1

    address = os.environ.get(GRPC_ENDPOINT_ENV)
    if address:
        import grpc
        from google.cloud.aiplatform_v1.services.prediction_service.transports import PredictionServiceGrpcTransport

        return v1.PredictionServiceClient(transport=PredictionServiceGrpcTransport(channel=grpc.insecure_channel(address)))
    if os.environ.get(API_ENDPOINT_ENV):
        raise UserError(f"the Vertex AI API at {os.environ[API_ENDPOINT_ENV]} has no gRPC address", f"set {GRPC_ENDPOINT_ENV} as `cloudllm emulate vertex` prints it")
    from google.api_core.client_options import ClientOptions
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return v1.PredictionServiceClient(transport="grpc", client_options=ClientOptions(api_endpoint=f"{region}-aiplatform.googleapis.com"))
    except DefaultCredentialsError as exc:
        raise UserError(f"no Google Cloud credentials: {str(exc).splitlines()[0]}", "run `gcloud auth application-default login`") from None


class VertexInvoke:
    """invoke, invoke_stream and logs of a VertexProvider."""

    # --- invoke ---------------------------------------------------------------------------
    def logs(self, name: str, *, follow: bool = False, since: float | None = None) -> Iterator[str]:
        """Where the endpoint's logs are: the Cloud Logging filter, its console link and the gcloud command.

        Reading them here would need google-cloud-logging (and its gRPC stack) for one command;
        the filter is exact, so gcloud or the console show the same lines.
        """
        endpoint = self._find_endpoint(name)
        if endpoint is None:
            raise UserError(f"no Vertex AI endpoint named {name!r} in {self.parent}", "see `cloudllm list --provider vertex`")
        query = logging_filter(endpoint.name.rsplit("/", 1)[-1], self.region, since)
        yield f"Vertex AI keeps endpoint {name}'s model server log in Cloud Logging. Filter:"
        yield query
        yield "console: https://console.cloud.google.com/logs/query;query=" + quote(query, safe="") + f"?project={self.project}"
        if follow:
            yield f"follow: gcloud beta logging tail '{query}' --project {self.project}"
        else:
            yield f"read: gcloud logging read '{query}' --project {self.project} --order asc"

    def invoke(self, name: str, body: dict, *, model: str | None = None) -> Any:
        import json

        import requests
        from google.api_core import exceptions
        from google.protobuf import json_format

        from cloudllm import http

        endpoint = self._serving_endpoint(name)
        target = self._model_target(name, endpoint, model)
        if target is None and endpoint.runtime == "vllm" and is_chat_request(body):
            return self._raw_predict(name, endpoint, body)
        body, lora = self._dynamic_lora(name, endpoint, body)  # models.py: vllm's adapter rides as "dynamic-lora"
        request = with_dynamic_lora(vertex_request(body, endpoint.runtime or "handler"), lora)
        if target is not None:  # an added model: straight to its deployed model
            answer = json.loads(b"".join(self._invoke_deployed(name, endpoint, target, request, stream=False)))
            # our server names who answered (AIP_DEPLOYED_MODEL_ID); an engine's raw answer does not
            return {"predictions": answer.get("predictions", []), "deployed_model_id": answer.get("deployedModelId") or target}
        if endpoint.details.get("dedicated"):  # the shared host refuses a dedicated endpoint's requests
            return self._dedicated_predict(name, endpoint, request)
        kwargs = predict_kwargs(endpoint.details["endpoint"], request)
        # At zero a 429 is the wake (cloudllm.api waits through it), not throttling to retry here.
        retry = None if endpoint.details.get("scale_to_zero") else transient_retry(refused_only=True)
        if http.ASKED_TIMEOUT is not None:  # `invoke --timeout`: the REST transport's wait for the answer
            kwargs["timeout"] = http.ASKED_TIMEOUT
        try:
            response = self.clients().predictions.predict(**kwargs, retry=retry)
        except exceptions.GoogleAPICallError as exc:
            raise self._waking(name, endpoint, invoke_error(name, exc) if not isinstance(exc, exceptions.TooManyRequests) else exc) from None
        except requests.exceptions.Timeout:
            raise http.timed_out(name) from None
        result = json_format.MessageToDict(type(response).pb(response))
        return {"predictions": result.get("predictions", []), "deployed_model_id": response.deployed_model_id}

    def invoke_stream(self, name: str, body: dict, *, model: str | None = None) -> Iterator[str]:
        """streamRawPredict with our own HTTP client (the SDK's raw_predict hard-codes Google's host), in the body each engine takes."""
        import httpx

        endpoint = self._serving_endpoint(name)
        target = self._model_target(name, endpoint, model)
        runtime = endpoint.runtime or "handler"
        if runtime == "tgi":
            raise UserError(
                f"endpoint {name} runs TGI, whose Vertex AI route answers whole predictions only and cannot stream",
                "invoke without --stream, or deploy with --runtime vllm or --runtime handler to stream",
            )
        url = f"{self._prediction_base(name, endpoint)}/v1/{endpoint.details['endpoint']}:streamRawPredict"
        if target is not None:
            yield from self._stream_deployed(name, endpoint, target, runtime, body)
            return
        try:
            if runtime == "vllm":
                body, lora = self._dynamic_lora(name, endpoint, body)
                request = with_dynamic_lora(vllm_stream_request(body), lora)
                yield from self._wake_guard(name, endpoint, vllm_stream(name, url, request, self._auth_headers()))
            else:
                from cloudllm.http import stream_tokens

                yield from self._wake_guard(name, endpoint, stream_tokens(name, url, {**body, "stream": True}, headers=self._auth_headers()))
        except httpx.TransportError as exc:
            raise DeployFailed(f"cannot reach {self.api_base}: {exc}", "check your network, or CLOUDLLM_VERTEX_ENDPOINT") from None

    def invoke_grpc(self, name: str, prompt: str, parameters: dict | None = None, *, stream: bool = False) -> Iterator[str]:
        """The Open Inference Protocol v2 through DirectRawPredict (StreamDirectRawPredict with stream).

        Vertex AI forwards their bytes to the gRPC method they name on the first port of the model's
        grpcPorts (aiplatform_v1 ModelContainerSpec.grpc_ports: "Vertex AI sends gRPC prediction
        requests that it receives to the first port on this list"), which the handler's server declares.
        """
        from google.api_core import exceptions
        from google.cloud import aiplatform_v1 as v1

        from cloudllm.invocation import oip_generate

        endpoint = self._serving_endpoint(name)
        runtime = endpoint.runtime or "handler"
        if runtime != "handler":
            raise UserError(
                f"endpoint {name} runs {runtime}, whose server speaks no Open Inference Protocol gRPC (only cloudllm's handler does)",
                "invoke without --grpc, or deploy with --runtime handler",
            )
        if endpoint.details.get("dedicated"):
            raise UserError(
                f"endpoint {name} is a dedicated endpoint, which Vertex AI serves only on its own DNS, where cloudllm sends no gRPC",
                "invoke without --grpc",
            )
        resource = endpoint.details["endpoint"]
        client = grpc_prediction_client(self.region)

        def send(method: str, payload: bytes, streamed: bool) -> Iterator[bytes]:
            try:
                if not streamed:
                    request = v1.DirectRawPredictRequest(endpoint=resource, method_name=method, input=payload)
                    yield client.direct_raw_predict(request=request, retry=transient_retry(refused_only=True)).output
                    return
                requests = iter([v1.StreamDirectRawPredictRequest(endpoint=resource, method_name=method, input=payload)])
                for answer in client.stream_direct_raw_predict(requests=requests):
                    yield answer.output
            except exceptions.FailedPrecondition as exc:
                raise UserError(f"endpoint {name} takes no gRPC: {exc.message}", f"redeploy it so its model declares grpcPorts: cloudllm deploy ... --name {name}") from None
            except exceptions.GoogleAPICallError as exc:
                raise invoke_error(name, exc) from None

        return oip_generate(name, send, prompt, parameters, stream=stream)

    def _raw_predict(self, name: str, endpoint: Endpoint, body: dict) -> Any:
        """rawPredict: the container's JSON as it answered, which predict's PredictResponse (a list of
        predictions) cannot carry when Model Garden's vLLM answers a chat as {"predictions": {completion}}."""
        import httpx

        from cloudllm.http import post_json

        try:
            return post_json(name, f"{self._prediction_base(name, endpoint)}/v1/{endpoint.details['endpoint']}:rawPredict", body, self._auth_headers())
        except httpx.TransportError as exc:
            raise DeployFailed(f"cannot reach {self.api_base}: {exc}", "check your network, or CLOUDLLM_VERTEX_ENDPOINT") from None

    def _prediction_base(self, name: str, endpoint: Endpoint) -> str:
        """Where this endpoint's predictions go: its dedicated DNS, or the API host."""
        from cloudllm.providers.vertex.routes import prediction_base

        dns = endpoint.details.get("dedicated_endpoint_dns")
        if endpoint.details.get("dedicated") and not dns:
            raise DeployFailed(f"endpoint {name} is dedicated but Vertex AI has not given it a DNS name yet", f"try again shortly; see `cloudllm status {name}`")
        return prediction_base(self.api_base, dns)

    def _dedicated_predict(self, name: str, endpoint: Endpoint, request: dict) -> Any:
        """:predict on the dedicated DNS, as JSON over HTTPS (what aiplatform's Endpoint.predict sends there):
        the generated PredictionServiceClient talks to the regional API host only."""
        import httpx

        from cloudllm import http

        url = f"{self._prediction_base(name, endpoint)}/v1/{endpoint.details['endpoint']}:predict"
        try:
            response = httpx.post(url, json=request, headers=self._auth_headers(), timeout=http.TIMEOUT)
        except httpx.TimeoutException:
            raise http.timed_out(name) from None
        except httpx.TransportError as exc:
            raise DeployFailed(f"cannot reach {url}: {exc}", "check your network, or the endpoint's dedicated DNS (cloudllm status)") from None
        if response.status_code == 429 and endpoint.details.get("scale_to_zero"):
            from cloudllm.providers.base import Waking

            raise Waking(f"{name} is scaled to zero and a replica is starting")
        if response.status_code >= 400:
            raise http.endpoint_error(name, response.status_code, response.text)
        answer = response.json()
        return {"predictions": answer.get("predictions", []), "deployed_model_id": answer.get("deployedModelId")}

    def _serving_endpoint(self, name: str) -> Endpoint:
        endpoint = self.get(name)
        if endpoint is None:
            raise UserError(f"no Vertex AI endpoint named {name!r} in {self.parent}", "see `cloudllm list --provider vertex`")
        if "deployed_model_id" not in endpoint.details:
            raise DeployFailed(f"endpoint {name} has no deployed model", "deploy it again with `cloudllm deploy` or delete it")
        return endpoint

    def _auth_headers(self) -> dict[str, str]:
        if os.environ.get(API_ENDPOINT_ENV):
            return {}
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        return {"Authorization": f"Bearer {credentials.token}"}
