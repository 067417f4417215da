"""Which captured shape a batch runs in (app/engine/cuda_graphs.py): pure bookkeeping, checked on any machine."""

from __future__ import annotations

from typing import Any

import torch

from app.engine.cuda_graphs import GRAPH_MAX_TOKENS, LENGTH_STEP, CudaGraphs


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


def test_every_batch_within_the_token_budget_has_a_captured_shape() -> None:
    """The batcher never forms a batch of more than max_batch_tokens padded tokens; each one it can form runs
    in a graph (the full ones too: an eager full batch slows with the CPU load beside it)."""
    graphs = planned()
    edges = sorted({*graphs.lengths, *(length + 1 for length in graphs.lengths[:-1]), 1, 266})
    for rows in range(1, 257):
        for longest in edges:
            if rows * longest <= 16384:
                assert graphs.shape_for(rows, longest) is not None, (rows, longest)
    # What a full batch of 64 documents of ~256 tokens pads to: 61 pairs of up to 266 tokens.
    assert graphs.shape_for(61, 266) == (64, 288)


def test_shapes_stay_near_the_token_budget_and_within_the_model() -> None:
    graphs = planned()
    # Only shapes some batch within the budget needs: at most a row bucket and LENGTH_STEP tokens past it.
    assert max(rows * columns for rows, columns in graphs.shapes) <= 16384 * 2
    assert all(graphs.shape_for(rows, columns - LENGTH_STEP + 1) == (rows, columns) for rows, columns in graphs.shapes)
    assert max(columns for _, columns in graphs.shapes) == 512
    assert max(rows for rows, _ in graphs.shapes) == 256
    assert max(columns for _, columns in planned(max_length=200).shapes) == 200  # never past max_length
    # A smaller budget captures fewer shapes; a larger one stops at GRAPH_MAX_TOKENS.
    assert len(planned(max_batch_tokens=4096).shapes) < len(graphs.shapes)
    huge = planned(max_batch_tokens=10**6)
    assert huge.shape_for(256, 512) is None  # 131k padded tokens: eager
    assert max(rows * columns for rows, columns in huge.shapes) <= GRAPH_MAX_TOKENS * 2


def test_a_batch_runs_in_the_smallest_shape_that_holds_it() -> None:
    graphs = planned()
    assert graphs.shape_for(1, 10) == (1, 32)
    assert graphs.shape_for(5, 100) == (6, 128)
    assert graphs.shape_for(16, 116) == (16, 128)
    assert graphs.shape_for(64, 128) == (64, 128)
    assert graphs.shape_for(64, 256) == (64, 256)
    # too big for any captured shape (past the token budget, or longer than the model takes): eager
    assert graphs.shape_for(128, 512) is None
    assert graphs.shape_for(2, 600) is None
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
