"""`cloudllm plan` of a Llama-70B-sized folder (141 GB of bf16 safetensors), cold and warm.

The shards are header-only sparse files: a real safetensors header, then a hole up to the
size the header claims, so they take no disk and any read of weight bytes shows in the
process's read counter (/proc/PID/io rchar). Cold: a new CLOUDLLM_HOME (empty hash
cache). Warm: the same command again. Goals (issue 15): cold < 2 s, `--json` warm < 0.5 s,
and no weight bytes read. Run: python -m benchmarks.bench_plan
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import save, table

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
    "rms_norm_eps": 1e-5,
}

# Counts the bytes the CLI reads, then runs it as `cloudllm` would.
_COUNTING_CLI = (
    "import sys, atexit\n"
    "def _report():\n"
    "    rchar = [l for l in open('/proc/self/io') if l.startswith('rchar')][0].split()[1]\n"
    "    sys.stderr.write(f'RCHAR={rchar}\\n')\n"
    "atexit.register(_report)\n"
    "from cloudllm.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _llama_tensors(config: dict) -> list[tuple[str, list[int]]]:
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    tensors = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "self_attn.q_proj.weight", [h, h]),
            (p + "self_attn.k_proj.weight", [kv, h]),
            (p + "self_attn.v_proj.weight", [kv, h]),
            (p + "self_attn.o_proj.weight", [h, h]),
            (p + "mlp.gate_proj.weight", [inter, h]),
            (p + "mlp.up_proj.weight", [inter, h]),
            (p + "mlp.down_proj.weight", [h, inter]),
            (p + "input_layernorm.weight", [h]),
            (p + "post_attention_layernorm.weight", [h]),
        ]
    return tensors + [("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]


def build_sparse_model(folder: Path, config: dict | None = None, shards: int = 30) -> int:
    """A model folder whose safetensors shards are headers followed by holes; returns the weight bytes."""
    config = config or LLAMA_70B
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    from cloudllm.testing.tiny_models import _byte_level_tokenizer

    _byte_level_tokenizer(300).save(str(folder / "tokenizer.json"))
    tensors = _llama_tensors(config)
    per_shard = -(-len(tensors) // shards)
    weight_map, total = {}, 0
    for n in range(shards):
        chunk = tensors[n * per_shard : (n + 1) * per_shard]
        if not chunk:
            break
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for tensor, shape in chunk:
            size = 2
            for d in shape:
                size *= d
            header[tensor] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            weight_map[tensor] = name
            offset += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
        total += offset
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def run_plan(folder: Path, home: Path, *extra: str) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and bytes read by one `cloudllm plan` in a new process."""
    env = {**os.environ, "CLOUDLLM_HOME": str(home)}
    args = [sys.executable, "-c", _COUNTING_CLI, "plan", str(folder), "--provider", "sagemaker", "--instance", "ml.p4d.24xlarge", *extra]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    rchar = int([line for line in proc.stderr.splitlines() if line.startswith("RCHAR=")][-1].split("=")[1])
    return seconds, rchar, proc


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="cloudllm-bench-plan-") as tmp:
        folder = Path(tmp) / "llama-70b"
        weights = build_sparse_model(folder)
        rows, runs = [], {}
        for label, home, extra in (
            ("plan, cold (new CLOUDLLM_HOME)", Path(tmp) / "home-a", ()),
            ("plan --json, cold", Path(tmp) / "home-b", ("--json",)),
            ("plan, warm", Path(tmp) / "home-a", ()),
            ("plan --json, warm", Path(tmp) / "home-b", ("--json",)),
        ):
            seconds, rchar, proc = run_plan(folder, home, *extra)
            runs[label] = {"seconds": seconds, "bytes_read": rchar, "exit": proc.returncode}
            rows.append((label, seconds, f"{rchar / 1e6:.1f} MB", proc.returncode))
        baseline = [sys.executable, "-c", "import cloudllm.cli"]
        start = time.perf_counter()
        subprocess.run(baseline, check=True)
        rows.append(("python -c 'import cloudllm.cli'", time.perf_counter() - start, "", 0))
    print(f"model: {weights / 1e9:.1f} GB of bf16 safetensors in 30 sparse shards")
    print(table(["command", "wall s", "bytes read (rchar)", "exit"], rows))
    result = {"weight_bytes": weights, "runs": runs, "goal_seconds": {"cold": 2.0, "json_warm": 0.5}}
    save("plan", result)
    return result


if __name__ == "__main__":
    main()
