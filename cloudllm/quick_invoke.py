"""`cloudllm invoke` to a local endpoint on the standard library alone, so it answers in about curl's time.

The full path (cloudllm.api -> providers -> httpx) imports pydantic, rich and httpx: ~0.2 s
before the first byte is sent, several times the request itself. This one covers the plain
case only: a non-streamed request to a local endpoint recorded on this machine whose server
provably runs (its pid's command line runs the endpoint's code/serve.py). Anything else (no
record, another provider, a pending deploy, a damaged file, a server that is gone or refuses
the connection) returns None before a request is sent, and the caller takes the full path,
which reports it. An answer that is an error is reported by the full path's own functions.

The request goes to the live server's port from state.json, not through the endpoint's relay
(local_front.py): the relay keeps a URL stable for clients that saved one; this client reads
the live port on every call, so the relay's hop would buy it nothing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

_LOOPBACK_URL = re.compile(r"http://127\.0\.0\.1:(\d{1,5})")


def local_answer(name: str, body: dict, timeout: float | None, where: dict) -> Any | None:
    """The decoded answer of the local endpoint NAME to body, or None when this is not a plain local invoke."""
    port = _live_port(name, where)
    if port is None:
        return None
    import socket

    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout if timeout is not None else 300.0)
    except OSError:
        return None  # gone since we looked: the full path says so
    try:
        try:
            status, text = _post(sock, port, json.dumps(body).encode())
        except socket.timeout:
            from cloudllm.http import read_timeout, timed_out

            with read_timeout(timeout):  # the full path's own line for it
                raise timed_out(name) from None
        except (OSError, ValueError, IndexError):
            return None  # reset mid-answer or not HTTP: the full path sends it again and reports what it gets
    finally:
        sock.close()
    if status >= 400:
        from cloudllm.http import endpoint_error

        raise endpoint_error(name, status, text)
    try:
        return json.loads(text)
    except ValueError:
        return None  # not JSON: the full path decides what to show


def _post(sock: Any, port: int, payload: bytes) -> tuple[int, str]:
    """POST payload to /invocations over sock; (status, text). A plain HTTP/1.1 exchange, not http.client,
    whose import (its email parser, ssl) was ~19 ms of this path's ~45 ms of imports (BENCHMARKS.md)."""
    head = (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode("ascii") + payload)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the endpoint closed the connection before its answer")
        data += chunk
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {key.strip().lower(): value.strip() for key, _, value in (line.partition(":") for line in header_lines)}
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        rest = rest[:length]
    else:  # chunked or until the close we asked for: read it all
        while chunk := sock.recv(65536):
            rest += chunk
        if "chunked" in headers.get("transfer-encoding", "").lower():
            rest = _unchunk(rest)
    return status, rest.decode("utf-8", errors="replace")


def _unchunk(data: bytes) -> bytes:
    """The body of a chunked transfer encoding."""
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body, data = body + data[:size], data[size + 2 :]
    return body


def _live_port(name: str, where: dict) -> int | None:
    """The live server's port, when NAME is a local endpoint of this machine that provably runs."""
    if where.get("provider") not in (None, "local") or not (name.isascii() and name.replace("-", "").isalnum()):
        return None  # the full path validates the name and reaches other providers
    from cloudllm.home import home

    record = _read_json(home() / "endpoints" / f"{name}.json")
    if not isinstance(record, dict) or record.get("provider") != "local" or record.get("name") != name or record.get("pending"):
        return None
    state = _read_json(home() / "local" / name / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("artifact"), str) or not isinstance(state.get("url"), str):
        return None
    found = _LOOPBACK_URL.fullmatch(state["url"])
    pid = state.get("pid")
    if found is None or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return None
    return int(found.group(1)) if _runs_serve_py(pid, str(Path(state["artifact"]) / "code" / "serve.py")) else None


def _runs_serve_py(pid: int, serve_py: str) -> bool:
    """pid is alive and runs serve_py (a recycled pid runs something else); False without /proc, where the full path checks."""
    try:
        os.kill(pid, 0)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return serve_py.encode() in argv


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
