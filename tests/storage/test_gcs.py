"""GCS artifact uploads against the storage emulator: every file arrives whole, with its sha256, whatever its size."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cloudllm import __version__
from cloudllm.bundle import ArtifactManifest, Bundle, BundleFile, ManifestEntry
from cloudllm.console import Reporter
from cloudllm.storage import gcs
from cloudllm.storage.gcs import SHA256_KEY, GcsArtifacts, GcsUri


def _bundle(folder: Path) -> Bundle:
    """Two files on disk (one over the 8 MB single-request limit) and one generated in memory."""
    folder.mkdir()
    big = folder / "model.safetensors"
    big.write_bytes(os.urandom(9 * 1024 * 1024 + 12345))
    small = folder / "config.json"
    small.write_bytes(b'{"model_type": "gpt2"}\n')
    files = [
        BundleFile(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(), source=p) for p in (big, small)
    ]
    code = b"print('hello')\n"
    files.append(BundleFile("code/inference.py", len(code), hashlib.sha256(code).hexdigest(), content=code))
    manifest = ArtifactManifest(
        cloudllm_version=__version__, model={}, settings={}, build={},
        files={f.name: ManifestEntry(size=f.size, sha256=f.sha256) for f in files},
    )  # fmt: skip
    return Bundle(files=files, manifest=manifest)


def bundle_big_file_streamed() -> bool:
    """_bundle's 9 MB file is over the one-request limit: it goes as a streamed resumable upload."""
    return 9 * 1024 * 1024 + 12345 > gcs.SINGLE_REQUEST_BYTES


class Bytes(Reporter):
    def __init__(self) -> None:
        self.advanced = 0

    def transfer(self, total_bytes: int, description: str):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            def advance(n: int) -> None:
                self.advanced += n

            yield advance

        return bar()


def test_every_file_arrives_whole_with_its_sha256(vertex_emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bundle_big_file_streamed()  # the 9 MB file goes as a streamed resumable upload
    bundle = _bundle(tmp_path / "model")
    client = vertex_emulator.storage_client()
    dest = GcsUri("cloudllm-test", "storage-test/v1")
    reporter = Bytes()

    result = GcsArtifacts(client).upload(bundle, dest, reporter)

    assert sorted(result.uploaded) == sorted(f.name for f in bundle.files)
    assert result.uploaded_bytes == reporter.advanced == bundle.total_bytes
    bucket = client.bucket("cloudllm-test")
    for f in bundle.files:
        blob = bucket.get_blob(dest.object_name(f.name))
        assert blob.download_as_bytes() == f.read_bytes()
        assert blob.metadata[SHA256_KEY] == f.sha256
    manifest = json.loads(bucket.blob(dest.object_name("cloudllm.json")).download_as_bytes())
    assert set(manifest["files"]) == {f.name for f in bundle.files}

    again = GcsArtifacts(client).upload(bundle, dest, Bytes())
    assert again.uploaded == [] and sorted(again.kept) == sorted(f.name for f in bundle.files)


def test_the_bucket_check_lists_one_object_and_names_a_missing_bucket(vertex_emulator) -> None:
    from cloudllm.errors import UserError

    store = GcsArtifacts(vertex_emulator.storage_client())
    store.check_bucket(GcsUri("cloudllm-test", "models"))
    with pytest.raises(UserError, match="bucket gs://no-such-bucket does not exist"):
        store.check_bucket(GcsUri("no-such-bucket", "models"))


def test_a_corrupted_resumable_upload_is_caught_by_its_crc32c(vertex_emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudllm.errors import DeployFailed

    assert bundle_big_file_streamed()
    bundle = _bundle(tmp_path / "model")
    dest = GcsUri("cloudllm-test", "storage-test/corrupt")
    vertex_emulator.corrupt_next_upload(lambda name: name == dest.object_name("model.safetensors"))
    with pytest.raises(DeployFailed, match=r"arrived corrupted.*run the same deploy again"):
        GcsArtifacts(vertex_emulator.storage_client()).upload(bundle, dest, Bytes())
    stored = vertex_emulator.objects("cloudllm-test", "storage-test/corrupt/")
    assert dest.object_name("cloudllm.json") not in stored  # never complete
    assert dest.object_name("model.safetensors") not in stored  # deleted: a re-run must not keep it by its identity
