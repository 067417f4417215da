"""Which captured shape a batch runs in (app/engine/cuda_graphs.py) and how the batcher sizes batches by it: pure
bookkeeping, checked on any machine."""

from __future__ import annotations

import random
from typing import Any

import torch

from app.batcher import plan_batches
from app.engine.cuda_graphs import GRAPH_MAX_TOKENS, CudaGraphs


def planned(max_length: int = 512, max_batch_pairs: int = 256, max_batch_tokens: int = 16384) -> CudaGraphs:
    graphs = CudaGraphs(
        None,
        torch.device("cpu"),
        max_length=max_length,
        max_batch_pairs=max_batch_pairs,
        max_batch_tokens=max_batch_tokens,
        pad_id=1,
        uses_type_ids=False,
    )
    captured: Any = dict.fromkeys(graphs.shapes)  # what capture() would fill, shape by shape
    graphs._graphs = captured
    return graphs


def test_every_batch_the_batcher_forms_runs_in_a_captured_shape() -> None:
    """Sized by its bucket, every batch within the token budget has a graph (an eager batch slows with the CPU
    load beside it), and as many pairs as the budget allows share one."""
    graphs = planned()
    rng = random.Random(7)
    rounds = [[rng.randint(3, 512) for _ in range(rng.randint(1, 600))] for _ in range(200)]
    rounds.append([248 + n % 19 for n in range(64)])  # one request of 64 documents of ~256 tokens
    for lengths in rounds:
        for batch in plan_batches(
            lengths, max_batch_tokens=16384, max_batch_pairs=256, batch_tokens=graphs.batch_tokens
        ):
            longest = max(lengths[p] for p in batch)
            shape = graphs.shape_for(len(batch), longest)
            assert shape is not None, (len(batch), longest)
            assert shape[0] * shape[1] <= 16384
    full = plan_batches(
        [248 + n % 19 for n in range(64)],
        max_batch_tokens=16384,
        max_batch_pairs=256,
        batch_tokens=graphs.batch_tokens,
    )
    # 64 pairs of 248-266 tokens: 56 fill the 56 x 272 bucket (15,232 padded tokens); 64 x 272 is past 16,384.
    assert [len(batch) for batch in full] == [56, 8]
    assert graphs.shape_for(56, 266) == (56, 272)


def test_shapes_are_the_buckets_within_the_token_budget_and_the_model() -> None:
    graphs = planned()
    assert max(rows * columns for rows, columns in graphs.shapes) <= 16384
    assert max(columns for _, columns in graphs.shapes) == 512
    assert max(rows for rows, _ in graphs.shapes) == 256
    # Every 32 tokens; every 16 below 512 in batches of 8,192 padded tokens or more; never past max_length.
    assert graphs.lengths[1][:3] == [32, 64, 96] and graphs.lengths[1][-2:] == [480, 512]
    assert graphs.lengths[64][:6] == [32, 64, 96, 128, 144, 160] and graphs.lengths[64][-2:] == [496, 512]
    assert planned(max_length=1024).lengths[64][-3:] == [960, 992, 1024]
    assert max(columns for _, columns in planned(max_length=200).shapes) == 200
    assert planned(max_batch_pairs=20).batches[-3:] == [12, 16, 20]
    assert planned(max_batch_pairs=17).batches[-2:] == [16, 17]
    # A smaller budget captures fewer shapes; a larger one stops at GRAPH_MAX_TOKENS.
    assert len(planned(max_batch_tokens=4096).shapes) < len(graphs.shapes)
    huge = planned(max_batch_tokens=10**6)
    assert huge.shape_for(256, 512) is None  # 131k padded tokens: eager
    assert max(rows * columns for rows, columns in huge.shapes) <= GRAPH_MAX_TOKENS
    assert huge.shape_for(64, 512) == (64, 512)


def test_a_batch_runs_in_the_smallest_bucket_that_holds_it() -> None:
    graphs = planned()
    assert graphs.shape_for(1, 10) == (1, 32)
    assert graphs.shape_for(5, 100) == (6, 128)  # small: 32-token steps
    assert graphs.shape_for(16, 116) == (16, 128)
    assert graphs.shape_for(64, 128) == (64, 128)
    assert graphs.shape_for(64, 256) == (64, 256)
    assert graphs.shape_for(50, 259) == (56, 272)  # large: 16-token steps
    assert graphs.shape_for(8, 259) == (8, 288)
    # a bucket past the token budget, or longer than the model takes: eager
    assert graphs.bucket(61, 266) == (64, 272) and graphs.shape_for(61, 266) is None
    assert graphs.shape_for(128, 512) is None
    assert graphs.shape_for(2, 600) is None and graphs.bucket(2, 600) is None
    assert planned(max_batch_pairs=16).shape_for(20, 32) is None


def test_a_batch_is_written_into_a_larger_fixed_shape() -> None:
    """How a graph's pinned input buffers are filled (and, at its own shape, the eager path's arrays)."""
    import numpy as np

    from app.engine.base import EncodedPair, write_padded

    ids, mask, types = (np.full((3, 6), 7, dtype=np.int64) for _ in range(3))  # stale values from a last batch
    pairs = [EncodedPair([0, 5, 2], [0, 0, 1]), EncodedPair([0, 6, 6, 6, 2], [0, 0, 0, 1, 1])]
    write_padded(pairs, ids, mask, types, pad_id=1)
    assert ids.tolist() == [[0, 5, 2, 1, 1, 1], [0, 6, 6, 6, 2, 1], [1, 1, 1, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert types.tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]
