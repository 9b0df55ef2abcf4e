"""The hidden wake: an endpoint scaled to zero answers "no capacity" until it has woken; invoke waits.

    result = through_wake(lambda: provider.invoke(name, body), name=name, wake_timeout=900, reporter=reporter)

A provider's invoke raises `types.Waking` while the endpoint has no capacity because it scaled to
zero (SageMaker's "no capacity" 400, Vertex AI's 429). The first request after an idle spell is
what wakes it, so failing it would make every first request fail: the call is repeated with the
providers' backoff, a progress line says how long it has waited, and after `wake_timeout` one
UserError line says so. A stream is retried only before its first piece: nothing has reached the
caller yet then.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

from cloudllm.console import Reporter
from cloudllm.errors import UserError
from cloudllm.providers.kit import SYSTEM_CLOCK, Backoff
from cloudllm.providers.kit.waiting import Clock

T = TypeVar("T")

DEFAULT_WAKE_TIMEOUT = 900.0  # SageMaker provisions an instance and loads the model in minutes
# A wake takes tens of seconds to minutes: ask again soon at first, then every 10 s at most.
WAKE_BACKOFF = Backoff(first=1.0, growth=1.5, floor=1.0, most=10.0)


def through_wake(
    call: Callable[[], T], *, name: str, wake_timeout: float | None, reporter: Reporter | None = None, clock: Clock = SYSTEM_CLOCK
) -> T:
    """call() until it stops raising Waking, for at most wake_timeout seconds (None: the default)."""
    from cloudllm.types import Waking

    try:
        return call()
    except Waking as first:
        waking = first
    timeout = DEFAULT_WAKE_TIMEOUT if wake_timeout is None else float(wake_timeout)
    start = clock.monotonic()
    delays = WAKE_BACKOFF.delays(clock)
    with (reporter or Reporter()).waiting(f"waking {name} from zero") as update:
        while True:
            elapsed = clock.monotonic() - start
            if elapsed >= timeout:
                raise UserError(
                    f"endpoint {name} did not wake from zero within {timeout:g}s ({waking.detail})",
                    f"it is still starting: invoke again in a minute, or wait longer with --wake-timeout {max(2 * timeout, 60):.0f}",
                )
            update(f"no capacity yet: {waking.detail}")  # the reporter adds the seconds waited
            clock.sleep(max(0.0, min(next(delays), timeout - elapsed)))
            try:
                return call()
            except Waking as again:
                waking = again


def stream_through_wake(
    start: Callable[[], Iterator[str]], *, name: str, wake_timeout: float | None, reporter: Reporter | None = None, clock: Clock = SYSTEM_CLOCK
) -> Iterator[str]:
    """The pieces of start()'s stream; a stream that raises Waking before its first piece is started again."""

    def first_piece() -> tuple[Iterator[str], list[str]]:
        pieces = iter(start())
        for piece in pieces:
            return pieces, [piece]
        return pieces, []

    pieces, head = through_wake(first_piece, name=name, wake_timeout=wake_timeout, reporter=reporter, clock=clock)
    yield from head
    yield from pieces
