"""Waiting for a cloud to finish something: one backoff rule, one poll loop, one "still running" error.

    desc = wait_until(lambda: pending_or(describe()), what="waiting for endpoint x", deadline=900,
                      reporter=reporter, late=lambda s: (f"x is still {s}", "watch `cloudllm status x`"))

Every wait of a provider goes through `wait_until`, so short waits stay snappy and long ones
cheap by the same rule, and a test drives it with a fake clock instead of sleeping. The rule and
the loop are cloudllm_procs' (the emulators poll with them too); this adds the spinner and the error.
"""

from __future__ import annotations

from typing import Callable

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed
from cloudllm_procs.waiting import SYSTEM_CLOCK, Backoff, Clock, Pending, SystemClock, poll_until

__all__ = ["SYSTEM_CLOCK", "Backoff", "Clock", "Pending", "StillRunning", "SystemClock", "pause", "wait_until"]


class StillRunning(DeployFailed):
    """Our deadline passed while the cloud still works on it: it may still finish, so nothing is undone."""


def wait_until(
    poll: Callable[[], object],
    *,
    what: str,
    deadline: float,
    reporter: Reporter | None = None,
    late: Callable[[Pending], tuple[str, str]] | None = None,
    backoff: Backoff = Backoff(),
    clock: Clock = SYSTEM_CLOCK,
):
    """Call poll() until it returns something other than a Pending; return that.

    poll raises to fail the wait. Once `deadline` seconds have passed and poll is still Pending,
    raise StillRunning with late(last pending) as (problem, fix), or a generic line.
    """
    # Every raise is inside the with, so a failed wait never prints the spinner's "done".
    with (reporter or Reporter()).waiting(what) as update:
        result = poll_until(poll, deadline=deadline, backoff=backoff, clock=clock, on_pending=lambda p: p.status and update(p.status))
        if isinstance(result, Pending):
            problem, fix = late(result) if late else (f"{what} did not finish within {deadline:.0f}s", "")
            raise StillRunning(problem, fix)
        return result


def pause(seconds: float, *, what: str, reporter: Reporter | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
    """Wait a fixed time (a canary's bake), showing the seconds left every few seconds."""
    end = clock.monotonic() + seconds

    def left() -> object:
        remaining = end - clock.monotonic()
        return Pending(f"{remaining:.0f}s left") if remaining > 0 else None

    wait_until(left, what=what, deadline=seconds, reporter=reporter, backoff=Backoff(first=5.0, growth=1.0, floor=5.0, most=5.0), clock=clock)
