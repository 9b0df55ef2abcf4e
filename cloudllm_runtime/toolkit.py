"""Hugging Face inference toolkit hooks, for the HF PyTorch inference containers.

The toolkit imports ``code/inference.py``, which re-exports these, and calls
``model_fn(model_dir)`` once, then ``input_fn -> predict_fn -> output_fn`` per request.
They share the server's protocol and engine, so a body means the same thing on both
paths; the answers follow the transformers pipelines' shapes (text-generation answers
``[{"generated_text": ...}]`` per input). No streaming here: the toolkit cannot stream.

Only stdlib at import time, plus torch/transformers once model_fn runs: the toolkit's
container has neither starlette nor uvicorn, and must not need them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .protocol import InferenceRequest, RequestError, decode_payload, format_response, parse_request, validation_error
from .settings import SETTINGS_FILE, ServingSettings

# The body size limit from model_fn's settings (input_fn is called without the model).
_max_body_bytes: int | None = None


def model_fn(model_dir: str, context: Any = None) -> Any:
    """Load the engine for model_dir, reading code/settings.json beside the weights."""
    global _max_body_bytes
    from .engine import load_engine

    settings = load_settings(model_dir)
    _max_body_bytes = settings.max_body_bytes
    return load_engine(model_dir, settings)


def input_fn(input_data: Any, content_type: str | None = None, context: Any = None) -> Any:
    """Decode the raw body (bytes or str): JSON, or ``text/plain`` as one input. 400/413 on failure.

    Validation against the task waits for predict_fn, which has the model and its settings.
    """
    return decode_payload(input_data, content_type, _max_body_bytes)


def predict_fn(data: Any, model: Any, context: Any = None) -> Any:
    """Validate and run the request; answers the pipeline-shaped response body (a JSON-ready value)."""
    from . import openai_api

    if not isinstance(data, InferenceRequest) and openai_api.is_chat_body(data):
        return openai_api.answer_chat_sync(model, data)  # OpenAI's messages, as TGI and LMI take them on /invocations
    request = data if isinstance(data, InferenceRequest) else parse_request(data, model.settings)
    if request.stream:
        raise validation_error(
            "streaming is not available through the Hugging Face inference toolkit; send \"stream\": false"
        )
    model.validate(request.inputs, request.parameters)
    outputs = model.predict(request.inputs, request.parameters)
    return format_response(
        request, outputs, model.task, style="pipeline", deployed_model_id=os.environ.get("AIP_DEPLOYED_MODEL_ID")
    )


def output_fn(prediction: Any, accept: str | None = None, context: Any = None) -> str:
    """JSON text; any other Accept is a 406."""
    if not _accepts_json(accept):
        raise RequestError(406, f"this model answers application/json, not {accept}")
    return json.dumps(prediction, ensure_ascii=False, allow_nan=False)


def load_settings(model_dir: str) -> ServingSettings:
    """$CLOUDLLM_SETTINGS, else <model_dir>/code/settings.json, else settings.json beside this package, else $HF_TASK alone."""
    from_env = ServingSettings.from_env()
    if from_env is not None:
        return from_env
    package_code_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (os.path.join(model_dir, "code"), package_code_dir):
        if os.path.isfile(os.path.join(folder, SETTINGS_FILE)):
            return ServingSettings.load(folder)
    if os.environ.get("HF_TASK"):
        return ServingSettings(task=os.environ["HF_TASK"])
    raise FileNotFoundError(f"no code/{SETTINGS_FILE} in {model_dir}; package the model with cloudllm or set HF_TASK")


def _accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    for part in accept.split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media in ("application/json", "*/*", "application/*", "") or media.endswith("+json"):
            return True
    return False
