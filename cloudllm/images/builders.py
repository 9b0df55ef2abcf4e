"""Which container tools this machine has: a builder (buildah, podman, docker) and an engine that runs images."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from cloudllm.errors import UserError

BUILDERS = ("buildah", "podman", "docker")
ENGINES = ("podman", "docker")  # buildah builds but does not run containers
INSTALL_FIX = "install podman and buildah (Debian/Ubuntu: `sudo make containers` in cloudllm's checkout, or `apt-get install podman buildah skopeo`)"


@dataclass(frozen=True)
class Tool:
    name: str
    path: str

    def run(self, *args: str, check: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess:
        """Run the tool and capture its output; a failure is a UserError carrying its last line."""
        result = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise UserError(f"`{self.name} {args[0]}` failed: {_last_line(result.stderr or result.stdout)}")
        return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def find_tool(names: tuple[str, ...], preferred: str | None, role: str) -> Tool:
    """The first of NAMES on PATH, or PREFERRED (which must be one of them and installed)."""
    if preferred is not None:
        if preferred not in names:
            raise UserError(f"--{role} {preferred} is not one cloudllm can use", f"pass one of: {', '.join(names)}")
        names = (preferred,)
    for name in names:
        path = shutil.which(name)
        if path:
            return Tool(name, path)
    wanted = preferred or " or ".join(names)
    raise UserError(f"no container {role} on this machine ({wanted} not found on PATH)", INSTALL_FIX)


def find_builder(preferred: str | None = None) -> Tool:
    return find_tool(BUILDERS, preferred, "builder")


def find_engine(preferred: str | None = None) -> Tool:
    return find_tool(ENGINES, preferred, "engine")


def engine_available() -> bool:
    return any(shutil.which(name) for name in ENGINES)


def image_id(tool: Tool, image: str) -> str | None:
    """The local image's id, or None when the local store does not have it."""
    if tool.name == "buildah":
        result = tool.run("inspect", "--type", "image", "--format", "{{.FromImageID}}", image, check=False)
    else:
        result = tool.run("image", "inspect", "--format", "{{.Id}}", image, check=False)
    return result.stdout.strip() or None if result.returncode == 0 else None


def pull(tool: Tool, image: str) -> str:
    """Pull IMAGE into the local store (buildah, podman and docker share the verb) and return its id."""
    result = tool.run("pull", "--quiet", image, check=False, timeout=3600)
    found = image_id(tool, image) if result.returncode == 0 else None
    if not found:
        raise UserError(
            f"base image {image} is not here and cannot be pulled: {_last_line(result.stderr or result.stdout)}",
            "log in to its registry, or pass --base with an image this machine has (`podman images`)",
        )
    return found
