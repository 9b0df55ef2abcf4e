"""Artifacts on Google Cloud Storage: a Bundle uploaded uncompressed under a gs:// prefix.

    gs://bucket/prefix/<endpoint>/<version>/config.json, *.safetensors, code/..., cloudllm.json

Each version gets its own prefix: Vertex copies AIP_STORAGE_URI whenever it starts a
replica, so files under a live model's prefix must never change. Every object carries its
sha256 as metadata, which makes a version cheap to build from the previous one: a file
already under the prefix is kept, a file another version holds is copied inside GCS
(no bytes leave the machine), and only the rest is uploaded, in parallel. The crc32c of
every upload is checked against the one the server computed. A file a first deploy hashes
while uploading it (see cloudllm.storage) carries its identity until the upload is done,
then its sha256 (a metadata update, no bytes). The manifest (cloudllm.json) is written last,
so a prefix with a manifest is complete; a complete version with the same manifest under
another name is used as it is.

google-cloud-storage honours STORAGE_EMULATOR_HOST (used by `cloudllm emulate vertex`).
"""

from __future__ import annotations

import base64
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.storage import SHA256_KEY, HashingReader, UploadResult, hash_of, holds, object_metadata
from cloudllm.retries import RETRY_SECONDS_ENV, retry_seconds

if TYPE_CHECKING:
    from cloudllm.bundle import Bundle, BundleFile

MANIFEST_NAME = "cloudllm.json"
UPLOAD_WORKERS = 8
# Files up to this size go in one request (the client library's own limit for that, which reads them
# whole: UPLOAD_WORKERS x 8 MiB at most); bigger ones as one streamed resumable upload each
# (cloudllm.storage.gcs_stream), which holds a 1 MiB block per worker instead of the library's 100 MiB
# chunks (two per worker: 1.2-1.6 GB of RSS at 1.3-4.2 GB of weights).
SINGLE_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class GcsUri:
    """gs://bucket/prefix, with the prefix kept without slashes at either end."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str) -> "GcsUri":
        if not isinstance(uri, str) or not uri.startswith("gs://"):
            raise UserError(f"--bucket {uri!r} is not a gs:// location", "write it as gs://BUCKET or gs://BUCKET/PREFIX")
        bucket, _, prefix = uri[len("gs://") :].partition("/")
        if not bucket:
            raise UserError(f"--bucket {uri!r} names no bucket", "write it as gs://BUCKET or gs://BUCKET/PREFIX")
        return cls(bucket, prefix.strip("/"))

    def child(self, *parts: str) -> "GcsUri":
        return GcsUri(self.bucket, "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/")))

    def object_name(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}/" if self.prefix else f"gs://{self.bucket}/"


def storage_client(project: str | None = None):
    """A google-cloud-storage client: Application Default Credentials, or anonymous on an emulator."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=project or "emulator")
    try:
        return storage.Client(project=project)
    except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
        raise UserError(
            f"cannot reach Google Cloud Storage: {exc}".splitlines()[0],
            "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
        ) from None


def crc32c_b64(data: bytes) -> str:
    """The base64 big-endian crc32c GCS reports in an object's `crc32c`."""
    import google_crc32c

    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


class GcsArtifacts:
    """Upload, list, download and delete artifact prefixes in one GCS project."""

    def __init__(self, client=None, project: str | None = None):
        self.client = client or storage_client(project)

    @contextmanager
    def _reachable(self, what: str) -> Iterator[None]:
        """Cloud Storage that cannot be reached, after the retries, is one line, not a traceback."""
        import requests
        from google.api_core import exceptions

        try:
            yield
        except (exceptions.RetryError, requests.exceptions.ConnectionError) as exc:
            cause = exc.cause if isinstance(exc, exceptions.RetryError) else exc
            if not isinstance(cause, requests.exceptions.ConnectionError):
                raise
            host = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
            raise DeployFailed(
                f"cannot reach Cloud Storage at {host} to {what} (retried for {retry_seconds():.0f}s)",
                f"check the network (and STORAGE_EMULATOR_HOST if you use an emulator); {RETRY_SECONDS_ENV} sets how long to retry",
            ) from None

    # --- checks ---------------------------------------------------------------------------
    def check_bucket(self, uri: GcsUri) -> None:
        """UserError unless the bucket exists and we may list its objects.

        A one-object listing (storage.objects.list, which roles/storage.objectAdmin grants), not
        a bucket lookup: buckets.get needs storage.buckets.get, which objectAdmin lacks.
        """
        from google.api_core import exceptions
        from google.cloud.storage.retry import DEFAULT_RETRY

        try:
            with self._reachable(f"look up bucket gs://{uri.bucket}"):
                blobs = self.client.list_blobs(
                    uri.bucket, prefix=uri.object_name("") or None, max_results=1, retry=DEFAULT_RETRY.with_timeout(retry_seconds())
                )
                list(blobs)
        except exceptions.Forbidden:
            raise UserError(
                f"no access to the objects of bucket gs://{uri.bucket}",
                f"grant your account roles/storage.objectAdmin on it "
                f"(gcloud storage buckets add-iam-policy-binding gs://{uri.bucket} --member=YOU --role=roles/storage.objectAdmin), "
                "or pick another --bucket",
            ) from None
        except exceptions.NotFound:
            raise UserError(
                f"bucket gs://{uri.bucket} does not exist",
                f"create it (gcloud storage buckets create gs://{uri.bucket} --location REGION) or pick another --bucket",
            ) from None

    # --- upload -------------------------------------------------------------------------
    def upload(
        self,
        bundle: "Bundle",
        dest: GcsUri,
        reporter: Reporter,
        *,
        reuse_from: GcsUri | None = None,
        kms_key: str | None = None,
    ) -> UploadResult:
        """Put bundle under dest: keep what is there, copy what reuse_from holds, upload the rest."""
        with self._reachable(f"upload to {dest}"):
            return self._upload(bundle, dest, reporter, reuse_from=reuse_from, kms_key=kms_key)

    def _upload(self, bundle: "Bundle", dest: GcsUri, reporter: Reporter, *, reuse_from: GcsUri | None, kms_key: str | None) -> UploadResult:
        from google.api_core import exceptions
        from google.cloud.storage.exceptions import DataCorruption

        bucket = self.client.bucket(dest.bucket)
        result = UploadResult(uri=dest, store="GCS")
        try:
            here, elsewhere, manifests = self._index(dest, reuse_from)
            same = None if dest.object_name(MANIFEST_NAME) in here else self._same_version(manifests, bundle.manifest_bytes)
            if same is not None:  # these very files, named from another machine's identities
                result.uri, result.kept = same, [f.name for f in bundle.files]
                return result
            to_upload: list["BundleFile"] = []
            for f in bundle.files:
                name = dest.object_name(f.name)
                if _same(here.get(name), f, result.hashes):
                    result.kept.append(f.name)
                elif (source := elsewhere.get(f.sha256)) is not None and source.size == f.size:
                    self._copy(source, bucket, name, f, kms_key)
                    result.copied.append(f.name)
                    result.copied_bytes += f.size
                else:
                    to_upload.append(f)
            if to_upload:
                self._upload_files(bucket, dest, to_upload, reporter, kms_key, result)
            stored = here.get(dest.object_name(MANIFEST_NAME))
            manifest_bytes = bundle.with_hashes(result.hashes).manifest_bytes if result.hashes else bundle.manifest_bytes
            if stored is None or stored.crc32c != crc32c_b64(manifest_bytes):  # else complete as it is: write nothing
                manifest = bucket.blob(dest.object_name(MANIFEST_NAME), kms_key_name=kms_key)
                manifest.upload_from_string(manifest_bytes, content_type="application/json", checksum="crc32c")
                _verify(manifest, crc32c_b64(manifest_bytes), MANIFEST_NAME)
        except exceptions.Forbidden as exc:
            raise UserError(
                f"no permission to write to {dest}: {_message(exc)}",
                "grant your account roles/storage.objectAdmin on the bucket, or pick another --bucket",
            ) from None
        except exceptions.NotFound as exc:
            raise UserError(f"cannot write to {dest}: {_message(exc)}", "check that the bucket exists (--bucket)") from None
        except exceptions.GoogleAPICallError as exc:
            message = _message(exc)
            if "CRC32C" in message or "MD5" in message:  # the server received other bytes than we sent
                raise DeployFailed(f"an upload to {dest} arrived corrupted: {message}", "run the same deploy again; it uploads the file anew") from None
            raise DeployFailed(f"uploading to {dest} failed: {message}", "run the same deploy again to resume") from None
        except DataCorruption as exc:
            raise DeployFailed(f"an upload to {dest} arrived corrupted: {exc}".splitlines()[0], "run the same deploy again") from None
        return result

    def _index(self, dest: GcsUri, reuse_from: GcsUri | None) -> tuple[dict, dict, list]:
        """Objects under dest by name, objects under reuse_from by sha256, and the other versions' manifests (one listing)."""
        root = reuse_from or dest
        here: dict = {}
        elsewhere: dict = {}
        manifests = []
        for blob in self.client.list_blobs(root.bucket, prefix=root.object_name("")):
            if blob.name.startswith(dest.object_name("")):
                here[blob.name] = blob
            elif blob.name.endswith("/" + MANIFEST_NAME):
                manifests.append(blob)
            sha = (blob.metadata or {}).get(SHA256_KEY)
            if sha and blob.name.startswith(root.object_name("")):
                elsewhere.setdefault(sha, blob)
        return here, elsewhere, manifests

    def _same_version(self, manifests: list, wanted: bytes) -> GcsUri | None:
        """The version whose manifest is `wanted` (by crc32c from the listing, then its bytes), if one is."""
        crc = crc32c_b64(wanted)
        for blob in manifests:
            if blob.size == len(wanted) and blob.crc32c == crc and blob.download_as_bytes() == wanted:
                return GcsUri(blob.bucket.name, blob.name[: -len("/" + MANIFEST_NAME)])
        return None

    def _copy(self, source, bucket, name: str, f: "BundleFile", kms_key: str | None) -> None:
        target = bucket.blob(name, kms_key_name=kms_key)
        target.metadata = {SHA256_KEY: f.sha256}
        from google.cloud.storage.retry import DEFAULT_RETRY

        # Rewrite is retried only with a generation precondition by default; copying the same bytes
        # to the same name twice is harmless, so transient faults are retried (the client's own Retry).
        token, _, _ = target.rewrite(source, retry=DEFAULT_RETRY)
        while token is not None:  # large objects across locations or keys take several calls
            token, _, _ = target.rewrite(source, token=token, retry=DEFAULT_RETRY)
        if target.crc32c != source.crc32c:
            raise DeployFailed(f"copying {f.name} inside GCS changed its checksum", "run the same deploy again")

    def _upload_files(self, bucket, dest: GcsUri, files: list["BundleFile"], reporter: Reporter, kms_key, result) -> None:
        """Upload in parallel, each file with its size: small ones in one request, the rest streamed.

        transfer_manager.upload_many takes one set of upload arguments for all files, so it
        cannot pass each stream's size; without it every file, however small, becomes a
        resumable upload of unknown length (an extra round trip each). Files up to
        SINGLE_REQUEST_BYTES go in one request; larger ones as one streamed resumable upload each.
        """
        from concurrent.futures import ThreadPoolExecutor

        from google.cloud.storage.retry import DEFAULT_RETRY

        from cloudllm.hashing import is_identity
        from cloudllm.storage.gcs_stream import upload_streamed

        # The client retries an upload only when it is conditional; ours may always be sent again
        # (same name, same bytes, under a version prefix nothing serves yet), e.g. when an answer is lost.
        retry = DEFAULT_RETRY.with_timeout(retry_seconds())
        total = sum(f.size for f in files)
        with reporter.transfer(total, f"uploading {len(files)} file(s) to {dest}") as advance:
            jobs = []
            for f in files:
                blob = bucket.blob(dest.object_name(f.name), kms_key_name=kms_key)
                blob.metadata = object_metadata(f)
                jobs.append((f, blob, HashingReader(f, advance, crc32c=True)))

            def upload(job) -> None:
                f, blob, reader = job
                with reader:
                    if f.size <= SINGLE_REQUEST_BYTES:
                        blob.upload_from_file(reader, size=f.size, checksum="crc32c", content_type="application/octet-stream", retry=retry)
                    else:
                        resource = upload_streamed(blob, reader, f.size, retry_seconds(), content_type="application/octet-stream")
                        blob._set_properties(resource)  # as upload_from_file does with its answer: crc32c, generation

            with ThreadPoolExecutor(max_workers=UPLOAD_WORKERS, thread_name_prefix="cloudllm-gcs") as pool:
                for _ in pool.map(upload, jobs):  # re-raises the first failure
                    pass
        for f, blob, reader in jobs:
            _verify(blob, reader.crc32c(), f.name)
            if is_identity(f.sha256):  # hashed while uploading: now the sha256 other versions copy by
                result.hashes[f.name] = hash_of(reader, f)
                blob.metadata = {**object_metadata(f), SHA256_KEY: result.hashes[f.name]}
                blob.patch(retry=retry)
            result.uploaded.append(f.name)
            result.uploaded_bytes += f.size

    # --- read, delete -----------------------------------------------------------------
    def download(self, uri: GcsUri, dest_dir: str | Path) -> Path:
        """Copy every object under uri into dest_dir (what a serving container does at start)."""
        from google.cloud.storage import transfer_manager

        dest_dir = Path(dest_dir)
        prefix = uri.object_name("")
        names = [b.name[len(prefix) :] for b in self.client.list_blobs(uri.bucket, prefix=prefix) if not b.name.endswith("/")]
        results = transfer_manager.download_many_to_path(
            self.client.bucket(uri.bucket),
            names,
            destination_directory=str(dest_dir),
            blob_name_prefix=prefix,
            worker_type=transfer_manager.THREAD,
            max_workers=UPLOAD_WORKERS,
            raise_exception=True,
        )
        del results
        return dest_dir

    def delete(self, uri: GcsUri) -> int:
        """Delete every object under uri; returns how many."""
        from google.api_core import exceptions

        with self._reachable(f"delete {uri}"):
            blobs = list(self.client.list_blobs(uri.bucket, prefix=uri.object_name("")))
            for blob in blobs:
                try:
                    blob.delete()
                except exceptions.NotFound:
                    pass
        return len(blobs)


def _message(exc) -> str:
    """The error GCS gave, from the JSON body the client library puts in its message ("POST url: {json}: (...)")."""
    import json
    import re

    text = str(exc.message or exc)
    found = re.search(r'"message":\s*("(?:[^"\\]|\\.)*")', text)
    return json.loads(found.group(1)) if found else text.splitlines()[0][:300]


def _same(blob, f: "BundleFile", hashes: dict[str, str]) -> bool:
    """blob holds f; for a file named by identity, its sha256 goes into hashes (the blob's, or hashed here
    when a killed run uploaded it but did not record it)."""
    from cloudllm.hashing import is_identity, sha256_file

    if blob is None or not holds(blob.metadata, blob.size, f):
        return False
    if is_identity(f.sha256):
        hashes[f.name] = (blob.metadata or {}).get(SHA256_KEY) or sha256_file(f.source)
    return True


def _verify(blob, local_crc32c: str, name: str) -> None:
    """The object holds the bytes read here; one that does not is deleted (a re-run must not keep it)."""
    if not blob.crc32c:
        raise DeployFailed(f"GCS reported no crc32c for {name}", "run the same deploy again")
    if blob.crc32c != local_crc32c:
        blob.delete()
        raise DeployFailed(
            f"{name} arrived corrupted (crc32c {blob.crc32c} on the server, {local_crc32c} here)",
            "run the same deploy again; it uploads the file anew",
        )
