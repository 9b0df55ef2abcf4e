"""Protocols: OpenAI's /v1/chat/completions against the native route, and `cloudllm proxy` against a direct call.

A GPT-2 of 4 layers, 256 wide (random weights, built offline) with a chat template is packaged
with `cloudllm package`; its `code/serve.py` runs as a subprocess on loopback, as in the
container. The prompt the template renders is sent to the native routes (`/generate`,
`/generate_stream`), the messages to `/v1/chat/completions`, greedy, 32 new tokens, the two
alternating request by request over ROUNDS rounds: time to first token (first event with text)
and whole-answer latency, p50 of each. Then the proxy (`cloudllm.proxy`, in its own process
as `cloudllm proxy` runs it) in front of the same server: /v1/completions with max_tokens 1, so
the model's share is small, direct against through the proxy, alternating; the proxy's cost is
the difference of the p50s. 2 shared CPU cores, no GPU.

Goals (issue 16): chat TTFT and p50 within 5% of the native route's; the proxy adds under 5 ms.

    python -m benchmarks.bench_protocols
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import save, table  # noqa: E402

ROUNDS = 40
PROXY_ROUNDS = 200
NEW_TOKENS = 32
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time there was a tiny model"}]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GOALS = {"chat_ttft_ratio_max": 1.05, "chat_p50_ratio_max": 1.05, "proxy_added_ms_max": 5.0}

PROXY_SCRIPT = """\
import sys, types, uvicorn
from cloudllm.proxy import create_proxy_app
from cloudllm_runtime.server import bind_socket, write_port_file
sock = bind_socket("127.0.0.1", 0)
write_port_file(sys.argv[2], sock.getsockname()[1])
app = create_proxy_app("bench", types.SimpleNamespace(name="local"), upstream=sys.argv[1])
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")).run(sockets=[sock])
"""


def build(folder: Path) -> Path:
    from cloudllm import api
    from cloudllm.testing.tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(folder / "model", n_layer=4, n_embd=256)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    api.package(model, folder / "artifact")
    return folder / "artifact"


def start(command: list[str], port_file: Path, log: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{command[:3]} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return process, f"http://127.0.0.1:{int(port_file.read_text())}"


def wait_ready(url: str) -> None:
    import httpx

    while True:
        try:
            if httpx.get(url + "/ping", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def timed_stream(client, url: str, body: dict) -> tuple[float, float]:
    """(seconds to the first event carrying text, seconds to the end of the stream)."""
    started = time.perf_counter()
    first = None
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if first is None and line.startswith("data:") and _has_text(line[5:].strip()):
                first = time.perf_counter() - started
    return first if first is not None else float("nan"), time.perf_counter() - started


def _has_text(payload: str) -> bool:
    if payload == "[DONE]":
        return False
    event = json.loads(payload)
    if "choices" in event:
        choice = (event["choices"] or [{}])[0]
        return bool((choice.get("delta") or {}).get("content") or choice.get("text"))
    return bool((event.get("token") or {}).get("text"))


def timed_post(client, url: str, body: dict) -> float:
    started = time.perf_counter()
    response = client.post(url, json=body)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    import httpx
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-protocols-") as tmp:
        folder = Path(tmp)
        artifact = build(folder)
        prompt = AutoTokenizer.from_pretrained(artifact).apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        server, url = start([sys.executable, str(artifact / "code" / "serve.py"), "serve", "--host", "127.0.0.1", "--port", "0",
                             "--port-file", str(folder / "port")], folder / "port", folder / "server.log")  # fmt: skip
        proxy = None
        try:
            wait_ready(url)
            proxy, proxy_url = start([sys.executable, "-c", PROXY_SCRIPT, url, str(folder / "proxy-port")], folder / "proxy-port", folder / "proxy.log")
            native = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS}}
            chat = {"model": "m", "messages": MESSAGES, "max_tokens": NEW_TOKENS, "temperature": 0}
            runs: dict[str, list[float]] = {k: [] for k in ("native_ttft", "chat_ttft", "native_stream", "chat_stream", "native_p50", "chat_p50")}
            with httpx.Client(timeout=120) as client:
                for warm in range(3):
                    timed_post(client, url + "/generate", native)
                    timed_post(client, url + "/v1/chat/completions", chat)
                for round_ in range(ROUNDS):
                    order = ("native", "chat") if round_ % 2 == 0 else ("chat", "native")
                    for kind in order:
                        route, body = (url + "/generate_stream", native) if kind == "native" else (url + "/v1/chat/completions", {**chat, "stream": True})
                        ttft, total = timed_stream(client, route, body)
                        runs[f"{kind}_ttft"].append(ttft)
                        runs[f"{kind}_stream"].append(total)
                        route, body = (url + "/generate", native) if kind == "native" else (url + "/v1/chat/completions", chat)
                        runs[f"{kind}_p50"].append(timed_post(client, route, body))
                short = {"model": "m", "prompt": "Once upon a time", "max_tokens": 1, "temperature": 0}
                direct, proxied = [], []
                for _ in range(10):
                    timed_post(client, url + "/v1/completions", short)
                    timed_post(client, proxy_url + "/v1/completions", short)
                for round_ in range(PROXY_ROUNDS):
                    pair = [(direct, url), (proxied, proxy_url)]
                    for sink, base in pair if round_ % 2 == 0 else pair[::-1]:
                        sink.append(timed_post(client, base + "/v1/completions", short))
        finally:
            for process in (proxy, server):
                if process is not None:
                    process.terminate()
                    process.wait(30)

    figures = {key: round(p50(values), 4) for key, values in runs.items()}
    ttft_ratio = figures["chat_ttft"] / figures["native_ttft"]
    p50_ratio = figures["chat_p50"] / figures["native_p50"]
    added_ms = (p50(proxied) - p50(direct)) * 1000
    result = {
        "rounds": ROUNDS,
        "new_tokens": NEW_TOKENS,
        "p50_seconds": figures,
        "chat_ttft_ratio": round(ttft_ratio, 3),
        "chat_p50_ratio": round(p50_ratio, 3),
        "proxy": {"rounds": PROXY_ROUNDS, "direct_p50_ms": round(p50(direct) * 1000, 2), "proxied_p50_ms": round(p50(proxied) * 1000, 2),
                  "added_ms": round(added_ms, 2)},  # fmt: skip
        "goals": GOALS,
        "met": {
            "chat_ttft": ttft_ratio <= GOALS["chat_ttft_ratio_max"],
            "chat_p50": p50_ratio <= GOALS["chat_p50_ratio_max"],
            "proxy": added_ms <= GOALS["proxy_added_ms_max"],
        },
    }
    path = save("protocols", result)
    print(table(["route", "TTFT p50 s", "stream p50 s", "whole p50 s"], [
        ["native (/generate_stream, /generate)", figures["native_ttft"], figures["native_stream"], figures["native_p50"]],
        ["OpenAI (/v1/chat/completions)", figures["chat_ttft"], figures["chat_stream"], figures["chat_p50"]],
    ]))  # fmt: skip
    print(f"chat/native: TTFT {ttft_ratio:.3f}x, p50 {p50_ratio:.3f}x; proxy adds {added_ms:.2f} ms "
          f"({result['proxy']['direct_p50_ms']} -> {result['proxy']['proxied_p50_ms']} ms); met: {result['met']}; saved {path}")  # fmt: skip


if __name__ == "__main__":
    main()
