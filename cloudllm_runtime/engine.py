"""Load a model folder for its task and run batches of inputs through it.

``load_engine(model_dir, settings)`` returns an :class:`Engine` whose

- ``predict(inputs, parameters) -> list`` answers one JSON-ready output per input,
- ``run(inputs, parameters) -> list[Prediction]`` is the same plus the number of
  generated tokens per input (what the server's metrics and logs count),
- ``validate(inputs, parameters) -> list[int]`` only tokenizes, raising ``RequestError(422)``
  for an input over the limits, so one bad request never fails a batch it would have joined,
  and answers each input's size in tokens (prompt plus new tokens: what it takes of the KV cache),
- for generation tasks, ``stream(input, parameters) -> Iterator[str]`` yields the text of
  each token as it is produced, and ``generate_stream`` reports :class:`Token` objects
  (id, text, special) to a callback and returns the final :class:`Prediction`.

Outputs per input, by task:

- text-generation: ``{"generated_text": str}`` (plus ``"details"`` when asked for)
- text2text-generation / summarization / translation: ``{"generated_text" | "summary_text" | "translation_text": str}``
- text-classification: ``[{"label": str, "score": float}, ...]``, best first
- token-classification: ``[{"entity_group", "score", "word", "start", "end"}, ...]``
  (per-token ``{"entity", "score", "index", "word", "start", "end"}`` with aggregation "none")
- question-answering: ``{"answer": str, "score": float, "start": int, "end": int}``
- feature-extraction: ``[float, ...]`` (``[[float, ...], ...]`` per token with pooling "none")

A generation's rows each stop at their own budget, and a row whose cancel event is set (its
client hung up) stops at the next token, so a request's answer does not depend on who it was
batched with and nobody's work is done for a caller who left. ``on_tokens(n)`` is told of
every decoding step's new tokens as they are made.

torch and transformers are imported inside functions, so importing this module is cheap,
and only APIs present in both transformers 4.4x and 5.x are used.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from . import quantized
from .placement import dtype_keyword, resolve_dtype, resolve_placement
from .protocol import GENERATION_TASKS, OUTPUT_KEYS, RequestError, normalize_task, validation_error

DEFAULT_AGGREGATION = "simple"
DEFAULT_MAX_ANSWER_LEN = 15
# Below this temperature sampling is greedy decoding (the limit as it goes to 0, vLLM's rule):
# logits divided by a tinier one overflow float32 and the probabilities turn to NaN.
GREEDY_TEMPERATURE = 1e-5

Cancels = Sequence["threading.Event | None"]


@dataclass
class Prediction:
    """One input's answer: the JSON-ready output and how many tokens the model generated for it."""

    output: Any
    generated_tokens: int = 0


@dataclass(frozen=True)
class Token:
    """One streamed token.

    final: generation ends with this token (end of sequence, length or a stop sequence),
    known as it is produced so a server can send it at once. id is None for a closing
    piece of text (bytes held back until a character completed), reported after the end.
    """

    id: int | None
    text: str
    special: bool = False
    final: bool = False


# --- loading --------------------------------------------------------------------------------


def load_engine(model_dir: str, settings: Any) -> "Engine":
    """Load the model and tokenizer in model_dir for settings.task, placed per settings.device/dtype."""
    task = normalize_task(settings.task)
    engine_cls = ENGINES[task]
    apply_intra_op_threads(settings)
    tokenizer = _load_tokenizer(model_dir, settings)
    _require_vocabulary(tokenizer, model_dir)
    model = _load_model(engine_cls.auto_class, model_dir, settings)
    return engine_cls(task=task, model=model, tokenizer=tokenizer, settings=settings, model_dir=model_dir)


def apply_intra_op_threads(settings: Any) -> int:
    """Set torch's intra-op threads from the settings (default: the CPUs this process may use); returns the count."""
    import torch

    threads = settings.resolved_intra_op_threads()
    torch.set_num_threads(threads)
    return threads


def _load_tokenizer(model_dir: str, settings: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=settings.trust_remote_code)


def _require_vocabulary(tokenizer: Any, model_dir: str) -> None:
    """Refuse a tokenizer with no tokens beyond its special ones.

    transformers 5 builds one from config.json alone when a folder has no tokenizer files;
    it encodes every text to nothing, so the server would load and then fail each request.
    """
    added = tokenizer.get_added_vocab()
    if any(token not in added for token in tokenizer.get_vocab()):
        return
    raise ValueError(
        f"the tokenizer in {model_dir} has no vocabulary (no tokenizer.json, vocab or sentencepiece file); "
        "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) from the original model into the model folder"
    )


def _load_model(auto_class: str, model_dir: str, settings: Any) -> Any:
    import transformers

    if quantized.is_quantized(model_dir):  # int8/int4 weights written by `cloudllm quantize`
        return quantized.load_quantized_model(model_dir, getattr(transformers, auto_class), settings)
    device, device_map = resolve_placement(settings.device)
    kwargs: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code, dtype_keyword(): resolve_dtype(settings.dtype, device)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = getattr(transformers, auto_class).from_pretrained(model_dir, **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    return model


# --- engines --------------------------------------------------------------------------------


class Engine:
    """A loaded model for one task. Thread-safe: model calls take self.lock, one at a time."""

    auto_class = "AutoModel"
    streaming = False
    adapters: Any = None  # cloudllm_runtime.adapters.AdapterSet once a LoRA adapter is loaded

    def __init__(self, *, task: str, model: Any, tokenizer: Any, settings: Any, model_dir: str = "") -> None:
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.model_dir = model_dir
        self.config = model.config
        self.device = model.device
        # One forward pass or generate() at a time: batching is the batcher's job, and
        # concurrent calls would only compete for the same GPU memory.
        self.lock = threading.Lock()
        # Fast tokenizers are Rust objects that refuse concurrent mutable use ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self.pad_token_id = _pad_token_id(tokenizer, model.config)
        self._forward_args = _forward_arguments(model)
        self.max_input_tokens = self._input_limit()
        # Tokenizing is linear in the text and holds the tokenizer's lock: text too long to fit
        # in max_input_tokens whatever it says is refused by its length before the tokenizer sees it.
        self.max_input_chars = self.max_input_tokens * _longest_token(tokenizer)
        self.on_tokens: Callable[[int], None] | None = None  # told of each decoding step's new tokens
        self._encode("warm up")  # settles the tokenizer's padding/truncation state before threads share it

    # Subclasses override these two.
    def _run(self, inputs: list[Any], parameters: dict[str, Any], cancels: list[Any]) -> list[Prediction]:
        raise NotImplementedError

    def _input_length(self, item: Any, index: int = 0, count: int = 1) -> int:
        self._check_size(item, index, count)
        return len(self._encode(item)["input_ids"])

    # Public API.
    def validate(self, inputs: Sequence[Any], parameters: dict[str, Any]) -> list[int]:
        """Each input's size in tokens, or RequestError(422) when one is too long; never touches the model."""
        sizes = []
        for index, item in enumerate(inputs):
            length = self._input_length(item, index, len(inputs))
            self._check_length(length, index, len(inputs))
            sizes.append(length)
        return sizes

    def run(self, inputs: Sequence[Any], parameters: dict[str, Any], cancels: Cancels | None = None) -> list[Prediction]:
        """One Prediction per input, from one model call (a batch); cancels[i] set stops input i's work."""
        if not inputs:
            return []
        import torch

        with self.lock, torch.inference_mode():
            return self._run(list(inputs), dict(parameters), list(cancels or [None] * len(inputs)))

    def predict(self, inputs: Sequence[Any], parameters: dict[str, Any], cancels: Cancels | None = None) -> list[Any]:
        """One JSON-ready output per input."""
        return [p.output for p in self.run(inputs, parameters, cancels)]

    # Helpers for subclasses.
    def _input_limit(self) -> int:
        limits = [self.settings.max_input_tokens, _position_limit(self.config)]
        # An encoder's tokenizer knows its real ceiling where the positions table misleads
        # (RoBERTa: 514 positions, 512 usable); past it the model would crash, not refuse.
        declared = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(declared, int) and 0 < declared < 1_000_000:
            limits.append(declared)
        return min(limit for limit in limits if limit)

    def _check_size(self, text: str, index: int, count: int) -> None:
        """422 for a text longer than any max_input_tokens tokens can spell (before tokenizing it)."""
        if len(text) > self.max_input_chars:
            raise validation_error(
                f"{_which(index, count)} is {len(text)} characters long; this endpoint accepts at most "
                f"{self.max_input_tokens} input tokens, which no text over {self.max_input_chars} characters fits in"
            )

    def _check_length(self, length: int, index: int, count: int) -> None:
        which = _which(index, count)
        if length == 0:
            # A tokenizer that strips what it cannot read (whitespace, control characters) can
            # leave nothing, and a model cannot run on no tokens.
            raise validation_error(f"{which} encodes to no tokens: this model's tokenizer drops all of its text")
        if length > self.max_input_tokens:
            raise validation_error(
                f"{which} is {length} tokens long; this endpoint accepts at most {self.max_input_tokens} input tokens"
            )

    def _encode(self, text: str, pair: str | None = None, **kwargs: Any) -> Any:
        with self._tokenizer_lock:
            if pair is None:
                return self.tokenizer(text, **kwargs)
            return self.tokenizer(text, pair, **kwargs)

    def _collate(self, encodings: list[Any], *, left: bool = False) -> dict[str, Any]:
        """Pad token lists into tensors ourselves: tokenizer.pad would mutate shared tokenizer state."""
        import torch

        width = max(len(e["input_ids"]) for e in encodings)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
        with_types = "token_type_ids" in encodings[0] and "token_type_ids" in self._forward_args
        if with_types:
            batch["token_type_ids"] = []
        for e in encodings:
            ids = list(e["input_ids"])
            gap = width - len(ids)
            rows = {"input_ids": (ids, self.pad_token_id), "attention_mask": ([1] * len(ids), 0)}
            if with_types:
                rows["token_type_ids"] = (list(e["token_type_ids"]), 0)
            for key, (values, fill) in rows.items():
                batch[key].append([fill] * gap + values if left else values + [fill] * gap)
        return {key: torch.tensor(value, dtype=torch.long, device=self.device) for key, value in batch.items()}


class GenerationEngine(Engine):
    """text-generation (decoder-only, left-padded) and text2text / summarization / translation (seq2seq)."""

    auto_class = "AutoModelForCausalLM"
    streaming = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seq2seq = bool(getattr(self.config, "is_encoder_decoder", False))
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        self.special_ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        self.output_key = OUTPUT_KEYS[self.task]
        # The HF summarization/translation pipelines prepend the checkpoint's task prefix (T5's "summarize: ").
        task_params = getattr(self.config, "task_specific_params", None) or {}
        self.prefix = (task_params.get(self.task) or {}).get("prefix") or getattr(self.config, "prefix", None) or ""
        self.total_limit = self.settings.max_total_tokens
        if not self.seq2seq:
            positions = _position_limit(self.config)
            self.total_limit = min(self.total_limit, positions) if positions else self.total_limit
        self.on_batch: Callable[[int], None] | None = None  # told of the rows of each decode step
        self.decode_loop = self._decode_loop()

    def _decode_loop(self) -> Any:
        """The continuous-batching loop, or None where generate() serves every request (seq2seq, sliding windows)."""
        from .continuous import DecodeLoop, steppable

        if self.seq2seq or not steppable(self.model):
            return None
        s = self.settings
        # The batcher's KV budget: max_batch_size sequences of max_total_tokens (what GPU plans size).
        return DecodeLoop(self, max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_size * s.max_total_tokens, max_wait_ms=s.max_batch_wait_ms)

    def steps(self, parameters: dict[str, Any]) -> bool:
        """Whether the decode loop serves these parameters. A seed or a repetition penalty go to generate()
        alone, as the batcher runs them: a seeded draw must not depend on its neighbours."""
        return self.decode_loop is not None and "seed" not in parameters and parameters.get("repetition_penalty", 1.0) == 1.0

    def submit(self, inputs: Sequence[Any], parameters: dict[str, Any], cancels: Cancels | None = None) -> Any:
        """Queue inputs on the decode loop: a concurrent future of their Predictions, or None where generate() serves them.

        Raises RequestError (422, 404) for an input or adapter it refuses, before anything is queued.
        """
        if not self.steps(parameters):
            return None
        from .continuous import gather, then

        inputs, cancels = list(inputs), list(cancels or [None] * len(inputs))
        wanted = parameters.get("adapter_id")
        adapters = wanted if isinstance(wanted, list) else [wanted] * len(inputs)
        self._generator({"adapter_id": adapters}, len(inputs))  # 404 now for an adapter that is gone
        sequences = [self._sequence(text, i, len(inputs), parameters, adapters[i], cancels[i]) for i, text in enumerate(inputs)]
        futures = [self.decode_loop.submit(sequence) for sequence in sequences]
        return then(gather(futures), lambda rows: [self._finish(text, row, parameters) for text, row in zip(inputs, rows)])

    def _sequence(self, text: str, index: int, count: int, parameters: dict[str, Any], adapter: str | None, cancel: Any, on_token: Any = None) -> Any:
        from .continuous import Sampling, Sequence as Row

        ids = self._token_ids(text, index, count)
        budget = self._budget(len(ids), parameters, index, count)
        sampling = None
        if self._sampling(parameters):
            sampling = Sampling(parameters.get("temperature", 1.0), parameters.get("top_k", 0), parameters.get("top_p", 1.0))
        stops = parameters.get("stop") or ()
        window = _stop_window(stops)

        def finished(generated: list[int]) -> bool:
            return bool(stops) and _first_stop(self._decode(generated[-window:]), stops) is not None

        return Row(ids, budget, len(ids) + budget, sampling, adapter, finished, cancel, on_token)

    def run(self, inputs: Sequence[Any], parameters: dict[str, Any], cancels: Cancels | None = None) -> list[Prediction]:
        future = self.submit(inputs, parameters, cancels) if inputs else None
        if future is None:
            return super().run(inputs, parameters, cancels)
        return future.result()

    def _input_limit(self) -> int:
        if getattr(self.config, "is_encoder_decoder", False):
            return super()._input_limit()
        # A decoder needs at least one position left for the first new token.
        positions = _position_limit(self.config)
        return min(self.settings.max_input_tokens, positions - 1) if positions else self.settings.max_input_tokens

    def _token_ids(self, text: str, index: int = 0, count: int = 1) -> list[int]:
        self._check_size(self.prefix + text, index, count)
        return list(self._encode(self.prefix + text)["input_ids"])

    def _input_length(self, item: Any, index: int = 0, count: int = 1) -> int:
        return len(self._token_ids(item, index, count))

    def validate(self, inputs: Sequence[Any], parameters: dict[str, Any]) -> list[int]:
        sizes = []
        for index, item in enumerate(inputs):
            length = self._input_length(item, index, len(inputs))
            sizes.append(length + self._budget(length, parameters, index, len(inputs)))
        return sizes

    def _budget(self, length: int, parameters: dict[str, Any], index: int = 0, count: int = 1) -> int:
        """max_new_tokens for an input of length tokens: the request's, else the default clipped to what fits."""
        self._check_length(length, index, count)
        room = self.total_limit - length
        requested = parameters.get("max_new_tokens")
        if requested is None:
            return max(1, min(self.settings.default_max_new_tokens, room))
        if requested > room:
            raise validation_error(
                f"input tokens + max_new_tokens must be <= {self.total_limit}; "
                f"got {length} input tokens and max_new_tokens {requested}"
            )
        return requested

    def _run(self, inputs: list[Any], parameters: dict[str, Any], cancels: list[Any]) -> list[Prediction]:
        ids = [self._token_ids(text, i, len(inputs)) for i, text in enumerate(inputs)]
        # Each row its own budget (the default one is clipped to the room its own prompt leaves),
        # so a row's answer is the same whoever shares its batch.
        budgets = [self._budget(len(row), parameters, i, len(ids)) for i, row in enumerate(ids)]
        batch = self._collate([{"input_ids": row} for row in ids], left=not self.seq2seq)
        prompt_width = batch["input_ids"].shape[1]
        start = 1 if self.seq2seq else prompt_width  # seq2seq outputs begin with the decoder start token
        criteria = self._stopping_criteria(parameters, start, budgets, cancels)
        self._seed(parameters)
        model, per_row = self._generator(parameters, len(ids))
        with _model_arithmetic(parameters):
            out = model.generate(
                **batch, **per_row, generation_config=self._generation_config(parameters, max(budgets)), stopping_criteria=criteria
            )
        rows = out[:, start:].tolist()
        return [self._finish(text, row[:budget], parameters) for text, row, budget in zip(inputs, rows, budgets)]

    def generate_stream(
        self,
        text: str,
        parameters: dict[str, Any],
        on_token: Callable[[Token], None],
        cancel: threading.Event | None = None,
    ) -> Prediction:
        """Generate for one input, calling on_token (from this thread) as each token is produced.

        Concatenating the tokens' texts gives the generated text (before any stop-sequence
        cut). Setting cancel stops generation at the next token.
        """
        import torch

        if self.steps(parameters):
            return self._stream_steps(text, parameters, on_token, cancel)
        ids = self._token_ids(text)
        max_new = self._budget(len(ids), parameters)
        batch = self._collate([{"input_ids": ids}])
        start = 1 if self.seq2seq else len(ids)
        stops = parameters.get("stop") or ()
        window = _stop_window(stops)

        def ends_here(generated: list[int]) -> bool:
            # The same conditions generate() checks right after handing us the token.
            if generated[-1] in self.eos_token_ids or len(generated) >= max_new:
                return True
            return bool(stops) and _first_stop(self._decode(generated[-window:]), stops) is not None

        streamer = _token_streamer_class()(self.tokenizer, on_token, self.special_ids, ends_here)
        criteria = self._stopping_criteria(parameters, start, [max_new], [cancel])
        config = self._generation_config(parameters, max_new, stream=True)
        with self.lock, torch.inference_mode(), _model_arithmetic(parameters):
            self._seed(parameters)
            model, per_row = self._generator(parameters, 1)
            out = model.generate(**batch, **per_row, generation_config=config, stopping_criteria=criteria, streamer=streamer)
        streamer.flush()
        return self._finish(text, out[0, start:].tolist(), parameters)

    def _stream_steps(self, text: str, parameters: dict[str, Any], on_token: Callable[[Token], None], cancel: Any) -> Prediction:
        """generate_stream through the decode loop: this request's tokens as the running batch makes them."""
        import torch

        final = [False]  # the loop says whether the token it hands over ends the sequence
        streamer = _token_streamer_class()(self.tokenizer, on_token, self.special_ids, lambda ids: final[0])
        streamer.prompt_seen = True

        def hand_over(token_id: int, done: bool) -> None:
            final[0] = done
            streamer.put(torch.tensor([token_id]))

        self._generator(parameters, 1)  # 404 now for an adapter that is gone
        sequence = self._sequence(text, 0, 1, parameters, parameters.get("adapter_id"), cancel, hand_over)
        row = self.decode_loop.submit(sequence).result()
        streamer.flush()
        return self._finish(text, row, parameters)

    def stream(
        self, text: str, parameters: dict[str, Any], *, cancel: threading.Event | None = None,
        keep: Callable[[Token], bool] | None = None, submit: Callable[[Callable[[], None]], Any] | None = None,
    ) -> Iterator[str]:  # a generator whose return value is the Prediction
        """Yield the text of each generated token as it is produced; the generator returns the Prediction.

        Generation runs in a thread of its own, or through submit (an executor's submit: a bounded
        pool). keep(token) picks the tokens whose text is yielded (default: all). Setting cancel, or
        closing the generator early, stops generating at the next token.
        """
        pieces: queue.Queue = queue.Queue()
        done = object()
        cancel = cancel or threading.Event()
        outcome: list[Any] = []  # the Prediction, or the exception handed to the consumer

        def work() -> None:
            try:
                outcome.append(self.generate_stream(text, parameters, lambda t: (keep is None or keep(t)) and pieces.put(t.text), cancel))
            except BaseException as exc:
                outcome.append(exc)
            finally:
                pieces.put(done)

        if submit is None:
            thread = threading.Thread(target=work, name="cloudllm-stream", daemon=True)
            thread.start()
            wait = thread.join
        else:
            wait = submit(work).result
        try:
            while (piece := pieces.get()) is not done:
                yield piece
        finally:
            cancel.set()  # the consumer stopped early: stop generating
            wait()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    # Generation pieces.
    def _generator(self, parameters: dict[str, Any], rows: int) -> tuple[Any, dict[str, Any]]:
        """The module to generate with and its per-row arguments: the base alone, or peft's wrapper
        with each row's adapter (parameters["adapter_id"]: one name, or one per row from the batcher)."""
        if self.adapters is None:
            return self.model, {}
        from .adapters import UnknownAdapter

        wanted = parameters.get("adapter_id")
        try:
            return self.adapters.generating_model, self.adapters.generate_kwargs(wanted if isinstance(wanted, list) else [wanted] * rows)
        except UnknownAdapter as exc:  # removed after the request was admitted
            raise RequestError(404, f"adapter {exc.args[0]!r} was removed from this server", "adapter_not_found") from None

    def _seed(self, parameters: dict[str, Any]) -> None:
        if "seed" in parameters:
            import torch

            torch.manual_seed(parameters["seed"])

    def _generation_config(self, parameters: dict[str, Any], max_new: int, *, stream: bool = False) -> Any:
        """The checkpoint's generation config with TGI's defaults on top: greedy unless asked to sample."""
        from transformers import GenerationConfig

        config = copy.deepcopy(self.model.generation_config)
        defaults = GenerationConfig()
        sampling = self._sampling(parameters)
        config.do_sample = sampling
        if sampling:
            config.temperature = parameters.get("temperature", 1.0)
            config.top_p = parameters.get("top_p", 1.0)
            config.top_k = parameters.get("top_k", 0)
        else:
            # Greedy: the checkpoint's sampling knobs would only trigger "unused" warnings.
            config.temperature, config.top_p, config.top_k = defaults.temperature, defaults.top_p, defaults.top_k
        if "repetition_penalty" in parameters:
            config.repetition_penalty = parameters["repetition_penalty"]
        elif not self.seq2seq:
            config.repetition_penalty = defaults.repetition_penalty
        if stream or not self.seq2seq:
            config.num_beams = 1  # streamers take one sequence; TGI never beams
        config.num_return_sequences = 1
        config.max_new_tokens = max_new
        config.pad_token_id = self.pad_token_id
        if self.eos_token_ids:
            config.eos_token_id = sorted(self.eos_token_ids)
        return config

    @staticmethod
    def _sampling(parameters: dict[str, Any]) -> bool:
        """Whether to sample (else greedy), TGI's rule: asking for temperature, top_p or top_k means sampling."""
        sampling = parameters.get("do_sample")
        if sampling is None:
            sampling = (
                parameters.get("temperature", 1.0) != 1.0
                or parameters.get("top_p", 1.0) < 1.0
                or parameters.get("top_k", 0) > 0
            )
        return bool(sampling) and parameters.get("temperature", 1.0) >= GREEDY_TEMPERATURE

    def _stopping_criteria(self, parameters: dict[str, Any], start: int, budgets: list[int], cancels: list[Any]) -> Any:
        from transformers import StoppingCriteriaList

        stop_on_text, row_limits = _criteria_classes()
        criteria = StoppingCriteriaList([row_limits(start, budgets, cancels, self.eos_token_ids, self.on_tokens)])
        if parameters.get("stop"):
            criteria.append(stop_on_text(self.tokenizer, parameters["stop"], start))
        return criteria

    def _finish(self, prompt: str, row: list[int], parameters: dict[str, Any]) -> Prediction:
        """Turn one output row (new tokens, maybe padded) into the output dict."""
        end, reason = len(row), "length"
        for i, token in enumerate(row):
            if token in self.eos_token_ids:
                end, reason = i + 1, "eos_token"
                break
        if reason == "length":
            # A row a stop sequence ended early is padded up to the batch's longest row.
            while end and row[end - 1] == self.pad_token_id:
                end -= 1
        text = self._decode(row[:end])
        cut = _first_stop(text, parameters.get("stop") or ())
        if cut is not None:
            text = text[:cut]
            if reason == "eos_token" and end and row[end - 1] in self.eos_token_ids:
                end -= 1  # generation stopped at the stop sequence; what follows is padding
            reason = "stop_sequence"
        if parameters.get("return_full_text"):
            text = prompt + text
        output: dict[str, Any] = {self.output_key: text}
        if parameters.get("details"):
            output["details"] = {"finish_reason": reason, "generated_tokens": end, "seed": parameters.get("seed")}
        return Prediction(output=output, generated_tokens=end)

    def _decode(self, ids: list[int]) -> str:
        # TGI's decoding: no whitespace "clean up", so streamed pieces add up to the same text.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class Seq2SeqEngine(GenerationEngine):
    auto_class = "AutoModelForSeq2SeqLM"


class ClassificationEngine(Engine):
    """text-classification: every label with its score, best first."""

    auto_class = "AutoModelForSequenceClassification"

    def _run(self, inputs: list[Any], parameters: dict[str, Any], cancels: list[Any]) -> list[Prediction]:
        import torch

        batch = self._collate([self._encode(text) for text in inputs])
        logits = self.model(**batch).logits.float()
        function = parameters.get("function_to_apply") or self._default_function()
        if function == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif function == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        id2label = getattr(self.config, "id2label", None) or {}
        top_k = parameters.get("top_k")
        results = []
        for row in scores.tolist():
            ranked = sorted(
                ({"label": id2label.get(i, f"LABEL_{i}"), "score": score} for i, score in enumerate(row)),
                key=lambda item: item["score"],
                reverse=True,
            )
            results.append(Prediction(ranked[:top_k] if top_k else ranked))
        return results

    def _default_function(self) -> str:
        # The same choice as transformers' text-classification pipeline.
        problem = getattr(self.config, "problem_type", None)
        if problem == "multi_label_classification" or self.config.num_labels == 1:
            return "sigmoid"
        if problem == "regression":
            return "none"
        return "softmax"


class TokenClassificationEngine(Engine):
    """token-classification through transformers' own pipeline (its aggregation rules are subtle)."""

    auto_class = "AutoModelForTokenClassification"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from transformers import pipeline

        # The pipeline truncates, which flips shared tokenizer state; it gets its own copy.
        own_tokenizer = _load_tokenizer(self.model_dir, self.settings) if self.model_dir else copy.deepcopy(self.tokenizer)
        if own_tokenizer.pad_token_id is None and own_tokenizer.eos_token is not None:
            own_tokenizer.pad_token = own_tokenizer.eos_token  # the pipeline pads batches; the mask hides the pads
        self.batchable = own_tokenizer.pad_token_id is not None
        placement = {} if getattr(self.model, "hf_device_map", None) else {"device": self.device}
        self.pipeline = pipeline("token-classification", model=self.model, tokenizer=own_tokenizer, **placement)

    def _run(self, inputs: list[Any], parameters: dict[str, Any], cancels: list[Any]) -> list[Prediction]:
        strategy = parameters.get("aggregation_strategy") or DEFAULT_AGGREGATION
        # Without batch_size the pipeline runs one forward pass per input, whatever the batcher gathered.
        batch_size = len(inputs) if self.batchable else 1
        results = self.pipeline(list(inputs), aggregation_strategy=strategy, batch_size=batch_size)
        return [Prediction(_plain(entities)) for entities in results]


class QuestionAnsweringEngine(Engine):
    """Extractive question answering: the best context span by start x end probability."""

    auto_class = "AutoModelForQuestionAnswering"

    def _input_length(self, item: Any, index: int = 0, count: int = 1) -> int:
        self._check_size(item["question"] + item["context"], index, count)
        return len(self._encode(item["question"], item["context"])["input_ids"])

    def _run(self, inputs: list[Any], parameters: dict[str, Any], cancels: list[Any]) -> list[Prediction]:
        import torch

        max_len = parameters.get("max_answer_len", DEFAULT_MAX_ANSWER_LEN)
        encodings = [self._encode(item["question"], item["context"], return_offsets_mapping=True) for item in inputs]
        for index, encoding in enumerate(encodings):
            self._check_length(len(encoding["input_ids"]), index, len(encodings))
        # One forward pass for the batch, right-padded; each row is then read over its own tokens only.
        out = self.model(**self._collate(encodings))
        results = []
        for row, (item, encoding) in enumerate(zip(inputs, encodings)):
            width = len(encoding["input_ids"])
            in_context = torch.tensor([s == 1 for s in encoding.sequence_ids()], device=out.start_logits.device)
            # As the HF pipeline: only context tokens may start or end the answer.
            start = torch.softmax(out.start_logits[row, :width].float().masked_fill(~in_context, -10000.0), dim=-1)
            end = torch.softmax(out.end_logits[row, :width].float().masked_fill(~in_context, -10000.0), dim=-1)
            spans = torch.triu(torch.outer(start, end)) - torch.triu(torch.outer(start, end), diagonal=max_len)
            best = int(torch.argmax(spans))
            first, last = divmod(best, spans.shape[1])
            offsets = encoding["offset_mapping"]
            char_start, char_end = int(offsets[first][0]), int(offsets[last][1])
            results.append(
                Prediction(
                    {
                        "answer": item["context"][char_start:char_end],
                        "score": float(spans[first, last]),
                        "start": char_start,
                        "end": char_end,
                    }
                )
            )
        return results


class FeatureExtractionEngine(Engine):
    """feature-extraction: one embedding per input, mean-pooled over its tokens unless asked otherwise."""

    auto_class = "AutoModel"

    def _run(self, inputs: list[Any], parameters: dict[str, Any], cancels: list[Any]) -> list[Prediction]:
        import torch

        batch = self._collate([self._encode(text) for text in inputs])
        encoder = self.model.get_encoder() if getattr(self.config, "is_encoder_decoder", False) else self.model
        hidden = encoder(**batch)[0].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooling = parameters.get("pooling") or "mean"
        if pooling == "mean":
            vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        elif pooling == "cls":
            vectors = hidden[:, 0]
        else:
            vectors = hidden
        if parameters.get("normalize"):
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        if pooling == "none":
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            return [Prediction(v[:n].tolist()) for v, n in zip(vectors, lengths)]
        return [Prediction(v.tolist()) for v in vectors]


# The engine class serving each task (cloudllm quantize reads auto_class from it).
ENGINES: dict[str, type[Engine]] = {
    "text-generation": GenerationEngine,
    "text2text-generation": Seq2SeqEngine,
    "summarization": Seq2SeqEngine,
    "translation": Seq2SeqEngine,
    "text-classification": ClassificationEngine,
    "token-classification": TokenClassificationEngine,
    "question-answering": QuestionAnsweringEngine,
    "feature-extraction": FeatureExtractionEngine,
}
assert set(ENGINES) >= set(GENERATION_TASKS)


# --- transformers-facing helpers ---------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _criteria_classes() -> tuple[type, type]:
    """StoppingCriteria subclasses, defined on first use so importing this module stays torch-free."""
    import torch
    from transformers import StoppingCriteria

    class StopOnText(StoppingCriteria):
        """Stops each row once its new text contains a stop sequence (decoding only a tail window)."""

        def __init__(self, tokenizer: Any, stops: Sequence[str], start: int) -> None:
            self.tokenizer = tokenizer
            self.stops = list(stops)
            self.start = start
            self.window = _stop_window(self.stops)

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            tails = input_ids[:, self.start :][:, -self.window :]
            texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            done = [any(stop in text for stop in self.stops) for text in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    class RowLimits(StoppingCriteria):
        """Per row: stop at its own budget, at end of sequence, or once its cancel event is set.

        Also counts the tokens each decoding step made for rows still running (on_tokens).
        Beam search hands over num_beams rows per input; each input's limits apply to its beams.
        """

        def __init__(self, start: int, budgets: list[int], cancels: list[Any], eos: set[int], on_tokens: Any) -> None:
            self.start = start
            self.budgets = budgets
            self.cancels = cancels
            self.eos = sorted(eos)
            self.on_tokens = on_tokens
            self.done: Any = None

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            rows, device = input_ids.shape[0], input_ids.device
            beams = max(1, rows // len(self.budgets))
            if self.done is None:
                self.done = torch.zeros(rows, dtype=torch.bool, device=device)
            if self.on_tokens is not None:
                self.on_tokens(int((~self.done).sum()) // beams)
            generated = input_ids.shape[1] - self.start
            budgets = torch.tensor(self.budgets, device=device).repeat_interleave(beams)
            cancelled = torch.tensor([c is not None and c.is_set() for c in self.cancels], device=device).repeat_interleave(beams)
            stop = (budgets <= generated) | cancelled
            if self.eos:
                stop |= torch.isin(input_ids[:, -1], torch.tensor(self.eos, device=device))
            self.done = self.done | stop
            return self.done.clone()

    return StopOnText, RowLimits


@functools.lru_cache(maxsize=None)
def _token_streamer_class() -> type:
    """A streamer that reports every token with its id, like TGI (TextIteratorStreamer yields words, without ids)."""
    from transformers.generation.streamers import BaseStreamer

    class TokenStreamer(BaseStreamer):
        def __init__(
            self,
            tokenizer: Any,
            on_token: Callable[[Token], None],
            special_ids: set[int],
            ends_here: Callable[[list[int]], bool],
        ) -> None:
            self.tokenizer = tokenizer
            self.on_token = on_token
            self.special_ids = special_ids
            self.ends_here = ends_here
            self.ids: list[int] = []
            self.sent = ""
            self.prefix_offset = 0
            self.read_offset = 0
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt (or the decoder start token)
                self.prompt_seen = True
                return
            for token_id in value.reshape(-1).tolist():
                self.ids.append(token_id)
                piece = self._next_piece()
                self.sent += piece
                self.on_token(
                    Token(id=token_id, text=piece, special=token_id in self.special_ids, final=self.ends_here(self.ids))
                )

        def end(self) -> None:
            pass

        def flush(self) -> None:
            """Report text still held back (an incomplete character at the very end)."""
            full = self._decode(self.ids)
            if len(full) > len(self.sent) and full.startswith(self.sent):
                rest = full[len(self.sent) :]
                self.sent = full
                self.on_token(Token(id=None, text=rest))

        def _next_piece(self) -> str:
            # TGI's incremental detokenization: decode a small window twice and emit the
            # difference, holding back while the text ends in an incomplete UTF-8 character.
            before = self._decode(self.ids[self.prefix_offset : self.read_offset])
            after = self._decode(self.ids[self.prefix_offset :])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return after[len(before) :]
            return ""

        def _decode(self, ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return TokenStreamer


def _which(index: int, count: int) -> str:
    return "the input" if count == 1 else f"input {index}"


def _longest_token(tokenizer: Any) -> int:
    """The most characters one token can stand for (its vocabulary spelling; byte-level ones spell each byte as a character)."""
    try:
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    except (AttributeError, NotImplementedError, TypeError):
        longest = 64
    # Twice over: slack for normalizers that drop characters (runs of spaces, control characters).
    return 2 * max(longest, 4)


def _stop_window(stops: Sequence[str]) -> int:
    """How many trailing tokens can hold a stop sequence: a character is at most 4 byte-level tokens, plus slack."""
    return 4 * max((len(s) for s in stops), default=0) + 4


@contextlib.contextmanager
def _model_arithmetic(parameters: dict[str, Any]) -> Iterator[None]:
    """422 for parameters the validation passed but the model's arithmetic cannot take.

    A tiny repetition_penalty divides a seen token's logit into infinity, and sampling from
    an infinite logit gives NaN probabilities, which torch.multinomial refuses.
    """
    try:
        yield
    except RuntimeError as exc:
        if "probability tensor contains" not in str(exc):
            raise
        chosen = ", ".join(f"{name} {parameters[name]:g}" for name in ("temperature", "repetition_penalty", "top_p") if name in parameters)
        raise validation_error(
            f"the sampling parameters ({chosen or 'defaults'}) overflow this model's probabilities; "
            "use a repetition_penalty and temperature nearer 1"
        ) from None


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where text ends if cut after the earliest stop sequence (TGI keeps the stop sequence itself)."""
    ends = [text.find(stop) + len(stop) for stop in stops if stop in text]
    return min(ends) if ends else None


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
        if ids:
            break
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _pad_token_id(tokenizer: Any, config: Any) -> int:
    for value in (tokenizer.pad_token_id, getattr(config, "pad_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)) and eos:
        return int(eos[0])
    return 0


def _position_limit(config: Any) -> int | None:
    """How many positions the model can attend to, when its config says (T5's relative positions do not)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _forward_arguments(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {"input_ids", "attention_mask", "token_type_ids"}


def _plain(value: Any) -> Any:
    """numpy scalars (the pipelines' scores) to Python numbers, so json can write them."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def model_files_present(model_dir: str) -> bool:
    """True when model_dir holds a transformers model (its config.json)."""
    return os.path.isfile(os.path.join(model_dir, "config.json"))


__all__ = [
    "ENGINES",
    "Engine",
    "GenerationEngine",
    "Prediction",
    "RequestError",
    "Token",
    "dtype_keyword",
    "load_engine",
    "model_files_present",
    "resolve_dtype",
    "resolve_placement",
]
