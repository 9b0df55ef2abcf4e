"""More models on one local endpoint (--add-model): one model server per added model, invoked by name.

    cloudllm deploy ./embedder --name shared --add-model embed --provider local
    cloudllm invoke shared "..." --model embed

Each added model is a folder of its own, laid out as the endpoint's first model is
(cloudllm/providers/local_servers.py): $CLOUDLLM_HOME/local/<name>/models/<model>/ holds its
state.json, its versions and its relay, so its URL stays when a new version of it replaces the
old. A request names the model; the provider sends it to that model's relay. Each model has its
own relay rather than one relay routing on the request path: a relay passes bytes and never parses
HTTP, and a kept-alive connection may carry requests for different models.

Adding a model starts its server beside the running ones and touches none of them; one that fails
to start leaves nothing of itself. Adding the same version again does nothing; another version
starts beside the live one and replaces it once healthy. `cloudllm delete` stops every model;
LocalProvider.remove_model stops one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.home import home_dir
from cloudllm.providers.kit.server import alive
from cloudllm.providers.local_adapters import planned_adapters
from cloudllm.providers.local_container import container_for
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
from cloudllm.spec import default_endpoint_name

MODELS_DIR = "models"


def first_model_name(base: dict) -> str:
    """The --model name of the endpoint's first model: its folder's name, as Vertex AI's provider names it."""
    return default_endpoint_name(base.get("model") or "")


def model_states(root: Path, name: str) -> dict[str, dict]:
    """The added models of the endpoint whose folder is root: model name -> its live state."""
    folder = root / MODELS_DIR
    if not folder.is_dir():
        return {}
    states = {}
    for model_dir in sorted(folder.iterdir()):
        state = read_state(model_dir, _damaged_fix(name, model_dir.name)) if model_dir.is_dir() else None
        if state is not None:
            states[model_dir.name] = state
    return states


def add_model(plan, root: Path, base: dict, reporter: Reporter) -> dict:
    """Serve plan's model as one more model of the endpoint (base: its first model's state); its live state."""
    name, model = plan.spec.name, plan.spec.add_model
    if model == first_model_name(base):
        raise UserError(f"{model} is the name of endpoint {name}'s first model", "pick another --add-model name")
    if planned_adapters(plan):
        raise UserError("LoRA adapters on a model added to a local endpoint are not served yet", "deploy --add-model without --adapter")
    folder = root / MODELS_DIR / model
    live = read_state(folder, _damaged_fix(name, model))
    version = plan.digest[:12]
    if live and live.get("version") == version and server_state(live, "")[0] == "InService":
        reporter.step(f"model {model} on {name} already serves this version ({version})")
        return live
    try:  # it waits for health even with --no-wait: a model that fails to start must leave nothing of itself
        state = start_version(
            plan, folder, version, live=live, log_path=home_dir("logs") / f"{name}-{model}-{version}.log", reporter=reporter,
            wait=True, adapters={}, container=container_for(plan, folder, version),
        )  # fmt: skip
    except BaseException:
        _drop_empty(root)
        raise
    try:
        point_front(folder, state)
        write_state(folder, state)
    except BaseException:
        stop_started(folder, keep=live.get("version") if live else None)
        if live is None:
            stop_front(folder)
        shutil.rmtree(folder / version if live else folder, ignore_errors=True)
        _drop_empty(root)
        raise
    if live and live.get("version") != version:
        stop_version(live)
        shutil.rmtree(folder / live["version"], ignore_errors=True)
        reporter.step(f"stopped model {model}'s previous server (pid {live.get('pid')})")
    reporter.step(f"model {model} serves on {name}: invoke it with --model {model}")
    return state


def remove_model(root: Path, name: str, model: str, base: dict, reporter: Reporter) -> None:
    """Stop added model `model` and remove its folder; the endpoint's other models keep serving."""
    if model == first_model_name(base):
        raise UserError(f"{model} is endpoint {name}'s first model, which the endpoint cannot serve without", f"delete the endpoint with `cloudllm delete {name}`")
    folder = root / MODELS_DIR / model
    if not folder.is_dir():
        raise UserError(f"endpoint {name} has no model {model!r}; {_models_line(root, name, base)}", f"see `cloudllm status {name}`")
    state = _state_or_none(folder, name)
    stopped = stop_started(folder)
    stop_version(state)
    stop_front(folder)
    shutil.rmtree(folder, ignore_errors=True)
    _drop_empty(root)
    reporter.step(f"stopped model {model} of {name}" + (f" (pid {state.get('pid')})" if state else f" ({stopped} server(s))"))


def stop_models(root: Path) -> int:
    """Stop every added model's servers and relay (a damaged state.json too: its server.json files say what ran)."""
    stopped = 0
    for folder in sorted((root / MODELS_DIR).glob("*/")):
        stopped += stop_started(folder)
        stop_front(folder)
    return stopped


def model_url(root: Path, name: str, model: str | None, base: dict) -> str | None:
    """The URL a request for `model` goes to; None for the endpoint's first model (None or its name)."""
    if model is None or model == first_model_name(base):
        return None
    states = model_states(root, name)
    if model not in states:
        raise UserError(f"endpoint {name} has no model {model!r}; {_models_line(root, name, base)}", "pick one of them with --model")
    state = states[model]
    if not alive(state.get("pid"), serve_py(state.get("artifact"))):
        tail = last_line(state.get("log"))
        raise DeployFailed(
            f"model {model} of endpoint {name} (pid {state.get('pid')}) is not running{': ' + tail if tail else ''}",
            f"see its log {state.get('log')}, then deploy it again with --add-model {model}",
        )
    folder = root / MODELS_DIR / model
    return state["front_url"] if state.get("front_url") and front_running(folder) else state["url"]


def models_details(root: Path, name: str) -> dict[str, dict]:
    """What `cloudllm status` shows of each added model: its state, URL, pid, source folder and version (its digest's start)."""
    details = {}
    for model, state in model_states(root, name).items():
        status, reason, _ = server_state(state, f"its log {state.get('log')}")
        details[model] = {
            "state": status,
            "url": state.get("front_url") or state.get("url"),
            "pid": state.get("pid"),
            "model": state.get("model"),
            "version": state.get("version"),
            **({"failure": reason} if reason else {}),
        }
    return details


def _models_line(root: Path, name: str, base: dict) -> str:
    try:
        added = list(model_states(root, name))
    except UserError:
        added = sorted(p.name for p in (root / MODELS_DIR).glob("*/"))
    return f"its models are: {', '.join([first_model_name(base), *added])}"


def _state_or_none(folder: Path, name: str) -> dict | None:
    try:
        return read_state(folder, _damaged_fix(name, folder.name))
    except UserError:
        return None  # damaged: its server.json files still say what to stop


def _drop_empty(root: Path) -> None:
    try:
        (root / MODELS_DIR).rmdir()
    except OSError:
        pass  # not empty, or not there


def _damaged_fix(name: str, model: str) -> str:
    return f"run `cloudllm delete {name}` (it stops only servers it can prove are this endpoint's), then deploy again (model {model} with --add-model)"
