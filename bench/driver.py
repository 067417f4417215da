"""The load generator: N concurrent clients posting prepared requests for a bounded time, and what came back."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

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


async def drive(url: str, bodies: list[bytes], *, clients: int, duration_s: float, max_requests: int,
                timeout_s: float) -> tuple[list[Sample], float]:
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
                    response = await http.post(url, content=bodies[position % len(bodies)],
                                               headers={"content-type": "application/json"})
                    status = response.status_code
                    scores = scores_by_document(response.json()) if status == 200 else None
                except (httpx.HTTPError, json.JSONDecodeError):
                    status, scores = 0, None
                samples.append(Sample(position, started, time.perf_counter(), status, scores))
                done += 1

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = max(s.finished for s in samples) - begin
    return sorted(samples, key=lambda s: s.request), wall


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
