"""apply: make the endpoints of a cloudllm.yaml exist as declared.

Every endpoint is planned before anything changes; if any plan is refused, nothing is
changed. Then each endpoint is created, updated or left as it is, through the same
`cloudllm.api.deploy` as `cloudllm deploy` (the API hands its plan and deploy in as `Verbs`, so
this module sits below it and imports nothing of it). Endpoints this file created earlier and no
longer lists are reported, and deleted only with prune. Ownership is the `file_id`:
on this machine in the endpoint records ($CLOUDLLM_HOME), and on the cloud as the tag
`cloudllm-apply-file` (providers report it in `Endpoint.details["tags"]`), so a CI runner
with no records prunes too. Nothing the file did not create is ever deleted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

from cloudllm.config_file import FILE_TAG, LoadedFile, load_file
from cloudllm.console import Reporter
from cloudllm.errors import EXIT_FAILED, EXIT_OK, EXIT_PLAN_REFUSED, PlanRefused, UserError
from cloudllm.plan import refuse_unless_fits
from cloudllm.providers.base import Endpoint, Provider, ResourceChange, get_provider
from cloudllm.records import endpoint_lock, list_records, load_record, remove_record, save_record
from cloudllm.redact import redact, redact_text
from cloudllm.spec import DeploySpec

# "unknown": int8/int4 weights not quantized on this machine yet; deploy quantizes, then decides.
Action = Literal["create", "update", "unchanged", "unknown", "delete", "keep", "refused"]
Outcome = Literal["applied", "no-change", "dry-run", "refused", "failed"]
ACTIONS: tuple[str, ...] = ("create", "update", "unchanged", "unknown", "delete", "keep", "refused")


class Verbs(NamedTuple):
    """What apply does to one endpoint: cloudllm.api's plan(spec=, check_account=) and deploy(spec=, wait=, reporter=)."""

    plan: Callable[..., Any]
    deploy: Callable[..., Any]


@dataclass
class EndpointResult:
    """What apply decided and did for one endpoint."""

    name: str
    provider: str
    region: str | None
    action: Action
    reasons: list[str]
    done: bool = False  # carried out (or nothing to do); False in a dry run, after a refusal or a failure
    error: str | None = None  # why it was refused or failed
    endpoint: Endpoint | None = None
    changes: list[ResourceChange] = field(default_factory=list)
    spec: DeploySpec | None = None
    target: Provider | None = None  # for deletes: the provider holding the endpoint

    def to_dict(self) -> dict[str, Any]:
        ep = self.endpoint
        return redact(
            {
                "name": self.name,
                "provider": self.provider,
                "region": self.region,
                "action": self.action,
                "reasons": self.reasons,
                "done": self.done,
                "error": self.error,
                "state": ep.state if ep else None,
                "url": ep.url if ep else None,
                "digest": ep.digest if ep else None,
                "changes": [c.model_dump(mode="json") for c in self.changes],
            }
        )


@dataclass
class ApplyResult:
    file: str
    file_id: str
    dry_run: bool
    prune: bool
    endpoints: list[EndpointResult]

    @property
    def refused(self) -> list[EndpointResult]:
        return [e for e in self.endpoints if e.action == "refused"]

    @property
    def failed(self) -> list[EndpointResult]:
        return [e for e in self.endpoints if e.error and e.action != "refused"]

    @property
    def outcome(self) -> Outcome:
        if self.refused:
            return "refused"
        if self.dry_run:
            return "dry-run"
        if self.failed:
            return "failed"
        if any(e.done and e.action in ("create", "update", "delete") for e in self.endpoints):
            return "applied"
        return "no-change"

    @property
    def exit_code(self) -> int:
        return {"refused": EXIT_PLAN_REFUSED, "failed": EXIT_FAILED}.get(self.outcome, EXIT_OK)

    def summary(self) -> dict[str, int]:
        counts = {action: 0 for action in ACTIONS}
        for e in self.endpoints:
            counts[e.action] += 1
        counts["failed"] = len(self.failed)
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "file_id": self.file_id,
            "dry_run": self.dry_run,
            "prune": self.prune,
            "outcome": self.outcome,
            "summary": self.summary(),
            "endpoints": [e.to_dict() for e in self.endpoints],
        }


def apply_file(
    path: str | Path,
    verbs: Verbs,
    *,
    dry_run: bool = False,
    prune: bool = False,
    wait: bool = True,
    reporter: Reporter | None = None,
) -> ApplyResult:
    """Plan every endpoint of the file, then create, update or leave each; prune deletes what the file dropped."""
    reporter = reporter or Reporter()
    loaded = load_file(path)
    specs = [_owned(spec, loaded.file_id) for spec in loaded.endpoints]
    results = [_plan_one(loaded, spec, verbs) for spec in specs]
    results += _dropped(loaded, {spec.name for spec in specs}, prune)
    result = ApplyResult(str(loaded.path), loaded.file_id, dry_run, prune, results)
    if result.refused or dry_run:
        return result

    for item in results:
        if item.action in ("create", "update", "unknown"):
            _deploy_one(loaded, item, verbs, wait, reporter)
        elif item.action == "unchanged":
            _claim(item.name, loaded.file_id)
            item.done = True
        elif item.action == "keep":
            item.done = True
    for item in results:
        if item.action != "delete":
            continue
        if result.failed:
            item.error = "not deleted: another endpoint failed to apply; fix it and apply again"
            continue
        _delete_one(item, reporter)
    return result


# --- the steps -------------------------------------------------------------------------------
def _owned(spec: DeploySpec, file_id: str) -> DeploySpec:
    """The spec with the ownership tag that lets a later --prune recognise it on the cloud."""
    return spec.model_copy(update={"tags": {**spec.tags, FILE_TAG: file_id}})


def _plan_one(loaded: LoadedFile, spec: DeploySpec, verbs: Verbs) -> EndpointResult:
    item = EndpointResult(spec.name, spec.provider, spec.region, "create", [], spec=spec)
    _check_not_elsewhere(loaded, spec)
    try:
        plan = verbs.plan(spec=spec, check_account=True)
        refuse_unless_fits(plan)
    except PlanRefused as exc:
        item.action, item.reasons, item.error = "refused", [exc.problem], exc.line()
        return item
    except UserError as exc:
        error = UserError(f"{loaded.where(spec.name)}: endpoint {spec.name}: {exc.problem}", exc.fix)
        error.exit_code = exc.exit_code  # bad input stays 2, a failed cloud call 1
        raise error from None
    item.action, item.reasons, item.changes, item.endpoint = plan.action, plan.reasons, plan.changes, plan.existing
    return item


def _check_not_elsewhere(loaded: LoadedFile, spec: DeploySpec) -> None:
    """Moving an endpoint to another provider would orphan the old one: refuse before anything changes."""
    record = load_record(spec.name)
    if record is None or record.provider == spec.provider:
        return
    if get_provider(record.provider, region=record.region, options=record.options).get(spec.name) is None:
        return
    raise UserError(
        f"{loaded.where(spec.name)}: endpoint {spec.name} runs on {record.provider} (deployed from this machine), "
        f"but the file puts it on {spec.provider}",
        f"delete the old one first (`cloudllm delete {spec.name}`) or give the new one another name",
    )


def _dropped(loaded: LoadedFile, listed: set[str], prune: bool) -> list[EndpointResult]:
    """Endpoints this file created earlier that it no longer lists: from the records, then the providers' tags."""
    found: dict[str, EndpointResult] = {}
    for record in list_records():
        if record.apply_file == loaded.file_id and record.name not in listed:
            target = get_provider(record.provider, region=record.region, options=record.options)
            found[record.name] = _dropped_result(record.name, target, prune, target.get(record.name))
    seen: set[str] = set()
    for spec in loaded.endpoints:
        key = json.dumps([spec.provider, spec.region, spec.options], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        target = get_provider(spec.provider, region=spec.region, options=spec.options)
        for ep in target.list():
            if ep.name not in listed and ep.name not in found and _file_tag(ep) == loaded.file_id:
                found[ep.name] = _dropped_result(ep.name, target, prune, ep)
    return [found[name] for name in sorted(found)]


def _dropped_result(name: str, target: Provider, prune: bool, endpoint: Endpoint | None) -> EndpointResult:
    if endpoint is None:
        reason = "no longer in the file and already gone" + ("; its record is removed" if prune else "; `--prune` forgets it")
    else:
        reason = "no longer in the file" if prune else "no longer in the file; `cloudllm apply --prune` deletes it"
    return EndpointResult(name, target.name, target.region, "delete" if prune else "keep", [reason], endpoint=endpoint, target=target)


def _file_tag(endpoint: Endpoint) -> str | None:
    tags = endpoint.details.get("tags") or endpoint.details.get("labels") or {}
    return tags.get(FILE_TAG) if isinstance(tags, dict) else None


def _deploy_one(loaded: LoadedFile, item: EndpointResult, verbs: Verbs, wait: bool, reporter: Reporter) -> None:
    assert item.spec is not None
    reporter.step(f"{item.action} {item.name} ({item.provider}): {'; '.join(item.reasons)}")
    try:
        deployed = verbs.deploy(spec=item.spec, wait=wait, reporter=reporter)
    except UserError as exc:
        item.error = redact_text(f"{loaded.where(item.name)}: endpoint {item.name}: {exc.line()}")
        return
    _claim(item.name, loaded.file_id)
    # Planned again under the endpoint's lock: report what was actually done.
    item.action, item.reasons, item.endpoint, item.done = deployed.action, deployed.reasons, deployed.endpoint, True
    item.changes = deployed.plan.changes


def _delete_one(item: EndpointResult, reporter: Reporter) -> None:
    assert item.target is not None
    reporter.step(f"delete {item.name} ({item.provider}): no longer in the file")
    try:
        with endpoint_lock(item.name):
            if item.endpoint is not None:
                item.target.delete(item.name, reporter=reporter)
            remove_record(item.name)
    except UserError as exc:
        item.error = redact_text(f"endpoint {item.name}: {exc.line()}")
        return
    item.done, item.endpoint = True, None


def _claim(name: str, file_id: str) -> None:
    record = load_record(name)
    if record is not None and record.apply_file != file_id:
        record.apply_file = file_id
        save_record(record)
