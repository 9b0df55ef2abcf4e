"""Polling: one backoff rule and one poll loop, driven by a clock a test can fake."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar

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


# A process on this machine starts in seconds: poll it often, at most every half second.
SERVER_BACKOFF = Backoff(first=0.05, growth=1.5, floor=0.5, most=0.5)


@dataclass(frozen=True)
class Pending(Generic[T]):
    """What a poll returns while the thing is not done: the status to show, and anything the caller wants back."""

    status: str = ""
    value: T | None = None


def poll_until(
    poll: Callable[[], object],
    *,
    deadline: float,
    backoff: Backoff = Backoff(),
    clock: Clock = SYSTEM_CLOCK,
    on_pending: Callable[[Pending], object] | None = None,
) -> object:
    """Call poll() until it returns something other than a Pending, and return that; once `deadline`
    seconds have passed with poll still Pending, return that last Pending. poll raises to stop early."""
    start = clock.monotonic()
    delays = backoff.delays(clock)
    while True:
        result = poll()
        if not isinstance(result, Pending):
            return result
        if on_pending is not None:
            on_pending(result)
        elapsed = clock.monotonic() - start
        if elapsed >= deadline:
            return result
        clock.sleep(max(0.0, min(next(delays), deadline - elapsed)))
