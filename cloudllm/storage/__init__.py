"""Artifact stores: one module per object store (gcs.py, s3.py), each uploading a Bundle uncompressed."""

from __future__ import annotations

import base64
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from cloudllm.console import human_bytes

if TYPE_CHECKING:
    from cloudllm.bundle import BundleFile


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
    hashes: dict[str, str] = field(default_factory=dict)  # sha256 of files the bundle named by identity, hashed while uploading

    def summary(self) -> str:
        parts = [f"uploaded {len(self.uploaded)} file(s) ({human_bytes(self.uploaded_bytes)})"]
        if self.copied:
            parts.append(f"copied {len(self.copied)} unchanged file(s) ({human_bytes(self.copied_bytes)}) inside {self.store}")
        if self.kept:
            parts.append(f"kept {len(self.kept)} already there")
        return f"{', '.join(parts)} to {self.uri}"


# --- memory while uploading -------------------------------------------------------------------
# Uploads that hash while they read hold whole parts (S3) in memory, each a fresh multi-MiB bytes
# object made on one of many threads. glibc raises its mmap threshold to the size of the first such
# block freed (up to 32 MiB), after which these blocks come from per-thread arenas that keep the
# freed memory: RSS then grew with the number of parts sent (308 / 518 / 581 MB at 0.4 / 1.3 / 4.2 GB,
# for a 240 MiB bound). A fixed threshold keeps every block of a MiB or more in its own mapping,
# returned to the system when freed, so RSS stays at the parts actually held.
UPLOAD_MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def return_freed_buffers() -> bool:
    """Make large buffers go back to the system when freed (glibc only; elsewhere a no-op). True if set."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, UPLOAD_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


# --- hashing while uploading ------------------------------------------------------------------
# A first deploy names its version prefix by the files' identities (Bundle.version_name), not their
# sha256, so it need not read the weights once to hash them and again to upload them: each file the
# bundle names by identity is hashed as the upload reads it (HashingReader), its sha256 goes into
# the manifest, written last, and into the hash cache. Until then the object carries its identity
# as metadata (S3 cannot change an object's metadata without copying it), which is enough for a
# re-run on this machine to keep what a killed run finished.
SHA256_KEY = "cloudllm-sha256"  # x-amz-meta-cloudllm-sha256 / GCS custom metadata
IDENTITY_KEY = "cloudllm-identity"


def object_metadata(f: "BundleFile") -> dict[str, str]:
    """What an uploaded object carries: its sha256, or its identity while the sha256 is not known yet."""
    from cloudllm.hashing import is_identity

    return {IDENTITY_KEY: f.sha256} if is_identity(f.sha256) else {SHA256_KEY: f.sha256}


def holds(metadata: dict | None, size: int | None, f: "BundleFile") -> bool:
    """An object with this metadata and size is f: the same sha256, or the same identity (this file, uploaded
    from this machine by a run that hashed it while uploading)."""
    from cloudllm.hashing import identity

    metadata = metadata or {}
    if size != f.size:
        return False
    if metadata.get(SHA256_KEY) == f.sha256:
        return True
    return IDENTITY_KEY in metadata and f.source is not None and metadata[IDENTITY_KEY] == identity(f.source)


class HashingReader(io.RawIOBase):
    """A bundle file as a stream that hashes the bytes it hands out: the upload's one read is also the hash's.

    The hashes cover the file from its first byte, in order, as first read. A client that seeks back
    (a retried chunk, botocore's checksum pass before it sends) reads bytes already hashed, which are
    not hashed again; one that skips ahead leaves the hash incomplete, and sha256() is then None.
    """

    def __init__(self, f: "BundleFile", advance: Callable[[int], None] | None = None, *, crc32c: bool = False):
        super().__init__()
        self._fh = io.BytesIO(f.content) if f.content is not None else open(f.source, "rb")
        self.stat = None if f.content is not None else os.fstat(self._fh.fileno())  # the file as it was opened
        self._size = f.size
        self._sha = hashlib.sha256()
        if crc32c:
            import google_crc32c

            self._crc = google_crc32c.Checksum()
        else:
            self._crc = None
        self._hashed = 0
        self._advance = advance

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        at = self._fh.tell()
        data = self._fh.read(size)
        if at <= self._hashed < at + len(data):
            fresh = data if self._hashed == at else data[self._hashed - at :]  # the usual case copies nothing
            self._sha.update(fresh)
            if self._crc is not None:
                self._crc.update(fresh)
            self._hashed = at + len(data)
        if data and self._advance is not None:
            self._advance(len(data))
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def sha256(self) -> str | None:
        return self._sha.hexdigest() if self._hashed == self._size else None

    def crc32c(self) -> str:
        return base64.b64encode(self._crc.digest()).decode()

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


def hash_of(reader: HashingReader, f: "BundleFile") -> str:
    """The sha256 of what reader sent (read again from the file in the rare case the client skipped a
    part), remembered in the hash cache when the file has not changed since it was opened."""
    from cloudllm.hashing import remember, sha256_file

    value = reader.sha256() or sha256_file(f.source)
    if reader.stat is not None:
        remember(f.source, value, reader.stat)
    return value
