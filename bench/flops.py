"""Model FLOPs counted analytically, and the machine's measured matrix-multiply peak to compare them with.

FLOPs of one (query, document) pair of ``n`` tokens through a BERT-style encoder with ``L`` layers, hidden
size ``h`` and feed-forward size ``f`` (a multiply-add counts 2):

    each layer but the last:  2·n·(4·h² + 2·h·f)   the Q, K, V, output and two feed-forward projections
                            + 4·n²·h               attention scores Q·Kᵀ and the weighted sum of V
    the last layer:           2·n·2·h²             K and V of every token
                            + 2·(2·h² + 2·h·f)     Q, output and feed-forward of the first token only
                            + 4·n·h                the first token's attention
    head:                     2·(h² + h·labels)    the classifier's dense layer and output projection

The score reads only the first token's final vector, so the last layer's other outputs are not work the answer
needs (the service skips them: app/engine/first_token.py; the baseline computes them, and so looks ~7 % less
efficient than it is). Embedding look-ups, layer norms, softmax, GELU and biases are left out (memory-bound,
under 1 % of the FLOPs). Padding is not counted: the figure is useful work, so wasted padding shows as lower
efficiency. For bge-reranker-base (L=12, h=768, f=3072) a 115-token pair costs about 18.6 GFLOP.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    labels: int

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelShape:
        config = json.loads((model_dir / "config.json").read_text())
        labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 1))
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"], labels)


def pair_flops(tokens: int, shape: ModelShape) -> float:
    h, f, n = shape.hidden, shape.intermediate, tokens
    per_layer = 2 * n * (4 * h * h + 2 * h * f) + 4 * n * n * h
    last_layer = 2 * n * 2 * h * h + 2 * (2 * h * h + 2 * h * f) + 4 * n * h
    head = 2 * (h * h + h * shape.labels)
    return float((shape.layers - 1) * per_layer + last_layer + head)


def measure_matmul_peak(*, dtype_name: str, device: str, threads: int, sizes: tuple[int, ...] = (2048, 3072, 4096),
                        repeats: int = 6) -> float:
    """Best FLOP/s of square matrix multiplies in ``dtype_name`` on ``device`` with ``threads`` CPU threads.

    The best over a few sizes and several timed runs each (after an untimed one), so that neither one size's
    blocking nor a burst of other load on the machine sets the ceiling the model's FLOP/s are compared with.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    try:
        for size in sizes if not device.startswith("cuda") else (8192,):
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            for attempt in range(repeats + 1):
                sync()
                started = time.perf_counter()
                torch.matmul(a, b)
                sync()
                if attempt:
                    best = max(best, 2 * size**3 / (time.perf_counter() - started))
        return best
    finally:
        torch.set_num_threads(previous)
