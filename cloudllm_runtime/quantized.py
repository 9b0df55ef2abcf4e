"""Load the int8/int4 weights `cloudllm quantize` wrote, for serving.

A quantized model folder keeps config.json exactly as it was (no quantization_config,
so transformers never tries to act on it) and adds:

    quantization.json                    the marker: method, optimum-quanto's quantization map,
                                         the GPT-2 Conv1D layers that became nn.Linear, policy
    quantized-model*.safetensors         optimum-quanto's serialized state dict (int8 / packed int4
                                         data, per-channel or per-group scales, everything else as is)

The weight files are deliberately not named model.safetensors: a plain
`from_pretrained` on the folder fails with "no file named model.safetensors" instead
of silently loading random weights into every quantized layer.

This module runs in the container on its own torch/transformers (4.x or 5.x) and must
not import cloudllm. torch, transformers and optimum-quanto are imported inside the
functions that use them.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

from . import placement

MARKER = "quantization.json"
FORMAT = "cloudllm-quanto"
FORMAT_VERSION = 1
WEIGHTS_PREFIX = "quantized-model"
QUANTO_REQUIREMENT = "optimum-quanto"


class QuantizedModelError(RuntimeError):
    """The quantized folder cannot be served as it is (wrong format, missing library, incomplete weights)."""


def read_marker(model_dir: str) -> dict | None:
    """quantization.json of a cloudllm-quantized folder, or None for any other folder."""
    path = os.path.join(model_dir, MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        return None
    return marker


def is_quantized(model_dir: str) -> bool:
    """True when model_dir holds weights written by `cloudllm quantize` (load them with load_quantized_model)."""
    return read_marker(model_dir) is not None


def is_conv1d(module: Any) -> bool:
    """GPT-2 style Conv1D: a linear layer storing its weight as (in_features, out_features)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and weight is not None and weight.dim() == 2


def convert_conv1d_to_linear(model: Any, names: list[str] | None = None) -> list[str]:
    """Replace Conv1D layers by the equivalent nn.Linear (weight transposed); returns the names replaced.

    Quantizers only take nn.Linear, so GPT-2's projections would otherwise stay full
    precision. With `names`, exactly those layers are converted (the loader repeats what
    the quantizer did); weights on the meta device stay on it, empty.
    """
    import torch

    wanted = None if names is None else set(names)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if (wanted is not None and name not in wanted) or not is_conv1d(module):
            continue
        in_features, out_features = module.weight.shape
        linear = torch.nn.Linear(
            in_features,
            out_features,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        if module.weight.device.type != "meta":
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
        replaced.append(name)
    if wanted is not None and set(replaced) != wanted:
        missing = sorted(wanted - set(replaced))
        raise QuantizedModelError(f"the model has no Conv1D layers named {missing[:3]}: the quantized weights do not match it")
    return replaced


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Create parameters on the meta device: no memory, no random init.

    Buffers stay real on purpose: non-persistent ones (rotary inv_freq, causal masks)
    are computed in __init__ and are not in any checkpoint. Same idea as accelerate's
    init_empty_weights, which the containers may not have.
    """
    import torch

    original = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def resolve_device(requested: str | None) -> str:
    """One device for the whole model ("auto": the first GPU, else the CPU); quantized models are not sharded."""
    return str(placement.resolve_placement(requested or "auto")[0])


def resolve_dtype(requested: str | None, device: str) -> Any:
    """The compute dtype: an explicit setting, else bfloat16 (float16 on GPUs without bf16).

    Unlike full-precision models (float32 on CPU), quantized ones compute in bfloat16 on
    CPU: that is what torch's int8/int4 CPU kernels take (_weight_int8pack_mm,
    _weight_int4pack_mm_for_cpu); in float32 quanto dequantizes every weight on every
    call, several times slower (benchmarks/bench_quantize.py). On GPU, bfloat16 int4
    runs on torch's own kernel, where float16 would make quanto compile its CUDA
    extension at start-up.
    """
    import torch

    if requested not in (None, "", "auto"):
        return placement.resolve_dtype(requested, torch.device(device))
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_quantized_model(model_dir: str, auto_class: Any, settings: Any = None, *, device: str | None = None,
                         dtype: str | None = None, trust_remote_code: bool | None = None) -> Any:  # fmt: skip
    """Build `auto_class`'s model from config.json and fill it with the quantized weights, ready to serve.

    settings: a ServingSettings (its dtype, device and trust_remote_code are honoured);
    the keyword arguments override them. Raises QuantizedModelError rather than serve a
    model with any weight missing.
    """
    marker = read_marker(model_dir)
    if marker is None:
        raise QuantizedModelError(f"{model_dir} has no {MARKER} written by cloudllm quantize")
    if marker.get("format_version") != FORMAT_VERSION:
        raise QuantizedModelError(
            f"{model_dir} holds quantized weights of format version {marker.get('format_version')}; "
            f"this runtime reads version {FORMAT_VERSION}: re-run `cloudllm quantize` with this cloudllm"
        )
    try:
        from optimum.quanto import requantize
    except ImportError:
        raise QuantizedModelError(
            f"{model_dir} holds {marker.get('method')} weights, which need the {QUANTO_REQUIREMENT} package: "
            f"pip install {QUANTO_REQUIREMENT} (code/requirements.txt lists it)"
        ) from None
    import torch
    from transformers import AutoConfig

    if trust_remote_code is None:
        trust_remote_code = bool(getattr(settings, "trust_remote_code", False))
    device = resolve_device(device or getattr(settings, "device", None))
    compute_dtype = resolve_dtype(dtype or getattr(settings, "dtype", None), device)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with empty_parameters():
        model = auto_class.from_config(config, trust_remote_code=trust_remote_code, **{placement.dtype_keyword(): compute_dtype})
    convert_conv1d_to_linear(model, marker.get("conv1d_to_linear") or [])

    state = _read_weights(model_dir, marker["weight_files"], device, compute_dtype)
    present = set(state)
    requantize(model, state_dict=state, quantization_map=marker["quantization_map"], device=torch.device(device))
    model.tie_weights()
    _check_complete(model, present, marker["quantization_map"])
    _allow_inference_mode(model)
    model.eval()
    _load_generation_config(model, model_dir)
    return model


def _allow_inference_mode(model: Any) -> None:
    """Let int4 layers run under torch.inference_mode, which servers use for generation.

    optimum-quanto's packed int4 tensor fails there ("Cannot set version_counter for
    inference tensor" when it transposes itself); each int4 layer steps out of inference
    mode (gradients stay off) for its own matmul. int8 layers work as they are.
    """
    import torch

    for module in model.modules():
        qtype = getattr(module, "weight_qtype", None)
        if qtype is None or qtype.bits >= 8:
            continue

        def forward(*args, _forward=module.forward, **kwargs):
            if not torch.is_inference_mode_enabled():
                return _forward(*args, **kwargs)
            with torch.inference_mode(False), torch.no_grad():
                return _forward(*args, **kwargs)

        module.forward = forward


def _read_weights(model_dir: str, names: list[str], device: str, compute_dtype: Any) -> dict:
    """The state dict, on `device`, floats in the compute dtype, every tensor in memory it owns.

    Loaded straight onto the device so quanto picks that device's kernels (CPU and CUDA
    pack int4 differently). Tensors are copied out of the file mapping: torch's CPU
    int8 kernel (_weight_int8pack_mm) crashed the process on a tensor read from the
    mapping and ran fine on its copy.
    """
    from safetensors import safe_open

    state: dict[str, Any] = {}
    for name in names:
        with safe_open(os.path.join(model_dir, name), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                state[key] = tensor.to(compute_dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
    return state


def _check_complete(model: Any, present: set[str], qmap: dict) -> None:
    """Every parameter came from the file (or is tied to one that did): never serve uninitialized memory."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    missing = []
    for names in aliases.values():
        found = False
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            key = f"{name}._scale" if module_name in qmap and leaf == "weight" else name
            if key in present:
                found = True
                break
        if not found:
            missing.append(names[0])
    if missing:
        raise QuantizedModelError(
            f"the quantized weights lack {len(missing)} parameter(s) of the model ({', '.join(sorted(missing)[:3])}): "
            "re-run `cloudllm quantize` on the original model"
        )


def _load_generation_config(model: Any, model_dir: str) -> None:
    if not os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        pass  # from_config already gave the model a generation config derived from config.json
