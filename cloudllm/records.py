"""Endpoint records on this machine: which provider holds an endpoint and how to reach it.

`invoke`, `status` and `delete` read the record to find the provider; a CI job on
another machine, with no record, names the provider with --provider instead.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, Field

from cloudllm.errors import UserError
from cloudllm.home import home_dir


class EndpointRecord(BaseModel):
    name: str
    provider: str
    model: str = Field(description="The model folder the endpoint was deployed from.")
    region: str | None = None
    url: str | None = None
    digest: str | None = Field(None, description="ArtifactManifest digest of what is deployed.")
    options: dict[str, Any] = Field(default_factory=dict, description="Provider options needed to reach it again.")
    details: dict[str, Any] = Field(default_factory=dict)
    apply_file: str | None = Field(None, description="file_id of the cloudllm.yaml whose apply created it (apply --prune).")
    created_at: str = Field(default_factory=lambda: now_iso())
    updated_at: str = Field(default_factory=lambda: now_iso())


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _path(name: str) -> Path:
    return home_dir("endpoints") / f"{name}.json"


def load_record(name: str) -> EndpointRecord | None:
    path = _path(name)
    if not path.exists():
        return None
    try:
        return EndpointRecord.model_validate_json(path.read_text())
    except ValueError:
        raise UserError(f"the record of endpoint {name!r} at {path} is corrupt", f"delete {path} and deploy again") from None


def save_record(record: EndpointRecord) -> None:
    record.updated_at = now_iso()
    path = _path(record.name)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def remove_record(name: str) -> None:
    _path(name).unlink(missing_ok=True)


def list_records() -> list[EndpointRecord]:
    records = []
    for path in sorted(home_dir("endpoints").glob("*.json")):
        try:
            records.append(EndpointRecord.model_validate_json(path.read_text()))
        except ValueError:
            continue
    return records


@contextmanager
def endpoint_lock(name: str) -> Iterator[None]:
    """One deploy or delete of an endpoint at a time on this machine; the second fails at once, clearly."""
    path = home_dir("locks") / f"{name}.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(
                f"endpoint {name!r} is being changed by {holder}", "wait for that deploy or delete to finish, then retry"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
