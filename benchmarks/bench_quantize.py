"""Quantization: size, time to quantize, fidelity and CPU serving speed of int8/int4 against the original.

Models are built offline with random weights: a ~150M-parameter Llama-style decoder in
bfloat16 (the shape of the models people deploy, big enough for the kernels to matter)
and the tiny GPT-2 (Conv1D projections). Every figure is compared with the original,
measured in the same run. Goals (issue 6): the quantized layers take <= 0.52 of their
bf16 bytes with int8 and <= 0.30 with int4.

Serving speed is greedy generation through the serving runtime's own loaders, under
torch.inference_mode as the engine runs it, one request at a time, best of two runs: the original in
float32 (the engine's CPU default) and bfloat16, the quantized folders in bfloat16 (the
quantized loader's CPU default) and float32. No GPU here: GPU memory and speed are not
measured.

    python -m benchmarks.bench_quantize            (or: python benchmarks/bench_quantize.py)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import save, table  # noqa: E402

LLAMA = {"hidden_size": 768, "layers": 16, "heads": 12, "kv_heads": 4, "intermediate_size": 2048, "vocab_size": 32000}
PROMPT_TOKENS = 16
NEW_TOKENS = 16
RUNS = 2
GOALS = {"int8": 0.52, "int4": 0.30}


def model_bytes(model) -> int:
    """Bytes of the tensors the loaded model holds (quantized data and scales included)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def tokens_per_second(model, vocab: int) -> float:
    """Best of RUNS greedy generations: the least disturbed by whatever else shares the CPU."""
    import torch

    ids = torch.randint(0, min(vocab, 500), (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    best = 0.0
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(RUNS):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            best = max(best, NEW_TOKENS / (time.perf_counter() - start))
    return best


def load(folder: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from cloudllm_runtime.quantized import is_quantized, load_quantized_model

    if is_quantized(str(folder)):
        return load_quantized_model(str(folder), AutoModelForCausalLM, device="cpu", dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


def bench_model(name: str, source: Path, work: Path, speeds: bool) -> tuple[list[dict], list[dict]]:
    from cloudllm.quantize import quantize_model

    sizes, serving = [], []
    folders = {"original": source}
    for method in ("int8", "int4"):
        start = time.perf_counter()
        # force: keep the folder whatever the agreement, so every figure is measured (the verdict is reported)
        report = quantize_model(source, work / f"{name}-{method}", method=method, force=True)
        seconds = time.perf_counter() - start
        folders[method] = work / f"{name}-{method}"
        sizes.append({
            "model": name,
            "method": method,
            "source_dtype": report.dtype,
            "layers_quantized": len(report.quantized),
            "layers_kept": len(report.skipped),
            "layer_bytes_before": report.layer_bytes_before,
            "layer_bytes_after": report.layer_bytes_after,
            "layer_ratio": report.layer_ratio,
            "goal_layer_ratio": GOALS[method] if report.dtype == "bfloat16" else None,
            "bytes_before": report.bytes_before,
            "bytes_after": report.bytes_after,
            "ratio": report.ratio,
            "quantize_seconds": round(seconds, 2),
            "agreement": report.fidelity.agreement,
            "threshold": report.fidelity.threshold,
            "passed": report.fidelity.passed,
            "max_logit_diff": report.fidelity.max_logit_diff,
            "mean_logit_diff": report.fidelity.mean_logit_diff,
            "mean_abs_logit": report.fidelity.mean_abs_logit,
            "median_top2_margin": report.fidelity.median_margin,
        })  # fmt: skip
    if not speeds:
        return sizes, serving
    plan = [("original", "float32"), ("original", "bfloat16"), ("int8", "bfloat16"), ("int8", "float32"),
            ("int4", "bfloat16"), ("int4", "float32")]  # fmt: skip
    for variant, dtype in plan:
        model = load(folders[variant], dtype)
        serving.append({
            "model": name,
            "weights": variant,
            "compute_dtype": dtype,
            "default_on_cpu": (variant, dtype) in (("original", "float32"), ("int8", "bfloat16"), ("int4", "bfloat16")),
            "memory_bytes": model_bytes(model),
            "tokens_per_second": round(tokens_per_second(model, model.config.vocab_size), 2),
        })  # fmt: skip
        del model
    base = next(r["tokens_per_second"] for r in serving if r["weights"] == "original" and r["compute_dtype"] == "float32")
    base_memory = next(r["memory_bytes"] for r in serving if r["weights"] == "original" and r["compute_dtype"] == "float32")
    for row in serving:
        row["speed_vs_original_fp32"] = round(row["tokens_per_second"] / base, 2)
        row["memory_vs_original_fp32"] = round(row["memory_bytes"] / base_memory, 3)
    return sizes, serving


def main() -> dict:
    import torch

    from cloudllm.testing.tiny_models import build_tiny_gpt2, build_tiny_llama

    torch.manual_seed(0)
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("CLOUDLLM_HOME", str(work / "home"))
        llama = build_tiny_llama(work / "llama-150m", dtype="bfloat16", **LLAMA)
        gpt2 = build_tiny_gpt2(work / "tiny-gpt2")
        from cloudllm.model_source import inspect_model

        parameters = inspect_model(llama).parameters
        sizes, serving = bench_model("llama-150m", llama, work, speeds=True)
        gpt2_sizes, _ = bench_model("tiny-gpt2", gpt2, work, speeds=False)
        sizes += gpt2_sizes
    result = {
        "llama_config": LLAMA,
        "llama_parameters": parameters,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "speed_runs_best_of": RUNS,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "gpu": "none on this machine: GPU memory and speed unverified",
        "seconds": round(time.perf_counter() - started, 1),
        "sizes": sizes,
        "serving": serving,
    }
    print(table(
        ["model", "method", "quantized layers: bytes after / bf16 (goal)", "all weights: after / before",
         "quantize s", "next-token agreement (threshold)", "mean / max logit diff", "original's median top-2 gap"],
        [(r["model"], r["method"], f"{r['layer_ratio']:.3f}" + (f" (<= {r['goal_layer_ratio']})" if r["goal_layer_ratio"] else f" (of {r['source_dtype']})"),
          f"{r['ratio']:.3f}", f"{r['quantize_seconds']:.1f}", f"{r['agreement']:.1%} ({r['threshold']:.0%}{'' if r['passed'] else ', below'})",
          f"{r['mean_logit_diff']:.4f} / {r['max_logit_diff']:.4f}", f"{r['median_top2_margin']:.3f}") for r in sizes],
    ))  # fmt: skip
    print()
    print(table(
        ["model", "weights", "compute dtype", f"tokens/s (greedy, batch 1, best of {RUNS})", "x original fp32", "model bytes in memory", "x original fp32"],
        [(r["model"], r["weights"] + (" (CPU default)" if r["default_on_cpu"] else ""), r["compute_dtype"], f"{r['tokens_per_second']:.2f}",
          f"{r['speed_vs_original_fp32']:.2f}", f"{r['memory_bytes'] / 1e6:.0f} MB", f"{r['memory_vs_original_fp32']:.3f}") for r in serving],
    ))  # fmt: skip
    print(f"\n{parameters / 1e6:.0f}M-parameter Llama, {torch.get_num_threads()} torch threads, load average {load_before[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; {result['seconds']:.0f}s in all. No GPU: GPU figures unverified.")  # fmt: skip
    save("quantize", result)
    return result


if __name__ == "__main__":
    main()
