"""`cloudllm plan` (what deploy would do, and whether it fits) and `cloudllm instances` (the catalog).

Commands are built in register() so this module never imports cloudllm.cli at import time
(cli.py registers them; importing this module first must not be circular).
"""

from __future__ import annotations

from typing import Any

import click


def register(group: click.Group) -> None:
    from cloudllm.commands.flags import deploy_flags as _deploy_flags, model_flags as _model_flags, print_json as _print_json, spec_kwargs as _spec_kwargs

    @group.command("plan")
    @click.argument("model", type=click.Path())
    @_deploy_flags
    @_model_flags
    @click.option("--json", "json_output", is_flag=True, help="The plan as JSON (schema: docs/plan-schema.json).")
    def plan_cmd(model: str, json_output: bool, **kw: Any) -> None:
        """Show what deploying MODEL would do: GPU fit, shards, cost and the resources it changes. Creates nothing.

        Exits 3 when the model does not fit the instance (for CI gates).

        \b
        Examples:
          cloudllm plan ./my-model --provider sagemaker --instance ml.g5.xlarge
          cloudllm plan ./my-model --provider vertex --instance g2-standard-8 --max-total-tokens 8192 --max-batch 4
          cloudllm plan ./my-model --provider sagemaker --instance ml.g4dn.xlarge --runtime handler --quantize int8 --json
        """
        from cloudllm import api
        from cloudllm.plan import refuse_unless_fits

        the_plan = api.plan(model, **_spec_kwargs(kw))
        if json_output:
            _print_json(the_plan.report().model_dump(mode="json"))
        else:
            for line in the_plan.describe():
                click.echo(line)
        refuse_unless_fits(the_plan)

    @group.command("instances")
    @click.option("--provider", type=click.Choice(["sagemaker", "vertex"]), help="Only this provider's types.")
    @click.option("--fits", "fits_model", type=click.Path(), help="Only types that fit this model folder, cheapest first.")
    @click.option("--runtime", type=click.Choice(["handler", "tgi", "vllm"]), help="With --fits: the serving runtime.")
    @click.option("--quantize", help="With --fits: int8|int4 (handler) or bitsandbytes|eetq|fp8 (tgi/vllm).")
    @click.option("--max-total-tokens", type=int, help="With --fits: prompt + generated tokens per request.")
    @click.option("--max-batch", "max_batch_size", type=int, help="With --fits: requests served at once.")
    @click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
    def instances_cmd(
        provider: str | None, fits_model: str | None, runtime: str | None, quantize: str | None,
        max_total_tokens: int | None, max_batch_size: int | None, json_output: bool,
    ) -> None:  # fmt: skip
        """List instance and machine types with GPUs, memory and indicative prices.

        \b
        Examples:
          cloudllm instances --provider sagemaker
          cloudllm instances --fits ./my-model --max-total-tokens 8192
        """
        from cloudllm.catalog import catalog_info, instances
        from cloudllm.fit import fit_table, gib, workload_for_model

        info = catalog_info()
        serving = {k: v for k, v in (("max_total_tokens", max_total_tokens), ("max_batch_size", max_batch_size)) if v is not None}
        if fits_model:
            work = workload_for_model(fits_model, runtime=runtime, quantize=quantize, serving=serving or None)
            rows = fit_table(work, provider)
        else:
            if runtime or quantize or serving:
                raise click.UsageError("--runtime, --quantize, --max-total-tokens and --max-batch go with --fits MODEL")
            rows = [(instance, None) for instance in instances(provider)]
        if json_output:
            _print_json(
                {
                    **info.model_dump(mode="json"),
                    "instances": [
                        {
                            **instance.model_dump(mode="json"),
                            "label": instance.label,
                            "accelerator_flag": instance.accelerator_flag,
                            "fit": report.model_dump(mode="json") if report else None,
                        }
                        for instance, report in rows
                    ],
                }
            )
            return
        regions = ", ".join(f"{p} {r}" for p, r in info.regions.items() if not provider or p == provider)
        click.echo(f"indicative on-demand USD per hour ({regions}), as of {info.as_of}")
        if fits_model:
            click.echo(
                f"fitting {work.model.path} ({work.runtime}, max_total_tokens {work.max_total_tokens:,}, "
                f"max_batch {work.max_batch}{', quantize ' + work.quantize if work.quantize else ''})"
            )
            if not rows:
                click.echo("no instance in the catalog fits; quantize, or lower --max-total-tokens / --max-batch")
                return
        header = ["PROVIDER", "INSTANCE", "ACCELERATOR", "GPU MEM", "VCPU", "RAM", "$/HOUR"]
        if fits_model:
            header += ["SHARDS", "MARGIN"]
        table = [header]
        for instance, report in rows:
            accel = f"{instance.accelerator_count}x {instance.accelerator}" if instance.accelerator_count else "-"
            if instance.attachable:
                accel = "+ " + "/".join(instance.attachable) + " (--accelerator)"
            row = [
                instance.provider,
                instance.label,
                accel,
                f"{instance.accelerator_memory_gib:g} GiB" if instance.accelerator_count else "-",
                str(instance.vcpu),
                f"{instance.memory_gib:g} GiB",
                f"{instance.price_per_hour:,.2f}" if instance.price_per_hour is not None else "?",
            ]
            if report:
                row += [str(report.shards or "-"), gib(report.margin_bytes)]
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for row in table:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
