"""An interrupted multipart upload continues from the parts already in S3 (moto's S3 over HTTP)."""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest

from cloudllm.bundle import BundleFile
from cloudllm.console import Reporter
from cloudllm.storage import s3
from cloudllm.storage.s3 import S3Artifacts, S3Uri

MiB = 1024 * 1024
BUCKET = "cloudllm-emulator"


class Recorder(Reporter):
    def __init__(self) -> None:
        self.steps: list[str] = []
        self.sent = 0

    def step(self, message: str) -> None:
        self.steps.append(message)

    @contextmanager
    def transfer(self, total_bytes: int, description: str):
        def advance(n: int) -> None:
            self.sent += n

        yield advance


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    """5 MiB parts (S3's smallest), so a 13 MiB file goes in three parts: 5 + 5 + 3 MiB."""
    monkeypatch.setattr(s3, "PART_BYTES", 5 * MiB)
    return 5 * MiB


def _file(tmp_path: Path, size: int) -> BundleFile:
    data = random.Random(7).randbytes(size)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    return BundleFile(name="model.safetensors", size=size, sha256=hashlib.sha256(data).hexdigest(), source=path)


def _bundle(*files: BundleFile):
    """What S3Artifacts.upload reads of a Bundle: its files and its manifest's bytes."""
    return SimpleNamespace(files=list(files), manifest_bytes=b'{"files": {}}')


def test_an_interrupted_upload_resumes_from_the_parts_in_s3(sagemaker_emulator, small_parts: int, tmp_path: Path) -> None:
    client = boto3.client("s3", endpoint_url=sagemaker_emulator.url)
    f = _file(tmp_path, 13 * MiB)
    data = f.source.read_bytes()
    dest = S3Uri(BUCKET, "resume/ep/0123456789abcdef")
    key = dest.key(f.name)

    # What a deploy killed mid-upload leaves: an unfinished upload with part 1 stored, and a part 2
    # that does not hold the file's bytes (it must be sent again, not trusted).
    started = client.create_multipart_upload(
        Bucket=BUCKET, Key=key, Metadata={s3.SHA256_KEY: f.sha256}, ServerSideEncryption="AES256",
        ContentType="application/octet-stream", ChecksumAlgorithm="CRC32",
    )  # fmt: skip
    upload_id = started["UploadId"]
    client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=1, Body=data[: 5 * MiB], ChecksumAlgorithm="CRC32")
    client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=2, Body=b"\0" * (5 * MiB), ChecksumAlgorithm="CRC32")
    # ...and another killed upload under the same version, of a file this bundle no longer has.
    stray = client.create_multipart_upload(Bucket=BUCKET, Key=dest.key("stale.bin"))["UploadId"]

    reporter = Recorder()
    result = S3Artifacts(client).upload(_bundle(f), dest, reporter)

    assert result.uploaded == [f.name]
    assert reporter.sent == result.uploaded_bytes == 8 * MiB  # parts 2 and 3 only
    assert any("1 of 3 part(s) already in S3" in step for step in reporter.steps), reporter.steps
    stored = client.get_object(Bucket=BUCKET, Key=key)
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == f.sha256
    assert stored["Metadata"][s3.SHA256_KEY] == f.sha256
    assert not client.list_multipart_uploads(Bucket=BUCKET, Prefix=dest.key("")).get("Uploads")  # the stray one aborted too
    with pytest.raises(client.exceptions.NoSuchUpload):
        client.list_parts(Bucket=BUCKET, Key=dest.key("stale.bin"), UploadId=stray)


def test_without_an_interrupted_upload_the_transfer_manager_sends_everything(sagemaker_emulator, small_parts: int, tmp_path: Path) -> None:
    client = boto3.client("s3", endpoint_url=sagemaker_emulator.url)
    f = _file(tmp_path, 13 * MiB)
    dest = S3Uri(BUCKET, "resume/ep/fedcba9876543210")
    reporter = Recorder()
    result = S3Artifacts(client).upload(_bundle(f), dest, reporter)
    assert result.uploaded_bytes == 13 * MiB and not any("resuming" in step for step in reporter.steps)
    stored = client.get_object(Bucket=BUCKET, Key=dest.key(f.name))
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == f.sha256


def test_delete_aborts_the_unfinished_uploads_under_the_prefix_and_versions_lists_their_prefix(sagemaker_emulator, tmp_path: Path) -> None:
    """A deploy killed mid multipart upload leaves parts S3 bills for and lists nowhere but ListMultipartUploads."""
    client = boto3.client("s3", endpoint_url=sagemaker_emulator.url)
    root = S3Uri(BUCKET, "leaks/ep")
    client.put_object(Bucket=BUCKET, Key=root.key("1111111111111111/config.json"), Body=b"{}")
    killed = client.create_multipart_upload(Bucket=BUCKET, Key=root.key("2222222222222222/model.safetensors"))["UploadId"]
    client.upload_part(Bucket=BUCKET, Key=root.key("2222222222222222/model.safetensors"), UploadId=killed, PartNumber=1, Body=b"\1" * (5 * MiB))
    neighbour = client.create_multipart_upload(Bucket=BUCKET, Key="leaks/ep2/3333333333333333/model.safetensors")["UploadId"]
    artifacts = S3Artifacts(client)

    # The version holding nothing but the unfinished upload is a version: the sweep sees it.
    assert {v.prefix for v in artifacts.versions(root)} == {"leaks/ep/1111111111111111", "leaks/ep/2222222222222222"}
    assert artifacts.idle_seconds(S3Uri(BUCKET, "leaks/ep/2222222222222222")) < 3600  # its part was just written

    assert artifacts.delete(root) == (1, 1)
    assert not client.list_multipart_uploads(Bucket=BUCKET, Prefix=root.key("")).get("Uploads")
    assert not client.list_objects_v2(Bucket=BUCKET, Prefix=root.key("")).get("Contents")
    # leaks/ep2/ is another endpoint's: untouched.
    assert [u["UploadId"] for u in client.list_multipart_uploads(Bucket=BUCKET, Prefix="leaks/ep2/")["Uploads"]] == [neighbour]
    assert artifacts.delete(root) == (0, 0)
