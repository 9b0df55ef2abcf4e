"""The served app under load: 2,000 requests at concurrency 32, valid and malformed mixed.

The tiny GPT-2 is packaged by `cloudllm package` and served by its own code/serve.py on
127.0.0.1, exactly as a container runs it. One request in four is malformed (bad JSON, wrong
types, out-of-range max_new_tokens, unknown parameters, an oversized body, ...).

Goals (issue 8): zero 5xx for the valid requests, every malformed one a 4xx, and the server's
memory flat: RSS after the load within 10% (or 50 MiB) of RSS after warm-up. RSS is also read
half-way: a leak shows as growth in the second half too, allocator warm-up only in the first.
Run: python -m benchmarks.bench_load
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import save, table

TOTAL = 2000
CONCURRENCY = 32
WARMUP = 200  # the same mix (one oversized body among them), so allocator high-water marks are reached before "before"
MALFORMED_EVERY = 4  # one request in four
MAX_NEW_TOKENS = 8
RSS_GROWTH_ALLOWED = 0.10
RSS_SLACK_BYTES = 50 * 1024 * 1024
START_TIMEOUT = 300.0

MALFORMED: list[bytes] = [
    b'{"inputs": "a",',  # truncated JSON
    b"",  # empty body
    b"\xff\xfe not utf-8",
    b"[1, 2, 3]",
    json.dumps({"inputs": 12}).encode(),
    json.dumps({"parameters": {"max_new_tokens": 4}}).encode(),
    json.dumps({"inputs": "a", "parameters": {"max_new_tokens": -1}}).encode(),
    json.dumps({"inputs": "a", "parameters": {"max_new_tokens": 10**9}}).encode(),
    json.dumps({"inputs": "a", "parameters": {"max_new_tokens": "ten"}}).encode(),
    json.dumps({"inputs": "a", "parameters": {"temperature": -1}}).encode(),
    json.dumps({"inputs": "a", "parameters": {"frobnicate": True}}).encode(),
    json.dumps({"inputs": ["a"] * 1000}).encode(),
    json.dumps({"inputs": "", "parameters": {}}).encode(),
    json.dumps({"inputs": "word " * 5000}).encode(),  # longer than max_input_tokens
]
OVERSIZED = json.dumps({"inputs": "x" * (7 * 1024 * 1024)}).encode()  # over the 6 MiB body limit
OVERSIZED_EVERY = 50  # one malformed request in 50 is the oversized body (10 in all)

PROMPTS = ["Once upon a time", "The weather today is", "In a galaxy far away", "héllo wörld 👋", "Paris is the capital of"]


def _body(index: int) -> tuple[bool, bytes]:
    """(valid?, body) for request number index: deterministic, so every run sends the same mix."""
    if index % MALFORMED_EVERY == MALFORMED_EVERY - 1:
        bad = index // MALFORMED_EVERY
        return False, OVERSIZED if bad % OVERSIZED_EVERY == OVERSIZED_EVERY - 1 else MALFORMED[bad % len(MALFORMED)]
    prompt = f"{PROMPTS[index % len(PROMPTS)]} #{index}"
    return True, json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS}}).encode()


def rss_bytes(pid: int) -> int:
    """Resident set size of pid: psutil when installed, else /proc/PID/status VmRSS."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {pid}") from None


def start_server(workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    from cloudllm import api
    from cloudllm.testing.tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(workdir / "tiny-gpt2")
    artifact = workdir / "artifact"
    api.package(model, artifact, serving={"max_new_tokens": 32, "max_input_tokens": 64, "max_total_tokens": 128})
    port_file, log_path = workdir / "port", workdir / "server.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, str(artifact / "code" / "serve.py"), "serve", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    import httpx

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}")
        if port_file.exists() and port_file.read_text().strip():
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if httpx.get(url + "/ping", timeout=5).status_code == 200:
                    return process, url, log_path
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not answer /ping within {START_TIMEOUT}s")


async def _send_all(url: str, indices: range) -> list[tuple[bool, int, float]]:
    """(valid?, status, seconds) for each request; status 0 when the connection failed."""
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one(index: int) -> tuple[bool, int, float]:
            valid, body = _body(index)
            async with gate:
                started = time.perf_counter()
                try:
                    response = await client.post(url + "/invocations", content=body, headers={"content-type": "application/json"})
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                return valid, status, time.perf_counter() - started

        return await asyncio.gather(*(one(i) for i in indices))


def _scraped_requests(url: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith('cloudllm_requests_total{route="/invocations"'))


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        process, url, log_path = start_server(Path(tmp))
        try:
            asyncio.run(_send_all(url, range(TOTAL, TOTAL + WARMUP)))
            rss_before = rss_bytes(process.pid)
            started = time.perf_counter()
            results = asyncio.run(_send_all(url, range(TOTAL // 2)))
            rss_mid = rss_bytes(process.pid)
            results += asyncio.run(_send_all(url, range(TOTAL // 2, TOTAL)))
            seconds = time.perf_counter() - started
            rss_after = rss_bytes(process.pid)
            counted = _scraped_requests(url)
            import httpx

            healthy_after = httpx.get(url + "/ping", timeout=30).status_code == 200
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        tracebacks = log_path.read_text(errors="replace").count("Traceback")

    valid = [status for ok, status, _ in results if ok]
    malformed = [status for ok, status, _ in results if not ok]
    latencies = sorted(s for ok, status, s in results if ok and status == 200)
    valid_5xx = sum(1 for s in valid if s >= 500 or s == 0)
    malformed_4xx = sum(1 for s in malformed if 400 <= s < 500)
    growth = rss_after - rss_before
    rss_flat = growth <= max(RSS_GROWTH_ALLOWED * rss_before, RSS_SLACK_BYTES)
    result = {
        "requests": TOTAL,
        "concurrency": CONCURRENCY,
        "seconds": round(seconds, 2),
        "requests_per_second": round(TOTAL / seconds, 1),
        "valid": len(valid),
        "valid_status": dict(sorted(Counter(str(s) for s in valid).items())),
        "valid_5xx_or_failed": valid_5xx,
        "valid_p50_seconds": round(latencies[len(latencies) // 2], 4) if latencies else None,
        "valid_p99_seconds": round(latencies[int(len(latencies) * 0.99)], 4) if latencies else None,
        "malformed": len(malformed),
        "malformed_status": dict(sorted(Counter(str(s) for s in malformed).items())),
        "malformed_4xx_share": round(malformed_4xx / len(malformed), 4),
        "rss_before_bytes": rss_before,
        "rss_halfway_bytes": rss_mid,
        "rss_after_bytes": rss_after,
        "rss_growth_bytes": growth,
        "metrics_counted_invocations": counted,
        "healthy_after": healthy_after,
        "tracebacks_in_server_log": tracebacks,
        "goals": {
            "zero_5xx_for_valid": valid_5xx == 0,
            "all_malformed_4xx": malformed_4xx == len(malformed),
            "rss_flat": rss_flat,
        },
    }
    mib = 1024 * 1024
    print(table(
        ["requests", "concurrency", "req/s", "valid 5xx", "malformed 4xx", "RSS before MiB", "RSS half-way MiB", "RSS after MiB",
         "valid p50 s", "valid p99 s"],
        [(TOTAL, CONCURRENCY, result["requests_per_second"], f"{valid_5xx} of {len(valid)}", f"{malformed_4xx} of {len(malformed)}",
          round(rss_before / mib, 1), round(rss_mid / mib, 1), round(rss_after / mib, 1), result["valid_p50_seconds"],
          result["valid_p99_seconds"])],
    ))  # fmt: skip
    print(f"status codes: valid {result['valid_status']}, malformed {result['malformed_status']}; goals: {result['goals']}")
    save("load", result)
    return result


if __name__ == "__main__":
    main()
