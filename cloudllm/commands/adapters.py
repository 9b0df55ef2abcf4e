"""`cloudllm adapters add|list|remove`: LoRA adapters on a live endpoint, without redeploying its base."""

from __future__ import annotations

import click

from cloudllm.commands.flags import print_json, reporter, where_flags


@click.group("adapters")
def adapters() -> None:
    """Add, list and remove LoRA adapters on a live endpoint (the base model keeps serving).

    An adapter added here stays on the endpoint when you deploy it again without naming it
    (its record keeps it); `cloudllm adapters remove` is how it goes. A deploy whose
    --adapter (or cloudllm.yaml `adapters:`) names it with another folder replaces it.

    \b
    Examples:
      cloudllm adapters add shared legal ./lora-legal-v2
      cloudllm adapters list shared
      cloudllm invoke shared "Summarise this contract" --adapter legal
      cloudllm adapters remove shared legal
    """


@adapters.command("add")
@click.argument("name")
@click.argument("adapter")
@click.argument("path", type=click.Path())
@where_flags
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def add(name: str, adapter: str, path: str, where: dict, json_output: bool) -> None:
    """Add adapter ADAPTER (a PEFT LoRA folder at PATH) to endpoint NAME, or replace the one of that name."""
    from cloudllm import api

    added = api.add_adapter(name, adapter, path, reporter=reporter(json_output), **where)
    if json_output:
        print_json(added)
    else:
        click.echo(f"adapter {adapter} added to endpoint {name}")


@adapters.command("list")
@click.argument("name")
@where_flags
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def list_cmd(name: str, where: dict, json_output: bool) -> None:
    """List the adapters endpoint NAME serves."""
    from cloudllm import api

    found = api.list_adapters(name, **where)
    if json_output:
        print_json(found)
        return
    if not found:
        click.echo(f"endpoint {name} has no adapters")
        return
    rows = [("ADAPTER", "RANK", "DIGEST", "STATUS")]
    rows += [(a.get("name", "?"), str(a.get("rank") or "-"), (a.get("digest") or "-")[:12], a.get("status") or "-") for a in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@adapters.command("remove")
@click.argument("name")
@click.argument("adapter")
@where_flags
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def remove(name: str, adapter: str, where: dict, json_output: bool) -> None:
    """Remove adapter ADAPTER from endpoint NAME."""
    from cloudllm import api

    api.remove_adapter(name, adapter, reporter=reporter(json_output), **where)
    if json_output:
        print_json({"name": name, "adapter": adapter, "removed": True})
    else:
        click.echo(f"adapter {adapter} removed from endpoint {name}")
