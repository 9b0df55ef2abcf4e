"""The hidden wake (cloudllm/wake.py) with a fake clock: retries through Waking, a progress line, one error line."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from cloudllm.console import Reporter
from cloudllm.errors import UserError
from cloudllm.types import Waking
from cloudllm.wake import WAKE_BACKOFF, stream_through_wake, through_wake
from tests.providers.test_kit import FakeClock


class Lines(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    @contextmanager
    def waiting(self, message: str):
        self.lines.append(message)
        yield self.lines.append


def waking_until(clock: FakeClock, awake_at: float, answer="done"):
    calls = []

    def call():
        calls.append(clock.now)
        if clock.now < awake_at:
            raise Waking("copy starting")
        return answer

    return call, calls


def test_an_awake_endpoint_answers_at_once_without_a_line() -> None:
    clock, lines = FakeClock(), Lines()
    call, calls = waking_until(clock, 0.0)
    assert through_wake(call, name="e", wake_timeout=60, reporter=lines, clock=clock) == "done"
    assert calls == [0.0] and clock.sleeps == [] and lines.lines == []


def test_the_wait_retries_with_backoff_and_says_so() -> None:
    clock, lines = FakeClock(), Lines()
    call, calls = waking_until(clock, 40.0)
    assert through_wake(call, name="e", wake_timeout=60, reporter=lines, clock=clock) == "done"
    assert calls[-1] >= 40.0 and len(calls) > 3
    assert clock.sleeps[0] == WAKE_BACKOFF.first and max(clock.sleeps) <= WAKE_BACKOFF.most
    assert lines.lines[0] == "waking e from zero" and set(lines.lines[1:]) == {"no capacity yet: copy starting"}


def test_past_the_timeout_it_is_one_user_error() -> None:
    clock = FakeClock()
    call, _ = waking_until(clock, 1e9)
    with pytest.raises(UserError) as error:
        through_wake(call, name="e", wake_timeout=30, clock=clock)
    line = error.value.line()
    assert "endpoint e did not wake from zero within 30s (copy starting)" in line and "--wake-timeout" in line
    assert clock.now == pytest.approx(30.0)  # the last sleep stops at the deadline


def test_zero_timeout_asks_once() -> None:
    clock = FakeClock()
    call, calls = waking_until(clock, 1e9)
    with pytest.raises(UserError):
        through_wake(call, name="e", wake_timeout=0, clock=clock)
    assert calls == [0.0]


def test_a_stream_restarts_only_before_its_first_piece() -> None:
    clock = FakeClock()
    starts = []

    def start():
        starts.append(clock.now)
        if clock.now < 5:
            raise Waking("copy starting")
        yield "a"
        yield "b"

    assert list(stream_through_wake(start, name="e", wake_timeout=60, clock=clock)) == ["a", "b"]
    assert len(starts) > 1

    def breaks_later():
        yield "a"
        raise Waking("lost the copy")

    pieces = stream_through_wake(breaks_later, name="e", wake_timeout=60, clock=clock)
    assert next(pieces) == "a"
    with pytest.raises(Waking):  # pieces already reached the caller: not retried
        next(pieces)
