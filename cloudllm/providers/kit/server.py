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


def alive(pid: int | None, marker: str | None) -> bool:
    """True when pid runs and provably is our server: its command line has marker (a recycled pid
    runs something else). A process we cannot prove is ours (another user's, no marker) is not."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or not marker:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: another user's process, never ours
        return False
    return runs(pid, marker)


def runs(pid: int, *words: str) -> bool:
    """pid's command line has each of words as an argument (a zombie has none). Without /proc (macOS), ps says."""
    try:
        argv = [part.decode(errors="replace") for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        if Path("/proc/self").exists():
            return False
        shown = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True).stdout
        return all(word in shown for word in words)
    return all(word in argv for word in words)


def stop_server(pid: int | None, marker: str | None, *, grace: float = 10.0, clock: Clock = SYSTEM_CLOCK) -> None:
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
