"""CUDA graphs of the forward pass over bucketed (batch, length) shapes: one replay instead of hundreds of launches.

An eager forward of a 12-layer encoder is some four hundred kernel launches, each a trip through PyTorch's and
transformers' Python: about 4.5 ms of CPU time whatever the batch. Measured on an H200 (fp16, bge-reranker-base's
shape, README "Benchmark"): 1 pair × 128 tokens took 4.95 ms eagerly and 0.78 ms as a replayed graph; 16 × 116,
4.58 ms and 1.33 ms; 64 × 256, 8.15 against 7.50 ms; 256 × 256, 29.8 against 28.6 ms.

Full batches are captured too, not only the small ones where launches dominate. On that H200 the service's
eager batches of ~60 pairs × 266 tokens took 11 ms at 4 clients and 16 ms at 16 (the forward thread's own
timings, from /metrics), against 8.4 ms for the engine alone; on an H100, with every batch eager, 16 clients got
215 pairs/s against 5,494 with the graphs (``python -m bench.gpu``'s eager variant). A replay does not depend on
the launching thread keeping ahead of the GPU. So every (rows, columns) bucket whose padded size is within the
token budget (``max_batch_tokens``, at most ``GRAPH_MAX_TOKENS``) is captured, and the batcher plans batches by
the bucket they run in (``batch_tokens``): a batch it forms within the budget always has a graph. Only pairs longer
than ``MAX_GRAPH_LENGTH``, and batches past ``GRAPH_MAX_TOKENS`` when the budget is larger, run eagerly (padded
to their own longest pair).

The buckets are fine where batches are large (every 16 tokens below 512 in batches of 8,192 padded tokens or
more; rows 28, 56, 112 and 224 besides): a batch costs its bucket, not its pairs. On an H100 the service's
batches of ~56 pairs × ~259 tokens ran in the 64 × 288 bucket, a fifth of it padding; sized by their buckets
(56 × 272) gpu64 went from 5,494 to 5,999 pairs/s at 16 clients and from 5,167 to 6,108 at 4 (two runs of
``python -m bench.gpu`` on two starts of the same kind of machine, not side by side).

A batch runs in the smallest bucket that holds it: its rows padded with one-token rows, its columns with masked
padding. Padding is masked, so every pair's logit is the one it has alone (checked at capture against the eager
model on a padded probe batch; any difference disables the graphs with a warning).

Capturing is hundreds of shapes, each ~0.1 s of start-up, so each costs as little as it can: one side stream
and one set of pinned input buffers for all of them, one warm-up run each, and no ``torch.cuda.graph`` context,
whose entry empties the device and pinned-memory caches so that every warm-up allocates afresh (on the H100: 248
shapes in 36 s with it, 536 in 52 s without; small batches keep 32-token steps, which holds it to ~330).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.base import EncodedPair, write_padded

logger = logging.getLogger(__name__)

# Graphs cover batches within min(max_batch_tokens, this) padded tokens; bigger ones run eagerly. The graphs share
# one memory pool sized by the largest, and at 256 × 256 (65k tokens) a replay saved only 4 % on the H200.
GRAPH_MAX_TOKENS = 32768
LENGTH_STEP = 32
FINE_LENGTH_STEP = 16  # below 512 tokens, in batches of FINE_FROM_TOKENS padded tokens or more
FINE_FROM_TOKENS = 8192
MAX_GRAPH_LENGTH = 1024  # longer pairs are few and compute-bound: eager
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256)


def length_buckets(max_length: int, rows: int) -> list[int]:
    """The column buckets of batches of ``rows`` rows: every 32 tokens up to the longest pair graphs take, and
    every 16 below 512 where such a batch is large. A small batch costs its launches more than its tokens (on the
    H200, one pair of 128 tokens replayed in 0.78 ms, 16 pairs of 116 in 1.33 ms), so finer steps there would
    only add shapes, each ~0.1 s of start-up."""
    longest = min(max_length, MAX_GRAPH_LENGTH)
    columns = set(range(LENGTH_STEP, longest, LENGTH_STEP)) | {longest}
    columns |= {c for c in range(FINE_LENGTH_STEP, min(longest, 512), FINE_LENGTH_STEP) if rows * c >= FINE_FROM_TOKENS}
    return sorted(columns)


def needed_shapes(columns_by_rows: dict[int, list[int]], *, max_batch_tokens: int) -> list[tuple[int, int]]:
    """The (rows, columns) buckets captured: every one within the token budget (and ``GRAPH_MAX_TOKENS``). The
    batcher counts a batch as its bucket's size, so every batch it forms within the budget has its graph."""
    budget = min(max_batch_tokens, GRAPH_MAX_TOKENS)
    return [(rows, c) for rows, columns in columns_by_rows.items() for c in columns if rows * c <= budget]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static device tensors the graph reads
    host: dict[str, torch.Tensor]  # pinned host buffers of the same shapes
    logits: torch.Tensor  # static output


class CudaGraphs:
    """Captured forward passes of ``model`` on its CUDA device; ``run`` scores a batch or returns None."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        *,
        max_length: int,
        max_batch_pairs: int,
        max_batch_tokens: int,
        pad_id: int,
        uses_type_ids: bool,
    ) -> None:
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.uses_type_ids = uses_type_ids
        self.batches = sorted({size for size in BATCH_BUCKETS if size < max_batch_pairs} | {min(max_batch_pairs, 256)})
        self.lengths = {rows: length_buckets(max_length, rows) for rows in self.batches}
        self.shapes = needed_shapes(self.lengths, max_batch_tokens=max_batch_tokens)
        # Buckets by index (of n rows; of a longest pair of n tokens, per row bucket): the batcher asks for every
        # pair it plans.
        self._row_bucket = [self.batches[bisect_left(self.batches, n)] for n in range(self.batches[-1] + 1)]
        self._column_bucket = {
            rows: [columns[bisect_left(columns, n)] for n in range(columns[-1] + 1)]
            for rows, columns in self.lengths.items()
        }
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        self._stream: Any = None
        self._host: dict[str, torch.Tensor] = {}  # pinned input buffers, one per input, shared by every shape

    def __len__(self) -> int:
        return len(self._graphs)

    def bucket(self, rows: int, longest: int) -> tuple[int, int] | None:
        """The (rows, columns) bucket a batch of ``rows`` pairs, the longest ``longest`` tokens, pads to; None
        past the largest buckets. Whether it was captured is ``shape_for``'s question."""
        if rows >= len(self._row_bucket):
            return None
        bucket_rows = self._row_bucket[rows]
        columns = self._column_bucket[bucket_rows]
        return (bucket_rows, columns[longest]) if longest < len(columns) else None

    def batch_tokens(self, rows: int, longest: int, total: int) -> int:
        """What the batcher counts a batch as: its bucket's padded tokens, captured or not (so it never forms a
        batch whose bucket is past the budget, which would run eagerly, where a smaller one has a graph); past the
        buckets, its own padded size (it runs eagerly at that size)."""
        bucket_rows, columns = self.bucket(rows, longest) or (rows, longest)
        return bucket_rows * columns

    def shape_for(self, rows: int, longest: int) -> tuple[int, int] | None:
        """The captured shape a batch runs in: its bucket, or None (eager) when that was not captured."""
        shape = self.bucket(rows, longest)
        return shape if shape in self._graphs else None

    def capture(self) -> None:
        """Capture every shape, largest first (they share one memory pool, sized by the largest)."""
        started = time.perf_counter()
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.uses_type_ids else [])
        largest = max(rows * columns for rows, columns in self.shapes)
        self._host = {name: torch.zeros(largest, dtype=torch.long).pin_memory() for name in names}
        torch.cuda.synchronize(self.device)
        for number, shape in enumerate(sorted(self.shapes, key=lambda s: -s[0] * s[1])):
            # The first shape warms up twice: lazy initialisation (cuBLAS handles and workspace, kernel choice)
            # happens outside any capture. Later shapes only need their own first run.
            self._graphs[shape] = self._capture(*shape, warm_ups=2 if number == 0 else 1)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d CUDA graphs (up to %d pairs, %d tokens a pair, %d padded tokens) in %.1fs",
            len(self._graphs),
            max(rows for rows, _ in self.shapes),
            max(columns for _, columns in self.shapes),
            largest,
            time.perf_counter() - started,
        )

    def _capture(self, rows: int, columns: int, *, warm_ups: int) -> _Graph:
        host = {name: buffer[: rows * columns].view(rows, columns) for name, buffer in self._host.items()}
        inputs = {name: torch.zeros((rows, columns), dtype=torch.long, device=self.device) for name in host}
        # Captured with padding in the mask, so the model takes its masked path: whatever transformers decides
        # from the mask at capture time is baked into the graph.
        inputs["input_ids"].fill_(self.pad_id)
        inputs["attention_mask"][:, : max(1, columns // 2)] = 1
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warm_ups):
                self.model(**inputs)
            graph.capture_begin(self._pool)
            try:
                logits = self.model(**inputs).logits
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return _Graph(graph, inputs, host, logits)

    def run(self, pairs: Sequence[EncodedPair]) -> torch.Tensor | None:
        """The batch's logits (``(len(pairs), labels)``, on the device), or None if no captured shape holds it."""
        longest = max(len(pair) for pair in pairs)
        shape = self.shape_for(len(pairs), longest)
        if shape is None:
            return None
        entry = self._graphs[shape]
        # The pinned buffers are shared by every shape: safe, as the caller reads the logits back (a sync)
        # before the next batch is written.
        types = entry.host["token_type_ids"].numpy() if self.uses_type_ids else None
        write_padded(
            pairs, entry.host["input_ids"].numpy(), entry.host["attention_mask"].numpy(), types, pad_id=self.pad_id
        )
        for name, buffer in entry.host.items():
            entry.inputs[name].copy_(buffer, non_blocking=True)  # pinned: the copy queues behind nothing
        entry.graph.replay()
        return entry.logits[: len(pairs)]
