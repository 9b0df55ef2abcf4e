"""A first deploy reads each weight byte once: files named by identity are hashed as the upload reads them.

Against both stores' emulators: the manifest written last holds the real sha256, the hash cache learns it,
a re-run finds everything in place (also after a run killed before its manifest), and the same files seen
from another checkout (other mtimes, so other identities and another version name) move nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cloudllm import __version__, hashing
from cloudllm.bundle import ArtifactManifest, Bundle, BundleFile, ManifestEntry
from cloudllm.console import Reporter
from cloudllm.hashing import cached_sha256, identity, is_identity
from cloudllm.storage import IDENTITY_KEY, SHA256_KEY, gcs, s3

MiB = 1024 * 1024


def _model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(11 * MiB + 321))  # over both stores' single-request size below
    (folder / "config.json").write_bytes(b'{"model_type": "gpt2"}\n')
    return folder


def _bundle(folder: Path, *, exact: bool) -> Bundle:
    """What build_bundle makes: weights by sha256 (exact) or by identity (a first deploy: never hashed here)."""
    files = []
    for path in sorted(folder.iterdir()):
        named = hashlib.sha256(path.read_bytes()).hexdigest() if exact or path.suffix != ".safetensors" else identity(path)
        files.append(BundleFile(path.name, path.stat().st_size, named, source=path))
    code = b"print('hello')\n"
    files.append(BundleFile("code/inference.py", len(code), hashlib.sha256(code).hexdigest(), content=code))
    manifest = ArtifactManifest(
        cloudllm_version=__version__, model={}, settings={}, build={},
        files={f.name: ManifestEntry(size=f.size, sha256=f.sha256) for f in files},
    )  # fmt: skip
    return Bundle(files=files, manifest=manifest)


class S3Store:
    def __init__(self, emulator, monkeypatch) -> None:
        import boto3

        monkeypatch.setattr(s3, "PART_BYTES", 5 * MiB)  # the weights go in three parts
        self.artifacts = s3.S3Artifacts(boto3.client("s3"))
        self.root = s3.S3Uri.parse(emulator.bucket).child("hash-while-uploading")

    def manifest(self, uri) -> dict:
        return json.loads(self.artifacts.read_manifest(uri))

    def drop_manifest(self, uri) -> None:
        self.artifacts.client.delete_object(Bucket=uri.bucket, Key=uri.key("cloudllm.json"))

    def metadata(self, uri, name: str) -> dict:
        return self.artifacts.client.head_object(Bucket=uri.bucket, Key=uri.key(name))["Metadata"]


class GcsStore:
    def __init__(self, emulator, monkeypatch) -> None:
        monkeypatch.setattr(gcs, "SINGLE_REQUEST_BYTES", 4 * MiB)  # the weights go as streamed resumable uploads
        self.client = emulator.storage_client()
        self.artifacts = gcs.GcsArtifacts(self.client)
        self.root = gcs.GcsUri.parse(emulator.bucket).child("hash-while-uploading")

    def _blob(self, uri, name: str):
        return self.client.bucket(uri.bucket).get_blob(uri.object_name(name))

    def manifest(self, uri) -> dict:
        return json.loads(self._blob(uri, "cloudllm.json").download_as_bytes())

    def drop_manifest(self, uri) -> None:
        self._blob(uri, "cloudllm.json").delete()

    def metadata(self, uri, name: str) -> dict:
        return self._blob(uri, name).metadata


@pytest.fixture(params=["s3", "gcs"])
def store(request, monkeypatch):
    if request.param == "s3":
        return S3Store(request.getfixturevalue("sagemaker_emulator"), monkeypatch)
    return GcsStore(request.getfixturevalue("vertex_emulator"), monkeypatch)


def _no_second_pass(monkeypatch) -> None:
    def refuse(path):
        raise AssertionError(f"{path} was hashed in a pass of its own")

    monkeypatch.setattr(hashing, "sha256_file", refuse)


def _forget_hashes() -> None:
    """A new machine, or a lost cache: nothing hashed here."""
    hashing._cache = None
    hashing._cache_path().unlink(missing_ok=True)


def test_a_first_upload_hashes_while_it_sends(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _model(tmp_path / "model")
    weights = folder / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    _forget_hashes()
    first = _bundle(folder, exact=False)
    assert not first.exact

    with monkeypatch.context() as patch:
        _no_second_pass(patch)
        dest = store.root.child(first.version_name)
        result = store.artifacts.upload(first, dest, Reporter(), reuse_from=store.root)

    assert result.uri == dest and result.hashes == {"model.safetensors": sha}
    assert result.uploaded_bytes == first.total_bytes
    assert store.manifest(dest)["files"]["model.safetensors"]["sha256"] == sha  # the manifest is exact
    assert cached_sha256(weights) == sha  # so the next plan compares by content without reading a byte
    if isinstance(store, GcsStore):
        assert store.metadata(dest, "model.safetensors")[SHA256_KEY] == sha  # what another version copies by
    else:
        assert is_identity(store.metadata(dest, "model.safetensors")[IDENTITY_KEY])
    exact = first.with_hashes(result.hashes)
    assert exact.exact and exact.manifest_bytes == _bundle(folder, exact=True).manifest_bytes

    # The next deploy on this machine: the same version name (identities unchanged), everything in place.
    assert exact.version_name == first.version_name
    again = store.artifacts.upload(exact, store.root.child(exact.version_name), Reporter(), reuse_from=store.root)
    assert again.uri == dest and not again.uploaded and not again.copied and len(again.kept) == len(exact.files)

    # The same files from another checkout: other mtimes, another version name; the complete version is used as it is.
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    moved = _bundle(folder, exact=True)
    assert store.root.child(moved.version_name) != dest
    elsewhere = store.artifacts.upload(moved, store.root.child(moved.version_name), Reporter(), reuse_from=store.root)
    assert elsewhere.uri == dest and not elsewhere.uploaded and not elsewhere.copied


def test_a_run_killed_before_its_manifest_is_finished_without_sending_the_weights_again(store, tmp_path: Path) -> None:
    folder = _model(tmp_path / "model")
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    _forget_hashes()
    bundle = _bundle(folder, exact=False)
    dest = store.root.child(bundle.version_name)
    store.artifacts.upload(bundle, dest, Reporter(), reuse_from=store.root)
    store.drop_manifest(dest)  # killed after the uploads, before the manifest
    _forget_hashes()  # and the hash it learned lost with it

    again = _bundle(folder, exact=False)
    assert again.version_name == bundle.version_name
    result = store.artifacts.upload(again, dest, Reporter(), reuse_from=store.root)
    assert not result.uploaded and len(result.kept) == len(again.files)
    assert result.hashes == {"model.safetensors": sha}
    assert store.manifest(dest)["files"]["model.safetensors"]["sha256"] == sha
