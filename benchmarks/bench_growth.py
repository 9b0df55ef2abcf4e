"""Cost growth of staging with the model's size: seconds per GB and peak RSS at three sizes, both stores.

For each size (0.4, 1.3 and 4.2 GB of bf16 safetensors, CLOUDLLM_BENCH_GROWTH_MB to change) and each
store (the S3 and GCS emulators, each in its own process, a fresh one per step; CLOUDLLM_BENCH_GROWTH_STORES
to pick), in new processes, one
after the other:

  raw       the library's parallel upload of the same files (boto3 transfer manager /
            google-cloud-storage transfer_manager), before and after `first`, averaged;
  first     what a first deploy stages: inspect, upload Bundle.stored hashing the weights as they are read
            (an empty hash cache: each byte read once);
  settings  a re-deploy with only the serving settings changed (nothing may move).

Each process reports its wall time after its imports and its own peak RSS (VmHWM: the CLI's work alone;
the emulators run in processes of their own and are not counted). Goals (issue 15): first/raw
flat across sizes (seconds per GB flat), peak RSS not growing with the size, settings < 2 s
with zero bytes moved.  Run: python -m benchmarks.bench_growth
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_staging import GCS_WORKERS, S3_TUNED, Emulator, build_model, folder_bytes
from benchmarks.common import save, table

# 4 GB is the goal's top size. The emulators keep objects on disk (moto spools any key over 5 MB to a
# temporary file; the GCS emulator runs with --objects-on-disk), so memory holds only the uploads in flight
# and the 4 GB point runs on a shared 24 GB machine. Disk: the model plus one stored copy (~9 GB at 4 GB).
SIZES_MB = [int(x) for x in os.environ.get("CLOUDLLM_BENCH_GROWTH_MB", "400,1300,4000").split(",")]
STORES = os.environ.get("CLOUDLLM_BENCH_GROWTH_STORES", "s3,gcs").split(",")


def _peak_rss_mb() -> float:
    """VmHWM: this process image's peak (ru_maxrss would carry the parent's peak across fork and exec)."""
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _stage(store: str, model: Path, prefix: str, what: str) -> dict:
    """One measured step, in this (new) process; timed from after the imports every path needs."""
    import boto3  # noqa: F401
    import google.cloud.storage  # noqa: F401

    import cloudllm.bundle  # noqa: F401

    start = time.perf_counter()
    files = sorted(p for p in model.iterdir() if p.is_file())
    moved = {}
    if what == "raw" and store == "s3":
        import boto3
        from boto3.s3.transfer import TransferConfig
        from s3transfer.manager import TransferManager

        client = boto3.client("s3")
        with TransferManager(client, TransferConfig(**S3_TUNED)) as manager:
            for future in [manager.upload(str(p), "cloudllm-emulator", f"{prefix}/{p.name}") for p in files]:
                future.result()
    elif what == "raw":
        from google.cloud.storage import transfer_manager

        from cloudllm.storage.gcs import storage_client

        transfer_manager.upload_many_from_filenames(
            storage_client().bucket("bench"), [p.name for p in files], source_directory=str(model), blob_name_prefix=f"{prefix}/",
            max_workers=GCS_WORKERS, worker_type=transfer_manager.THREAD, raise_exception=True,
        )  # fmt: skip
    else:
        from benchmarks.bench_staging import cloudllm_bundle
        from cloudllm.console import Reporter

        # A first deploy hashes while it uploads (nothing deployed to compare with); an update hashes first (from the cache).
        settings = {"serving": {"max_batch_size": 16}} if what == "settings" else {}
        bundle = cloudllm_bundle(model, None, exact=what == "settings", **settings)
        if store == "s3":
            import boto3

            from cloudllm.storage.s3 import S3Artifacts, S3Uri

            artifacts, root = S3Artifacts(boto3.client("s3")), S3Uri("cloudllm-emulator", prefix)
        else:
            from cloudllm.storage.gcs import GcsArtifacts, GcsUri

            artifacts, root = GcsArtifacts(), GcsUri("bench", prefix)
        result = artifacts.upload(bundle, root.child(bundle.version_name), Reporter(), reuse_from=root)
        moved = {"uploaded_bytes": result.uploaded_bytes, "copied_bytes": result.copied_bytes}
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(), **moved}


def _run(store: str, model: Path, prefix: str, what: str, env: dict) -> dict:
    args = [sys.executable, "-m", "benchmarks.bench_growth", "--stage", store, str(model), prefix, what]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{what} on {store} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> dict:
    base = Path(tempfile.mkdtemp(prefix="cloudllm-bench-growth-", dir="/tmp"))
    results: dict = {"sizes": {}}
    rows = []
    try:
        for mb in SIZES_MB:
            model = build_model(base / f"model-{mb}", mb)
            gb = folder_bytes(model) / 1e9
            per_size = results["sizes"][str(mb)] = {"gb": gb}
            emulators = {"s3": ("sagemaker", "--port", "0"), "gcs": ("vertex", "--port", "0", "--storage-port", "0", "--objects-on-disk", "--bucket", "bench")}
            for store, args in ((store, emulators[store]) for store in STORES):
                # A fresh emulator per step: each starts empty (a raw upload cannot pass for cloudllm's).
                steps = {}
                for step, prefix, what in (("raw_before", "raw-before", "raw"), ("first", "models/bench", "first"), ("raw_after", "raw-after", "raw")):
                    with Emulator(*args) as emulator:
                        env = {**os.environ, **emulator.env, "CLOUDLLM_HOME": str(base / f"home-{mb}-{store}"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
                        steps[step] = _run(store, model, prefix, what, env)
                        if what == "first":
                            steps["settings"] = _run(store, model, prefix, "settings", env)
                raw_before, first, raw_after, settings = (steps[k] for k in ("raw_before", "first", "raw_after", "settings"))
                raw = (raw_before["seconds"] + raw_after["seconds"]) / 2
                figures = {
                    "raw_seconds": raw, "raw_runs": [raw_before["seconds"], raw_after["seconds"]],
                    "first_seconds": first["seconds"], "first_over_raw": first["seconds"] / raw,
                    "first_seconds_per_gb": first["seconds"] / gb, "raw_seconds_per_gb": raw / gb,
                    "first_peak_rss_mb": first["peak_rss_mb"], "raw_peak_rss_mb": max(raw_before["peak_rss_mb"], raw_after["peak_rss_mb"]),
                    "settings_seconds": settings["seconds"], "settings_moved_bytes": settings["uploaded_bytes"] + settings["copied_bytes"],
                    "settings_peak_rss_mb": settings["peak_rss_mb"],
                }  # fmt: skip
                per_size[store] = figures
                rows.append((f"{gb:.2f}", store, raw, figures["first_seconds"], f"{figures['first_over_raw']:.2f}",
                             f"{figures['first_seconds_per_gb']:.2f}", f"{figures['first_peak_rss_mb']:.0f}",
                             f"{figures['raw_peak_rss_mb']:.0f}", figures["settings_seconds"], figures["settings_moved_bytes"]))  # fmt: skip
                print(table(["GB", "store", "raw s", "first s", "first/raw", "first s/GB", "first peak RSS MB", "raw peak RSS MB", "settings s", "settings bytes moved"], rows[-1:]), flush=True)
            shutil.rmtree(model, ignore_errors=True)
        print(table(["GB", "store", "raw s", "first s", "first/raw", "first s/GB", "first peak RSS MB", "raw peak RSS MB", "settings s", "settings bytes moved"], rows))
        save("growth-" + "-".join(STORES), results)
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--stage":
        print(json.dumps(_stage(sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5])))
    else:
        main()
