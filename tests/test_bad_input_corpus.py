"""The bad input corpus: one table of mistakes across CLI flags, cloudllm.yaml files, model folders
and request bodies, each answered the documented way.

CLI, file and folder cases run the CLI in-process through cloudllm.cli.main (the console script,
cloudllm.entry:main, answers a plain local `invoke` itself and hands everything else to it; a few
cases run the real console script in a subprocess) and must
give: the documented exit code (README "Exit codes": 2 bad input, 1 failed, 3 plan refused),
exactly one stderr line "error: <problem>...", no traceback, and nothing created (no endpoint
record, no server process, no partial output folder). Request bodies go to ONE real model server
on loopback and must get a 4xx with a JSON error body, the server still answering /ping after.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import pytest

from cloudllm.redact import MASK
from tests.conftest import assert_one_line_error, run_cli

HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"


# --- building bad things -------------------------------------------------------------------------
@dataclass
class Workspace:
    """A scratch folder for one case, and the good tiny GPT-2 to spoil."""

    root: Path
    model: Path

    def copy_model(self, name: str = "model") -> Path:
        folder = self.root / name
        shutil.copytree(self.model, folder)
        return folder

    def spoiled(self, how: Callable[[Path], None]) -> str:
        folder = self.copy_model("bad-model")
        how(folder)
        return str(folder)

    def yaml(self, text: str | bytes) -> str:
        (self.root / "models").mkdir(exist_ok=True)
        link = self.root / "models" / "tiny"
        if not link.exists():
            link.symlink_to(self.model, target_is_directory=True)
        path = self.root / "cloudllm.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)


def _weights(folder: Path) -> tuple[Path, bytes, int]:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    return path, data, struct.unpack("<Q", data[:8])[0]


def _truncate(folder: Path) -> None:
    path, data, _ = _weights(folder)
    path.write_bytes(data[: len(data) // 2])


def _empty_weights(folder: Path) -> None:
    _weights(folder)[0].write_bytes(b"")


def _header_length_lies(folder: Path) -> None:
    path, data, _ = _weights(folder)
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])


def _header_not_json(folder: Path) -> None:
    path, data, n = _weights(folder)
    path.write_bytes(data[:8] + b"{" * n + data[8 + n :])


def _header_sizes_lie(folder: Path) -> None:
    """A tensor's shape doubled: its header claims more bytes than its offsets hold."""
    path, data, n = _weights(folder)
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _offsets_past_the_end(folder: Path) -> None:
    path, data, n = _weights(folder)
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + 10**9, end + 10**9]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _edit_header(change: Callable[[dict, str], None]) -> Callable[[Path], None]:
    """Rewrite the safetensors header of model.safetensors (first tensor by name), data bytes unchanged."""

    def edit(folder: Path) -> None:
        path, data, n = _weights(folder)
        header = json.loads(data[8 : 8 + n])
        change(header, sorted(k for k in header if k != "__metadata__")[0])
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    return edit


def _offsets_as_strings(header: dict, name: str) -> None:
    header[name]["data_offsets"] = [str(o) for o in header[name]["data_offsets"]]


def _negative_shape(header: dict, name: str) -> None:
    header[name]["shape"] = [-d for d in header[name]["shape"]] if len(header[name]["shape"]) % 2 == 0 else [-1, -header[name]["shape"][0]]


def _overlapping_offsets(header: dict, name: str) -> None:
    """Two tensors of one size made to share the same bytes (and leave a gap): safetensors refuses overlaps."""
    sizes: dict[int, str] = {}
    for other, info in sorted(header.items()):
        if other == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        if size in sizes:
            info["data_offsets"] = list(header[sizes[size]]["data_offsets"])
            return
        sizes[size] = other
    raise AssertionError("no two tensors of one size in the tiny model")


def _unknown_dtype(header: dict, name: str) -> None:
    header[name]["dtype"] = "F12"


def _metadata_not_strings(header: dict, name: str) -> None:
    header["__metadata__"] = {"format": 5}


def _trailing_bytes(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 64)


def _tensor_in_two_files(folder: Path) -> None:
    shutil.copy(folder / "model.safetensors", folder / "model-copy.safetensors")


def _index_lies_about_a_tensor(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"no.such.tensor": "model.safetensors"}}))


def _index_traversal(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))


def _index_absolute_path(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "/etc/passwd"}}))


def _index_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )


def _index_not_json(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text("{weight_map:")


def _symlink_out(folder: Path) -> None:
    secret = folder.parent / "secret.txt"
    secret.write_text("password")
    os.symlink(secret, folder / "notes.txt")


def _weights_symlink_out(folder: Path) -> None:
    outside = folder.parent / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    os.symlink(outside, folder / "model.safetensors")


def _config(text: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / "config.json").write_text(text)

    return write


def _config_edit(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def _missing(ws: Workspace) -> str:
    return str(ws.root / "no-such-model")


def _a_file(ws: Workspace) -> str:
    (ws.root / "model.txt").write_text("not a folder")
    return str(ws.root / "model.txt")


def _an_empty_folder(ws: Workspace) -> str:
    (ws.root / "empty").mkdir()
    return str(ws.root / "empty")


# --- the table: CLI flags, cloudllm.yaml files, model folders -----------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    family: str
    argv: Callable[[Workspace], list[str]]
    code: int
    says: str  # what the one error line must name (case-insensitive)
    absent: tuple[str, ...] = ()  # strings the output must not contain (secrets)
    subprocess: bool = False  # also proven through the installed console script
    env: dict = field(default_factory=dict)


def _deploy(*extra: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["deploy", str(ws.model), "--provider", "local", "--name", "corpus", *extra]


def _package(model: Callable[[Workspace], str]) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["package", model(ws), "-o", str(ws.root / "out")]


def _inspect(how: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["inspect", ws.spoiled(how)]


def _deploy_bad(how: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["deploy", ws.spoiled(how), "--provider", "local", "--name", "corpus"]


def _apply(text: str | bytes) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["apply", "-f", ws.yaml(text)]


def _out_exists(ws: Workspace) -> list[str]:
    (ws.root / "out").mkdir()
    (ws.root / "out" / "keep.txt").write_text("mine")
    return ["package", str(ws.model), "-o", str(ws.root / "out")]


_EP = "endpoints:\n  - name: a\n    model: models/tiny\n"
# Cloud APIs that answer nothing (a closed loopback port), at URLs carrying a password.
_AWS_NOWHERE = {
    "AWS_ENDPOINT_URL": "http://alice:s3cr3tpass@127.0.0.1:9",
    "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}
_VERTEX_NOWHERE = {"CLOUDLLM_VERTEX_ENDPOINT": "http://bob:hunter2hunter2@127.0.0.1:9", "GOOGLE_CLOUD_PROJECT": "p", "CLOUDLLM_RETRY_SECONDS": "2"}

CASES = [
    # CLI flags
    Case("unknown-flag", "flags", _deploy("--frobnicate"), 2, "no such option '--frobnicate'"),
    Case("unknown-command", "flags", lambda ws: ["deplyo"], 2, "no such command 'deplyo'", subprocess=True),
    Case("unknown-provider", "flags", _deploy("--provider", "nope"), 2, "unknown provider 'nope'"),
    Case("bad-endpoint-name", "flags", _deploy("--name", "my_model!"), 2, "my_model!"),
    Case("name-too-long", "flags", _deploy("--name", "a" * 64), 2, "a" * 64),
    Case("max-batch-zero", "flags", _deploy("--max-batch", "0"), 2, "max_batch_size"),
    Case("negative-max-new-tokens", "flags", _deploy("--max-new-tokens", "-5"), 2, "max_new_tokens"),
    Case("huge-max-new-tokens", "flags", _deploy("--max-new-tokens", str(10**9)), 2, "max_new_tokens"),
    Case("max-new-tokens-not-int", "flags", _deploy("--max-new-tokens", "ten"), 2, "'ten' is not a valid integer"),
    Case("negative-batch-wait", "flags", _deploy("--batch-wait-ms", "-1"), 2, "max_batch_wait_ms"),
    Case("tag-not-key-value", "flags", _deploy("--tag", "team"), 2, "--tag 'team' is not key=value"),
    Case("option-not-key-value", "flags", _deploy("--option", "=x"), 2, "--option '=x' is not key=value"),
    Case("runtime-not-a-choice", "flags", _deploy("--runtime", "onnx"), 2, "'onnx' is not one of"),
    Case("unknown-quantize-mode", "flags", _deploy("--quantize", "int3"), 2, "int3"),
    Case("min-above-max-instances", "flags", _deploy("--min-instances", "3", "--max-instances", "2"), 2, "min_instances"),
    Case("zero-timeout", "flags", _deploy("--timeout", "0"), 2, "timeout"),
    Case("invoke-unknown-endpoint", "flags", lambda ws: ["invoke", "ghost", "hi"], 2, "no endpoint named 'ghost'", subprocess=True),
    Case("invoke-param-not-key-value", "flags", lambda ws: ["invoke", "ghost", "hi", "--param", "temperature"], 2, "--param"),
    Case("status-path-as-name", "flags", lambda ws: ["status", "../../etc"], 2, "../../etc"),
    Case("logs-bad-since", "flags", lambda ws: ["logs", "ghost", "--since", "yesterday"], 2, "--since 'yesterday'"),
    Case("serve-missing-artifact", "flags", lambda ws: ["serve", str(ws.root / "nothing")], 2, "does not exist"),
    Case("package-output-exists", "flags", _out_exists, 2, "out"),
    Case("secret-in-a-tag", "flags", _deploy("--tag", f"hf_token={HF_TOKEN}", "--name", "bad name"), 2, "bad name", absent=(HF_TOKEN,)),
    Case("aws-secret-in-name", "flags", _deploy("--name", AWS_SECRET), 2, MASK, absent=(AWS_SECRET,)),
    Case("password-in-bucket-url", "flags", lambda ws: ["iam-policy", "--provider", "sagemaker", "--bucket", "https://alice:s3cr3tpass@example.com/x"],
         2, "not an s3:// location", absent=("s3cr3tpass",)),  # fmt: skip
    Case("hf-token-as-endpoint-name", "flags", lambda ws: ["invoke", HF_TOKEN, "hi"], 2, "invalid endpoint name", absent=(HF_TOKEN,)),
    Case("aws-key-id-as-role", "flags", lambda ws: ["iam-policy", "--provider", "sagemaker", "--role", AWS_KEY_ID], 2,
         "not an iam role arn", absent=(AWS_KEY_ID,)),  # fmt: skip
    Case("aws-unreachable-password-in-url", "flags", lambda ws: ["list", "--provider", "sagemaker", "--region", "us-east-1"], 1,
         "cannot reach aws", absent=("s3cr3tpass", AWS_SECRET), subprocess=True, env=_AWS_NOWHERE),  # fmt: skip
    Case("vertex-unreachable-password-in-url", "flags", lambda ws: ["status", "ghost", "--provider", "vertex"], 1,
         "cannot reach vertex ai", absent=("hunter2hunter2",), env=_VERTEX_NOWHERE),  # fmt: skip
    Case("gcs-unreachable", "flags", lambda ws: ["deploy", str(ws.model), "--provider", "vertex", "--name", "corpus", "--instance", "n1-standard-4",
                                                  "--runtime", "handler", "--bucket", "gs://corpus-bucket/m"], 1,
         "cannot reach cloud storage", env={**_VERTEX_NOWHERE, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}),  # fmt: skip
    # cloudllm.yaml files
    Case("yaml-missing-file", "yaml", lambda ws: ["apply", "-f", str(ws.root / "nope.yaml")], 2, "nope.yaml"),
    Case("yaml-is-a-folder", "yaml", lambda ws: ["apply", "-f", str(ws.root)], 2, "is a folder"),
    Case("yaml-not-yaml", "yaml", _apply("endpoints:\n  - name: a\n    model: [models/tiny\n"), 2, "not valid yaml", subprocess=True),
    Case("yaml-empty", "yaml", _apply("\n"), 2, "the file is empty"),
    Case("yaml-not-utf8", "yaml", _apply(b"endpoints:\n  - name: \xff\xfe\n"), 2, "utf-8"),
    Case("yaml-list-at-top", "yaml", _apply("- name: a\n"), 2, "expected a mapping"),
    Case("yaml-key-typo", "yaml", _apply(_EP + "    instanec: ml.g5.xlarge\n"), 2, "did you mean 'instance'"),
    Case("yaml-wrong-type", "yaml", _apply(_EP + "    max_instances: two\n"), 2, "max_instances"),
    Case("yaml-duplicate-names", "yaml", _apply(_EP + "  - name: a\n    model: models/tiny\n"), 2, "listed twice"),
    Case("yaml-model-missing", "yaml", _apply("endpoints:\n  - name: a\n    model: models/none\n"), 2, "does not exist"),
    Case("yaml-negative-tokens", "yaml", _apply(_EP + "    serving:\n      max_new_tokens: -1\n"), 2, "max_new_tokens"),
    Case("yaml-secret-in-file", "yaml", _apply(f"endpoints:\n  - name: {HF_TOKEN}\n    model: models/tiny\n"), 2,
         "endpoints[0].name", absent=(HF_TOKEN,)),  # fmt: skip
    # model folders
    Case("model-missing", "model", lambda ws: ["inspect", _missing(ws)], 2, "does not exist"),
    Case("model-is-a-file", "model", lambda ws: ["inspect", _a_file(ws)], 2, "is a file"),
    Case("model-empty-folder", "model", lambda ws: ["deploy", _an_empty_folder(ws), "--provider", "local"], 2, "config.json"),
    Case("safetensors-truncated", "model", _deploy_bad(_truncate), 2, "truncated", subprocess=True),
    Case("safetensors-empty", "model", _inspect(_empty_weights), 2, "model.safetensors"),
    Case("safetensors-header-length-lies", "model", _inspect(_header_length_lies), 2, "not a valid safetensors"),
    Case("safetensors-header-not-json", "model", _inspect(_header_not_json), 2, "corrupt"),
    Case("safetensors-header-sizes-lie", "model", _deploy_bad(_header_sizes_lie), 2, "claims"),
    Case("safetensors-offsets-past-end", "model", _inspect(_offsets_past_the_end), 2, "model.safetensors"),
    Case("index-path-traversal", "model", _deploy_bad(_index_traversal), 2, "outside the folder"),
    Case("index-absolute-path", "model", _inspect(_index_absolute_path), 2, "/etc/passwd"),
    Case("index-missing-shard", "model", _inspect(_index_missing_shard), 2, "missing shards"),
    Case("index-not-json", "model", _inspect(_index_not_json), 2, "model.safetensors.index.json"),
    Case("symlink-out-of-folder", "model", _deploy_bad(_symlink_out), 2, "outside the model folder"),
    Case("weights-symlink-out-of-folder", "model", _inspect(_weights_symlink_out), 2, "outside the model folder"),
    Case("config-not-json", "model", _deploy_bad(_config("{not json")), 2, "not valid json", subprocess=True),
    Case("config-a-list", "model", _inspect(_config("[1, 2]")), 2, "json object"),
    Case("config-missing", "model", _inspect(_no_config), 2, "no config.json"),
    Case("no-weights", "model", _package(lambda ws: ws.spoiled(_no_weights)), 2, "no weights"),
    Case("pickle-weights-only", "model", _package(lambda ws: ws.spoiled(_pickle_only)), 2, "pickle"),
    Case("remote-code-not-allowed", "model", _deploy_bad(_config_edit(auto_map={"AutoModelForCausalLM": "x.Y"})), 2,
         "--trust-remote-code"),  # fmt: skip
    Case("unknown-architecture", "model", _inspect(_config_edit(architectures=["GPT2Mystery"])), 2, "--task"),
    Case("no-tokenizer-files", "model", _deploy_bad(_no_tokenizer), 2, "no tokenizer files", subprocess=True),
    # what the loader (safetensors, transformers' config) would refuse on the server, caught at inspect
    Case("architectures-a-string", "model", _inspect(_config_edit(architectures="GPT2LMHeadModel")), 2, "architectures"),
    Case("architectures-of-numbers", "model", _deploy_bad(_config_edit(architectures=[1, 2])), 2, "architectures"),
    Case("config-size-a-string", "model", _inspect(_config_edit(n_layer="two")), 2, "n_layer"),
    Case("config-negative-size", "model", _inspect(_config_edit(vocab_size=-5)), 2, "vocab_size"),
    Case("config-dtype-unknown", "model", _inspect(_config_edit(torch_dtype="float13")), 2, "torch_dtype"),
    Case("config-auto-map-a-list", "model", _inspect(_config_edit(auto_map=["x"])), 2, "auto_map"),
    Case("data-offsets-strings", "model", _inspect(_edit_header(_offsets_as_strings)), 2, "data_offsets"),
    Case("shape-negative", "model", _deploy_bad(_edit_header(_negative_shape)), 2, "shape"),
    Case("offsets-overlap", "model", _inspect(_edit_header(_overlapping_offsets)), 2, "overlaps"),
    Case("dtype-unknown", "model", _inspect(_edit_header(_unknown_dtype)), 2, "unknown dtype"),
    Case("metadata-not-strings", "model", _inspect(_edit_header(_metadata_not_strings)), 2, "__metadata__"),
    Case("bytes-after-last-tensor", "model", _inspect(_trailing_bytes), 2, "after its last tensor"),
    Case("tensor-in-two-files", "model", _deploy_bad(_tensor_in_two_files), 2, "in two weight files"),
    Case("index-names-a-missing-tensor", "model", _inspect(_index_lies_about_a_tensor), 2, "no.such.tensor"),
    # numbers and characters no endpoint or policy can take
    Case("scale-target-inf", "flags", _deploy("--scale-target", "inf"), 2, "scale_target"),
    Case("scale-target-nan", "flags", _deploy("--scale-target", "nan"), 2, "scale_target"),
    Case("batch-wait-inf", "flags", _deploy("--batch-wait-ms", "inf"), 2, "max_batch_wait_ms"),
    Case("param-nan", "flags", lambda ws: ["invoke", "ghost", "hi", "--param", "temperature=NaN", "--provider", "local"], 2, "temperature=NaN"),
    Case("param-too-large", "flags", lambda ws: ["invoke", "ghost", "hi", "--param", "top_p=1e999", "--provider", "local"], 2, "1e999"),
    Case("body-infinity", "flags", lambda ws: ["invoke", "ghost", "--body", '{"inputs": "x", "parameters": {"top_p": Infinity}}',
                                               "--provider", "local"], 2, "Infinity"),  # fmt: skip
    Case("invoke-timeout-nan", "flags", lambda ws: ["invoke", "ghost", "hi", "--timeout", "nan"], 2, "--timeout"),
    Case("invoke-timeout-inf", "flags", lambda ws: ["invoke", "ghost", "hi", "--timeout", "inf"], 2, "--timeout"),
    Case("home-is-a-file", "flags", lambda ws: ["list"], 2, "is a file", env={"CLOUDLLM_HOME": "/dev/null"}),
    Case("yaml-nul-in-path", "yaml", _apply(_EP.replace("models/tiny", '"models/ti\\0ny"')), 2, "NUL"),
    Case("yaml-deep-nesting", "yaml", _apply(_EP + "    options:\n      x: " + "[" * 5000 + "]" * 5000 + "\n"), 2, "nests deeper"),
    Case("yaml-deep-block-nesting", "yaml", _apply(_EP + "    options:\n" + "".join(f"{'  ' * (i + 3)}k{i}:\n" for i in range(60))), 2,
         "nests deeper"),  # fmt: skip
    Case("yaml-unset-variable", "yaml", _apply(_EP + "    options:\n      hf_token: ${CLOUDLLM_CORPUS_UNSET}\n"), 2,
         "${CLOUDLLM_CORPUS_UNSET} is not set"),  # fmt: skip
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


# Bookkeeping a refused command may leave: the per-endpoint lock file and the file-hash cache.
_BOOKKEEPING = ("locks", "cache")


def _home_files(home: Path) -> set[str]:
    return {p for p in _tree(home) if p.split("/")[0] not in _BOOKKEEPING and (home / p).is_file()}


def _run_in_process(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from cloudllm.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_the_corpus_is_large_and_covers_every_family() -> None:
    families = {case.family for case in CASES}
    assert families == {"flags", "yaml", "model"}
    assert len(CASES) + len(REQUEST_CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_cli_input(case: Case, tmp_path: Path, tiny_gpt2: Path, cloudllm_home: Path, capsys, monkeypatch) -> None:
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    ws = Workspace(tmp_path / "ws", tiny_gpt2)
    ws.root.mkdir()
    argv = case.argv(ws)
    home_before, ws_before = _home_files(cloudllm_home), _tree(ws.root)

    code, out, err = _run_in_process(argv, capsys)

    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, (code, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    line = lines[0]
    assert line.startswith("error: "), line
    assert case.says.lower() in line.lower(), line
    for secret in case.absent:
        assert secret not in err and secret not in out
    # Nothing created: no endpoint record or server state, no (partial) output folder.
    assert _home_files(cloudllm_home) == home_before
    assert not list(cloudllm_home.glob("local/*/state.json")) and not list(cloudllm_home.glob("endpoints/*"))
    assert _tree(ws.root) == ws_before


SUBPROCESS_CASES = [case for case in CASES if case.subprocess]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_bad_cli_input_through_the_console_script(case: Case, tmp_path: Path, tiny_gpt2: Path, cloudllm_home: Path) -> None:
    ws = Workspace(tmp_path / "ws", tiny_gpt2)
    ws.root.mkdir()
    argv = case.argv(ws)
    before = _tree(ws.root)
    result = run_cli(*argv, env={"CLOUDLLM_HOME": str(cloudllm_home), **case.env})
    assert_one_line_error(result, code=case.code, contains=case.says)
    assert not [secret for secret in case.absent if secret in result.stdout + result.stderr]
    assert _tree(ws.root) == before
    assert not list(cloudllm_home.glob("local/*/state.json")) and not list(cloudllm_home.glob("endpoints/*"))


# --- request bodies: one real model server ----------------------------------------------------------
@dataclass(frozen=True)
class RequestCase:
    id: str
    status: int
    says: str
    body: bytes | None = None
    json_body: object = None
    method: str = "POST"
    path: str = "/invocations"
    headers: dict = field(default_factory=dict)


def _j(value: object) -> bytes:
    return json.dumps(value).encode()


REQUEST_CASES = [
    RequestCase("malformed-json", 400, "not valid json", body=b'{"inputs": "a",'),
    RequestCase("empty-body", 400, "empty", body=b""),
    RequestCase("json-with-nan", 400, "not valid json", body=b'{"inputs": "a", "parameters": {"temperature": NaN}}'),
    RequestCase("deeply-nested", 400, "not valid json", body=b"[" * 100_000 + b"]" * 100_000),
    RequestCase("invalid-utf8", 400, "utf-8", body=b'{"inputs": "\xff\xfe"}'),
    RequestCase("overlong-utf8", 400, "utf-8", body=b'{"inputs": "\xc0\xaf"}'),
    RequestCase("huge-payload", 413, "limit", body=_j({"inputs": "x" * (7 * 1024 * 1024)})),
    RequestCase("top-level-number", 422, "inputs", body=b"42"),
    RequestCase("missing-inputs", 422, "inputs", json_body={"parameters": {}}),
    RequestCase("inputs-wrong-type", 422, "string", json_body={"inputs": 12}),
    RequestCase("inputs-empty", 422, "empty", json_body={"inputs": ""}),
    RequestCase("parameters-not-object", 422, "parameters", json_body={"inputs": "a", "parameters": [1]}),
    RequestCase("max-new-tokens-negative", 422, "max_new_tokens", json_body={"inputs": "a", "parameters": {"max_new_tokens": -1}}),
    RequestCase("max-new-tokens-huge", 422, "max_new_tokens", json_body={"inputs": "a", "parameters": {"max_new_tokens": 10**12}}),
    RequestCase("max-new-tokens-string", 422, "integer", json_body={"inputs": "a", "parameters": {"max_new_tokens": "5"}}),
    RequestCase("max-new-tokens-float", 422, "integer", json_body={"inputs": "a", "parameters": {"max_new_tokens": 2.5}}),
    RequestCase("temperature-zero", 422, "temperature", json_body={"inputs": "a", "parameters": {"temperature": 0}}),
    RequestCase("top-p-above-one", 422, "top_p", json_body={"inputs": "a", "parameters": {"top_p": 1.5}}),
    RequestCase("unknown-parameter", 422, "frobnicate", json_body={"inputs": "a", "parameters": {"frobnicate": True}}),
    RequestCase("stream-not-bool", 422, "stream", json_body={"inputs": "a", "stream": "yes"}),
    RequestCase("prompt-too-long", 422, "at most", json_body={"inputs": "word " * 5000}),
    RequestCase("too-many-inputs", 422, "at most 64", json_body={"inputs": ["a"] * 10_000}),
    RequestCase("one-input-not-a-string", 422, "inputs[1]", json_body={"inputs": ["a", {"b": 1}]}),
    RequestCase("stop-not-a-list", 422, "stop", json_body={"inputs": "a", "parameters": {"stop": 5}}),
    RequestCase("wrong-method", 405, "", method="GET"),
    RequestCase("unknown-route", 404, "/nope", path="/nope", json_body={"inputs": "a"}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path):
    """The tiny GPT-2 packaged by `cloudllm package` and served by its own code/serve.py on loopback."""
    from cloudllm import api
    from tests.runtime.conftest import ServerProcess

    artifact = tmp_path_factory.mktemp("corpus") / "artifact"
    api.package(tiny_gpt2, artifact, serving={"max_new_tokens": 32, "max_input_tokens": 64, "max_total_tokens": 128})
    process = ServerProcess(artifact).wait_ready()
    yield process
    assert process.stop() == 0


@pytest.mark.parametrize("case", REQUEST_CASES, ids=[c.id for c in REQUEST_CASES])
def test_bad_request_body(case: RequestCase, server) -> None:
    headers = {"content-type": "application/json", **case.headers}
    content = case.body if case.body is not None else (_j(case.json_body) if case.json_body is not None else None)
    response = httpx.request(case.method, server.url + case.path, content=content, headers=headers, timeout=120)
    assert response.status_code == case.status, (response.status_code, response.text[:500])
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and "\n" not in body["error"]
    assert case.says.lower() in body["error"].lower(), body
    assert "Traceback" not in response.text
    assert httpx.get(server.url + "/ping", timeout=30).status_code == 200


def test_valid_unicode_is_served_and_the_server_stayed_healthy(server) -> None:
    """After the whole corpus: odd but valid text is answered, and no bad request left a trace of a crash."""
    bodies = [_j({"inputs": text, "parameters": {"max_new_tokens": 3}})
              for text in ("héllo wörld 👋🏽", "مرحبا بالعالم", "e\u0301\u0301\u0301", "\u0000nul\u200b", "\U0010fffd")]
    bodies.append(b'\xef\xbb\xbf{"inputs": "a byte order mark first"}')  # RFC 8259 lets a parser ignore it
    bodies.append(b'{"inputs": "a lone \\ud800 surrogate"}')  # valid JSON; the tokenizer replaces it
    for body in bodies:
        response = httpx.post(server.url + "/invocations", content=body, headers={"content-type": "application/json"}, timeout=120)
        assert response.status_code == 200, (body, response.text)
    assert httpx.get(server.url + "/ping").status_code == 200
    records = server.log_records()
    assert not [r for r in records if r.get("event") == "internal_error" or r.get("status", 0) >= 500]
    assert "Traceback" not in server.log()


def test_secrets_in_flags_and_files_never_reach_the_output(tmp_path: Path, tiny_gpt2: Path, cloudllm_home: Path, capsys) -> None:
    """--option/--tag values and cloudllm.yaml options with credentials: not in --json plans, not in text output."""
    ws = Workspace(tmp_path / "ws", tiny_gpt2)
    ws.root.mkdir()
    options = ["--option", f"hf_token={HF_TOKEN}", "--option", f"note=uses {AWS_SECRET}"]
    tags = ["--tag", f"api_key={AWS_KEY_ID}"]
    yaml_file = ws.yaml(f"endpoints:\n  - name: a\n    model: models/tiny\n    options:\n      hf_token: {HF_TOKEN}\n      note: uses {AWS_SECRET}\n")
    runs = [
        # Tags are taken: the plan and its JSON carry them masked.
        (["deploy", str(tiny_gpt2), "--provider", "local", "--name", "quiet", "--dry-run", "--json", *tags], 0),
        (["deploy", str(tiny_gpt2), "--provider", "local", "--name", "quiet", "--dry-run", *tags], 0),
        (["plan", str(tiny_gpt2), "--json", *tags], 0),
        # Options the local provider does not take are refused, and the refusal does not repeat their values.
        (["deploy", str(tiny_gpt2), "--provider", "local", "--name", "quiet", "--dry-run", "--json", *options, *tags], 2),
        (["plan", str(tiny_gpt2), "--json", *options], 2),
        (["apply", "-f", yaml_file, "--dry-run", "--json"], 2),
    ]
    for argv, expected in runs:
        code, out, err = _run_in_process(argv, capsys)
        assert code == expected, (argv, err)
        assert not [s for s in (HF_TOKEN, AWS_SECRET, AWS_KEY_ID) if s in out + err], argv
    assert not list(cloudllm_home.glob("endpoints/*")) and not list(cloudllm_home.glob("local/*/state.json"))


# --- request bodies from hostile clients: names and values the model server must still answer with a 4xx ---
HOSTILE_REQUEST_CASES = [
    RequestCase("field-name-lone-surrogate", 422, "unknown body field", body=b'{"inputs": "a", "\\ud800": 1}'),
    RequestCase("parameter-name-control-characters", 422, "unknown parameter", body=b'{"inputs": "a", "parameters": {"\\u0000\\n\\udfff": 1}}'),
    RequestCase("field-name-100-kb", 422, "unknown body field", body=b'{"inputs": "a", "' + b"k" * 100_000 + b'": 1}'),
    RequestCase("repetition-penalty-tiny", 422, "repetition_penalty",
                json_body={"inputs": "a", "parameters": {"repetition_penalty": 1e-300, "do_sample": True}}),  # fmt: skip
    RequestCase("prompt-of-megabytes", 422, "characters long", json_body={"inputs": "x" * 5_000_000}),
]


@pytest.mark.parametrize("case", HOSTILE_REQUEST_CASES, ids=[c.id for c in HOSTILE_REQUEST_CASES])
def test_hostile_request_body(case: RequestCase, server) -> None:
    test_bad_request_body(case, server)
