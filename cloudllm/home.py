"""Where cloudllm keeps its state on this machine: CLOUDLLM_HOME, default ~/.cloudllm."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    path = Path(os.environ.get("CLOUDLLM_HOME") or Path.home() / ".cloudllm").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def home_dir(*parts: str) -> Path:
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
