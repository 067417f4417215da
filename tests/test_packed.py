"""Packed batches (app/engine/packed.py), checked on any machine: the packed model, fed exactly as a CUDA graph's
bucket feeds it (spare one-token rows, a trailing pad sequence), scores every pair as the transformers model
does on the padded batch; the buckets hold every batch the batcher plans. The flash kernel itself runs only on
a GPU (tests/test_gpu.py); here attention runs pair by pair, the same arithmetic."""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import pytest
import torch

from app.batcher import plan_batches
from app.config import Settings
from app.engine.base import EncodedPair
from app.engine.packed import PackedGraphs, PackedLayout, PackedModel, packable, run_packed, token_buckets
from app.engine.torch_backend import TorchBackend
from tests.model_factory import build_cross_encoder, make_words

FAMILIES = ["bge-reranker-base", "ms-marco-MiniLM-L-6-v2"]  # XLM-RoBERTa (positions after padding_idx); BERT


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TorchBackend]:
    root = tmp_path_factory.mktemp("packed-models")
    return {
        family: TorchBackend(
            Settings(model_path=build_cross_encoder(root / family, family=family), device="cpu", dtype="float32")
        )
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_scores_are_the_padded_models(family: str, backends: dict[str, TorchBackend]) -> None:
    backend = backends[family]
    packed = PackedModel(backend.model, pad_id=backend.pad_id, uses_type_ids=backend.uses_type_ids)
    documents = [make_words(words, seed=words) for words in (1, 5, 17, 40, 90, 200, 600)]
    pairs = backend.encoder.encode(make_words(6, seed=3), documents).pairs
    assert len({len(pair) for pair in pairs}) == len(pairs)  # every length different: real padding
    padded = np.array(backend.forward(pairs))
    assert np.ptp(padded) > 0.5  # pairs the model tells apart
    np.testing.assert_allclose(backend._scores(run_packed(packed, pairs, torch.device("cpu"))), padded, atol=1e-4)
    # One pair alone, and the pairs in another order: each scores as itself.
    np.testing.assert_allclose(
        backend._scores(run_packed(packed, pairs[3:4], torch.device("cpu"))), padded[3:4], atol=1e-4
    )
    reordered = pairs[::-1]
    np.testing.assert_allclose(
        backend._scores(run_packed(packed, reordered, torch.device("cpu"))), padded[::-1], atol=1e-4
    )


def test_layout_restarts_positions_and_fills_the_bucket() -> None:
    class Model:  # what PackedLayout.write reads of a PackedModel
        pad_id, position_offset, pad_position, uses_type_ids = 1, 2, 1, True

    pairs = [EncodedPair([5, 6, 7], [0, 0, 1]), EncodedPair([8, 9], [0, 1])]
    layout = PackedLayout(rows=4, tokens=12)
    flat = np.full(layout.size, -7, dtype=np.int64)
    layout.write(pairs, flat, Model())  # type: ignore[arg-type]
    ids, types, positions, starts = layout.views(flat)
    assert ids.tolist() == [5, 6, 7, 8, 9, 1, 1, 1, 1, 1, 1, 1]
    assert types.tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert positions.tolist() == [2, 3, 4, 2, 3, 1, 1, 1, 1, 1, 1, 1]
    # Two pairs, two spare one-token rows, and the trailing pad sequence of the 5 tokens left.
    assert starts.tolist() == [0, 3, 5, 6, 7, 12]
    assert layout.size == len(flat)  # nothing left unwritten


def graphs(max_batch_tokens: int = 16384, max_batch_pairs: int = 256, max_length: int = 512) -> PackedGraphs:
    packed: Any = None  # bookkeeping only: no model needed
    planned = PackedGraphs(
        packed,
        torch.device("cpu"),
        max_length=max_length,
        max_batch_pairs=max_batch_pairs,
        max_batch_tokens=max_batch_tokens,
    )
    planned._graphs = dict.fromkeys(planned.shapes)  # type: ignore[arg-type]  # what capture() would fill
    return planned


def test_every_batch_the_batcher_plans_has_a_packed_bucket() -> None:
    planned = graphs()
    rng = random.Random(11)
    rounds = [[rng.randint(3, 512) for _ in range(rng.randint(1, 600))] for _ in range(200)]
    rounds.append([248 + n % 19 for n in range(64)])  # one request of 64 documents of ~256 tokens
    # Batches at the budget's edge: 33 pairs of 496 tokens are 16,368 tokens padded or packed, but 16,399 with the
    # 64-row bucket's 31 spare rows: past the largest bucket, so 32 pairs (on an H100, such batches counted by
    # their padded size ran eagerly and cut gpu64's pairs/s by a third at 16 clients).
    rounds += [[496] * 40, [512] * 40, [250] * 70, [252] * 65 + [3] * 10]
    for lengths in rounds:
        for batch in plan_batches(
            lengths, max_batch_tokens=16384, max_batch_pairs=256, batch_tokens=planned.batch_tokens
        ):
            total = sum(lengths[p] for p in batch)
            shape = planned.bucket(len(batch), total, max(lengths[p] for p in batch))
            assert shape is not None and shape in planned.shapes, (len(batch), total)
            rows, tokens = shape
            assert rows >= len(batch) and tokens >= total + rows - len(batch) and tokens <= 16384
            # The trailing pad sequence is never longer than a pair may be.
            assert tokens - total - (rows - len(batch)) <= 512
    # Packed, a batch costs its tokens, not pairs x longest: 63 pairs of 248-266 tokens (16,140 tokens and one
    # spare row in the 64 x 16,384 bucket) share one batch, where padded graphs fit 56 (the 56 x 272 bucket).
    lengths = [248 + n % 19 for n in range(64)]
    assert [
        len(batch)
        for batch in plan_batches(
            lengths, max_batch_tokens=16384, max_batch_pairs=256, batch_tokens=planned.batch_tokens
        )
    ] == [63, 1]
    # 64 pairs of exactly 256 tokens fill the largest bucket exactly (no trailing pad tokens): one batch.
    assert planned.bucket(64, 64 * 256, 256) == (64, 16384)
    # A model with longer pairs (bge-reranker-v2-m3: 8,192): batches of pairs up to 512 tokens run packed, a
    # batch with a longer pair padded (eagerly), and the batcher counts it so.
    long = graphs(max_length=8192)
    assert long.bucket(3, 1500, 512) == (4, 1536) and long.bucket(3, 1500, 513) is None
    assert long.batch_tokens(3, 1000, 1500) == 3000


def test_token_buckets() -> None:
    buckets = token_buckets(16384, 512)
    assert buckets[:3] == [64, 128, 192] and 1024 in buckets and 1280 in buckets and buckets[-2:] == [15872, 16384]
    assert max(b - a for a, b in itertools.pairwise(buckets)) == 512
    assert max(b - a for a, b in zip(token_buckets(16384, 128), token_buckets(16384, 128)[1:], strict=False)) == 128
    assert token_buckets(10000, 512)[-1] == 10000  # the budget itself is a bucket
    shapes = graphs().shapes
    assert 250 < len(shapes) < 360  # start-up: ~8 ms a shape on an H100
    assert sorted({rows for rows, _ in shapes}) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # Four pairs of at most 512 tokens need at most 2,048 tokens: no bigger bucket is captured for them.
    assert max(tokens for rows, tokens in shapes if rows == 4) == 2048


def test_packable_only_on_cuda_for_bert_layouts(backends: dict[str, TorchBackend]) -> None:
    model = backends["bge-reranker-base"].model
    assert "CUDA" in str(packable(model, torch.device("cpu"), torch.float16, torch.float16))
    assert backends["bge-reranker-base"].describe()["packed_batches"] == "false"


def test_a_backend_on_the_cpu_plans_padded_batches(backends: dict[str, TorchBackend]) -> None:
    backend = backends["ms-marco-MiniLM-L-6-v2"]
    assert backend.batch_tokens(10, 100, 600) == 1000  # padded to its longest pair: 10 x 100
