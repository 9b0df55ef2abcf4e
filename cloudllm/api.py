"""The Python API: the same verbs as the CLI, which only parses flags and renders results.

    import cloudllm
    result = cloudllm.deploy("./my-model", provider="local", name="demo")
    print(cloudllm.invoke("demo", "Once upon a time"))
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cloudllm.console import Reporter
from cloudllm.errors import Interrupted, UserError, interrupted_advice
from cloudllm.providers.base import Endpoint, Feature, Provider, get_provider
from cloudllm.records import EndpointRecord, endpoint_lock, list_records, load_record, remove_record, save_record
from cloudllm.spec import DeploySpec, check_endpoint_name, spec_from_kwargs


@dataclass
class DeployResult:
    endpoint: Endpoint | None
    action: str  # create | update | unchanged
    reasons: list[str]
    plan: Any  # cloudllm.plan.Plan
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {
            "name": self.plan.spec.name,
            "provider": self.plan.spec.provider,
            "action": self.action,
            "reasons": self.reasons,
            "dry_run": self.dry_run,
            "digest": self.plan.digest,
            "endpoint": self.endpoint.model_dump(mode="json") if self.endpoint else None,
            "plan": self.plan.report().model_dump(mode="json"),
        }


def inspect(model: str | Path, *, task: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False):
    """Read a model folder's config and safetensors headers (no weights loaded)."""
    from cloudllm.model_source import inspect_model

    return inspect_model(model, task=task, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def package(model: str | Path, out: str | Path, *, overwrite: bool = False, **spec_kwargs: Any):
    """Build the artifact (weights + code/ + cloudllm.json) in `out` without deploying. Returns the Bundle."""
    from cloudllm.bundle import build_bundle
    from cloudllm.plan import serving_settings
    from cloudllm.quantize import prepare_model

    spec = spec_from_kwargs(model, **spec_kwargs)
    info = inspect(model, task=spec.task, allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code)
    runtime = spec.runtime or "handler"
    info = prepare_model(spec, info, runtime)  # --quantize int8/int4: package the quantized weights
    bundle = build_bundle(info, serving_settings(spec, info), build={"runtime": runtime})
    bundle.write(out, overwrite=overwrite)
    return bundle


def plan(model: str | Path | None = None, *, spec: DeploySpec | None = None, check_account: bool = False, **spec_kwargs: Any):
    """What deploy would do, creating nothing.

    Needs no cloud account unless check_account: then it also runs the checks deploy makes
    against the account (credentials, role, bucket, project), as `deploy --dry-run` does.
    """
    from cloudllm.plan import make_plan

    spec = spec or spec_from_kwargs(model, **spec_kwargs)
    return make_plan(spec, _provider_for_spec(spec), mode="check" if check_account else "plan")


def deploy(
    model: str | Path | None = None,
    *,
    spec: DeploySpec | None = None,
    wait: bool = True,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    **spec_kwargs: Any,
) -> DeployResult:
    """Create or update an endpoint so it serves `model`; an unchanged deploy does nothing."""
    from cloudllm.plan import make_plan, refuse_unless_fits

    spec = spec or spec_from_kwargs(model, **spec_kwargs)
    reporter = reporter or Reporter()
    if spec.image == "build":  # build and push the serving image first (cloudllm/images/deploy.py)
        from cloudllm.images.deploy import with_built_image

        spec = with_built_image(spec, reporter, dry_run=dry_run)
    provider = _provider_for_spec(spec)
    with endpoint_lock(spec.name), _interrupt_advice(interrupted_advice(spec.name)):
        spec = _with_added_adapters(spec, reporter)
        the_plan = make_plan(spec, provider, reporter, mode="check" if dry_run else "deploy")
        the_plan.wait = wait
        if dry_run or the_plan.action == "unchanged":
            if not dry_run and the_plan.existing is not None and load_record(spec.name) is None:
                _save(spec, provider, the_plan.existing)  # a run killed before it saved the record
            return DeployResult(the_plan.existing, the_plan.action, the_plan.reasons, the_plan, dry_run=dry_run)
        reporter.step(f"plan: {the_plan.headline()}")
        refuse_unless_fits(the_plan)
        if the_plan.action == "create":
            intent = load_record(spec.name) is None
            if intent:  # before anything exists: a kill from here on leaves a record `delete` and `deploy` act on
                _save(spec, provider, None)
            try:
                endpoint = provider.deploy(the_plan, reporter)
            except Exception:
                # A failed deploy cleaned up what it created; one that left an endpoint (a --timeout passed) keeps
                # the record `delete` needs, as does an interrupted one (Ctrl-C, SIGTERM: not an Exception).
                if intent and not _still_there(provider, spec.name):
                    remove_record(spec.name)
                raise
        else:
            endpoint = provider.update(the_plan, the_plan.existing, reporter)
        _save(spec, provider, endpoint)
        return DeployResult(endpoint, the_plan.action, the_plan.reasons, the_plan)


def apply(
    file: str | Path = "cloudllm.yaml",
    *,
    dry_run: bool = False,
    prune: bool = False,
    wait: bool = True,
    reporter: Reporter | None = None,
):
    """Make the endpoints of a cloudllm.yaml exist as declared; returns cloudllm.apply.ApplyResult (see docs/cli.md)."""
    from cloudllm.apply import Verbs, apply_file

    return apply_file(file, Verbs(plan=plan, deploy=deploy), dry_run=dry_run, prune=prune, wait=wait, reporter=reporter)


def invoke(
    name: str,
    inputs: str | None = None,
    *,
    parameters: dict | None = None,
    json_body: str | dict | None = None,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
    timeout: float | None = None,
    full_response: bool = False,
    adapter: str | None = None,
    model: str | None = None,
    wake_timeout: float | None = None,
    reporter: Reporter | None = None,
) -> Any:
    """Send one request; returns the generated text, as the CLI prints it (the decoded JSON response
    for tasks without text, or with full_response). timeout: seconds to wait for the answer.

    adapter: the LoRA adapter to answer with (parameters.adapter_id); model: which of the endpoint's
    models (None: its first); wake_timeout: seconds to wait for an endpoint scaled to zero to wake."""
    from cloudllm.http import read_timeout
    from cloudllm.invocation import build_body, response_text, with_adapter

    body = with_adapter(build_body(inputs, parameters, json_body), adapter)
    target = _serving_adapters(_provider_for_name(name, provider, region, options), adapter)
    with read_timeout(timeout):
        result = _send(target.invoke, name, body, model=model, wake_timeout=wake_timeout, reporter=reporter)
    text = None if full_response else response_text(result)
    return result if text is None else text


def invoke_stream(
    name: str,
    inputs: str | None = None,
    *,
    parameters: dict | None = None,
    json_body: str | dict | None = None,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
    timeout: float | None = None,
    adapter: str | None = None,
    model: str | None = None,
    wake_timeout: float | None = None,
    reporter: Reporter | None = None,
) -> Iterator[str]:
    """Yield generated text pieces as the endpoint produces them (timeout: seconds between pieces; the rest as invoke's)."""
    from cloudllm.http import read_timeout
    from cloudllm.invocation import build_body, with_adapter

    body = with_adapter(build_body(inputs, parameters, json_body), adapter)
    body["stream"] = True
    target = _serving_adapters(_provider_for_name(name, provider, region, options), adapter)

    def pieces() -> Iterator[str]:
        with read_timeout(timeout):
            yield from _send(target.invoke_stream, name, body, model=model, wake_timeout=wake_timeout, reporter=reporter, stream=True)

    return pieces()


def invoke_grpc(
    name: str,
    inputs: str,
    *,
    parameters: dict | None = None,
    stream: bool = False,
    adapter: str | None = None,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Generated text over the endpoint's gRPC port (Open Inference Protocol v2): whole, or pieces with stream.
    adapter picks a LoRA adapter (the request parameter `adapter_id`, as the REST routes take it)."""
    from cloudllm.adapters import check_adapter_name
    from cloudllm.invocation import grpc_generate
    from cloudllm.providers.base import Feature

    if inputs is None:
        raise UserError("nothing to send", "give a prompt: cloudllm invoke NAME \"text\" --grpc")
    if adapter is not None:
        parameters = {**(parameters or {}), "adapter_id": check_adapter_name(adapter)}
    holder = _provider_for_name(name, provider, region, options)
    holder.require({Feature.GRPC})
    if hasattr(holder, "invoke_grpc"):  # a platform that forwards gRPC itself (Vertex AI's directRawPredict)
        return holder.invoke_grpc(name, inputs, parameters, stream=stream)
    endpoint = holder.get(name)
    port = (endpoint.details if endpoint else {}).get("grpc_port")
    if not port:
        raise UserError(f"endpoint {name} has no gRPC port (it was started before cloudllm served gRPC)", f"redeploy it: cloudllm deploy ... --name {name}")
    return grpc_generate(name, f"127.0.0.1:{port}", inputs, parameters, stream=stream)


def chat(
    name: str,
    prompt: str | list[dict],
    *,
    system: str | None = None,
    parameters: dict | None = None,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
    adapter: str | None = None,
    model: str | None = None,
    wake_timeout: float | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """One chat turn: prompt is the user's text or a whole history of OpenAI messages; returns OpenAI's chat completion.

    Parameters take invoke's (TGI) names; the answer is greedy unless they ask for sampling. adapter,
    model and wake_timeout as invoke's (the adapter rides as OpenAI's "model").
    """
    from cloudllm.invocation import chat_completion

    holder, body = _chat_request(name, prompt, system, parameters, provider, region, options, stream=False, adapter=adapter)
    return chat_completion(_send(holder.invoke, name, body, model=model, wake_timeout=wake_timeout, reporter=reporter))


def chat_stream(
    name: str,
    prompt: str | list[dict],
    *,
    system: str | None = None,
    parameters: dict | None = None,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
    adapter: str | None = None,
    model: str | None = None,
    wake_timeout: float | None = None,
    reporter: Reporter | None = None,
) -> Iterator[str]:
    """One chat turn, streamed: the reply's text pieces as the endpoint produces them."""
    holder, body = _chat_request(name, prompt, system, parameters, provider, region, options, stream=True, adapter=adapter)
    return _send(holder.invoke_stream, name, body, model=model, wake_timeout=wake_timeout, reporter=reporter, stream=True)


def _send(call, name: str, body: dict, *, model: str | None, wake_timeout: float | None, reporter: Reporter | None = None, stream: bool = False) -> Any:
    """One provider invoke (or invoke_stream, with stream): to the endpoint's model `model` when one is named.

    wake_timeout: how long to wait through cloudllm.types.Waking (an endpoint scaled to zero; cloudllm/wake.py),
    with a progress line on the reporter.
    """
    from cloudllm.wake import stream_through_wake, through_wake

    # Plugins written before several models per endpoint take no `model` keyword: pass it only when asked.
    def once() -> Any:
        return call(name, body, **({"model": model} if model is not None else {}))

    waiting = stream_through_wake if stream else through_wake
    return waiting(once, name=name, wake_timeout=wake_timeout, reporter=reporter)


def _serving_adapters(target: Provider, adapter: str | None) -> Provider:
    """target, once it is known to serve adapters when one is asked for (else its reason, in one line)."""
    if adapter is not None:
        target.require({Feature.ADAPTERS})
    return target


def _chat_request(name, prompt, system, parameters, provider, region, options, *, stream: bool, adapter: str | None = None) -> tuple[Provider, dict]:
    """The endpoint's provider and the chat body in the form its platform and runtime take."""
    from cloudllm.adapters import check_adapter_name
    from cloudllm.invocation import chat_body, chat_messages, platform_chat_body

    holder = _serving_adapters(_provider_for_name(name, provider, region, options), adapter)
    body = chat_body(chat_messages(prompt, system), parameters, stream=stream)
    if adapter is not None:  # OpenAI's "model" names the adapter (TGI, vLLM and our server read it so)
        body["model"] = check_adapter_name(adapter)
    return holder, platform_chat_body(holder.name, _runtime_for_chat(holder, name), body)


def _runtime_for_chat(holder: Provider, name: str) -> str | None:
    """Vertex AI's chat body depends on the engine behind the endpoint; elsewhere the body is the same."""
    if holder.name != "vertex":
        return None
    endpoint = holder.get(name)
    return endpoint.runtime if endpoint else None


# --- adapters on a live endpoint -------------------------------------------------------------
def add_adapter(
    name: str,
    adapter: str,
    path: str | Path,
    *,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Add LoRA adapter `adapter` (a PEFT folder at `path`) to endpoint NAME, or replace the one of that
    name, without redeploying the base. The endpoint's record keeps it, so a later deploy keeps it too."""
    from cloudllm.adapters import check_adapter_against_base, inspect_adapter

    reporter = reporter or Reporter()
    target = _provider_for_name(name, provider, region, options)
    target.require({Feature.ADAPTERS})
    info = inspect_adapter(adapter, path)
    record = load_record(name)
    if record and Path(record.model).is_dir():
        for warning in check_adapter_against_base(info, inspect(record.model)):
            reporter.step(f"warning: {warning}")
    else:
        reporter.step(f"adapter {adapter} not checked against the base: this machine has no copy of endpoint {name}'s model folder")
    with endpoint_lock(name), _interrupt_advice(f"run `cloudllm adapters add {name} {adapter} ...` again"):
        target.add_adapter(name, info, reporter)
        record = load_record(name)
        if record is not None:
            record.adapters[adapter] = info.path
            save_record(record)
    return next((a for a in target.list_adapters(name) if a.get("name") == adapter), {"name": adapter})


def remove_adapter(
    name: str,
    adapter: str,
    *,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
) -> None:
    """Remove adapter `adapter` from endpoint NAME (the base keeps serving). A deploy that names it adds it back."""
    from cloudllm.adapters import check_adapter_name

    check_adapter_name(adapter)
    target = _provider_for_name(name, provider, region, options)
    with endpoint_lock(name), _interrupt_advice(f"run `cloudllm adapters remove {name} {adapter}` again"):
        target.remove_adapter(name, adapter, reporter or Reporter())
        record = load_record(name)
        if record is not None and adapter in record.adapters:
            del record.adapters[adapter]
            save_record(record)


def list_adapters(name: str, *, provider: str | None = None, region: str | None = None, options: dict[str, Any] | None = None) -> list[dict]:
    """The adapters endpoint NAME serves: [{"name", "rank", "digest", "status"}]."""
    return _provider_for_name(name, provider, region, options).list_adapters(name)


def _with_added_adapters(spec: DeploySpec, reporter: Reporter) -> DeploySpec:
    """spec plus the adapters `cloudllm adapters add` put on the endpoint since (a deploy that does not
    name them keeps them; `cloudllm adapters remove` is how one goes)."""
    if spec.add_model:  # the adapters added live are the first model's, not the added one's
        return spec
    record = load_record(spec.name)
    kept = {n: p for n, p in (record.adapters if record and record.provider == spec.provider else {}).items() if n not in spec.adapters}
    for adapter, path in sorted(kept.items()):
        reporter.step(f"keeping adapter {adapter} ({path}): added with `cloudllm adapters add`; `cloudllm adapters remove {spec.name} {adapter}` drops it")
    return spec.model_copy(update={"adapters": {**kept, **spec.adapters}}) if kept else spec


def status(name: str, *, provider: str | None = None, region: str | None = None, options: dict[str, Any] | None = None) -> Endpoint:
    endpoint = _provider_for_name(name, provider, region, options).get(name)
    if endpoint is None:
        raise UserError(f"endpoint {name!r} does not exist", "see `cloudllm list`")
    return endpoint


def list_endpoints(*, provider: str | None = None, region: str | None = None, options: dict[str, Any] | None = None) -> list[Endpoint]:
    """Endpoints of one provider, or of every provider this machine has deployed to."""
    if provider:
        return get_provider(provider, region=region, options=options).list()
    endpoints = []
    for record in list_records():
        try:
            found = _provider_from_record(record).get(record.name)
        except UserError as exc:  # no credentials, an emulator not running: say so, never "Missing"
            found = Endpoint(name=record.name, provider=record.provider, state="Unknown", model=record.model,
                             url=record.url, failure_reason=exc.line())  # fmt: skip
        if found is None and record.pending:
            found = Endpoint(name=record.name, provider=record.provider, state="Incomplete", model=record.model,
                             failure_reason=f"a deploy was interrupted; run it again, or `cloudllm delete {record.name}`")  # fmt: skip
        endpoints.append(found or Endpoint(name=record.name, provider=record.provider, state="Missing", model=record.model,
                                           failure_reason="gone from the provider; `cloudllm delete` drops this record"))  # fmt: skip
    return endpoints


def delete(
    name: str,
    *,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
    purge_artifacts: bool = False,
    model: str | None = None,
    reporter: Reporter | None = None,
) -> None:
    """Remove the endpoint and everything deploy created for it (artifacts too with purge_artifacts);
    with model, only that model added with --add-model (the endpoint and its other models stay)."""
    check_endpoint_name(name)
    target = _provider_for_name(name, provider, region, options)
    reporter = reporter or Reporter()
    if model is not None:
        with endpoint_lock(name), _interrupt_advice(f"run `cloudllm delete {name} --model {model}` again to finish"):
            target.remove_model(name, model, reporter)
        return
    with endpoint_lock(name), _interrupt_advice(f"run `cloudllm delete {name}` again to finish"):
        try:
            target.delete(name, purge_artifacts=purge_artifacts, reporter=reporter)
        except UserError:
            # Removed elsewhere (the console, another machine): this machine's record is all that is left.
            record = load_record(name)
            if record is None or record.provider != target.name or target.get(name) is not None:
                raise
            reporter.step(f"endpoint {name} was already gone from {target.name}; removed this machine's record of it")
        remove_record(name)


def logs(
    name: str,
    *,
    follow: bool = False,
    since: float | None = None,
    provider: str | None = None,
    region: str | None = None,
    options: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Endpoint NAME's model server log lines, from `since` (Unix time) on; with follow, keep waiting for more."""
    return _provider_for_name(name, provider, region, options).logs(name, follow=follow, since=since)


def serve(artifact: str | Path, *, port: int | None = None, host: str = "0.0.0.0", log_payloads: bool = False) -> None:
    """Run an artifact's model server in the foreground, exactly as its container does (never returns).

    Without a port, the server takes the container's: $AIP_HTTP_PORT, else $SAGEMAKER_BIND_TO_PORT, else 8080.
    """
    import sys

    from cloudllm.bundle import read_manifest

    artifact = Path(artifact).expanduser().resolve()
    if not artifact.is_dir():
        raise UserError(f"artifact folder {artifact} does not exist", "build one with `cloudllm package MODEL -o DIR`")
    read_manifest(artifact)
    entry = artifact / "code" / "serve.py"
    if not entry.is_file():
        raise UserError(f"{artifact} has no code/serve.py", "rebuild the artifact with `cloudllm package`")
    argv = [sys.executable, str(entry), "serve", "--host", host] + ([] if port is None else ["--port", str(port)])
    os.execv(sys.executable, argv + (["--log-payloads"] if log_payloads else []))


# --- finding providers -------------------------------------------------------------------
def _provider_for_spec(spec: DeploySpec) -> Provider:
    return get_provider(spec.provider, region=spec.region, options=spec.options)


def _provider_from_record(record: EndpointRecord) -> Provider:
    return get_provider(record.provider, region=record.region, options=record.options)


def _provider_for_name(name: str, provider: str | None, region: str | None, options: dict[str, Any] | None = None) -> Provider:
    """The provider holding NAME: from this machine's record, with what the caller passed
    (region, profile, project) taking precedence; else the one the caller names."""
    check_endpoint_name(name)
    record = load_record(name)
    if record and (provider is None or provider == record.provider):
        return get_provider(record.provider, region=region or record.region, options={**record.options, **(options or {})})
    if provider:
        return get_provider(provider, region=region, options=options)
    raise UserError(
        f"no endpoint named {name!r} on this machine",
        "see `cloudllm list`, or pass --provider to reach an endpoint deployed from elsewhere",
    )


def _save(spec: DeploySpec, provider: Provider, endpoint: Endpoint | None) -> None:
    """Record the endpoint; with no endpoint yet, the intent to create it (pending)."""
    previous = load_record(spec.name)
    first_model = previous.model if spec.add_model and previous else None  # an added model is not the endpoint's model
    record = EndpointRecord(
        name=spec.name,
        provider=spec.provider,
        model=first_model or str(Path(spec.model).expanduser().resolve()),
        region=provider.region,
        url=endpoint.url if endpoint else None,
        digest=endpoint.digest if endpoint else None,
        options=provider.options,
        pending=endpoint is None,
    )
    if previous:
        record.created_at = previous.created_at
        # Still live-added: those the deploy kept as they were (one the spec names with another folder is now the spec's).
        record.adapters = {n: p for n, p in previous.adapters.items() if spec.add_model or spec.adapters.get(n) == p}
    save_record(record)


def _still_there(provider: Provider, name: str) -> bool:
    try:
        return provider.get(name) is not None
    except UserError:
        return False


@contextmanager
def _interrupt_advice(advice: str) -> Iterator[None]:
    """Ctrl-C becomes Interrupted, which carries what to do next (the CLI prints it)."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(advice) from None
