"""inspect_model: facts from config.json and safetensors headers, and every malformed folder refused clearly."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from cloudllm.errors import UserError
from cloudllm.model_source import inspect_model, read_safetensors_header
from cloudllm.testing.tiny_models import build_tiny_bert, build_tiny_llama, build_tiny_t5


@pytest.fixture
def gpt2_copy(tiny_gpt2: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_gpt2, dest)
    return dest


def test_gpt2_facts_come_from_headers(tiny_gpt2: Path) -> None:
    import torch
    from safetensors.torch import load_file

    info = inspect_model(tiny_gpt2)
    tensors = load_file(tiny_gpt2 / "model.safetensors")
    assert info.architecture == "GPT2LMHeadModel"
    assert info.task == "text-generation"
    assert info.parameters == sum(t.numel() for t in tensors.values())
    assert info.dtype == "float32" and all(t.dtype == torch.float32 for t in tensors.values())
    assert info.weight_bytes == (tiny_gpt2 / "model.safetensors").stat().st_size
    assert info.weight_format == "safetensors"
    assert {f.name for f in info.files} >= {"config.json", "model.safetensors", "tokenizer.json"}


@pytest.mark.parametrize(
    ("builder", "task"),
    [
        (lambda p: build_tiny_bert(p), "text-classification"),
        (lambda p: build_tiny_bert(p, head="token-classification"), "token-classification"),
        (lambda p: build_tiny_bert(p, head="question-answering"), "question-answering"),
        (lambda p: build_tiny_bert(p, head="base"), "feature-extraction"),
        (build_tiny_t5, "text2text-generation"),
        (lambda p: build_tiny_llama(p, dtype="bfloat16"), "text-generation"),
    ],
)
def test_task_inferred_from_architecture(tmp_path: Path, builder, task: str) -> None:
    info = inspect_model(builder(tmp_path / "m"))
    assert info.task == task


def test_bf16_dtype_reported(tmp_path: Path) -> None:
    info = inspect_model(build_tiny_llama(tmp_path / "m", dtype="bfloat16"))
    assert info.dtype == "bfloat16"


def test_task_override(tiny_gpt2: Path) -> None:
    assert inspect_model(tiny_gpt2, task="feature-extraction").task == "feature-extraction"


def test_sharded_model_with_index(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = build_tiny_llama(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="200KB")
    shutil.copy(src / "tokenizer.json", out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    info = inspect_model(out)
    assert info.parameters == inspect_model(src).parameters
    assert [f.name for f in info.weight_files] == shards


def test_hub_cache_snapshot_layout(tiny_gpt2: Path, tmp_path: Path) -> None:
    """The hub cache stores blobs once and symlinks them from snapshots/<rev>/: both folder forms work."""
    repo = tmp_path / "models--acme--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in tiny_gpt2.iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(f"../../blobs/{f.name}", snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert inspect_model(snapshot).parameters == inspect_model(tiny_gpt2).parameters
    assert inspect_model(repo).path == str(snapshot)


def test_subfolders_and_pickle_duplicates_not_shipped(gpt2_copy: Path) -> None:
    (gpt2_copy / "original").mkdir()
    (gpt2_copy / "original" / "consolidated.pth").write_bytes(b"x")
    (gpt2_copy / "pytorch_model.bin").write_bytes(b"pickle")
    info = inspect_model(gpt2_copy)
    names = {f.name for f in info.files}
    assert "pytorch_model.bin" not in names
    assert any("original/" in s for s in info.skipped)
    assert any("pytorch_model.bin" in s for s in info.skipped)


# --- bad model folders: one clear UserError each ---------------------------------------------
def _corrupt(folder: Path, how: str) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "tiny":
        weights.write_bytes(b"abc")
    elif how == "header-length":
        weights.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    elif how == "header-json":
        (n,) = struct.unpack("<Q", data[:8])
        weights.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    elif how == "header-lies":
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
        raw = json.dumps(header).encode().ljust(n)
        weights.write_bytes(data[:8] + raw[:n] + data[8 + n :] if len(raw) == n else struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "truncated"),
        ("tiny", "truncated"),
        ("header-length", "not a valid safetensors"),
        ("header-json", "corrupt"),
        ("header-lies", "claims"),
    ],
)
def test_corrupt_safetensors_refused(gpt2_copy: Path, how: str, message: str) -> None:
    _corrupt(gpt2_copy, how)
    with pytest.raises(UserError, match=message):
        inspect_model(gpt2_copy)


def test_bad_folders(tmp_path: Path, gpt2_copy: Path) -> None:
    cases = []
    cases.append((tmp_path / "missing", "does not exist"))
    (tmp_path / "file").write_text("x")
    cases.append((tmp_path / "file", "is a file"))
    (tmp_path / "noconfig").mkdir()
    cases.append((tmp_path / "noconfig", "no config.json"))
    badjson = tmp_path / "badjson"
    shutil.copytree(gpt2_copy, badjson)
    (badjson / "config.json").write_text("{not json")
    cases.append((badjson, "not valid JSON"))
    listjson = tmp_path / "listjson"
    shutil.copytree(gpt2_copy, listjson)
    (listjson / "config.json").write_text("[1, 2]")
    cases.append((listjson, "JSON object"))
    noweights = tmp_path / "noweights"
    shutil.copytree(gpt2_copy, noweights)
    (noweights / "model.safetensors").unlink()
    cases.append((noweights, "no weights"))
    for folder, message in cases:
        with pytest.raises(UserError, match=message) as err:
            inspect_model(folder)
        assert err.value.fix, folder


def test_pickle_only_refused_unless_allowed(gpt2_copy: Path) -> None:
    (gpt2_copy / "model.safetensors").rename(gpt2_copy / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        inspect_model(gpt2_copy)
    info = inspect_model(gpt2_copy, allow_pickle=True)
    assert info.weight_format == "pickle" and info.parameters is None


def test_symlink_out_of_folder_refused(gpt2_copy: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    os.symlink(secret, gpt2_copy / "notes.txt")
    with pytest.raises(UserError, match="outside the model folder"):
        inspect_model(gpt2_copy)


def test_index_path_traversal_refused(gpt2_copy: Path) -> None:
    (gpt2_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(UserError, match="outside the folder"):
        inspect_model(gpt2_copy)


def test_index_missing_shard(gpt2_copy: Path) -> None:
    (gpt2_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002.safetensors"}})
    )
    with pytest.raises(UserError, match="missing shards"):
        inspect_model(gpt2_copy)


def test_unknown_task_and_untellable_task(gpt2_copy: Path) -> None:
    with pytest.raises(UserError, match="unknown task"):
        inspect_model(gpt2_copy, task="image-generation")
    config = json.loads((gpt2_copy / "config.json").read_text())
    config["architectures"] = ["GPT2Mystery"]
    (gpt2_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--task"):
        inspect_model(gpt2_copy)


def test_remote_code_needs_consent(gpt2_copy: Path) -> None:
    config = json.loads((gpt2_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (gpt2_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--trust-remote-code"):
        inspect_model(gpt2_copy)
    assert inspect_model(gpt2_copy, trust_remote_code=True).trust_remote_code


def test_header_reader_skips_metadata(tiny_gpt2: Path) -> None:
    header = read_safetensors_header(tiny_gpt2 / "model.safetensors")
    assert "__metadata__" not in header and header


def test_no_tokenizer_files_refused_with_the_fix(gpt2_copy: Path) -> None:
    """config.json + safetensors only: the server would start, then fail every request."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2_copy / name).unlink()
    assert sorted(p.name for p in gpt2_copy.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    with pytest.raises(UserError, match="no tokenizer files") as err:
        inspect_model(gpt2_copy)
    assert "tokenizer.json" in err.value.problem and "text-generation" in err.value.problem
    assert "copy tokenizer.json, tokenizer_config.json" in err.value.fix and "original model" in err.value.fix
    with pytest.raises(UserError, match="no tokenizer files"):
        inspect_model(gpt2_copy, task="feature-extraction")


@pytest.mark.parametrize(
    "files",
    [
        ["tokenizer.json"],
        ["tokenizer_config.json"],  # byte-level tokenizers (ByT5, CANINE) need no vocabulary file
        ["vocab.json", "merges.txt"],
        ["vocab.txt"],
        ["spiece.model"],
        ["tokenizer.model"],
        ["sentencepiece.bpe.model"],
        ["qwen.tiktoken"],
    ],
)
def test_any_tokenizer_file_is_enough(gpt2_copy: Path, files: list[str]) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2_copy / name).unlink()
    for name in files:
        (gpt2_copy / name).write_text("{}")
    assert inspect_model(gpt2_copy).task == "text-generation"
