"""Packed batches on a GPU: every pair's tokens end to end, no padding, attention per pair (FlashAttention varlen).

A padded batch pays twice for its padding: the projections and feed-forward layers (95 % of the FLOPs) run on
the pad tokens too, and a mask makes SDPA leave its flash kernel for the slower masked one. On an H100 the
engine alone ran 64 pairs of exactly 256 tokens at 7,083 pairs/s and 64 pairs of 248-264 tokens at 6,025 (42 %
and 36 % of the fp16 matmul peak): real documents are never the same length. Packed, as text-embeddings-
inference runs BERT-family models, a batch of pairs is one ``(tokens, hidden)`` matrix: the dense layers see only
real tokens, and attention runs pair by pair inside one kernel (``cu_seqlens`` marks where each pair starts), so
a batch costs its tokens, whatever mix of lengths it holds. Measured side by side on that H100 (README,
"Packed batches"): 64 pairs of 248-264 tokens at 7,332 pairs/s packed against 5,047 padded (45 % and 30 %).

``PackedModel`` runs a BERT-layout sequence classifier (BERT, RoBERTa, XLM-RoBERTa, CamemBERT: the families
whose head reads the first token) from the loaded model's own modules and weights: the embeddings with each
pair's positions restarted, Q, K and V as one product per layer, and the last layer for the first tokens only
(as ``first_token.py`` does for padded batches). ``TorchBackend`` checks it against the padded model on two
probe batches before serving with it.

``PackedGraphs`` captures it as CUDA graphs over (rows, tokens) buckets, as ``cuda_graphs.py`` does padded
batches: a batch of ``n`` pairs runs in the smallest row bucket ``R >= n`` (the ``R - n`` spare rows one pad token
each) and the smallest token bucket that holds its tokens; the tokens left over form one more, trailing
sequence of pad tokens that is never read. The batcher counts a batch as its token bucket (``batch_tokens``).

On a machine without CUDA the same model runs with a reference attention (pair by pair, SDPA), so the tests
check the packing, positions and heads against the transformers model on the CPU; the flash kernel itself is
checked on a GPU (``tests/test_gpu.py``) and at every start (the probe batch).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from app.engine.base import EncodedPair
from app.engine.first_token import FirstTokenLastLayer

logger = logging.getLogger(__name__)

# model_type -> the first position id (RoBERTa's family numbers positions from padding_idx + 1).
PACKABLE_MODEL_TYPES = {
    "bert": "zero",
    "roberta": "after_padding",
    "xlm-roberta": "after_padding",
    "camembert": "after_padding",
}
# A spare row costs one pad token and a few idle FlashAttention blocks; a packed shape captures in ~10 ms (312 in
# 3.3 s on an H100, where padded ones take ~0.1 s each), so the row buckets can be fine.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GRAPH_MAX_TOKENS = 32768  # as for padded graphs: bigger batches gain little from a replay
# The longest pair a packed graph takes. FlashAttention's grid has a block row for every 128 tokens of the longest
# sequence it is told of, in every sequence and head: sized for 8,192-token pairs (bge-reranker-v2-m3), a batch of
# 256 pairs would start some 260,000 blocks a layer, nearly all of them idle. A batch with a longer pair runs
# padded, eagerly: it is long enough for the launches not to matter.
PACKED_MAX_LENGTH = 512


def token_buckets(max_tokens: int, max_length: int) -> list[int]:
    """Token buckets up to ``max_tokens``: every 64 tokens to 1,024, every 256 to 4,096, every 512 beyond (at
    most ``max_length``, so the trailing pad sequence is never longer than a pair). Padding to the bucket wastes
    at most 1/8 of a batch past 512 tokens, and on average 1.5 % of a 16k-token batch."""
    buckets: set[int] = set()
    for low, high, step in ((0, 1024, 64), (1024, 4096, 256), (4096, max_tokens, 512)):
        step = min(step, max_length)
        buckets |= set(range(low + step, min(high, max_tokens) + 1, step))
    buckets.add(max_tokens)
    return sorted(size for size in buckets if size <= max_tokens)


def packable(model: Any, device: torch.device, dtype: torch.dtype, weights: torch.dtype) -> str | None:
    """None if ``model`` can run packed here; otherwise why not (logged)."""
    config = model.config
    if device.type != "cuda":
        return "packed batches need CUDA (FlashAttention's varlen kernel)"
    if dtype != torch.float16 or weights != torch.float16:
        # bfloat16 keeps float32 weights under autocast (torch_backend.weights_dtype): it runs padded.
        return f"packed batches run in float16, not {str(weights).removeprefix('torch.')} weights"
    if getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not a BERT-layout encoder"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position embeddings {config.position_embedding_type!r} (only absolute ones)"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (8, 0):
        return "FlashAttention needs compute capability 8.0 or newer"
    return None


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_starts: torch.Tensor,
    key_starts: torch.Tensor,
    max_query: int,
    max_key: int,
) -> torch.Tensor:
    """Attention of packed sequences: ``(tokens, heads, head size)`` tensors, sequence ``i`` being rows
    ``starts[i]:starts[i + 1]`` (int32). On CUDA, FlashAttention's varlen kernel; elsewhere, pair by pair."""
    if query.is_cuda:
        output = torch.ops.aten._flash_attention_forward(
            query, key, value, query_starts, key_starts, max_query, max_key, 0.0, False, False
        )[0]
        return output  # type: ignore[no-any-return]
    output = torch.zeros_like(query)
    q_bounds, k_bounds = query_starts.tolist(), key_starts.tolist()
    for number in range(len(q_bounds) - 1):
        q0, q1, k0, k1 = q_bounds[number], q_bounds[number + 1], k_bounds[number], k_bounds[number + 1]
        if q1 > q0 and k1 > k0:
            attended = functional.scaled_dot_product_attention(
                query[q0:q1].transpose(0, 1), key[k0:k1].transpose(0, 1), value[k0:k1].transpose(0, 1)
            )
            output[q0:q1] = attended.transpose(0, 1)
    return output


class PackedModel(torch.nn.Module):
    """A BERT-layout sequence classifier over packed tokens; shares the loaded model's modules and weights."""

    def __init__(self, model: Any, *, pad_id: int, uses_type_ids: bool) -> None:
        super().__init__()
        self.uses_type_ids = uses_type_ids  # else type id 0 throughout, as transformers gives such models
        base = model.base_model
        embeddings = base.embeddings
        self.embeddings = embeddings
        first_position = PACKABLE_MODEL_TYPES[model.config.model_type]
        self.position_offset = int(embeddings.padding_idx) + 1 if first_position == "after_padding" else 0
        # Pad tokens sit at the pad position (RoBERTa's padding_idx, whose embedding is the one padding gets).
        self.pad_position = int(getattr(embeddings, "padding_idx", 0) or 0) if self.position_offset else 0
        self.pad_id = pad_id
        layers = list(base.encoder.layer)
        if isinstance(layers[-1], FirstTokenLastLayer):
            layers[-1] = layers[-1].layer
        self.layers: list[Any] = layers  # the model's own modules (a plain list: not registered twice)
        attention = layers[0].attention.self
        self.heads = int(attention.num_attention_heads)
        self.head_size = int(attention.attention_head_size)
        # Q, K and V as one product: one launch instead of three, and a wider matrix keeps more of the GPU busy.
        self.qkv_weights = [
            torch.cat(
                [layer.attention.self.query.weight, layer.attention.self.key.weight, layer.attention.self.value.weight]
            )
            for layer in layers
        ]
        self.qkv_biases = [
            torch.cat([layer.attention.self.query.bias, layer.attention.self.key.bias, layer.attention.self.value.bias])
            for layer in layers
        ]
        self.pooler = getattr(base, "pooler", None)  # BERT's (dense + tanh on the first token); RoBERTa has none
        self.classifier = model.classifier

    def forward(
        self,
        input_ids: torch.Tensor,
        type_ids: torch.Tensor,
        positions: torch.Tensor,
        starts: torch.Tensor,
        max_length: int,
    ) -> torch.Tensor:
        """Logits ``(sequences, labels)`` of the sequences ``starts`` (int32, ``sequences + 1`` entries) marks out in
        the packed ``input_ids``; ``max_length``: no sequence is longer."""
        embeddings = self.embeddings
        hidden = embeddings.word_embeddings(input_ids) + embeddings.token_type_embeddings(type_ids)
        hidden = embeddings.LayerNorm(hidden + embeddings.position_embeddings(positions))
        tokens, split = hidden.shape[0], (self.heads, self.head_size)
        for layer, weight, bias in zip(self.layers[:-1], self.qkv_weights[:-1], self.qkv_biases[:-1], strict=True):
            query, key, value = functional.linear(hidden, weight, bias).view(tokens, 3, *split).unbind(1)
            context = varlen_attention(query, key, value, starts, starts, max_length, max_length).flatten(1)
            attended = layer.attention.output(context, hidden)  # dense, LayerNorm(+ residual)
            hidden = layer.output(layer.intermediate(attended), attended)
        # The last layer for each sequence's first token only: keys and values of every token, the rest of one.
        last, hidden_size = self.layers[-1], hidden.shape[1]
        key, value = (
            functional.linear(hidden, self.qkv_weights[-1][hidden_size:], self.qkv_biases[-1][hidden_size:])
            .view(tokens, 2, *split)
            .unbind(1)
        )
        sequences = starts.shape[0] - 1
        # A trailing sequence may be empty (the batch fills its bucket exactly): its "first token" is clamped in range.
        first = hidden[starts[:-1].long().clamp(max=tokens - 1)]
        query = last.attention.self.query(first).view(sequences, *split)
        one_each = torch.arange(sequences + 1, dtype=torch.int32, device=starts.device)
        context = varlen_attention(query, key, value, one_each, starts, 1, max_length).flatten(1)
        attended = last.attention.output(context, first)
        first = last.output(last.intermediate(attended), attended).unsqueeze(1)  # (sequences, 1, hidden)
        if self.pooler is not None:
            return self.classifier(self.pooler(first))  # type: ignore[no-any-return]
        return self.classifier(first)  # type: ignore[no-any-return]


class PackedLayout:
    """Where a batch's inputs go in one flat int64 buffer of a (rows, tokens) shape: token ids, type ids,
    positions, then ``rows + 2`` sequence starts (the pairs, spare one-token rows, the trailing pad sequence)."""

    def __init__(self, rows: int, tokens: int) -> None:
        self.rows, self.tokens = rows, tokens
        self.size = 3 * tokens + rows + 2

    def views(self, flat: Any) -> tuple[Any, Any, Any, Any]:
        t = self.tokens
        return flat[:t], flat[t : 2 * t], flat[2 * t : 3 * t], flat[3 * t : self.size]

    def write(self, pairs: Sequence[EncodedPair], flat: Any, model: PackedModel) -> None:
        """Fill ``flat`` (numpy int64, at least ``size`` long) with ``pairs``: the spare rows and the leftover
        tokens are pad tokens at the pad position, never read."""
        ids, types, positions, starts = self.views(flat)
        count = len(pairs)
        lengths = np.fromiter((len(pair) for pair in pairs), dtype=np.int64, count=count)
        starts[0] = 0
        np.cumsum(lengths, out=starts[1 : count + 1])
        used = int(starts[count])
        spare = self.rows - count
        starts[count + 1 : self.rows + 1] = used + np.arange(1, spare + 1)
        starts[self.rows + 1] = self.tokens
        types.fill(0)
        for pair, start in zip(pairs, starts[:count].tolist(), strict=True):
            ids[start : start + len(pair)] = pair.input_ids
            if model.uses_type_ids:
                types[start : start + len(pair)] = pair.type_ids
        positions[:used] = np.arange(used) - np.repeat(starts[:count], lengths) + model.position_offset
        ids[used:] = model.pad_id
        positions[used:] = model.pad_position


class PackedGraphs:
    """``PackedModel`` captured over (rows, tokens) buckets on its CUDA device; ``run`` scores a batch or returns
    None (no bucket holds it: the caller runs it padded)."""

    def __init__(
        self, packed: PackedModel, device: torch.device, *, max_length: int, max_batch_pairs: int, max_batch_tokens: int
    ) -> None:
        self.packed = packed
        self.device = device
        max_length = min(max_length, PACKED_MAX_LENGTH)
        self.max_length = max_length
        self.rows = sorted({size for size in ROW_BUCKETS if size < max_batch_pairs} | {min(max_batch_pairs, 256)})
        self.tokens = token_buckets(min(max_batch_tokens, GRAPH_MAX_TOKENS), max_length)
        self._token_set = set(self.tokens)
        self.shapes = [
            (rows, tokens)
            for rows in self.rows
            for tokens in self.tokens
            # Room for one token a row, and no more than rows pairs of max_length tokens can need.
            if rows <= tokens and (tokens == self.tokens[0] or self._previous_token_bucket(tokens) < rows * max_length)
        ]
        self._row_bucket = [self.rows[bisect_left(self.rows, n)] for n in range(self.rows[-1] + 1)]
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, PackedLayout, torch.Tensor]] = {}
        self._host: torch.Tensor | None = None  # one pinned buffer, one device buffer: every shape reads its start
        self._inputs: torch.Tensor | None = None

    def _previous_token_bucket(self, tokens: int) -> int:
        index = bisect_left(self.tokens, tokens)
        return self.tokens[index - 1] if index else 0

    def __len__(self) -> int:
        return len(self._graphs)

    def bucket(self, pairs: int, total: int, longest: int) -> tuple[int, int] | None:
        """The (rows, tokens) bucket of ``pairs`` pairs of ``total`` tokens, the longest ``longest``; None past
        the buckets."""
        if pairs >= len(self._row_bucket) or longest > self.max_length:
            return None
        tokens = self.batch_tokens(pairs, longest, total)
        return (self._row_bucket[pairs], tokens) if tokens in self._token_set else None

    def batch_tokens(self, pairs: int, longest: int, total: int) -> int:
        """What the batcher counts a batch as: its token bucket. Past the largest bucket, the tokens it would
        need, so that within a budget the buckets cover (up to ``GRAPH_MAX_TOKENS``) it is one pair too many: an
        eager batch would cost far more than splitting it (on an H100, batches counted by their padded size
        instead, and so run eagerly, cut gpu64's pairs/s by a third at 16 clients). With a pair longer than the
        graphs take, its padded size: it runs padded, eagerly."""
        if longest > self.max_length or pairs >= len(self._row_bucket):
            return pairs * longest
        rows = self._row_bucket[pairs]
        needed = total + rows - pairs  # a spare row is one pad token
        index = bisect_left(self.tokens, needed)
        return self.tokens[index] if index < len(self.tokens) else needed

    def capture(self) -> None:
        """Capture every shape, largest first (one memory pool, sized by the largest)."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        largest = max(PackedLayout(rows, tokens).size for rows, tokens in self.shapes)
        self._host = torch.zeros(largest, dtype=torch.long).pin_memory()
        self._inputs = torch.zeros(largest, dtype=torch.long, device=self.device)
        torch.cuda.synchronize(self.device)
        for number, (rows, tokens) in enumerate(sorted(self.shapes, key=lambda shape: (-shape[1], -shape[0]))):
            self._graphs[(rows, tokens)] = self._capture(rows, tokens, pool, stream, warm_ups=2 if number == 0 else 1)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d packed CUDA graphs (up to %d pairs, %d tokens) in %.1fs",
            len(self._graphs),
            self.rows[-1],
            self.tokens[-1],
            time.perf_counter() - started,
        )

    def _capture(
        self, rows: int, tokens: int, pool: Any, stream: Any, *, warm_ups: int
    ) -> tuple[torch.cuda.CUDAGraph, PackedLayout, torch.Tensor]:
        layout = PackedLayout(rows, tokens)
        assert self._inputs is not None
        flat = self._inputs[: layout.size]
        ids, types, positions, starts = layout.views(flat)
        # Capture-time content: pad tokens in rows + 1 equal sequences (what the kernels do is fixed by the
        # shapes; the values only have to be valid).
        ids.fill_(self.packed.pad_id)
        types.zero_()
        positions.fill_(self.packed.pad_position)
        starts.copy_(torch.linspace(0, tokens, rows + 2, device=self.device).long())
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warm_ups):
                self.packed(ids, types, positions, starts.int(), self.max_length)
            graph.capture_begin(pool)
            try:
                logits = self.packed(ids, types, positions, starts.int(), self.max_length)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph, layout, logits

    def run(self, pairs: Sequence[EncodedPair]) -> torch.Tensor | None:
        """The batch's logits (``(len(pairs), labels)``, on the device), or None if no captured shape holds it."""
        shape = self.bucket(len(pairs), sum(len(pair) for pair in pairs), max(len(pair) for pair in pairs))
        if shape is None or shape not in self._graphs or self._host is None or self._inputs is None:
            return None
        graph, layout, logits = self._graphs[shape]
        # One pinned buffer for every shape: safe, as the caller reads the logits back (a sync) before the next
        # batch is written.
        host = self._host[: layout.size]
        layout.write(pairs, host.numpy(), self.packed)
        self._inputs[: layout.size].copy_(host, non_blocking=True)
        graph.replay()
        return logits[: len(pairs)]


def run_packed(packed: PackedModel, pairs: Sequence[EncodedPair], device: torch.device) -> torch.Tensor:
    """One batch through ``packed`` without graphs, laid out exactly as a graph's bucket would be: the tests' way to
    check the packing on any device (the load-time probe compares replays with the padded eager model instead)."""
    rows = len(pairs) + 1  # one spare row
    tokens = sum(len(pair) for pair in pairs) + 1 + 3  # and a trailing pad sequence
    layout = PackedLayout(rows, tokens)
    flat = np.zeros(layout.size, dtype=np.int64)
    layout.write(pairs, flat, packed)
    ids, types, positions, starts = (torch.from_numpy(view).to(device) for view in layout.views(flat))
    with torch.inference_mode():
        logits: torch.Tensor = packed(ids, types, positions, starts.int(), max(len(pair) for pair in pairs) + 3)
    return logits[: len(pairs)]
