"""The local provider: the generated model server as a background process on 127.0.0.1.

It runs the very code a cloud container runs (`python code/serve.py serve`), so a
deploy that works here differs from the cloud only in the hardware. State lives in
$CLOUDLLM_HOME/local/<name>/: one folder per deployed version (its artifact) and
state.json pointing at the live one; server logs go to $CLOUDLLM_HOME/logs/. An update starts the new version beside the
old, switches state.json once the new one is healthy, then stops the old. The endpoint's URL is
a small relay (cloudllm/local_front.py) whose port never changes, pointed at the live server,
so an update keeps the URL clients saved. More models on the same endpoint (--add-model) each run
a server of their own under models/<model>/ (cloudllm/providers/local_models.py); a request picks
one with --model. How one server is started, waited for, relayed and stopped is
cloudllm/providers/local_servers.py.

A server whose model fails to load says so on /ping (503 {"status": "failed", "error": ...});
a deploy stops waiting at once, stops that server, and leaves no state behind (its log stays
for the traceback).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.home import home_dir
from cloudllm.http import post_json, stream_tokens
from cloudllm.logtime import line_time
from cloudllm.providers.base import Endpoint, Feature, Provider, StrictOptions
from cloudllm.providers.kit.server import alive
from cloudllm.providers.local_adapters import (
    adapter_entry,
    planned_adapters,
    release_stored,
    served_names,
    stored_digests,
    sync_live,
)
from cloudllm.providers.local_container import container_for
from cloudllm.providers.local_models import add_model, model_url, models_details, remove_model, stop_models
from cloudllm.providers.local_servers import (
    front_running,
    last_line,
    point_front,
    read_state,
    server_state,
    serve_py,
    start_version,
    stop_front,
    stop_started,
    stop_version,
    write_state,
)
from cloudllm.records import load_record
from cloudllm.types import FINGERPRINT_KEYS, Fingerprint, ResourceChange


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
    }
    Options = LocalOptions
    offers = frozenset({Feature.ADAPTERS, Feature.MULTI_MODEL})

    # --- state ------------------------------------------------------------------------
    @staticmethod
    def _root(name: str) -> Path:
        return home_dir("local") / name

    def _state(self, name: str) -> dict | None:
        """The live version's state; a damaged or hand-edited file is a UserError naming it."""
        return read_state(
            self._root(name),
            f"run `cloudllm delete {name}` (it stops only servers it can prove are this endpoint's), then deploy again",
        )

    def _write_state(self, name: str, state: dict) -> None:
        write_state(self._root(name), state)

    # --- verbs ------------------------------------------------------------------------
    def deploy(self, plan, reporter: Reporter) -> Endpoint:
        """Start the server; with plan.wait False (--no-wait), return once it has a port."""
        if plan.spec.add_model:
            raise UserError(
                f"there is no local endpoint {plan.spec.name} to add model {plan.spec.add_model} to",
                "deploy its first model without --add-model, then add this one (see `cloudllm list --provider local`)",
            )
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
        if plan.spec.add_model:  # one more model beside the first: the first keeps running untouched
            if old is None:
                return self.deploy(plan, reporter)  # its refusal
            add_model(plan, self._root(plan.spec.name), old, reporter)
            return self._endpoint(plan.spec.name, old)
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
            stop_version(old)
            shutil.rmtree(self._root(plan.spec.name) / old["version"], ignore_errors=True)
            reporter.step(f"stopped the previous server (pid {old.get('pid')})")
        _release_dropped(old, state, reporter)
        return self._endpoint(plan.spec.name, state)

    def describe_changes(self, plan) -> list[ResourceChange]:
        if plan.spec.add_model and plan.existing is not None:
            model = plan.spec.add_model
            added = models_details(self._root(plan.spec.name), plan.spec.name).get(model)
            if added is None:
                return [ResourceChange(resource="model", name=f"{plan.spec.name}/{model}", action="create", reason="a server of its own beside the endpoint's")]
            same = added.get("version") == plan.digest[:12] and added["state"] == "InService"
            return [ResourceChange(resource="model", name=f"{plan.spec.name}/{model}", action="unchanged" if same else "update",
                                   reason="already serves this version" if same else "the new version starts beside the old one")]  # fmt: skip
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
        stopped = stop_models(root) if root.is_dir() else 0  # the added models first: each relays to its own server
        stopped += stop_started(root) if root.is_dir() else 0
        stop_front(root)
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
        stop_version(state)
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
                elif follow and alive(state.get("pid"), serve_py(state.get("artifact"))):
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

    # --- more models on the endpoint (cloudllm/providers/local_models.py) ------------------------
    def remove_model(self, name: str, model: str, reporter: Reporter) -> None:
        """Stop the added model `model` of endpoint `name`; the endpoint and its other models keep serving."""
        state = self._state(name)
        if state is None:
            raise UserError(f"no local endpoint named {name!r}", "see `cloudllm list`")
        remove_model(self._root(name), name, model, state, reporter)

    def _running_state(self, name: str) -> dict:
        """The live version's state, once its server is known to run and answer."""
        self._live_url(name)
        state = self._state(name)
        if not state.get("url"):
            raise UserError(f"endpoint {name}'s server is still starting", f"wait for `cloudllm status {name}` to say InService, then retry")
        return state

    # --- helpers ----------------------------------------------------------------------
    def _point_front(self, name: str, state: dict) -> None:
        point_front(self._root(name), state)

    def _live_url(self, name: str, model: str | None = None) -> str:
        state = self._state(name)
        if state is None:
            raise UserError(f"no local endpoint named {name!r}", "see `cloudllm list`, or deploy it first")
        added = model_url(self._root(name), name, model, state)  # None: the endpoint's first model
        if added is not None:
            return added
        if not alive(state.get("pid"), serve_py(state.get("artifact"))):
            raise self._unreachable(name)
        return state.get("front_url") if front_running(self._root(name)) else state["url"]

    def _unreachable(self, name: str) -> DeployFailed:
        state = self._state(name) or {}
        tail = last_line(state.get("log"))
        return DeployFailed(
            f"endpoint {name}'s server (pid {state.get('pid')}) is not running{': ' + tail if tail else ''}",
            f"see its log {state.get('log')}, then redeploy with `cloudllm deploy` or remove it with `cloudllm delete {name}`",
        )

    def _endpoint(self, name: str, state: dict) -> Endpoint:
        status, reason, _ = server_state(state, f"`cloudllm logs {name}`")
        models = models_details(self._root(name), name)
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
            details={
                **{k: state[k] for k in ("pid", "log", "artifact", "grpc_port", "image", "container", "tags") if k in state},
                **({"models": models} if models else {}),
            },
        )

    def _start_version(self, plan, reporter: Reporter, *, wait: bool) -> dict:
        """Lay out the artifact, start its server, and (with wait) wait for /ping; clean up on failure."""
        name = plan.spec.name
        version = plan.digest[:12]
        root = self._root(name)
        container = container_for(plan, root, version)  # --image: the server runs in that image (local_container.py)
        adapters = planned_adapters(plan)
        if container is not None and adapters:
            # The adapters live in $CLOUDLLM_HOME, which the container does not mount.
            raise UserError("LoRA adapters are not served by a local container endpoint yet", "drop --image to serve the adapters, or deploy without --adapter")
        log_path = home_dir("logs") / f"{name}-{version}.log"  # beside local/, where every folder is an endpoint
        return start_version(
            plan, root, version, live=self._state(name), log_path=log_path, reporter=reporter, wait=wait, adapters=adapters, container=container
        )


def _release_dropped(old: dict | None, new: dict, reporter: Reporter) -> None:
    """Remove the stored adapter copies old served and new does not, once no endpoint references them."""
    dropped = stored_digests((old or {}).get("adapters")) - stored_digests(new.get("adapters"))
    removed = release_stored(dropped)
    if removed:
        reporter.step(f"removed {len(removed)} adapter cop{'y' if len(removed) == 1 else 'ies'} no endpoint uses from $CLOUDLLM_HOME/adapters")
