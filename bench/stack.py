"""Benchmark a stack that is already running (a container, a remote host) by its URL: ``python -m bench.stack``.

The same RAGFlow-shaped requests and closed-loop clients as ``bench/run.py`` (``bench.workloads``,
``bench.driver``), but nothing is started here: it measures what the image actually runs, e.g.

    python -m bench.stack --url http://127.0.0.1:9300 --clients 1,4 --duration 30

Per client count: pairs scored per second, latency percentiles, errors. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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
        }
        logger.info(
            "%s clients=%d: %.2f pairs/s, p50 %.0f ms, p90 %.0f ms, %d requests, %d errors",
            workload.name,
            clients,
            cell["pairs_per_s"],
            cell["p50_ms"],
            cell["p90_ms"],
            cell["requests"],
            cell["errors"],
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
