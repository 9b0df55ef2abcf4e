"""A first deploy's upload to GCS reads each weight byte once and holds one small block per worker, not chunks.

google-cloud-storage's resumable uploads read 100 MiB chunks whole (two per worker alive at once); cloudllm
streams each big file as one resumable upload from its HashingReader instead (cloudllm.storage.gcs_stream).
Against the storage emulator over HTTP: the reads are counted and sized, the sha256 and crc32c checked, and a
connection cut mid-file resumes from the byte the server kept, without hashing a byte twice.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cloudllm import __version__, storage
from cloudllm.bundle import ArtifactManifest, Bundle, BundleFile, ManifestEntry
from cloudllm.console import Reporter
from cloudllm.hashing import identity
from cloudllm.storage import SHA256_KEY, gcs, gcs_stream
from cloudllm.storage.gcs import GcsArtifacts, GcsUri

MiB = 1024 * 1024


class ReadLedger:
    """What the upload's readers handed out: bytes, the largest single read, and how many read at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.largest = 0
        self.open_readers = 0
        self.most_open = 0

    def read(self, n: int) -> None:
        with self.lock:
            self.bytes_read += n
            self.largest = max(self.largest, n)

    def opened(self, delta: int) -> None:
        with self.lock:
            self.open_readers += delta
            self.most_open = max(self.most_open, self.open_readers)


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> ReadLedger:
    book = ReadLedger()
    read, enter, leave = storage.HashingReader.read, storage.HashingReader.__enter__, storage.HashingReader.__exit__

    def counted(self, size: int = -1) -> bytes:
        data = read(self, size)
        book.read(len(data))
        return data

    def entered(self):
        book.opened(+1)
        return enter(self)

    def left(self, *exc):
        book.opened(-1)
        return leave(self, *exc)

    monkeypatch.setattr(storage.HashingReader, "read", counted)
    monkeypatch.setattr(storage.HashingReader, "__enter__", entered)
    monkeypatch.setattr(storage.HashingReader, "__exit__", left)
    monkeypatch.setattr(gcs, "UPLOAD_WORKERS", 2)  # fewer workers than files: the bound is per worker, not per file
    return book


def _first_deploy_bundle(folder: Path, sizes: list[int]) -> Bundle:
    """Weights named by identity (a first deploy: hashed only by the upload) and one small file."""
    folder.mkdir()
    files = []
    for i, size in enumerate(sizes):
        path = folder / f"model-{i}.safetensors"
        path.write_bytes(os.urandom(size))
        files.append(BundleFile(path.name, size, identity(path), source=path))
    config = folder / "config.json"
    config.write_bytes(b'{"model_type": "gpt2"}\n')
    files.append(BundleFile(config.name, config.stat().st_size, hashlib.sha256(config.read_bytes()).hexdigest(), source=config))
    manifest = ArtifactManifest(
        cloudllm_version=__version__, model={}, settings={}, build={},
        files={f.name: ManifestEntry(size=f.size, sha256=f.sha256) for f in files},
    )  # fmt: skip
    return Bundle(files=files, manifest=manifest)


def _check_stored(client, dest: GcsUri, bundle: Bundle, result) -> None:
    bucket = client.bucket(dest.bucket)
    for f in bundle.files:
        data = f.source.read_bytes()
        assert bucket.blob(dest.object_name(f.name)).download_as_bytes() == data  # (the stored mediaLink may name the proxy)
        blob = bucket.get_blob(dest.object_name(f.name))
        assert blob.metadata[SHA256_KEY] == hashlib.sha256(data).hexdigest()  # the identity replaced once hashed
        if f.name.endswith(".safetensors"):
            assert result.hashes[f.name] == hashlib.sha256(data).hexdigest()


def test_a_streamed_upload_reads_each_byte_once_in_blocks_of_at_most_a_mib(vertex_emulator, ledger: ReadLedger, tmp_path: Path) -> None:
    sizes = [9 * MiB + 7, 12 * MiB + 123, 10 * MiB]  # each over the one-request size: streamed
    assert all(size > gcs.SINGLE_REQUEST_BYTES for size in sizes)
    bundle = _first_deploy_bundle(tmp_path / "model", sizes)
    client = vertex_emulator.storage_client()
    dest = GcsUri("cloudllm-test", "memory/ep/0011223344")

    result = GcsArtifacts(client).upload(bundle, dest, Reporter())

    assert ledger.bytes_read == bundle.total_bytes  # each byte read once: the hash is the upload's read
    assert ledger.largest <= gcs_stream.STREAM_BLOCK  # no chunk read whole
    assert ledger.most_open <= gcs.UPLOAD_WORKERS
    # What the upload holds, whatever the model's size: one block per worker (the one being sent).
    assert gcs.UPLOAD_WORKERS * gcs_stream.STREAM_BLOCK <= 16 * MiB
    assert sorted(result.uploaded) == sorted(f.name for f in bundle.files)
    _check_stored(client, dest, bundle, result)


class CuttingProxy:
    """A TCP relay to the storage emulator that cuts the first streamed upload after `cut_after` body bytes."""

    def __init__(self, upstream: str, cut_after: int):
        target = urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        self.upstream = (target.hostname, target.port)
        self.cut_after = cut_after
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        server = socket.create_connection(self.upstream)
        threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
        window, body = b"", None  # body: bytes of the first streamed PUT's body relayed so far
        try:
            while data := client.recv(65536):
                if self.cuts == 0:
                    if body is None:
                        window = (window + data)[-131072:]
                        at = window.find(b"Content-Range: bytes 0-")  # a whole file's upload, not a status query
                        if at >= 0 and (end := window.find(b"\r\n\r\n", at)) >= 0:
                            body = len(window) - end - 4
                    else:
                        body += len(data)
                    if body is not None and body >= self.cut_after:
                        self.cuts += 1
                        server.sendall(data)
                        break  # then cut both ways, mid-body
                server.sendall(data)
        except OSError:
            pass
        for sock in (client, server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_a_cut_connection_resumes_from_the_bytes_the_server_kept(vertex_emulator, ledger: ReadLedger, tmp_path: Path, monkeypatch) -> None:
    size = 11 * MiB + 5
    bundle = _first_deploy_bundle(tmp_path / "model", [size])
    proxy = CuttingProxy(os.environ["STORAGE_EMULATOR_HOST"], cut_after=3 * MiB)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        client = gcs.storage_client()
        dest = GcsUri("cloudllm-test", "memory/ep/cut")
        result = GcsArtifacts(client).upload(bundle, dest, Reporter())
    finally:
        proxy.close()

    assert proxy.cuts == 1
    # The server kept some of the first request; only the rest was read again (and not hashed twice).
    assert bundle.total_bytes <= ledger.bytes_read < bundle.total_bytes + size
    _check_stored(vertex_emulator.storage_client(), dest, bundle, result)
