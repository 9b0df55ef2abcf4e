"""Endpoint records on this machine: which provider holds an endpoint and how to reach it.

`invoke`, `status` and `delete` read the record to find the provider; a CI job on
another machine, with no record, names the provider with --provider instead.

A deploy saves an intent record (`pending`) before it creates anything, so a deploy killed
at any point (Ctrl-C, SIGTERM, SIGKILL) leaves a record that `list` shows and `delete` and
the next `deploy` act on. Records are written 0600 in a 0700 folder: provider options
(`--option`, YAML `options:`) may hold tokens a plugin needs to reach the endpoint again.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, Field, ValidationError

from cloudllm.errors import UserError
from cloudllm.home import home_dir, write_atomic


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
    pending: bool = Field(False, description="Saved before a first deploy created anything; cleared once it finished.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Adapters added with `cloudllm adapters add` (name -> folder): a later deploy keeps them unless it names them itself.",
    )
    created_at: str = Field(default_factory=lambda: now_iso())
    updated_at: str = Field(default_factory=lambda: now_iso())


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _folder() -> Path:
    folder = home_dir("endpoints")
    try:
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
    except OSError:
        pass  # not ours to change (a shared CLOUDLLM_HOME); the files themselves are 0600
    return folder


def _path(name: str) -> Path:
    return _folder() / f"{name}.json"


def _read(path: Path) -> EndpointRecord:
    """The record in path; a damaged or hand-edited one is a UserError naming the file and the fix."""
    fix = f"fix or delete {path} (then `cloudllm list --provider PROVIDER` finds the endpoint, if it still exists)"
    try:
        record = EndpointRecord.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise UserError(f"cannot read the endpoint record {path}: {exc.strerror}", fix) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"the endpoint record {path} is damaged ({where + ': ' if where else ''}{err['msg']})", fix) from None
    if record.name != path.stem:
        raise UserError(f"the endpoint record {path} names another endpoint ({record.name!r})", fix)
    return record


def load_record(name: str) -> EndpointRecord | None:
    path = _path(name)
    if not path.exists():
        return None
    return _read(path)


def save_record(record: EndpointRecord) -> None:
    record.updated_at = now_iso()
    text = json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    write_atomic(_path(record.name), text, private=True)


def remove_record(name: str) -> None:
    _path(name).unlink(missing_ok=True)


def list_records() -> list[EndpointRecord]:
    """Every readable record; a damaged one is named on stderr and skipped, so one bad file never hides the rest."""
    records = []
    for path in sorted(_folder().glob("*.json")):
        try:
            records.append(_read(path))
        except UserError as exc:
            print(f"warning: {exc.line()}", file=sys.stderr)
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
