"""Benchmark a stack that is already running (a container, a remote host) by its URL: ``python -m bench.stack``.

The same RAGFlow-shaped requests and closed-loop clients as ``bench/run.py`` (``bench.workloads``,
``bench.driver``), but nothing is started here: it measures what the image actually runs, e.g.

    python -m bench.stack --url http://127.0.0.1:9300 --clients 1,4 --duration 30

Per client count: pairs scored per second, latency percentiles, errors. ``--json`` writes the figures.

``--container NAME`` also reads the container's CPU time (its cgroup, through ``docker exec``): the cores it used
and pairs per CPU-second, which stay comparable when other work shares the machine and pairs/s does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.driver import drive, percentile
from bench.workloads import WORKLOADS

logger = logging.getLogger("bench.stack")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stack", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the running service, e.g. http://127.0.0.1:9300")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="target")
    parser.add_argument("--clients", default="1,4", help="comma-separated concurrent client counts")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per client count")
    parser.add_argument("--requests", type=int, default=64, help="distinct request bodies, cycled")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (first-shape costs)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--container", default=None, help="docker container to read CPU time from (optional)")
    parser.add_argument("--pid", type=int, default=None, help="or a local server's process (and its children)")
    return parser.parse_args(argv)


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"bench.stack: {url}/ready did not answer 200 within {timeout:.0f}s")
        time.sleep(1)


def container_cpu_seconds(container: str) -> float:
    """CPU seconds the container has used: cgroup v2's cpu.stat, else v1's cpuacct.usage (nanoseconds)."""
    script = (
        "if [ -f /sys/fs/cgroup/cpu.stat ]; then awk '/^usage_usec/ {print $2 * 1000}' /sys/fs/cgroup/cpu.stat; "
        "else cat /sys/fs/cgroup/cpuacct/cpuacct.usage; fi"
    )
    out = subprocess.run(
        ["docker", "exec", container, "sh", "-c", script], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return float(out.split()[0]) / 1e9


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine spent busy (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        fields = [float(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields) - idle) / 100.0  # USER_HZ


def server_cpu_seconds(args: argparse.Namespace) -> float | None:
    if args.container:
        return container_cpu_seconds(args.container)
    if args.pid:
        from bench.servers import cpu_seconds, process_tree

        return cpu_seconds(process_tree(args.pid))
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/")
    wait_ready(url, args.ready_timeout)
    workload = WORKLOADS[args.workload]
    bodies = [json.dumps(body).encode() for body in workload.bodies(args.requests)]
    headers = {"content-type": "application/json"}
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    for body in bodies[: args.warmup]:
        response = httpx.post(f"{url}/v1/rerank", content=body, headers=headers, timeout=900)
        response.raise_for_status()
    cells = []
    for clients in [int(part) for part in args.clients.split(",") if part.strip()]:
        cpu0 = server_cpu_seconds(args)
        busy0, t0 = machine_busy_seconds(), time.perf_counter()
        samples, wall = asyncio.run(
            drive(
                f"{url}/v1/rerank",
                bodies,
                clients=clients,
                duration_s=args.duration,
                max_requests=args.max_requests,
                timeout_s=900,
            )
        )
        elapsed = time.perf_counter() - t0
        busy = machine_busy_seconds() - busy0
        ok = [sample for sample in samples if sample.status == 200]
        latencies = [sample.latency * 1000 for sample in ok]
        cell = {
            "clients": clients,
            "requests": len(samples),
            "errors": len(samples) - len(ok),
            "wall_s": round(wall, 2),
            "pairs_per_s": round(len(ok) * workload.documents / wall, 2) if wall else 0.0,
            "requests_per_s": round(len(ok) / wall, 3) if wall else 0.0,
            "p50_ms": round(percentile(latencies, 50), 1),
            "p90_ms": round(percentile(latencies, 90), 1),
            "p99_ms": round(percentile(latencies, 99), 1),
            "machine_busy_cores": round(busy / elapsed, 2),
        }
        cpu1 = server_cpu_seconds(args)
        if cpu0 is not None and cpu1 is not None:
            cores = (cpu1 - cpu0) / elapsed
            cell["server_cores"] = round(cores, 2)
            cell["other_load_cores"] = round(max(0.0, busy / elapsed - cores), 2)
            cell["pairs_per_cpu_s"] = round(cell["pairs_per_s"] / cores, 2) if cores else 0.0
        logger.info(
            "%s clients=%d: %.2f pairs/s, p50 %.0f ms, p90 %.0f ms, %d requests, %d errors, machine busy %.2f "
            "cores, server %s cores, %s pairs per CPU-second",
            workload.name,
            clients,
            cell["pairs_per_s"],
            cell["p50_ms"],
            cell["p90_ms"],
            cell["requests"],
            cell["errors"],
            cell["machine_busy_cores"],
            cell.get("server_cores", "?"),
            cell.get("pairs_per_cpu_s", "?"),
        )
        cells.append(cell)
    return {"url": url, "workload": workload.name, "description": workload.description, "cells": cells}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if any(cell["errors"] for cell in result["cells"]) else 0


if __name__ == "__main__":
    sys.exit(main())
