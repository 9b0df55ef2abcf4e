"""LoRA adapters of local endpoints: stored once by content, loaded into the running server without a restart.

An adapter's files are copied (not linked: editing the original must not change what is
served) to $CLOUDLLM_HOME/adapters/<digest>/, shared by every endpoint that serves it. A server
starts with its adapters (`serve --adapter NAME=PATH`); later changes go through its admin
routes (POST/DELETE /adapters), and state.json records what it serves, with the adapters digest
the next plan compares.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from cloudllm.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterInfo, adapter_digest, adapter_files, adapters_digest
from cloudllm.errors import DeployFailed, UserError
from cloudllm.home import home_dir
from cloudllm.http import endpoint_error

if TYPE_CHECKING:
    from cloudllm.console import Reporter
    from cloudllm.plan import Plan

_DIGEST_NAME = re.compile(r"^[0-9a-f]{64}$")
ADMIN_TIMEOUT = httpx.Timeout(120.0, connect=5.0)  # loading an adapter waits for the batch running now


def stored_adapter(adapter: AdapterInfo, digest: str) -> Path:
    """The folder holding the adapter's files under its content digest (copied there once)."""
    dest = home_dir("adapters") / digest
    if (dest / ADAPTER_WEIGHTS).is_file():
        return dest
    staging = dest.with_name(f".{digest}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        for name, source in adapter_files(adapter):
            shutil.copyfile(source, staging / name)
        try:
            staging.rename(dest)
        except OSError:  # another deploy stored the same adapter meanwhile: theirs is the same bytes
            if not (dest / ADAPTER_WEIGHTS).is_file():
                raise
    except OSError as exc:
        raise UserError(f"cannot store adapter {adapter.name!r} in {dest}: {exc.strerror or exc}", "free disk space in $CLOUDLLM_HOME, then retry") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def stored_digests(adapters: dict[str, dict[str, Any]] | None) -> set[str]:
    return {entry["digest"] for entry in (adapters or {}).values() if isinstance(entry, dict) and isinstance(entry.get("digest"), str)}


def referenced_digests() -> set[str] | None:
    """Every stored adapter some local endpoint's state.json names; None when a state cannot be read
    (then nothing is provably unreferenced, so nothing is removed)."""
    found: set[str] = set()
    for state_file in home_dir("local").glob("*/state.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict):
            return None
        found |= stored_digests(state.get("adapters"))
    return found


def release_stored(dropped: set[str]) -> list[str]:
    """Remove the stored copies among `dropped` that no endpoint references any more; returns their digests.

    Only folders this module writes are removed: a digest-named folder directly under
    $CLOUDLLM_HOME/adapters holding nothing but an adapter's config and weights. A folder with
    anything else in it was touched by someone else and is left alone.
    """
    if not dropped:
        return []
    referenced = referenced_digests()
    if referenced is None:
        return []
    removed = []
    root = home_dir("adapters")
    for digest in sorted(dropped - referenced):
        folder = root / digest
        if _DIGEST_NAME.match(digest) and _is_stored_copy(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(digest)
    return removed


def _is_stored_copy(folder: Path) -> bool:
    if folder.is_symlink() or not (folder / ADAPTER_WEIGHTS).is_file():
        return False
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    return all(e.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and e.is_file() and not e.is_symlink() for e in entries)


def planned_adapters(plan: "Plan") -> dict[str, dict[str, Any]]:
    """The plan's adapters, stored, as state.json records them: {name: {"digest", "path", "rank"}}."""
    return {a.name: adapter_entry(a, plan.adapter_digests[a.name]) for a in plan.adapters}


def adapter_entry(adapter: AdapterInfo, digest: str | None = None) -> dict[str, Any]:
    """One adapter as state.json records it, its files stored by content."""
    digest = digest or adapter_digest(adapter)
    return {"digest": digest, "path": str(stored_adapter(adapter, digest)), "rank": adapter.rank}


def valid_adapters(value: object) -> bool:
    """state.json's adapters as a deploy writes them (a hand edit must not point a server at any folder)."""
    if value is None:
        return True
    home = str(home_dir("adapters"))
    return isinstance(value, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("digest"), str) and entry.get("path") == os.path.join(home, entry["digest"])
        for entry in value.values()
    )


def serve_arguments(adapters: dict[str, dict[str, Any]]) -> list[str]:
    return [arg for name, entry in sorted(adapters.items()) for arg in ("--adapter", f"{name}={entry['path']}")]


def load_live(name: str, url: str, adapter: str, path: str) -> None:
    """Load (or replace) adapter on the running server at url."""
    _admin(name, "POST", f"{url}/adapters", json={"name": adapter, "path": path})


def unload_live(name: str, url: str, adapter: str) -> None:
    _admin(name, "DELETE", f"{url}/adapters/{adapter}")


def served_names(name: str, url: str) -> set[str] | None:
    """The adapters the running server holds; None when it does not answer."""
    try:
        return {a["name"] for a in _admin(name, "GET", f"{url}/adapters")["adapters"]}
    except UserError:
        return None


def with_adapters(state: dict, adapters: dict[str, dict[str, Any]]) -> dict:
    """state serving `adapters`, its adapters digest and overall digest recomputed (what the next plan compares)."""
    from cloudllm.plan import fingerprint_digest
    from cloudllm.types import FINGERPRINT_KEYS

    state = {**state, "adapters": adapters, "adapters_digest": adapters_digest({n: a["digest"] for n, a in adapters.items()})}
    state["digest"] = fingerprint_digest({k: state.get(k) for k in FINGERPRINT_KEYS})
    return state


def sync_live(name: str, state: dict, wanted: dict[str, dict[str, Any]], reporter: "Reporter") -> dict:
    """Make the running server of state serve exactly `wanted`; returns the new state."""
    have = state.get("adapters") or {}
    for adapter, entry in sorted(wanted.items()):
        if have.get(adapter, {}).get("digest") != entry["digest"]:
            load_live(name, state["url"], adapter, entry["path"])
            reporter.step(f"adapter {adapter} {'replaced' if adapter in have else 'added'} (rank {entry['rank']}), no restart")
    for adapter in sorted(set(have) - set(wanted)):
        unload_live(name, state["url"], adapter)
        reporter.step(f"adapter {adapter} removed, no restart")
    return with_adapters(state, wanted)


def _admin(name: str, method: str, url: str, **kwargs: Any) -> Any:
    try:
        response = httpx.request(method, url, timeout=ADMIN_TIMEOUT, **kwargs)
    except httpx.HTTPError as exc:
        raise DeployFailed(f"endpoint {name}'s server did not answer {url}: {exc}", f"see `cloudllm status {name}` and `cloudllm logs {name}`") from None
    if response.status_code >= 400:
        raise endpoint_error(name, response.status_code, response.text)
    return response.json()
