"""Artifact stores: one module per object store (gcs.py, s3.py), each uploading a Bundle uncompressed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloudllm.console import human_bytes


@dataclass
class UploadResult:
    """What staging a bundle did: files uploaded, copied inside the store from another version, or kept."""

    uri: Any  # S3Uri or GcsUri: prints as the version prefix
    store: str  # "S3" or "GCS", for the summary
    uploaded: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    copied: list[str] = field(default_factory=list)
    copied_bytes: int = 0
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"uploaded {len(self.uploaded)} file(s) ({human_bytes(self.uploaded_bytes)})"]
        if self.copied:
            parts.append(f"copied {len(self.copied)} unchanged file(s) ({human_bytes(self.copied_bytes)}) inside {self.store}")
        if self.kept:
            parts.append(f"kept {len(self.kept)} already there")
        return f"{', '.join(parts)} to {self.uri}"
