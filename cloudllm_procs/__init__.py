"""Processes on this machine: start one in a group of its own, wait until it is ready, prove a pid is
still ours, stop its group; and the one poll loop and backoff rule that waiting uses.

It knows nothing of clouds or of cloudllm: the local provider (cloudllm/providers/kit/) and the
emulators (an oracle, which may not import cloudllm) both build on it. It imports only the
standard library.
"""

from cloudllm_procs.process import MARKER_ENV, alive, kill, runs, start, stop
from cloudllm_procs.waiting import SERVER_BACKOFF, SYSTEM_CLOCK, Backoff, Clock, Pending, SystemClock, poll_until

__all__ = [
    "MARKER_ENV", "SERVER_BACKOFF", "SYSTEM_CLOCK", "Backoff", "Clock", "Pending", "SystemClock",
    "alive", "kill", "poll_until", "runs", "start", "stop",
]  # fmt: skip
