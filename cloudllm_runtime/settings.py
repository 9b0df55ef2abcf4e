"""ServingSettings: what the server needs to know, written as code/settings.json by the packager.

Plain dataclass and json only: this module is imported both by the deploy-time
package (to write the file) and by the server in the container (to read it).
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    # torch's intra-op threads (torch.set_num_threads at model load); None: the CPUs this process
    # may use (its affinity, capped by the cgroup's CPU quota), not torch's count of the host's cores.
    intra_op_threads: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        threads = self.intra_op_threads
        # bool is an int to Python: `true` in settings.json is a mistake, not one thread.
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(
                f"intra_op_threads must be a whole number of threads, at least 1 (got {threads!r}); "
                "leave it out (null) to use the CPUs this process may use"
            )

    def resolved_intra_op_threads(self) -> int:
        """The thread count to give torch: the setting, else the CPUs this process may use."""
        return self.intra_op_threads if self.intra_op_threads is not None else usable_cpus()

    def to_json(self) -> str:
        return json.dumps(self._fields(), indent=2, sort_keys=True) + "\n"

    def _fields(self) -> dict:
        fields = dataclasses.asdict(self)
        # Settings written before these fields existed stay byte for byte the same (their digest too).
        if not fields["adapters"]:
            del fields["adapters"]
        if fields["intra_op_threads"] is None:
            del fields["intra_op_threads"]
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


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def cgroup_cpu_limit(cpu_max: str) -> int | None:
    """The CPUs a cgroup v2 cpu.max line ("QUOTA PERIOD", or "max PERIOD") allows; None when unlimited or unreadable.

    A fractional quota rounds up (1.5 CPUs: 2 threads), and never below 1.
    """
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def usable_cpus(cpu_max_path: str = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup v2 CPU quota when there is one.

    torch's default counts the host's cores, so a container limited to 2 CPUs of 64 would run 64
    threads that the quota throttles.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        cpus = os.cpu_count() or 1
    try:
        with open(cpu_max_path, encoding="utf-8") as fh:
            limit = cgroup_cpu_limit(fh.read())
    except OSError:  # no cgroup v2 (v1, macOS, a sandbox)
        limit = None
    return max(1, min(cpus, limit) if limit is not None else cpus)
