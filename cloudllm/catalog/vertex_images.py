"""Serving images for Vertex AI, one per runtime, with where each URI was read and when.

Override any of them per deploy with `--image`. The URIs are the newest that the sources
below list; Google publishes newer tags without notice, so check them when you bump:

    gcloud container images list-tags us-docker.pkg.dev/deeplearning-platform-release/gcr.io/<name>
"""

from __future__ import annotations

from dataclasses import dataclass

AS_OF = "2026-11-22"


@dataclass(frozen=True)
class VertexImage:
    runtime: str
    uri: str
    source: str
    note: str = ""


_DLC = "us-docker.pkg.dev/deeplearning-platform-release/gcr.io"

IMAGES: dict[str, VertexImage] = {
    "tgi": VertexImage(
        runtime="tgi",
        uri=f"{_DLC}/huggingface-text-generation-inference-cu124.2-4.ubuntu2204.py311",
        source="github.com/huggingface/Google-Cloud-Containers README.md, 'Latest DLCs' (TGI 2.4.0); "
        "containers/tgi/gpu/2.4.0/entrypoint.sh copies AIP_STORAGE_URI to /tmp/model and sets MODEL_ID",
        note="built with TGI's `google` feature: serves AIP_PREDICT_ROUTE with {instances: [{inputs, parameters}]} "
        "(router/src/vertex.rs: reads max_new_tokens and seed, samples, answers whole predictions: no streaming)",
    ),
    "vllm": VertexImage(
        runtime="vllm",
        uri="us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:20250312_0916_RC01",
        source="github.com/GoogleCloudPlatform/vertex-ai-samples, model garden vLLM notebooks (VLLM_DOCKER_URI, vLLM past v0.7.3)",
        note="args `python -m vllm.entrypoints.api_server --model=gs://...`; predict route /generate, health /ping; "
        "instances {prompt, SamplingParams..., raw_response, stream}: without raw_response it answers "
        "'Prompt:\\n...\\nOutput:\\n...'; stream=true answers NUL-separated {predictions: [text]} objects",
    ),
    "handler": VertexImage(
        runtime="handler",
        uri=f"{_DLC}/huggingface-pytorch-inference-cu121.2-3.transformers.4-48.ubuntu2204.py311",
        source="github.com/huggingface/Google-Cloud-Containers README.md, 'Latest DLCs' (PyTorch 2.3.1, transformers 4.48.0, GPU)",
        note="python 3.11 with google-cloud-storage (huggingface-inference-toolkit[google]), starlette and uvicorn",
    ),
    "handler-cpu": VertexImage(
        runtime="handler",
        uri=f"{_DLC}/huggingface-pytorch-inference-cpu.2-3.transformers.4-48.ubuntu2204.py311",
        source="github.com/huggingface/Google-Cloud-Containers README.md, 'Latest DLCs' (PyTorch 2.3.1, transformers 4.48.0, CPU)",
    ),
}


def image_for(runtime: str, *, gpu: bool) -> VertexImage:
    """The catalog image of a runtime; the generated handler gets the CPU build on machines without GPUs."""
    if runtime == "handler" and not gpu:
        return IMAGES["handler-cpu"]
    return IMAGES[runtime]
