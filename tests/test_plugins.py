"""Providers are plugins: a package installed with a `cloudllm.providers` entry point is reachable from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "echo_provider"


@pytest.fixture(scope="module")
def echo_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-installs the fixture package into a folder put on PYTHONPATH (the venv stays untouched)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "echo_provider"
    shutil.copytree(FIXTURE, source)  # the build writes build/ and *.egg-info beside the sources
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    return target


def test_third_party_provider_reached_through_the_cli(echo_plugin: Path, tiny_gpt2: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(echo_plugin), "ECHO_PROVIDER_DB": str(tmp_path / "db.json")}
    deployed = run_cli("deploy", str(tiny_gpt2), "--provider", "echo", "--name", "plug", "--json", env=env)
    assert deployed.returncode == 0, deployed.stderr
    assert json.loads(deployed.stdout)["action"] == "create"
    db = json.loads((tmp_path / "db.json").read_text())
    assert "code/serve.py" in db["plug"]["files"] and db["plug"]["calls"] == ["deploy"]

    again = run_cli("deploy", str(tiny_gpt2), "--provider", "echo", "--name", "plug", env=env)
    assert again.returncode == 0 and "unchanged" in again.stdout

    answer = run_cli("invoke", "plug", "hello", env=env)
    assert answer.stdout.strip() == "echo: hello"
    listed = run_cli("list", "--json", env=env)
    assert [e["provider"] for e in json.loads(listed.stdout)] == ["echo"]
    assert run_cli("delete", "plug", env=env).returncode == 0
    assert json.loads((tmp_path / "db.json").read_text()) == {}


def test_unknown_provider_lists_installed_ones(tiny_gpt2: Path) -> None:
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "nosuchcloud")
    line = assert_one_line_error(result, code=2, contains="unknown provider 'nosuchcloud'")
    assert "local" in line and "sagemaker" in line
