"""Dynamic batching: requests that arrive close together share one model call.

A single worker task takes the oldest waiting request, then gathers later requests with
the same batch key (equal parameters) for up to ``max_wait_ms`` or until the batch is full,
and runs them as one call in a dedicated thread, so the event loop keeps answering health
checks while the model works. Requests with other keys wait their turn in arrival order.
Each caller gets its own outputs; an error fails only the callers of the batch it happened in.

How full is full: by default ``max_batch_size`` inputs. With ``max_batch_tokens`` the batch
is sized from the workload instead: a padded batch holds rows x its longest row tokens (what
its KV cache takes), and inputs join while that stays within max_batch_tokens, so many short
requests run together in the memory a few long ones would take. Each input's size comes with
its submission (prompt plus new tokens, from the engine's validation).

A caller that goes away sets its cancel event: waiting, it is skipped; running, the
run_batch(inputs, parameters, cancels) call is told through cancels[i] to stop its rows.

``max_batch_size=1`` turns batching off: every input runs alone, in arrival order.

``schedule(inputs, parameters, cancels)`` hands a request to a model that schedules its own rows
(the generation engine's continuous batching, which lets requests join a running batch between
decode steps): it answers a concurrent future of the results, which the caller awaits without
gathering or queueing here, or None for a request the batcher should gather as above.

``row_parameter`` names a parameter rows of one call may differ in (the LoRA adapter): it is left
out of the batch key, and run_batch gets it as a list, one value per input, so requests for
different adapters share a call instead of waiting for each other's batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from .protocol import RequestError

RunBatch = Callable[[list[Any], dict[str, Any], list["threading.Event | None"]], Sequence[Any]]


@dataclass
class _Pending:
    inputs: list[Any]
    parameters: dict[str, Any]
    key: Hashable | None
    future: asyncio.Future = field(repr=False)
    sizes: list[int] = field(default_factory=list)
    cancel: threading.Event | None = None

    @property
    def gone(self) -> bool:
        return self.future.done() or (self.cancel is not None and self.cancel.is_set())


class Batcher:
    """Collects concurrent submissions into batches for run_batch(inputs, parameters) -> one result per input.

    key(parameters) decides which requests may share a call; None means "never share".
    on_batch(size) is called with the number of inputs of every model call (for metrics).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        max_batch_tokens: int | None = None,
        key: Callable[[dict[str, Any]], Hashable | None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        row_parameter: str | None = None,
        schedule: Callable[[list[Any], dict[str, Any], list[Any]], "concurrent.futures.Future | None"] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens if max_batch_size > 1 else None
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._key = key or _parameters_key
        self.row_parameter = row_parameter
        self._on_batch = on_batch
        self._schedule = schedule
        self._pending: list[_Pending] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # One thread: one model call at a time, and the model always sees the same thread.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudllm-batch")
        self.batch_sizes: list[int] = []  # every call's size, newest last (bounded; for tests and /metrics)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a model call (not counting the batch running now)."""
        return len(self._pending)

    def start(self) -> None:
        """Start the worker on the running event loop (idempotent)."""
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="cloudllm-batcher")

    async def stop(self) -> None:
        """Stop the worker; waiting callers get an error rather than hanging."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RequestError(503, "the server is shutting down", "unavailable"))
        self._pending.clear()
        self._executor.shutdown(wait=False)

    async def submit(
        self,
        inputs: Sequence[Any],
        parameters: dict[str, Any],
        *,
        sizes: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Any]:
        """Queue one request's inputs (sizes: each one's tokens); returns one result per input, in order."""
        if self._schedule is not None:
            scheduled = self._schedule(list(inputs), dict(parameters), [cancel] * len(inputs))
            if scheduled is not None:
                return await asyncio.wrap_future(scheduled)
        self.start()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        sizes = list(sizes) if sizes is not None else [1] * len(inputs)
        shared = {k: v for k, v in parameters.items() if k != self.row_parameter}
        self._pending.append(_Pending(list(inputs), dict(parameters), self._key(shared), future, sizes, cancel))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    async def _work(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            await self._execute(batch)

    async def _gather(self) -> list[_Pending]:
        """The oldest waiting request plus later ones with its key, within the wait window."""
        assert self._arrived is not None
        first = self._pending.pop(0)
        batch, sizes = [first], list(first.sizes)
        if first.key is None or self.max_batch_size == 1:
            return batch
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while not self._full(sizes):
            for item in list(self._pending):
                if item.key == first.key and self._fits(sizes + item.sizes):
                    self._pending.remove(item)
                    batch.append(item)
                    sizes += item.sizes
            remaining = deadline - asyncio.get_running_loop().time()
            if self._full(sizes) or remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        if self._pending:
            self._arrived.set()  # those left behind are served next without waiting for a new arrival
        return batch

    def _fits(self, sizes: list[int]) -> bool:
        """Whether inputs of these sizes may run as one call."""
        if self.max_batch_tokens is None:
            return len(sizes) <= self.max_batch_size
        return len(sizes) * max(sizes) <= self.max_batch_tokens

    def _full(self, sizes: list[int]) -> bool:
        """Whether no input, not even the smallest there is, could still join."""
        if self.max_batch_tokens is None:
            return len(sizes) >= self.max_batch_size
        return (len(sizes) + 1) * max(sizes) > self.max_batch_tokens

    async def _execute(self, batch: list[_Pending]) -> None:
        live = [item for item in batch if not item.gone]  # callers that went away are skipped
        if not live:
            return
        try:
            results = await self._call(
                [x for item in live for x in item.inputs],
                self._batch_parameters(live),
                [size for item in live for size in item.sizes],
                [item.cancel for item in live for _ in item.inputs],
            )
        except RequestError as exc:
            if len(live) == 1:
                _fail(live[0], exc)
                return
            # One request's input failed the shared call: run each alone so only its caller sees the error.
            for item in live:
                await self._execute([item])
            return
        except Exception as exc:  # a model failure belongs to this batch's callers only
            for item in live:
                _fail(item, exc)
            return
        offset = 0
        for item in live:
            count = len(item.inputs)
            if not item.future.done():
                item.future.set_result(list(results[offset : offset + count]))
            offset += count

    async def _call(self, inputs: list[Any], parameters: dict[str, Any], sizes: list[int], cancels: list[Any]) -> list[Any]:
        """Run inputs in chunks that fit (one request may carry more inputs than one batch takes)."""
        loop = asyncio.get_running_loop()
        results: list[Any] = []
        start = 0
        while start < len(inputs):
            end = start + 1
            while end < len(inputs) and self._fits(sizes[start : end + 1]):
                end += 1
            chunk = inputs[start:end]
            self._record(len(chunk))
            rows = parameters.get(self.row_parameter) if self.row_parameter else None
            chunk_parameters = {**parameters, self.row_parameter: rows[start:end]} if isinstance(rows, list) else parameters
            call = functools.partial(self._run_batch, chunk, chunk_parameters, cancels[start:end])
            out = await loop.run_in_executor(self._executor, call)
            if len(out) != len(chunk):
                raise RuntimeError(f"run_batch returned {len(out)} results for {len(chunk)} inputs")
            results.extend(out)
            start = end
        return results

    def _batch_parameters(self, live: list[_Pending]) -> dict[str, Any]:
        """The shared parameters of a batch; the row parameter, where any row has it, as one value per input."""
        parameters = dict(live[0].parameters)
        rows = [item.parameters.get(self.row_parameter) for item in live for _ in item.inputs] if self.row_parameter else []
        if any(value is not None for value in rows):
            parameters[self.row_parameter] = rows
        return parameters

    def _record(self, size: int) -> None:
        self.batch_sizes.append(size)
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        if self._on_batch is not None:
            self._on_batch(size)


def _fail(item: _Pending, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)


def _parameters_key(parameters: dict[str, Any]) -> Hashable:
    import json

    return json.dumps(parameters, sort_keys=True, default=str)
