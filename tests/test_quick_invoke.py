"""cloudllm/quick_invoke.py: a broken answer from a local port is the full path's to report, never a traceback."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from cloudllm import quick_invoke


def _answer_from_a_socket(answer: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    """local_answer's result when a real socket server on loopback reads the request and sends `answer`."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    monkeypatch.setattr(quick_invoke, "_live_port", lambda name, where: port)  # the record lookup is not under test
    try:
        return quick_invoke.local_answer("demo", {"inputs": "hi"}, 30, {"provider": None})
    finally:
        thread.join(30)
        server.close()


@pytest.mark.parametrize("answer", [b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnot{}", b"HTTP/1.1 abc\r\n\r\n"])
def test_a_broken_answer_falls_through_to_the_full_path(answer: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed connection, no HTTP, or a non-JSON body: local_answer returns None (the full CLI then
    sends the request itself and says what went wrong)."""
    assert _answer_from_a_socket(answer, monkeypatch) is None


def test_a_chunked_answer_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[{"g\r\n16\r\nenerated_text": "ok"}]\r\n0\r\n\r\n'
    assert _answer_from_a_socket(chunked, monkeypatch) == [{"generated_text": "ok"}]
