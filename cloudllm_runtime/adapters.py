"""LoRA adapters served beside one copy of the base model, chosen per request.

peft injects the adapters' low-rank matrices into the base's modules once; a batch may then
mix adapters (peft's `adapter_names`, one name per row, "__base__" for none), so requests for
different adapters never wait for each other's batch. Adding or removing an adapter changes
the modules in place: the server keeps running.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


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
            raise ValueError(f"{folder} has no adapter_model.safetensors")
        with self._lock:
            if name in self._paths:
                self._peft.delete_adapter(name)
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name, is_trainable=False)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
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
