"""Continuous batching for decoder-only generation: requests join and leave a running batch between decode steps.

One thread owns the running batch. Each turn it

1. prefills the requests that arrived since the last step (one forward over their left-padded
   prompts) and merges their KV cache into the running batch's, left-padding the narrower one,
2. runs one decode step over every running sequence (one forward, one token per row),
3. hands each row its token (a streaming caller hears of it at once) and lets rows that are
   finished (end of sequence, their own max_new_tokens, a stop sequence, a cancelled caller)
   leave: their rows are dropped from the cache, and columns only padding is left in are cut.

A request arriving while others decode therefore waits one step, not for a whole batch, and a
short answer never waits for a long neighbour. Rows may use different LoRA adapters (peft's
per-row ``adapter_names``). Left padding is masked and every row gets its own position ids,
so a greedy answer is the one the request gets alone.

How many rows run together: the batch's KV cache is bounded by ``max_batch_tokens`` (rows x
the longest row's prompt plus new tokens, as the batcher sizes a batch), with
``max_batch_size=1`` meaning one sequence at a time (batching off).

transformers 5's own continuous batching (``generate_batch`` / ContinuousBatchingManager)
is not used: it has no per-request LoRA adapters, stop sequences or cancellation, and its
paged attention targets CUDA. This loop calls only ``model(...)`` with ``past_key_values``,
and reads the cache as transformers 5's layers, 4.x's key/value lists or legacy tuples.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .protocol import RequestError, validation_error

# Checkpoint generation settings this loop does not apply: a model whose generation_config sets
# one of them is served by generate(), so its answers keep them.
UNSUPPORTED_GENERATION_SETTINGS = (
    "no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens", "suppress_tokens",
    "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "typical_p",
    "epsilon_cutoff", "eta_cutoff", "encoder_repetition_penalty", "exponential_decay_length_penalty",
    "renormalize_logits", "guidance_scale", "watermarking_config", "min_p", "low_memory", "penalty_alpha",
)  # fmt: skip


@dataclass
class Sequence:
    """One input being generated: its prompt, its limits and the tokens made so far."""

    prompt: list[int]
    budget: int  # max_new_tokens
    size: int  # prompt + budget: what it may take of the KV cache
    sampling: "Sampling | None"  # None: greedy
    adapter: str | None
    finished: Callable[[list[int]], bool]  # stop-sequence check on the tokens so far
    cancel: threading.Event | None = None
    on_token: Callable[[int, bool], None] | None = None  # (token id, final) as each is made
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    generated: list[int] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled() or (self.cancel is not None and self.cancel.is_set())


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class DecodeLoop:
    """The running batch of one decoder-only model; submit() sequences from any thread."""

    def __init__(
        self,
        engine: Any,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._waiting: list[Sequence] = []
        self._arrived = threading.Condition()
        self._thread: threading.Thread | None = None
        self._rows: list[Sequence] = []
        self._cache: Any = None  # the model's past_key_values for _rows
        self._mask: Any = None  # [rows, cache width]: 1 for real tokens, 0 for left padding
        self._next: Any = None  # [rows]: each row's newest token, not yet fed to the model

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, sequence: Sequence) -> concurrent.futures.Future:
        """Queue a sequence; its future answers the generated token ids (or the error that ended it)."""
        with self._arrived:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="cloudllm-decode", daemon=True)
                self._thread.start()
            self._waiting.append(sequence)
            self._arrived.notify()
        return sequence.future

    # --- the loop ------------------------------------------------------------------------------

    def _work(self) -> None:
        import torch

        while True:
            joining = self._admit()
            with self.engine.lock, torch.inference_mode():
                try:
                    if joining:
                        self._prefill(joining)
                    if self._rows:
                        self._decode()
                except BaseException as exc:  # a model failure ends the sequences it ran, not the server
                    for sequence in [*self._rows, *joining]:
                        _fail(sequence, exc)
                    self._reset()

    def _admit(self) -> list[Sequence]:
        """Waiting sequences that fit beside the running ones (waits for one when nothing runs)."""
        with self._arrived:
            while not self._rows and not self._waiting:
                self._arrived.wait()
            if not self._rows and self.max_wait > 0 and self.max_batch_size > 1:
                # Idle: give requests arriving together a moment to share the first prefill.
                deadline = time.monotonic() + self.max_wait
                while (left := deadline - time.monotonic()) > 0 and not self._full():
                    self._arrived.wait(left)
            sizes = [s.size for s in self._rows]
            joining = []
            for sequence in list(self._waiting):
                if sequence.cancelled:
                    self._waiting.remove(sequence)
                    _settle(sequence)
                elif self._fits([*sizes, sequence.size]):
                    self._waiting.remove(sequence)
                    joining.append(sequence)
                    sizes.append(sequence.size)
            return joining

    def _fits(self, sizes: list[int]) -> bool:
        if self.max_batch_size == 1:
            return len(sizes) <= 1
        return len(sizes) * max(sizes) <= self.max_batch_tokens

    def _full(self) -> bool:
        sizes = [s.size for s in self._waiting]
        return bool(sizes) and not self._fits([*sizes, min(sizes)])

    def _prefill(self, joining: list[Sequence]) -> None:
        """One forward over the new prompts; their first tokens, then their cache merged into the batch's."""
        import torch

        engine = self.engine
        width = max(len(s.prompt) for s in joining)
        ids = torch.tensor([[engine.pad_token_id] * (width - len(s.prompt)) + s.prompt for s in joining], device=engine.device)
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in joining], device=engine.device)
        logits, cache = self._forward(joining, ids, mask, None)
        tokens = self._choose(joining, logits)
        keep = self._hand_out(joining, tokens)
        if not keep:
            return
        index = torch.tensor(keep, device=engine.device)
        cache_pairs = [(k.index_select(0, index), v.index_select(0, index)) for k, v in _read(cache)]
        mask, tokens = mask.index_select(0, index), tokens.index_select(0, index)
        joined = [joining[i] for i in keep]
        if not self._rows:
            self._rows, self._cache, self._mask, self._next = joined, _write(cache, cache_pairs), mask, tokens
            self._trim()
            return
        old_width, new_width = self._mask.shape[1], mask.shape[1]
        full = max(old_width, new_width)
        merged = [
            (torch.cat([_pad_left(k0, full), _pad_left(k1, full)]), torch.cat([_pad_left(v0, full), _pad_left(v1, full)]))
            for (k0, v0), (k1, v1) in zip(_read(self._cache), cache_pairs)
        ]
        self._cache = _write(self._cache, merged)
        self._mask = torch.cat([_pad_left(self._mask, full, dim=1), _pad_left(mask, full, dim=1)])
        self._next = torch.cat([self._next, tokens])
        self._rows = [*self._rows, *joined]

    def _decode(self) -> None:
        """One token for every running row."""
        import torch

        left = [s for s in self._rows if s.cancelled]  # their callers left: nothing more is made for them
        if left:
            for sequence in left:
                _settle(sequence)
            self._keep([i for i, s in enumerate(self._rows) if not s.cancelled])
            if not self._rows:
                return
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits, self._cache = self._forward(self._rows, self._next[:, None], mask, self._cache)
        self._mask = mask
        tokens = self._choose(self._rows, logits)
        self._next = tokens
        self._keep(self._hand_out(self._rows, tokens))

    def _forward(self, rows: list[Sequence], ids: Any, mask: Any, cache: Any) -> tuple[Any, Any]:
        """The model's last-position logits for each row, and the cache with these tokens in it."""
        engine = self.engine
        model, extra = engine._generator({"adapter_id": [s.adapter for s in rows]}, len(rows))
        accepts = engine._forward_args
        arguments: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True, **extra}
        if cache is not None:
            # transformers 5.2x renamed past_key_values to cache (the old name warns, then goes in 5.40).
            arguments["cache" if "cache" in accepts else "past_key_values"] = cache
        if "position_ids" in accepts:
            positions = mask.long().cumsum(-1) - 1
            arguments["position_ids"] = positions[:, -ids.shape[1] :].clamp(min=0)
        for name in ("logits_to_keep", "num_logits_to_keep"):  # the prompt's other positions need no logits
            if name in accepts:
                arguments[name] = 1
                break
        out = model(**arguments)
        returned = out.get("cache") if "cache" in out else out.past_key_values
        return out.logits[:, -1, :].float(), returned

    def _choose(self, rows: list[Sequence], logits: Any) -> Any:
        """Each row's next token: argmax for greedy rows, a draw from the warped distribution for sampling ones."""
        import torch

        tokens = torch.argmax(logits, dim=-1)
        for row, sequence in enumerate(rows):
            if sequence.sampling is not None:
                try:
                    tokens[row] = _sample(logits[row], sequence.sampling)
                except RequestError as exc:  # this row's parameters: only its caller hears of it
                    _fail(sequence, exc)
        return tokens

    def _hand_out(self, rows: list[Sequence], tokens: Any) -> list[int]:
        """Give each row its token; the indices of the rows that go on."""
        values = tokens.tolist()
        going_on = []
        made = 0
        for row, (sequence, token) in enumerate(zip(rows, values)):
            if sequence.future.done():  # failed (or cancelled) while choosing its token
                continue
            sequence.generated.append(token)
            made += 1
            done = (
                token in self.engine.eos_token_ids
                or len(sequence.generated) >= sequence.budget
                or sequence.finished(sequence.generated)
            )
            if sequence.on_token is not None:
                try:
                    sequence.on_token(token, done)
                except BaseException as exc:  # the listener's failure ends its own sequence only
                    _fail(sequence, exc)
                    continue
            if done:
                _settle(sequence)
            else:
                going_on.append(row)
        on_tokens = self.engine.on_tokens
        if on_tokens is not None:
            on_tokens(made)
        on_batch = getattr(self.engine, "on_batch", None)
        if on_batch is not None:
            on_batch(len(rows))
        return going_on

    def _keep(self, rows: list[int]) -> None:
        """Drop the other rows from the batch."""
        import torch

        if len(rows) == len(self._rows):
            return
        if not rows:
            self._reset()
            return
        index = torch.tensor(rows, device=self._mask.device)
        self._cache = _write(self._cache, [(k.index_select(0, index), v.index_select(0, index)) for k, v in _read(self._cache)])
        self._mask = self._mask.index_select(0, index)
        self._next = self._next.index_select(0, index)
        self._rows = [self._rows[i] for i in rows]
        self._trim()

    def _trim(self) -> None:
        """Cut the leading columns that are padding in every row (a long row left)."""
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first:
            self._cache = _write(self._cache, [(k[:, :, first:], v[:, :, first:]) for k, v in _read(self._cache)])
            self._mask = self._mask[:, first:]

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._next = [], None, None, None


# --- sampling ----------------------------------------------------------------------------------


def _sample(logits: Any, sampling: Sampling) -> int:
    """transformers' temperature, top-k and top-p warpers (in that order), then one draw."""
    import torch

    scores = logits / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, scores.shape[-1])
        threshold = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - sampling.top_p)
        drop[-1] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if not torch.isfinite(probabilities).all():
        raise validation_error("the sampling parameters overflow this model's probabilities; use a temperature nearer 1")
    return int(torch.multinomial(probabilities, 1))


# --- the KV cache as (keys, values) per layer, whatever object the model keeps it in ------------


def _read(cache: Any) -> list[tuple[Any, Any]]:
    if isinstance(cache, (tuple, list)):  # legacy: ((keys, values), ...) per layer
        return [(layer[0], layer[1]) for layer in cache]
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers 5: one DynamicLayer per layer
        for layer in layers:
            if type(layer).__name__ != "DynamicLayer":
                raise RuntimeError(f"continuous batching needs a plain dynamic KV cache, not {type(layer).__name__}")
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x DynamicCache


def _write(cache: Any, pairs: list[tuple[Any, Any]]) -> Any:
    if isinstance(cache, (tuple, list)):
        return tuple((keys, values) for keys, values in pairs)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer, (keys, values) in zip(layers, pairs):
            layer.keys, layer.values = keys, values
        return cache
    cache.key_cache[:] = [keys for keys, _ in pairs]
    cache.value_cache[:] = [values for _, values in pairs]
    if hasattr(cache, "_seen_tokens"):
        cache._seen_tokens = pairs[0][0].shape[-2]
    return cache


def _pad_left(tensor: Any, width: int, dim: int = -2) -> Any:
    """tensor zero-padded on the left of dim (keys/values: the sequence axis) up to width."""
    import torch

    gap = width - tensor.shape[dim]
    if gap <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = gap
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def _settle(sequence: Sequence) -> None:
    if not sequence.future.done():
        sequence.future.set_result(list(sequence.generated))


def _fail(sequence: Sequence, exc: BaseException) -> None:
    if not sequence.future.done():
        sequence.future.set_exception(exc)


def gather(futures: list[concurrent.futures.Future]) -> concurrent.futures.Future:
    """One future for several: their results in order, or the first error."""
    combined: concurrent.futures.Future = concurrent.futures.Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def done(_: concurrent.futures.Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if not last or combined.done():
            return
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if errors:
            combined.set_exception(errors[0])
        else:
            combined.set_result([f.result() if not f.cancelled() else [] for f in futures])

    def cancel_all(f: concurrent.futures.Future) -> None:
        if f.cancelled():
            for part in futures:
                part.cancel()

    if not futures:
        combined.set_result([])
    for future in futures:
        future.add_done_callback(done)
    combined.add_done_callback(cancel_all)
    return combined


def then(future: concurrent.futures.Future, convert: Callable[[Any], Any]) -> concurrent.futures.Future:
    """A future of convert(future's result); cancelling it cancels future."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def done(f: concurrent.futures.Future) -> None:
        if out.done():
            return
        if f.cancelled():
            out.cancel()
            return
        try:
            out.set_result(convert(f.result()))
        except BaseException as exc:
            out.set_exception(exc)

    out.add_done_callback(lambda f: f.cancelled() and future.cancel())
    future.add_done_callback(done)
    return out


def steppable(model: Any) -> bool:
    """Whether the loop can run this model: decoder-only, full attention in every layer, no generation settings it would skip."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    try:
        from transformers import GenerationConfig

        defaults, own = GenerationConfig(), getattr(model, "generation_config", None)
    except ImportError:
        return False
    if own is None:
        return True
    return all(getattr(own, name, None) == getattr(defaults, name, None) for name in UNSUPPORTED_GENERATION_SETTINGS)
