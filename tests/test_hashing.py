"""The sha256 cache's file: ours is read line by line; one that is not ours in shape is moved aside, never trusted or overwritten."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cloudllm import hashing


@pytest.fixture
def cache_file(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(hashing, "_cache", None)  # each test is a new process reading the file back
    path = Path(os.environ["CLOUDLLM_HOME"]) / "cache" / "sha256.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _file(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = tmp_path / "w.bin"
    path.write_text(text)
    return path, hashlib.sha256(text.encode()).hexdigest()


def test_a_new_cache_starts_with_its_header_and_is_private(cache_file: Path, tmp_path: Path) -> None:
    path, digest = _file(tmp_path, "weights")
    assert hashing.sha256_file(path) == digest
    lines = cache_file.read_text().splitlines(keepends=True)
    assert lines[0] == hashing.HEADER and digest in json.loads(lines[1]).values()
    assert cache_file.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "foreign",
    [
        '{\n  "1:2:3:4": "' + "a" * 64 + '"\n}\n',  # one pretty-printed JSON document (the whole cache rewritten per file)
        json.dumps({"1:2:3:4": "a" * 64, "5:6:7:8": "b" * 64}) + "\n",  # one document on one line
        "someone else's notes\n",
        json.dumps({"1:2:3:4": "a" * 64}) + "\n" + '{"k": "not-a-hash"}\n',  # no header, and a line that is not ours
    ],
)
def test_a_file_not_ours_in_shape_is_moved_aside_with_one_warning_and_rebuilt(
    cache_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, foreign: str
) -> None:
    path, digest = _file(tmp_path, "weights")
    st = os.stat(path)
    foreign = foreign.replace("1:2:3:4", f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")  # a wrong hash for this file
    cache_file.write_text(foreign)

    assert hashing.sha256_file(path) == digest  # never trusted
    warnings = [line for line in capsys.readouterr().err.splitlines() if "sha256 cache" in line]
    assert len(warnings) == 1 and "sha256.json.not-cloudllm-1" in warnings[0]
    aside = cache_file.with_name("sha256.json.not-cloudllm-1")
    assert aside.read_text() == foreign  # kept as it was
    assert cache_file.read_text().splitlines(keepends=True)[0] == hashing.HEADER  # rebuilt, ours

    # A second foreign file later goes beside the first, never over it.
    cache_file.write_text("more notes\n")
    hashing._cache = None
    hashing.sha256_file(path)
    assert aside.read_text() == foreign
    assert cache_file.with_name("sha256.json.not-cloudllm-2").read_text() == "more notes\n"


def test_a_symlinked_cache_is_not_written_through(cache_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    elsewhere = tmp_path / "someone-elses.txt"
    elsewhere.write_text("keep me\n")
    cache_file.symlink_to(elsewhere)
    path, digest = _file(tmp_path, "weights")
    assert hashing.sha256_file(path) == digest
    assert elsewhere.read_text() == "keep me\n"
    assert "not cloudllm's sha256 cache" in capsys.readouterr().err
    assert not cache_file.is_symlink() and cache_file.read_text().startswith(hashing.HEADER)


def test_a_cache_written_before_the_header_is_still_ours(cache_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, digest = _file(tmp_path, "weights")
    st = os.stat(path)
    cache_file.write_text(json.dumps({f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}": digest}) + "\n")
    assert hashing.cached_sha256(path) == digest
    assert capsys.readouterr().err == "" and not list(cache_file.parent.glob("*.not-cloudllm-*"))
