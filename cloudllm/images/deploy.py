"""`deploy --image build`: build the serving image, push it to the provider's registry, deploy with it
(local: build it and run it here through podman, no push)."""

from __future__ import annotations

import os
from typing import Any

from cloudllm.errors import UserError

BUILD = "build"
BASE_ENV = "CLOUDLLM_BUILD_BASE"  # the base `--image build` builds FROM (default: build.DEFAULT_BASE)
REGISTRY_OF = {"sagemaker": "ECR", "vertex": "Artifact Registry"}
LOCAL = "local"  # builds only: the local provider runs the image from this machine's store


def with_built_image(spec: Any, reporter: Any, *, dry_run: bool) -> Any:
    """SPEC with `image: build` replaced by the pushed image's URI by digest (SPEC as is otherwise).

    Without a container engine the deploy goes on with the provider's catalog image, saying so
    (local refuses: running the image is what was asked).
    A dry run builds and pushes nothing: it says which image would be built and where it would go.
    """
    if spec.image != BUILD:
        return spec
    from cloudllm.images.build import DEFAULT_BASE, build_image, context_files, content_tag
    from cloudllm.images.builders import BUILDERS, find_builder, image_id
    from cloudllm.images.registry import push_image

    local = spec.provider == LOCAL
    if spec.provider not in REGISTRY_OF and not local:
        raise UserError(f"--image build pushes to ECR or Artifact Registry; provider {spec.provider} has neither", "use --provider local, sagemaker or vertex")
    try:
        builder = find_builder()
    except UserError:
        if local:  # a process is not what was asked for: the point is to run the image
            raise
        reporter.step(f"image: no container builder here ({', '.join(BUILDERS)}): deploying with the catalog's image instead")
        return spec.model_copy(update={"image": None})
    base = os.environ.get(BASE_ENV) or DEFAULT_BASE
    where = REGISTRY_OF.get(spec.provider)
    if dry_run:
        base_id = image_id(builder, base)
        tag = f"cloudllm-serve:{content_tag(base_id, context_files())}" if base_id else "cloudllm-serve:<tag after pulling the base>"
        built_here = bool(base_id and image_id(builder, tag))
        if local:
            state = f"{'built here' if built_here else 'to be built'}, to run on this machine"
        else:
            state = f"{'built here, to be pushed' if built_here else 'to be built and pushed'} to {where}"
        reporter.step(f"image: {tag} FROM {base} ({state})")
        return spec.model_copy(update={"image": tag})
    built = build_image(base=base, builder=builder.name, say=reporter.step)
    reporter.step(f"image: built {built.image} in {built.seconds:.1f}s")
    if local:  # run where it was built (providers/local_container.py): nothing to push
        return spec.model_copy(update={"image": built.image})
    options = spec.options if isinstance(getattr(spec, "options", None), dict) else {}
    pushed = push_image(
        built.image,
        provider=spec.provider,
        region=spec.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        project=options.get("project") or os.environ.get("GOOGLE_CLOUD_PROJECT"),
        profile=options.get("profile"),
        say=reporter.step,
    )
    reporter.step(f"image: pushed {pushed.by_digest} ({pushed.layers_sent} layers sent, {pushed.layers_skipped} already there)")
    return spec.model_copy(update={"image": pushed.by_digest})
