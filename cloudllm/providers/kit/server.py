"""A model server as a process of its own: start it, wait until it is healthy, stop it (its whole group)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Callable

from cloudllm.providers.kit.waiting import SYSTEM_CLOCK, Backoff, Clock, Pending, wait_until

# A local server starts in seconds: poll it often, at most every half second.
SERVER_BACKOFF = Backoff(first=0.05, growth=1.5, floor=0.5, most=0.5)


def start_server(argv: list[str], *, log_path: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start argv in its own session (it outlives the CLI and its Ctrl-C), stdout and stderr appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True, env=env
        )


def alive(pid: int | None, marker: str | None = None) -> bool:
    """True when pid runs and is our server (its command line names marker: not a recycled pid)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
        if not text:  # a zombie: exited, not yet reaped
            return False
        return marker is None or marker in text
    return True


def stop_server(pid: int | None, marker: str | None = None, *, grace: float = 10.0, clock: Clock = SYSTEM_CLOCK) -> None:
    """SIGTERM the server's process group, then SIGKILL it after `grace` seconds (SageMaker gives 30)."""
    if not alive(pid, marker):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return

    def exited() -> object:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass  # not our child (started by an earlier CLI run)
        return Pending() if alive(pid, marker) else True

    try:
        wait_until(exited, what="", deadline=grace, backoff=Backoff(first=0.05, floor=0.05, most=0.05), clock=clock)
    except Exception:  # StillRunning: it ignored SIGTERM
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_healthy(poll: Callable[[], object], *, what: str, deadline: float, reporter, late, clock: Clock = SYSTEM_CLOCK):
    """wait_until with the local server's quick backoff."""
    return wait_until(poll, what=what, deadline=deadline, reporter=reporter, late=late, backoff=SERVER_BACKOFF, clock=clock)
