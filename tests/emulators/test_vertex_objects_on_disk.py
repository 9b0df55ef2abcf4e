"""The GCS side of the Vertex emulator can keep objects on disk, so a multi-GB model does not cost its memory."""

from __future__ import annotations

import os

from cloudllm_emulators.vertex import VertexEmulator


def test_objects_on_disk_land_in_the_emulator_workdir_and_read_back_whole() -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)
    with VertexEmulator(objects_on_disk=True) as emulator:
        emulator.create_bucket("on-disk")
        bucket = emulator.storage_client().bucket("on-disk")
        blob = bucket.blob("weights/model.safetensors")
        blob.chunk_size = 1024 * 1024  # a resumable upload in several chunks, as cloudllm's large files go
        blob.upload_from_string(body)
        stored = [p for p in (emulator.workdir / "storage").rglob("*") if p.is_file() and p.stat().st_size == len(body)]
        assert stored, "the object is not in the emulator's folder"
        assert bucket.blob("weights/model.safetensors").download_as_bytes() == body
        workdir = emulator.workdir
    assert not workdir.exists()  # its own temporary folder goes with it
