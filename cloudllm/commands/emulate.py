"""`cloudllm emulate ...`: offline stand-ins for the clouds, run in the foreground on loopback."""

from __future__ import annotations

import errno
import signal
import socket
import time

import click

from cloudllm.errors import UserError

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


def require_free_port(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port something else listens on, in one line, before any server thread starts
    (a thread that fails to bind would hang the command or print its traceback)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"cannot bind {host}: {exc.strerror}", "pass --host 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not "taken"
        try:
            probe.bind(address)
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            raise UserError(
                f"port {port} on {host} is {'already in use' if taken else 'not available: ' + (exc.strerror or str(exc))}",
                f"stop what uses it, or pass another {flag} (0 picks a free one)",
            ) from None
