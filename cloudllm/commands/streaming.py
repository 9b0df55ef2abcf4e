"""Streams read so that Ctrl-C always ends them at once (chat, invoke --stream, --chat, --grpc)."""

from __future__ import annotations

from typing import Iterator


def pieces_interruptibly(pieces: Iterator[str]) -> Iterator[str]:
    """pieces, read by a helper thread so that Ctrl-C always ends the stream at once.

    A SIGINT that lands just before the socket read blocks is only noted, and the read waits for the
    next token (for ever from a stalled server, up to the read timeout). Here the main thread waits in
    short steps and so always sees it; the helper closes the stream (the server stops generating) as
    soon as its read returns.
    """
    import queue
    import threading

    handed: queue.Queue = queue.Queue()
    stop = threading.Event()
    end = object()

    def read() -> None:
        try:
            for piece in pieces:
                if stop.is_set():
                    break
                handed.put(piece)
            handed.put(end)
        except BaseException as exc:  # handed to the main thread, which raises it there
            handed.put(exc)
        finally:
            getattr(pieces, "close", lambda: None)()

    threading.Thread(target=read, name="cloudllm-stream-reader", daemon=True).start()
    try:
        while True:
            try:
                item = handed.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
