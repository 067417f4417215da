"""The engine alone, in-process: ``TorchBackend.forward`` back to back on fixed batches, no HTTP, no batcher.

    python -m bench.engine_alone --model-dir DIR [--device cuda] [--pairs 64,256] [--tokens 256] [--json PATH]

What the service is judged against on a GPU (the issue's "engine's own in-process pairs/s"): pairs/s and
milliseconds per batch for each batch size, the model FLOP/s (``bench/flops.py``: useful work, padding
excluded) and its share of the matrix-multiply peak measured in the same process, in the engine's dtype.

Each batch size is measured twice. ``uniform``: every pair exactly ``--tokens`` long, so nothing is padded; the
attention mask is all ones and transformers then gives SDPA no mask at all (its flash kernel). ``padded``: the
lengths spread over ``--tokens`` ± 8, as the service's batches do (64 documents of ~256 tokens are 251-266
tokens a pair), so the mask is real and SDPA runs its masked kernel. On the H200 the service's forward passes
took about twice the uniform batch's time per pair; the two figures side by side say how much of that is
masked attention.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.flops import ModelShape, measure_matmul_peak, pair_flops
from tests.model_factory import make_words


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from app.config import Settings
    from app.engine.torch_backend import TorchBackend

    settings = Settings(model_path=args.model_dir, device=args.device)  # the rest from RERANKER_* variables
    started = time.perf_counter()
    backend = TorchBackend(settings)
    backend.warm_up()
    load_s = time.perf_counter() - started
    shape = ModelShape.from_model_dir(args.model_dir)
    described = backend.describe()
    query = make_words(12, seed=1)
    words = max(1, args.tokens - 12 - backend.encoder.template.special_count)  # one word is about one token
    batches = []
    for count, layout in ((count, layout) for count in args.pairs for layout in ("uniform", "padded")):
        spread = [0] * count if layout == "uniform" else [(i % 17) - 8 for i in range(count)]
        documents = [make_words(words + spread[i], seed=100 + i) for i in range(count)]
        pairs = sorted(backend.encoder.encode(query, documents).pairs, key=len)  # as the batcher hands them over
        for _ in range(3):
            backend.forward(pairs)
        runs, begin = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - begin < args.seconds:
            backend.forward(pairs)
            runs += 1
        elapsed = time.perf_counter() - begin
        flops = sum(pair_flops(len(pair), shape) for pair in pairs) * runs / elapsed
        batches.append(
            {
                "pairs": count,
                "layout": layout,
                "shortest": min(len(p) for p in pairs),
                "longest": max(len(p) for p in pairs),
                "runs": runs,
                "ms_per_batch": 1000 * elapsed / runs,
                "pairs_per_s": count * runs / elapsed,
                "model_flops_per_s": flops,
            }
        )
        logging.info(
            "engine alone: %d pairs x %d-%d tokens (%s): %.1f ms per batch, %.0f pairs/s",
            count,
            min(len(p) for p in pairs),
            max(len(p) for p in pairs),
            layout,
            1000 * elapsed / runs,
            count * runs / elapsed,
        )
    peak = measure_matmul_peak(
        dtype_name=described["dtype"], device=str(backend.device), threads=len(os.sched_getaffinity(0)), shape=shape
    )
    for batch in batches:
        batch["peak_fraction"] = batch["model_flops_per_s"] / peak
    return {"describe": described, "load_and_warm_up_s": load_s, "matmul_peak_flops": peak, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_alone", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--pairs", type=lambda text: [int(x) for x in text.split(",")], default=[64, 256])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per pair, special tokens included")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
