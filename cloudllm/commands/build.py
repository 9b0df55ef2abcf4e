"""`cloudllm build`: the serving image, built by buildah, podman or docker (no Docker daemon needed)."""

from __future__ import annotations

import click


@click.command("build")
@click.option("-t", "--tag", help="repository[:tag] to name the image (default cloudllm-serve:<content digest>).")
@click.option("--base", help="Base image with torch (default: a CUDA PyTorch runtime image for linux/amd64).")
@click.option("--builder", type=click.Choice(["buildah", "podman", "docker"]), help="Builder to use (default: the first of these found).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable output.")
def build(tag: str | None, base: str | None, builder: str | None, json_output: bool) -> None:
    """Build the serving image from containers/Dockerfile; weights stay out of it.

    The default tag is derived from the base image and the files the image is built from, so
    the same inputs give the same tag. pip's configuration (index, find-links, CA bundle) is
    passed as build secrets and mounts, never stored in the image.

    \b
    Examples:
      cloudllm build
      cloudllm build --base localhost/cloudllm-torch-base:latest -t cloudllm-serve:dev
    """
    from cloudllm.commands.flags import print_json as _print_json
    from cloudllm.images.build import DEFAULT_BASE, build_image

    say = (lambda line: click.echo(line, err=True)) if json_output else click.echo
    result = build_image(tag=tag, base=base or DEFAULT_BASE, builder=builder, say=say)
    if json_output:
        _print_json(result.to_dict())
        return
    click.echo(f"built {result.image} ({result.image_id[:12]}) in {result.seconds:.1f}s")
