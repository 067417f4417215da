"""What a host's HTTP workers can feed an engine, by worker count: the ceiling no GPU gets past.

    python -m bench.frontend --workers 1,2,4 --clients 16,64

With engine processes, HTTP workers parse each request, tokenise it, pack its pairs, hand them to the engine
and build the answer; the engine only batches and runs the model. This runs exactly that service
(``python -m app``, ``RERANKER_ENGINE=process``) on the simulated accelerator with almost no device time, so
the figures are the workers' alone: pairs/s and requests/s at each worker and client count, the workers' CPU
per request, each worker's resident memory (with engine processes a worker holds a tokenizer, not the model),
and the host's cores. On a GPU host it says how many workers its GPU needs: bge-reranker-base's engine alone
does ~7,300 ``gpu64`` pairs/s on an H100 (``bench/engine_alone.py``), which one front end must deliver for the
service to reach the engine's rate. ``--profile`` (with py-spy) adds, for one worker in the middle client count,
how much of the time its GIL was held and where: near 100 % says the worker is bound by its GIL, not its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
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


PROFILE_RATE = 100  # samples a second


def py_spy() -> str | None:
    """The py-spy binary: on PATH, beside this python (a virtual environment's bin), or where ``pip install
    --target`` put a wheel's scripts (``<target>/bin``)."""
    found = shutil.which("py-spy")
    if found:
        return found
    for folder in [Path(sys.executable).parent, *(Path(entry) / "bin" for entry in sys.path)]:
        candidate = folder / "py-spy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def gil_profile(raw: Path, duration_s: float, top: int = 12) -> dict[str, object]:
    """From ``py-spy record --gil -f raw``: the share of the time some thread of the worker held the GIL, and
    where (innermost Python frame) it was held most."""
    places: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            places[stack.split(";")[-1]] += int(count)
    samples = sum(places.values())
    return {
        "gil_held_share": round(samples / (PROFILE_RATE * duration_s), 3),
        "top": [[place, round(count / samples, 3)] for place, count in places.most_common(top)] if samples else [],
    }


def measure_workers(
    model_dir: Path,
    workdir: Path,
    *,
    workers: int,
    clients: list[int],
    workload: str,
    duration_s: float,
    profile: bool = False,
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
        spy = py_spy() if profile else None
        raw, gil = workdir / "gil.txt", None
        for position, count in enumerate(clients):
            before = cpu_seconds(worker_pids)
            recorder = None
            if spy and position == len(clients) // 2:  # one worker, in a middle cell: who holds its GIL
                record = [spy, "record", "--gil", "--nonblocking", "-r", str(PROFILE_RATE), "-f", "raw"]
                record += ["-d", str(int(duration_s)), "-o", str(raw), "-p", str(worker_pids[0])]
                recorder = subprocess.Popen(
                    record,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            samples, wall = asyncio.run(
                drive_raw(url, bodies, clients=count, duration_s=duration_s, max_requests=100_000, timeout_s=120)
            )
            used = cpu_seconds(worker_pids) - before
            if recorder is not None and recorder.wait(timeout=60) == 0 and raw.is_file():
                gil = {"clients": count, **gil_profile(raw, int(duration_s))}
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
        result: dict[str, object] = {"workers": workers, "cells": cells}
        result["worker_rss_mib"] = round(statistics.mean(rss) / 2**20)
        if gil is not None:
            result["gil"] = gil
        return result
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
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with py-spy (on PATH or installed from a wheel): how much of the time one worker's GIL is held, and "
        "where, in the middle client count",
    )
    args = parser.parse_args(argv)
    if args.profile and py_spy() is None:
        print("--profile: no py-spy here (pip install py-spy); measuring without it", flush=True)
    model_dir = ensure_model(args.cache_dir)
    clients = [int(count) for count in args.clients.split(",")]
    cores = len(os.sched_getaffinity(0))
    results = []
    with tempfile.TemporaryDirectory(prefix="frontend-") as tmp:
        for workers in (int(count) for count in args.workers.split(",")):
            workdir = Path(tmp) / f"w{workers}"
            workdir.mkdir()
            result = measure_workers(
                model_dir,
                workdir,
                workers=workers,
                clients=clients,
                workload=args.workload,
                duration_s=args.duration,
                profile=args.profile,
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
            if gil := result.get("gil"):
                places = "; ".join(f"{place} {share:.0%}" for place, share in gil["top"][:6])  # type: ignore[index]
                print(
                    f"  one worker's GIL held {gil['gil_held_share']:.0%} of the time at {gil['clients']} clients "  # type: ignore[index]
                    f"(py-spy): {places}",
                    flush=True,
                )
    print(f"({cores} cores; the simulated device with almost no device time: the workers are the limit)")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "workload": args.workload, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
