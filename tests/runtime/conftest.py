"""Fixtures for the serving runtime: tiny models, artifacts laid out as the packager does, live servers.

An artifact here is what lands in /opt/ml/model: the model files plus code/ with
settings.json, serve.py, inference.py and a verbatim copy of cloudllm_runtime/.
Servers are real: a subprocess running code/serve.py (the container contract) or, where
only the HTTP behaviour matters, the same app under uvicorn in a thread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

import cloudllm_runtime
from cloudllm_runtime.settings import SETTINGS_FILE, ServingSettings

RUNTIME_DIR = Path(cloudllm_runtime.__file__).parent
START_TIMEOUT = 180.0

SERVE_PY = """\
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cloudllm_runtime.server import main  # noqa: E402

if __name__ == "__main__":
    main()
"""

INFERENCE_PY = """\
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cloudllm_runtime.toolkit import input_fn, model_fn, output_fn, predict_fn  # noqa: E402,F401
"""


# --- tiny models (built once per session) --------------------------------------------------------


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime-models")


@pytest.fixture(scope="session")
def tiny_t5(models_root: Path) -> Path:
    """A 2-layer T5; seed 1 makes the random weights say something before </s>."""
    from cloudllm.testing.tiny_models import build_tiny_t5

    return build_tiny_t5(models_root / "tiny-t5", seed=1)


@pytest.fixture(scope="session")
def tiny_llama(models_root: Path) -> Path:
    from cloudllm.testing.tiny_models import build_tiny_llama

    return build_tiny_llama(models_root / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert(models_root: Path) -> Callable[[str], Path]:
    """tiny_bert(head) -> a BERT folder with that head, built on first use."""
    from cloudllm.testing.tiny_models import build_tiny_bert

    built: dict[str, Path] = {}

    def get(head: str) -> Path:
        if head not in built:
            built[head] = build_tiny_bert(models_root / f"tiny-bert-{head}", head=head)
        return built[head]

    return get


@pytest.fixture(scope="session")
def task_models(tiny_gpt2: Path, tiny_t5: Path, tiny_bert: Callable[[str], Path]) -> dict[str, Path]:
    """The model folder for each task the runtime serves."""
    return {
        "text-generation": tiny_gpt2,
        "text2text-generation": tiny_t5,
        "summarization": tiny_t5,
        "text-classification": tiny_bert("sequence-classification"),
        "token-classification": tiny_bert("token-classification"),
        "question-answering": tiny_bert("question-answering"),
        "feature-extraction": tiny_bert("base"),
    }


# --- artifacts ---------------------------------------------------------------------------------


def make_artifact(model_dir: Path, dest: Path, settings: ServingSettings) -> Path:
    """Lay out model_dir as the packager does: the weights, plus code/ with the runtime copied verbatim."""
    shutil.copytree(model_dir, dest)
    code = dest / "code"
    code.mkdir()
    (code / SETTINGS_FILE).write_text(settings.to_json(), encoding="utf-8")
    (code / "serve.py").write_text(SERVE_PY, encoding="utf-8")
    (code / "inference.py").write_text(INFERENCE_PY, encoding="utf-8")
    (code / "requirements.txt").write_text("", encoding="utf-8")
    shutil.copytree(RUNTIME_DIR, code / "cloudllm_runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """artifact_factory(model_dir, **settings) -> a fresh artifact folder."""
    root = tmp_path_factory.mktemp("artifacts")
    counter = iter(range(10_000))

    def make(model_dir: Path, **settings: Any) -> Path:
        return make_artifact(model_dir, root / f"artifact-{next(counter)}", ServingSettings(**settings))

    return make


# --- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, *, path: str = "/ping", timeout: float = START_TIMEOUT, alive: Callable[[], str | None] = lambda: None) -> None:
    """Poll until path answers 200; alive() returns a reason when the server died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reason = alive()
        if reason:
            raise AssertionError(reason)
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}{path} did not answer 200 within {timeout}s")


class ServerProcess:
    """`python <artifact>/code/serve.py [serve] ...` in a subprocess, as a container runs it."""

    def __init__(self, artifact: Path, *, args: list[str] | None = None, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.artifact = artifact
        self.log_path = artifact.parent / f"{artifact.name}-server.log"
        self.port_file = artifact.parent / f"{artifact.name}-port"
        self.port_file.unlink(missing_ok=True)
        command = [sys.executable, str(artifact / "code" / "serve.py")]
        command += args if args is not None else ["serve", "--host", "127.0.0.1", "--port", "0"]
        command += ["--port-file", str(self.port_file)]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command,
            cwd=str(artifact.parent),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.port = port
        self.url = ""

    def wait_ready(self, health_path: str = "/ping") -> "ServerProcess":
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start (exit {self.process.poll()}):\n{self.log()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        wait_healthy(self.url, path=health_path, alive=self._died)
        return self

    def _died(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"server exited with {code}:\n{self.log()}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def wait_for_records(self, predicate: Callable[[dict], bool], count: int = 1, timeout: float = 30.0) -> list[dict]:
        """The log records matching `predicate`, once there are `count` of them.

        The server writes a request's line after the last byte of its answer has gone out,
        so a client can hold the answer a moment before the line is in the log.
        """
        deadline = time.monotonic() + timeout
        while True:
            matching = [r for r in self.log_records() if predicate(r)]
            if len(matching) >= count or time.monotonic() > deadline:
                return matching
            time.sleep(0.02)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as SageMaker does, and the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextmanager
def serve_in_thread(app: Any, health_path: str = "/ping", wait: bool = True) -> Iterator[str]:
    """The app under uvicorn on a loopback port in this process; yields its base URL."""
    import uvicorn

    from cloudllm_runtime.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if wait:
            wait_healthy(url, path=health_path, alive=lambda: None if thread.is_alive() else "server thread died")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def sse_events(text: str) -> list[dict]:
    """The JSON payloads of a text/event-stream body."""
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data:"):
            events.append(json.loads(block[len("data:"):]))
    return events
