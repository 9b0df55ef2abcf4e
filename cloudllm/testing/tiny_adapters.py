"""Tiny LoRA adapters built offline with peft, for the tiny base models in tiny_models.

peft starts lora_B at zero (an untrained adapter changes nothing); these adapters get seeded
random B matrices instead, so each one's output differs from the base and from the others.
"""

from __future__ import annotations

from pathlib import Path

# The attention projections of each tiny architecture: what a LoRA fine-tune usually targets.
TARGET_MODULES = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def build_tiny_lora(base: str | Path, out: str | Path, *, seed: int = 1, rank: int = 4, alpha: int = 8, scale: float = 0.5) -> Path:
    """Write a PEFT LoRA adapter for the tiny model in `base` to `out` (adapter_config.json + safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    targets = TARGET_MODULES.get(model.config.model_type)
    if targets is None:
        raise ValueError(f"no tiny LoRA recipe for model_type {model.config.model_type!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    config.base_model_name_or_path = str(base)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    out = Path(out)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out
