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
