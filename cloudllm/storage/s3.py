"""Artifacts on Amazon S3: a Bundle uploaded uncompressed under an s3:// prefix.

    s3://bucket/prefix/<endpoint>/<version>/config.json, *.safetensors, code/..., cloudllm.json

SageMaker reads the prefix itself (`ModelDataSource` S3Prefix, CompressionType None): no
tarball, no repack. Each version gets its own prefix, because SageMaker copies the prefix
whenever it starts an instance (scale-out, replacement, rollback): files under a live
model's prefix must never change. Building a version costs only what changed: a file
already under the prefix is kept, a file another version of the endpoint holds is copied
inside S3 (no bytes leave the machine), and only the rest is uploaded, in parallel
multipart parts through boto3's transfer manager. Every object carries its sha256 as
metadata (or its identity, when a first deploy hashes it while uploading it: see
cloudllm.storage); S3 checks each part's CRC32 that boto3 sends. The manifest (cloudllm.json),
with every file's sha256, is written last, so a prefix with a manifest is complete. A complete
version with the same manifest under another name is used as it is.

Server-side encryption is always on: SSE-S3 (AES256), or SSE-KMS with a customer key.
boto3 honours AWS_ENDPOINT_URL (used by `cloudllm emulate sagemaker`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudllm.console import Reporter, human_bytes
from cloudllm.errors import DeployFailed, UserError
from cloudllm.storage import SHA256_KEY, HashingReader, UploadResult, hash_of, holds, object_metadata, return_freed_buffers

if TYPE_CHECKING:
    from cloudllm.bundle import Bundle, BundleFile

MANIFEST_NAME = "cloudllm.json"
UPLOAD_WORKERS = 10
# 8 MiB parts (the AWS CLI's own default): a file object's parts are held in memory until sent
# (s3transfer buffers every part of one, seekable or not; only a path is read by range), so the parts
# in memory, not the model's size, set the CLI's peak RSS: (IN_MEMORY_PARTS + SUBMISSION_THREADS) x
# PART_BYTES = 96 MiB at most (each submission thread reads its file's next part before it waits for
# room). 10,000 parts (S3's limit) x 8 MiB covers a 78 GiB file; s3transfer widens the parts of a
# bigger one by itself. Measured in BENCHMARKS.md ("Upload memory flat"): 16 MiB x 15 held 240 MiB.
PART_BYTES = 8 * 1024 * 1024
IN_MEMORY_PARTS = UPLOAD_WORKERS  # one part per worker being sent; fewer would idle workers
SUBMISSION_THREADS = 2  # each reads (and hashes) one file in order; two keep the workers fed


@dataclass(frozen=True)
class S3Uri:
    """s3://bucket/prefix, with the prefix kept without slashes at either end."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise UserError(f"--bucket {uri!r} is not an s3:// location", "write it as s3://BUCKET or s3://BUCKET/PREFIX")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise UserError(f"--bucket {uri!r} names no bucket", "write it as s3://BUCKET or s3://BUCKET/PREFIX")
        return cls(bucket, prefix.strip("/"))

    def child(self, *parts: str) -> "S3Uri":
        return S3Uri(self.bucket, "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/")))

    def key(self, relative: str = "") -> str:
        """The object key of a file under this prefix ("" gives the prefix itself, ending in /)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"


def encryption_args(kms_key: str | None) -> dict[str, str]:
    """Server-side encryption for every object: SSE-KMS with kms_key, else SSE-S3."""
    if kms_key:
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key}
    return {"ServerSideEncryption": "AES256"}


class S3Artifacts:
    """Upload, list and delete artifact prefixes with one boto3 S3 client."""

    def __init__(self, client):
        self.client = client

    # --- checks ---------------------------------------------------------------------------
    def check_bucket(self, uri: S3Uri, region: str | None = None) -> None:
        """UserError unless the bucket exists, we may use it, and it is in `region`."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.head_bucket(Bucket=uri.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or _code(exc) in ("404", "NoSuchBucket"):
                raise UserError(
                    f"bucket s3://{uri.bucket} does not exist",
                    f"create it (aws s3 mb s3://{uri.bucket}{' --region ' + region if region else ''}) or pick another --bucket",
                ) from None
            if status == 403 or _code(exc) in ("403", "AccessDenied"):
                raise UserError(
                    f"no access to bucket s3://{uri.bucket}",
                    "allow s3:ListBucket, s3:GetObject and s3:PutObject on it for your credentials, or pick another --bucket",
                ) from None
            raise
        found = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if region and found and found != region:
            raise UserError(
                f"bucket s3://{uri.bucket} is in {found}, the endpoint would be in {region}",
                f"SageMaker reads model data from its own region: use --region {found} or a bucket in {region}",
            )

    # --- upload -------------------------------------------------------------------------
    def upload(
        self,
        bundle: "Bundle",
        dest: S3Uri,
        reporter: Reporter,
        *,
        reuse_from: S3Uri | None = None,
        kms_key: str | None = None,
    ) -> UploadResult:
        """Put bundle under dest: keep what is there, copy what other versions under reuse_from hold, upload the rest."""
        from botocore.exceptions import BotoCoreError, ClientError

        result = UploadResult(uri=dest, store="S3")
        try:
            stored_manifest = self.read_manifest(dest)
            elsewhere, same = self._other_versions(reuse_from, dest, bundle.manifest_bytes) if reuse_from else ({}, None)
            if stored_manifest is None and same is not None:  # these very files, named from another machine's identities
                result.uri, result.kept = same, [f.name for f in bundle.files]
                return result
            here = self._present(dest, bundle, stored_manifest, result.hashes)
            to_copy: list[tuple["BundleFile", str]] = []
            to_upload: list["BundleFile"] = []
            for f in bundle.files:
                if f.name in here:
                    result.kept.append(f.name)
                elif (source := elsewhere.get((f.sha256, f.size))) is not None:
                    to_copy.append((f, source))
                else:
                    to_upload.append(f)
            resumable = {f.name: upload for f in to_upload if (upload := self._interrupted_upload(dest, f)) is not None}
            if resumable:
                to_upload = [f for f in to_upload if f.name not in resumable]
                for f in bundle.files:
                    if f.name in resumable:
                        self._resume(dest, f, resumable[f.name], reporter, kms_key, result)
            if to_copy or to_upload:
                self._transfer(dest, to_copy, to_upload, reporter, kms_key, result)
            self.abort_uploads(dest)
            manifest = bundle.with_hashes(result.hashes).manifest_bytes if result.hashes else bundle.manifest_bytes
            if stored_manifest != manifest:  # else the version is complete as it is: write nothing
                self.client.put_object(
                    Bucket=dest.bucket,
                    Key=dest.key(MANIFEST_NAME),
                    Body=manifest,
                    ContentType="application/json",
                    **encryption_args(kms_key),
                )
        except ClientError as exc:
            if _code(exc) in ("AccessDenied", "403", "KMS.AccessDeniedException", "KMS.NotFoundException"):
                raise UserError(
                    f"no permission to write to {dest}: {_message(exc)}",
                    "allow s3:PutObject (and kms:GenerateDataKey for --kms-key) for your credentials, or pick another --bucket",
                ) from None
            if _code(exc) in ("NoSuchBucket", "404"):
                raise UserError(f"cannot write to {dest}: the bucket does not exist", "check --bucket") from None
            raise DeployFailed(f"uploading to {dest} failed: {_message(exc)}", "run the same deploy again to resume") from None
        except BotoCoreError as exc:
            raise DeployFailed(f"uploading to {dest} failed: {exc}", "run the same deploy again to resume") from None
        return result

    def _present(self, dest: S3Uri, bundle: "Bundle", manifest: bytes | None, hashes: dict[str, str]) -> set[str]:
        """Names of bundle files already under dest with the right content (manifest: dest's cloudllm.json, if any).

        A file the bundle names by identity is kept when the object was uploaded from it (its identity
        metadata); its sha256 then goes into hashes, from dest's manifest or, after a killed run, hashed here.
        """
        from cloudllm.hashing import is_identity, sha256_file

        listed = {}
        if manifest is not None:
            try:
                listed = json.loads(manifest).get("files", {})
            except ValueError:
                pass
        sizes = None
        present = set()
        for f in bundle.files:
            entry = listed.get(f.name) if isinstance(listed.get(f.name), dict) else {}
            if entry.get("sha256") == f.sha256:
                present.add(f.name)
                continue
            if manifest is not None and not (is_identity(f.sha256) and entry.get("sha256")):
                continue
            # No manifest (a deploy was interrupted: keep the files it finished), or a file named by identity.
            sizes = sizes if sizes is not None else {obj["Key"]: obj["Size"] for obj in self._list(dest)}
            key = dest.key(f.name)
            if sizes.get(key) == f.size and holds(self.client.head_object(Bucket=dest.bucket, Key=key).get("Metadata"), f.size, f):
                present.add(f.name)
                if is_identity(f.sha256):
                    hashes[f.name] = entry.get("sha256") or sha256_file(f.source)
        return present

    def _other_versions(self, root: S3Uri, dest: S3Uri, wanted: bytes) -> tuple[dict[tuple[str, int], str], S3Uri | None]:
        """(sha256, size) -> key of a file held by a complete version under root (one manifest read per version),
        and the complete version whose manifest is `wanted`, if one is."""
        found: dict[tuple[str, int], str] = {}
        same = None
        for version in self.versions(root):
            if version == dest:
                continue
            manifest = self.read_manifest(version)
            if manifest is None:
                continue
            if manifest == wanted:
                same = same or version
            try:
                files = json.loads(manifest).get("files", {})
            except ValueError:
                continue
            for name, entry in files.items():
                if isinstance(entry, dict) and entry.get("sha256"):
                    found.setdefault((entry["sha256"], entry.get("size", -1)), version.key(name))
        return found, same

    def _transfer(self, dest, to_copy, to_upload, reporter: Reporter, kms_key, result: UploadResult) -> None:
        import io

        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        from cloudllm.hashing import is_identity

        config = TransferConfig(
            multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=UPLOAD_WORKERS
        )
        # s3transfer's settings, which boto3's __init__ does not take
        config.max_in_memory_upload_chunks = IN_MEMORY_PARTS
        config.max_submission_concurrency = SUBMISSION_THREADS
        return_freed_buffers()  # the parts held, not the allocator's leftovers, set the peak RSS
        extra = encryption_args(kms_key)
        with create_transfer_manager(self.client, config) as manager:
            copies = []
            for f, source_key in to_copy:
                args = {**extra, "Metadata": object_metadata(f), "MetadataDirective": "REPLACE", "ContentType": "application/octet-stream"}
                future = manager.copy({"Bucket": dest.bucket, "Key": source_key}, dest.bucket, dest.key(f.name), extra_args=args)
                copies.append((f, future))
            total = sum(f.size for f in to_upload)
            if to_upload:
                with reporter.transfer(total, f"uploading {len(to_upload)} file(s) to {dest}") as advance:
                    uploads = []
                    for f in to_upload:
                        # A file named by identity is read once, by the upload, which hashes it (s3transfer
                        # reads a file object's parts in order, holding at most IN_MEMORY_PARTS of them); a
                        # hashed one is read by range by s3transfer's own threads.
                        if is_identity(f.sha256):
                            body = HashingReader(f)
                        else:
                            body = str(f.source) if f.content is None else io.BytesIO(f.content)
                        args = {**extra, "Metadata": object_metadata(f), "ContentType": "application/octet-stream"}
                        future = manager.upload(body, dest.bucket, dest.key(f.name), extra_args=args, subscribers=[_Progress(advance)])
                        uploads.append((f, body, future))
                    try:
                        for f, body, future in uploads:
                            future.result()
                            if isinstance(body, HashingReader):
                                result.hashes[f.name] = hash_of(body, f)
                            result.uploaded.append(f.name)
                            result.uploaded_bytes += f.size
                    finally:
                        for _, body, _ in uploads:
                            if not isinstance(body, str):
                                body.close()
            for f, future in copies:
                future.result()
                result.copied.append(f.name)
                result.copied_bytes += f.size

    # --- resuming an interrupted multipart upload ---------------------------------------------
    def _interrupted_upload(self, dest: S3Uri, f: "BundleFile") -> dict | None:
        """The newest unfinished multipart upload of f's key, when f is big enough to go in parts.

        A deploy killed mid-upload (SIGKILL, a lost machine) leaves one behind: s3transfer aborts
        its uploads only when it can. The key is inside a content-addressed version prefix, so an
        unfinished upload there was of this very file; each stored part is still checked.
        """
        if f.size <= PART_BYTES or f.content is not None:
            return None
        from botocore.exceptions import ClientError

        key = dest.key(f.name)
        try:
            listing = self.client.list_multipart_uploads(Bucket=dest.bucket, Prefix=key)
        except ClientError as exc:
            if _code(exc) in ("AccessDenied", "403"):
                return None  # no s3:ListBucketMultipartUploads: upload the file afresh
            raise
        uploads = [u for u in listing.get("Uploads", []) if u["Key"] == key]
        return max(uploads, key=lambda u: u["Initiated"]) if uploads else None

    def _resume(self, dest: S3Uri, f: "BundleFile", upload: dict, reporter: Reporter, kms_key, result: "UploadResult") -> None:
        """Finish an interrupted multipart upload: keep the stored parts whose checksum matches, send the rest."""
        from concurrent.futures import ThreadPoolExecutor

        from cloudllm.hashing import is_identity

        key, upload_id = dest.key(f.name), upload["UploadId"]
        stored = {}
        for page in self.client.get_paginator("list_parts").paginate(Bucket=dest.bucket, Key=key, UploadId=upload_id):
            for part in page.get("Parts", []):
                stored[part["PartNumber"]] = part
        count = max(1, -(-f.size // PART_BYTES))
        parts: dict[int, dict] = {}
        missing = []
        for number in range(1, count + 1):
            part = stored.get(number)
            if part is not None and part["Size"] == _part_size(f.size, number) and _part_matches(part, _read_part(f, number)):
                parts[number] = {"PartNumber": number, "ETag": part["ETag"], **_checksum_of(part)}
            else:
                missing.append(number)
        sent = sum(_part_size(f.size, n) for n in missing)
        reporter.step(
            f"resuming the interrupted upload of {f.name}: {len(parts)} of {count} part(s) already in S3, sending {len(missing)} ({human_bytes(sent)})"
        )

        def send(number: int) -> dict:
            data = _read_part(f, number)
            answer = self.client.upload_part(
                Bucket=dest.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, ChecksumAlgorithm="CRC32"
            )
            advance(len(data))
            return {"PartNumber": number, "ETag": answer["ETag"], **_checksum_of(answer)}

        with reporter.transfer(sent, f"uploading {len(missing)} part(s) of {f.name} to {dest}") as advance:
            with ThreadPoolExecutor(max_workers=UPLOAD_WORKERS) as pool:
                for part in pool.map(send, missing):
                    parts[part["PartNumber"]] = part
        ordered = [parts[n] for n in sorted(parts)]
        if any("ChecksumCRC32" not in p for p in ordered):  # parts stored without checksums: complete by ETag
            ordered = [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in ordered]
        self.client.complete_multipart_upload(Bucket=dest.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": ordered})
        head = self.client.head_object(Bucket=dest.bucket, Key=key)
        if not holds(head.get("Metadata"), head["ContentLength"], f):
            self.client.delete_object(Bucket=dest.bucket, Key=key)
            raise DeployFailed(f"the resumed upload of {f.name} does not match the local file", "run the same deploy again")
        if is_identity(f.sha256):  # its parts were read out of order: hashed in one more pass
            from cloudllm.hashing import sha256_file

            result.hashes[f.name] = sha256_file(f.source)
        result.uploaded.append(f.name)
        result.uploaded_bytes += sent

    def abort_uploads(self, uri: S3Uri) -> int:
        """Abort the unfinished multipart uploads under uri (a killed run's): S3 bills their parts and lists them nowhere.

        Returns how many. Best effort: without s3:ListBucketMultipartUploads or s3:AbortMultipartUpload
        they stay (a bucket lifecycle rule AbortIncompleteMultipartUpload removes them too).
        """
        from botocore.exceptions import ClientError

        aborted = 0
        for upload in self._uploads(uri):
            try:
                self.client.abort_multipart_upload(Bucket=uri.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            except ClientError as exc:
                if _code(exc) in ("AccessDenied", "403"):
                    break
                if _code(exc) != "NoSuchUpload":  # gone meanwhile: completed, or aborted by its own run
                    raise
            aborted += 1
        return aborted

    def _uploads(self, uri: S3Uri) -> list[dict[str, Any]]:
        """The unfinished multipart uploads under uri (Key, UploadId, Initiated); none without s3:ListBucketMultipartUploads."""
        from botocore.exceptions import ClientError

        uploads = []
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=uri.bucket, Prefix=uri.key("")):
                uploads.extend(page.get("Uploads", []))
        except ClientError as exc:
            if _code(exc) not in ("AccessDenied", "403"):
                raise
        return uploads

    # --- read, list, delete -----------------------------------------------------------
    def read_manifest(self, uri: S3Uri) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=uri.bucket, Key=uri.key(MANIFEST_NAME))["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise

    def versions(self, root: S3Uri) -> list[S3Uri]:
        """The version prefixes directly under root, also those holding only unfinished multipart uploads
        (a deploy killed while sending its first file)."""
        start = root.key("")
        prefixes = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=root.bucket, Prefix=start, Delimiter="/"):
            prefixes += [common["Prefix"] for common in page.get("CommonPrefixes", [])]
        # Grouped here, not with Delimiter: moto's ListMultipartUploads ignores it (S3 answers CommonPrefixes).
        for upload in self._uploads(root):
            head, slash, _ = upload["Key"][len(start) :].partition("/")
            if slash:
                prefixes.append(f"{start}{head}/")
        return [S3Uri(root.bucket, prefix.strip("/")) for prefix in dict.fromkeys(prefixes)]

    def _list(self, uri: S3Uri) -> list[dict[str, Any]]:
        objects = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.key("")):
            objects.extend(page.get("Contents", []))
        return objects

    def idle_seconds(self, uri: S3Uri) -> float:
        """Seconds since anything under uri was last written: an object, or a part of an unfinished upload (0 when empty)."""
        from datetime import datetime, timezone

        times = [obj["LastModified"] for obj in self._list(uri)]
        for upload in self._uploads(uri):
            times.append(upload["Initiated"])
            pages = self.client.get_paginator("list_parts").paginate(Bucket=uri.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            times.extend(part["LastModified"] for page in pages for part in page.get("Parts", []))
        newest = max(times, default=None)
        return 0.0 if newest is None else (datetime.now(timezone.utc) - newest).total_seconds()

    def delete(self, uri: S3Uri) -> tuple[int, int]:
        """Delete every object under uri and abort its unfinished multipart uploads; returns (objects, uploads)."""
        aborted = self.abort_uploads(uri)  # first: an upload finishing meanwhile becomes an object the listing sees
        keys = [obj["Key"] for obj in self._list(uri)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=uri.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys), aborted


def _part_size(size: int, number: int) -> int:
    return max(0, min(PART_BYTES, size - (number - 1) * PART_BYTES))


def _read_part(f: "BundleFile", number: int) -> bytes:
    with open(f.source, "rb") as fh:
        fh.seek((number - 1) * PART_BYTES)
        return fh.read(PART_BYTES)


def _part_matches(part: dict, data: bytes) -> bool:
    """A stored part holds these bytes: by its CRC32 when S3 kept one, else by its ETag (the MD5 under SSE-S3)."""
    import base64
    import hashlib
    import zlib

    if part.get("ChecksumCRC32"):
        return part["ChecksumCRC32"] == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    return part.get("ETag", "").strip('"') == hashlib.md5(data).hexdigest()  # noqa: S324 (S3's own ETag scheme)


def _checksum_of(part: dict) -> dict[str, str]:
    return {"ChecksumCRC32": part["ChecksumCRC32"]} if part.get("ChecksumCRC32") else {}


def _Progress(advance):
    """A subscriber that advances the reporter's byte bar as parts go out (negative when a failed
    part is retried); made here so that importing this module (plan does) does not import s3transfer."""
    from s3transfer.subscribers import BaseSubscriber

    class Progress(BaseSubscriber):
        def on_progress(self, future, bytes_transferred: int, **kwargs) -> None:
            advance(bytes_transferred)

    return Progress()


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc) -> str:
    return str(exc.response.get("Error", {}).get("Message") or exc).splitlines()[0]
