"""The CLI's own promises: fast, light start-up and plain progress in CI logs."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "google.cloud.aiplatform", "sagemaker", "boto3", "botocore")


@pytest.mark.parametrize("argv", [["--help"], ["invoke", "--help"], ["deploy", "--help"], ["logs", "--help"]])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    """`--help` must start fast: none of the heavy libraries is imported (BENCHMARKS.md times it)."""
    code = (
        "import sys\n"
        "from cloudllm.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage: cloudllm" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _progress_on_a_terminal(env: dict[str, str]) -> bytes:
    """What the CLI's reporter writes to stderr when stderr is a terminal (a pseudo-terminal here)."""
    code = (
        "from cloudllm.cli import _reporter\n"
        "reporter = _reporter(False)\n"
        "print(type(reporter).__name__, flush=True)\n"
        "with reporter.waiting('waiting for the endpoint') as update:\n"
        "    update('Creating')\n"
        "reporter.step('uploaded 3 files')\n"
    )
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=follower,
                                   env={**os.environ, **env})  # fmt: skip
        os.close(follower)
        follower = -1
        out, _ = process.communicate(timeout=60)
        written = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO once the child has closed its end
                break
            if not chunk:
                break
            written += chunk
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert process.returncode == 0
    return out + b"\n" + written


def test_ci_set_means_plain_lines_even_on_a_terminal() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    fancy = _progress_on_a_terminal({**env, "CI": ""})
    assert b"RichReporter" in fancy and b"\x1b[" in fancy  # a terminal gets the live status line
    plain = _progress_on_a_terminal({**env, "CI": "true"})
    assert b"PlainReporter" in plain and b"\x1b[" not in plain
    assert b"uploaded 3 files" in plain and b"waiting for the endpoint: done" in plain
