"""LoRA adapters served beside one copy of the base model, chosen per request.

peft injects the adapters' low-rank matrices into the base's modules once; a batch may then
mix adapters (peft's `adapter_names`, one name per row, "__base__" for none), so requests for
different adapters never wait for each other's batch. Adding or removing an adapter changes
the modules in place: the server keeps running.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from .protocol import RequestError, check_adapter_name, decode_body, validation_error

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
ADAPTERS_ROUTE = "/adapters"


class UnknownAdapter(KeyError):
    """A request named an adapter this server does not hold (a client mistake: 404/422)."""


class AdapterSet:
    """The adapters loaded into one model. Thread-safe: the batcher reads, an admin call writes."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._peft: Any = None
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self._paths)

    @property
    def generating_model(self) -> Any:
        """The module to call generate() on: the peft wrapper once an adapter is loaded."""
        return self._peft if self._peft is not None else self.model

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": name, "path": path, **_config_summary(path)} for name, path in sorted(self._paths.items())]

    def add(self, name: str, path: str | Path) -> None:
        """Load an adapter folder (safetensors only) under `name`; replaces an adapter of that name."""
        from peft import PeftModel

        folder = Path(path)
        if not (folder / "adapter_model.safetensors").is_file():
            raise ValueError(f"{folder} has no adapter_model.safetensors (only safetensors adapters are loaded)")
        with self._lock:
            previous = self._paths.pop(name, None)
            if previous is not None:
                self._peft.delete_adapter(name)
            try:
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name, is_trainable=False)
                    self._peft.eval()
                else:
                    self._peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            except Exception:
                if self._peft is not None and name in self._peft.peft_config:
                    self._peft.delete_adapter(name)  # half-loaded: its layers must not answer for it
                if previous is not None:  # a failed replacement keeps the adapter that served
                    self._peft.load_adapter(previous, adapter_name=name, is_trainable=False)
                    self._paths[name] = previous
                raise
            self._paths[name] = str(folder)

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._paths:
                raise UnknownAdapter(name)
            self._peft.delete_adapter(name)
            del self._paths[name]

    def generate_kwargs(self, adapters: list[str | None]) -> dict[str, Any]:
        """Extra generate() arguments for a batch whose rows use these adapters (None: the base)."""
        unknown = sorted({a for a in adapters if a is not None and a not in self._paths})
        if unknown:
            raise UnknownAdapter(unknown[0])
        if self._peft is None:
            return {}
        return {"adapter_names": [a if a is not None else BASE for a in adapters]}


def _config_summary(path: str) -> dict[str, Any]:
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"rank": config.get("r"), "base_model": config.get("base_model_name_or_path")}


# --- the server's side: adapters of an engine, chosen per request, changed by the admin routes ------------


def load_adapters(engine: Any, settings: Any, model_dir: str) -> None:
    """Load settings.adapters (name -> folder, relative to the artifact root) into the engine before it serves."""
    for name, path in sorted((getattr(settings, "adapters", None) or {}).items()):
        adapter_set(engine).add(check_adapter_name(name), os.path.join(model_dir, path))


def adapter_set(engine: Any) -> AdapterSet:
    """The engine's AdapterSet, made on first use; only a text-generation model takes adapters."""
    if engine.adapters is None:
        if not getattr(engine, "streaming", False) or getattr(engine, "seq2seq", False):
            raise RequestError(422, f"this model serves {engine.task}; LoRA adapters are served for text generation only")
        engine.adapters = AdapterSet(engine.model)
    return engine.adapters


def require_adapter(engine: Any, name: str | None) -> None:
    """404 naming the adapters this server has, for a request that asks for another."""
    held = engine.adapters.names if engine.adapters is not None else []
    if name is not None and name not in held:
        has = f"this server has: {', '.join(held)}" if held else "this server has no adapters"
        raise RequestError(404, f"unknown adapter {json.dumps(name)}; {has}", "adapter_not_found")


# SageMaker names the adapter inference component a request is for in this header (the base's container answers).
SAGEMAKER_ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


def register(add: Any, state: Any) -> None:
    """GET/POST /adapters and DELETE /adapters/{name}: change adapters while the server runs.

    Not a platform route: SageMaker and Vertex AI forward only their predict and health routes,
    so only whoever reaches the server's own port (the local provider on 127.0.0.1) uses these.
    """
    add(ADAPTERS_ROUTE, lambda request: _adapters_route(state, request), ["GET", "POST"])
    add(ADAPTERS_ROUTE + "/{name}", lambda request: _remove_route(state, request), ["DELETE"])


async def _adapters_route(state: Any, request: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    from .http_io import _json, _read_body

    engine = state.require_engine()
    if request.method == "GET":
        return _json({"adapters": engine.adapters.describe() if engine.adapters is not None else []})
    body = await _read_body(request, state.settings.max_body_bytes, state.settings.max_body_seconds)
    data = decode_body(body, state.settings.max_body_bytes)
    if isinstance(data, dict) and set(data) == {"name", "src"}:
        # SageMaker registers an adapter inference component so (its container standard's name for the folder).
        data = {"name": data["name"], "path": data["src"]}
    if not isinstance(data, dict) or set(data) != {"name", "path"} or not isinstance(data.get("path"), str):
        raise validation_error('the body must be {"name": ADAPTER, "path": FOLDER ON THE SERVER}')
    name = check_adapter_name(data["name"])
    adapters = adapter_set(engine)

    def load() -> None:
        with engine.lock:  # between batches: a module must not change under a running generate()
            adapters.add(name, data["path"])

    try:
        await run_in_threadpool(load)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise RequestError(422, f"cannot load adapter {name!r} from {data['path']}: {str(exc)[:300]}", "invalid_adapter") from None
    return _json({"adapters": adapters.describe()})


async def _remove_route(state: Any, request: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    from .http_io import _json

    engine = state.require_engine()
    name = request.path_params["name"]
    require_adapter(engine, name)

    def remove() -> None:
        with engine.lock:
            engine.adapters.remove(name)

    try:
        await run_in_threadpool(remove)
    except UnknownAdapter:  # removed by another call meanwhile
        require_adapter(engine, name)
    return _json({"adapters": engine.adapters.describe()})
