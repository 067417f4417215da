"""What a host's HTTP workers can feed an engine, by worker count: the ceiling no GPU gets past.

    python -m bench.frontend --workers 1,2,4 --clients 16,64

With engine processes, HTTP workers parse each request, tokenise it, pack its pairs, hand them to the engine
and build the answer; the engine only batches and runs the model. This runs exactly that service
(``python -m app``, ``RERANKER_ENGINE=process``) on the simulated accelerator with almost no device time, so
the figures are the workers' alone: pairs/s and requests/s at each worker and client count, the workers' CPU
per request, each worker's resident memory (with engine processes a worker holds a tokenizer, not the model),
and the host's cores. On a GPU host it says how many workers its GPU needs: bge-reranker-base's engine alone
does ~7,300 ``gpu64`` pairs/s on an H100 (``bench/engine_alone.py``), which one front end must deliver for the
service to reach the engine's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.driver import drive_raw
from bench.model import ensure_model
from bench.servers import cpu_seconds, rss_bytes, start_service
from bench.workloads import WORKLOADS

# The simulated device with next to no device time and one short launch a batch: the engine is never the limit.
NEAR_FREE_DEVICE = {
    "RERANKER_BACKEND": "simulated",
    "RERANKER_ENGINE": "process",
    "RERANKER_SIMULATED_TOKEN_US": "0.01",
    "RERANKER_SIMULATED_LAUNCHES": "1",
    "RERANKER_SIMULATED_LAUNCH_US": "10",
}


def measure_workers(
    model_dir: Path, workdir: Path, *, workers: int, clients: list[int], workload: str, duration_s: float
) -> dict[str, object]:
    bodies = [json.dumps(body).encode() for body in WORKLOADS[workload].bodies(32)]
    documents = WORKLOADS[workload].documents
    server = start_service(
        model_dir, workdir, device="cpu", workers=workers, ready_timeout=300, settings=NEAR_FREE_DEVICE
    )
    try:
        url = f"{server.base_url}/v1/rerank"
        worker_pids = [pid for pid in server.worker_pids() if "gunicorn" in Path(f"/proc/{pid}/cmdline").read_text()]
        # Every worker's first requests (connections, first shapes) out of the figures.
        asyncio.run(drive_raw(url, bodies, clients=2 * workers, duration_s=1, max_requests=200, timeout_s=120))
        cells = []
        for count in clients:
            before = cpu_seconds(worker_pids)
            samples, wall = asyncio.run(
                drive_raw(url, bodies, clients=count, duration_s=duration_s, max_requests=100_000, timeout_s=120)
            )
            used = cpu_seconds(worker_pids) - before
            failed = sum(sample.status != 200 for sample in samples)
            latencies = sorted(sample.latency for sample in samples)
            cells.append(
                {
                    "clients": count,
                    "requests_per_s": round(len(samples) / wall, 1),
                    "pairs_per_s": round(documents * len(samples) / wall),
                    "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                    "worker_cpu_ms_per_request": round(1000 * used / len(samples), 2),
                    "worker_cores": round(used / wall, 2),
                    "failed": failed,
                }
            )
        rss = [rss_bytes(pid) for pid in worker_pids]
        return {"workers": workers, "cells": cells, "worker_rss_mib": round(statistics.mean(rss) / 2**20)}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--clients", default="16,64", help="concurrent clients, comma-separated")
    parser.add_argument("--workload", default="gpu64", choices=sorted(WORKLOADS))
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/reranker-bench"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model_dir = ensure_model(args.cache_dir)
    clients = [int(count) for count in args.clients.split(",")]
    cores = len(os.sched_getaffinity(0))
    results = []
    with tempfile.TemporaryDirectory(prefix="frontend-") as tmp:
        for workers in (int(count) for count in args.workers.split(",")):
            workdir = Path(tmp) / f"w{workers}"
            workdir.mkdir()
            result = measure_workers(
                model_dir, workdir, workers=workers, clients=clients, workload=args.workload, duration_s=args.duration
            )
            results.append(result)
            for cell in result["cells"]:  # type: ignore[attr-defined]
                print(
                    f"{args.workload}, {workers} worker(s), {cell['clients']} clients: {cell['pairs_per_s']} pairs/s "
                    f"({cell['requests_per_s']} requests/s, p50 {cell['p50_ms']} ms), workers' CPU "
                    f"{cell['worker_cpu_ms_per_request']} ms a request ({cell['worker_cores']} cores), "
                    f"{cell['failed']} failed; {result['worker_rss_mib']} MiB a worker",
                    flush=True,
                )
    print(f"({cores} cores; the simulated device with almost no device time: the workers are the limit)")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "workload": args.workload, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
