"""`cloudllm apply` (cloudllm.yaml -> endpoints), `cloudllm schema` (its JSON Schema) and `cloudllm iam-policy`.

Commands are built in register() so this module never imports cloudllm.cli at import time.
"""

from __future__ import annotations

import json

import click


def register(group: click.Group) -> None:
    from cloudllm.commands.flags import print_json as _print_json, reporter as _reporter

    @group.command("apply")
    @click.option("-f", "--file", "path", default="cloudllm.yaml", show_default=True, type=click.Path(), help="The cloudllm.yaml to apply.")
    @click.option("--dry-run", is_flag=True, help="Plan every endpoint and show what would change; change nothing.")
    @click.option("--prune", is_flag=True, help="Delete endpoints this file created earlier and no longer lists.")
    @click.option("--no-wait", is_flag=True, help="Return once the platform accepted each change.")
    @click.option("--json", "json_output", is_flag=True, help="Machine-readable result on stdout (shape: docs/cli.md).")
    def apply_cmd(path: str, dry_run: bool, prune: bool, no_wait: bool, json_output: bool) -> None:
        """Create, update or leave each endpoint of a cloudllm.yaml so they match the file.

        Every endpoint is planned first; if any plan is refused (exit 3), nothing changes.
        A second apply of the same file changes nothing and says so. Endpoints removed from
        the file are deleted only with --prune, and only those this file created.

        \b
        Examples:
          cloudllm apply -f cloudllm.yaml --dry-run
          cloudllm apply -f cloudllm.yaml
          cloudllm apply -f cloudllm.yaml --prune --json
        """
        from cloudllm import api
        from cloudllm.errors import DeployFailed, PlanRefused

        result = api.apply(path, dry_run=dry_run, prune=prune, wait=not no_wait, reporter=_reporter(json_output))
        if json_output:
            _print_json(result.to_dict())
        else:
            for line in _describe(result):
                click.echo(line)
        if result.refused:
            first = result.refused[0]
            more = f" (and {len(result.refused) - 1} more)" if len(result.refused) > 1 else ""
            raise PlanRefused(f"plan refused for endpoint {first.name}{more}: {first.error}", "nothing was changed")
        if result.failed:
            first = result.failed[0]
            more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
            raise DeployFailed(f"{first.error}{more}", "fix it and run the same apply again: it continues from where it stopped")

    @group.command("schema")
    def schema_cmd() -> None:
        """Print the JSON Schema of cloudllm.yaml (every setting, with its description).

        \b
        Examples:
          cloudllm schema > cloudllm.schema.json
          # in cloudllm.yaml, for editor completion:
          # yaml-language-server: $schema=./cloudllm.schema.json
        """
        from cloudllm.config_file import file_schema

        click.echo(json.dumps(file_schema(), indent=2))

    @group.command("iam-policy")
    @click.option("--provider", required=True, type=click.Choice(["sagemaker", "vertex"]), help="Which cloud's permissions.")
    @click.option("-f", "--file", "path", type=click.Path(), help="Take buckets, roles, regions and keys from this cloudllm.yaml.")
    @click.option("--bucket", "buckets", multiple=True, help="Artifact location: s3://BUCKET/PREFIX or gs://BUCKET/PREFIX.")
    @click.option("--role", "roles", multiple=True, help="SageMaker execution role ARN the deploys pass.")
    @click.option("--region", help="AWS region (default: any).")
    @click.option("--account", help="AWS account id (default: from --role, else any).")
    @click.option("--kms-key", "kms_keys", multiple=True, help="Customer-managed key that encrypts the artifacts.")
    @click.option("--project", help="Google Cloud project.")
    @click.option("--member", help="Who runs cloudllm on GCP, e.g. serviceAccount:ci@PROJECT.iam.gserviceaccount.com.")
    @click.option("--service-account", help="Vertex: service account the deployed model runs as.")
    @click.option("--json", "json_output", is_flag=True, help="Vertex: the bindings as JSON (SageMaker always prints JSON).")
    def iam_policy_cmd(
        provider: str, path: str | None, buckets: tuple[str, ...], roles: tuple[str, ...], region: str | None,
        account: str | None, kms_keys: tuple[str, ...], project: str | None, member: str | None,
        service_account: str | None, json_output: bool,
    ) -> None:  # fmt: skip
        """Print the least-privilege permissions cloudllm needs: an IAM policy (SageMaker) or roles (Vertex AI).

        \b
        Examples:
          cloudllm iam-policy --provider sagemaker --bucket s3://my-bucket/models \\
              --role arn:aws:iam::123456789012:role/SageMakerExec --region us-east-1 > policy.json
          cloudllm iam-policy --provider sagemaker -f cloudllm.yaml
          cloudllm iam-policy --provider vertex --project my-proj --bucket gs://my-bucket \\
              --member serviceAccount:ci@my-proj.iam.gserviceaccount.com
        """
        from cloudllm import iam

        buckets, roles, kms_keys = list(buckets), list(roles), list(kms_keys)
        regions = {region} if region else set()
        if path:
            from cloudllm.config_file import load_file

            for spec in load_file(path).endpoints:
                if spec.provider != provider:
                    continue
                buckets += [spec.bucket] if spec.bucket else []
                roles += [spec.options["role"]] if spec.options.get("role") else []
                kms_keys += [spec.options["kms_key"]] if spec.options.get("kms_key") else []
                regions |= {spec.region} if spec.region else set()
                project = project or spec.options.get("project")

        if provider == "sagemaker":
            scope = iam.aws_scope(
                region=regions.pop() if len(regions) == 1 else None,
                account=account,
                buckets=_unique(buckets),
                roles=_unique(roles),
                kms_keys=_unique(kms_keys),
            )
            _print_json(iam.sagemaker_policy(scope))
            for note in iam.policy_notes(scope):
                click.echo(f"note: {note}", err=True)
            return
        bindings = iam.vertex_bindings(
            project=project, buckets=_unique(buckets), member=member, service_account=service_account, kms_keys=_unique(kms_keys)
        )
        if json_output:
            _print_json({"provider": "vertex", "bindings": [vars(b) for b in bindings], "commands": [b.command() for b in bindings]})
            return
        click.echo(f"# Roles cloudllm needs on Google Cloud (for {member or 'the identity that runs it'}):")
        for b in bindings:
            click.echo(f"#   {b.role:<42} on {b.scope} {b.resource}: {b.why}")
        for b in bindings:
            click.echo(b.command())


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _describe(result) -> list[str]:
    """The apply result for people: one line per endpoint, then the summary."""
    verbs = {"create": "created", "update": "updated", "delete": "deleted"}
    lines = []
    for item in result.endpoints:
        if result.dry_run or item.action == "refused":
            status = f"would {item.action}" if result.dry_run and item.action in verbs else item.action
        elif item.error:
            status = f"{item.action} failed"
        else:
            status = verbs.get(item.action, item.action)
        detail = "; ".join(item.reasons)
        if item.error and item.action != "refused":
            detail = item.error
        where = ""
        if item.endpoint and item.endpoint.url and item.action in ("create", "update", "unchanged") and not result.dry_run:
            where = f" -> {item.endpoint.state} at {item.endpoint.url}"
        lines.append(f"  {status:<14} {item.name} ({item.provider}): {detail}{where}")
    counts = result.summary()
    tally = f"{counts['create']} to create, {counts['update']} to update, {counts['delete']} to delete, {counts['unchanged']} unchanged"
    if result.outcome == "no-change":
        lines.append(f"{result.file}: no change ({counts['unchanged']} endpoint(s) unchanged)")
    elif result.outcome == "dry-run":
        lines.append(f"{result.file}: dry run, nothing changed: {tally}")
    elif result.outcome == "applied":
        done = f"{counts['create']} created, {counts['update']} updated, {counts['delete']} deleted, {counts['unchanged']} unchanged"
        lines.append(f"{result.file}: applied: {done}")
    if counts["keep"]:
        lines.append(f"{counts['keep']} endpoint(s) no longer in the file were left alone; `--prune` deletes them")
    return lines
