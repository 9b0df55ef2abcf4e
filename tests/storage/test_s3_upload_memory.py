"""A first deploy's upload through S3 reads each weight byte once and holds a bounded number of parts in memory.

s3transfer buffers every part of a file object (the HashingReader that hashes while uploading) until it
is sent, so the CLI's peak memory is the parts held, not the model's size. Measured by counting, against
moto's S3 over HTTP, with the part sends slowed so the reader runs as far ahead as s3transfer lets it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from cloudllm import storage
from cloudllm.bundle import ArtifactManifest, Bundle, BundleFile, ManifestEntry
from cloudllm.hashing import identity
from cloudllm.storage import s3
from cloudllm.storage.s3 import S3Artifacts, S3Uri

from .test_s3_resume import BUCKET, Recorder

MiB = 1024 * 1024
PARTS = 8  # per file; three files, so all together well over what s3transfer may hold
S3_PARTS_BUDGET = 96 * MiB  # the parts an S3 upload may hold at once (was 240 MiB with 16 MiB parts)


class PartLedger:
    """Parts read by the upload's reader minus parts S3 has answered: what the process holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.read_parts = 0
        self.sent_parts = 0
        self.most_held = 0

    def read(self, n: int) -> None:
        with self.lock:
            self.bytes_read += n
            self.read_parts += 1 if n else 0
            self.most_held = max(self.most_held, self.read_parts - self.sent_parts)

    def sent(self, **_) -> None:
        with self.lock:
            self.sent_parts += 1


s3_part_bytes = s3.PART_BYTES  # before the fixture shrinks it for the test's file


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> PartLedger:
    monkeypatch.setattr(s3, "PART_BYTES", 5 * MiB)  # S3's smallest part, so the file is many parts
    book = PartLedger()
    original = storage.HashingReader.read

    def counted(self, size: int = -1) -> bytes:
        data = original(self, size)
        book.read(len(data))
        return data

    monkeypatch.setattr(storage.HashingReader, "read", counted)
    return book


def test_an_upload_reads_each_byte_once_and_holds_at_most_the_in_memory_parts(sagemaker_emulator, ledger: PartLedger, tmp_path: Path) -> None:
    size = PARTS * 5 * MiB + 123
    files = []
    for i in range(3):  # several files: each of s3transfer's submission threads reads one ahead
        weights = tmp_path / f"model-{i}.safetensors"
        weights.write_bytes(os.urandom(size))
        files.append(BundleFile(weights.name, size, identity(weights), source=weights))  # a first deploy: hashed by the upload
    manifest = ArtifactManifest(
        cloudllm_version="0", model={}, settings={}, build={}, files={f.name: ManifestEntry(size=f.size, sha256=f.sha256) for f in files}
    )
    client = boto3.client("s3", endpoint_url=sagemaker_emulator.url)
    # Slow each part's send so the reader meets s3transfer's bound instead of racing a fast emulator.
    client.meta.events.register("before-send.s3.UploadPart", lambda **_: time.sleep(0.05))
    client.meta.events.register("after-call.s3.UploadPart", ledger.sent)
    dest = S3Uri(BUCKET, "memory/ep/00112233445566778")

    result = S3Artifacts(client).upload(Bundle(files=files, manifest=manifest), dest, Recorder())

    assert ledger.bytes_read == 3 * size  # each byte read once: no second pass to hash
    assert ledger.read_parts == 3 * (PARTS + 1)
    # Parts waiting to be sent, plus the one each submission thread read before it waited for room.
    assert ledger.most_held <= s3.IN_MEMORY_PARTS + s3.SUBMISSION_THREADS
    assert (s3.IN_MEMORY_PARTS + s3.SUBMISSION_THREADS) * s3_part_bytes <= S3_PARTS_BUDGET  # whatever the model's size
    for f in files:
        assert result.hashes[f.name] == hashlib.sha256(f.source.read_bytes()).hexdigest()


FREED_CHECK = """
import sys, threading
from cloudllm.storage import return_freed_buffers

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "set":
    assert return_freed_buffers()
before = rss_mib()
kept = []
def parts():  # what s3transfer's threads do: make 8 MiB parts, send them, drop them
    for _ in range(40):
        held = [bytes(8 * 2**20) for _ in range(3)]
        kept.append(bytearray(2000))  # what outlives a part (an answer, a future): it pins a heap's top
        del held
workers = [threading.Thread(target=parts) for _ in range(10)]
for w in workers: w.start()
for w in workers: w.join()
print(rss_mib() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc", reason="glibc on Linux")
def test_with_freed_buffers_returned_the_parts_made_on_many_threads_leave_nothing_behind() -> None:
    """return_freed_buffers (called by both uploads): freed multi-MiB blocks go back to the system at once."""
    run = subprocess.run([sys.executable, "-c", FREED_CHECK, "set"], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    # MiB left after 1,200 parts of 8 MiB made and dropped on 10 threads; without the setting, ~230 here.
    assert float(run.stdout) < 16
