"""The artifact: weights cloned or copied (never sharing an inode with the model), rendered code/, a manifest that hashes every file, byte-identical rebuilds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cloudllm import api
from cloudllm.bundle import MANIFEST_NAME, build_bundle, portable_tokenizer_config, read_manifest
from cloudllm.errors import UserError
from cloudllm.model_source import inspect_model
from cloudllm.plan import serving_settings
from cloudllm.spec import spec_from_kwargs


def _bundle(model: Path, **kwargs):
    info = inspect_model(model)
    return build_bundle(info, serving_settings(spec_from_kwargs(model, **kwargs), info))


def test_layout_and_manifest(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    bundle = api.package(tiny_gpt2, out)
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME} <= names
    assert {"code/inference.py", "code/serve.py", "code/requirements.txt", "code/settings.json"} <= names
    assert "code/cloudllm_runtime/__init__.py" in names and "code/cloudllm_runtime/settings.py" in names
    manifest = read_manifest(out)
    assert set(manifest.files) == names - {MANIFEST_NAME}
    for name, entry in manifest.files.items():
        data = (out / name).read_bytes()
        assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest(), name
    assert manifest.model["task"] == "text-generation"
    assert manifest.settings["task"] == "text-generation"
    assert bundle.digest == manifest.digest


def test_resaving_the_model_leaves_the_artifact_as_its_manifest_says(tiny_gpt2: Path, tmp_path: Path) -> None:
    """save_pretrained / safetensors' save_file truncate and rewrite the same inode: through a hard
    link that changed the deployed bytes (and killed a live server with SIGBUS). A clone or copy does not."""
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    out = tmp_path / "artifact"
    api.package(model, out)
    assert os.stat(out / "model.safetensors").st_ino != os.stat(model / "model.safetensors").st_ino
    with open(model / "model.safetensors", "r+b") as fh:  # in place, as save_file does
        fh.truncate(0)
        fh.write(b"re-saved")
    data = (out / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == read_manifest(out).files["model.safetensors"].sha256


@pytest.mark.parametrize("where", ["model", "parent"])
def test_package_into_the_model_folder_or_its_parent_is_refused_and_deletes_nothing(tiny_gpt2: Path, tmp_path: Path, where: str) -> None:
    work = tmp_path / "work"
    model = work / "model"
    shutil.copytree(tiny_gpt2, model)
    (work / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    out = model if where == "model" else model.parent
    with pytest.raises(UserError, match="overlaps the model folder"):
        api.package(model, out, overwrite=True)
    with pytest.raises(UserError, match="overlaps the model folder"):
        api.package(model, model / "artifact", overwrite=True)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before


def test_overwrite_replaces_only_an_artifact_cloudllm_wrote(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(UserError, match="not a cloudllm artifact"):
        api.package(tiny_gpt2, out, overwrite=True)
    assert (out / "cat.jpg").read_bytes() == b"meow"


def test_unwritable_output_is_one_line_and_leaves_nothing(tiny_gpt2: Path, tmp_path: Path, monkeypatch) -> None:
    tmp_path = tmp_path / "w"
    tmp_path.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write the artifact"):
        api.package(tiny_gpt2, blocker / "artifact")
    out = tmp_path / "artifact"
    api.package(tiny_gpt2, out)
    before = read_manifest(out).digest

    def full_disk(source, dest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cloudllm.bundle.copy_file", full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        api.package(tiny_gpt2, out, overwrite=True, serving={"max_new_tokens": 3})
    assert read_manifest(out).digest == before  # the previous artifact, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "artifact"]


def test_deterministic(tiny_gpt2: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    api.package(tiny_gpt2, a)
    api.package(tiny_gpt2, b)
    for path in a.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (b / path.relative_to(a)).read_bytes(), path


def test_digests_split_weights_and_code(tiny_gpt2: Path) -> None:
    base = _bundle(tiny_gpt2).manifest
    capped = _bundle(tiny_gpt2, serving={"max_new_tokens": 7}).manifest
    assert base.weights_digest == capped.weights_digest
    assert base.code_digest != capped.code_digest
    assert base.digest != capped.digest


def test_the_folder_name_is_not_part_of_the_code(tiny_gpt2: Path, tmp_path: Path) -> None:
    """The same model under another name (a symlink, a renamed checkout, the path `apply` resolves) deploys the same code: no spurious update."""
    (tmp_path / "renamed").symlink_to(tiny_gpt2, target_is_directory=True)
    direct, renamed = _bundle(tiny_gpt2).manifest, _bundle(tmp_path / "renamed").manifest
    assert (direct.code_digest, direct.digest) == (renamed.code_digest, renamed.digest)


def test_tokenizer_config_made_loadable_by_transformers_4(tiny_gpt2: Path, tmp_path: Path) -> None:
    """transformers 5 writes tokenizer_class TokenizersBackend, which 4.x (in the HF containers) lacks."""
    assert json.loads((tiny_gpt2 / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    out = tmp_path / "artifact"
    api.package(tiny_gpt2, out)
    fixed = json.loads((out / "tokenizer_config.json").read_text())
    assert fixed["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in fixed
    # Rewritten, never edited in place: the source is untouched.
    assert json.loads((tiny_gpt2 / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.decode(tok("Once upon a time")["input_ids"]) == "Once upon a time"
    assert portable_tokenizer_config(b'{"tokenizer_class": "GPT2Tokenizer"}') is None


def test_existing_output_needs_overwrite_and_failure_leaves_nothing(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    api.package(tiny_gpt2, out)
    with pytest.raises(UserError, match="--overwrite"):
        api.package(tiny_gpt2, out)
    api.package(tiny_gpt2, out, overwrite=True)
    assert read_manifest(out)

    bundle = _bundle(tiny_gpt2)
    broken = tmp_path / "broken"
    src = tmp_path / "vanishing.safetensors"
    shutil.copy(tiny_gpt2 / "model.safetensors", src)
    from dataclasses import replace

    bundle.files[0] = replace(bundle.files[0], source=src, content=None)
    src.unlink()
    with pytest.raises(UserError, match="cannot write the artifact"):
        bundle.write(broken)
    assert not broken.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".broken")]


def test_hash_cache_serves_unchanged_files(tiny_gpt2: Path, tmp_path: Path) -> None:
    from cloudllm import hashing

    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = hashing.sha256_file(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    lines = (Path(os.environ["CLOUDLLM_HOME"]) / "cache" / "sha256.json").read_text().splitlines()
    assert first in json.loads(lines[-1]).values()
    path.write_bytes(b"b" * 1000)  # new mtime: rehashed
    assert hashing.sha256_file(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_hash_cache_appends_one_line_per_file_and_survives_damage(tmp_path: Path, monkeypatch) -> None:
    """Linear, not quadratic: each hashed file appends one line (the whole cache was rewritten per file);
    a torn or hand-edited line costs that entry only."""
    from cloudllm import hashing

    cache_file = Path(os.environ["CLOUDLLM_HOME"]) / "cache" / "sha256.json"
    files = []
    for n in range(300):
        path = tmp_path / f"f{n}"
        path.write_bytes(str(n).encode())
        files.append(path)
    digests = [hashing.sha256_file(p) for p in files]
    assert len(cache_file.read_text().splitlines()) == 1 + 300  # the header, then one line per file
    with cache_file.open("a") as fh:
        fh.write('{"torn": "ab\n["not a dict"]\n{"k": "not-a-hash"}\n')
    monkeypatch.setattr(hashing, "_cache", None)  # a new process reads the file back
    assert [hashing.cached_sha256(p) for p in files] == digests
    assert "k" not in hashing._load()


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a cloudllm artifact"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        read_manifest(tmp_path)


def test_package_log_payloads_flag_reaches_the_servers_settings(tiny_gpt2: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    for flags, expected in (([], False), (["--log-payloads"], True)):
        out = tmp_path / f"artifact-{expected}"
        result = run_cli("package", str(tiny_gpt2), "-o", str(out), *flags)
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "code" / "settings.json").read_text())["log_payloads"] is expected


def test_versions_in_cloudllm_home_share_one_verified_copy_per_content(tiny_gpt2: Path, tmp_path: Path) -> None:
    """Local endpoints' artifacts live in CLOUDLLM_HOME: a settings change copies no weights again,
    no version shares an inode with the model folder, and a blob nothing links to is removed."""
    home = Path(os.environ["CLOUDLLM_HOME"])
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    first = api.package(model, home / "local" / "demo" / "v1")
    api.package(model, home / "local" / "demo" / "v2", serving={"max_new_tokens": 5})
    a, b = (os.stat(home / "local" / "demo" / v / "model.safetensors") for v in ("v1", "v2"))
    assert a.st_ino == b.st_ino != os.stat(model / "model.safetensors").st_ino
    blob = home / "blobs" / first.manifest.files["model.safetensors"].sha256
    assert blob.is_file() and blob.stat().st_ino == a.st_ino
    shutil.rmtree(home / "local" / "demo")
    api.package(model, home / "local" / "other", serving={"max_new_tokens": 6})  # its own link keeps the blob
    assert blob.is_file()
    shutil.rmtree(home / "local" / "other")
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())  # same bytes, new inode
    api.package(tiny_gpt2, tmp_path / "elsewhere")  # written outside CLOUDLLM_HOME: copies, and the clean-up runs only for home
    api.package(model, home / "local" / "third")
    shutil.rmtree(home / "local" / "third")
    api.package(tiny_gpt2, home / "local" / "fourth", serving={"max_new_tokens": 9})
    assert sorted(p.name for p in (home / "blobs").iterdir()) == sorted(
        {e.sha256 for n, e in read_manifest(home / "local" / "fourth").files.items() if not n.startswith("code/") and n != "tokenizer_config.json"}
    )


def test_the_store_bundle_leaves_settings_to_the_environment_the_runtime_reads(tiny_gpt2: Path, tmp_path: Path, monkeypatch) -> None:
    from cloudllm_runtime import toolkit
    from cloudllm_runtime.server import StartupError, load_settings

    base, capped = _bundle(tiny_gpt2), _bundle(tiny_gpt2, serving={"max_new_tokens": 7})
    assert base.digest != capped.digest and base.stored.digest == capped.stored.digest
    assert "code/settings.json" not in {f.name for f in capped.stored.files} | set(capped.stored.manifest.files)
    env = capped.settings_env
    monkeypatch.setenv("CLOUDLLM_SETTINGS", env["CLOUDLLM_SETTINGS"])
    out = tmp_path / "artifact"
    api.package(tiny_gpt2, out)  # its code/settings.json says the default; the environment wins
    assert load_settings(str(out)).max_new_tokens == 7
    assert toolkit.load_settings(str(out)).max_new_tokens == 7
    monkeypatch.setenv("CLOUDLLM_SETTINGS", "[1")
    with pytest.raises(StartupError, match="CLOUDLLM_SETTINGS"):
        load_settings(str(out))


def test_serving_intra_op_threads_reaches_the_servers_settings(tiny_gpt2: Path) -> None:
    """spec serving.intra_op_threads is the runtime's setting; unset, settings.json does not carry it (old digests hold)."""
    assert _bundle(tiny_gpt2, serving={"intra_op_threads": 3}).manifest.settings["intra_op_threads"] == 3
    assert "intra_op_threads" not in _bundle(tiny_gpt2).manifest.settings
