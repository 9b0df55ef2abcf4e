"""sha256 of files, streamed once and cached by (device, inode, size, mtime).

Weights are hard-linked into artifacts, so a link and its source share one cache
entry, and a re-deploy of a 140 GB model re-hashes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from cloudllm.home import home_dir

_CHUNK = 8 * 1024 * 1024
_lock = threading.Lock()
_cache: dict[str, str] | None = None


def _cache_path() -> Path:
    return home_dir("cache") / "sha256.json"


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _load() -> dict[str, str]:
    global _cache
    if _cache is None:
        try:
            _cache = json.loads(_cache_path().read_text())
        except (OSError, ValueError):
            _cache = {}
    return _cache


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file; served from the cache when the file is unchanged since it was hashed."""
    st = os.stat(path)
    key = _key(st)
    with _lock:
        cached = _load().get(key)
    if cached:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _lock:
        _load()[key] = value
        _save()
    return value


def _save() -> None:
    path = _cache_path()
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(_cache))
    os.replace(tmp, path)
