"""`cloudllm invoke` to a local endpoint against `curl` of the same request, in the same run (issue 15).

The tiny GPT-2 deployed with `--provider local`; then, alternating round by round so drift in the
machine's load falls on every path alike:

  curl (relay)   curl POST to the endpoint's stable URL (the local relay, cloudllm/local_front.py);
  curl (direct)  curl POST to the live server's own port;
  invoke         `cloudllm invoke NAME PROMPT --max-new-tokens 1` (a new process each time), through
                 the console script pip writes for `cloudllm.entry:main` (pyproject.toml), made here in
                 a temp dir against this tree, so an older install's script (cloudllm.cli:main) is
                 not what is timed;
  via cli        the same invoke through cloudllm.cli.main (click first), the script before entry.py;
  python         `python -c pass` (the interpreter's own start).

and, in this process, the relay's hop alone: the same request over a new connection, relay against
direct, many times. Goals: invoke < 0.25 s on an idle machine and within 3x of curl.
Run: python -m benchmarks.bench_invoke
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BIN, save, scoped_env, table

ROUNDS = int(os.environ.get("CLOUDLLM_BENCH_INVOKE_ROUNDS", "15"))
HOPS = 200
BODY = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1}}


def _timed(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _post(url: str) -> float:
    host, port = url.removeprefix("http://").split(":")
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/invocations", json.dumps(BODY), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200, response.status
    return time.perf_counter() - start


def _entry_script(work: Path) -> str:
    """The wrapper pip writes for the console script `cloudllm = cloudllm.entry:main`."""
    script = work / "bin" / "cloudllm"
    script.parent.mkdir(parents=True)
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom cloudllm.entry import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return str(script)


def main() -> dict:
    from cloudllm.testing.tiny_models import build_tiny_gpt2

    work = Path(tempfile.mkdtemp(prefix="cloudllm-bench-invoke-", dir="/tmp"))
    env = {**os.environ, "CLOUDLLM_HOME": str(work / "home")}
    cloudllm = str(BIN / "cloudllm")
    entry_script = _entry_script(work)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    model = build_tiny_gpt2(work / "tiny-gpt2")
    subprocess.run([cloudllm, "deploy", str(model), "--provider", "local", "--name", "bench"], env=env, check=True, capture_output=True)
    try:
        state = json.loads(next((work / "home").rglob("state.json")).read_text())
        front, direct = state["front_url"], state["url"]
        body = json.dumps(BODY)
        curl = shutil.which("curl")
        paths = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "curl (relay)": [curl, "-sf", "-X", "POST", "-H", "Content-Type: application/json", "-d", body, f"{front}/invocations"],
            "curl (direct)": [curl, "-sf", "-X", "POST", "-H", "Content-Type: application/json", "-d", body, f"{direct}/invocations"],
            "cloudllm invoke": [entry_script, "invoke", "bench", "Once upon a time", "--max-new-tokens", "1"],
            # The same through click and cloudllm.cli first (the script before cloudllm/entry.py): the baseline.
            "via cloudllm.cli": [sys.executable, "-c", "import sys\nfrom cloudllm.cli import main\nmain(sys.argv[1:])",
                                 "invoke", "bench", "Once upon a time", "--max-new-tokens", "1"],
        }
        for args in paths.values():  # warm the page cache and the server
            subprocess.run(args, env=env, check=True, capture_output=True)
        walls: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(ROUNDS):
            for name, args in paths.items():
                walls[name].append(_timed(args, env))
        hop = {"direct": [], "relay": []}
        for _ in range(HOPS):
            hop["direct"].append(_post(direct))
            hop["relay"].append(_post(front))
        medians = {name: statistics.median(values) for name, values in walls.items()}
        hops = {name: statistics.median(values) for name, values in hop.items()}
        curl_s = medians["curl (relay)"]
        rows = [(name, seconds, seconds / curl_s) for name, seconds in medians.items()]
        print(table(["path", f"median wall s ({ROUNDS} rounds)", "x curl (relay)"], rows))
        print(f"relay hop: direct {hops['direct'] * 1000:.2f} ms, relay {hops['relay'] * 1000:.2f} ms, "
              f"+{(hops['relay'] - hops['direct']) * 1000:.2f} ms per request (median of {HOPS}, a new connection each)")  # fmt: skip
        result = {
            "rounds": ROUNDS, "median_seconds": medians, "invoke_over_curl": medians["cloudllm invoke"] / curl_s,
            "relay_hop_median_seconds": hops, "relay_added_seconds": hops["relay"] - hops["direct"],
            "goals": {"invoke_seconds_max": 0.25, "invoke_over_curl_max": 3.0},
        }  # fmt: skip
        save("invoke", result)
        return result
    finally:
        subprocess.run([cloudllm, "delete", "bench", "--yes"], env=env, capture_output=True)
        with scoped_env(CLOUDLLM_HOME=env["CLOUDLLM_HOME"]):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
