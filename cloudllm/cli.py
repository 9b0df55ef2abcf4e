"""The `cloudllm` command: parse flags, call one function of cloudllm.api, render the result.

Heavy modules load inside the commands that need them, so `cloudllm --help` and
`cloudllm invoke` start fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from cloudllm import __version__
from cloudllm.errors import EXIT_BAD_INPUT, EXIT_FAILED, UserError
from cloudllm.interrupts import sigterm_interrupts

EPILOG_EXIT_CODES = "Exit codes: 0 ok or nothing to change, 1 failed, 2 bad input, 3 plan refused."


# Flags and output helpers shared with the command modules live one layer down, in cloudllm/commands/flags.py.
from cloudllm.commands.flags import (  # noqa: E402
    deploy_flags as _deploy_flags,
    kv_pairs as _kv_pairs,
    model_flags as _model_flags,
    print_json as _print_json,
    reporter as _reporter,
    spec_kwargs as _spec_kwargs,
    target_flags as _target_flags,
    where_flags as _where_flags,
)


# --- the group -------------------------------------------------------------------------------
@click.group(
    epilog=EPILOG_EXIT_CODES,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="cloudllm")
def cli() -> None:
    """Deploy a Hugging Face model folder to SageMaker, Vertex AI or this machine, and call it.

    \b
    Quick start (no cloud account needed):
      cloudllm deploy ./my-model --provider local --name demo
      cloudllm invoke demo "Once upon a time"
      cloudllm delete demo
    """


@cli.command("inspect")
@click.argument("model", type=click.Path())
@click.option("--task", help="Override the task inferred from config.json.")
@click.option("--allow-pickle", is_flag=True, help="Accept *.bin/*.pt pickle weights.")
@click.option("--trust-remote-code", is_flag=True, help="Accept models that need their own code.")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def inspect_cmd(model: str, task: str | None, allow_pickle: bool, trust_remote_code: bool, json_output: bool) -> None:
    """Show a model's architecture, task, parameters, dtype and size, without loading it.

    \b
    Example:
      cloudllm inspect ./my-model
    """
    from cloudllm import api
    from cloudllm.console import human_bytes

    info = api.inspect(model, task=task, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if json_output:
        _print_json({"path": info.path, **info.summary(), "files": [f.name for f in info.files], "skipped": info.skipped})
        return
    params = f"{info.parameters / 1e6:,.1f}M" if info.parameters is not None else "unknown (pickle weights)"
    for label, value in (
        ("model", info.path),
        ("architecture", info.architecture),
        ("task", info.task),
        ("parameters", params),
        ("dtype", info.dtype),
        ("weights", f"{human_bytes(info.weight_bytes)} in {len(info.weight_files)} file(s)"),
        ("total", human_bytes(info.total_bytes)),
        ("quantization", info.quantization or "none"),
    ):
        click.echo(f"{label:>13}: {value}")
    for note in info.skipped:
        click.echo(f"{'not shipped':>13}: {note}")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Folder to write the artifact to.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@_model_flags
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def package(model: str, out: str, overwrite: bool, json_output: bool, **kw: Any) -> None:
    """Build the deployable artifact (weights + code/ + cloudllm.json) without deploying.

    \b
    Example:
      cloudllm package ./my-model -o ./artifact
      cloudllm serve ./artifact --port 8080
    """
    from cloudllm import api
    from cloudllm.console import human_bytes

    bundle = api.package(model, out, overwrite=overwrite, **_spec_kwargs(kw))
    if json_output:
        _print_json({"output": str(out), "digest": bundle.digest, "files": len(bundle.files), "bytes": bundle.total_bytes})
    else:
        click.echo(f"artifact written to {out}: {len(bundle.files)} files, {human_bytes(bundle.total_bytes)}, digest {bundle.digest[:12]}")


@cli.command()
@click.argument("model", type=click.Path())
@_deploy_flags
@_model_flags
@click.option("--no-wait", is_flag=True, help="Return once the platform accepted the deploy (a local update still waits for health before it switches).")
@click.option("--dry-run", is_flag=True, help="Print the plan; create nothing.")
@click.option("--force", is_flag=True, help="Deploy even when the plan says it will not fit (also takes over a Vertex endpoint lock a killed deploy left).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output on stdout.")
def deploy(model: str, no_wait: bool, dry_run: bool, force: bool, json_output: bool, **kw: Any) -> None:
    """Create or update an endpoint serving MODEL (a folder with config.json and *.safetensors).

    Deploying to a name that exists updates it; an unchanged deploy does nothing and says so.

    \b
    Examples:
      cloudllm deploy ./my-model --provider local --name demo
      cloudllm deploy ./my-model --provider sagemaker --instance ml.g5.xlarge \\
          --bucket s3://my-bucket/models --role arn:aws:iam::123456789012:role/SageMakerExec
      cloudllm deploy ./my-model --provider vertex --instance g2-standard-8 \\
          --bucket gs://my-bucket/models --project my-proj --region us-central1
    """
    from cloudllm import api
    from cloudllm.plan import refuse_unless_fits

    spec_kwargs = _spec_kwargs(kw)
    if force:
        spec_kwargs.setdefault("options", {})["force"] = True
    result = api.deploy(model, wait=not no_wait, dry_run=dry_run, reporter=_reporter(json_output), **spec_kwargs)
    if json_output:
        _print_json(result.to_dict())
        if result.dry_run:
            refuse_unless_fits(result.plan)
        return
    name = result.plan.spec.name
    if result.dry_run:
        click.echo(f"dry run: would {result.action} endpoint {name} ({'; '.join(result.reasons)})")
        for line in result.plan.describe():
            click.echo(line)
        refuse_unless_fits(result.plan)
    elif result.action == "unchanged":
        click.echo(f"endpoint {name} is unchanged: nothing to deploy")
    else:
        ep = result.endpoint
        verb = "created" if result.action == "create" else "updated"
        where = f" at {ep.url}" if ep and ep.url else ""
        click.echo(f"endpoint {name} {verb}: {ep.state if ep else 'unknown'}{where}")


@cli.command()
@click.argument("name")
@click.argument("prompt", required=False)
@click.option("--body", "json_body", metavar="JSON", help='Raw request body, e.g. \'{"inputs": "Hi", "parameters": {...}}\'.')
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--max-new-tokens", type=int, help="Generation length for this request.")
@click.option("--param", "params", multiple=True, help="KEY=VALUE generation parameter (value parsed as JSON).")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=3600), help="Seconds to wait for the answer (default 300; a frozen server fails then).")
@click.option("--raw", is_flag=True, help="Print the endpoint's JSON response as is.")
@click.option("--json", "json_output", is_flag=True, help='Machine-readable output: {"name", "text", "response"}.')
@click.option("--chat", "chat_text", metavar="TEXT", help="Send TEXT as a chat message (OpenAI's format, rendered with the model's chat template).")
@click.option("--system", help="With --chat: a system message before it.")
@click.option("--grpc", "use_grpc", is_flag=True, help="Send PROMPT over the endpoint's gRPC port (Open Inference Protocol v2).")
@_target_flags
@_where_flags
def invoke(name: str, prompt: str | None, json_body: str | None, stream: bool, max_new_tokens: int | None, params: tuple[str, ...],
           timeout: float | None, raw: bool, json_output: bool, chat_text: str | None, system: str | None, use_grpc: bool, where: dict,
           target: dict) -> None:  # fmt: skip
    """Send PROMPT (or a --body request) to endpoint NAME and print the answer.

    \b
    Examples:
      cloudllm invoke demo "Once upon a time"
      cloudllm invoke demo "Once upon a time" --stream
      cloudllm invoke demo --body '{"inputs": "Hi", "parameters": {"max_new_tokens": 20}}'
      cloudllm invoke demo "Hi" --json | jq -r .text
      cloudllm invoke demo --chat "Summarise this contract" --system "Be brief." --stream
      cloudllm invoke demo "Once upon a time" --grpc
      cloudllm invoke shared "Summarise this contract" --adapter legal
    """
    from cloudllm.invocation import parse_param, response_text

    if timeout is not None and timeout != timeout:  # NaN slips past every range check
        raise click.BadParameter("nan is not a number of seconds", param_hint="'--timeout'")
    if json_output and json_body is None and prompt and prompt.lstrip().startswith("{"):
        # `--json BODY` before --body existed: BODY arrives as the prompt. Still works, once more.
        click.echo("warning: `invoke --json BODY` is deprecated: use --body BODY (--json now means JSON output)", err=True)
        json_body, prompt, json_output = prompt, None, False
    parameters: dict[str, Any] = {key: parse_param(key, value) for key, value in _kv_pairs(params, "--param").items()}
    if max_new_tokens is not None:
        parameters["max_new_tokens"] = max_new_tokens
    if chat_text is not None or system is not None or use_grpc:
        _invoke_other_protocol(name, prompt, json_body, chat_text, system, use_grpc, stream, raw, parameters, where, target)
        return
    if stream:
        from cloudllm import api
        from cloudllm.commands.streaming import pieces_interruptibly

        pieces = []
        stream_pieces = api.invoke_stream(name, prompt, parameters=parameters or None, json_body=json_body, timeout=timeout, **target, **where)
        for piece in pieces_interruptibly(stream_pieces):
            pieces.append(piece)
            if not json_output:
                click.echo(piece, nl=False)
                sys.stdout.flush()
        if json_output:
            _print_json({"name": name, "text": "".join(pieces), "response": None})
        else:
            click.echo()
        return
    from cloudllm.invocation import build_body
    from cloudllm.quick_invoke import local_answer

    # A plain invoke of a local endpoint skips the API's imports; adapters, models and the wake go the full way.
    plain = target.get("adapter") is None and target.get("model") is None
    result = local_answer(name, build_body(prompt, parameters or None, json_body), timeout, where) if plain else None
    if result is None:  # not a plain local invoke: the full path (it also reports what is wrong)
        from cloudllm import api

        result = api.invoke(name, prompt, parameters=parameters or None, json_body=json_body, timeout=timeout, full_response=True, **target, **where)
    text = response_text(result)
    if json_output:
        _print_json({"name": name, "text": text, "response": result})
        return
    if raw or text is None:
        text = json.dumps(result, indent=2, ensure_ascii=False)
    click.echo(text)


_UNSURE_STATES = ("Unknown", "Incomplete", "Missing", "NotResponding")


def _invoke_other_protocol(name: str, prompt: str | None, json_body: str | None, chat_text: str | None, system: str | None,
                           use_grpc: bool, stream: bool, raw: bool, parameters: dict, where: dict, target: dict) -> None:  # fmt: skip
    """invoke --chat/--system (OpenAI's chat format) or --grpc."""
    from cloudllm import api
    from cloudllm.invocation import openai_choice_text

    if json_body is not None:
        raise UserError("--body cannot go with --chat, --system or --grpc", "send the body alone with --body, or a prompt with the flag")
    if use_grpc:
        if chat_text is not None or system is not None:
            raise UserError("--grpc sends a plain prompt; it cannot go with --chat or --system", "drop --grpc to chat")
        if target["model"]:
            raise UserError("--grpc cannot pick a model", "drop --grpc to use --model")
        pieces = api.invoke_grpc(name, prompt, parameters=parameters or None, stream=stream, adapter=target["adapter"], **where)
    else:
        if chat_text is None:
            raise UserError("--system goes with --chat", "add --chat \"your message\"")
        if prompt is not None:
            raise UserError("give the message either as PROMPT or as --chat, not both", "use --chat \"your message\"")
        if not stream:
            result = api.chat(name, chat_text, system=system, parameters=parameters or None, **target, **where)
            choices = result.get("choices") if isinstance(result, dict) else None
            text = None if raw or not choices else openai_choice_text(choices[0])
            click.echo(text if text is not None else json.dumps(result, indent=2, ensure_ascii=False))
            return
        pieces = api.chat_stream(name, chat_text, system=system, parameters=parameters or None, **target, **where)
    from cloudllm.commands.streaming import pieces_interruptibly

    for piece in pieces_interruptibly(pieces):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


@cli.command("list")
@click.option("--provider", help="List a provider's endpoints (default: those deployed from this machine).")
@click.option("--region", help="Region to list.")
@click.option("--profile", help="AWS profile (SageMaker).")
@click.option("--project", help="Google Cloud project (Vertex AI).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def list_cmd(provider: str | None, region: str | None, profile: str | None, project: str | None, json_output: bool) -> None:
    """List endpoints with their provider, state, model and URL.

    \b
    Examples:
      cloudllm list
      cloudllm list --provider sagemaker --json
    """
    from cloudllm import api

    options = {k: v for k, v in (("profile", profile), ("project", project)) if v}
    endpoints = api.list_endpoints(provider=provider, region=region, options=options or None)
    if json_output:
        _print_json([ep.model_dump(mode="json") for ep in endpoints])
        return
    if not endpoints:
        click.echo("no endpoints")
        return
    rows = [("NAME", "PROVIDER", "STATE", "MODEL", "URL")]
    rows += [(ep.name, ep.provider, ep.state, ep.model or "-", ep.url or "-") for ep in endpoints]
    if any(ep.state in _UNSURE_STATES and ep.failure_reason for ep in endpoints):  # why a state is not a plain answer
        rows = [row + (reason,) for row, reason in zip(rows, ["WHY"] + [
            ep.failure_reason if ep.state in _UNSURE_STATES and ep.failure_reason else "" for ep in endpoints])]  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


@cli.command()
@click.argument("name")
@_where_flags
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def status(name: str, where: dict, json_output: bool) -> None:
    """Show one endpoint's state, URL and details.

    \b
    Example:
      cloudllm status demo
    """
    from cloudllm import api

    from cloudllm.routes import protocol_routes, route_lines

    ep = api.status(name, **where)
    if json_output:
        _print_json({**ep.model_dump(mode="json"), "routes": protocol_routes(ep)})
        return
    for label, value in (
        ("name", ep.name), ("provider", ep.provider), ("state", ep.state), ("model", ep.model),
        ("url", ep.url), ("instance", ep.instance), ("runtime", ep.runtime), ("failure", ep.failure_reason),
    ):  # fmt: skip
        if value:
            click.echo(f"{label:>9}: {value}")
    for key, value in sorted(ep.details.items()):
        if key.endswith("_digest"):
            continue
        if isinstance(value, dict):  # e.g. the added models: a line each, not a Python dict
            click.echo(f"{key:>9}:" + ("" if value else " none"))
            for name, entry in value.items():
                shown = " ".join(f"{k}={v}" for k, v in entry.items() if v not in (None, "")) if isinstance(entry, dict) else entry
                click.echo(f"{'':>11}{name}: {shown}")
        else:
            click.echo(f"{key:>9}: {value}")
    click.echo("   routes:")
    for line in route_lines(protocol_routes(ep)):
        click.echo(f"  {line}")


@cli.command()
@click.argument("name")
@click.option("--purge-artifacts", is_flag=True, help="Also delete the uploaded artifacts.")
@click.option("--bucket", help="With --purge-artifacts: where deploy uploaded them, when the endpoint that said so is gone.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask before deleting a cloud endpoint (never asked off a terminal or in CI).")
@click.option("--model", "model", metavar="MODEL", help="Remove only MODEL, a model added with --add-model; the endpoint and its other models keep serving.")
@_where_flags
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def delete(name: str, purge_artifacts: bool, bucket: str | None, yes: bool, model: str | None, where: dict, json_output: bool) -> None:
    """Delete endpoint NAME and everything deploy created for it (with --model, only that added model).

    On a terminal, deleting a cloud endpoint asks first (--yes skips the question).

    \b
    Examples:
      cloudllm delete demo
      cloudllm delete shared --model embed
      cloudllm delete chat --provider sagemaker --purge-artifacts --bucket s3://my-bucket/models --yes
    """
    import os

    from cloudllm import api
    from cloudllm.records import load_record
    from cloudllm.spec import check_endpoint_name

    if model is not None and purge_artifacts:
        raise click.UsageError("--model removes one model and keeps the endpoint's artifacts; drop --purge-artifacts")
    if bucket:
        if not purge_artifacts:
            raise click.UsageError("--bucket goes with --purge-artifacts")
        where["options"] = {**(where["options"] or {}), "bucket": bucket.rstrip("/")}
    record = load_record(check_endpoint_name(name))
    provider = where["provider"] or (record.provider if record else None)
    if provider and provider != "local" and not yes and sys.stdin.isatty() and not os.environ.get("CI"):
        also = " and its uploaded artifacts" if purge_artifacts else ""
        what = f"model {model} of {provider} endpoint {name}" if model else f"{provider} endpoint {name}{also}"
        if not click.confirm(f"delete {what}? This cannot be undone", default=False, err=True):
            raise UserError(f"endpoint {name} not deleted", "answer y to delete it, or pass --yes")

    api.delete(name, purge_artifacts=purge_artifacts, model=model, reporter=_reporter(json_output), **where)
    if json_output:
        _print_json({"name": name, "deleted": True, **({"model": model} if model else {})})
    else:
        click.echo(f"model {model} of endpoint {name} deleted" if model else f"endpoint {name} deleted")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--port", type=int, default=None, help="Port to listen on [default: $AIP_HTTP_PORT, else $SAGEMAKER_BIND_TO_PORT, else 8080].")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to bind.")
@click.option("--log-payloads", is_flag=True, help="Log prompt text in the request log (off by default: prompts can hold secrets).")
@click.option("--container", is_flag=True, help="Run it in the serving image under a platform's contract (podman or docker).")
@click.option("--contract", type=click.Choice(["sagemaker", "vertex"]), default="sagemaker", show_default=True, help="With --container: `IMAGE serve` with /opt/ml/model, or AIP_* variables (ARTIFACT may then be gs://).")
@click.option("--image", help="With --container: the image to run (default: the last `cloudllm build`).")
def serve(artifact: str, port: int | None, host: str, log_payloads: bool, container: bool, contract: str, image: str | None) -> None:
    """Run an artifact's model server in the foreground, as its container does.

    \b
    Example:
      cloudllm package ./my-model -o ./artifact && cloudllm serve ./artifact --port 8080
      cloudllm serve ./artifact --container                  # in the image, as SageMaker runs it
    """
    if container:
        from cloudllm.images.contract import serve_container

        import os

        default = os.environ.get("AIP_HTTP_PORT") or os.environ.get("SAGEMAKER_BIND_TO_PORT") or "8080"  # as the entrypoint reads them
        serve_container(artifact, contract=contract, image=image, port=port if port is not None else int(default))
        return
    from cloudllm import api

    api.serve(artifact, port=port, host=host, log_payloads=log_payloads)


@cli.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--since", help="Only lines from this long ago (30s, 10m, 2h, 1d) or since this UTC time (2026-01-31T12:00:00).")
@_where_flags
@click.option("--json", "json_output", is_flag=True, help='JSON Lines: {"name", "line", "record"} per line.')
def logs(name: str, follow: bool, since: str | None, where: dict, json_output: bool) -> None:
    """Print the model server's log of endpoint NAME.

    local: the server's log file; sagemaker: the endpoint's CloudWatch log group;
    vertex: the Cloud Logging filter, console link and gcloud command for it.

    \b
    Examples:
      cloudllm logs demo --follow
      cloudllm logs demo --since 10m
      cloudllm logs demo --json | jq 'select(.record.status >= 500)'
    """
    from cloudllm import api
    from cloudllm.logtime import parse_since

    since_time = parse_since(since) if since is not None else None
    for line in api.logs(name, follow=follow, since=since_time, **where):
        if json_output:
            click.echo(json.dumps({"name": name, "line": line, "record": _json_record(line)}, ensure_ascii=False))
        else:
            click.echo(line)
        sys.stdout.flush()


def _json_record(line: str) -> dict | None:
    """The model server's own JSON log record in a log line, if the line is one."""
    if not line.lstrip().startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _add_command_modules() -> None:
    """Commands that live in cloudllm/commands/ (each module imports nothing heavy at import time)."""
    from cloudllm.commands import apply as apply_commands  # apply, schema, iam-policy
    from cloudllm.commands import plan as plan_commands  # plan, instances
    from cloudllm.commands.emulate import emulate
    from cloudllm.commands.emulate_sagemaker import emulate_sagemaker
    from cloudllm.commands.emulate_vertex import emulate_vertex
    from cloudllm.commands.chat import chat
    from cloudllm.commands.proxy import proxy
    from cloudllm.commands.quantize import quantize
    from cloudllm.commands.build import build
    from cloudllm.commands.push import push
    from cloudllm.commands.adapters import adapters

    plan_commands.register(cli)
    apply_commands.register(cli)
    emulate.add_command(emulate_sagemaker)
    emulate.add_command(emulate_vertex)
    cli.add_command(emulate)
    cli.add_command(quantize)
    cli.add_command(chat)
    cli.add_command(proxy)
    cli.add_command(build)
    cli.add_command(push)
    cli.add_command(adapters)


_add_command_modules()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and a documented exit code."""
    sigterm_interrupts()
    try:
        cli.main(args=argv, prog_name="cloudllm", standalone_mode=False)
    except UserError as exc:
        from cloudllm.redact import redact_text

        click.echo(f"error: {redact_text(exc.line())}", err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "cloudllm"
        click.echo(f"error: {exc.format_message()} (see `{command} --help`)", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code or EXIT_FAILED)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # click turns Ctrl-C into Abort; the KeyboardInterrupt it wraps may carry what to do next.
        cause = exc if isinstance(exc, KeyboardInterrupt) else exc.__cause__
        advice = getattr(cause, "advice", None) or "run the same command again to resume, or `cloudllm delete NAME` to clean up"
        click.echo(f"interrupted: {advice}", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
