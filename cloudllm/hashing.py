"""sha256 of files, streamed once and cached by (device, inode, size, mtime), and a cheap identity.

The cache is an append-only file of JSON lines ({key: sha256} each) after a header line
that says whose it is: hashing N files appends N short lines, where rewriting the whole
cache per file was quadratic in N (10,000 small files took 31 s). In a file of ours a torn
or hand-edited line is skipped, never fatal, and the file is compacted when stale lines
outnumber live ones. A file that is not ours in shape (no header and lines that are not
our entries: an older cloudllm's single JSON document, someone else's file, a symlink) is
never trusted, appended to or compacted over: it is moved aside under a new name, with one
warning line, and the cache starts afresh. The cache is best effort: a read-only or full
CLOUDLLM_HOME only means the next run hashes again.

`identity` is what `cloudllm plan` uses instead of a hash it does not have: size, mtime
and the safetensors header, read in microseconds whatever the file's size, so planning a
140 GB model reads no weight bytes. Only a full sha256 names content; an identity only
tells a file apart from another state of itself on this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from pathlib import Path

from cloudllm.home import home_dir

_CHUNK = 8 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r"\d+:\d+:\d+:\d+")  # _key(): device, inode, size, mtime in ns
HEADER = json.dumps({"cloudllm": "sha256 cache", "format": 1}) + "\n"
IDENTITY_PREFIX = "identity:"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on a header
_lock = threading.Lock()
_cache: dict[str, str] | None = None
_lines = 0  # lines in the cache file when it was read, stale ones included


def _cache_path() -> Path:
    return home_dir("cache") / "sha256.json"


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _entry(line: str) -> tuple[str, str] | None:
    """(key, sha256) of one cache line, None for anything else."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or len(entry) != 1:
        return None
    ((key, value),) = entry.items()
    ok = isinstance(key, str) and _KEY.fullmatch(key) and isinstance(value, str) and _HEX64.fullmatch(value)
    return (key, value) if ok else None


def _load() -> dict[str, str]:
    global _cache, _lines
    if _cache is None:
        _cache, _lines = {}, 0
        path = _cache_path()
        try:
            text = None if path.is_symlink() else path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return _cache
        except OSError:
            return _cache  # unreadable: hash again, leave it alone
        lines = text.splitlines(keepends=True) if text is not None else []
        # Ours: our header first; or (written before the header existed) nothing but our entries.
        ours = text is not None and (not lines or lines[0] == HEADER or all(_entry(line) for line in lines))
        if not ours:
            _set_aside(path)
            return _cache
        for line in lines:
            _lines += 1
            if (entry := _entry(line)) is not None:  # else the header, a torn append or a hand edit: hashed again
                _cache[entry[0]] = entry[1]
        if _lines > 1000 and _lines > 2 * len(_cache):
            _rewrite()
    return _cache


def _set_aside(path: Path) -> None:
    """Move a cache file that is not ours to a free name beside it (never over another file), with one warning line."""
    import sys

    global _lines
    for n in range(1, 1000):
        aside = path.with_name(f"{path.name}.not-cloudllm-{n}")
        try:
            os.link(path, aside, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError:
            break
        os.unlink(path)
        sys.stderr.write(f"warning: {path} is not cloudllm's sha256 cache: moved it to {aside.name}; files are hashed afresh\n")
        return
    sys.stderr.write(f"warning: {path} is not cloudllm's sha256 cache and cannot be moved aside: not using a hash cache\n")
    _lines = -1  # never appended to or compacted over


def _create(path: Path) -> None:
    """A new cache file holding our header: written beside it, then linked in (never over a file another run made meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, HEADER.encode())
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _append(key: str, value: str) -> None:
    """One line per hashed file, in one write(2) on an O_APPEND descriptor, so concurrent runs interleave whole lines."""
    global _lines
    if _lines < 0:
        return
    try:
        path = _cache_path()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        except FileNotFoundError:
            _create(path)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(fd, (json.dumps({key: value}) + "\n").encode())
        finally:
            os.close(fd)
        _lines += 1
    except OSError:
        pass  # the cache only saves time


def _rewrite() -> None:
    """Compact the cache to one line per live entry: written beside it, then renamed over it."""
    global _lines
    try:
        path = _cache_path()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(HEADER + "".join(json.dumps({k: v}) + "\n" for k, v in (_cache or {}).items()), encoding="utf-8")
        os.replace(tmp, path)
        _lines = 1 + len(_cache or {})
    except OSError:
        pass


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached_sha256(path: str | Path) -> str | None:
    """The sha256 of a file hashed before and unchanged since (same inode, size and mtime), else None; reads no bytes."""
    key = _key(os.stat(path))
    with _lock:
        return _load().get(key)


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
    remember(path, value, st)
    return value


def remember(path: str | Path, value: str, st: os.stat_result | None = None) -> None:
    """Cache a sha256 computed elsewhere (while uploading a file), unless the file changed meanwhile."""
    now = os.stat(path)
    if st is not None and _key(st) != _key(now):
        return
    with _lock:
        _load()[_key(now)] = value
        _append(_key(now), value)


def identity(path: str | Path) -> str:
    """"identity:<sha256 of size, mtime and the safetensors header>": no weight byte is read.

    For a file that is not safetensors, size and mtime alone.
    """
    path = Path(path)
    st = os.stat(path)
    digest = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:".encode())
    if path.suffix == ".safetensors" and st.st_size >= 8:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            (length,) = struct.unpack("<Q", prefix)
            digest.update(prefix)
            if length <= min(_HEADER_LIMIT, st.st_size - 8):
                digest.update(fh.read(length))
    return IDENTITY_PREFIX + digest.hexdigest()


def is_identity(value: str) -> bool:
    return value.startswith(IDENTITY_PREFIX)
