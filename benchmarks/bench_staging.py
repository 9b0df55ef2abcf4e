"""Staging a model folder to cloud storage: cloudllm against the SageMaker SDK's usual path and raw boto3.

A Llama-style model of ~1 GB of bfloat16 safetensors in several shards (random weights,
written with safetensors directly) is built in a temporary folder under /tmp. The S3
emulator (`cloudllm emulate sagemaker`) and the GCS emulator (`cloudllm emulate vertex`)
run as separate processes on loopback, as a cloud would, so their work does not share
this process's interpreter. In the same run, for each store:

  (a) what the SageMaker SDK does: tar + gzip level 9 into model.tar.gz, then one upload
      (the tarball is made once and its time counted for both stores);
  (b) the raw limit: the library's own parallel transfer (boto3's transfer manager with
      tuned concurrency / google-cloud-storage's transfer_manager) of the same files, run
      before and after (c) and averaged, as the emulators slow down as they fill;
  (c) cloudllm's stage from cold, as deploy does it: inspect, hash (empty hash cache),
      render code, upload the store's bundle (Bundle.stored) from the model folder;
  (d) a re-deploy with nothing changed: read the hash cache from disk as a new process
      would, rebuild the bundle, find everything already under the version prefix;
  (e) a re-deploy with only the serving settings changed: the settings go in the
      container's environment, the version prefix is the same, nothing is uploaded or copied.

Goals (issue 7): c/b <= 1.3, a/c >= 3, (d) uploads zero weight bytes and takes < 2 s.

    python -m benchmarks.bench_staging
    CLOUDLLM_BENCH_STAGING_MB=300 python -m benchmarks.bench_staging     (a smaller model)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BIN, save, scoped_env, table  # noqa: E402

TARGET_MB = int(os.environ.get("CLOUDLLM_BENCH_STAGING_MB", "1000"))
GOALS = {"c_over_b_max": 1.3, "a_over_c_min": 3.0, "restage_seconds_max": 2.0}
# The shape of a ~0.5B Llama: 8 layers of these plus embeddings and head are ~1 GB in bf16.
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
SHARD_BYTES = 256 * 1024 * 1024
S3_TUNED = {"multipart_threshold": 64 * 1024 * 1024, "multipart_chunksize": 64 * 1024 * 1024, "max_concurrency": 10}
GCS_WORKERS = 8


# --- the model --------------------------------------------------------------------------------
def build_model(out: Path, target_mb: int) -> Path:
    """A Llama-style folder of bf16 safetensors shards + index, config and a small tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    from cloudllm.testing.tiny_models import SPECIAL_EOS, _byte_level_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    kv = HIDDEN // HEADS * KV_HEADS
    layer_shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (kv, HIDDEN),
        "self_attn.v_proj.weight": (kv, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }
    per_layer = sum(_numel(s) for s in layer_shapes.values()) * 2
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    layers = max(1, round((target_mb * 1024 * 1024 - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer_shapes.items()})
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)

    generator = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = _numel(shape) * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        # Trained weights are roughly normal with a small spread: randn * 0.02 in bf16 compresses like them.
        shards[-1][name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += nbytes
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    total = sum(_numel(s) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_tokenizer(512), eos_token=SPECIAL_EOS, bos_token=SPECIAL_EOS)
    tokenizer.save_pretrained(out)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- emulators in their own processes ---------------------------------------------------------
class Emulator:
    """`cloudllm emulate ...` in a subprocess; .env is what it prints to export."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [str(BIN / "cloudllm"), "emulate", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.env: dict[str, str] = {}
        for line in self.process.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                self.env[key] = value
            elif line.startswith("#"):
                break
        if not self.env:
            raise RuntimeError(f"`cloudllm emulate {' '.join(args)}` did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self) -> "Emulator":
        """Point this process's clients at the emulator for the block (its `export` lines)."""
        self._scope = scoped_env(**self.env)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._scope.__exit__(*exc)
        self.stop()


# --- the measured paths -----------------------------------------------------------------------
def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def sdk_tarball(model: Path, work: Path) -> Path:
    """The SageMaker SDK's model.tar.gz: tarfile with gzip compresslevel 9 (its default), one thread."""
    target = work / "model.tar.gz"
    with tarfile.open(target, "w:gz", compresslevel=9) as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    return target


def cloudllm_bundle(model: Path, out: Path, *, exact: bool = True, **settings):
    """What deploy stages: inspect, hash (through the cache), render code; the store's copy of the
    bundle (Bundle.stored: the serving settings go in the container's environment). Nothing is
    written locally: a cloud deploy uploads straight from the model folder. exact=False is a first
    deploy's: weights never hashed here are named by identity and hashed while they upload."""
    from cloudllm.bundle import build_bundle
    from cloudllm.model_source import inspect_model
    from cloudllm.plan import serving_settings
    from cloudllm.spec import spec_from_kwargs

    del out
    info = inspect_model(model)
    spec = spec_from_kwargs(model, runtime="handler", **settings)
    return build_bundle(info, serving_settings(spec, info), build={"runtime": "handler"}, exact=exact).stored


def reset_hash_memory() -> None:
    """Forget the in-process copy of the hash cache: the next hash reads the cache file, as a new CLI process does."""
    import cloudllm.hashing

    cloudllm.hashing._cache = None


def cloudllm_runs(out: dict, model: Path, work: Path, baseline_b, artifacts, root) -> dict:
    """(b) raw, (c) cloudllm package + upload, (b) again, (d) unchanged re-stage, (e) settings-only re-stage."""
    from cloudllm.console import Reporter

    b_before, _ = timed(lambda: baseline_b("raw-before"))

    def cloudllm_stage(exact: bool = True, **settings):
        package_seconds, bundle = timed(lambda: cloudllm_bundle(model, work / "artifact", exact=exact, **settings))
        out.setdefault("c_package_seconds", package_seconds)
        return artifacts.upload(bundle, root.child(bundle.version_name), Reporter(), reuse_from=root)

    out["c_seconds"], first = timed(lambda: cloudllm_stage(exact=False))  # a first deploy hashes while uploading
    out["c_uploaded_bytes"] = first.uploaded_bytes
    # (b) again after (c): the emulator slows as it fills, so the mean of both brackets (c) fairly.
    b_after, _ = timed(lambda: baseline_b("raw-after"))
    out["b_runs_seconds"], out["b_seconds"] = [b_before, b_after], (b_before + b_after) / 2
    reset_hash_memory()
    out["d_seconds"], again = timed(cloudllm_stage)
    out["d_uploaded_bytes"], out["d_kept_files"] = again.uploaded_bytes, len(again.kept)
    reset_hash_memory()
    out["e_seconds"], changed = timed(lambda: cloudllm_stage(serving={"max_batch_size": 16}))
    weights = [n for n in changed.uploaded if n.endswith(".safetensors")]
    out["e_uploaded_bytes"], out["e_uploaded_weight_files"] = changed.uploaded_bytes, len(weights)
    out["e_copied_bytes"] = changed.copied_bytes
    return out


def s3_runs(model: Path, work: Path, tarball: Path, gzip_seconds: float) -> dict:
    import boto3
    from boto3.s3.transfer import TransferConfig

    from cloudllm.storage.s3 import S3Artifacts, S3Uri

    with Emulator("sagemaker", "--port", "0"):
        client = boto3.client("s3")
        bucket = "cloudllm-emulator"
        files = sorted(p for p in model.iterdir() if p.is_file())
        out: dict = {}

        upload, _ = timed(lambda: client.upload_file(str(tarball), bucket, "sdk/model.tar.gz", Config=TransferConfig(**S3_TUNED)))
        out["a_upload_seconds"], out["a_seconds"] = upload, gzip_seconds + upload

        def baseline_b(prefix: str):
            from s3transfer.manager import TransferManager

            with TransferManager(client, TransferConfig(**S3_TUNED)) as manager:
                futures = [manager.upload(str(p), bucket, f"{prefix}/{p.name}") for p in files]
                for future in futures:
                    future.result()

        return cloudllm_runs(out, model, work, baseline_b, S3Artifacts(client), S3Uri(bucket, "models/bench"))


def gcs_runs(model: Path, work: Path, tarball: Path, gzip_seconds: float) -> dict:
    from google.cloud.storage import transfer_manager

    from cloudllm.storage.gcs import GcsArtifacts, GcsUri, storage_client

    with Emulator("vertex", "--port", "0", "--storage-port", "0", "--bucket", "bench"):
        client = storage_client()
        bucket = client.bucket("bench")
        files = sorted(p for p in model.iterdir() if p.is_file())
        out: dict = {}

        upload, _ = timed(lambda: bucket.blob("sdk/model.tar.gz").upload_from_filename(str(tarball)))
        out["a_upload_seconds"], out["a_seconds"] = upload, gzip_seconds + upload

        def baseline_b(prefix: str):
            transfer_manager.upload_many_from_filenames(
                bucket, [p.name for p in files], source_directory=str(model), blob_name_prefix=f"{prefix}/",
                max_workers=GCS_WORKERS, worker_type=transfer_manager.THREAD, raise_exception=True,
            )  # fmt: skip

        return cloudllm_runs(out, model, work, baseline_b, GcsArtifacts(client), GcsUri("bench", "models/bench"))


def main() -> dict:
    base = Path(tempfile.mkdtemp(prefix="cloudllm-bench-staging-", dir="/tmp"))
    try:
        model = base / "model"
        build_seconds, _ = timed(lambda: build_model(model, TARGET_MB))
        model_bytes = folder_bytes(model)
        shards = len(list(model.glob("*.safetensors")))
        print(f"model: {model_bytes / 1e6:.0f} MB in {shards} shards, built in {build_seconds:.1f}s")
        # The SDK's tarball is the same whatever the store: made once, uploaded to each.
        gzip_seconds, tarball = timed(lambda: sdk_tarball(model, base))
        print(f"tar + gzip -9: {gzip_seconds:.1f}s, {tarball.stat().st_size / 1e6:.0f} MB")
        results = {"model_bytes": model_bytes, "shards": shards, "goals": GOALS, "gzip_seconds": gzip_seconds, "tarball_bytes": tarball.stat().st_size}
        for store, runs in (("s3", s3_runs), ("gcs", gcs_runs)):
            work = base / store
            work.mkdir()
            # A fresh CLOUDLLM_HOME per store: (c) hashes from cold both times.
            reset_hash_memory()
            with scoped_env(CLOUDLLM_HOME=str(work / "home")):
                figures = runs(model, work, tarball, gzip_seconds)
            figures["c_over_b"] = figures["c_seconds"] / figures["b_seconds"]
            figures["a_over_c"] = figures["a_seconds"] / figures["c_seconds"]
            figures["met"] = {
                "c_within_1.3x_of_b": figures["c_over_b"] <= GOALS["c_over_b_max"],
                "a_3x_slower_than_c": figures["a_over_c"] >= GOALS["a_over_c_min"],
                "restage_zero_bytes_under_2s": figures["d_uploaded_bytes"] == 0 and figures["d_seconds"] < GOALS["restage_seconds_max"],
            }
            results[store] = figures
            rows = [
                ("(a) tar + gzip -9 + upload", figures["a_seconds"], f"gzip {gzip_seconds:.1f}s + upload {figures['a_upload_seconds']:.1f}s"),
                ("(b) raw parallel upload", figures["b_seconds"], "mean of runs before and after (c): " + ", ".join(f"{x:.1f}s" for x in figures["b_runs_seconds"])),
                ("(c) cloudllm bundle + upload (cold hash)", figures["c_seconds"], f"bundle (inspect, hash) {figures['c_package_seconds']:.1f}s; {figures['c_uploaded_bytes'] / 1e6:.0f} MB uploaded"),
                ("(d) re-stage, nothing changed", figures["d_seconds"], f"{figures['d_uploaded_bytes']} bytes uploaded"),
                ("(e) re-stage, settings changed", figures["e_seconds"], f"{figures['e_uploaded_bytes']} bytes uploaded, {figures['e_uploaded_weight_files']} weight files"),
            ]
            print(f"\n{store}:\n" + table(["path", "wall s", "note"], rows))
            print(f"c/b = {figures['c_over_b']:.2f} (goal <= 1.3), a/c = {figures['a_over_c']:.2f} (goal >= 3): {figures['met']}")
        save("staging", results)
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
