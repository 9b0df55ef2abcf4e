"""Artifacts on Amazon S3: a Bundle uploaded uncompressed under an s3:// prefix.

    s3://bucket/prefix/<endpoint>/<version>/config.json, *.safetensors, code/..., cloudllm.json

SageMaker reads the prefix itself (`ModelDataSource` S3Prefix, CompressionType None): no
tarball, no repack. Each version gets its own prefix, because SageMaker copies the prefix
whenever it starts an instance (scale-out, replacement, rollback): files under a live
model's prefix must never change. Building a version costs only what changed: a file
already under the prefix is kept, a file another version of the endpoint holds is copied
inside S3 (no bytes leave the machine), and only the rest is uploaded, in parallel
multipart parts through boto3's transfer manager. Every object carries its sha256 as
metadata; S3 checks each part's CRC32 that boto3 sends. The manifest (cloudllm.json) is
written last, so a prefix with a manifest is complete.

Server-side encryption is always on: SSE-S3 (AES256), or SSE-KMS with a customer key.
boto3 honours AWS_ENDPOINT_URL (used by `cloudllm emulate sagemaker`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from s3transfer.subscribers import BaseSubscriber

from cloudllm.console import Reporter, human_bytes
from cloudllm.errors import DeployFailed, UserError

if TYPE_CHECKING:
    from cloudllm.bundle import Bundle, BundleFile

MANIFEST_NAME = "cloudllm.json"
SHA256_KEY = "cloudllm-sha256"  # x-amz-meta-cloudllm-sha256
UPLOAD_WORKERS = 10
PART_BYTES = 64 * 1024 * 1024  # 10,000 parts (S3's limit) x 64 MiB covers a 625 GiB file


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


@dataclass
class UploadResult:
    uri: S3Uri
    uploaded: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    copied: list[str] = field(default_factory=list)
    copied_bytes: int = 0
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"uploaded {len(self.uploaded)} file(s) ({human_bytes(self.uploaded_bytes)})"]
        if self.copied:
            parts.append(f"copied {len(self.copied)} unchanged file(s) ({human_bytes(self.copied_bytes)}) inside S3")
        if self.kept:
            parts.append(f"kept {len(self.kept)} already there")
        return f"{', '.join(parts)} to {self.uri}"


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

        result = UploadResult(uri=dest)
        try:
            here = self._present(dest, bundle)
            elsewhere = self._other_versions(reuse_from, dest) if reuse_from else {}
            to_copy: list[tuple["BundleFile", str]] = []
            to_upload: list["BundleFile"] = []
            for f in bundle.files:
                if f.name in here:
                    result.kept.append(f.name)
                elif (source := elsewhere.get((f.sha256, f.size))) is not None:
                    to_copy.append((f, source))
                else:
                    to_upload.append(f)
            if to_copy or to_upload:
                self._transfer(dest, to_copy, to_upload, reporter, kms_key, result)
            self.client.put_object(
                Bucket=dest.bucket,
                Key=dest.key(MANIFEST_NAME),
                Body=bundle.manifest_bytes,
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

    def _present(self, dest: S3Uri, bundle: "Bundle") -> set[str]:
        """Names of bundle files already under dest with the right content."""
        manifest = self.read_manifest(dest)
        if manifest is not None:
            try:
                listed = json.loads(manifest).get("files", {})
            except ValueError:
                listed = {}
            return {f.name for f in bundle.files if listed.get(f.name, {}).get("sha256") == f.sha256}
        # No manifest: a deploy was interrupted. Keep the files it finished (same size and sha256).
        sizes = {obj["Key"]: obj["Size"] for obj in self._list(dest)}
        present = set()
        for f in bundle.files:
            key = dest.key(f.name)
            if sizes.get(key) == f.size:
                head = self.client.head_object(Bucket=dest.bucket, Key=key)
                if head.get("Metadata", {}).get(SHA256_KEY) == f.sha256:
                    present.add(f.name)
        return present

    def _other_versions(self, root: S3Uri, dest: S3Uri) -> dict[tuple[str, int], str]:
        """(sha256, size) -> key of a file held by a complete version under root (one manifest read per version)."""
        found: dict[tuple[str, int], str] = {}
        for version in self.versions(root):
            if version == dest:
                continue
            manifest = self.read_manifest(version)
            if manifest is None:
                continue
            try:
                files = json.loads(manifest).get("files", {})
            except ValueError:
                continue
            for name, entry in files.items():
                if isinstance(entry, dict) and entry.get("sha256"):
                    found.setdefault((entry["sha256"], entry.get("size", -1)), version.key(name))
        return found

    def _transfer(self, dest, to_copy, to_upload, reporter: Reporter, kms_key, result: UploadResult) -> None:
        import io

        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        config = TransferConfig(
            multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=UPLOAD_WORKERS
        )
        extra = encryption_args(kms_key)
        with create_transfer_manager(self.client, config) as manager:
            copies = []
            for f, source_key in to_copy:
                args = {**extra, "Metadata": {SHA256_KEY: f.sha256}, "MetadataDirective": "REPLACE", "ContentType": "application/octet-stream"}
                future = manager.copy({"Bucket": dest.bucket, "Key": source_key}, dest.bucket, dest.key(f.name), extra_args=args)
                copies.append((f, future))
            total = sum(f.size for f in to_upload)
            if to_upload:
                with reporter.transfer(total, f"uploading {len(to_upload)} file(s) to {dest}") as advance:
                    uploads = []
                    for f in to_upload:
                        body = str(f.source) if f.content is None else io.BytesIO(f.content)
                        args = {**extra, "Metadata": {SHA256_KEY: f.sha256}, "ContentType": "application/octet-stream"}
                        future = manager.upload(body, dest.bucket, dest.key(f.name), extra_args=args, subscribers=[_Progress(advance)])
                        uploads.append((f, future))
                    for f, future in uploads:
                        future.result()
                        result.uploaded.append(f.name)
                        result.uploaded_bytes += f.size
            for f, future in copies:
                future.result()
                result.copied.append(f.name)
                result.copied_bytes += f.size

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
        """The version prefixes directly under root."""
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=root.bucket, Prefix=root.key(""), Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                found.append(S3Uri(root.bucket, common["Prefix"].strip("/")))
        return found

    def _list(self, uri: S3Uri) -> list[dict[str, Any]]:
        objects = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.key("")):
            objects.extend(page.get("Contents", []))
        return objects

    def idle_seconds(self, uri: S3Uri) -> float:
        """Seconds since the newest object under uri was written (0 when there is none)."""
        from datetime import datetime, timezone

        newest = max((obj["LastModified"] for obj in self._list(uri)), default=None)
        return 0.0 if newest is None else (datetime.now(timezone.utc) - newest).total_seconds()

    def delete(self, uri: S3Uri) -> int:
        """Delete every object under uri; returns how many."""
        keys = [obj["Key"] for obj in self._list(uri)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=uri.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)


class _Progress(BaseSubscriber):
    """Advances the reporter's byte bar as parts go out (negative when a failed part is retried)."""

    def __init__(self, advance):
        self._advance = advance

    def on_progress(self, future, bytes_transferred: int, **kwargs) -> None:
        self._advance(bytes_transferred)


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc) -> str:
    return str(exc.response.get("Error", {}).get("Message") or exc).splitlines()[0]
