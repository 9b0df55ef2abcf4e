"""Processes of our own: start one in a process group of its own, prove a pid is still ours, stop its group.

A pid is signalled only while it provably runs what we started: its command line has the marker
we kept, or (for commands with nothing unique in them) its environment carries the marker that
`start` put there. A pid the kernel has since given to another process has neither, so a stale
record or a server that exited long ago never gets another process killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

from cloudllm_procs.waiting import SYSTEM_CLOCK, Backoff, Clock, Pending, poll_until

# The environment variable `start(marker=...)` sets, which `alive` reads back from /proc/PID/environ.
MARKER_ENV = "CLOUDLLM_PROCS_MARKER"
_STOP_BACKOFF = Backoff(first=0.05, floor=0.05, most=0.05)
_EXEC_SETTLE_SECONDS = 1.0


def start(
    argv: list[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    stdout: int | IO | None = None,
    marker: str | None = None,
) -> subprocess.Popen:
    """Start argv in a session of its own (it outlives our Ctrl-C; `stop` signals its whole group).

    Output goes to log_path (appended), else to stdout (e.g. subprocess.PIPE). With a marker, the
    process's environment carries it, so `alive(pid, marker)` proves the pid is this process.
    """
    if marker is not None:
        env = {**(os.environ if env is None else env), MARKER_ENV: marker}
    if log_path is not None:
        with open(log_path, "ab") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    start_new_session=True)  # fmt: skip
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)


def alive(pid: int | None, marker: str | None) -> bool:
    """True when pid runs and provably is ours: marker is one of its command line's arguments or the
    marker `start` put in its environment. A process we cannot prove is ours (another user's, no marker) is not."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or not marker:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: another user's process, never ours
        return False
    # A process we have just started may still be inside execve: its errpipe closed on exec (so Popen
    # has returned) before the kernel filled in the new command line and environment, which read empty
    # for those microseconds. Look again until they settle rather than call our own process a stranger.
    settle_by = time.monotonic() + _EXEC_SETTLE_SECONDS
    while True:
        if runs(pid, marker) or _carries(pid, marker):
            return True
        if not _mid_exec(pid) or time.monotonic() > settle_by:
            return False
        time.sleep(0.002)


def _mid_exec(pid: int) -> bool:
    """pid is a user process whose command line is empty (exec under way), not a zombie or a kernel thread."""
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return False
    return state not in ("Z", "X") and ppid != "2" and pid != 2  # kthreadd (2) and its children have no command line


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


def _carries(pid: int, marker: str) -> bool:
    """pid's environment has MARKER_ENV=marker (readable for our own processes only). Without /proc, ps -E says."""
    wanted = f"{MARKER_ENV}={marker}"
    try:
        return wanted.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        if Path("/proc/self").exists():
            return False
        shown = subprocess.run(["ps", "-E", "-ww", "-o", "command=", "-p", str(pid)], capture_output=True, text=True).stdout
        return wanted in shown.split()


def kill(pid: int | None, marker: str | None, sig: int = signal.SIGTERM) -> bool:
    """Send sig to the process group of pid, if pid is still ours; whether it was sent."""
    if not alive(pid, marker):
        return False
    try:
        os.killpg(pid, sig)  # type: ignore[arg-type]
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop(pid: int | None, marker: str | None, *, grace: float = 10.0, clock: Clock = SYSTEM_CLOCK) -> None:
    """SIGTERM the process group of pid, if pid is still ours; SIGKILL it after `grace` seconds."""
    if not kill(pid, marker, signal.SIGTERM):
        return
    assert pid is not None

    def exited() -> object:
        # An exited child of ours stays a zombie, with no command line and no environment, until its
        # Popen (or our exit) reaps it: not alive, and its return code is left for the Popen to read.
        return Pending() if alive(pid, marker) else True

    if isinstance(poll_until(exited, deadline=grace, backoff=_STOP_BACKOFF, clock=clock), Pending):  # it ignored SIGTERM
        kill(pid, marker, signal.SIGKILL)
