"""Waiting for a cloud to finish something: one backoff rule, one poll loop, one "still running" error.

    desc = wait_until(lambda: pending_or(describe()), what="waiting for endpoint x", deadline=900,
                      reporter=reporter, late=lambda s: (f"x is still {s}", "watch `cloudllm status x`"))

Every wait of a provider goes through `wait_until`, so short waits stay snappy and long ones
cheap by the same rule, and a test drives it with a fake clock instead of sleeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed

T = TypeVar("T")


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock; time.sleep is looked up at each call, so a benchmark that records sleeps sees these."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True)
class Backoff:
    """The one rule for how long to wait between polls.

    Start at `first`, grow by `growth`, but never sleep more than a tenth of the time waited so
    far (`floor` early on): the overshoot past the thing's end stays small. `most` caps it.
    """

    first: float = 0.1
    growth: float = 1.6
    floor: float = 0.5
    most: float = 15.0

    def delays(self, clock: Clock = SYSTEM_CLOCK):
        """An endless iterator of sleeps, each computed from the time waited when it is asked for."""
        start = clock.monotonic()
        delay = min(self.first, self.most)
        while True:
            yield delay
            elapsed = clock.monotonic() - start
            delay = min(delay * self.growth, max(self.floor, elapsed / 10), self.most)


class StillRunning(DeployFailed):
    """Our deadline passed while the cloud still works on it: it may still finish, so nothing is undone."""


@dataclass(frozen=True)
class Pending(Generic[T]):
    """What a poll returns while the thing is not done: the status to show, and anything the caller wants back."""

    status: str = ""
    value: T | None = None


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
    start = clock.monotonic()
    delays = backoff.delays(clock)
    # Every raise is inside the with, so a failed wait never prints the spinner's "done".
    with (reporter or Reporter()).waiting(what) as update:
        while True:
            result = poll()
            if not isinstance(result, Pending):
                return result
            elapsed = clock.monotonic() - start
            if result.status:
                update(result.status)
            if elapsed >= deadline:
                problem, fix = late(result) if late else (f"{what} did not finish within {deadline:.0f}s", "")
                raise StillRunning(problem, fix)
            clock.sleep(max(0.0, min(next(delays), deadline - elapsed)))


def pause(seconds: float, *, what: str, reporter: Reporter | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
    """Wait a fixed time (a canary's bake), showing the seconds left every few seconds."""
    end = clock.monotonic() + seconds

    def left() -> object:
        remaining = end - clock.monotonic()
        return Pending(f"{remaining:.0f}s left") if remaining > 0 else None

    wait_until(left, what=what, deadline=seconds, reporter=reporter, backoff=Backoff(first=5.0, growth=1.0, floor=5.0, most=5.0), clock=clock)
