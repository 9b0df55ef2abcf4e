"""Progress for people, quiet for machines.

Spinners and bars go to stderr and only when stderr is a terminal and CI is unset;
results go to stdout. The Python API gets a silent Reporter by default.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


class Reporter:
    """Silent progress sink; the API's default."""

    def step(self, message: str) -> None:
        """A finished step worth a line ("uploaded 3 files")."""

    @contextmanager
    def waiting(self, message: str) -> Iterator[Callable[[str], None]]:
        """A wait with a live status line; yields a function that updates it."""
        yield lambda status: None

    @contextmanager
    def transfer(self, total_bytes: int, description: str) -> Iterator[Callable[[int], None]]:
        """A byte transfer; yields a function that advances it by n bytes (thread-safe)."""
        yield lambda n: None


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class PlainReporter(Reporter):
    """One line per step on stderr: for CI logs and pipes."""

    def step(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    HEARTBEAT_SECONDS = 30.0

    @contextmanager
    def waiting(self, message: str) -> Iterator[Callable[[str], None]]:
        print(f"{message}...", file=sys.stderr, flush=True)
        start = time.monotonic()
        last = {"status": "", "at": start}

        # A CI log wants a line per change of state, and a heartbeat on long waits, not one per poll.
        def update(status: str) -> None:
            now = time.monotonic()
            if status != last["status"] or now - last["at"] >= self.HEARTBEAT_SECONDS:
                last.update(status=status, at=now)
                print(f"  {status} ({now - start:.0f}s)", file=sys.stderr, flush=True)

        yield update
        print(f"{message}: done in {time.monotonic() - start:.1f}s", file=sys.stderr, flush=True)

    @contextmanager
    def transfer(self, total_bytes: int, description: str) -> Iterator[Callable[[int], None]]:
        start = time.monotonic()
        yield lambda n: None
        elapsed = max(time.monotonic() - start, 1e-6)
        print(f"{description}: {human_bytes(total_bytes)} in {elapsed:.1f}s", file=sys.stderr, flush=True)


class RichReporter(Reporter):
    """Spinners and progress bars on a terminal."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    def step(self, message: str) -> None:
        self.console.print(f"[green]✓[/green] {message}", highlight=False)

    @contextmanager
    def waiting(self, message: str) -> Iterator[Callable[[str], None]]:
        start = time.monotonic()
        with self.console.status(message) as status:
            yield lambda text: status.update(f"{message}: {text} ({time.monotonic() - start:.0f}s)")
        self.step(f"{message} ({time.monotonic() - start:.1f}s)")

    @contextmanager
    def transfer(self, total_bytes: int, description: str) -> Iterator[Callable[[int], None]]:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            task = progress.add_task(description, total=total_bytes)
            yield lambda n: progress.advance(task, n)
        self.step(f"{description}: {human_bytes(total_bytes)}")


def default_reporter() -> Reporter:
    return RichReporter() if interactive() else PlainReporter()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
