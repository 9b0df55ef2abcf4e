"""The runtime's AdapterSet on real peft and a real tiny GPT-2: per-request adapters, mixed batches."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from cloudllm.testing.tiny_adapters import build_tiny_lora  # noqa: E402
from cloudllm_runtime.adapters import AdapterSet, UnknownAdapter  # noqa: E402

PROMPTS = ["Once upon a time", "The quick brown fox"]


@pytest.fixture(scope="module")
def base_dir(tiny_gpt2):
    return tiny_gpt2


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_tiny_lora(base_dir, root / name, seed=seed) for name, seed in (("support", 1), ("legal", 2))}


@pytest.fixture
def served(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(base_dir).eval(), tokenizer


def _greedy(adapters: AdapterSet, tokenizer, prompts, names) -> list[list[int]]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = adapters.generating_model.generate(
            **batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id, **adapters.generate_kwargs(names)
        )
    rows = out[:, batch["input_ids"].shape[1] :].tolist()
    # A row that ends early is padded with EOS in a batch and simply shorter alone.
    return [row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row for row in rows]


def test_adapters_change_the_answer_and_differ_from_each_other(served, adapter_dirs):
    model, tokenizer = served
    adapters = AdapterSet(model)
    base = _greedy(adapters, tokenizer, PROMPTS[:1], [None])
    for name, path in adapter_dirs.items():
        adapters.add(name, path)
    assert adapters.names == ["legal", "support"]
    support = _greedy(adapters, tokenizer, PROMPTS[:1], ["support"])
    legal = _greedy(adapters, tokenizer, PROMPTS[:1], ["legal"])
    assert _greedy(adapters, tokenizer, PROMPTS[:1], [None]) == base  # the base stays itself beside its adapters
    assert len({str(base), str(support), str(legal)}) == 3


def test_a_mixed_batch_answers_each_row_as_if_alone(served, adapter_dirs):
    model, tokenizer = served
    adapters = AdapterSet(model)
    for name, path in adapter_dirs.items():
        adapters.add(name, path)
    names = ["support", "legal", None, "legal"]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    mixed = _greedy(adapters, tokenizer, prompts, names)
    alone = [_greedy(adapters, tokenizer, [p], [n])[0] for p, n in zip(prompts, names)]
    assert mixed == alone


def test_remove_and_unknown_adapters(served, adapter_dirs):
    model, tokenizer = served
    adapters = AdapterSet(model)
    adapters.add("support", adapter_dirs["support"])
    adapters.remove("support")
    assert adapters.names == []
    with pytest.raises(UnknownAdapter):
        adapters.generate_kwargs(["support"])
    with pytest.raises(UnknownAdapter):
        adapters.remove("support")
