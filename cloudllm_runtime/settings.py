"""ServingSettings: what the server needs to know, written as code/settings.json by the packager.

Plain dataclass and json only: this module is imported both by the deploy-time
package (to write the file) and by the server in the container (to read it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

SETTINGS_FILE = "settings.json"
# The settings as compact JSON in the container's environment: cloud deploys put them there
# instead of code/settings.json, so a settings change leaves the uploaded files as they are.
SETTINGS_ENV = "CLOUDLLM_SETTINGS"


@dataclass
class ServingSettings:
    task: str
    architecture: str | None = None
    model_type: str | None = None
    # "auto": the checkpoint's dtype on GPU, float32 on CPU (bf16 matmuls are slow on most CPUs).
    dtype: str = "auto"
    # "auto": cuda when available (sharded with accelerate's device map over several GPUs), else cpu.
    device: str = "auto"
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    default_max_new_tokens: int = 64
    max_new_tokens: int = 1024  # the cap a request may ask for
    # Dynamic batching: requests arriving within max_batch_wait_ms run as one forward pass.
    # max_batch_size sequences of max_total_tokens is a batch's token budget (the KV cache GPU
    # plans size); shorter sequences share it, so more of them than max_batch_size run at once.
    max_batch_size: int = 8
    max_batch_wait_ms: float = 5.0
    max_concurrent_requests: int = 128  # beyond this the server answers 429
    max_inputs_per_request: int = 64  # a list of inputs is that many generations: bound the work one request buys
    max_body_bytes: int = 6 * 1024 * 1024  # SageMaker's real-time payload limit
    max_body_seconds: float = 60.0  # a body still arriving after this is refused (408): slow senders hold no slot
    trust_remote_code: bool = False
    log_payloads: bool = False
    quantization: str | None = None
    # Jinja text rendering OpenAI "messages" (--chat-template FILE); None: the model folder's own.
    chat_template: str | None = None
    # The Open Inference Protocol v2 gRPC port beside HTTP (--grpc-port; 0 picks a free one); None: off.
    grpc_port: int | None = None
    # LoRA adapters loaded at start beside the model: name -> folder (relative to the artifact root, or absolute).
    adapters: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self._fields(), indent=2, sort_keys=True) + "\n"

    def _fields(self) -> dict:
        fields = dataclasses.asdict(self)
        if not fields["adapters"]:  # settings written before adapters existed stay byte for byte the same (their digest too)
            del fields["adapters"]
        return fields

    @classmethod
    def from_dict(cls, data: dict) -> "ServingSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_env(self) -> str:
        return json.dumps(self._fields(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_env(cls) -> "ServingSettings | None":
        """The settings $CLOUDLLM_SETTINGS holds, or None when it is not set (ValueError when it is not JSON)."""
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            return None
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"${SETTINGS_ENV} is not a JSON object")
        return cls.from_dict(data)

    @classmethod
    def load(cls, code_dir: str) -> "ServingSettings":
        with open(os.path.join(code_dir, SETTINGS_FILE), encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))
