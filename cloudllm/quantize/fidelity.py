"""How much quantizing changed a model: logits on a fixed probe set, and the report of a run.

Every run measures fidelity on a fixed probe set and refuses to write a model whose greedy
next-token agreement with the original falls below the method's threshold (threshold_for).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from cloudllm.model_source import ModelInfo

# Refuse below this greedy next-token agreement with the original (see threshold_for).
AGREEMENT_THRESHOLDS = {"int8": 0.90, "int4": 0.70}

PROBE_TOKENS = 32
PROBE_TEXTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "To reset your password, open Settings, choose Account, then select Security.",
    "The mitochondria is the powerhouse of the cell; it produces most of its ATP.",
    "Q: What is 17 multiplied by 3?\nA: 17 multiplied by 3 is 51.",
    "Summarise this contract: the party of the first part agrees to pay in full.",
    "Les modèles de langage traduisent du texte, écrivent du code et répondent aux questions.",
)


# --- the report ------------------------------------------------------------------------
class SkippedLayer(BaseModel):
    name: str
    reason: str


class Fidelity(BaseModel):
    """Quantized vs original logits on the fixed probe set (teacher-forced, every position)."""

    probes: int
    positions: int
    max_logit_diff: float | None = Field(description="None when the quantized model produced NaN/inf.")
    mean_logit_diff: float | None
    mean_abs_logit: float = Field(description="Mean |logit| of the original: the scale the diffs compare to.")
    median_margin: float | None = Field(
        None, description="Median gap between the original's top two logits: the smaller, the more a tiny change flips a token."
    )
    agreement: float = Field(description="Share of positions where quantized and original pick the same next token.")
    threshold: float
    passed: bool


class QuantizationReport(BaseModel):
    """What one quantization did: sizes, layers, fidelity."""

    method: str
    source: str
    output: str
    library: str
    dtype: str | None = Field(description="The original dtype; scales are stored in it.")
    bytes_before: int = Field(description="All weight bytes of the original.")
    bytes_after: int = Field(description="All weight bytes written.")
    ratio: float
    layer_bytes_before: int = Field(description="Weight bytes of the layers that were quantized, before.")
    layer_bytes_after: int = Field(description="Their quantized data + scales (+ quanto's two scalar buffers).")
    layer_ratio: float
    quantized: list[str]
    skipped: list[SkippedLayer]
    conv1d_to_linear: list[str]
    group_sizes: dict[str, int] = Field(default_factory=dict, description="int4: layers per group size ('none': per channel).")
    policy: dict[str, str]
    fidelity: Fidelity
    forced: bool = False
    seconds: float = 0.0

    def summary_lines(self) -> list[str]:
        from cloudllm.console import human_bytes

        f = self.fidelity
        lines = [
            f"{self.method}: {len(self.quantized)} layers quantized, {len(self.skipped)} kept in {self.dtype}",
            f"weights: {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)} ({self.ratio:.3f}); "
            f"quantized layers {human_bytes(self.layer_bytes_before)} -> {human_bytes(self.layer_bytes_after)} ({self.layer_ratio:.3f})",
            f"fidelity on {f.probes} probes / {f.positions} positions: next-token agreement {f.agreement:.1%} "
            f"(threshold {f.threshold:.0%}), logit diff max {f.max_logit_diff} mean {f.mean_logit_diff} "
            f"(original: mean |logit| {f.mean_abs_logit:.3f}, median top-2 gap {f.median_margin})",
        ]
        if self.conv1d_to_linear:
            lines.append(f"converted {len(self.conv1d_to_linear)} Conv1D layers to Linear before quantizing")
        for layer in _collapse(self.skipped):
            lines.append(f"kept: {layer}")
        return lines


def _collapse(skipped: list[SkippedLayer], limit: int = 6) -> list[str]:
    """Skipped layers grouped by reason, so a 32-layer model prints a few lines."""
    by_reason: dict[str, list[str]] = {}
    for layer in skipped:
        by_reason.setdefault(layer.reason, []).append(layer.name)
    lines = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        lines.append(f"{shown}: {reason}")
    return lines


def threshold_for(method: str) -> float:
    """Minimum greedy next-token agreement.

    Weight-only int8 per channel is close to lossless on trained LLMs (next-token agreement
    well above 95%), so below 90% something is wrong with the model or the conversion.
    int4 with groups of 128 loses more (a few points of perplexity on 7B models, top-1
    agreement typically in the high 80s); 70% still catches the failures that matter (a
    broken layer gives agreement near 1/vocab). Randomly initialised models are the case it
    cannot tell from a broken one: their logits are nearly flat (the report's median_margin),
    so small weight errors flip the argmax. The benchmark's random 150M Llama scores 38% at
    int4 and is refused, as it should be unless --force; trained models have the margins.
    """
    return AGREEMENT_THRESHOLDS[method]



# --- the probe run ----------------------------------------------------------------------
def probe_inputs(info: ModelInfo, model) -> list:
    """Token ids of the fixed probe texts; fixed pseudo-random ids when the model has no tokenizer."""
    import torch

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(info.path, trust_remote_code=info.trust_remote_code)
        ids = [tokenizer(text, return_tensors="pt")["input_ids"][:, :PROBE_TOKENS] for text in PROBE_TEXTS]
        ids = [t for t in ids if t.shape[1] >= 2]
        if ids:
            return ids
    except Exception:  # noqa: BLE001 - any tokenizer problem: fall back to fixed ids, the probe still works
        pass
    vocab = int(getattr(model.config, "vocab_size", 0) or 256)
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator) for _ in PROBE_TEXTS]


def run_probes(model, probes: list) -> list:
    import torch

    outputs = []
    # no_grad, not inference_mode: quanto's int4 tensors fail on views of inference tensors.
    with torch.no_grad():
        for ids in probes:
            kwargs = {"input_ids": ids}
            if getattr(model.config, "is_encoder_decoder", False):
                kwargs["decoder_input_ids"] = ids
            out = model(**kwargs)
            if getattr(out, "logits", None) is not None:
                logits = out.logits
            elif getattr(out, "start_logits", None) is not None:
                logits = torch.stack([out.start_logits, out.end_logits], dim=-1)
            else:
                logits = out.last_hidden_state
            outputs.append(logits.float().reshape(-1, logits.shape[-1]))
    return outputs


def measure_fidelity(reference: list, quantized: list, threshold: float) -> Fidelity:
    import torch

    ref = torch.cat(reference)
    got = torch.cat(quantized)
    diff = (ref - got).abs()
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    top2 = ref.topk(min(2, ref.shape[-1]), dim=-1).values
    finite = bool(torch.isfinite(got).all())
    return Fidelity(
        probes=len(reference),
        positions=ref.shape[0],
        max_logit_diff=round(diff.max().item(), 5) if finite else None,
        mean_logit_diff=round(diff.mean().item(), 5) if finite else None,
        mean_abs_logit=round(ref.abs().mean().item(), 5),
        median_margin=round((top2[:, 0] - top2[:, 1]).median().item(), 5) if ref.shape[-1] > 1 else None,
        agreement=round(agreement, 4),
        threshold=threshold,
        passed=finite and agreement >= threshold,
    )
