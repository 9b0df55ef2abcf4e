"""`cloudllm emulate ...`: offline stand-ins for the clouds, run in the foreground on loopback."""

from __future__ import annotations

import signal
import time

import click

emulate = click.Group(
    "emulate",
    help="Run an offline stand-in for a cloud on loopback, for tests and CI (prints the environment to use).",
)


def run_until_stopped() -> None:
    """Block until Ctrl-C or SIGTERM, then return so the caller's `with` stops the emulator.

    CI stops a background job with SIGTERM, and a shell starts one with SIGINT ignored: both
    must end the emulator cleanly, model servers included (they run in their own sessions).
    """

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("# stopping", err=True)
