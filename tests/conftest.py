"""Test-wide setup: loopback only, no cloud metadata probes, no hub downloads, an isolated CLOUDLLM_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["NO_GCE_CHECK"] = "True"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"

CLOUDLLM = str(Path(sys.executable).parent / "cloudllm")


@pytest.fixture(autouse=True)
def _isolated_home(cloudllm_home: Path) -> Path:
    """No test reads or writes the developer's ~/.cloudllm."""
    return cloudllm_home


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """The real `cloudllm` console script in a subprocess, as a user or CI job runs it."""
    return subprocess.run(
        [CLOUDLLM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *, code: int = 2, contains: str = "") -> str:
    """A user mistake: non-zero documented exit code, one line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error: ")
    assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (nn.Linear q/k/v/o and gate/up/down projections): the shape TGI's and vLLM's LoRA support takes."""
    from cloudllm.testing.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="session")
def llama_loras(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three q_proj/v_proj LoRA adapters of tiny_llama built by peft; each answers differently from the base and the others."""
    from cloudllm.testing.tiny_adapters import build_tiny_lora

    root = tmp_path_factory.mktemp("llama-loras")
    return {name: build_tiny_lora(tiny_llama, root / name, seed=seed) for name, seed in (("legal", 1), ("support", 2), ("extra", 3))}


def shared_local_home(tmp_path_factory: pytest.TempPathFactory):
    """A CLOUDLLM_HOME for a whole test module (one deployed endpoint serves its tests); the local
    servers started under it are killed at the end. Use as `yield from shared_local_home(...)`."""
    import json
    import signal

    path = tmp_path_factory.mktemp("home")
    yield {"CLOUDLLM_HOME": str(path)}
    for state in (path / "local").glob("*/state.json"):
        try:
            os.killpg(json.loads(state.read_text()).get("pid"), signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
