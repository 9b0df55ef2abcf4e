"""`cloudllm emulate vertex`: the offline Vertex AI + Cloud Storage (cloudllm_emulators/vertex.py) in the foreground."""

from __future__ import annotations

import sys

import click

from cloudllm.commands.emulate import require_free_port, run_until_stopped


@click.command("vertex")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address both servers bind.")
@click.option("--port", type=int, default=8090, show_default=True, help="Vertex AI API port (0: any free port).")
@click.option("--storage-port", type=int, default=9023, show_default=True, help="Cloud Storage port (0: any free port).")
@click.option("--project", default="cloudllm-emulator", show_default=True, help="The project clients are told to use.")
@click.option(
    "--objects-on-disk", is_flag=True,
    help="Keep Cloud Storage objects in the emulator's temporary folder rather than in memory (multi-GB models).",
)
@click.option("--bucket", "buckets", multiple=True, metavar="NAME", help="Create this bucket at start (repeatable).")
def emulate_vertex(host: str, port: int, storage_port: int, project: str, objects_on_disk: bool, buckets: tuple[str, ...]) -> None:
    """Run Cloud Storage and the Vertex AI API on loopback until Ctrl-C.

    Prints `export NAME=VALUE` lines (STORAGE_EMULATOR_HOST, CLOUDLLM_VERTEX_ENDPOINT, CLOUDLLM_VERTEX_GRPC_ENDPOINT,
    GOOGLE_CLOUD_PROJECT): run them in another shell, then deploy with --provider vertex as
    usual. Deployed models really serve (the generated handler runs on this machine), so
    invoke returns real model output.

    \b
    Example:
      cloudllm emulate vertex --bucket my-bucket
      # in another shell, after the export lines:
      cloudllm deploy ./my-model --provider vertex --runtime handler --instance n1-standard-4 \\
          --bucket gs://my-bucket/models
    """
    require_free_port(host, port)
    require_free_port(host, storage_port, "--storage-port")
    from cloudllm_emulators.vertex import VertexEmulator

    with VertexEmulator(host=host, port=port, storage_port=storage_port, project=project, objects_on_disk=objects_on_disk) as emulator:
        for bucket in buckets:
            emulator.create_bucket(bucket)
        for key, value in emulator.env.items():
            click.echo(f"export {key}={value}")
        made = f"; bucket(s) {', '.join('gs://' + b for b in buckets)}" if buckets else ""
        click.echo(f"# Vertex AI emulator at {emulator.url}, Cloud Storage at {emulator.storage_url}{made}. Ctrl-C stops it.")
        sys.stdout.flush()
        run_until_stopped()
