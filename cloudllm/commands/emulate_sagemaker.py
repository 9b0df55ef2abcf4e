"""`cloudllm emulate sagemaker`: the offline SageMaker (cloudllm_emulators/sagemaker.py) in the foreground."""

from __future__ import annotations

import sys

import click

from cloudllm.commands.emulate import require_free_port, run_until_stopped


@click.command("sagemaker")
@click.option("--port", type=int, default=8095, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--region", default="us-east-1", show_default=True, help="The region clients are told to use.")
@click.option("--log-requests", is_flag=True, help="Print every API request.")
def emulate_sagemaker(port: int, host: str, region: str, log_requests: bool) -> None:
    """Run SageMaker, S3, IAM, CloudWatch Logs and Application Auto Scaling on loopback until Ctrl-C.

    Prints `export NAME=VALUE` lines (AWS_ENDPOINT_URL and dummy credentials): run them in
    another shell, then deploy with --provider sagemaker as usual. Endpoints really serve
    (the generated handler runs on this machine), so invoke returns real model output.
    A bucket and an execution role are ready to use.

    \b
    Example:
      cloudllm emulate sagemaker --port 8095
      # in another shell, after the export lines:
      cloudllm deploy ./my-model --provider sagemaker --runtime handler --instance ml.m5.xlarge \\
          --bucket s3://cloudllm-emulator/models --role arn:aws:iam::123456789012:role/cloudllm-emulator-sagemaker
    """
    require_free_port(host, port)
    from cloudllm_emulators.sagemaker import SageMakerEmulator

    with SageMakerEmulator(port=port, host=host, region=region, log_requests=log_requests) as emulator:
        for key, value in emulator.env().items():
            click.echo(f"export {key}={value}")
        click.echo(f"# SageMaker emulator at {emulator.url}; bucket {emulator.bucket}, role {emulator.role}. Ctrl-C stops it.")
        sys.stdout.flush()
        run_until_stopped()
