"""The local provider: the generated model server as a background process on 127.0.0.1.

It runs the very code a cloud container runs (`python code/serve.py serve`), so a
deploy that works here differs from the cloud only in the hardware. State lives in
$CLOUDLLM_HOME/local/<name>/: one folder per deployed version (its artifact) and
state.json pointing at the live one; server logs go to $CLOUDLLM_HOME/logs/. An update starts the new version beside the
old, switches state.json once the new one is healthy, then stops the old. The endpoint's URL is
a small relay (cloudllm/local_front.py) whose port never changes, pointed at the live server,
so an update keeps the URL clients saved.

A server whose model fails to load says so on /ping (503 {"status": "failed", "error": ...});
a deploy stops waiting at once, stops that server, and leaves no state behind (its log stays
for the traceback).
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
from typing import Any, Iterator

import httpx

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.home import home_dir, write_atomic
from cloudllm.http import post_json, stream_tokens
from cloudllm.logtime import line_time
from cloudllm.providers.base import Endpoint, Feature, Provider, StrictOptions
from cloudllm.types import FINGERPRINT_KEYS, Fingerprint, ResourceChange
from cloudllm.providers.kit import Pending
from cloudllm.providers.local_adapters import (
    adapter_entry,
    planned_adapters,
    release_stored,
    serve_arguments,
    served_names,
    stored_digests,
    sync_live,
    valid_adapters,
)
from cloudllm.providers.kit.server import alive, runs, start_server, stop_server, wait_healthy
from cloudllm.providers.local_container import container_for, remove_leftovers
from cloudllm.records import load_record
from cloudllm.spec import default_endpoint_name

STATE_FILE = "state.json"
SERVER_FILE = "server.json"  # in each version folder: the server started for it, written before it loads
BACKEND_FILE = "backend"  # "PORT PID" of the live server: where the endpoint's stable URL relays to
FRONT_FILE = "front.json"  # the relay's pid and port
DEFAULT_START_TIMEOUT = 600


class LocalOptions(StrictOptions):
    """Options of the local provider: none of its own (what it runs is all in the spec)."""


class LocalProvider(Provider):
    name = "local"
    unsupported = {
        Feature.INSTANCE_TYPES: "it runs on this machine; drop --instance",
        Feature.AUTOSCALING: "it runs one server process; use max_instances 1",
        Feature.SCALE_TO_ZERO: "it runs one server process; use min_instances 1",
        Feature.TRAFFIC_SHIFTING: "an update switches all traffic once the new server is healthy",
        Feature.ENGINE_RUNTIMES: "it runs the generated handler; TGI and vLLM need their GPU containers",
        Feature.MULTI_MODEL: "it runs one model server per endpoint; deploy the second model under its own --name",
    }
    Options = LocalOptions
    offers = frozenset({Feature.ADAPTERS})

    # --- state ------------------------------------------------------------------------
    @staticmethod
    def _root(name: str) -> Path:
        return home_dir("local") / name

    def _state(self, name: str) -> dict | None:
        """The live version's state; a damaged or hand-edited file is a UserError naming it."""
        path = self._root(name) / STATE_FILE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            state = exc
        if not _valid_state(state):
            raise UserError(
                f"the local server state {path} is damaged",
                f"run `cloudllm delete {name}` (it stops only servers it can prove are this endpoint's), then deploy again",
            )
        return state

    def _write_state(self, name: str, state: dict) -> None:
        write_atomic(self._root(name) / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))

    # --- verbs ------------------------------------------------------------------------
    def deploy(self, plan, reporter: Reporter) -> Endpoint:
        """Start the server; with plan.wait False (--no-wait), return once it has a port."""
        state = self._start_version(plan, reporter, wait=plan.wait)
        self._point_front(plan.spec.name, state)
        self._write_state(plan.spec.name, state)
        return self._endpoint(plan.spec.name, state)

    def update(self, plan, existing: Endpoint, reporter: Reporter) -> Endpoint:
        """Start the new version beside the live one and switch once /ping answers 200.

        This waits for health even with --no-wait: switching earlier would stop a serving
        server for one still loading its model, or one that never will.
        """
        old = self._state(plan.spec.name)
        if plan.retag_only:  # nothing on this machine reads the tags: recorded, the server keeps running
            state = {**old, **plan.fingerprint, "tags": plan.spec.tags}
            self._write_state(plan.spec.name, state)
            return self._endpoint(plan.spec.name, state)
        if plan.adapters_only and old and old.get("url"):  # the base keeps running: adapters change in place
            state = sync_live(plan.spec.name, old, planned_adapters(plan), reporter)
            self._write_state(plan.spec.name, state)
            _release_dropped(old, state, reporter)
            return self._endpoint(plan.spec.name, state)
        state = self._start_version(plan, reporter, wait=True)
        self._point_front(plan.spec.name, state)
        self._write_state(plan.spec.name, state)
        if old and old.get("version") != state["version"]:
            stop_server(old.get("pid"), _serve_py(old.get("artifact")))
            shutil.rmtree(self._root(plan.spec.name) / old["version"], ignore_errors=True)
            reporter.step(f"stopped the previous server (pid {old.get('pid')})")
        _release_dropped(old, state, reporter)
        return self._endpoint(plan.spec.name, state)

    def describe_changes(self, plan) -> list[ResourceChange]:
        if plan.retag_only:
            return [ResourceChange(resource="endpoint", name=plan.spec.name, action="update", reason="tags only, in place: recorded, the server keeps running")]
        return super().describe_changes(plan)

    def get(self, name: str) -> Endpoint | None:
        state = self._state(name)
        return None if state is None else self._endpoint(name, state)

    def list(self) -> list[Endpoint]:
        root = home_dir("local")
        return [ep for d in sorted(root.iterdir()) if d.is_dir() and (ep := self.get(d.name))]

    def delete(self, name: str, *, purge_artifacts: bool = False, reporter: Reporter | None = None) -> None:
        root = self._root(name)
        try:
            state = self._state(name)
        except UserError:
            state = None  # damaged: the servers' own files below still say what to stop
        stopped = _stop_started(root) if root.is_dir() else 0
        _stop_front(root)
        if state is None:
            # A record of ours whose state is gone (a wiped $CLOUDLLM_HOME/local), or a folder a
            # killed deploy left: nothing runs, so it is already deleted and the caller drops the record.
            record = load_record(name)
            ours = record.provider == self.name if record else root.exists()
            if not ours:
                raise UserError(f"no local endpoint named {name!r}", "see `cloudllm list`")
            shutil.rmtree(root, ignore_errors=True)
            if not stopped:
                (reporter or Reporter()).step(f"no local server state for {name}: nothing was running")
            return
        stop_server(state.get("pid"), _serve_py(state.get("artifact")))
        shutil.rmtree(root, ignore_errors=True)
        _release_dropped(state, {}, reporter or Reporter())

    def invoke(self, name: str, body: dict, *, model: str | None = None) -> Any:
        url = self._live_url(name, model)
        try:
            return post_json(name, f"{url}/invocations", body)
        except httpx.TransportError:
            raise self._unreachable(name) from None

    def invoke_stream(self, name: str, body: dict, *, model: str | None = None) -> Iterator[str]:
        url = self._live_url(name, model)
        try:
            yield from stream_tokens(name, f"{url}/invocations", {**body, "stream": True})
        except httpx.TransportError:
            raise self._unreachable(name) from None

    def logs(self, name: str, *, follow: bool = False, since: float | None = None) -> Iterator[str]:
        state = self._state(name)
        if state is None:
            raise UserError(f"no local endpoint named {name!r}", "see `cloudllm list`")
        # Lines without a time of their own (uvicorn's, a traceback's) go with the timed line before them.
        shown = since is None
        try:
            fh = open(state["log"], encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UserError(
                f"cannot read endpoint {name}'s log {state['log']}: {exc.strerror}",
                "a deleted log comes back when the server is restarted: run `cloudllm deploy` again",
            ) from None
        with fh:
            while True:
                line = fh.readline()
                if line:
                    if not shown:
                        written = line_time(line)
                        shown = written is not None and written >= since
                    if shown:
                        yield line.rstrip("\n")
                elif follow and alive(state.get("pid"), _serve_py(state.get("artifact"))):
                    time.sleep(0.2)
                else:
                    return

    # --- adapters on the live server, no restart (cloudllm/providers/local_adapters.py) ----------
    def add_adapter(self, name: str, adapter, reporter: Reporter) -> None:
        state = self._running_state(name)
        new = sync_live(name, state, {**(state.get("adapters") or {}), adapter.name: adapter_entry(adapter)}, reporter)
        self._write_state(name, new)
        _release_dropped(state, new, reporter)

    def remove_adapter(self, name: str, adapter: str, reporter: Reporter) -> None:
        state = self._running_state(name)
        have = state.get("adapters") or {}
        if adapter not in have:
            held = f"; it has: {', '.join(sorted(have))}" if have else "; it has none"
            raise UserError(f"endpoint {name} has no adapter {adapter!r}{held}", f"see `cloudllm adapters list {name}`")
        new = sync_live(name, state, {n: e for n, e in have.items() if n != adapter}, reporter)
        self._write_state(name, new)
        _release_dropped(state, new, reporter)

    def list_adapters(self, name: str) -> list[dict]:
        state = self._state(name)
        if state is None:
            raise UserError(f"no local endpoint named {name!r}", "see `cloudllm list`")
        served = served_names(name, state["url"]) if state.get("url") else None
        return [
            {"name": n, "rank": e.get("rank"), "digest": e["digest"],
             "status": "server not answering" if served is None else ("loaded" if n in served else "not loaded")}  # fmt: skip
            for n, e in sorted((state.get("adapters") or {}).items())
        ]

    def _running_state(self, name: str) -> dict:
        """The live version's state, once its server is known to run and answer."""
        self._live_url(name)
        state = self._state(name)
        if not state.get("url"):
            raise UserError(f"endpoint {name}'s server is still starting", f"wait for `cloudllm status {name}` to say InService, then retry")
        return state

    # --- helpers ----------------------------------------------------------------------
    def _point_front(self, name: str, state: dict) -> None:
        """Point the endpoint's relay at state's server (starting the relay, on its old port, if it
        is not running); state["front_url"] is the URL clients keep. Without a relay, the server's own."""
        root = self._root(name)
        if not state.get("url"):
            return
        port = int(state["url"].rsplit(":", 1)[1])
        write_atomic(root / BACKEND_FILE, f"{port} {state['pid']}\n")
        front = _read_json(root / FRONT_FILE) or {}
        if not _front_running(root):
            front = _start_front(root, front.get("port") if isinstance(front.get("port"), int) else 0) or {}
        if isinstance(front.get("port"), int):
            state["front_url"] = f"http://127.0.0.1:{front['port']}"

    def _live_url(self, name: str, model: str | None = None) -> str:
        state = self._state(name)
        if state is None:
            raise UserError(f"no local endpoint named {name!r}", "see `cloudllm list`, or deploy it first")
        if model is not None and model != default_endpoint_name(state.get("model") or ""):
            raise UserError(
                f"endpoint {name} has one model, {default_endpoint_name(state.get('model') or '')}, not {model!r}",
                "drop --model (local endpoints serve one model; adapters are picked with --adapter)",
            )
        if not alive(state.get("pid"), _serve_py(state.get("artifact"))):
            raise self._unreachable(name)
        return state.get("front_url") if _front_running(self._root(name)) else state["url"]

    def _unreachable(self, name: str) -> DeployFailed:
        state = self._state(name) or {}
        tail = _last_line(state.get("log"))
        return DeployFailed(
            f"endpoint {name}'s server (pid {state.get('pid')}) is not running{': ' + tail if tail else ''}",
            f"see its log {state.get('log')}, then redeploy with `cloudllm deploy` or remove it with `cloudllm delete {name}`",
        )

    def _endpoint(self, name: str, state: dict) -> Endpoint:
        running = alive(state.get("pid"), _serve_py(state.get("artifact")))
        health = _health(state["url"]) if running and state.get("url") else {}
        if not running:
            tail = _last_line(state.get("log"))
            status, reason = "Failed", f"the server (pid {state.get('pid')}) is not running" + (f"; its log ends: {tail}" if tail else "")
        elif health.get("status") == "failed":  # up, but its model did not load (a --no-wait deploy)
            status, reason = "Failed", _one_line(f"the model failed to load: {health.get('error') or 'no reason given'}")
        elif state.get("url") and not health:
            status = "NotResponding"
            reason = f"the server (pid {state['pid']}) runs but does not answer {state['url']}/ping; see `cloudllm logs {name}`"
        else:
            status, reason = ("InService" if health.get("status") == "ok" else "Loading"), None
        return Endpoint(
            name=name,
            provider=self.name,
            state=status,
            url=state.get("front_url") or state["url"],
            model=state.get("model"),
            digest=state.get("digest"),
            runtime="handler",
            failure_reason=reason,
            fingerprint=Fingerprint(**{k: state.get(k) for k in FINGERPRINT_KEYS}),
            details={k: state[k] for k in ("pid", "log", "artifact", "grpc_port", "image", "container", "tags") if k in state},
        )

    def _start_version(self, plan, reporter: Reporter, *, wait: bool) -> dict:
        """Lay out the artifact, start its server, and (with wait) wait for /ping; clean up on failure."""
        name = plan.spec.name
        version = plan.digest[:12]
        root = self._root(name)
        version_dir = root / version
        live = self._state(name)
        container = container_for(plan, root, version)  # --image: the server runs in that image (local_container.py)
        if container is not None and planned_adapters(plan):
            # The adapters live in $CLOUDLLM_HOME, which the container does not mount.
            raise UserError("LoRA adapters are not served by a local container endpoint yet", "drop --image to serve the adapters, or deploy without --adapter")
        if root.is_dir():  # servers an interrupted deploy started, and a dead live one of this same version
            _stop_started(root, keep=None if live is None or live.get("version") == version else live.get("version"))
        shutil.rmtree(version_dir, ignore_errors=True)
        version_dir.mkdir(parents=True)
        artifact = plan.bundle.write(version_dir / "artifact")
        reporter.step(f"artifact laid out in {artifact}")
        log_path = home_dir("logs") / f"{name}-{version}.log"  # beside local/, where every folder is an endpoint
        port_file = version_dir / "port"
        grpc_port = _free_port()  # gRPC beside HTTP, for `cloudllm invoke --grpc`
        adapters = planned_adapters(plan)
        process = (container.start if container else start_server)(
            [sys.executable, str(artifact / "code" / "serve.py"), "serve", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
             "--grpc-port", str(grpc_port), *serve_arguments(adapters)],
            log_path=log_path, cwd=artifact, env=_server_env(),
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
            state["url"] = self._wait_healthy(process, port_file, log_path, plan, reporter, wait=wait)
        except BaseException:
            stop_server(process.pid, _serve_py(str(artifact)))
            # A first deploy leaves no local/<name>/ behind; an update keeps the live version's.
            shutil.rmtree(version_dir if live else root, ignore_errors=True)
            raise
        return state

    def _wait_healthy(self, process, port_file: Path, log_path: Path, plan, reporter: Reporter, *, wait: bool) -> str:
        """The server's URL once /ping answers 200 (without wait, once it has a port).

        Raises DeployFailed as soon as the server exits or /ping says the model failed to load.
        """
        timeout = plan.spec.timeout or DEFAULT_START_TIMEOUT
        found: dict[str, str] = {}

        def poll() -> str | Pending:
            code = process.poll()
            if code is not None:
                raise DeployFailed(
                    f"the model server exited with code {code}: {_last_line(str(log_path)) or 'no output'}",
                    f"see the full log in {log_path}",
                )
            if "url" not in found and port_file.exists() and port_file.read_text().strip():
                found["url"] = f"http://127.0.0.1:{int(port_file.read_text())}"
            url = found.get("url")
            if url is None:
                return Pending("starting")
            if not wait:
                return url
            health = _health(url)
            if health.get("status") == "ok":
                return url
            if health.get("status") == "failed":
                raise DeployFailed(
                    _one_line(f"the model failed to load: {health.get('error') or 'no reason given'}"), f"see the full log in {log_path}"
                )
            return Pending(f"listening on {url}, loading the model")

        return wait_healthy(
            poll, what=f"starting the model server for {plan.spec.name}", deadline=timeout, reporter=reporter,
            late=lambda _: (f"the model server did not become healthy within {timeout}s", f"see its log {log_path}; raise --timeout for large models"),
        )  # fmt: skip


def _server_env() -> dict[str, str]:
    """This shell's environment less what would steer the server away from its artifact: our own variables
    (a $CLOUDLLM_SETTINGS would override the artifact's settings) and the platforms' (AIP_*, SM_*, SAGEMAKER_*)."""
    ours = ("CLOUDLLM_", "AIP_", "SM_", "SAGEMAKER_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(ours)}, "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(url: str) -> dict:
    """/ping's JSON body ({"status": "ok" | "loading" | "failed", "error"?}); {} when it does not answer."""
    try:
        response = httpx.get(f"{url}/ping", timeout=2.0)
        if response.status_code == 200:
            return {"status": "ok"}
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}






def _valid_state(state: object) -> bool:
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _front_running(root: Path) -> bool:
    """The relay of root is running: its command line names root's backend file (a recycled pid does not)."""
    front = _read_json(root / FRONT_FILE)
    pid = front.get("pid") if isinstance(front, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return False
    return runs(pid, "cloudllm.local_front", str(root / BACKEND_FILE))


def _start_front(root: Path, port: int) -> dict | None:
    """Start root's relay on port (its old one; any free one if that is taken). None if it would not start."""
    port_file = root / "front.port"
    for attempt in dict.fromkeys((port, 0)):
        port_file.unlink(missing_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "cloudllm.local_front", "--backend-file", str(root / BACKEND_FILE),
             "--port-file", str(port_file), "--port", str(attempt)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while process.poll() is None and not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if port_file.exists():
            front = {"pid": process.pid, "port": int(port_file.read_text())}
            write_atomic(root / FRONT_FILE, json.dumps(front))
            return front
        if process.poll() is None:
            process.kill()
        process.wait()
    return None


def _stop_front(root: Path) -> None:
    if _front_running(root):
        try:
            os.kill(_read_json(root / FRONT_FILE)["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def _stop_started(root: Path, keep: str | None = None) -> int:
    """Stop the servers started for root's versions (their server.json), but the version `keep`; how many ran."""
    stopped = 0
    for server_file in root.glob(f"*/{SERVER_FILE}"):
        if server_file.parent.name == keep:
            continue
        try:
            server = json.loads(server_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(server, dict) and alive(server.get("pid"), _serve_py(server.get("artifact"))):
            stop_server(server.get("pid"), _serve_py(server.get("artifact")))
            stopped += 1
    stopped += remove_leftovers(root, keep)  # containers whose supervisor was killed outright
    return stopped




def _serve_py(artifact: object) -> str | None:
    """What our server's command line holds: `python ARTIFACT/code/serve.py serve ...`."""
    return str(Path(artifact) / "code" / "serve.py") if isinstance(artifact, str) and artifact else None


def _one_line(text: str, limit: int = 300) -> str:
    """text on one line (a load error can span many), cut to limit characters."""
    flat = " ".join(text.split()).rstrip(".!")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _last_line(log: str | None) -> str:
    if not log or not os.path.exists(log):
        return ""
    with open(log, "rb") as fh:
        fh.seek(max(0, os.path.getsize(log) - 4096))
        lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _release_dropped(old: dict | None, new: dict, reporter: Reporter) -> None:
    """Remove the stored adapter copies old served and new does not, once no endpoint references them."""
    dropped = stored_digests((old or {}).get("adapters")) - stored_digests(new.get("adapters"))
    removed = release_stored(dropped)
    if removed:
        reporter.step(f"removed {len(removed)} adapter cop{'y' if len(removed) == 1 else 'ies'} no endpoint uses from $CLOUDLLM_HOME/adapters")
