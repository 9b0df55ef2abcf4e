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
    import http.client
    import socket

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout if timeout is not None else 300.0)
    try:
        try:
            conn.connect()
        except OSError:
            return None  # gone since we looked: the full path says so
        try:
            conn.request("POST", "/invocations", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            status, text = response.status, response.read().decode("utf-8", errors="replace")
        except socket.timeout:
            from cloudllm.http import read_timeout, timed_out

            with read_timeout(timeout):  # the full path's own line for it
                raise timed_out(name) from None
    finally:
        conn.close()
    if status >= 400:
        from cloudllm.http import endpoint_error

        raise endpoint_error(name, status, text)
    return json.loads(text)


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
