"""What the emulators need to run a model's image for real: a registry on loopback and a container engine.

Stand-alone on purpose (the emulators are an oracle): it imports nothing from cloudllm, only the
standard library, and talks to podman and Debian's docker-registry (the CNCF distribution registry).

- ``LoopbackRegistry``: an OCI registry on 127.0.0.1 standing in for ECR / Artifact Registry; its
  ``env()`` is CLOUDLLM_REGISTRY_ENDPOINT, which sends registry traffic for cloud image URIs there.
  ``own_registry``: the one an emulator starts (and stops) for itself when the caller gave none.
- ``sagemaker_container_command``: the command that runs an endpoint's image as SageMaker does
  (`IMAGE serve`, the artifact read-only at /opt/ml/model), or None when the image is not one the
  stand-in registry holds or no engine is installed (the emulator then keeps its in-process server).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from cloudllm_procs import SERVER_BACKOFF, Pending, poll_until
from cloudllm_procs import start as start_process
from cloudllm_procs import stop as stop_process

REGISTRY_ENDPOINT_ENV = "CLOUDLLM_REGISTRY_ENDPOINT"
_said_no_engine = False


class LoopbackRegistry:
    """docker-registry serving a temporary folder on 127.0.0.1 (optionally behind htpasswd basic auth)."""

    def __init__(self, htpasswd: Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="cloudllm-registry-"))
        self.htpasswd = htpasswd
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.marker = f"registry-{uuid.uuid4().hex}"  # proves a pid is still this registry

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {REGISTRY_ENDPOINT_ENV: self.endpoint}

    def start(self) -> "LoopbackRegistry":
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        auth = f"auth:\n  htpasswd:\n    realm: cloudllm\n    path: {self.htpasswd}\n" if self.htpasswd else ""
        config = self.dir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.dir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.endpoint}\n{auth}"
        )
        process = self.process = start_process([binary, "serve", str(config)], log_path=self.dir / "registry.log", marker=self.marker)

        def listening() -> object:
            if process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.dir / 'registry.log').read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return Pending()

        if isinstance(poll_until(listening, deadline=30, backoff=SERVER_BACKOFF), Pending):
            raise RuntimeError("docker-registry did not listen within 30s")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process.pid, self.marker, grace=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LoopbackRegistry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def own_registry() -> LoopbackRegistry | None:
    """The registry an emulator starts for itself when none is given (CLOUDLLM_REGISTRY_ENDPOINT unset).

    Only where it can serve images (docker-registry and podman installed). Its address goes into
    this process's environment, where the emulator looks when it runs a model's image, and into
    the emulator's env() for clients (`cloudllm push`). None: one was given, or none can run here.
    """
    if os.environ.get(REGISTRY_ENDPOINT_ENV) or not (shutil.which("docker-registry") and shutil.which("podman")):
        return None
    try:
        registry = LoopbackRegistry().start()
    except (OSError, RuntimeError) as exc:
        print(f"emulator: no registry for images ({exc}): endpoints run the artifact's server in a process", file=sys.stderr)
        return None
    os.environ[REGISTRY_ENDPOINT_ENV] = registry.endpoint
    return registry


def stop_own_registry(registry: LoopbackRegistry | None) -> None:
    if registry is None:
        return
    if os.environ.get(REGISTRY_ENDPOINT_ENV) == registry.endpoint:
        del os.environ[REGISTRY_ENDPOINT_ENV]
    registry.stop()


def registry_env(registry: LoopbackRegistry | None) -> dict[str, str]:
    return registry.env() if registry is not None else {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served_by_stand_in(image: str) -> str | None:
    """IMAGE's reference on the stand-in registry (ECR or Artifact Registry host swapped), or None."""
    endpoint = os.environ.get(REGISTRY_ENDPOINT_ENV)
    host, _, rest = image.partition("/")
    cloud = ".dkr.ecr." in host or host.endswith("-docker.pkg.dev")
    if not endpoint or not rest or not cloud:
        return None
    repository = rest.split("@")[0].rsplit(":", 1)[0] if "@" in rest or ":" in rest.rsplit("/", 1)[-1] else rest
    if not _registry_has(endpoint, repository):
        return None  # e.g. a catalog image (the HF DLC): the stand-in never held it
    return f"{endpoint}/{rest}"


def _registry_has(endpoint: str, repository: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{endpoint}/v2/{repository}/tags/list", timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _engine() -> str | None:
    global _said_no_engine
    engine = shutil.which("podman")
    if engine is None and not _said_no_engine:
        _said_no_engine = True
        print("emulator: no container engine (podman) here: endpoints run the artifact's server in a process, not its image", file=sys.stderr)
    return engine


def sagemaker_container_command(image: str, artifact: Path, port_file: Path, env: dict[str, str] | None = None) -> list[str] | None:
    """Pull IMAGE from the stand-in registry and return the `podman run` that serves ARTIFACT as SageMaker does.

    The port is chosen here and written to PORT_FILE (the emulator reads it back, as it does the
    generated server's); the container shares the host's network and listens on it.
    """
    reference = served_by_stand_in(image)
    engine = _engine() if reference else None
    if reference is None or engine is None:
        return None
    _pull(engine, reference, image)
    port = _free_port()
    port_file.write_text(str(port))
    variables = {**(env or {}), "SAGEMAKER_BIND_TO_PORT": str(port)}
    command = [engine, "run", "--rm", "--name", f"cloudllm-emulated-{uuid.uuid4().hex[:10]}", "--network", "host",
               "--pull", "never", "--volume", f"{artifact}:/opt/ml/model:ro"]
    for key, value in sorted(variables.items()):
        command += ["--env", f"{key}={value}"]
    # The artifact was written by this process's user; the image's non-root user must read it.
    for path in [artifact, *artifact.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return command + [reference, "serve"]


def vertex_container_command(image: str, command: list[str], args: list[str], env: dict[str, str]) -> list[str] | None:
    """The `podman run` that serves IMAGE as Vertex AI does (AIP_* variables, the model's command and
    args replacing the image's entrypoint and arguments when set), or None as for SageMaker."""
    reference = served_by_stand_in(image)
    engine = _engine() if reference else None
    if reference is None or engine is None:
        return None
    _pull(engine, reference, image)
    run = [engine, "run", "--rm", "--name", f"cloudllm-emulated-{uuid.uuid4().hex[:10]}", "--network", "host", "--pull", "never"]
    for key, value in sorted(env.items()):
        run += ["--env", f"{key}={value}"]
    if command:
        run += ["--entrypoint", command[0]]
    return run + [reference, *command[1:], *args]


def _pull(engine: str, reference: str, image: str) -> None:
    pulled = subprocess.run([engine, "pull", "--quiet", "--tls-verify=false", reference], capture_output=True, text=True)
    if pulled.returncode != 0:
        lines = (pulled.stderr or pulled.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"CannotPullContainerError: {image}: {lines[-1][:300]}")
