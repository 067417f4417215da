"""An LLM reranker beside a cross-encoder, over HTTP: Qwen3-Reranker-0.6B's shape against bge-reranker-base's.

    python -m bench.llm [--clients 1,4] [--duration 30] [--workload target] [--device cpu|cuda] [--json PATH]
    python -m bench.llm --backend-only 100,200      # the shared prefix against whole pairs, in the backend alone

Builds (once, cached) random-weight models with the two published configs (Qwen3-Reranker-0.6B: Qwen3ForCausalLM,
28 layers, hidden 1024, its Qwen2 tokenizer layout and prompt; bge-reranker-base: XLM-RoBERTa, 12 layers, hidden
768), starts the real service (``python -m app``) for each in turn with the same settings, and drives both with
the same RAGFlow-shaped requests (``bench/workloads.py``). Random weights cost exactly what trained ones cost.

Printed per model and client count: pairs/s, tokens/s (every token of every pair, the LLM's prompt included),
p50/p95 latency, and the LLM's pairs/s as a share of the cross-encoder's. The LLM runs a second time with every
pair whole (RERANKER_SHARE_PREFIX=false), so the shared prefix's gain is measured side by side. The LLM's pair is
its whole prompt (about 70 tokens of system prompt, instruction and markers around the query and document), which
is why it costs more than its parameter count alone says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.driver import drive_raw
from bench.model import built_once, ensure_model
from bench.servers import start_service
from bench.workloads import WORKLOADS, load_encoder
from tests.llm_factory import build_llm_reranker

logger = logging.getLogger("bench.llm")
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "reranker-bench"


def ensure_qwen3_reranker(cache_dir: Path) -> Path:
    """Qwen3-Reranker-0.6B's exact shape with random weights, built once (a few minutes and ~1.2 GB in bf16)."""
    return built_once(
        cache_dir / "Qwen3-Reranker-0.6B",
        lambda target: build_llm_reranker(target, family="qwen3-reranker", shape="full"),
        "random weights, Qwen3-Reranker-0.6B's config",
    )


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share / 100 * len(ordered)))] if ordered else float("nan")


def measure(
    model_dir: Path,
    name: str,
    workdir: Path,
    args: argparse.Namespace,
    bodies: list[dict[str, Any]],
    extra: dict[str, str],
) -> list[dict[str, Any]]:
    encoder = load_encoder(model_dir)
    tokens = [sum(len(pair) for pair in encoder.encode(str(body["query"]), body["documents"]).pairs) for body in bodies]
    raw = [json.dumps(body).encode() for body in bodies]
    settings = {"RERANKER_LOG_LEVEL": "warning", **extra}
    server = start_service(
        model_dir,
        workdir,
        device=args.device,
        workers=args.workers,
        ready_timeout=args.ready_timeout,
        settings=settings,
    )
    rows = []
    try:
        facts = server.client().get("/v1/models").json()["data"][0]
        for clients in args.clients:
            samples, wall = asyncio.run(
                drive_raw(
                    f"{server.base_url}/v1/rerank",
                    raw,
                    clients=clients,
                    duration_s=args.duration,
                    max_requests=args.max_requests,
                    timeout_s=600,
                )
            )
            ok = [sample for sample in samples if sample.status == 200]
            latencies = [sample.latency * 1000 for sample in ok]
            pairs = sum(len(bodies[sample.request % len(bodies)]["documents"]) for sample in ok)
            scored_tokens = sum(tokens[sample.request % len(bodies)] for sample in ok)
            rows.append(
                {
                    "model": name,
                    "recipe": facts.get("recipe"),
                    "dtype": facts.get("dtype"),
                    "clients": clients,
                    "requests": len(ok),
                    "errors": len(samples) - len(ok),
                    "pairs_per_s": pairs / wall,
                    "tokens_per_s": scored_tokens / wall,
                    "tokens_per_pair": statistics.mean(tokens) / len(bodies[0]["documents"]),
                    "p50_ms": percentile(latencies, 50),
                    "p95_ms": percentile(latencies, 95),
                }
            )
            logger.info("%s, %d clients: %.1f pairs/s", name, clients, rows[-1]["pairs_per_s"])
    finally:
        server.stop()
    return rows


def backend_side_by_side(model_dir: Path, words: list[int], repeats: int) -> None:
    """The shared prefix through the backend alone: 16 pairs of ~``n`` words each, whole and shared, side by side
    (three timed passes each after one untimed), in the service's own TorchBackend with its default dtype."""
    from app.config import Settings
    from app.engine.torch_backend import TorchBackend
    from tests.model_factory import make_words

    backends = {on: TorchBackend(Settings(model_path=model_dir, share_prefix=on)) for on in (True, False)}
    print(f"\nthe backend alone, {backends[True].describe()['dtype']}, 16 pairs a pass, median of {repeats}")
    for count in words:
        documents = [make_words(int(count * (0.5 + i / 16)), seed=i) for i in range(16)]
        medians = {}
        for on, backend in backends.items():
            pairs = sorted(backend.encoder.encode(make_words(12, seed=99), documents).pairs, key=len)
            backend.forward(pairs)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                backend.forward(pairs)
                times.append(time.perf_counter() - started)
            medians[on] = statistics.median(times)
        print(
            f"~{count} words: whole pairs {medians[False]:.2f} s, shared prefix {medians[True]:.2f} s, "
            f"{medians[False] / medians[True]:.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llm", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per cell")
    parser.add_argument("--max-requests", type=int, default=200)
    parser.add_argument("--workload", default="target", choices=sorted(WORKLOADS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="RERANKER_DEVICE for both")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument(
        "--no-whole-pairs", action="store_true", help="skip the LLM with RERANKER_SHARE_PREFIX=false beside it"
    )
    parser.add_argument(
        "--backend-only",
        type=lambda text: [int(n) for n in text.split(",")],
        metavar="WORDS",
        help="instead of HTTP: the shared prefix against whole pairs in the backend alone, for documents of "
        "about these many words (e.g. 100,200)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="with --backend-only: timed passes each")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    qwen = ensure_qwen3_reranker(args.cache_dir)
    if args.backend_only:
        backend_side_by_side(qwen, args.backend_only, args.repeats)
        return 0
    runs: list[tuple[str, Path, dict[str, str]]] = [
        ("bge-reranker-base", ensure_model(args.cache_dir), {}),
        ("Qwen3-Reranker-0.6B", qwen, {}),
    ]
    if not args.no_whole_pairs:
        runs.append(("Qwen3 (whole pairs)", qwen, {"RERANKER_SHARE_PREFIX": "false"}))
    bodies = WORKLOADS[args.workload].bodies(64)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, model_dir, extra in runs:
            rows += measure(model_dir, name, Path(workdir), args, bodies, extra)
    where = f"{os.cpu_count()} CPUs ({platform.processor() or 'cpu'})" if args.device == "cpu" else args.device
    print(f"\n{WORKLOADS[args.workload].description}; {where}")
    print(
        f"{'model':<22}{'recipe':<16}{'dtype':<10}{'clients':>8}{'pairs/s':>10}{'tokens/s':>10}{'tok/pair':>10}"
        f"{'p50 ms':>10}{'p95 ms':>10}{'errors':>8}"
    )
    for row in rows:
        print(
            f"{row['model']:<22}{row['recipe']!s:<16}{row['dtype']!s:<10}{row['clients']:>8}{row['pairs_per_s']:>10.1f}"
            f"{row['tokens_per_s']:>10.0f}{row['tokens_per_pair']:>10.0f}{row['p50_ms']:>10.0f}{row['p95_ms']:>10.0f}"
            f"{row['errors']:>8}"
        )
    base = {row["clients"]: row["pairs_per_s"] for row in rows if row["model"] == "bge-reranker-base"}
    for row in rows:
        if row["model"] != "bge-reranker-base" and base.get(row["clients"]):
            share = row["pairs_per_s"] / base[row["clients"]]
            print(f"{row['model']} at {row['clients']} client(s): {share:.3f}x bge-reranker-base's pairs/s")
    if args.json:
        args.json.write_text(json.dumps({"workload": args.workload, "time": time.time(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
