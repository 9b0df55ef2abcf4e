"""LoRA adapters: four adapters on one server against four servers of the merged models (issue 17).

A GPT-2 somewhat bigger than the tests' tiny one (bench_serving's: 4 layers, 256 wide, random
weights) gets four LoRA adapters built offline with peft (rank 8 on c_attn, seeded non-zero B, so
each answers differently). Two setups serve them on this machine, side by side:

- shared: one server of the base with the four adapters loaded (`settings.adapters`); a request
  picks its adapter with parameters.adapter_id, and the batcher mixes adapters in one call;
- merged: four servers, one per adapter, each serving that adapter merged into the base
  (peft's merge_and_unload, saved and packaged like any model).

Memory: the servers' resident memory (VmRSS of each process, after the load: on CPU the model's
memory) summed per setup, and the model bytes alone (parameters x 4 bytes: the base plus its
adapters against four merged models), since a process also holds its Python, torch and the
tokenizer. Throughput: 16 clients at once, client i asking for adapter i % 4 (greedy, 16 new
tokens, bench_serving's prompts and load client); on the merged setup client i goes to server
i % 4. The two setups alternate for ROUNDS rounds; each figure is the median. Every server runs
torch on one thread (OMP_NUM_THREADS=1): this model's operations are tiny, and with two or more
intra-op threads each one ends at a barrier that stalls whenever the load client or the server's own
event loop holds a core (in process on the 2-core machine under load: 8 rows x 16 tokens took
0.2 s on one thread, 2-3.4 s on two, base and adapters alike). The shared server is then one busy
thread against four: what it saves in memory it may pay in cores. Answers are compared too: greedy
text from an adapter on the shared server against the same adapter merged.

Goals: shared memory < 0.35x merged; shared throughput at 16 mixed clients >= 0.8x merged.

    python -m benchmarks.bench_adapters
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_serving import NEW_TOKENS, PROMPTS, Server, build_model, drive, median_of_rounds  # noqa: E402
from benchmarks.common import save, scoped_env, table  # noqa: E402

ADAPTERS = ("support", "legal", "finance", "medical")
RANK = 8
CLIENTS = 16
REQUESTS_PER_CLIENT = 3
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SHARED_THREADS = int(os.environ.get("BENCH_SHARED_THREADS", "1"))  # torch intra-op threads of the shared server
GOALS = {"memory_ratio_max": 0.35, "throughput_ratio_min": 0.8}


def build_adapters(base: Path, root: Path) -> dict[str, Path]:
    from cloudllm.testing.tiny_adapters import build_tiny_lora

    return {name: build_tiny_lora(base, root / f"lora-{name}", seed=seed, rank=RANK, alpha=2 * RANK, scale=0.2)
            for seed, name in enumerate(ADAPTERS, start=1)}  # fmt: skip


def merge(base: Path, adapter: Path, out: Path) -> Path:
    """The base with the adapter merged into its weights (peft merge_and_unload), saved as a model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for tokenizer_file in base.iterdir():
        if tokenizer_file.name not in ("config.json", "generation_config.json") and not tokenizer_file.name.endswith(".safetensors"):
            shutil.copy(tokenizer_file, out / tokenizer_file.name)
    return out


def resident_bytes(pid: int) -> int:
    """VmRSS of a process (its memory in use now), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def start(artifact: Path, settings: Path, log: Path, threads: int) -> Server:
    with scoped_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)):
        return Server(artifact, settings, log)


def answers(targets: list[tuple[str, dict]]) -> list[str]:
    import httpx

    texts = []
    for url, extra in targets:
        body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": NEW_TOKENS, "do_sample": False, **extra}}
        texts.append(httpx.post(f"{url}/invocations", json=body, timeout=120).json()[0]["generated_text"])
    return texts


def main() -> dict:
    from cloudllm import api
    from cloudllm_runtime.settings import ServingSettings

    work = Path(tempfile.mkdtemp(prefix="cloudllm-bench-adapters-", dir="/tmp"))
    cores = os.cpu_count() or 1
    servers: list[Server] = []
    try:
        base = build_model(work / "gpt2")
        adapters = build_adapters(base, work)
        api.package(base, work / "artifact-shared")
        defaults = json.loads(ServingSettings.load(str(work / "artifact-shared" / "code")).to_json())
        shared_settings = work / "settings-shared.json"
        shared_settings.write_text(ServingSettings.from_dict({**defaults, "adapters": {n: str(p) for n, p in adapters.items()}}).to_json())
        merged_artifacts = {}
        for name, adapter in adapters.items():
            folder = merge(base, adapter, work / f"merged-{name}")
            merged_artifacts[name] = api.package(folder, work / f"artifact-{name}") and work / f"artifact-{name}"

        shared = start(work / "artifact-shared", shared_settings, work / "shared.log", SHARED_THREADS)
        servers.append(shared)
        merged = {}
        for name, artifact in merged_artifacts.items():
            merged[name] = start(artifact, artifact / "code" / "settings.json", work / f"merged-{name}.log", 1)
            servers.append(merged[name])
        shared_targets = [(shared.url, {"adapter_id": name}) for name in ADAPTERS]
        merged_targets = [(merged[name].url, {}) for name in ADAPTERS]
        agree = [a == b for a, b in zip(answers(shared_targets), answers(merged_targets))]

        for targets in (shared_targets, merged_targets):  # warm every server and adapter once, not counted
            for target in targets:
                asyncio.run(drive(target[0], 1, 1, targets=[target]))
        rounds = {"shared": [], "merged": []}
        for _ in range(ROUNDS):
            rounds["shared"].append(asyncio.run(drive(shared.url, CLIENTS, REQUESTS_PER_CLIENT, targets=shared_targets)))
            rounds["merged"].append(asyncio.run(drive(merged_targets[0][0], CLIENTS, REQUESTS_PER_CLIENT, targets=merged_targets)))
        load = {name: median_of_rounds(runs) for name, runs in rounds.items()}
        memory = {"shared": resident_bytes(shared.process.pid), "merged": sum(resident_bytes(s.process.pid) for s in merged.values())}
        batches = {"shared": mean_batch(shared.url), "merged": statistics.mean(mean_batch(m.url) for m in merged.values())}
    finally:
        for server in servers:
            server.stop()

    weights = {"shared": model_bytes(base) + sum(model_bytes(a) for a in adapters.values()),
               "merged": sum(model_bytes(work / f"merged-{n}") for n in ADAPTERS)}  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    memory_ratio = memory["shared"] / memory["merged"]
    weights_ratio = weights["shared"] / weights["merged"]
    throughput_ratio = load["shared"]["requests_per_second"] / load["merged"]["requests_per_second"]
    paired = sorted(s["requests_per_second"] / m["requests_per_second"] for s, m in zip(load["shared"]["rounds"], load["merged"]["rounds"]))
    print(table(
        ["setup", "resident MiB", "model MiB", f"req/s at {CLIENTS} mixed clients", "p50 s", "p99 s"],
        [(name, memory[name] / 2**20, weights[name] / 2**20, load[name]["requests_per_second"], load[name]["p50_seconds"], load[name]["p99_seconds"])
         for name in ("shared", "merged")],
    ))  # fmt: skip
    met = {"memory_under_0.35x": memory_ratio < GOALS["memory_ratio_max"], "throughput_at_least_0.8x": throughput_ratio >= GOALS["throughput_ratio_min"]}
    print(f"memory shared/merged: {memory_ratio:.3f} resident, {weights_ratio:.3f} model bytes; throughput shared/merged: "
          f"{throughput_ratio:.2f} (per round {[round(x, 2) for x in paired]}); answers agree: {sum(agree)}/{len(agree)}; mean batch {batches}; goals met: {met}")  # fmt: skip
    result = {
        "model": "gpt2 n_layer=4 n_embd=256 (random weights, float32 on CPU)",
        "adapters": {"count": len(ADAPTERS), "rank": RANK, "target_modules": ["c_attn"]},
        "clients": CLIENTS,
        "new_tokens": NEW_TOKENS,
        "threads": {"shared": SHARED_THREADS, "merged_each": 1, "cores": cores},
        "resident_bytes": memory,
        "model_bytes": weights,
        "memory_ratio_resident": memory_ratio,
        "memory_ratio_model_bytes": weights_ratio,
        "load": load,
        "throughput_ratio": throughput_ratio,
        "throughput_ratio_per_round": paired,
        "mean_batch": batches,
        "answers_agree_with_merged": agree,
        "goals": GOALS,
        "met": met,
        "gpu": "none on this machine: GPU memory and throughput were not measured",
    }
    save("adapters", result)
    return result


def mean_batch(url: str) -> float:
    """Inputs per model call on a server, from its /metrics (cloudllm_batch_size): above 1, requests shared calls."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("cloudllm_batch_size_sum", "cloudllm_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    return values["cloudllm_batch_size_sum"] / values["cloudllm_batch_size_count"]


if __name__ == "__main__":
    main()
