"""Deploy round trip: the tiny GPT-2 to the SageMaker and Vertex AI emulators, wall time and API calls.

The emulators run as separate processes (`cloudllm emulate sagemaker|vertex`) and really
host the endpoint: the model server starts and must answer /ping before the endpoint is
InService / the DeployModel operation is done, so the wait is real work, not a canned
state. In this process cloudllm deploys through its Python API (what the CLI calls), and:

- every AWS API call is counted at botocore (`BaseClient._make_api_call`: one per
  operation, retries included in the HTTP attempt count from `Endpoint._send`);
- every Google API request (Cloud Storage and Vertex AI REST) is counted at
  `requests.Session.send`, the transport both clients use;
- every `time.sleep` of the deploy is recorded: the waits must poll adaptively, so no
  single sleep is long against the work it waits for.

Measured: create, invoke, an unchanged re-deploy (must change nothing), an autoscaling-only
update (in place) beside a serving-setting update (blue/green, a new version), and delete.

    python -m benchmarks.bench_deploy
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_staging import Emulator  # noqa: E402
from benchmarks.common import save, scoped_env, table  # noqa: E402


class Calls:
    """Counts API calls and HTTP requests made by this process, and the sleeps of the deploying thread."""

    def __init__(self) -> None:
        self.operations: collections.Counter[str] = collections.Counter()
        self.http = 0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def counting(self):
        import botocore.client
        import botocore.endpoint
        import requests

        make_api_call, send, session_send, sleep = (
            botocore.client.BaseClient._make_api_call, botocore.endpoint.Endpoint._send, requests.Session.send, time.sleep,
        )  # fmt: skip
        calls, deployer = self, threading.get_ident()

        def counted_api_call(client, operation, params):
            with calls._lock:
                calls.operations[f"{client.meta.service_model.service_name}:{operation}"] += 1
            return make_api_call(client, operation, params)

        def counted_send(endpoint, request):
            with calls._lock:
                calls.http += 1
            return send(endpoint, request)

        def counted_session_send(session, request, **kwargs):
            with calls._lock:
                calls.http += 1
                calls.operations[_google_operation(request.method, request.url)] += 1
            return session_send(session, request, **kwargs)

        def recorded_sleep(seconds):
            if threading.get_ident() == deployer:
                calls.sleeps.append(seconds)
            return sleep(seconds)

        botocore.client.BaseClient._make_api_call = counted_api_call
        botocore.endpoint.Endpoint._send = counted_send
        requests.Session.send = counted_session_send
        time.sleep = recorded_sleep
        try:
            yield self
        finally:
            botocore.client.BaseClient._make_api_call = make_api_call
            botocore.endpoint.Endpoint._send = send
            requests.Session.send = session_send
            time.sleep = sleep

    def summary(self) -> dict:
        return {
            "api_calls": sum(self.operations.values()),
            "http_requests": self.http,
            "by_operation": dict(sorted(self.operations.items())),
            "sleeps": len(self.sleeps),
            "sleep_total_seconds": round(sum(self.sleeps), 3),
            "longest_sleep_seconds": round(max(self.sleeps, default=0.0), 3),
        }


def _google_operation(method: str, url: str) -> str:
    """"METHOD /path" with ids replaced, so repeated polls of one operation add up under one name."""
    import re
    from urllib.parse import urlsplit

    path = urlsplit(url).path
    path = re.sub(r"/(operations|endpoints|models|o)/[^/:]+", r"/\1/{id}", path)
    path = re.sub(r"/b/[^/]+", "/b/{bucket}", path)
    service = "storage" if "/storage/" in path or "/upload/" in path or "/b/" in path else "vertex"
    return f"{service}:{method} {path}"


def measure(step: str, fn) -> dict:
    calls = Calls()
    with calls.counting():
        start = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - start
    figures = {"step": step, "wall_seconds": wall, **calls.summary()}
    if result is not None and hasattr(result, "action"):
        figures["action"] = result.action
    return figures


def round_trip(model: Path, emulator_args: tuple[str, ...], name: str, **deploy_kwargs) -> list[dict]:
    """Create, invoke, deploy again unchanged and delete one endpoint on an emulator, each step measured."""
    from cloudllm import api

    with Emulator(*emulator_args):
        steps = [measure("create", lambda: api.deploy(model, name=name, **deploy_kwargs))]
        steps.append(measure("invoke", lambda: api.invoke(name, "Once upon a time", parameters={"max_new_tokens": 8})))
        steps.append(measure("unchanged re-deploy", lambda: api.deploy(model, name=name, **deploy_kwargs)))
        # The same kind of change two ways: autoscaling alone is made in place; a serving setting
        # (code/settings.json) needs a new version, a blue/green update with a second fleet.
        steps.append(measure("autoscaling-only update (in place)", lambda: api.deploy(model, name=name, max_instances=2, **deploy_kwargs)))
        steps.append(measure(
            "serving-setting update (blue/green)",
            lambda: api.deploy(model, name=name, max_instances=2, serving={"max_new_tokens": 512}, **deploy_kwargs),
        ))  # fmt: skip
        steps.append(measure("delete", lambda: api.delete(name)))
        return steps


def sagemaker(model: Path) -> list[dict]:
    return round_trip(
        model, ("sagemaker", "--port", "0"), "bench-sm", provider="sagemaker", runtime="handler", instance="ml.m5.xlarge",
        bucket="s3://cloudllm-emulator/models", options={"role": "arn:aws:iam::123456789012:role/cloudllm-emulator-sagemaker"},
    )  # fmt: skip


def vertex(model: Path) -> list[dict]:
    return round_trip(
        model, ("vertex", "--port", "0", "--storage-port", "0", "--bucket", "bench"), "bench-vx",
        provider="vertex", runtime="handler", instance="n1-standard-4", bucket="gs://bench/models",
    )  # fmt: skip


def main() -> dict:
    from cloudllm.testing.tiny_models import build_tiny_gpt2

    work = Path(tempfile.mkdtemp(prefix="cloudllm-bench-deploy-", dir="/tmp"))
    try:
        with scoped_env(CLOUDLLM_HOME=str(work / "home")):
            model = build_tiny_gpt2(work / "tiny-gpt2")
            results: dict = {"model": "tiny gpt2 (n_layer=2, n_embd=64)"}
            for provider, run in (("sagemaker", sagemaker), ("vertex", vertex)):
                steps = run(model)
                results[provider] = steps
                rows = [
                    (s["step"], s["wall_seconds"], s["api_calls"], s["http_requests"], s["sleeps"], s["sleep_total_seconds"], s["longest_sleep_seconds"])
                    for s in steps
                ]
                print(f"\n{provider}:\n" + table(["step", "wall s", "API calls", "HTTP requests", "sleeps", "slept s", "longest sleep s"], rows))
                print(f"create calls: {steps[0]['by_operation']}")
        save("deploy", results)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
