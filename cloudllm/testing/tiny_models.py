"""Tiny Hugging Face models built offline, in well under a second each.

Nothing here downloads: tokenizers are trained on a small built-in corpus and the
models get seeded random weights. They exist so tests, the README demo and users'
CI can exercise the whole path (inspect, package, serve, invoke) with real torch
and transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Once upon a time there was a tiny model that lived on a laptop.",
    "It dreamed of serving requests from the cloud, quickly and cheaply.",
    "Summarise this contract: the party of the first part agrees to pay.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Machine learning engineers ship fine-tuned models to GPU endpoints.",
] * 20

SPECIAL_EOS = "<|endoftext|>"


def _byte_level_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bar prints blank lines when stdout is not a terminal
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _wordpiece_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok


def _save(model, tokenizer, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_gpt2(out: str | Path, *, n_layer: int = 2, n_embd: int = 64, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (text-generation) with a byte-level BPE tokenizer: ~0.7 MB of safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    raw = _byte_level_tokenizer(vocab_size=512)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=SPECIAL_EOS, bos_token=SPECIAL_EOS)
    config = GPT2Config(
        vocab_size=raw.get_vocab_size(),
        n_positions=256,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    return _save(model, tokenizer, Path(out))


def build_tiny_llama(
    out: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A Llama-style decoder (GQA, nn.Linear projections): the shape of most LLMs people deploy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    raw = _byte_level_tokenizer(vocab_size=vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=SPECIAL_EOS, bos_token=SPECIAL_EOS)
    config = LlamaConfig(
        vocab_size=max(vocab_size, raw.get_vocab_size()),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    return _save(model, tokenizer, Path(out))


def build_tiny_bert(out: str | Path, *, head: str = "sequence-classification", seed: int = 0) -> Path:
    """A 2-layer BERT with a WordPiece tokenizer.

    head: "sequence-classification" (text-classification), "token-classification",
    "question-answering" or "base" (feature-extraction).
    """
    import torch
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    raw = _wordpiece_tokenizer(vocab_size=400)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    labels = {
        "sequence-classification": ["NEGATIVE", "POSITIVE"],
        "token-classification": ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"],
    }.get(head, ["LABEL_0", "LABEL_1"])
    config = BertConfig(
        vocab_size=raw.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    cls = {
        "sequence-classification": BertForSequenceClassification,
        "token-classification": BertForTokenClassification,
        "question-answering": BertForQuestionAnswering,
        "base": BertModel,
    }[head]
    model = cls(config).eval()
    return _save(model, tokenizer, Path(out))


def build_tiny_t5(out: str | Path, *, seed: int = 0) -> Path:
    """A 2-layer T5 (text2text-generation / summarization)."""
    import torch
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    raw = _byte_level_tokenizer(vocab_size=400)
    from tokenizers import AddedToken

    raw.add_special_tokens([AddedToken("<pad>"), AddedToken("</s>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    config = T5Config(
        vocab_size=raw.get_vocab_size(),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config).eval()
    return _save(model, tokenizer, Path(out))


def build_tiny_bart(out: str | Path, *, seed: int = 0) -> Path:
    """A 2+2-layer BART (summarization): encoder_layers / decoder_layers / d_model config fields."""
    import torch
    from tokenizers import AddedToken
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    raw = _byte_level_tokenizer(vocab_size=400)
    raw.add_special_tokens([AddedToken("<s>"), AddedToken("<pad>"), AddedToken("</s>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", pad_token="<pad>", eos_token="</s>")
    config = BartConfig(
        vocab_size=raw.get_vocab_size(),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    model = BartForConditionalGeneration(config).eval()
    return _save(model, tokenizer, Path(out))


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


BUILDERS = {
    "gpt2": build_tiny_gpt2,
    "llama": build_tiny_llama,
    "t5": build_tiny_t5,
    "bart": build_tiny_bart,
    "bert": build_tiny_bert,
    "bert-token": lambda out: build_tiny_bert(out, head="token-classification"),
    "bert-qa": lambda out: build_tiny_bert(out, head="question-answering"),
    "bert-base": lambda out: build_tiny_bert(out, head="base"),
}


def main(argv: list[str] | None = None) -> None:
    """python -m cloudllm.testing.tiny_models KIND OUT: build a tiny model folder offline."""
    import argparse
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("out")
    args = parser.parse_args(argv)
    path = BUILDERS[args.kind](args.out)
    print(f"built a tiny {args.kind} model in {path}")


if __name__ == "__main__":
    main()
