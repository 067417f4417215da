"""What the load generator itself costs: both clients of ``bench/driver.py`` against a server that answers at once.

    python -m bench.load_generator [--clients 4,16,64] [--seconds 4] [--workload gpu64]

A benchmark cell measures the server only while the client keeps up. The server here (a separate process) reads
each request and writes a prepared 64-result answer, so what limits the requests/s is the client: its CPU per
request, printed per client count. httpx's connection pool costs more per request the more connections it holds
(measured on a 2-vCPU machine with 80 KB ``gpu64`` bodies: 1.0 ms at 4 clients, 2.1 ms at 16, 7.9 ms at 64, so at
most ~130 requests/s at 64 clients), which is why ``bench/run.py`` drives the service with the raw client
(~0.1 ms whatever the number of clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from bench.driver import Sample, drive, drive_raw
from bench.workloads import WORKLOADS

ANSWER = json.dumps({"results": [{"index": i, "relevance_score": 0.5} for i in range(64)]}).encode()
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)

Driver = Callable[..., Coroutine[Any, Any, tuple[list[Sample], float]]]


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            writer.write(RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
        writer.close()


def _serve(listener: socket.socket) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_answer, sock=listener)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def measure(driver: Driver, url: str, bodies: list[bytes], clients: int, seconds: float) -> tuple[float, float]:
    """Requests/s and the client's CPU milliseconds per request."""
    cpu = time.process_time()
    samples, wall = asyncio.run(
        driver(url, bodies, clients=clients, duration_s=seconds, max_requests=10**7, timeout_s=60)
    )
    cpu = time.process_time() - cpu
    answered = sum(sample.status == 200 for sample in samples)
    if answered != len(samples):
        raise RuntimeError(f"{len(samples) - answered} of {len(samples)} requests failed")
    return answered / wall, 1000 * cpu / answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_generator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workload", default="gpu64", choices=sorted(WORKLOADS))
    args = parser.parse_args(argv)
    bodies = [json.dumps(body).encode() for body in WORKLOADS[args.workload].bodies(8)]
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/rerank"
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(listener,), daemon=True)
    server.start()
    try:
        print(f"{args.workload} bodies of ~{sum(map(len, bodies)) // len(bodies) // 1024} KB, answered at once")
        print(f"{'client':<8}{'clients':>8}{'requests/s':>12}{'client CPU ms/request':>23}")
        for name, driver in (("httpx", drive), ("raw", drive_raw)):
            for clients in [int(part) for part in args.clients.split(",")]:
                rate, cpu_ms = measure(driver, url, bodies, clients, args.seconds)
                print(f"{name:<8}{clients:>8}{rate:>12.0f}{cpu_ms:>23.2f}")
    finally:
        server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
