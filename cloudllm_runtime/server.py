"""The container entrypoint: ``python code/serve.py serve [--port 8080]`` or ``python -m cloudllm_runtime``.

SageMaker runs ``docker run IMAGE serve`` and talks to port 8080; Vertex AI sets
AIP_HTTP_PORT (and AIP_STORAGE_URI for the weights); the local provider passes
``--port 0 --port-file PATH`` and reads the port back. The socket is bound here, before
uvicorn starts, so a taken port is one clear line on stderr and exit code 2. SIGTERM
finishes the requests in flight (up to 25 s; SageMaker kills 30 s after SIGTERM) and
exits 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
from typing import Any, NoReturn, Sequence

from .log import log_event
from .protocol import normalize_task
from .settings import SETTINGS_ENV, SETTINGS_FILE, ServingSettings

DEFAULT_PORT = 8080
SAGEMAKER_MODEL_DIR = "/opt/ml/model"
GCS_DOWNLOAD_DIR = "/tmp/model"
GRACEFUL_SHUTDOWN_SECONDS = 25
EXIT_USAGE = 2


class StartupError(Exception):
    """A problem the operator fixes (a port in use, no settings): one line on stderr, exit 2."""


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, bind the port, and serve until SIGTERM/SIGINT."""
    try:
        _serve(list(sys.argv[1:] if argv is None else argv))
    except StartupError as exc:
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USAGE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] == "serve":  # SageMaker's `docker run IMAGE serve`
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="serve", description="Serve the model in this artifact over HTTP.")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default: $AIP_HTTP_PORT, else $SAGEMAKER_BIND_TO_PORT, else 8080; 0 picks a free one)",
    )
    parser.add_argument("--port-file", default=None, help="write the bound port to this file once listening")
    parser.add_argument("--model-dir", default=None, help="the model folder (default: the artifact this code is in)")
    parser.add_argument("--settings", default=None, help=f"the {SETTINGS_FILE} to use (default: the one in code/)")
    parser.add_argument("--log-payloads", action="store_true", help="log prompt text in the request log (off by default)")
    parser.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template for /v1/chat/completions (default: the model's)")
    parser.add_argument("--grpc-port", type=int, default=None, help="also serve the Open Inference Protocol v2 over gRPC on this port (0 picks one)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="load a LoRA adapter folder beside the model (repeatable)")
    return parser.parse_args(argv)


def _serve(argv: list[str]) -> None:
    args = parse_args(argv)
    limit_malloc_arenas()
    # Progress bars would interleave with the JSON log lines the platforms collect.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    port = resolve_port(args.port)
    model_dir = resolve_model_dir(args.model_dir)
    settings = load_settings(model_dir, args.settings)
    if args.log_payloads:
        settings.log_payloads = True
    if args.chat_template:
        settings.chat_template = read_chat_template(args.chat_template)
    if args.grpc_port is not None:
        settings.grpc_port = args.grpc_port
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise StartupError(f"--adapter {item!r} is not NAME=PATH")
        settings.adapters = {**settings.adapters, name: path}
    settings.extra = {**settings.extra, "grpc_host": args.host}
    sock = bind_socket(args.host, port)
    bound_port = sock.getsockname()[1]

    import uvicorn

    from .app import create_app

    app = create_app(model_dir, settings)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # the app writes its own JSON line per request
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=75,  # above the load balancers' idle timeouts (SageMaker's is 60 s)
    )
    server = uvicorn.Server(config)
    if args.port_file:
        write_port_file(args.port_file, bound_port)
    log_event("listening", host=args.host, port=bound_port, model_dir=model_dir, task=settings.task)
    _quiet_after_shutdown()
    server.run(sockets=[sock])
    log_event("stopped")


def read_chat_template(path: str) -> str:
    """The text of a --chat-template file, or StartupError naming what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"cannot read --chat-template {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip():
        raise StartupError(f"--chat-template {path} is empty; give a Jinja template such as tokenizer_config.json's \"chat_template\"")
    return text


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas, unless the operator set MALLOC_ARENA_MAX.

    glibc gives threads their own arenas (up to 8 per core); the thread pool that parses
    requests and runs the model then fragments the heap and RSS creeps up under load
    (benchmarks/bench_load.py: +70 MiB over 5,000 requests by default, flat with two arenas).
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 is M_ARENA_MAX in glibc's malloc.h
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): nothing to cap


def resolve_port(port: int | None) -> int:
    if port is None:
        for name in ("AIP_HTTP_PORT", "SAGEMAKER_BIND_TO_PORT"):
            value = os.environ.get(name)
            if value:
                try:
                    port = int(value)
                except ValueError:
                    raise StartupError(f"{name}={value!r} is not a port number") from None
                break
        else:
            port = DEFAULT_PORT
    if not 0 <= port <= 65535:
        raise StartupError(f"port {port} is out of range; use 0-65535 (0 picks a free port)")
    return port


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or StartupError with the fix when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR skips TIME_WAIT after a restart; Linux still refuses a port someone listens on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} is in use; choose another with --port") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"no permission to listen on port {port}; choose one above 1023 with --port") from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def write_port_file(path: str, port: int) -> None:
    """Write atomically: a reader polling for the file must never see it half-written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"{port}\n")
    os.replace(tmp, path)


def code_dir() -> str:
    """The folder holding this package (the artifact's code/). Symlinks are kept, not resolved."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_model_dir(explicit: str | None) -> str:
    """--model-dir, else the artifact around this code, else $SM_MODEL_DIR, else /opt/ml/model.

    On Vertex AI the weights stay in AIP_STORAGE_URI (gs://) and are copied to /tmp/model first.
    """
    if explicit:
        model_dir = os.path.abspath(explicit)
    else:
        beside = os.path.dirname(code_dir())
        if _has_model(beside):
            model_dir = beside
        else:
            model_dir = os.environ.get("SM_MODEL_DIR") or SAGEMAKER_MODEL_DIR
    uri = os.environ.get("AIP_STORAGE_URI", "")
    if not _has_model(model_dir) and uri.startswith("gs://"):
        model_dir = download_gcs(uri, GCS_DOWNLOAD_DIR)
    if not os.path.isdir(model_dir):
        raise StartupError(f"model folder {model_dir} does not exist; pass --model-dir")
    return model_dir


def _has_model(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json"))


def download_gcs(uri: str, destination: str) -> str:
    """Copy every object under the gs:// prefix into destination (google-cloud-storage, imported here only)."""
    try:
        from google.cloud import storage
    except ImportError:
        raise StartupError("AIP_STORAGE_URI is set but google-cloud-storage is not installed in this image") from None
    bucket_name, _, prefix = uri[len("gs://") :].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    count = 0
    try:
        client = storage.Client()
        for blob in client.list_blobs(bucket_name, prefix=prefix):
            relative = blob.name[len(prefix) :]
            if not relative or relative.endswith("/"):
                continue
            target = os.path.join(destination, *relative.split("/"))
            if not os.path.abspath(target).startswith(os.path.abspath(destination) + os.sep):
                continue  # an object name with ".." must not write outside the destination
            os.makedirs(os.path.dirname(target), exist_ok=True)
            blob.download_to_filename(target)
            count += 1
    except Exception as exc:  # credentials, permissions, a missing bucket: the operator's to fix
        raise StartupError(f"cannot copy the model from {uri}: {type(exc).__name__}: {exc}") from None
    log_event("model_downloaded", source=uri, destination=destination, files=count)
    if not _has_model(destination):
        raise StartupError(f"{uri} has no config.json; it should hold the model folder")
    return destination


def load_settings(model_dir: str, explicit: str | None = None) -> ServingSettings:
    """--settings, else $CLOUDLLM_SETTINGS, else <model_dir>/code/settings.json, else the settings.json beside this package.

    The same order as the toolkit hooks; in an artifact both are the same file.
    """
    if not explicit:
        try:
            settings = ServingSettings.from_env()
            if settings is not None:
                normalize_task(settings.task)
                return settings
        except (ValueError, TypeError) as exc:
            raise StartupError(f"cannot use ${SETTINGS_ENV}: {exc}") from None
    candidates = [explicit] if explicit else [
        os.path.join(model_dir, "code", SETTINGS_FILE),
        os.path.join(code_dir(), SETTINGS_FILE),
    ]
    for path in candidates:
        if path and os.path.isfile(path):
            try:
                settings = _settings_from_file(path)
                normalize_task(settings.task)
            except (OSError, ValueError, TypeError) as exc:
                raise StartupError(f"cannot use {path}: {exc}") from None
            return settings
    raise StartupError(
        f"no {SETTINGS_FILE} found (looked in {', '.join(c for c in candidates if c)}); "
        "package the model with cloudllm or pass --settings"
    )


def _settings_from_file(path: str) -> ServingSettings:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("it is not a JSON object")
    return ServingSettings.from_dict(data)


def _quiet_after_shutdown() -> None:
    """Let a graceful SIGTERM/SIGINT shutdown end with exit code 0.

    uvicorn re-raises the signal it caught once it has shut down; these handlers receive
    that re-raise (and only it: uvicorn's own handlers are installed while serving).
    """

    def ignore(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGTERM, ignore)
    signal.signal(signal.SIGINT, ignore)
