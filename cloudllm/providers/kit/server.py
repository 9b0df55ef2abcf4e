"""A model server as a process of its own: start it, wait until it is healthy, stop it (its whole group).

The process handling is cloudllm_procs' (the emulators use it too); this adds the provider's wait,
with its spinner and its "still starting" error.
"""

from __future__ import annotations

from typing import Callable

from cloudllm.providers.kit.waiting import wait_until
from cloudllm_procs import SERVER_BACKOFF, SYSTEM_CLOCK, Clock, alive, runs
from cloudllm_procs import start as start_server  # start_server(argv, log_path=, cwd=, env=): in its own session, log appended
from cloudllm_procs import stop as stop_server  # SIGTERM, then SIGKILL, its group: only while alive(pid, marker)

__all__ = ["SERVER_BACKOFF", "alive", "runs", "start_server", "stop_server", "wait_healthy"]


def wait_healthy(poll: Callable[[], object], *, what: str, deadline: float, reporter, late, clock: Clock = SYSTEM_CLOCK):
    """wait_until with the local server's quick backoff."""
    return wait_until(poll, what=what, deadline=deadline, reporter=reporter, late=late, backoff=SERVER_BACKOFF, clock=clock)
