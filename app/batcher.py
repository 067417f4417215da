"""The dynamic batcher: one per model (per worker inline, per engine process otherwise), in front of it.

Pairs from concurrent requests wait in one queue. A single consumer task takes everything waiting, sorts it by
length (so a batch pads little) and cuts it into batches of at most ``max_batch_tokens`` tokens, counted as the
backend runs them (padded, or packed). Batches go to one forward thread that runs them back to back: the next
batch is planned and handed over while the current one runs, so the model never waits for the event loop
between batches (on a GPU that gap is idle device time). While a batch runs, new requests queue up and join the
next round. A pair whose request was cancelled (its client left) is dropped just before its batch runs, so it
costs no forward pass. Each pair's score depends only on the pair: padding is masked, and packed pairs attend
only within themselves, so batching never changes an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app import metrics
from app.engine.base import EncodedPair, padded_tokens
from app.errors import EngineFailure, NotReadyError, OverloadedError, PayloadTooLargeError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Request:
    """One caller's pairs: one future for all of them (not one per pair: at GPU rates, thousands of pairs a
    second, per-pair futures cost the event loop, and so the forward thread's GIL, measurable time)."""

    future: asyncio.Future[list[float]]
    scores: list[float]
    remaining: int
    enqueued: float = 0.0  # perf_counter when it entered the queue
    started: float | None = None  # when the first forward pass with one of its pairs began


@dataclass(slots=True)
class _Waiting:
    pair: EncodedPair
    request: _Request
    position: int  # in the request
    deferred: bool = False  # held back once to fill a later batch; never again


def plan_batches(
    lengths: Sequence[int],
    *,
    max_batch_tokens: int,
    max_batch_pairs: int,
    batch_tokens: Callable[[int, int, int], int] = padded_tokens,
) -> list[list[int]]:
    """Group positions into batches, shortest pairs first, each within the token and pair budgets.

    ``batch_tokens(pairs, longest, total)`` is what the backend really runs such a batch as, in tokens: a padded
    CUDA graph's bucket (rows x columns), or a packed batch's token bucket (``total``, the pairs' own tokens,
    rounded up); a batch is as large as that allows. By default, the batch padded to its longest pair."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for position in order:
        # Sorted ascending, so this pair is the longest of the batch: it sets the padded width.
        if current:
            cost = batch_tokens(len(current) + 1, lengths[position], total + lengths[position])
            if len(current) >= max_batch_pairs or cost > max_batch_tokens:
                batches.append(current)
                current, total = [], 0
        current.append(position)
        total += lengths[position]
    if current:
        batches.append(current)
    return batches


# Batches handed to the forward thread and not yet finished: the one running and the next, ready to start.
PIPELINE_DEPTH = 2


@dataclass(slots=True)
class _Batch:
    items: list[_Waiting]
    live: list[_Waiting] | None = None  # what actually ran: the items still wanted when the batch started
    scores: list[float] | None = None
    error: BaseException | None = None
    seconds: float = 0.0


class DynamicBatcher:
    def __init__(
        self,
        forward: Callable[[Sequence[EncodedPair]], list[float]],
        *,
        max_batch_tokens: int,
        max_batch_pairs: int,
        max_queue_pairs: int,
        batch_tokens: Callable[[int, int, int], int] = padded_tokens,
        model: str = "",
    ) -> None:
        self._forward = forward
        self.model = model  # the metrics' model label
        self._batch_tokens = batch_tokens  # the backend's: see plan_batches
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_pairs = max_batch_pairs
        self.max_queue_pairs = max_queue_pairs
        self._waiting: list[_Waiting] = []
        self._pending_pairs = 0  # queued or in a handed-over batch, not yet answered
        self._wakeup = asyncio.Event()
        self._consumer: asyncio.Task[None] | None = None
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # One model thread: forward passes run one at a time, each using all of the process's torch threads.
        self._handover: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._slots = asyncio.Semaphore(PIPELINE_DEPTH)
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # batches handed to the forward thread and not yet delivered

    @property
    def pending_pairs(self) -> int:
        return self._pending_pairs

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._slots = asyncio.Semaphore(PIPELINE_DEPTH)
        self._handover = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._forward_loop, args=(self._handover,), name="forward", daemon=True)
        self._thread.start()
        self._consumer = asyncio.create_task(self._run(), name="batcher")

    async def stop(self, *, timeout_s: float) -> None:
        """Refuse new work, let what is queued finish (up to ``timeout_s``), then stop the consumer."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._pending_pairs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        for item in self._waiting:
            if not item.request.future.done():
                item.request.future.set_exception(NotReadyError("the worker is shutting down"))
        self._waiting.clear()
        self._handover.put(None)  # the forward thread ends after the batch it is running, if any

    async def score(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Logits for ``pairs``, in order. Cancelling the caller withdraws its pairs that have not run yet."""
        if not self._accepting:
            raise NotReadyError("the worker is not accepting work (starting or shutting down)")
        if not pairs:
            return []
        if len(pairs) > self.max_queue_pairs:
            # Never fits, however empty the queue: a 429 would have the client retry forever.
            raise PayloadTooLargeError(
                f"this request needs {len(pairs)} scored pairs; a worker queues at most {self.max_queue_pairs} "
                "(RERANKER_MAX_QUEUE_PAIRS): send fewer documents",
                param="documents",
            )
        if self._pending_pairs + len(pairs) > self.max_queue_pairs:
            metrics.REJECTED.labels("overloaded", self.model).inc()
            raise OverloadedError(
                f"this worker has {self._pending_pairs} pairs queued (limit {self.max_queue_pairs}); retry shortly"
            )
        request = _Request(
            asyncio.get_running_loop().create_future(), [0.0] * len(pairs), len(pairs), enqueued=time.perf_counter()
        )
        self._waiting.extend(_Waiting(pair, request, position) for position, pair in enumerate(pairs))
        self._pending_pairs += len(pairs)
        metrics.QUEUE_DEPTH.labels(self.model).inc(len(pairs))
        self._wakeup.set()
        # Cancelling the caller cancels the request's future; the forward thread then skips its pairs.
        return await request.future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                # Wait for room before taking the round: what arrives meanwhile still joins it.
                await self._slots.acquire()
                round_items, self._waiting = self._waiting, []
                lengths = [len(item.pair) for item in round_items]
                batches = plan_batches(
                    lengths,
                    max_batch_tokens=self.max_batch_tokens,
                    max_batch_pairs=self.max_batch_pairs,
                    batch_tokens=self._batch_tokens,
                )
                for number, positions in enumerate(batches):
                    if number:
                        await self._slots.acquire()
                    items = [round_items[p] for p in positions]
                    if number == len(batches) - 1 and self._worth_holding_back(items):
                        self._slots.release()
                        break
                    self._in_flight += 1
                    self._handover.put(_Batch(items))
                else:
                    continue
                break  # the remainder waits for the running batch to finish (or more work): see _wakeup

    def _worth_holding_back(self, items: list[_Waiting]) -> bool:
        """Hold a round's small remainder back once while the model is busy, so it fills a later batch.

        A batch costs a fixed overhead (kernel launches) on top of its tokens: a request of 64 long pairs
        splits into a full batch and a few pairs, and running those few alone while the model is busy anyway
        costs nearly a full batch's launches. Held back, they join what arrives while the current batch runs.
        An idle model never waits: then it runs at once, and no pair is held back twice.
        """
        if not self._in_flight or any(item.deferred for item in items):
            return False
        width = max(len(item.pair) for item in items)
        if len(items) * width * 2 > self.max_batch_tokens or len(items) * 2 > self.max_batch_pairs:
            return False
        for item in items:
            item.deferred = True
        self._waiting[:0] = items
        return True

    def _forward_loop(self, handover: queue.SimpleQueue[_Batch | None]) -> None:
        """The forward thread: runs handed-over batches back to back until told to stop (``None``)."""
        while (batch := handover.get()) is not None:
            # Reading done() from this thread is a benign race: a pair cancelled just after is computed anyway,
            # as it would be had it been cancelled a moment later; its answer is simply not delivered.
            batch.live = [item for item in batch.items if not item.request.future.done()]
            if batch.live:
                started = time.perf_counter()
                for item in batch.live:
                    if item.request.started is None:  # read and written by this thread only
                        item.request.started = started
                try:
                    batch.scores = self._forward_guarded([item.pair for item in batch.live])
                except Exception as error:  # a device or model fault: fail these requests, keep serving others
                    batch.error = error
                batch.seconds = time.perf_counter() - started
            loop = self._loop
            if loop is None:
                return
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the event loop is closed: nobody is waiting for answers any more
                return

    def _deliver(self, batch: _Batch) -> None:
        """On the event loop: answer a finished batch and free its slot."""
        self._slots.release()
        self._in_flight -= 1
        if self._waiting:
            self._wakeup.set()  # a held-back remainder goes now
        live = batch.live or []
        dropped = len(batch.items) - len(live)
        if dropped:
            metrics.PAIRS_CANCELLED.labels(self.model).inc(dropped)
            self._settle(dropped)
        if not live:
            return
        if batch.error is not None:
            logger.error("forward pass of %d pairs failed", len(live), exc_info=batch.error)
            for item in live:
                if not item.request.future.done():
                    item.request.future.set_exception(EngineFailure("the model failed while scoring this request"))
            self._settle(len(live))
            return
        scores = batch.scores or []
        width = max(len(item.pair) for item in live)
        metrics.INFERENCE_SECONDS.labels(self.model).observe(batch.seconds)
        metrics.BATCH_SIZE.labels(self.model).observe(len(live))
        total = sum(len(item.pair) for item in live)
        metrics.BATCH_TOKENS.labels(self.model).observe(self._batch_tokens(len(live), width, total))
        metrics.PAIRS_SCORED.labels(self.model).inc(len(live))
        metrics.TOKENS_SCORED.labels(self.model).inc(total)
        for item, score in zip(live, scores, strict=True):
            request = item.request
            if request.future.done():
                continue  # cancelled meanwhile (or failed with another batch)
            request.scores[item.position] = score
            request.remaining -= 1
            if not request.remaining:
                request.future.set_result(request.scores)
                done = time.perf_counter()
                first_pass = request.started if request.started is not None else done
                metrics.REQUEST_QUEUE_SECONDS.labels(self.model).observe(first_pass - request.enqueued)
                metrics.REQUEST_INFERENCE_SECONDS.labels(self.model).observe(done - first_pass)
        self._settle(len(live))

    def _forward_guarded(self, pairs: list[EncodedPair]) -> list[float]:
        try:
            return self._forward(pairs)
        except StopIteration as error:
            # asyncio cannot carry StopIteration through a future: the batch would never settle.
            raise RuntimeError("forward pass raised StopIteration") from error

    def _settle(self, count: int) -> None:
        self._pending_pairs -= count
        metrics.QUEUE_DEPTH.labels(self.model).dec(count)
