"""The flags and output helpers the CLI and its command modules share (below both, so neither imports the other)."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import click

from cloudllm.errors import UserError


def kv_pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r} is not KEY=VALUE", f"write it as {flag} key=value")
        pairs[key] = value
    return pairs


def print_json(data: Any) -> None:
    from cloudllm.redact import redact

    click.echo(json.dumps(redact(data), indent=2, sort_keys=True, default=str))


def reporter(json_output: bool):
    from cloudllm.console import default_reporter

    return default_reporter()


# --- shared flag groups ----------------------------------------------------------------------
def model_flags(f: Callable) -> Callable:
    for option in reversed(
        [
            click.option("--task", help="Pipeline task; inferred from config.json when omitted."),
            click.option("--allow-pickle", is_flag=True, help="Ship *.bin/*.pt pickle weights (they can run code)."),
            click.option("--trust-remote-code", is_flag=True, help="Allow the model repo's own Python code."),
            click.option("--quantize", help="int8|int4 (shipped weights) or bitsandbytes|eetq|fp8 (engine, tgi)."),
            click.option("--max-input-tokens", type=int, help="Longest prompt accepted."),
            click.option("--max-total-tokens", type=int, help="Prompt + generated tokens per request."),
            click.option("--max-new-tokens", type=int, help="Cap on max_new_tokens per request."),
            click.option("--max-batch", "max_batch_size", type=int, help="Dynamic batching: max requests per batch."),
            click.option("--batch-wait-ms", "max_batch_wait_ms", type=float, help="Dynamic batching: max wait to fill a batch."),
            click.option("--log-payloads", is_flag=True, help="Log prompt text in the server's request log (off: prompts can hold secrets)."),
        ]
    ):
        f = option(f)
    return f


def deploy_flags(f: Callable) -> Callable:
    for option in reversed(
        [
            click.option("--name", help="Endpoint name (default: from the model folder's name)."),
            click.option("--provider", default="local", show_default=True, help="local, sagemaker, vertex or a plugin."),
            click.option("--runtime", type=click.Choice(["handler", "tgi", "vllm"]), help="Serving runtime."),
            click.option("--instance", help="Instance/machine type, e.g. ml.g5.xlarge or g2-standard-8."),
            click.option("--accelerator", help="Vertex accelerator override, e.g. NVIDIA_L4:2."),
            click.option("--image", help="Container image URI (default from the image catalog); `build`: build cloudllm's image and push it to ECR / Artifact Registry. local: run the server in this image through podman (`build`: build it here)."),
            click.option("--region", help="Cloud region."),
            click.option("--bucket", help="Artifact location: s3://bucket/prefix or gs://bucket/prefix."),
            click.option("--role", help="SageMaker execution role ARN."),
            click.option("--project", help="Google Cloud project."),
            click.option("--profile", help="AWS profile."),
            click.option("--kms-key", help="Encrypt artifacts (and volumes) with this customer key."),
            click.option("--vpc-subnets", help="Comma-separated subnet ids (SageMaker)."),
            click.option("--vpc-security-groups", help="Comma-separated security group ids (SageMaker)."),
            click.option("--network-isolation", is_flag=True, default=None, help="No outbound network from the container."),
            click.option("--min-instances", type=int, help="Autoscaling floor (default 1)."),
            click.option("--max-instances", type=int, help="Autoscaling ceiling (default 1)."),
            click.option("--scale-metric", help="invocations|concurrency (SageMaker); cpu|gpu-duty-cycle|requests (Vertex)."),
            click.option("--scale-target", type=float, help="Target metric value per instance."),
            click.option("--scale-in-cooldown", type=int, help="Seconds between scale-in steps."),
            click.option("--scale-out-cooldown", type=int, help="Seconds between scale-out steps."),
            click.option("--rollout", help="Update traffic shift: all-at-once, canary:PCT, linear:PCT."),
            click.option("--rollback-alarm", multiple=True, help="CloudWatch alarm that rolls an update back."),
            click.option("--timeout", type=int, help="Seconds to wait for the endpoint (sized from the model by default)."),
            click.option("--tag", "tags", multiple=True, help="KEY=VALUE tag on every cloud resource."),
            click.option("--option", "extra_options", multiple=True, help="KEY=VALUE setting for a provider plugin."),
            click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="LoRA adapter (PEFT folder) served beside the model; requests pick it by NAME. Repeatable."),
            click.option("--add-model", metavar="NAME", help="Deploy MODEL as one more model, named NAME, on the existing endpoint --name (invoke --model NAME)."),
        ]
    ):
        f = option(f)
    return f


def where_flags(f: Callable) -> Callable:
    """--provider/--region/--profile/--project: find an endpoint this machine has no record of (a CI job
    on another runner), or override the record's region and credentials; collected into `where`."""
    @functools.wraps(f)
    def wrapper(*args: Any, provider: str | None, region: str | None, profile: str | None, project: str | None, **kw: Any) -> Any:
        options = {k: v for k, v in (("profile", profile), ("project", project)) if v}
        return f(*args, where={"provider": provider, "region": region, "options": options or None}, **kw)

    for option in reversed(
        [
            click.option("--provider", help="Provider of an endpoint deployed from another machine."),
            click.option("--region", help="Region of the endpoint (default: the record's, else the SDK's configuration)."),
            click.option("--profile", help="AWS profile (SageMaker)."),
            click.option("--project", help="Google Cloud project (Vertex AI)."),
        ]
    ):
        wrapper = option(wrapper)
    return wrapper


def target_flags(f: Callable) -> Callable:
    """--adapter/--model/--wake-timeout of invoke and chat: which adapter and model answer, and how long
    to wait for an endpoint scaled to zero; collected into `target`."""
    @functools.wraps(f)
    def wrapper(*args: Any, adapter: str | None, model: str | None, wake_timeout: float | None, **kw: Any) -> Any:
        if wake_timeout is not None and wake_timeout != wake_timeout:  # NaN slips past every range check
            raise click.BadParameter("nan is not a number of seconds", param_hint="'--wake-timeout'")
        from cloudllm.console import default_reporter

        # The reporter shows the wait of an endpoint scaled to zero ("waking NAME from zero: 12 s") on stderr.
        return f(*args, target={"adapter": adapter, "model": model, "wake_timeout": wake_timeout, "reporter": default_reporter()}, **kw)

    for option in reversed(
        [
            click.option("--adapter", metavar="NAME", help="Answer with this LoRA adapter (see `cloudllm adapters list NAME`)."),
            click.option("--model", metavar="NAME", help="Which of the endpoint's models answers (--add-model); default: its first."),
            click.option("--wake-timeout", type=click.FloatRange(min=0, max=86_400), metavar="SECONDS",
                         help="Wait this long for an endpoint scaled to zero to wake (default 900)."),  # fmt: skip
        ]
    ):
        wrapper = option(wrapper)
    return wrapper


_SERVING_KEYS = ("max_input_tokens", "max_total_tokens", "max_new_tokens", "max_batch_size", "max_batch_wait_ms", "log_payloads")
_OPTION_KEYS = ("role", "project", "profile", "kms_key", "network_isolation")


def spec_kwargs(kw: dict) -> dict:
    """Flags -> DeploySpec fields; provider-specific flags go to spec.options."""
    serving = {k: kw.pop(k) for k in _SERVING_KEYS if kw.get(k) is not None and kw.get(k) is not False}
    for k in _SERVING_KEYS:
        kw.pop(k, None)
    options = {k: kw.pop(k) for k in _OPTION_KEYS if kw.get(k) is not None}
    for k in _OPTION_KEYS:
        kw.pop(k, None)
    for k in ("vpc_subnets", "vpc_security_groups"):
        value = kw.pop(k, None)
        if value:
            options[k] = [part.strip() for part in value.split(",") if part.strip()]
    alarms = kw.pop("rollback_alarm", ())
    if alarms:
        options["rollback_alarms"] = list(alarms)
    options.update(kv_pairs(kw.pop("extra_options", ()), "--option"))
    tags = kv_pairs(kw.pop("tags", ()), "--tag")
    adapters = adapter_pairs(kw.pop("adapters", ()))
    spec = {k: v for k, v in kw.items() if v is not None and v is not False}
    if serving:
        spec["serving"] = serving
    if options:
        spec["options"] = options
    if tags:
        spec["tags"] = tags
    if adapters:
        spec["adapters"] = adapters
    return spec


def adapter_pairs(values: tuple[str, ...]) -> dict[str, str]:
    """--adapter NAME=PATH flags as {name: path}; a name given twice is a mistake, not a last-one-wins."""
    from cloudllm.adapters import check_adapter_name

    adapters: dict[str, str] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {item!r} is not NAME=PATH", "write it as --adapter legal=./lora-legal (a PEFT adapter folder)")
        if check_adapter_name(name) in adapters:
            raise UserError(f"--adapter {name} is given twice", "give each adapter name once")
        adapters[name] = path
    return adapters
