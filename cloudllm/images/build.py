"""`cloudllm build`: the serving image from containers/Dockerfile, tagged from its content.

The build context is staged from exactly the files the Dockerfile copies, so the tag (a digest
of the base image's id and those files) changes when and only when the image would. The
machine's pip configuration reaches the one RUN that installs, as build secrets (pip.conf,
its CA bundle) and read-only mounts of local wheel folders: never as a layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from cloudllm.errors import UserError
from cloudllm.home import home_dir
from cloudllm.images.builders import Tool, find_builder, image_id, pull

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "docker.io/pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"
DEFAULT_REPOSITORY = "cloudllm-serve"
# What the Dockerfile copies, relative to the repository root (the build context).
CONTEXT_FILES = ("containers/Dockerfile", "containers/requirements.txt", "containers/serve")
RUNTIME_PACKAGE = "cloudllm_runtime"
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "cert", "timeout")
SECRET_DIR = "/run/secrets"
LAST_BUILD_FILE = "last-build.json"


@dataclass
class BuildResult:
    image: str  # repository:tag
    image_id: str
    base: str
    base_id: str
    builder: str
    seconds: float
    log: str

    def to_dict(self) -> dict:
        return asdict(self)


def context_files(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Every file the image is built from, by its path in the build context, sorted.

    ROOT is a checkout (containers/ beside cloudllm_runtime/) or site-packages, where the wheel
    carries containers/ inside the cloudllm package. Bytecode caches are left out: not source.
    """
    containers = root / "containers"
    if not containers.is_dir():
        containers = Path(__file__).resolve().parents[1] / "containers"
    files = {name: containers / name.split("/", 1)[1] for name in CONTEXT_FILES}
    runtime = root / RUNTIME_PACKAGE
    for path in sorted(runtime.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files[f"{RUNTIME_PACKAGE}/{path.relative_to(runtime).as_posix()}"] = path
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing or len(files) == len(CONTEXT_FILES):
        raise UserError(f"the image's source is incomplete: {', '.join(missing) or RUNTIME_PACKAGE} missing", "reinstall cloudllm")
    return files


def content_tag(base_id: str, files: dict[str, Path]) -> str:
    """12 hex digits of a digest over the base image id and each file's context path, mode and bytes."""
    digest = hashlib.sha256(base_id.encode())
    for name, path in files.items():
        digest.update(b"\0" + name.encode())
        digest.update(b"\0" + oct(path.stat().st_mode & 0o111).encode())
        digest.update(b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def stage_context(files: dict[str, Path], into: Path) -> None:
    for name, path in files.items():
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def host_pip_settings() -> dict[str, str]:
    """This machine's pip settings that say where packages come from (environment beats files, as in pip)."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    found: dict[str, tuple[int, str]] = {}
    for line in result.stdout.splitlines():
        scope_key, _, value = line.partition("=")
        scope, _, key = scope_key.rpartition(".")
        if key in PIP_KEYS and scope in (":env:", "global", "install"):
            rank = {"global": 0, "install": 1, ":env:": 2}[scope]
            if key not in found or found[key][0] <= rank:
                found[key] = (rank, value.strip().strip("'\""))
    return {key: value for key, (_, value) in found.items()}


def pip_build_inputs(settings: dict[str, str], builder: str, workdir: Path) -> tuple[list[str], list[str]]:
    """(builder flags, notes): pip.conf and the CA bundle as secrets, local folders pip reads as read-only mounts."""
    flags: list[str] = []
    notes: list[str] = []
    lines = ["[global]"]
    cert = settings.get("cert")
    if cert and os.path.isfile(cert):
        lines.append(f"cert = {SECRET_DIR}/pip-cert")
    else:  # the Dockerfile mounts both secrets; an empty one stands for "none"
        cert = str(workdir / "no-cert")
        Path(cert).write_text("")
    flags += ["--secret", f"id=pip-cert,src={cert}"]
    for key in ("index-url", "extra-index-url", "find-links", "trusted-host", "timeout"):
        if key not in settings:
            continue
        kept = []
        for value in settings[key].split():
            local = value[len("file://") :] if value.startswith("file://") else value if value.startswith("/") else None
            if local is None:
                kept.append(value)
            elif os.path.isdir(local) and builder != "docker":
                # A local index's pages link to files beside it (../files/x.whl): mount the folder above it.
                mount = os.path.dirname(local.rstrip("/")) if key.endswith("index-url") else local
                flags += ["--volume", f"{mount}:{mount}:ro"]
                kept.append(value)
            else:
                notes.append(f"pip {key} {value} is not a folder a {builder} build can mount; left out")
        if kept:
            lines.append(f"{key} = {' '.join(kept)}")
    conf = workdir / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    flags += ["--secret", f"id=pip.conf,src={conf}"]
    return flags, notes


def build_command(builder: Tool, dockerfile: Path, context: Path, tag: str, base: str, extra: list[str]) -> list[str]:
    common = ["--build-arg", f"BASE={base}", *extra, "-f", str(dockerfile), "-t", tag, str(context)]
    if builder.name == "buildah":
        return [builder.path, "bud", "--layers", "--isolation", "chroot", "--network", "host", *common]
    if builder.name == "podman":
        return [builder.path, "build", "--layers", "--isolation", "chroot", "--network", "host", *common]
    return [builder.path, "build", "--network", "host", *common]


def build_image(
    *,
    tag: str | None = None,
    base: str = DEFAULT_BASE,
    builder: str | None = None,
    say: Callable[[str], None] = lambda line: None,
    root: Path = REPO_ROOT,
    no_cache: bool = False,
) -> BuildResult:
    """Build the serving image FROM BASE and return what was built; a failure names its log."""
    tool = find_builder(builder)
    started = time.monotonic()
    base_id = image_id(tool, base)
    if base_id is None:
        say(f"pulling {base}")
        base_id = pull(tool, base)
    files = context_files(root)
    image = tag or f"{DEFAULT_REPOSITORY}:{content_tag(base_id, files)}"
    if ":" not in image.rsplit("/", 1)[-1]:
        image += ":" + content_tag(base_id, files)
    log = home_dir("logs") / f"build-{image.rsplit('/', 1)[-1].replace(':', '-')}.log"
    with tempfile.TemporaryDirectory(prefix="cloudllm-build-") as tmp:
        context = Path(tmp) / "context"
        stage_context(files, context)
        extra, notes = pip_build_inputs(host_pip_settings(), tool.name, Path(tmp))
        for note in notes:
            say(note)
        command = build_command(tool, context / "containers" / "Dockerfile", context, image, base, extra + (["--no-cache"] if no_cache else []))
        say(f"building {image} with {tool.name} FROM {base}")
        env = dict(os.environ, DOCKER_BUILDKIT="1")
        with open(log, "w", encoding="utf-8") as out:
            returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if returncode != 0:
        raise UserError(f"the image build failed ({tool.name} exit {returncode}): {_tail(log)}", f"full log: {log}")
    built = image_id(tool, image)
    if built is None:
        raise UserError(f"{tool.name} finished but {image} is not in its image store", f"full log: {log}")
    result = BuildResult(image, built, base, base_id, tool.name, round(time.monotonic() - started, 2), str(log))
    (home_dir("images") / LAST_BUILD_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def last_built_image() -> str:
    """The image the last `cloudllm build` on this machine made (the default for --image)."""
    record = home_dir("images") / LAST_BUILD_FILE
    try:
        return json.loads(record.read_text())["image"]
    except (OSError, ValueError, KeyError):
        raise UserError("no image built on this machine yet", "run `cloudllm build` or pass --image") from None


def _tail(log: Path) -> str:
    """The build's last meaningful lines, joined into one (the CLI prints one line)."""
    noise = ("STEP ", "Error: building at STEP", "subprocess exited", "-->")
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip() and not line.startswith(noise)]
    return " | ".join(lines[-3:])[-600:] if lines else "no output"
