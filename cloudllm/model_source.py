"""Inspect a model folder without loading it: config.json plus safetensors headers.

A safetensors file is an 8-byte little-endian header length, a JSON header naming
every tensor's dtype, shape and byte range, then the raw bytes. Reading only the
header gives the parameter count, dtype and size of a 70B model in milliseconds,
and checking the byte ranges against the file size catches truncated or lying
files before anything is uploaded.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field

from cloudllm.errors import UserError

TASKS = (
    "text-generation",
    "text2text-generation",
    "summarization",
    "text-classification",
    "token-classification",
    "question-answering",
    "feature-extraction",
)

# Architecture class-name suffix -> task; the first match wins, so order matters.
_TASK_BY_SUFFIX = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("Model", "feature-extraction"),
)

DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip

# safetensors dtype -> the torch/transformers name users know.
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8",
    "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
}  # fmt: skip

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Any of these means the folder carries a tokenizer. Byte-level ones (ByT5, CANINE) have
# only tokenizer_config.json; whether a tokenizer has a vocabulary is the runtime's check.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "merges.txt")
TOKENIZER_SUFFIXES = (".model", ".spm", ".tiktoken")  # sentencepiece (spiece.model, ...) and tiktoken vocabularies
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class ModelFile(BaseModel):
    """One file that ships with the model (path relative to the model folder)."""

    name: str
    path: str = Field(description="Absolute path of the bytes on disk (symlinks resolved).")
    size: int


class ModelInfo(BaseModel):
    """What deploy needs to know about a model, read from its folder without loading it."""

    path: str
    architecture: str | None
    model_type: str | None
    task: str
    parameters: int | None = Field(description="Element count over all weight tensors; None for pickle weights.")
    dtype: str | None = Field(description="The dtype holding most weight bytes (e.g. bfloat16).")
    weight_bytes: int
    total_bytes: int
    weight_format: str = Field(description="'safetensors' or 'pickle'.")
    files: list[ModelFile]
    config: dict
    quantization: str | None = Field(
        None,
        description="int8/int4 for folders written by `cloudllm quantize`, else the pre-quantized method "
        "(config.json quantization_config.quant_method: awq, gptq, fp8, bitsandbytes, torchao, ...).",
    )
    trust_remote_code: bool = False
    skipped: list[str] = Field(default_factory=list, description="Entries not shipped, with the reason.")

    @property
    def weight_files(self) -> list[ModelFile]:
        return [f for f in self.files if _is_weight(f.name)]

    def summary(self) -> dict:
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "task": self.task,
            "parameters": self.parameters,
            "dtype": self.dtype,
            "weight_bytes": self.weight_bytes,
            "total_bytes": self.total_bytes,
            "quantization": self.quantization,
        }


def _is_weight(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(PICKLE_SUFFIXES)


def inspect_model(
    path: str | Path,
    *,
    task: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ModelInfo:
    """Read config.json and the safetensors headers of a model folder.

    Accepts a plain folder, a Hugging Face cache snapshot folder, or a cache repo
    folder (``models--org--name``, resolved through ``refs/main``).
    """
    folder = _resolve_folder(Path(path).expanduser())
    config = _read_config(folder)
    files, skipped = _list_files(folder, allow_pickle=allow_pickle)

    architecture = (config.get("architectures") or [None])[0]
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(
            f"{folder} needs custom code from the model repo (config.json has auto_map)",
            "review that code, then pass --trust-remote-code",
        )
    resolved_task = _resolve_task(task, architecture, config, folder)

    safetensors = [f for f in files if f.name.endswith(".safetensors")]
    pickles = [f for f in files if f.name.endswith(PICKLE_SUFFIXES)]
    if safetensors:
        _check_index(folder, {f.name for f in safetensors})
        parameters, dtype = _scan_safetensors(safetensors)
        weight_format = "safetensors"
        # With safetensors present, pickle copies are dead weight: never ship them.
        for f in pickles:
            skipped.append(f"{f.name}: pickle duplicate of the safetensors weights")
        files = [f for f in files if f not in pickles]
    elif pickles:
        if not allow_pickle:
            raise UserError(
                f"{folder} has only pickle weights ({', '.join(f.name for f in pickles[:3])}), which can run code when loaded",
                "convert them to safetensors (model.save_pretrained(dir, safe_serialization=True)) or pass --allow-pickle",
            )
        parameters, dtype, weight_format = None, config.get("torch_dtype") or config.get("dtype"), "pickle"
    else:
        raise UserError(f"{folder} has no weights (*.safetensors)", "point at the folder that holds the model's weights")

    _check_tokenizer(folder, files, resolved_task)
    quantization, marker = _detect_quantization(folder, config)
    if marker:  # cloudllm-quantized: report the model's own size and compute dtype, not the packed storage
        parameters, dtype = marker.get("parameters") or parameters, marker.get("dtype") or dtype
    return ModelInfo(
        path=str(folder),
        architecture=architecture,
        model_type=config.get("model_type"),
        task=resolved_task,
        parameters=parameters,
        dtype=dtype,
        weight_bytes=sum(f.size for f in files if _is_weight(f.name)),
        total_bytes=sum(f.size for f in files),
        weight_format=weight_format,
        files=sorted(files, key=lambda f: f.name),
        config=config,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        skipped=skipped,
    )


def _detect_quantization(folder: Path, config: dict) -> tuple[str | None, dict | None]:
    """(method, cloudllm marker) of an already-quantized folder; (None, None) for full precision."""
    from cloudllm_runtime.quantized import read_marker

    marker = read_marker(str(folder))
    if marker:
        return marker.get("method"), marker
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant:
        method = quant.get("quant_method")
        if not method and (quant.get("load_in_8bit") or quant.get("load_in_4bit")):
            method = "bitsandbytes"  # written before transformers recorded quant_method
        return (str(method).lower() if method else "unknown"), None
    # Checkpoints from AutoGPTQ / AutoAWQ before they wrote quantization_config into config.json.
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        if (folder / name).is_file():
            return method, None
    return None, None


def _resolve_folder(folder: Path) -> Path:
    if "\0" in str(folder):
        raise UserError("the model path contains a NUL character", "pass the model folder's path")
    if not folder.exists():
        raise UserError(f"model folder {folder} does not exist", "check the path")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not a model folder", "pass the folder that holds config.json")
    # A hub cache repo folder: models--org--name/{refs,snapshots,blobs}
    ref = folder / "refs" / "main"
    if not (folder / "config.json").exists() and ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    return folder


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json", "pass a Hugging Face model folder (save_pretrained writes config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})", "fix or regenerate config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} must hold a JSON object", "fix or regenerate config.json")
    _check_config_types(config, config_path)
    return config


# Fields transformers reads to build the model: a wrong type there fails only when the server loads.
_CONFIG_SIZES = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "max_position_embeddings", "n_layer", "n_embd", "n_head", "n_positions", "n_ctx", "d_model", "num_layers", "num_heads",
)  # fmt: skip
_CONFIG_DTYPES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8", "auto")


def _check_config_types(config: dict, path: Path) -> None:
    """Refuse what transformers' config loading would refuse later, on the server."""

    def bad(field: str, want: str) -> UserError:
        return UserError(f"{path}: {field} is {json.dumps(config[field])[:80]}, not {want}", "fix or regenerate config.json")

    architectures = config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) and a for a in architectures)
    ):
        raise bad("architectures", "a list of class names")
    for field in ("model_type", "torch_dtype", "dtype"):
        if config.get(field) is not None and not isinstance(config[field], str):
            raise bad(field, "a string")
    for field in ("torch_dtype", "dtype"):
        if isinstance(config.get(field), str) and config[field] not in _CONFIG_DTYPES:
            raise bad(field, f"one of {', '.join(_CONFIG_DTYPES)}")
    for field in ("auto_map", "quantization_config"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            raise bad(field, "a JSON object")
    for field in _CONFIG_SIZES:
        value = config.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(field, "a positive whole number")
    if config.get("is_encoder_decoder") is not None and not isinstance(config["is_encoder_decoder"], bool):
        raise bad("is_encoder_decoder", "true or false")


def _list_files(folder: Path, *, allow_pickle: bool) -> tuple[list[ModelFile], list[str]]:
    """The top-level files to ship; sub-folders (original/, onnx/, code/) are not part of a transformers model."""
    files: list[ModelFile] = []
    skipped: list[str] = []
    hub_blobs = (folder / ".." / ".." / "blobs").resolve() if folder.parent.name == "snapshots" else None
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            skipped.append(f"{entry.name}/: sub-folders are not shipped")
            continue
        real = Path(entry.path).resolve()
        if entry.is_symlink():
            inside = real.is_relative_to(folder.resolve()) or (hub_blobs is not None and real.is_relative_to(hub_blobs))
            if not inside:
                raise UserError(
                    f"{entry.name} in {folder} is a symlink to {real}, outside the model folder",
                    "copy the file into the folder (cloudllm only ships what is inside it)",
                )
            if not real.is_file():
                raise UserError(f"{entry.name} in {folder} is a broken symlink", "re-download or copy the file")
        if not real.is_file():
            continue
        if entry.name.endswith(PICKLE_SUFFIXES) and not allow_pickle:
            # Still listed, so inspect_model can tell "pickle-only" from "no weights".
            pass
        files.append(ModelFile(name=entry.name, path=str(real), size=real.stat().st_size))
    return files, skipped


def _resolve_task(task: str | None, architecture: str | None, config: dict, folder: Path) -> str:
    if task:
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
        return task
    if architecture:
        if config.get("is_encoder_decoder") and architecture.endswith("ForConditionalGeneration"):
            return "text2text-generation"
        for suffix, found in _TASK_BY_SUFFIX:
            if architecture.endswith(suffix):
                return found
    raise UserError(
        f"cannot tell the task of {folder} (architecture {architecture or 'missing'} in config.json)",
        f"pass --task, one of: {', '.join(TASKS)}",
    )


def _check_tokenizer(folder: Path, files: list[ModelFile], task: str) -> None:
    """Refuse a folder without tokenizer files: every task served reads text through one,
    and without it the server starts but answers every request with an error."""
    for f in files:
        if f.name in TOKENIZER_FILES or f.name.endswith(TOKENIZER_SUFFIXES) or "vocab" in f.name.lower():
            return
    raise UserError(
        f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json/merges.txt, vocab.txt "
        f"or tokenizer.model), which the {task} server needs to read text",
        "copy tokenizer.json, tokenizer_config.json and any vocab files from the original model into the folder "
        "(or run tokenizer.save_pretrained on it)",
    )


def _check_index(folder: Path, present: set[str]) -> None:
    index_path = folder / "model.safetensors.index.json"
    if not index_path.exists():
        return
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = set(weight_map.values())
        if not all(isinstance(key, str) for key in weight_map):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index_path} is not a valid safetensors index (no weight_map)", "regenerate it with save_pretrained") from None
    for shard in sorted(shards):
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("..", "."):
            raise UserError(f"{index_path} names a shard outside the folder: {shard!r}", "shard names must be plain file names")
    missing = sorted(shards - present)
    if missing:
        raise UserError(f"{folder} is missing shards named in its index: {', '.join(missing[:3])}", "download the missing shards")
    for tensor, shard in weight_map.items():
        if tensor not in read_safetensors_header(folder / shard):
            raise UserError(
                f"{index_path} puts tensor {tensor!r} in {shard}, which does not hold it", "regenerate the index with save_pretrained"
            )


def read_safetensors_header(path: str | Path) -> dict:
    """Return the header's tensors ({name: {dtype, shape, data_offsets}}), validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path.name} is truncated (shorter than a safetensors header)", "re-download or re-save the file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise UserError(f"{path.name} is not a valid safetensors file (header length {header_len} past the file end)", "re-download or re-save the file")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path.name} has a corrupt safetensors header", "re-download or re-save the file") from None
    if not isinstance(header, dict):
        raise UserError(f"{path.name} has a corrupt safetensors header", "re-download or re-save the file")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise UserError(f"{path.name}: its __metadata__ must map names to strings", "re-save the file with safetensors")
    return _check_tensor_layout(path, header, size - 8 - header_len)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensor_layout(path: Path, header: dict, data_len: int) -> dict:
    """The checks safetensors makes when it opens the file: well-typed entries whose byte ranges
    tile the data exactly (no gap, no overlap, nothing past or short of the end)."""
    redo = "the file is corrupt; re-download or re-save it"
    spans = []
    for name, info in header.items():
        entry = f"{path.name}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise UserError(f"{entry} has a malformed header entry (needs exactly dtype, shape, data_offsets)", redo)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise UserError(f"{entry} has an unknown dtype {json.dumps(dtype)[:40]}", redo)
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise UserError(f"{entry} has shape {json.dumps(shape)[:80]}, not a list of non-negative whole numbers", redo)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
            raise UserError(f"{entry} has data_offsets {json.dumps(offsets)[:80]}, not [begin, end] byte positions", redo)
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != expected:
            raise UserError(f"{entry} claims {end - begin} bytes but its shape {shape} x {dtype} needs {expected}", redo)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if end > data_len:
            raise UserError(f"{path.name} is truncated: its header needs {end} data bytes, the file has {data_len}", "re-download or re-save the file")
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap of {begin - position} bytes before it"
            raise UserError(f"{path.name}: tensor {name!r} {what} (data_offsets {[begin, end]})", redo)
        position = end
    if position != data_len:
        raise UserError(f"{path.name} has {data_len - position} bytes after its last tensor, which safetensors refuses", redo)
    return header


def _scan_safetensors(files: list[ModelFile]) -> tuple[int, str | None]:
    parameters = 0
    bytes_by_dtype: Counter[str] = Counter()
    seen: dict[str, str] = {}
    for f in files:
        header = read_safetensors_header(f.path)
        for tensor in header:
            if tensor in seen:
                raise UserError(
                    f"tensor {tensor!r} is in two weight files ({seen[tensor]} and {f.name}): the loader cannot tell which to use",
                    "remove the stale file (often a leftover from an earlier save) and keep one copy",
                )
            seen[tensor] = f.name
        for info in header.values():
            count = math.prod(info["shape"])
            parameters += count
            bytes_by_dtype[info["dtype"]] += count * DTYPE_BYTES[info["dtype"]]
    if not bytes_by_dtype:
        return 0, None
    dominant = bytes_by_dtype.most_common(1)[0][0]
    return parameters, DTYPE_NAMES.get(dominant, dominant.lower())
