"""A fault-injecting reverse proxy for testing cloudllm against the emulators through an unreliable network.

    with FaultProxy(emulator.url, rate=0.2, seed=1, flavour="aws") as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url   # boto3 now talks to the emulator through it
        ...

Each request is forwarded to the target unless a seeded draw makes it fail. A failure is one of:

- ``throttle``: the service's own throttling answer (AWS JSON: 400 ThrottlingException; S3 and
  the query APIs: 503 SlowDown; Google: 429 RESOURCE_EXHAUSTED);
- ``error``: a 500 internal error in the protocol's shape;
- ``drop``: the connection is closed before the request reaches the target;
- ``drop_after``: the request IS forwarded and done, then the connection is closed before the
  client sees the answer: the worst case for a non-idempotent call (a create that happened,
  but the caller cannot know it).

The draws are seeded: the same sequence of requests meets the same faults (requests sent
concurrently may arrive in another order, so a run is reproducible in kind, not to the byte).
`fail_next(predicate, kind)` fails the next matching request once (a fault at an exact call);
`hold(predicate)` parks matching requests until `release()` (a deterministic place to SIGKILL
a client mid-deploy, or to line up two clients); `log` keeps "METHOD path -> outcome" of every
request, newest last, with the AWS operation name after the path.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

FAULT_KINDS = ("throttle", "error", "drop", "drop_after")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    """Reverse proxy on 127.0.0.1 that fails a seeded fraction of requests (see the module doc)."""

    def __init__(
        self,
        target: str,
        *,
        rate: float = 0.2,
        seed: int = 0,
        flavour: str = "aws",
        kinds: tuple[str, ...] = FAULT_KINDS,
        spare: Callable[[str, str], bool] | None = None,
    ):
        if flavour not in ("aws", "google"):
            raise ValueError(f"flavour must be aws or google, not {flavour!r}")
        parts = urlsplit(target)
        self.target_host, self.target_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.rate = rate
        self.flavour = flavour
        self.kinds = tuple(kinds)
        self.spare = spare  # (method, path) -> True: never fail this request
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._held: Callable[[str, str], bool] | None = None
        self._held_then = "drop"
        self.held_count = 0
        self._scripted: list[list] = []  # [predicate, kind]: the next matching request fails so, once
        self._hold_gate = threading.Event()
        self.held = threading.Event()  # set once a request has been parked by hold()
        self.log: list[str] = []
        self.counts: Counter[str] = Counter()
        self._httpd: ThreadingHTTPServer | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # --- control --------------------------------------------------------------------------
    def hold(self, predicate: Callable[[str, str], bool], *, then: str = "drop") -> None:
        """Park every request for which predicate(method, operation) is true until release().

        `operation` is the path, followed by the AWS operation name for AWS JSON and query calls
        ("/ CreateEndpoint"). Once released, a parked request is dropped unanswered (then="drop":
        it never reached the service) or forwarded with its answer dropped (then="forward": it
        took effect, and its caller, by then killed, never knew), or passed through with its
        answer (then="pass": to line up concurrent callers).
        """
        if then not in ("drop", "forward", "pass"):
            raise ValueError("then must be drop, forward or pass")
        self._hold_gate.clear()
        self.held.clear()
        self.held_count = 0
        self._held, self._held_then = predicate, then

    def release(self) -> None:
        self._held = None
        self._hold_gate.set()

    def race(self, runs: list[tuple[list[str], dict]], predicate: Callable[[str, str], bool]) -> list[subprocess.CompletedProcess]:
        """Start the commands (args, extra env) at once; park their calls matching predicate until each has
        made one, then let them all through together: two pipelines deploying one endpoint at the same moment."""
        self.hold(predicate, then="pass")
        processes = [subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, env in runs]
        try:
            for _ in range(2400):  # a bound, not a duration: each turn waits for the next parked call
                if self.held_count >= len(runs) or any(p.poll() is not None for p in processes):
                    break
                self.held.wait(timeout=0.1)
                self.held.clear()
            assert self.held_count == len(runs), [(p.poll(), p.stderr.read() if p.poll() is not None else "") for p in processes]
            self.release()
            outputs = [p.communicate(timeout=300) for p in processes]
        finally:
            self.release()
            for p in processes:
                if p.poll() is None:
                    p.kill()
        return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]

    def configure(self, *, rate: float, seed: int = 0) -> None:
        """Fail `rate` of the requests from now on, drawn from a fresh RNG seeded with `seed`."""
        with self._lock:
            self.rate, self._random = rate, random.Random(seed)
            self.log.clear()
            self.counts.clear()

    def fail_next(self, predicate: Callable[[str, str], bool], kind: str) -> None:
        """Fail the next request for which predicate(method, operation) is true with `kind`, once."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}")
        with self._lock:
            self._scripted.append([predicate, kind])

    @property
    def unfired(self) -> int:
        """How many fail_next() faults have not met their request yet."""
        with self._lock:
            return len(self._scripted)

    def _draw(self, method: str, path: str) -> str | None:
        with self._lock:
            for entry in self._scripted:
                if entry[0](method, path):
                    self._scripted.remove(entry)
                    return entry[1]
        if self.spare is not None and self.spare(method, path):
            return None
        with self._lock:
            if self.rate <= 0 or self._random.random() >= self.rate:
                return None
            return self._random.choice(self.kinds)

    def _note(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append(f"{method} {path} -> {outcome}")
            self.counts[outcome] += 1

    # --- the faults' bodies, in each protocol's shape -----------------------------------------
    def fault_response(self, kind: str, headers) -> tuple[int, dict[str, str], bytes]:
        if self.flavour == "google":
            status, reason = (429, "RESOURCE_EXHAUSTED") if kind == "throttle" else (500, "INTERNAL")
            body = {"error": {"code": status, "message": f"injected fault: {reason}", "status": reason}}
            return status, {"Content-Type": "application/json"}, json.dumps(body).encode()
        if headers.get("X-Amz-Target"):  # the JSON protocols (SageMaker, Application Auto Scaling, Logs)
            code, status = ("ThrottlingException", 400) if kind == "throttle" else ("InternalFailure", 500)
            body = {"__type": code, "message": f"injected fault: {code}"}
            return status, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(body).encode()
        code, status = ("SlowDown", 503) if kind == "throttle" else ("InternalError", 500)
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected fault</Message><RequestId>fault</RequestId></Error>"
        return status, {"Content-Type": "application/xml"}, body.encode()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # clients reset connections the proxy dropped, and dropped ones reset back: expected here


def _handler_for(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _drop(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _handle(self) -> None:
            method, path = self.command, self.path
            body = self._body()
            target = self.headers.get("X-Amz-Target")
            if target:  # name the operation in the log: AWS JSON calls all go to POST /
                path = f"{path} {target.rsplit('.', 1)[-1]}"
            elif method == "POST" and path == "/" and body.startswith(b"Action="):
                path = f"/ {body.split(b'&', 1)[0][len(b'Action='):].decode(errors='replace')}"
            request_path = self.path
            held = proxy._held
            if held is not None and held(method, path):
                then = proxy._held_then
                proxy._note(method, path, "held")
                with proxy._lock:
                    proxy.held_count += 1
                proxy.held.set()
                proxy._hold_gate.wait()
                kind = {"drop": "drop", "forward": "drop_after", "pass": None}[then]
            else:
                kind = proxy._draw(method, path)
            if kind in ("throttle", "error"):
                status, headers, payload = proxy.fault_response(kind, self.headers)
                proxy._note(method, path, kind)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if kind == "drop":
                proxy._note(method, path, kind)
                self._drop()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or "Content-Length" in self.headers or self.headers.get("Transfer-Encoding"):
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=300)
            try:
                upstream.request(method, request_path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
            finally:
                upstream.close()
            if kind == "drop_after":
                proxy._note(method, path, kind)
                self._drop()
                return
            proxy._note(method, path, str(response.status))
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP and (key.lower() != "content-length" or method == "HEAD"):
                    self.send_header(key, value)
            if method != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

    return Handler


def one_wins(results: list[subprocess.CompletedProcess], loser_says: str) -> tuple[int, int]:
    """Of two raced CLI runs, one succeeded and the other failed with one clear line saying loser_says: (winner, loser)."""
    assert sorted(r.returncode for r in results) == [0, 1], [(r.returncode, r.stderr[-2000:]) for r in results]
    winner = next(i for i, r in enumerate(results) if r.returncode == 0)
    loser = results[1 - winner]
    assert "Traceback" not in loser.stderr
    last = loser.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and loser_says in last, last
    return winner, 1 - winner
