"""examples/: the GitHub Actions workflow's test job and the pytest plugin, run as a user's CI runs them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_github_workflow_test_job_runs_here(tmp_path: Path) -> None:
    """Every `run:` step of the workflow's emulator job, in order, in bash, with $GITHUB_ENV carried
    between steps as Actions does: only the pip install is skipped (cloudllm is installed here)."""
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    job = workflow["jobs"]["test"]
    steps = [step for step in job["steps"] if "run" in step and "pip install" not in step["run"]]
    assert len(steps) >= 5, [s.get("name") for s in steps]
    shutil.copy(EXAMPLES / "cloudllm.sagemaker.yaml", tmp_path / "cloudllm.yaml")  # "the production file"
    github_env = tmp_path / "github.env"
    github_env.touch()
    env = {**os.environ, **workflow["env"], "GITHUB_ENV": str(github_env), "CLOUDLLM_HOME": str(tmp_path / "home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    ports = {"8095": str(_free_port()), "8090": str(_free_port()), "9023": str(_free_port())}  # never a fixed port in tests
    groups: list[int] = []
    try:
        for step in steps:
            script = step["run"]
            for fixed, free in ports.items():
                script = script.replace(f"--port {fixed}", f"--port {free}").replace(f"--storage-port {fixed}", f"--storage-port {free}")
            for line in github_env.read_text().splitlines():
                key, _, value = line.partition("=")
                env[key] = value
            process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
            groups.append(process.pid)  # the emulators it starts in the background stay in its process group
            out, _ = process.communicate(timeout=600)
            assert process.returncode == 0, f"step {step['name']!r} failed:\n{out[-3000:]}"
    finally:
        for group in groups:
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert "AWS_ENDPOINT_URL" in env and "STORAGE_EMULATOR_HOST" in env  # the emulators' exports reached later steps
    assert (tmp_path / "again.json").is_file()  # the second apply ran and said no-change (the step checks it)


pytest_plugins = ["pytester"]


def test_the_pytest_plugin_gives_users_the_fixtures(pytester: pytest.Pytester) -> None:
    """A user's own test file, in its own pytest run, gets cloudllm_home, tiny_gpt2 and the local provider."""
    pytester.makepyfile(
        test_mine=textwrap.dedent(
            """
            import cloudllm

            def test_my_model_answers(cloudllm_home, tiny_gpt2):
                cloudllm.deploy(tiny_gpt2, provider="local", name="mine")
                answer = cloudllm.invoke("mine", "Hello", parameters={"max_new_tokens": 3})
                assert isinstance(answer, str)
                cloudllm.delete("mine")
                assert cloudllm.list_endpoints() == []
            """
        )
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_github_workflow_installs_cloudllm_from_its_repository_not_an_index() -> None:
    """cloudllm is published on no package index: every install of it is from a checkout of its repository."""
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    for job_name, job in workflow["jobs"].items():
        checkouts = {step["with"]["path"] for step in job["steps"] if step.get("uses", "").startswith("actions/checkout") and "path" in step.get("with", {})}
        installs = [step["run"] for step in job["steps"] if "pip install" in step.get("run", "")]
        assert installs, job_name
        for command in installs:
            wanted = [word.strip("\"'") for word in command.split() if "cloudllm" in word and not word.startswith(("-c", ".cloudllm/constraints"))]
            for requirement in wanted:
                folder = requirement.split("[")[0]
                assert folder.startswith("./") and folder[2:] in checkouts, (job_name, requirement, checkouts)


def _commented_commands(path: Path) -> list[str]:
    """The shell commands a file's header comments tell the user to run (`#   cloudllm ...`, `#   python ...`)."""
    commands = []
    for line in path.read_text().splitlines():
        text = line.removeprefix("#").strip()
        if line.startswith("#   ") and text.split(" ")[0] in ("cloudllm", "python"):
            commands.append(text)
    return commands


def test_the_local_yaml_example_works_as_its_comments_say(tmp_path: Path) -> None:
    """Build the model the comments name, apply the file, invoke both endpoints: from a repository
    root, as the comments are written, with the user's shell (the venv's bin on PATH)."""
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLES / "cloudllm.local.yaml", tmp_path / "examples" / "cloudllm.local.yaml")
    commands = _commented_commands(EXAMPLES / "cloudllm.local.yaml")
    assert any(c.startswith("cloudllm apply") for c in commands) and any(c.startswith("python -m") for c in commands), commands
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    try:
        for command in commands:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
            if command.startswith("cloudllm invoke"):
                assert done.stdout.strip(), command
        listed = subprocess.run(["cloudllm", "list", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert {e["name"]: e["state"] for e in json.loads(listed.stdout)} == {"chat": "InService", "chat-long": "InService"}
    finally:
        for name in ("chat", "chat-long"):
            subprocess.run(["cloudllm", "delete", name], env=env, capture_output=True, timeout=120)

