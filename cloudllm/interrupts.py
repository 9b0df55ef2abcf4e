"""SIGTERM as Ctrl-C, for the console script (cloudllm/entry.py) and the full CLI (cloudllm/cli.py) alike."""

from __future__ import annotations


def sigterm_interrupts() -> None:
    """SIGTERM (what CI runners and `timeout` send) unwinds like Ctrl-C, so a deploy cleans up what it
    started instead of dying with a model server half-loaded; commands with their own handler keep it."""
    import signal
    import threading

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)
