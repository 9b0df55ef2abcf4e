"""Run the serving image exactly as a platform does (podman or docker, no daemon needed for podman).

SageMaker: `IMAGE serve`, the artifact mounted read-only at /opt/ml/model, port 8080, then
/ping and /invocations. Vertex AI: no arguments, AIP_HTTP_PORT / AIP_HEALTH_ROUTE /
AIP_PREDICT_ROUTE, and AIP_STORAGE_URI naming a gs:// prefix the container copies itself.
The container shares the host's network so it can reach a storage emulator on loopback; the
port it listens on is then the platform's port variable (SAGEMAKER_BIND_TO_PORT, AIP_HTTP_PORT).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cloudllm.errors import DeployFailed, UserError
from cloudllm.images.builders import Tool, find_engine

CONTRACTS = ("sagemaker", "vertex")
SAGEMAKER_MODEL_DIR = "/opt/ml/model"
# The routes Vertex AI gives a custom container when its model names none.
VERTEX_DEPLOYED_MODEL = "/v1/endpoints/local/deployedModels/local"
VERTEX_ROUTES = {"AIP_HEALTH_ROUTE": VERTEX_DEPLOYED_MODEL, "AIP_PREDICT_ROUTE": VERTEX_DEPLOYED_MODEL + ":predict"}
# What the container may learn from the host: where the emulated storage is, never credentials.
PASSED_THROUGH = ("STORAGE_EMULATOR_HOST",)
LOG_LINES = 5


def contract_run_args(
    image: str,
    contract: str,
    *,
    name: str,
    port: int,
    artifact: Path | None = None,
    storage_uri: str | None = None,
    env: dict[str, str] | None = None,
    user: str | None = None,
    publish: dict[int, int] | None = None,
    labels: dict[str, str] | None = None,
) -> list[str]:
    """The `run` arguments (after the engine's name) that start IMAGE under CONTRACT.

    By default the container shares the host's network; PUBLISH ({host port: container port})
    gives it its own instead, those ports published on 127.0.0.1 only.
    """
    if contract not in CONTRACTS:
        raise UserError(f"unknown container contract {contract!r}", f"pass --contract {' or '.join(CONTRACTS)}")
    args = ["run", "--rm", "--name", name, "--pull", "never"]
    if publish:
        for host_port, container_port in publish.items():
            args += ["--publish", f"127.0.0.1:{host_port}:{container_port}"]
    else:
        args += ["--network", "host"]
    for key, value in sorted((labels or {}).items()):
        args += ["--label", f"{key}={value}"]
    if user is not None:
        args += ["--user", user]
    variables = dict(env or {})
    for key in PASSED_THROUGH:
        if os.environ.get(key):
            variables.setdefault(key, os.environ[key])
    if contract == "sagemaker":
        if artifact is None:
            raise UserError("the SageMaker contract mounts a model folder", "pass the artifact folder")
        args += ["--volume", f"{artifact}:{SAGEMAKER_MODEL_DIR}:ro"]
        variables["SAGEMAKER_BIND_TO_PORT"] = str(port)
        command = ["serve"]
    else:
        if artifact is not None and storage_uri is None:
            args += ["--volume", f"{artifact}:{SAGEMAKER_MODEL_DIR}:ro"]  # `cloudllm serve --container --contract vertex ./artifact`
        if storage_uri is not None:
            variables["AIP_STORAGE_URI"] = storage_uri
        variables.update(VERTEX_ROUTES, AIP_HTTP_PORT=str(port))
        command = []
    for key, value in sorted(variables.items()):
        args += ["--env", f"{key}={value}"]
    return args + [image, *command]


@dataclass
class RunningContainer:
    """A started container whose output goes to LOG; `wait_ready` blocks until /ping says 200."""

    engine: Tool
    name: str
    url: str
    log: Path
    process: subprocess.Popen = field(repr=False)
    health_route: str = "/ping"

    def wait_ready(self, timeout: float = 600.0) -> "RunningContainer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DeployFailed(f"the container exited with code {self.process.returncode} before /ping answered: {self.last_lines()}", f"full log: {self.log}")
            try:
                if httpx.get(self.url + self.health_route, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise DeployFailed(f"the container did not answer {self.health_route} within {timeout:.0f}s: {self.last_lines()}", f"full log: {self.log}")

    def last_lines(self, count: int = LOG_LINES) -> str:
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()] if self.log.is_file() else []
        return " | ".join(lines[-count:])[-600:] or "no output"

    def stop(self, grace: int = 10) -> None:
        """SIGTERM, then SIGKILL after GRACE seconds, as the platforms do."""
        if self.process.poll() is None:
            subprocess.run([self.engine.path, "stop", "--time", str(grace), self.name], capture_output=True)
            try:
                self.process.wait(timeout=grace + 20)
            except subprocess.TimeoutExpired:
                subprocess.run([self.engine.path, "rm", "--force", self.name], capture_output=True)
                self.process.kill()


def start_container(
    image: str,
    contract: str,
    *,
    port: int,
    log: Path,
    artifact: Path | None = None,
    storage_uri: str | None = None,
    env: dict[str, str] | None = None,
    engine: str | None = None,
) -> RunningContainer:
    """Start IMAGE in the background under CONTRACT, its output appended to LOG."""
    tool = find_engine(engine)
    name = f"cloudllm-{contract}-{uuid.uuid4().hex[:10]}"
    args = contract_run_args(image, contract, name=name, port=port, artifact=artifact, storage_uri=storage_uri, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen([tool.path, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    health = VERTEX_ROUTES["AIP_HEALTH_ROUTE"] if contract == "vertex" else "/ping"
    return RunningContainer(tool, name, f"http://127.0.0.1:{port}", log, process, health)


def exec_container(image: str, contract: str, *, port: int, artifact: Path | None, storage_uri: str | None, engine: str | None, user: str | None = None) -> None:
    """Run IMAGE in the foreground under CONTRACT (never returns): the engine forwards Ctrl-C and SIGTERM."""
    tool = find_engine(engine)
    name = f"cloudllm-{contract}-{uuid.uuid4().hex[:10]}"
    args = contract_run_args(image, contract, name=name, port=port, artifact=artifact, storage_uri=storage_uri, user=user)
    os.execv(tool.path, [tool.name, *args])


def serve_container(artifact: str, *, contract: str, image: str | None, port: int, engine: str | None = None) -> None:
    """`cloudllm serve ARTIFACT --container`: check the inputs, then run the image in the foreground."""
    from cloudllm.images.build import last_built_image
    from cloudllm.images.builders import image_id

    tool = find_engine(engine)
    image = image or last_built_image()
    if image_id(tool, image) is None:
        raise UserError(f"image {image} is not in this machine's image store", "build it with `cloudllm build` or pass --image")
    storage_uri = artifact if artifact.startswith("gs://") else None
    folder = None
    if storage_uri is None:
        from cloudllm.bundle import read_manifest

        folder = Path(artifact).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} is not a model artifact (no config.json)", "build one with `cloudllm package MODEL -o DIR`")
        read_manifest(folder)
    elif contract != "vertex":
        raise UserError("a gs:// model location is Vertex AI's contract", "add --contract vertex, or pass a local artifact folder")
    user = None
    if folder is not None and not _readable_by_others(folder):
        # The image's own user could not read them; the platforms' copies of the artifact are readable.
        owner = folder.stat()
        user = f"{owner.st_uid}:{owner.st_gid}"
        print(f"note: some files in {folder} are readable by their owner only: running as {user} (`chmod -R a+rX` to run as the image's user)", file=sys.stderr)
    exec_container(image, contract, port=port, artifact=folder, storage_uri=storage_uri, engine=tool.name, user=user)


def _readable_by_others(folder: Path) -> bool:
    return all(path.stat().st_mode & (0o005 if path.is_dir() else 0o004) for path in [folder, *folder.rglob("*")])
