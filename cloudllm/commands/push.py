"""`cloudllm push`: the serving image to ECR (SageMaker) or Artifact Registry (Vertex AI)."""

from __future__ import annotations

import click


@click.command("push")
@click.argument("image")
@click.option("--provider", required=True, type=click.Choice(["sagemaker", "vertex"]), help="sagemaker: ECR; vertex: Artifact Registry.")
@click.option("--region", required=True, help="The registry's region (us-east-1, us-central1).")
@click.option("--project", help="Google Cloud project (Artifact Registry).")
@click.option("--profile", help="AWS profile (ECR).")
@click.option("--repository", help="ECR repository or Artifact Registry repository (default: the image's name; cloudllm on Artifact Registry).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def push(image: str, provider: str, region: str, project: str | None, profile: str | None, repository: str | None, json_output: bool) -> None:
    """Push IMAGE (from `cloudllm build`) to the provider's registry; layers it has are skipped.

    \b
    Examples:
      cloudllm push cloudllm-serve:3f2a9c1d0b7e --provider sagemaker --region us-east-1
      cloudllm push cloudllm-serve:3f2a9c1d0b7e --provider vertex --project P --region us-central1
    """
    from cloudllm.commands.flags import print_json as _print_json
    from cloudllm.images.registry import push_image

    say = (lambda line: click.echo(line, err=True)) if json_output else click.echo
    result = push_image(image, provider=provider, region=region, project=project, repository=repository, profile=profile, say=say)
    if json_output:
        _print_json(result.to_dict())
        return
    click.echo(f"pushed {result.uri} {result.digest} ({result.layers_sent} layers sent, {result.layers_skipped} already there)")
