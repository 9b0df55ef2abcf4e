"""The serving image: its size, build times, a second push, and container cold start against `cloudllm serve`.

    .venv/bin/python -m benchmarks.bench_image          (needs `make containers`; ~4 minutes on 2 cores)

- size: the image and what it adds on top of its base (the offline CPU-torch base `make containers`
  makes; the CUDA PyTorch base the default build uses cannot be pulled here);
- builds: cold (the builder's cache bypassed, base kept), unchanged rebuild, runtime-only rebuild
  (a comment appended to a copy of cloudllm_runtime);
- push: to Debian's docker-registry on loopback, first and second time, layers sent;
- cold start: process or container launch to the first 200 from /ping, `cloudllm serve ARTIFACT`
  against `cloudllm serve ARTIFACT --container` (SageMaker contract), the same tiny GPT-2 artifact,
  median of 3 each, alternated so load drift falls on both.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import BIN, save, table

BASE = "localhost/cloudllm-torch-base:latest"
RUNS = 3


def _size(image: str) -> int:
    return int(json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True).stdout)[0]["Size"])


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cold_start(args: list[str], port: int) -> float:
    started = time.perf_counter()
    process = subprocess.Popen([str(BIN / "cloudllm"), "serve", *args, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"`cloudllm serve {' '.join(args)}` exited with {process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1.0).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def main() -> dict:
    from cloudllm import api
    from cloudllm.emulators.containers import LoopbackRegistry
    from cloudllm.images.build import REPO_ROOT, build_image
    from cloudllm.images.registry import RegistryLogin, copy_image
    from cloudllm.testing.tiny_models import build_tiny_gpt2

    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    cold = build_image(base=BASE, tag="cloudllm-serve:bench-cold", no_cache=True)
    unchanged = build_image(base=BASE)
    source = work / "src"
    shutil.copytree(REPO_ROOT / "containers", source / "containers")
    shutil.copytree(REPO_ROOT / "cloudllm_runtime", source / "cloudllm_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    with open(source / "cloudllm_runtime" / "__init__.py", "a") as fh:
        fh.write(f"\n# bench {time.time()}\n")
    runtime_only = build_image(base=BASE, root=source)
    builds = {"cold_s": cold.seconds, "unchanged_s": unchanged.seconds, "runtime_only_s": runtime_only.seconds}

    sizes = {"image_bytes": _size(unchanged.image), "base_bytes": _size(BASE)}
    sizes["added_bytes"] = sizes["image_bytes"] - sizes["base_bytes"]

    with LoopbackRegistry() as registry:
        import os

        os.environ["CLOUDLLM_REGISTRY_ENDPOINT"] = registry.endpoint
        uri = f"123456789012.dkr.ecr.us-east-1.amazonaws.com/{unchanged.image}"
        login = RegistryLogin("123456789012.dkr.ecr.us-east-1.amazonaws.com", "AWS", "unused")
        first = copy_image(unchanged.image_id, uri, login)
        second = copy_image(unchanged.image_id, uri, login)
    push = {"first_s": first.seconds, "first_layers_sent": first.layers_sent, "second_s": second.seconds,
            "second_layers_sent": second.layers_sent, "second_layers_skipped": second.layers_skipped}  # fmt: skip

    artifact = work / "artifact"
    api.package(build_tiny_gpt2(work / "tiny-gpt2"), artifact)
    for path in artifact.rglob("*"):
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    process_s, container_s = [], []
    for _ in range(RUNS):
        process_s.append(_cold_start([str(artifact)], _port()))
        container_s.append(_cold_start([str(artifact), "--container", "--image", unchanged.image], _port()))
    start = {"serve_s": statistics.median(process_s), "container_s": statistics.median(container_s), "runs": {"serve": process_s, "container": container_s}}
    start["ratio"] = start["container_s"] / start["serve_s"]
    subprocess.run(["podman", "rmi", cold.image, runtime_only.image], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)

    print(table(["build", "seconds"], [["cold (no cache, base kept)", cold.seconds], ["unchanged rebuild", unchanged.seconds], ["runtime-only rebuild", runtime_only.seconds]]))
    print(table(["image", "MB"], [["serving image", sizes["image_bytes"] / 1e6], ["its base (CPU torch)", sizes["base_bytes"] / 1e6], ["added by the Dockerfile", sizes["added_bytes"] / 1e6]]))
    print(table(["push", "seconds", "layers sent"], [["first", first.seconds, first.layers_sent], ["second, unchanged", second.seconds, second.layers_sent]]))
    print(table(["to first /ping 200", "median s"], [["cloudllm serve", start["serve_s"]], ["cloudllm serve --container", start["container_s"]], ["ratio", start["ratio"]]]))
    result = {"builds": builds, "sizes": sizes, "push": push, "cold_start": start}
    save("image", result)
    return result


if __name__ == "__main__":
    if not shutil.which("podman"):
        print("bench_image: needs podman and the offline base: run `make containers`", file=sys.stderr)
        sys.exit(2)
    main()
