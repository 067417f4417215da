"""Two models in one server under a mixed load: does a burst on the large model starve the small model's requests?

    python -m bench.several_models [--large-clients 4] [--duration 30] [--device cpu|cuda] [--json PATH]

Models (random weights, built once offline with the published configs; they cost what the trained ones cost):
bge-reranker-base (XLM-RoBERTa, 12 layers, hidden 768) as the large one, ms-marco-MiniLM-L-6-v2 (BERT, 6 layers,
hidden 384) as the small one. The real server (``python -m app``, one worker, its default dtype) is started three
times and driven over HTTP with RAGFlow-shaped requests:

1. the small model served alone (``RERANKER_MODELS=small=...``): one client of small requests;
2. both models served, the large one idle: the same client;
3. both models served, the large one saturated by ``--large-clients`` clients of 16-document requests, the same
   small client beside them; and, for contrast, a small request sent to the *large* model meanwhile, which waits
   behind the burst in that model's queue (what every request would do with one queue for both models).

Printed: the small client's p50/p95 and pairs/s in each phase, the large model's pairs/s, and the contrast.
Each model has its own batcher, so the small model's requests never queue behind the large model's pairs; on a
CPU the two models' forward passes run side by side and share the cores, which is what phase 3's p50 shows.
Several models in one process run eagerly on the CPU (``Settings.for_model``), the model served alone in phase 1
compiled: phase 2 against phase 1 is that difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from bench.driver import drive_raw
from bench.llm import DEFAULT_CACHE, percentile
from bench.model import built_once, ensure_model
from bench.servers import start_service
from bench.workloads import WORKLOADS
from tests.model_factory import build_cross_encoder, make_words

logger = logging.getLogger("bench.several_models")


def ensure_small_model(cache_dir: Path) -> Path:
    """ms-marco-MiniLM-L-6-v2's exact shape with random weights, built once."""
    return built_once(
        cache_dir / "ms-marco-MiniLM-L-6-v2",
        lambda target: build_cross_encoder(target, shape="full", family="ms-marco-MiniLM-L-6-v2"),
        "random weights, ms-marco-MiniLM-L-6-v2's config",
    )


def small_bodies(count: int) -> list[dict[str, Any]]:
    """A small request: 4 documents of ~60 words (a knowledge base's short answers)."""
    return [
        {
            "model": "small",
            "query": make_words(10, seed=7_000 + index),
            "documents": [make_words(60, seed=8_000 + 4 * index + i) for i in range(4)],
            "top_n": 4,
        }
        for index in range(count)
    ]


def summary(samples: list[Any], wall: float, bodies: list[dict[str, Any]]) -> dict[str, float]:
    ok = [sample for sample in samples if sample.status == 200]
    latencies = [sample.latency * 1000 for sample in ok]
    pairs = sum(len(bodies[sample.request % len(bodies)]["documents"]) for sample in ok)
    return {
        "requests": len(ok),
        "errors": len(samples) - len(ok),
        "pairs_per_s": pairs / wall if wall else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
    }


async def drive(url: str, bodies: list[dict[str, Any]], clients: int, args: argparse.Namespace) -> dict[str, float]:
    raw = [json.dumps(body).encode() for body in bodies]
    samples, wall = await drive_raw(
        url, raw, clients=clients, duration_s=args.duration, max_requests=10_000, timeout_s=600
    )
    return summary(samples, wall, bodies)


async def mixed(
    base_url: str, large: list[dict[str, Any]], small: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """The large model saturated, the small client beside it, and the small request sent to the large model."""
    on_large = [{**body, "model": "large"} for body in small]
    large_load, small_load, small_on_large = await asyncio.gather(
        drive(f"{base_url}/v1/rerank", large, args.large_clients, args),
        drive(f"{base_url}/v1/rerank", small, 1, args),
        drive(f"{base_url}/v1/rerank", on_large, 1, args),
    )
    return {"large": large_load, "small": small_load, "small_on_large": small_on_large}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.several_models", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--large-clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    large_dir, small_dir = ensure_model(args.cache_dir), ensure_small_model(args.cache_dir)
    large = [{**body, "model": "large"} for body in WORKLOADS["target"].bodies(64)]
    small = small_bodies(64)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir:

        def serve(models: str) -> Any:
            return start_service(
                large_dir,
                Path(workdir),
                device=args.device,
                workers=1,
                ready_timeout=args.ready_timeout,
                settings={"RERANKER_MODELS": models, "RERANKER_LOG_LEVEL": "warning"},
            )

        server = serve(f"small={small_dir}")
        try:
            results["one_model"] = asyncio.run(drive(f"{server.base_url}/v1/rerank", small, 1, args))
        finally:
            server.stop()
        server = serve(f"large={large_dir},small={small_dir}")
        try:
            results["two_models_idle"] = asyncio.run(drive(f"{server.base_url}/v1/rerank", small, 1, args))
            results["two_models_mixed"] = asyncio.run(mixed(server.base_url, large, small, args))
        finally:
            server.stop()
    where = f"{os.cpu_count()} CPUs ({platform.processor() or 'cpu'})" if args.device == "cpu" else args.device
    print(
        f"\nsmall = ms-marco-MiniLM-L-6-v2 shape, 4 documents of ~60 words; large = bge-reranker-base shape, "
        f"{WORKLOADS['target'].description}; one worker; {where}"
    )
    print(f"{'phase':<58}{'requests':>9}{'pairs/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}")
    rows = [
        ("small model served alone, 1 client", results["one_model"]),
        ("two models served, large idle: small, 1 client", results["two_models_idle"]),
        (
            f"two models, large saturated ({args.large_clients} clients): small, 1 client",
            results["two_models_mixed"]["small"],
        ),
        (f"two models, large saturated: large, {args.large_clients} clients", results["two_models_mixed"]["large"]),
        (
            "contrast: the small request sent to the large model meanwhile",
            results["two_models_mixed"]["small_on_large"],
        ),
    ]
    for label, row in rows:
        print(
            f"{label:<58}{row['requests']:>9}{row['pairs_per_s']:>9.1f}{row['p50_ms']:>9.0f}{row['p95_ms']:>9.0f}{row['errors']:>8}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
