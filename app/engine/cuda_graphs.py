"""CUDA graphs of the forward pass over bucketed (batch, length) shapes: one replay instead of hundreds of launches.

An eager forward of a 12-layer encoder is some four hundred kernel launches, each a trip through PyTorch's and
transformers' Python: about 4.5 ms of CPU time whatever the batch. Measured on an H200 (fp16, bge-reranker-base's
shape, README "Benchmark"): 1 pair × 128 tokens took 4.95 ms eagerly and 0.78 ms as a replayed graph; 16 × 116,
4.58 ms and 1.33 ms; 64 × 256, 8.15 against 7.50 ms; 256 × 256, 29.8 against 28.6 ms.

Full batches are captured too, not only the small ones where launches dominate. On that H200 the service's
eager batches of ~60 pairs × 266 tokens took 11 ms at 4 clients and 16 ms at 16 (the forward thread's own
timings, from /metrics), against 8.4 ms for the engine alone. The GPU work is the same, which points at the
launching thread (an inference, to be measured: ``bench/gpu.py`` runs an eager variant beside): slowed by the
HTTP workers busy beside it, its launches no longer hide behind the GPU's time. A replay does not depend on it.
So every shape that a batch within the token budget (``max_batch_tokens``) can need is captured, up to
``GRAPH_MAX_TOKENS`` padded tokens; only bigger batches, and pairs longer than ``MAX_GRAPH_LENGTH``, run eagerly
(padded to their own longest pair).

A batch runs in the smallest captured shape that holds it: its rows padded with one-token rows, its columns with
masked padding (at most ``LENGTH_STEP - 1`` tokens a row). Padding is masked, so every pair's logit is the one it
has alone (checked at capture against the eager model on a padded probe batch; any difference disables the
graphs with a warning).
"""

from __future__ import annotations

import logging
import time
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
MAX_GRAPH_LENGTH = 1024  # longer pairs are few and compute-bound: eager
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)


def needed_shapes(batches: Sequence[int], lengths: Sequence[int], *, max_batch_tokens: int) -> list[tuple[int, int]]:
    """The (rows, columns) buckets that some batch within the token budget runs in.

    A batch of ``n`` pairs whose longest has ``w`` tokens runs in the smallest bucket holding it; the smallest
    batch that needs bucket (R, C) has one row more than the row bucket below R and one token more than the
    length bucket below C. The batcher forms it only if that fits ``max_batch_tokens``.
    """
    budget = min(max_batch_tokens, GRAPH_MAX_TOKENS)
    shapes = []
    for row_bucket, rows in enumerate(batches):
        rows_below = batches[row_bucket - 1] if row_bucket else 0
        for length_bucket, columns in enumerate(lengths):
            columns_below = lengths[length_bucket - 1] if length_bucket else 0
            if (rows_below + 1) * (columns_below + 1) <= budget:
                shapes.append((rows, columns))
    return shapes


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
        longest = min(max_length, MAX_GRAPH_LENGTH)
        self.lengths = sorted({*range(LENGTH_STEP, longest, LENGTH_STEP), longest})
        self.batches = [size for size in BATCH_BUCKETS if size <= max_batch_pairs]
        self.shapes = needed_shapes(self.batches, self.lengths, max_batch_tokens=max_batch_tokens)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    def shape_for(self, rows: int, longest: int) -> tuple[int, int] | None:
        """The smallest captured (rows, columns) holding ``rows`` pairs of at most ``longest`` tokens."""
        best: tuple[int, int] | None = None
        for shape in self._graphs:
            if shape[0] >= rows and shape[1] >= longest and (best is None or shape[0] * shape[1] < best[0] * best[1]):
                best = shape
        return best

    def capture(self) -> None:
        """Capture every shape, largest first (they share one memory pool, sized by the largest)."""
        started = time.perf_counter()
        self._pool = torch.cuda.graph_pool_handle()
        for shape in sorted(self.shapes, key=lambda s: -s[0] * s[1]):
            self._graphs[shape] = self._capture(*shape)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d CUDA graphs (up to %d pairs, %d tokens a pair, %d padded tokens) in %.1fs",
            len(self._graphs),
            max(rows for rows, _ in self.shapes),
            max(columns for _, columns in self.shapes),
            max(rows * columns for rows, columns in self.shapes),
            time.perf_counter() - started,
        )

    def _capture(self, rows: int, columns: int) -> _Graph:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.uses_type_ids else [])
        host = {name: torch.zeros((rows, columns), dtype=torch.long).pin_memory() for name in names}
        inputs = {name: buffer.to(self.device) for name, buffer in host.items()}
        # Captured with padding in the mask, so the model takes its masked path: whatever transformers decides
        # from the mask at capture time is baked into the graph.
        inputs["input_ids"].fill_(self.pad_id)
        inputs["attention_mask"][:, : max(1, columns // 2)] = 1
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # lets lazy initialisation (cuBLAS handles, kernels' autotuning) happen outside
                self.model(**inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            logits = self.model(**inputs).logits
        return _Graph(graph, inputs, host, logits)

    def run(self, pairs: Sequence[EncodedPair]) -> torch.Tensor | None:
        """The batch's logits (``(len(pairs), labels)``, on the device), or None if no captured shape holds it."""
        longest = max(len(pair) for pair in pairs)
        shape = self.shape_for(len(pairs), longest)
        if shape is None:
            return None
        entry = self._graphs[shape]
        types = entry.host["token_type_ids"].numpy() if self.uses_type_ids else None
        write_padded(
            pairs, entry.host["input_ids"].numpy(), entry.host["attention_mask"].numpy(), types, pad_id=self.pad_id
        )
        for name, buffer in entry.host.items():
            entry.inputs[name].copy_(buffer, non_blocking=True)  # pinned: the copy queues behind nothing
        entry.graph.replay()
        return entry.logits[: len(pairs)]
