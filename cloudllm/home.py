"""Where cloudllm keeps its state on this machine: CLOUDLLM_HOME, default ~/.cloudllm.

Every file written here goes through `write_atomic`: a full disk or a kill mid-write leaves
the previous version whole, never half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

from cloudllm.errors import UserError


def home() -> Path:
    raw = os.environ.get("CLOUDLLM_HOME") or str(Path.home() / ".cloudllm")
    if "\0" in raw:
        raise UserError("CLOUDLLM_HOME contains a NUL character", "set CLOUDLLM_HOME to a folder path")
    path = Path(raw).expanduser()
    return _ensure_folder(path, "CLOUDLLM_HOME")


def home_dir(*parts: str) -> Path:
    return _ensure_folder(home().joinpath(*parts), "CLOUDLLM_HOME")


def _ensure_folder(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{what} {path} is a file, not a folder", "point CLOUDLLM_HOME at a folder (or remove that file)") from None
    except OSError as exc:
        raise UserError(f"cannot create {what} folder {path}: {exc.strerror}", "set CLOUDLLM_HOME to a writable folder") from None
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a folder", "point CLOUDLLM_HOME at a folder")
    return path


def write_atomic(path: Path, text: str, *, private: bool = False) -> None:
    """Write text to path all or nothing (temporary file, fsync, rename); private files are 0600.

    A full disk or a read-only folder is one UserError naming the file, and no temporary file is left.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            if private:
                os.chmod(tmp, 0o600)  # a pre-existing temporary file keeps its mode through O_CREAT
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UserError(f"cannot write {path}: {exc.strerror or exc}", "free disk space or make that folder writable, then retry") from None
