"""Benchmark the rerank service against the naive baseline, side by side, over HTTP.

    python -m bench.run [--quick] [--json PATH] [--plot PATH] [...]

Builds (once, cached) a random-weight model with bge-reranker-base's exact architecture, starts the real service
(``python -m app``: gunicorn + uvicorn workers) and the baseline (``bench/baseline_server.py``: one uvicorn
process calling sentence-transformers ``CrossEncoder.predict`` in float32 per request) and, where it is
installed, Infinity (``infinity_emb``, its torch engine, bf16 on the CPU), and drives them with the same
RAGFlow-shaped requests at each concurrency, alternating between the servers cell by cell so that all see the
same machine. Printed per setting: pairs/s, tokens/s, p50/p95/p99 latency, errors, the
ratio to the baseline, and the model FLOP/s (bench/flops.py) as a share of the matrix-multiply peak measured
here in the server's own dtype. Also: score accuracy against float32, the cost of chunking long documents,
and the worker's peak memory on a 128 × 512-token request. See the README's "Benchmark" section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench.driver import drive_raw
from bench.flops import ModelShape, measure_matmul_peak
from bench.model import ensure_model
from bench.report import Cell, as_json, compare_scores, plot, print_cells, summarise
from bench.servers import (
    RssSampler,
    cpu_seconds,
    machine_busy_seconds,
    process_tree,
    start_baseline,
    start_infinity,
    start_service,
)
from bench.workloads import WORKLOADS, PreparedWorkload, load_encoder, prepare
from tests.model_factory import make_words
from tests.utils import ServerProcess, chosen_workers

logger = logging.getLogger("bench")
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "reranker-bench"
RESULTS = Path(__file__).resolve().parent / "results"  # ignored by git


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check in ~2 minutes: the target setting at 1 and 4 clients, 6 s per cell, "
        "no memory or long-document settings (overrides --workloads/--clients/--duration)",
    )
    parser.add_argument(
        "--workloads",
        default="target,mixed16,mixed64,long,long-chunk",
        help=f"comma-separated settings, of: {', '.join(WORKLOADS)}",
    )
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per setting, comma-separated")
    parser.add_argument(
        "--long-clients", default="4", help="concurrent clients for the long-document settings (long, long-chunk)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds each cell keeps sending (every client completes at least one request)",
    )
    parser.add_argument("--max-requests", type=int, default=400, help="requests per cell at most")
    parser.add_argument(
        "--distinct-requests",
        type=int,
        default=32,
        help="distinct requests per setting, cycled; both servers get the same ones in order",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto = CUDA when torch sees a GPU, else the CPU (both servers)",
    )
    parser.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="service worker processes (WEB_CONCURRENCY); auto leaves it unset, for the server's own choice",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service, e.g. RERANKER_TORCH_COMPILE=off (repeatable)",
    )
    parser.add_argument(
        "--baseline-handler",
        choices=["sync", "async"],
        default="sync",
        help="baseline route: sync = plain def in FastAPI's thread pool, async = on the event loop",
    )
    parser.add_argument("--no-baseline", action="store_true", help="drive the service alone (no ratios, no accuracy)")
    parser.add_argument(
        "--infinity",
        default="auto",
        help="Infinity's infinity_emb executable, driven beside the service (x inf column); auto = infinity_emb "
        "on PATH if there is one; off = not at all. Install it apart from the service, e.g. python -m venv "
        "/opt/infinity && /opt/infinity/bin/pip install torch==2.13.0 'infinity-emb[server,torch]==0.0.78'",
    )
    parser.add_argument(
        "--infinity-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Infinity's --dtype; auto = what the service computes in (bfloat16 on a CPU with bf16 matrix "
        "instructions, float16 on CUDA)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the 128 documents x 512 tokens memory check")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the benchmark model is built")
    parser.add_argument("--json", type=Path, default=RESULTS / "results.json", help="write all results here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=RESULTS / "results.png",
        help="write a plot here (needs matplotlib: pip install -e '.[bench]')",
    )
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for a server to start")
    args = parser.parse_args(argv)
    if args.quick:
        args.workloads, args.clients, args.duration, args.no_memory = "target", "1,4", 6.0, True
        args.distinct_requests = min(args.distinct_requests, 8)
    return args


def worker_count(text: str) -> int | None:
    """``--workers``: a number, or ``auto`` (None: WEB_CONCURRENCY unset, the server chooses)."""
    return None if text == "auto" else int(text)


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def machine_facts(device: str) -> dict[str, Any]:
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    facts: dict[str, Any] = {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "load_average_at_start": os.getloadavg(),
    }
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def scrape(base_url: str) -> dict[str, float]:
    """The service's /metrics, summed over labels, by sample name."""
    totals: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_and_labels, value = line.rsplit(" ", 1)
        name = name_and_labels.split("{", 1)[0]
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def service_dtype(server: ServerProcess) -> str:
    """The compute dtype the service reported when it became ready (from its log)."""
    found = re.findall(r"'dtype': '(\w+)'", server.log())
    return found[-1] if found else "float32"


class Bench:
    def __init__(self, args: argparse.Namespace, device: str, model_dir: Path, workdir: Path) -> None:
        self.args, self.device, self.model_dir, self.workdir = args, device, model_dir, workdir
        self.shape = ModelShape.from_model_dir(model_dir)
        self.servers: dict[str, ServerProcess] = {}
        self.service_workers: int | None = None  # as the service ran: --workers, or what it chose
        self.peaks: dict[str, float] = {}
        self.dtypes = {"baseline": "float32"}  # each server's matmul dtype; the service's is read from its log
        self.cells: list[Cell] = []
        self.samples: dict[tuple[str, int, str], list[Any]] = {}

    def start(self) -> None:
        args = self.args
        if not args.no_baseline:
            logger.info("starting the baseline server")
            self.servers["baseline"] = start_baseline(
                self.model_dir,
                self.workdir,
                device=self.device,
                handler=args.baseline_handler,
                ready_timeout=args.ready_timeout,
            )
        logger.info("starting the service (python -m app); a compiled forward pass takes a minute to warm up")
        env = dict(item.split("=", 1) for item in args.service_env)
        started = time.perf_counter()
        self.servers["service"] = start_service(
            self.model_dir,
            self.workdir,
            device=self.device,
            workers=args.workers,
            ready_timeout=args.ready_timeout,
            settings=env,
        )
        logger.info("service ready in %.0fs", time.perf_counter() - started)
        self.service_workers = args.workers or chosen_workers(self.servers["service"].log())
        self.dtypes["service"] = service_dtype(self.servers["service"])
        infinity = infinity_executable(args.infinity)
        if infinity:
            dtype = self.dtypes["service"] if args.infinity_dtype == "auto" else args.infinity_dtype
            logger.info("starting Infinity (%s, %s)", infinity, dtype)
            self.servers["infinity"] = start_infinity(
                infinity,
                self.model_dir,
                self.workdir,
                device=self.device,
                dtype=dtype,
                ready_timeout=args.ready_timeout,
            )
            self.dtypes["infinity"] = dtype

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def measure_peaks(self) -> None:
        """The matmul peak per dtype, with every CPU thread: measured before the cells and again after them
        (the servers idle), keeping the higher, so a burst of other load on the machine lowers it less."""
        threads = len(os.sched_getaffinity(0))
        # The servers' own dtypes and, on the CPU, all three a host offers, so that every run shows how much
        # faster bf16 and int8 products are than float32 here.
        wanted = set(self.dtypes.values()) | ({"float32", "bfloat16", "int8"} if self.device == "cpu" else set())
        for dtype in sorted(wanted):
            peak = measure_matmul_peak(dtype_name=dtype, device=self.device, threads=threads, shape=self.shape)
            self.peaks[dtype] = max(self.peaks.get(dtype, 0.0), peak)
            logger.info("matmul peak %s: %.0f GFLOP/s (best so far %.0f)", dtype, peak / 1e9, self.peaks[dtype] / 1e9)

    def our_pids(self) -> list[int]:
        pids = [os.getpid()]
        for server in self.servers.values():
            pids.extend(process_tree(server.process.pid))
        return pids

    def run_cell(self, prepared: PreparedWorkload, clients: int, name: str) -> Cell:
        server = self.servers[name]
        url = f"{server.base_url}/v1/rerank"
        dtype = self.dtypes[name]
        before_metrics = scrape(server.base_url) if name == "service" else {}
        pids, server_pids = self.our_pids(), process_tree(server.process.pid)
        busy0, ours0, t0 = machine_busy_seconds(), cpu_seconds(pids), time.perf_counter()
        server0, client0 = cpu_seconds(server_pids), cpu_seconds([os.getpid()])
        # The raw client: httpx's own cost per request grows with the number of connections (1 ms at 4
        # clients, 8 ms at 64 on one core, measured by bench/load_generator.py) and capped earlier cells.
        samples, wall = asyncio.run(
            drive_raw(
                url,
                prepared.bodies,
                clients=clients,
                duration_s=self.args.duration,
                max_requests=self.args.max_requests,
                timeout_s=900,
            )
        )
        elapsed = time.perf_counter() - t0
        other = max(0.0, (machine_busy_seconds() - busy0) - (cpu_seconds(pids) - ours0)) / elapsed
        cell = summarise(
            prepared,
            samples,
            wall,
            server=name,
            clients=clients,
            peak=self.peaks[dtype],
            other_load_cores=other,
            server_cores=(cpu_seconds(server_pids) - server0) / elapsed,
            client_cores=(cpu_seconds([os.getpid()]) - client0) / elapsed,
        )
        if name == "service":
            after = scrape(server.base_url)
            delta = {k: after.get(k, 0.0) - before_metrics.get(k, 0.0) for k in after}
            batches = max(delta.get("reranker_batch_size_count", 0.0), 1.0)
            requests = max(delta.get("reranker_request_tokenization_seconds_count", 0.0), 1.0)
            forward_s = delta.get("reranker_inference_duration_seconds_sum", 0.0)
            cell.server_extra = {
                "model_busy_share": forward_s / wall,
                "mean_batch_pairs": delta.get("reranker_batch_size_sum", 0.0) / batches,
                # Padded tokens and milliseconds of the service's average forward pass: set beside the engine
                # alone's ms per batch, they say whether the forward passes or the feeding fall short.
                "mean_batch_tokens": delta.get("reranker_batch_tokens_sum", 0.0) / batches,
                "mean_batch_ms": 1000 * forward_s / batches,
                "batch_padding_share": 1
                - delta.get("reranker_tokens_scored_total", 0.0)
                / max(delta.get("reranker_batch_tokens_sum", 0.0), 1.0),
                # Per request: tokenising in the HTTP worker, waiting for the first forward pass, then scoring.
                "tokenize_ms": 1000 * delta.get("reranker_request_tokenization_seconds_sum", 0.0) / requests,
                "queue_ms": 1000 * delta.get("reranker_request_queue_seconds_sum", 0.0) / requests,
                "inference_ms": 1000 * delta.get("reranker_request_inference_seconds_sum", 0.0) / requests,
            }
        self.samples[(prepared.workload.name, clients, name)] = samples
        logger.info(
            "%s %s clients=%d: %.2f pairs/s, p50 %.0f ms, %d errors, server %.2f cores, load generator %.2f, "
            "other load %.2f",
            prepared.workload.name,
            name,
            clients,
            cell.pairs_per_s,
            cell.p50_ms,
            cell.errors,
            cell.server_cores,
            cell.client_cores,
            other,
        )
        return cell

    def run_workload(self, prepared: PreparedWorkload, clients_list: list[int]) -> None:
        # The long-chunk setting asks for the service's own windowing, which the others do not have.
        others = [name for name in ("baseline", "infinity") if name in self.servers and prepared.workload.baseline]
        names = [*others, "service"]
        for name in names:  # one unmeasured request: first-shape costs stay out of the figures
            httpx.post(
                f"{self.servers[name].base_url}/v1/rerank",
                content=prepared.bodies[-1],
                headers={"content-type": "application/json"},
                timeout=900,
            )
        for clients in clients_list:
            cells = {name: self.run_cell(prepared, clients, name) for name in names}
            if "baseline" in cells:
                base, ours = cells["baseline"], cells["service"]
                ours.ratio_to_baseline = ours.pairs_per_s / base.pairs_per_s if base.pairs_per_s else None
                ours.latency_ratio_to_baseline = ours.p50_ms / base.p50_ms if base.p50_ms else None
            if "infinity" in cells and cells["infinity"].pairs_per_s:
                cells["service"].ratio_to_infinity = cells["service"].pairs_per_s / cells["infinity"].pairs_per_s
            self.cells.extend(cells.values())

    def samples_of(self, workload: str, server: str) -> list[Any]:
        return [
            sample
            for (name, _, which), samples in self.samples.items()
            if name == workload and which == server
            for sample in samples
        ]

    def memory_check(self) -> dict[str, Any]:
        """Peak RSS of each server's largest process while it scores 128 documents truncated to 512 tokens."""
        documents = [make_words(600, seed=50_000 + i) for i in range(128)]
        body = json.dumps(
            {"model": "bench", "query": make_words(12, seed=1), "documents": documents, "top_n": 128}
        ).encode()
        out: dict[str, Any] = {}
        for name, server in self.servers.items():
            with RssSampler(server.process.pid) as idle:
                time.sleep(0.5)
            with RssSampler(server.process.pid) as busy:
                started = time.perf_counter()
                response = httpx.post(
                    f"{server.base_url}/v1/rerank",
                    content=body,
                    timeout=1800,
                    headers={"content-type": "application/json"},
                )
                seconds = time.perf_counter() - started
            out[name] = {
                "status": response.status_code,
                "seconds": seconds,
                "idle_rss_mib": idle.peak / 2**20,
                "peak_rss_mib": busy.peak / 2**20,
            }
            logger.info(
                "memory %s: 128 x 512 tokens in %.1fs, RSS %.0f MiB idle, %.0f MiB peak",
                name,
                seconds,
                idle.peak / 2**20,
                busy.peak / 2**20,
            )
        return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    workload_names = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = [name for name in workload_names if name not in WORKLOADS]
    if unknown:
        print(f"unknown settings {unknown}; known: {list(WORKLOADS)}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    model_dir = ensure_model(args.cache_dir)
    shape = ModelShape.from_model_dir(model_dir)
    encoder = load_encoder(model_dir)
    prepared = {name: prepare(WORKLOADS[name], args.distinct_requests, encoder, shape) for name in workload_names}
    facts = machine_facts(device)
    logger.info("machine: %s", facts)
    workdir = Path(tempfile.mkdtemp(prefix="reranker-bench-"))
    bench = Bench(args, device, model_dir, workdir)
    try:
        bench.start()
        bench.measure_peaks()
        memory = {} if args.no_memory else bench.memory_check()
        for name in workload_names:
            clients = int_list(args.long_clients if name.startswith("long") else args.clients)
            bench.run_workload(prepared[name], clients)
        bench.measure_peaks()
    finally:
        bench.stop()
    # The fractions of peak use the final (best) peaks.
    for cell in bench.cells:
        cell.peak_fraction = cell.model_flops_per_s / bench.peaks[bench.dtypes[cell.server]]
    facts["load_average_at_end"] = os.getloadavg()

    print_cells(bench.cells, bench.peaks)
    accuracy = []
    for server in ("service", "infinity"):
        for name in workload_names:
            base = bench.samples_of(name, "baseline")
            result = compare_scores(name, bench.samples_of(name, server), base)
            if result:
                accuracy.append((server, result))
    if accuracy:
        print("\nScore accuracy vs the float32 baseline on the same requests (scores in [0, 1]):")
        for server, a in accuracy:
            print(
                f"  {server:<9}{a.workload:<11} {a.documents} documents in {a.requests} requests: max |diff| "
                f"{a.max_abs_score_diff:.4f}, mean {a.mean_abs_score_diff:.4f} (fp32 scores spread with std "
                f"{a.fp32_score_std:.3f}); order of {a.separated_pairs} clearly separated pairs (gap > 0.02): "
                f"{a.separated_pairs - a.separated_order_mismatches} same, {a.separated_order_mismatches} "
                f"swapped; top-1 same in {a.top1_matches}/{a.requests}"
            )
    chunking = chunk_cost(bench.cells)
    if chunking:
        print(
            f"\nChunking long documents (service, {chunking['clients']} clients): "
            f"{chunking['truncate_pairs_per_s']:.2f} documents/s truncated vs {chunking['chunk_pairs_per_s']:.2f}"
            f" chunked ({chunking['windows_per_document']:.1f} windows each): {chunking['slowdown']:.1f}x the "
            f"cost, p50 {chunking['truncate_p50_ms']:.0f} -> {chunking['chunk_p50_ms']:.0f} ms"
        )
    if memory:
        print("\nMemory, one request of 128 documents x 512 tokens (largest process of each server):")
        for name, m in memory.items():
            print(
                f"  {name:<9} HTTP {m['status']} in {m['seconds']:.1f}s; RSS {m['idle_rss_mib']:.0f} MiB idle, "
                f"{m['peak_rss_mib']:.0f} MiB peak"
            )
    targets = check_targets(bench.cells)
    if targets:
        print("\nTargets (target setting):")
        for line in targets:
            print(f"  {line}")
    print(f"\nLoad average at start {facts['load_average_at_start']}, at end {facts['load_average_at_end']}")

    results = {
        "command": " ".join(["python -m bench.run", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "machine": facts,
        "model": {"dir": str(model_dir), **asdict(shape)},
        "matmul_peak_flops": bench.peaks,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "service_workers": bench.service_workers,
        "cells": [as_json(c) for c in bench.cells],
        "accuracy": [{"server": server, **as_json(a)} for server, a in accuracy],
        "chunking": chunking,
        "memory": memory,
        "targets": targets,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nResults: {args.json}")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    if plot(bench.cells, args.plot):
        print(f"Plot: {args.plot}")
    else:
        print("Plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
    errors = sum(c.errors for c in bench.cells)
    return 1 if errors else 0


def chunk_cost(cells: list[Cell]) -> dict[str, float] | None:
    by = {(c.workload, c.clients): c for c in cells if c.server == "service"}
    for (workload, clients), chunked in by.items():
        truncated = by.get(("long", clients))
        if workload == "long-chunk" and truncated and chunked.pairs_per_s:
            return {
                "clients": clients,
                "truncate_pairs_per_s": truncated.pairs_per_s,
                "chunk_pairs_per_s": chunked.pairs_per_s,
                "windows_per_document": chunked.windows_per_s / chunked.pairs_per_s,
                "slowdown": truncated.pairs_per_s / chunked.pairs_per_s,
                "truncate_p50_ms": truncated.p50_ms,
                "chunk_p50_ms": chunked.p50_ms,
            }
    return None


def infinity_executable(choice: str) -> str | None:
    if choice == "off":
        return None
    if choice == "auto":
        return shutil.which("infinity_emb")
    return choice


def check_targets(cells: list[Cell]) -> list[str]:
    ours = {c.clients: c for c in cells if c.workload == "target" and c.server == "service"}
    lines = []
    for clients in (4, 16):
        c = ours.get(clients)
        if c and c.ratio_to_infinity is not None:
            verdict = "met" if c.ratio_to_infinity >= 1.5 else "NOT met"
            lines.append(f"{clients} clients: {c.ratio_to_infinity:.2f}x Infinity's pairs/s (want >= 1.5x): {verdict}")
    for clients, wanted in ((4, 4.0), (16, 5.0)):
        c = ours.get(clients)
        if c and c.ratio_to_baseline is not None:
            verdict = "met" if c.ratio_to_baseline >= wanted else "NOT met"
            lines.append(
                f"{clients} clients: {c.ratio_to_baseline:.2f}x the baseline's pairs/s (want >= {wanted}x): {verdict}"
            )
    c = ours.get(1)
    if c and c.latency_ratio_to_baseline is not None:
        verdict = "met" if c.latency_ratio_to_baseline <= 0.25 else "NOT met"
        lines.append(f"1 client: p50 {c.latency_ratio_to_baseline:.2f}x the baseline's (want <= 0.25x): {verdict}")
    if 1 in ours and max(ours) > 1:
        top = ours[max(ours)]
        verdict = "met" if top.pairs_per_s >= 0.95 * ours[1].pairs_per_s else "NOT met"
        lines.append(
            f"pairs/s from 1 to {top.clients} clients: {ours[1].pairs_per_s:.2f} -> {top.pairs_per_s:.2f}"
            f" (must not drop; 5% noise allowed): {verdict}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
