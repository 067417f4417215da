"""The load generator: N concurrent clients posting prepared requests for a bounded time, and what came back."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx


@dataclass(frozen=True)
class Sample:
    request: int  # position in the workload's request list
    started: float
    finished: float
    status: int  # 0 when the connection failed or timed out
    scores: list[float] | None  # per document, in the request's order

    @property
    def latency(self) -> float:
        return self.finished - self.started


def scores_by_document(payload: object) -> list[float] | None:
    """Scores in document order from either server's answer: ``results`` (ours) or the seed's ``data``."""
    if not isinstance(payload, dict):
        return None
    if "results" in payload:
        items, key = payload["results"], "relevance_score"
    elif "data" in payload:
        items, key = payload["data"], "score"
    else:
        return None
    scores: dict[int, float] = {item["index"]: float(item[key]) for item in items}
    return [scores[i] for i in range(len(scores))]


async def drive(
    url: str, bodies: list[bytes], *, clients: int, duration_s: float, max_requests: int, timeout_s: float
) -> tuple[list[Sample], float]:
    """Run ``clients`` closed-loop clients; return the samples and the wall time from first send to last answer.

    Each client sends its next request as soon as its previous one is answered, until ``duration_s`` has passed
    (every client completes at least one request) or ``max_requests`` have been sent. Requests are taken in
    order from ``bodies`` (cycling), so two servers driven alike answer the same requests.
    """
    samples: list[Sample] = []
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        begin = time.perf_counter()
        deadline = begin + duration_s

        async def client() -> None:
            nonlocal sent
            done = 0
            while sent < max_requests and (done == 0 or time.perf_counter() < deadline):
                position = sent
                sent += 1
                started = time.perf_counter()
                try:
                    response = await http.post(
                        url, content=bodies[position % len(bodies)], headers={"content-type": "application/json"}
                    )
                    status = response.status_code
                    scores = scores_by_document(response.json()) if status == 200 else None
                except (httpx.HTTPError, json.JSONDecodeError):
                    status, scores = 0, None
                samples.append(Sample(position, started, time.perf_counter(), status, scores))
                done += 1

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = max(s.finished for s in samples) - begin
    return sorted(samples, key=lambda s: s.request), wall


async def drive_raw(
    url: str, bodies: list[bytes], *, clients: int, duration_s: float, max_requests: int, timeout_s: float
) -> tuple[list[Sample], float]:
    """:func:`drive` with a minimal HTTP/1.1 client: one keep-alive connection per client, requests pre-built.

    httpx spends about a millisecond of Python per 100 KB request; at GPU rates (hundreds of requests/s) and on
    a 2-core test machine that is the load generator's limit, not the server's. Answers are read by their
    Content-Length (the service and the baseline always send one).
    """
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    samples: list[Sample] = []
    sent = 0
    begin = time.perf_counter()
    deadline = begin + duration_s

    async def client() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection(host, port)
        done = 0
        try:
            while sent < max_requests and (done == 0 or time.perf_counter() < deadline):
                position = sent
                sent += 1
                started = time.perf_counter()
                try:
                    writer.write(requests[position % len(requests)])
                    status, payload = await asyncio.wait_for(_read_response(reader), timeout_s)
                    scores = scores_by_document(json.loads(payload)) if status == 200 else None
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                    status, scores = 0, None
                samples.append(Sample(position, started, time.perf_counter(), status, scores))
                done += 1
                if status == 0:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = max(s.finished for s in samples) - begin
    return sorted(samples, key=lambda s: s.request), wall


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
