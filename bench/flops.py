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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def measure_matmul_peak(
    *, dtype_name: str, device: str, threads: int, shape: ModelShape | None = None, repeats: int = 6
) -> float:
    """Best FLOP/s of matrix products in ``dtype_name`` on ``device`` with ``threads`` CPU threads.

    The best of several timed runs (after untimed ones) of square products and, given the model's ``shape``,
    of its own projections on 4096 tokens; on the CPU each also as a frozen, compiled ``nn.Linear`` (oneDNN
    with the weights prepacked, the fastest kernel this machine has for the work, ~10 % above a plain
    ``matmul``). So neither one kernel's blocking nor a burst of other load on the machine sets the ceiling
    the model's FLOP/s are compared with too low.
    """
    import torch

    cuda = device.startswith("cuda")
    if dtype_name == "int8":
        if cuda:
            raise ValueError("the int8 peak is measured on the CPU only")
        return _int8_peak(threads, shape, repeats)
    dtype = getattr(torch, dtype_name)
    products = [(8192, 8192, 8192)] if cuda else [(2048, 2048, 2048), (4096, 4096, 4096)]
    if shape is not None:
        products += [(4096, shape.hidden, shape.intermediate), (4096, shape.intermediate, shape.hidden)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def best_rate(product: Callable[[], object], flops: float) -> float:
        best = 0.0
        for attempt in range(repeats + 2):
            sync()
            started = time.perf_counter()
            product()
            sync()
            if attempt >= 2:
                best = max(best, flops / (time.perf_counter() - started))
        return best

    best = 0.0
    try:
        with torch.inference_mode():
            for m, k, n in products:
                a = torch.randn(m, k, device=device).to(dtype)
                b = torch.randn(k, n, device=device).to(dtype)
                best = max(best, best_rate(lambda: torch.matmul(a, b), 2 * m * k * n))  # noqa: B023
                if not cuda:
                    best = max(best, _prepacked_linear_rate(a, n, best_rate))
        return best
    finally:
        torch.set_num_threads(previous)


def _int8_peak(threads: int, shape: ModelShape | None, repeats: int) -> float:
    """Best op/s of oneDNN's int8 product on the CPU (unsigned activations x signed per-channel weights, the
    form VNNI and AMX run natively; weights prepacked; bf16 out), through the operator inductor lowers quantised
    linears to. 0 where this torch has no oneDNN."""
    import torch

    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return 0.0
    products = [(2048, 2048, 2048), (4096, 4096, 4096)]
    if shape is not None:
        products += [(4096, shape.hidden, shape.intermediate), (4096, shape.intermediate, shape.hidden)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    try:
        with torch.inference_mode():
            for m, k, n in products:
                activations = torch.randint(0, 256, (m, k), dtype=torch.uint8)
                weights = torch.randint(-127, 128, (n, k), dtype=torch.int8)
                packed = torch.ops.onednn.qlinear_prepack(weights, (m, k))
                scales, zeros = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.long)
                for attempt in range(repeats + 2):
                    started = time.perf_counter()
                    torch.ops.onednn.qlinear_pointwise(
                        activations, 1.0, 0, packed, scales, zeros, None, 1.0, 0, torch.bfloat16, "none", [], ""
                    )
                    if attempt >= 2:
                        best = max(best, 2 * m * k * n / (time.perf_counter() - started))
        return best
    finally:
        torch.set_num_threads(previous)


def _prepacked_linear_rate(
    inputs: Any,
    outputs: int,
    best_rate: Callable[[Callable[[], object], float], float],
) -> float:
    """FLOP/s of a frozen, compiled ``nn.Linear`` on the CPU (float32 weights under bf16 autocast, as the
    service runs them; plain float32 otherwise). 0 where inductor cannot compile here."""
    import torch
    import torch._inductor.config as inductor_config

    m, k = inputs.shape
    linear = torch.nn.Linear(k, outputs, bias=False).eval()
    compiled = torch.compile(linear, dynamic=True)  # as the service compiles: oneDNN's fastest kernels
    half = inputs.dtype != torch.float32
    autocast = torch.autocast("cpu", dtype=inputs.dtype, enabled=half)
    try:
        with autocast, inductor_config.patch(freezing=True):
            return best_rate(lambda: compiled(inputs), 2 * m * k * outputs)
    except Exception:  # no C++ compiler, or no such kernel: the plain products stand
        return 0.0
