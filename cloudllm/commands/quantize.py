"""`cloudllm quantize`: write an int8/int4 copy of a model folder, with a report of what it cost."""

from __future__ import annotations

import click


@click.command("quantize")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Folder to write the quantized model to.")
@click.option("--method", required=True, help="int8 (per-channel) or int4 (groups of 128).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--force", is_flag=True, help="Write it even when next-token agreement is below the threshold.")
@click.option("--min-agreement", type=float, help="Refuse below this next-token agreement (default 0.90 int8, 0.70 int4).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Keep layers matching this glob in full precision (repeatable).")
@click.option("--quantize-lm-head", is_flag=True, help="Also quantize an LM head that is not tied to the embeddings.")
@click.option("--task", help="Pipeline task; inferred from config.json when omitted.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repo's own Python code.")
@click.option("--json", "json_output", is_flag=True, help="The report as JSON.")
def quantize(model: str, out: str, method: str, overwrite: bool, force: bool, min_agreement: float | None,
             exclude: tuple[str, ...], quantize_lm_head: bool, task: str | None, trust_remote_code: bool,
             json_output: bool) -> None:  # fmt: skip
    """Quantize MODEL's weights to int8 or int4 into a new folder that `cloudllm deploy` serves.

    Reports bytes before/after, layers quantized and kept, and fidelity on a fixed probe
    set; refuses (exit 2, nothing written) when the quantized model's next-token choices
    agree with the original's less often than the threshold.

    \b
    Examples:
      cloudllm quantize ./my-model -o ./my-model-int8 --method int8
      cloudllm deploy ./my-model-int8 --provider local --name demo
    """
    from cloudllm.commands.flags import print_json as _print_json, reporter as _reporter
    from cloudllm.quantize import quantize_model

    report = quantize_model(
        model,
        out,
        method=method,
        overwrite=overwrite,
        force=force,
        min_agreement=min_agreement,
        exclude=exclude,
        quantize_lm_head=quantize_lm_head,
        task=task,
        trust_remote_code=trust_remote_code,
        reporter=_reporter(json_output),
    )
    if json_output:
        _print_json(report.model_dump(mode="json"))
        return
    click.echo(f"{method} model written to {report.output} in {report.seconds:.1f}s")
    for line in report.summary_lines():
        click.echo(f"  {line}")
    if report.forced:
        click.echo("  kept despite the low agreement (--force)")
