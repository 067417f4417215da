"""The dynamic batcher: one per worker, between the HTTP layer and the model.

Pairs from concurrent requests wait in one queue. A single consumer task takes everything waiting, sorts it by
length (so a batch pads little), cuts it into batches of at most ``max_batch_tokens`` padded tokens, and runs
each batch in a thread so the event loop keeps serving. While a batch runs, new requests queue up and join
the next round. A pair whose request was cancelled (its client left) is dropped before it costs a forward pass.
Each pair's score depends only on the pair: padding is masked, so batching never changes an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app import metrics
from app.engine.base import EncodedPair
from app.errors import EngineFailure, NotReadyError, OverloadedError, PayloadTooLargeError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiting:
    pair: EncodedPair
    future: asyncio.Future[float]


def plan_batches(lengths: Sequence[int], *, max_batch_tokens: int, max_batch_pairs: int) -> list[list[int]]:
    """Group positions into batches, shortest pairs first, each within the padded-token and pair budgets."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for position in order:
        # Sorted ascending, so this pair is the longest of the batch: it sets the padded width.
        if current and (
            len(current) >= max_batch_pairs or (len(current) + 1) * lengths[position] > max_batch_tokens
        ):
            batches.append(current)
            current = []
        current.append(position)
    if current:
        batches.append(current)
    return batches


class DynamicBatcher:
    def __init__(
        self,
        forward: Callable[[Sequence[EncodedPair]], list[float]],
        *,
        max_batch_tokens: int,
        max_batch_pairs: int,
        max_queue_pairs: int,
    ) -> None:
        self._forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_pairs = max_batch_pairs
        self.max_queue_pairs = max_queue_pairs
        self._waiting: list[_Waiting] = []
        self._pending_pairs = 0  # queued or in the running round, not yet answered
        self._wakeup = asyncio.Event()
        self._consumer: asyncio.Task[None] | None = None
        self._accepting = False
        # One model thread: forward passes run one at a time, each using all of the worker's torch threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.last_failure: str | None = None

    @property
    def pending_pairs(self) -> int:
        return self._pending_pairs

    def start(self) -> None:
        self._accepting = True
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
            if not item.future.done():
                item.future.set_exception(NotReadyError("the worker is shutting down"))
        self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

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
            metrics.REJECTED.labels("overloaded").inc()
            raise OverloadedError(
                f"this worker has {self._pending_pairs} pairs queued (limit {self.max_queue_pairs}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[float]] = [loop.create_future() for _ in pairs]
        self._waiting.extend(_Waiting(pair, future) for pair, future in zip(pairs, futures, strict=True))
        self._pending_pairs += len(pairs)
        metrics.QUEUE_DEPTH.inc(len(pairs))
        self._wakeup.set()
        # gather() cancels every future when the caller is cancelled; the consumer then skips them.
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                round_items, self._waiting = self._waiting, []
                lengths = [len(item.pair) for item in round_items]
                for positions in plan_batches(
                    lengths, max_batch_tokens=self.max_batch_tokens, max_batch_pairs=self.max_batch_pairs
                ):
                    batch = [round_items[p] for p in positions]
                    await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting]) -> None:
        live = [item for item in batch if not item.future.done()]
        dropped = len(batch) - len(live)
        if dropped:
            metrics.PAIRS_CANCELLED.inc(dropped)
            self._settle(dropped)
        if not live:
            return
        pairs = [item.pair for item in live]
        width = max(len(pair) for pair in pairs)
        started = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self._executor, self._forward_guarded, pairs)
        except asyncio.CancelledError:
            self._settle(len(live))
            raise
        except Exception as error:  # a device or model fault: fail these requests, keep serving others
            logger.exception("forward pass of %d pairs failed", len(live))
            self.last_failure = f"{type(error).__name__}: {error}"
            for item in live:
                if not item.future.done():
                    item.future.set_exception(EngineFailure("the model failed while scoring this request"))
            self._settle(len(live))
            return
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(live))
        metrics.BATCH_TOKENS.observe(len(live) * width)
        metrics.PAIRS_SCORED.inc(len(live))
        metrics.TOKENS_SCORED.inc(sum(len(pair) for pair in pairs))
        self.last_failure = None
        for item, score in zip(live, scores, strict=True):
            if not item.future.done():
                item.future.set_result(score)
        self._settle(len(live))

    def _forward_guarded(self, pairs: list[EncodedPair]) -> list[float]:
        try:
            return self._forward(pairs)
        except StopIteration as error:
            # asyncio cannot carry StopIteration through a future: the batch would never settle.
            raise RuntimeError("forward pass raised StopIteration") from error

    def _settle(self, count: int) -> None:
        self._pending_pairs -= count
        metrics.QUEUE_DEPTH.dec(count)
