"""The local provider's container mode: `cloudllm deploy ./m --image build|IMAGE` runs the endpoint's
server in the serving image through podman (or docker) instead of as a process.

The container runs as SageMaker runs it (`IMAGE serve`, the artifact read-only at /opt/ml/model,
port 8080), published on 127.0.0.1 only. Everything else stays the local provider's: state.json,
the relay whose port never changes, blue/green updates, the log file.

The local provider keeps a process per version (its pid, its command line proving it is ours,
SIGTERM to stop it). Here that process is a small supervisor (this file, run as a script, standard
library only): it starts `podman run` attached, so the container's output lands in the endpoint's
log, and turns the SIGTERM the provider sends into `podman stop`. Its command line carries the
artifact's code/serve.py, which is what the provider's liveness check looks for. If the supervisor
is killed outright, the kernel sends the attached `podman run` SIGTERM (PR_SET_PDEATHSIG), which it
passes to the container. Containers are labelled with the endpoint's folder and version; only
containers carrying that label are ever stopped or removed.

    python local_container.py --port-file F --port N --server ARTIFACT/code/serve.py -- ENGINE run ...
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import subprocess
import sys
from pathlib import Path

ROOT_LABEL = "io.cloudllm.local.root"  # the endpoint's folder, $CLOUDLLM_HOME/local/<name>: unique per home
VERSION_LABEL = "io.cloudllm.local.version"
CONTAINER_PORT = 8080  # SageMaker's
STOP_SECONDS = 8  # inside the local provider's 10 s grace before it SIGKILLs the supervisor
ENGINE_FILE = "container-engine"  # in the endpoint's folder: the engine its containers were started with


class LocalContainer:
    """The image one local endpoint version runs in (checked before anything is created)."""

    def __init__(self, image: str, engine, root: Path, version: str):
        self.image = image
        self.engine = engine  # cloudllm.images.builders.Tool
        self.root = root
        self.version = version
        # Endpoint names are letters, digits and hyphens; the hash keeps two homes' endpoints apart.
        self.name = f"cloudllm-local-{root.name}-{version}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"

    @property
    def state(self) -> dict[str, str]:
        return {"image": self.image, "container": self.name}

    def start(self, argv: list[str], *, log_path: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        """In place of providers.kit.server.start_server: the supervisor of a container serving argv's artifact.

        argv is the process the local provider would run (`python ARTIFACT/code/serve.py serve
        --port-file F [--grpc-port G] ...`); its port file and gRPC port carry over.
        """
        from cloudllm.images.contract import contract_run_args
        from cloudllm.providers.kit.server import start_server

        serve_py = Path(argv[1])
        artifact = serve_py.parent.parent
        server = _server_options(argv[2:])
        _readable_by_the_image(artifact)
        (self.root / ENGINE_FILE).write_text(self.engine.name + "\n")
        host_port = _free_port()
        publish = {host_port: CONTAINER_PORT}
        if server.grpc_port:  # the same port inside and out: the image serves gRPC where it has grpcio
            publish[server.grpc_port] = server.grpc_port
        run = contract_run_args(
            self.image, "sagemaker", name=self.name, port=CONTAINER_PORT, artifact=artifact, publish=publish,
            labels={ROOT_LABEL: str(self.root), VERSION_LABEL: self.version},
        )  # fmt: skip
        if server.grpc_port:
            run += ["--grpc-port", str(server.grpc_port)]
        supervisor = [sys.executable, str(Path(__file__).resolve()), "--port-file", server.port_file, "--port", str(host_port),
                      "--server", str(serve_py), "--", self.engine.path, *run]  # fmt: skip
        return start_server(supervisor, log_path=log_path, cwd=cwd, env=env)


def container_for(plan, root: Path, version: str) -> LocalContainer | None:
    """The container a local deploy runs its server in (None: a process, without --image).

    Checks the engine and the image before anything is created: the image must already be in
    this machine's store (`--image build` builds it first; nothing is pulled).
    """
    image = plan.spec.image
    if not image:
        return None
    from cloudllm.errors import UserError
    from cloudllm.images.builders import find_engine, image_id

    engine = find_engine()
    if image_id(engine, image) is None:
        raise UserError(
            f"image {image} is not in this machine's image store ({engine.name})",
            "deploy with --image build, build it with `cloudllm build`, or pull it first",
        )
    return LocalContainer(image, engine, root, version)


def remove_leftovers(root: Path, keep: str | None = None) -> int:
    """Remove root's containers (by label) but version keep's; how many there were.

    A supervisor stops its own container; this catches one whose supervisor and `podman run`
    were both killed outright. Only an endpoint that ever ran a container asks the engine.
    """
    import shutil

    from cloudllm.images.builders import ENGINES

    try:
        name = (root / ENGINE_FILE).read_text().strip()
    except OSError:
        return 0
    engine = shutil.which(name) if name in ENGINES else None  # a name, never a path a hand edit could steer
    if engine is None:
        return 0
    def named(*filters: str) -> set[str]:
        listed = subprocess.run([engine, "ps", "--all", *filters, "--format", "{{.Names}}"], capture_output=True, text=True, timeout=60)
        return set(listed.stdout.split())

    ours = ("--filter", f"label={ROOT_LABEL}={root}")
    names = sorted(named(*ours) - (named(*ours, "--filter", f"label={VERSION_LABEL}={keep}") if keep else set()))
    for container in names:
        subprocess.run([engine, "rm", "--force", container], capture_output=True, timeout=60)
    return len(names)


class _ServerOptions(argparse.Namespace):
    port_file: str
    grpc_port: int | None


def _server_options(serve_args: list[str]) -> _ServerOptions:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--grpc-port", type=int)
    return parser.parse_known_args(serve_args, namespace=_ServerOptions())[0]


def _readable_by_the_image(artifact: Path) -> None:
    """The image runs as uid 1000: let it read our own copy of the artifact (save_pretrained may write 0600).

    Other users of this machine still cannot reach it: $CLOUDLLM_HOME is private, and the
    container sees only the mounted folder.
    """
    for path in [artifact, *artifact.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | (0o555 if path.is_dir() else 0o444))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the supervisor (run as a script: standard library only) ------------------------------


def _die_with_parent() -> None:
    """In the `podman run` child: SIGTERM when the supervisor dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a local endpoint's container; SIGTERM stops it")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", required=True, help="the artifact's code/serve.py (how the provider knows this process)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- ENGINE run ... --name NAME ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    name = command[command.index("--name") + 1]
    # Its own session: the provider's SIGTERM to our group reaches only us, and we stop the container cleanly.
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    stopping = []

    def stop(signum, frame) -> None:
        if not stopping:
            stopping.append(signum)
            subprocess.run([command[0], "stop", "--time", str(STOP_SECONDS), name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    Path(args.port_file).write_text(str(args.port))
    code = child.wait()
    return 0 if stopping else (code if code >= 0 else 128 - code)


if __name__ == "__main__":
    sys.exit(supervise())
