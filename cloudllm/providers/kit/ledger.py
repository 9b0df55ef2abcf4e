"""What one run created, and the one policy for undoing it when the run fails.

    ledger = Ledger()
    with undone_on_failure(ledger, reporter):
        create_model(...);    ledger.add("model", name, lambda: delete_model(name))
        create_endpoint(...); ledger.add("endpoint", ep, lambda: delete_endpoint(ep))

On an error the entries are undone newest first, each failure kept in `ledger.left` and named
in the error's fix. A StillRunning (our deadline passed, the cloud still works) undoes nothing:
what an operation is changing cannot be removed, and it may still finish. Ctrl-C undoes, or
keeps everything for a provider whose re-run resumes an interrupted deploy (keep_on_interrupt).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from cloudllm.console import Reporter
from cloudllm.errors import UserError
from cloudllm.providers.kit.waiting import StillRunning


@dataclass
class Created:
    kind: str
    name: str
    undo: Callable[[], object]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass
class Ledger:
    entries: list[Created] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def add(self, kind: str, name: str, undo: Callable[[], object]) -> None:
        self.entries.append(Created(kind, name, undo))

    def drop(self, kind: str) -> None:
        """Forget entries of a kind: it turned out an earlier run made them, so they are not ours to remove."""
        self.entries = [e for e in self.entries if e.kind != kind]

    def has(self, kind: str, name: str | None = None) -> bool:
        return any(e.kind == kind and (name is None or e.name == name) for e in self.entries)

    def undo(self, reporter: Reporter, *, keep: Callable[[Created], str | None] | None = None) -> None:
        """Undo every entry, newest first; keep(entry) may give a reason to leave one."""
        for entry in reversed(self.entries):
            reason = keep(entry) if keep else None
            if reason:
                reporter.step(f"kept {entry}: {reason}")
                continue
            try:
                entry.undo()
                reporter.step(f"cleaned up {entry}")
            except Exception as exc:  # keep cleaning; say what is left
                problem = exc.problem if isinstance(exc, UserError) else str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                self.left.append(f"{entry} ({problem})")
        self.entries = []


def with_leftovers(exc: BaseException, left: list[str]) -> BaseException:
    """Name what the clean-up could not remove in the error's fix."""
    if left and isinstance(exc, UserError):
        exc.fix = f"{exc.fix}; not cleaned up: {'; '.join(left)}"
        exc.args = (exc.line(),)
    return exc


@contextmanager
def undone_on_failure(
    ledger: Ledger,
    reporter: Reporter,
    *,
    keep_on_interrupt: bool = False,
    still_running_fix: Callable[[], str] | None = None,
    translate: Callable[[BaseException], BaseException] = lambda exc: exc,
    keep: Callable[[Created], str | None] | None = None,
    also: Callable[[], object] | None = None,
) -> Iterator[Ledger]:
    """Run the block; on failure undo the ledger and raise translate(exc) with the leftovers in its fix.

    also: one more step to undo after the entries (putting back what the run took away).
    """
    try:
        yield ledger
    except StillRunning as exc:
        if still_running_fix is not None:
            exc.fix = still_running_fix()
            exc.args = (exc.line(),)
        raise
    except KeyboardInterrupt:
        if not keep_on_interrupt:
            _undo(ledger, reporter, keep, also)
        raise
    except BaseException as exc:
        _undo(ledger, reporter, keep, also)
        error = with_leftovers(translate(exc), ledger.left)
        if error is exc:
            raise
        raise error from None


def _undo(ledger: Ledger, reporter: Reporter, keep, also) -> None:
    ledger.undo(reporter, keep=keep)
    if also is not None:
        also()
