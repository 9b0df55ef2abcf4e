"""Where a model goes and in which dtype: the device, the accelerate device map, the dtype keyword.

Shared by the full-precision loader (engine) and the quantized one (quantized), below both,
so neither imports the other for it. torch and transformers are imported inside functions.
"""

from __future__ import annotations

import re
from typing import Any

from .log import log_event

DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


def dtype_keyword() -> str:
    """from_pretrained's name for the dtype argument in the installed transformers.

    torch_dtype became dtype in transformers 4.56 (the old name is gone in 5); older 4.x
    silently files an unknown dtype= under the config, so ask the version, not try/except.
    """
    import transformers

    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def resolve_placement(device: str) -> tuple[Any, str | None]:
    """(torch device, device_map): "auto" is cuda when present, sharded by accelerate over several GPUs."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        if torch.cuda.device_count() > 1:
            if accelerate_available():
                return torch.device("cuda:0"), "auto"
            log_event("one_gpu_only", level="warning", gpus=torch.cuda.device_count(),
                      reason="accelerate is not installed, so the model is not spread over the GPUs")  # fmt: skip
        return torch.device("cuda:0"), None
    if device in ("auto", "cuda"):
        return torch.device("cpu"), None
    return torch.device(device), None


def accelerate_available() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_dtype(dtype: str, device: Any) -> Any:
    """The checkpoint's own dtype on GPU for "auto"; float32 on CPU, where half-precision matmuls crawl."""
    import torch

    name = DTYPE_ALIASES.get(dtype, dtype)
    if name == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} in settings; use auto, float32, float16 or bfloat16")
    return value
