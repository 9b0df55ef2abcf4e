"""One local model server's life on this machine: lay out a version, start it, wait for /ping, relay it, stop it.

The endpoint's first model (cloudllm/providers/local.py) and each model added with --add-model
(cloudllm/providers/local_models.py) are each a folder laid out the same way, so both go through
these functions:

    <folder>/state.json           the live version: pid, artifact, log, url, front_url, fingerprint
    <folder>/<version>/artifact/  the bundle the server runs (`python code/serve.py serve`)
    <folder>/<version>/server.json  the server started for that version, written before it loads
    <folder>/backend, front.json  where the folder's relay (cloudllm/local_front.py) points, and the relay
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.home import write_atomic
from cloudllm.providers.kit import Pending
from cloudllm.providers.kit.server import alive, runs, start_server, stop_server, wait_healthy
from cloudllm.providers.local_adapters import serve_arguments, valid_adapters
from cloudllm.providers.local_container import remove_leftovers

STATE_FILE = "state.json"
SERVER_FILE = "server.json"  # in each version folder: the server started for it, written before it loads
BACKEND_FILE = "backend"  # "PORT PID" of the live server: where the folder's stable URL relays to
FRONT_FILE = "front.json"  # the relay's pid and port
DEFAULT_START_TIMEOUT = 600


def read_state(folder: Path, fix: str) -> dict | None:
    """folder's live state; None when there is none, a UserError (with fix) when it is damaged or hand-edited."""
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        state = exc
    if not valid_state(state):
        raise UserError(f"the local server state {path} is damaged", fix)
    return state


def write_state(folder: Path, state: dict) -> None:
    write_atomic(folder / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))


def start_version(plan, folder: Path, version: str, *, live: dict | None, log_path: Path, reporter: Reporter,
                  wait: bool, adapters: dict, container=None) -> dict:  # fmt: skip
    """Lay out plan's artifact in folder/version, start its server, and (with wait) wait for /ping.

    On failure the server is stopped and nothing of this version is left: a first start removes
    folder itself, one beside a live version only the new version's folder.
    """
    version_dir = folder / version
    if folder.is_dir():  # servers an interrupted deploy started, and a dead live one of this same version
        stop_started(folder, keep=None if live is None or live.get("version") == version else live.get("version"))
    shutil.rmtree(version_dir, ignore_errors=True)
    version_dir.mkdir(parents=True)
    try:
        artifact = plan.bundle.write(version_dir / "artifact")
    except BaseException:
        shutil.rmtree(version_dir if live else folder, ignore_errors=True)
        raise
    reporter.step(f"artifact laid out in {artifact}")
    port_file = version_dir / "port"
    grpc_port = free_port()  # gRPC beside HTTP, for `cloudllm invoke --grpc`
    process = (container.start if container else start_server)(
        [sys.executable, str(artifact / "code" / "serve.py"), "serve", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
         "--grpc-port", str(grpc_port), *serve_arguments(adapters)],
        log_path=log_path, cwd=artifact, env=server_env(),
    )  # fmt: skip
    # Before it loads: a deploy killed from here on (even SIGKILL) leaves a server the next deploy or delete stops.
    write_atomic(version_dir / SERVER_FILE, json.dumps({"pid": process.pid, "artifact": str(artifact)}))
    state = {
        "version": version,
        "pid": process.pid,
        "artifact": str(artifact),
        "log": str(log_path),
        "model": plan.model.path,
        "url": None,
        "grpc_port": grpc_port,
        "adapters": adapters,
        **(container.state if container else {}),
        "tags": plan.spec.tags,
        **plan.fingerprint,
    }
    try:
        state["url"] = _wait_for_server(process, port_file, log_path, plan, reporter, wait=wait)
    except BaseException:
        stop_server(process.pid, serve_py(str(artifact)))
        shutil.rmtree(version_dir if live else folder, ignore_errors=True)
        raise
    return state


def _wait_for_server(process, port_file: Path, log_path: Path, plan, reporter: Reporter, *, wait: bool) -> str:
    """The server's URL once /ping answers 200 (without wait, once it has a port).

    Raises DeployFailed as soon as the server exits or /ping says the model failed to load.
    """
    timeout = plan.spec.timeout or DEFAULT_START_TIMEOUT
    found: dict[str, str] = {}

    def poll() -> str | Pending:
        code = process.poll()
        if code is not None:
            raise DeployFailed(
                f"the model server exited with code {code}: {last_line(str(log_path)) or 'no output'}",
                f"see the full log in {log_path}",
            )
        if "url" not in found and port_file.exists() and port_file.read_text().strip():
            found["url"] = f"http://127.0.0.1:{int(port_file.read_text())}"
        url = found.get("url")
        if url is None:
            return Pending("starting")
        if not wait:
            return url
        answer = health(url)
        if answer.get("status") == "ok":
            return url
        if answer.get("status") == "failed":
            raise DeployFailed(one_line(f"the model failed to load: {answer.get('error') or 'no reason given'}"), f"see the full log in {log_path}")
        return Pending(f"listening on {url}, loading the model")

    what = plan.spec.name + (f" model {plan.spec.add_model}" if plan.spec.add_model else "")
    return wait_healthy(
        poll, what=f"starting the model server for {what}", deadline=timeout, reporter=reporter,
        late=lambda _: (f"the model server did not become healthy within {timeout}s", f"see its log {log_path}; raise --timeout for large models"),
    )  # fmt: skip


def server_state(state: dict, fixes: str) -> tuple[str, str | None, dict]:
    """(status, failure reason, /ping body) of the server state describes; fixes: the command that shows its log."""
    running = alive(state.get("pid"), serve_py(state.get("artifact")))
    answer = health(state["url"]) if running and state.get("url") else {}
    if not running:
        tail = last_line(state.get("log"))
        return "Failed", f"the server (pid {state.get('pid')}) is not running" + (f"; its log ends: {tail}" if tail else ""), answer
    if answer.get("status") == "failed":  # up, but its model did not load (a --no-wait deploy)
        return "Failed", one_line(f"the model failed to load: {answer.get('error') or 'no reason given'}"), answer
    if state.get("url") and not answer:
        return "NotResponding", f"the server (pid {state['pid']}) runs but does not answer {state['url']}/ping; see {fixes}", answer
    return ("InService" if answer.get("status") == "ok" else "Loading"), None, answer


def stop_version(state: dict | None) -> None:
    if state:
        stop_server(state.get("pid"), serve_py(state.get("artifact")))


def server_env() -> dict[str, str]:
    """This shell's environment less what would steer the server away from its artifact: our own variables
    (a $CLOUDLLM_SETTINGS would override the artifact's settings) and the platforms' (AIP_*, SM_*, SAGEMAKER_*)."""
    ours = ("CLOUDLLM_", "AIP_", "SM_", "SAGEMAKER_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(ours)}, "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(url: str) -> dict:
    """/ping's JSON body ({"status": "ok" | "loading" | "failed", "error"?}); {} when it does not answer."""
    try:
        response = httpx.get(f"{url}/ping", timeout=2.0)
        if response.status_code == 200:
            return {"status": "ok"}
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def valid_state(state: object) -> bool:
    """state.json as a deploy writes it (a hand edit or a damaged file must not steer a signal)."""
    if not isinstance(state, dict):
        return False
    strings = ("version", "artifact", "log")
    return (
        all(isinstance(state.get(key), str) and state[key] for key in strings)
        and isinstance(state.get("pid"), int)
        and all(
            state.get(key) is None or (isinstance(state[key], str) and re.fullmatch(r"http://127\.0\.0\.1:\d{1,5}", state[key]))
            for key in ("url", "front_url")
        )
        and valid_adapters(state.get("adapters"))
    )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- the relay: a URL that stays when a new version replaces the live one ---------------------------
def point_front(folder: Path, state: dict) -> None:
    """Point folder's relay at state's server (starting the relay, on its old port, if it is not running);
    state["front_url"] is the URL clients keep. Without a relay, the server's own."""
    if not state.get("url"):
        return
    port = int(state["url"].rsplit(":", 1)[1])
    write_atomic(folder / BACKEND_FILE, f"{port} {state['pid']}\n")
    front = read_json(folder / FRONT_FILE) or {}
    if not front_running(folder):
        front = start_front(folder, front.get("port") if isinstance(front.get("port"), int) else 0) or {}
    if isinstance(front.get("port"), int):
        state["front_url"] = f"http://127.0.0.1:{front['port']}"


def front_running(folder: Path) -> bool:
    """The relay of folder is running: its command line names folder's backend file (a recycled pid does not)."""
    front = read_json(folder / FRONT_FILE)
    pid = front.get("pid") if isinstance(front, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return False
    return runs(pid, "cloudllm.local_front", str(folder / BACKEND_FILE))


def start_front(folder: Path, port: int) -> dict | None:
    """Start folder's relay on port (its old one; any free one if that is taken). None if it would not start."""
    port_file = folder / "front.port"
    for attempt in dict.fromkeys((port, 0)):
        port_file.unlink(missing_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "cloudllm.local_front", "--backend-file", str(folder / BACKEND_FILE),
             "--port-file", str(port_file), "--port", str(attempt)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while process.poll() is None and not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if port_file.exists():
            front = {"pid": process.pid, "port": int(port_file.read_text())}
            write_atomic(folder / FRONT_FILE, json.dumps(front))
            return front
        if process.poll() is None:
            process.kill()
        process.wait()
    return None


def stop_front(folder: Path) -> None:
    if front_running(folder):
        try:
            os.kill(read_json(folder / FRONT_FILE)["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def stop_started(folder: Path, keep: str | None = None) -> int:
    """Stop the servers started for folder's versions (their server.json), but the version `keep`; how many ran."""
    stopped = 0
    for server_file in folder.glob(f"*/{SERVER_FILE}"):
        if server_file.parent.name == keep:
            continue
        try:
            server = json.loads(server_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(server, dict) and alive(server.get("pid"), serve_py(server.get("artifact"))):
            stop_server(server.get("pid"), serve_py(server.get("artifact")))
            stopped += 1
    stopped += remove_leftovers(folder, keep)  # containers whose supervisor was killed outright
    return stopped


def serve_py(artifact: object) -> str | None:
    """What our server's command line holds: `python ARTIFACT/code/serve.py serve ...`."""
    return str(Path(artifact) / "code" / "serve.py") if isinstance(artifact, str) and artifact else None


def one_line(text: str, limit: int = 300) -> str:
    """text on one line (a load error can span many), cut to limit characters."""
    flat = " ".join(text.split()).rstrip(".!")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def last_line(log: str | None) -> str:
    if not log or not os.path.exists(log):
        return ""
    with open(log, "rb") as fh:
        fh.seek(max(0, os.path.getsize(log) - 4096))
        lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
