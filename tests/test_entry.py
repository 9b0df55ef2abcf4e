"""cloudllm/entry.py, the console script: a plain local invoke answers as the full CLI does, on a real
tiny GPT-2 served on loopback, and without importing click or torch; everything else falls through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli, shared_local_home


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLOUDLLM_HOME for the module, so one deployed endpoint serves several tests."""
    yield from shared_local_home(tmp_path_factory)


@pytest.fixture(scope="module")
def demo(home: dict, tiny_gpt2: Path) -> dict:
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "demo", "--json", env=home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def run_entry(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`python -m cloudllm ARGS`: cloudllm.entry.main, what the console script runs."""
    return subprocess.run([sys.executable, "-m", "cloudllm", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip


def run_full_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    """cloudllm.cli.main itself, the full path the entry must match."""
    code = "import sys\nfrom cloudllm.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def _same(args: tuple[str, ...], env: dict) -> subprocess.CompletedProcess:
    quick, full = run_entry(*args, env=env), run_full_cli(*args, env=env)
    assert (quick.returncode, quick.stdout, quick.stderr) == (full.returncode, full.stdout, full.stderr), args
    return quick


@pytest.mark.parametrize(
    "args",
    [
        ("invoke", "demo", "Once upon a time"),
        ("invoke", "demo", "Once upon a time", "--max-new-tokens", "5"),
        ("invoke", "--max-new-tokens=3", "demo", "--timeout", "60", "Once upon a time"),
    ],
)
def test_a_plain_invoke_prints_what_the_full_cli_prints(demo: dict, home: dict, args: tuple[str, ...]) -> None:
    result = _same(args, home)
    assert result.returncode == 0 and result.stdout.strip() and not result.stderr


def test_max_new_tokens_reaches_the_server(demo: dict, home: dict) -> None:
    short = run_entry("invoke", "demo", "Once upon a time", "--max-new-tokens", "1", env=home)
    longer = run_entry("invoke", "demo", "Once upon a time", "--max-new-tokens", "12", env=home)
    assert short.returncode == longer.returncode == 0
    assert len(short.stdout) < len(longer.stdout)


def test_a_missing_endpoint_is_the_full_clis_one_line(demo: dict, home: dict) -> None:
    assert_one_line_error(_same(("invoke", "nowhere", "Hi"), home), code=2, contains="nowhere")


def test_an_answer_that_is_an_error_is_the_full_clis_line(demo: dict, home: dict) -> None:
    # More tokens than the model holds: sent by the quick path (a plain decimal), refused by the server with a 4xx.
    result = _same(("invoke", "demo", "Hi", "--max-new-tokens", "99999999"), home)
    assert_one_line_error(result, code=2, contains="rejected the request (4")


@pytest.mark.parametrize(
    "args",
    [
        ("invoke", "demo", "Hi", "--raw", "--max-new-tokens", "2"),  # a flag the quick path leaves to click
        ("invoke", "demo", "Hi", "--json", "--max-new-tokens", "2"),
        ("invoke", "demo", "Hi", "--max-new-tokens", "-1"),  # not a plain decimal: click judges it
        ("invoke", "demo", "Hi", "--timeout", "0.01"),  # out of range: click's error line
        ("invoke", "demo", "Hi", "--max-new-tokens", "2", "--max-new-tokens", "3"),
        ("invoke", "demo"),
    ],
)
def test_anything_else_falls_through_to_the_full_cli(demo: dict, home: dict, args: tuple[str, ...]) -> None:
    result = _same(args, home)
    assert result.stdout.strip() or result.stderr.startswith("error: ")


def test_a_quick_invoke_imports_neither_click_nor_torch_nor_http_client(demo: dict, home: dict) -> None:
    code = (
        "import sys\n"
        "from cloudllm.entry import main\n"
        "code = main(['invoke', 'demo', 'Once upon a time', '--max-new-tokens', '4'])\n"
        "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'click', 'torch', 'pydantic', 'httpx', 'rich', 'http', 'email'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **home})
    assert result.returncode == 0, result.stderr
    *answer, last = result.stdout.strip().splitlines()
    assert answer and last == "0 []"
