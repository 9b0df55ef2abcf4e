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


# --- issue 14: questions, flags, files, ports -----------------------------------------------------------
def _cloud_record(home: str, name: str) -> str:
    """A record of a SageMaker endpoint, as deploy writes one (the endpoint itself is beyond reach here)."""
    from cloudllm.records import EndpointRecord, save_record

    os.environ["CLOUDLLM_HOME"] = home
    save_record(EndpointRecord(name=name, provider="sagemaker", model="/models/m", region="us-east-1"))
    return str(os.path.join(home, "endpoints", f"{name}.json"))


def _delete_on_a_terminal(env: dict, answer: bytes, *args: str) -> tuple[int, bytes]:
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "cloudllm.cli", "delete", *args], stdin=follower, stdout=follower,
                               stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    written = b""
    try:
        while b"cannot be undone" not in written and process.poll() is None:
            try:
                written += os.read(leader, 4096)
            except OSError:
                break
        if b"cannot be undone" in written:
            os.write(leader, answer)
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            written += chunk
    finally:
        os.close(leader)
        process.wait(timeout=120)
    return process.returncode, written


def test_delete_of_a_cloud_endpoint_asks_on_a_terminal_and_never_in_ci(tmp_path) -> None:
    record = _cloud_record(str(tmp_path), "billing")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CLOUDLLM_HOME=str(tmp_path), AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
               CLOUDLLM_RETRY_SECONDS="1", AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    code, written = _delete_on_a_terminal(env, b"n\n", "billing")
    assert b"delete sagemaker endpoint billing?" in written and b"not deleted" in written and code == 2, written
    assert os.path.exists(record)
    # CI set, or --yes: no question; the delete goes on (here to an AWS that does not answer: exit 1, one line).
    for extra_env, args in (({"CI": "true"}, ()), ({}, ("--yes",))):
        code, written = _delete_on_a_terminal({**env, **extra_env}, b"", "billing", *args)
        assert b"cannot be undone" not in written and b"cannot reach AWS" in written and code == 1, written
    result = subprocess.run([sys.executable, "-m", "cloudllm.cli", "delete", "billing"], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)  # not a terminal: never asks  # fmt: skip
    assert "cannot be undone" not in result.stderr and result.returncode == 1, result.stderr


def test_a_full_disk_leaves_the_old_record_whole_and_no_temporary_file(tmp_path, monkeypatch) -> None:
    import errno

    from cloudllm.errors import UserError
    from cloudllm.home import write_atomic

    target = tmp_path / "record.json"
    target.write_text("old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        write_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


@pytest.mark.parametrize("home", ["/proc/cloudllm-home", "/dev/null/home"])
def test_an_unusable_cloudllm_home_is_one_line(home: str) -> None:
    result = subprocess.run([sys.executable, "-m", "cloudllm.cli", "list"], env={**os.environ, "CLOUDLLM_HOME": home},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and home in lines[0], result.stderr


@pytest.mark.parametrize("which", [["sagemaker", "--port"], ["vertex", "--port"], ["vertex", "--port", "0", "--storage-port"]])
def test_emulate_on_a_taken_port_exits_with_one_line(which: list[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = subprocess.run([sys.executable, "-m", "cloudllm.cli", "emulate", *which, port], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and f"port {port} on 127.0.0.1 is already in use" in lines[0], result.stderr


def test_an_endpoint_failure_has_one_exit_code_with_and_without_stream() -> None:
    from cloudllm.errors import EXIT_FAILED
    from cloudllm.http import endpoint_error
    from cloudllm.invocation import iter_sse_tokens

    whole = endpoint_error("demo", 500, '{"error": "CUDA out of memory"}')
    with pytest.raises(Exception) as streamed:
        list(iter_sse_tokens(['data: {"token": {"text": "a"}}', 'data: {"error": "CUDA out of memory"}']))
    assert whole.exit_code == streamed.value.exit_code == EXIT_FAILED


def test_invoke_json_means_output_and_body_takes_the_request(tmp_path) -> None:
    env = {**os.environ, "CLOUDLLM_HOME": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "cloudllm.cli", "invoke", "ghost", *a, "--provider", "local"],  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "--body is not valid JSON" in run("--body", "{nope").stderr
    old = run("--json", '{"inputs": "hi"}')  # the old spelling still sends a body, with a warning first
    assert "deprecated: use --body" in old.stderr and "no local endpoint named 'ghost'" in old.stderr
    help_text = subprocess.run([sys.executable, "-m", "cloudllm.cli", "invoke", "--help"], capture_output=True, text=True).stdout
    assert "--body JSON" in help_text and "--timeout" in help_text and "Machine-readable output" in help_text


@pytest.mark.slow  # the SageMaker emulator's start is most of its ~30 s
def test_an_interrupted_first_cloud_deploy_leaves_a_record_delete_uses(sagemaker_emulator, tiny_gpt2, tmp_path) -> None:
    """SIGTERM right after the intent record is saved, before anything exists on SageMaker: `list` shows the
    endpoint as Incomplete and the advice printed (`cloudllm delete NAME`) works."""
    import json
    import signal
    import time

    env = {**os.environ, "CLOUDLLM_HOME": str(tmp_path)}
    record = tmp_path / "endpoints" / "half.json"
    deploy = subprocess.Popen([sys.executable, "-m", "cloudllm.cli", "deploy", str(tiny_gpt2), "--name", "half", "--provider", "sagemaker",
                               "--runtime", "handler", "--instance", "ml.m5.xlarge", "--bucket", f"{sagemaker_emulator.bucket}/models",
                               "--role", sagemaker_emulator.role], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while not record.exists() and deploy.poll() is None:
        time.sleep(0.01)
    deploy.send_signal(signal.SIGTERM)
    _, err = deploy.communicate(timeout=300)
    if deploy.returncode == 0:
        pytest.skip("the deploy finished before the signal arrived")
    assert "cloudllm delete half" in err, err
    run = lambda *a: subprocess.run([sys.executable, "-m", "cloudllm.cli", *a], env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    listed = {e["name"]: e for e in json.loads(run("list", "--json").stdout)}
    assert listed["half"]["state"] in ("Incomplete", "Creating", "Failed"), listed
    deleted = run("delete", "half")
    assert deleted.returncode == 0, deleted.stderr
    assert not record.exists() and json.loads(run("list", "--provider", "sagemaker", "--json").stdout) == []
