"""The protocol routes an endpoint offers (`cloudllm status`): native, OpenAI-compatible, gRPC, and the proxy.

Each route is what cloudllm itself sends on that platform and runtime (the same requests invoke,
chat and the proxy make), so what status shows is what the tests exercise.
"""

from __future__ import annotations

from typing import Any

from cloudllm.types import Endpoint

PROXY_PORT = 8000  # `cloudllm proxy`'s default --port


def protocol_routes(ep: Endpoint) -> list[dict[str, Any]]:
    """One dict per protocol: {"protocol", "available", "route", "how"}; an unavailable one says why in "how"."""
    runtime = ep.runtime or "handler"
    where = "" if ep.provider == "local" else f" --provider {ep.provider}"
    proxy = {
        "protocol": "proxy", "available": True, "route": f"http://127.0.0.1:{PROXY_PORT}/v1",
        "how": f"cloudllm proxy {ep.name}{where} --port {PROXY_PORT}: an OpenAI base URL on this machine, signed for the platform",
    }  # fmt: skip
    if ep.provider == "local":
        grpc_port = ep.details.get("grpc_port")
        return [
            _route("native", f"{ep.url}/generate", "TGI's {\"inputs\", \"parameters\"}; /generate_stream streams server-sent events"),
            _route("openai", f"{ep.url}/v1", "an OpenAI base URL: /chat/completions, /completions, /models"),
            _route("grpc", f"127.0.0.1:{grpc_port}", "the Open Inference Protocol v2 (inference.GRPCInferenceService): invoke --grpc, tritonclient")
            if grpc_port else _unavailable("grpc", "started before cloudllm served gRPC: deploy it again"),
            proxy,
        ]  # fmt: skip
    if ep.provider == "sagemaker":
        from cloudllm.providers.sagemaker.provider import SageMakerProvider
        from cloudllm.providers.base import Feature

        return [
            _route("native", ep.url, "InvokeEndpoint (SigV4) with {\"inputs\", \"parameters\"}; InvokeEndpointWithResponseStream streams"),
            _route("openai", ep.url, f"InvokeEndpoint with OpenAI's chat body {{\"messages\": [...]}} ({_SAGEMAKER_CHAT.get(runtime, runtime)}); "
                                     "SigV4-signed, so OpenAI clients go through the proxy"),  # fmt: skip
            _unavailable("grpc", SageMakerProvider.unsupported.get(Feature.GRPC, "no gRPC route")),
            proxy,
        ]
    if ep.provider == "vertex":
        endpoint = ep.details.get("endpoint", "")
        region = endpoint.split("/locations/")[1].split("/")[0] if "/locations/" in endpoint else "REGION"
        grpc = (
            _route("grpc", f"{region}-aiplatform.googleapis.com:443",
                   f"PredictionService.DirectRawPredict / StreamDirectRawPredict of {endpoint or 'the endpoint'}, method "
                   "/inference.GRPCInferenceService/ModelInfer (ModelStreamInfer): forwarded to the model's grpcPorts; invoke --grpc")
            if runtime == "handler" else _unavailable("grpc", f"{runtime}'s server speaks no Open Inference Protocol gRPC; deploy --runtime handler")
        )  # fmt: skip
        stream = "streamRawPredict streams" if runtime != "tgi" else "TGI's Vertex route cannot stream"
        return [
            _route("native", ep.url, f"predict with {{\"instances\": [...]}} (ADC token); {stream}"),
            _route("openai", ep.url, f"predict with {_VERTEX_CHAT.get(runtime, 'a chat instance')}; OpenAI clients go through the proxy"),
            grpc,
            proxy,
        ]
    return [proxy]  # a plugin's provider: the proxy signs through its invoke


_SAGEMAKER_CHAT = {
    "handler": "cloudllm's server answers it as /v1/chat/completions",
    "tgi": "TGI's Messages API",
    "vllm": "LMI's chat schema",
}
_VERTEX_CHAT = {
    "handler": "a chatCompletions instance {\"@requestFormat\": \"chatCompletions\", \"messages\": [...]}",
    "vllm": "a chatCompletions instance {\"@requestFormat\": \"chatCompletions\", \"messages\": [...]} (Model Garden's vLLM)",
    "tgi": "OpenAI's chat request as the instance (TGI's VertexInstance::Chat)",
}


def _route(protocol: str, route: str | None, how: str) -> dict[str, Any]:
    return {"protocol": protocol, "available": True, "route": route, "how": how}


def _unavailable(protocol: str, why: str) -> dict[str, Any]:
    return {"protocol": protocol, "available": False, "route": None, "how": why}


def route_lines(routes: list[dict[str, Any]]) -> list[str]:
    """status's text: one line per protocol, the route then how to use it."""
    lines = []
    for r in routes:
        lines.append(f"{r['protocol']:>9}: {r['route']}  ({r['how']})" if r["available"] else f"{r['protocol']:>9}: none: {r['how']}")
    return lines
