"""cloudllm.testing: a pytest plugin for testing deploy configs offline, plus tiny model builders.

Installed with cloudllm (entry point `pytest11`), so its fixtures are available in
any test suite:

    def test_my_model_answers(cloudllm_home, tiny_gpt2):
        cloudllm.deploy(tiny_gpt2, provider="local", name="t")
        assert cloudllm.invoke("t", "Hello")
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def cloudllm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated CLOUDLLM_HOME; local endpoints started in it are stopped afterwards."""
    home = tmp_path / "cloudllm-home"
    monkeypatch.setenv("CLOUDLLM_HOME", str(home))
    yield home
    _stop_local_endpoints(home)


def _stop_local_endpoints(home: Path) -> None:
    import json
    import signal

    for state_file in (home / "local").glob("*/state.json"):
        try:
            pid = json.loads(state_file.read_text()).get("pid")
            if pid:
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 model folder (text-generation), built offline once per session."""
    from cloudllm.testing.tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")
