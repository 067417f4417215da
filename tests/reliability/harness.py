"""Load, metrics and process helpers shared by the reliability tests and ``scripts/soak.py``.

Everything here talks to 127.0.0.1 only, and every load it makes is bounded in clients and time.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.model_factory import WORDS

# Transport failures a client may see when the process serving it dies: the request never got an answer.
CONNECTION_ERRORS = (httpx.TransportError,)


# ---------------------------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus exposition text → (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
    return sum(
        value
        for sample, sample_labels, value in parse_metrics(text)
        if sample == name and all(sample_labels.get(key) == wanted for key, wanted in labels.items())
    )


def scrape(base_url: str, **headers: str) -> str:
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    return response.text


def wait_for(condition: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str = "") -> float:
    """Poll ``condition`` until it holds; return the seconds it took, or fail after ``timeout``."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------- processes


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- bodies


def words(count: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def make_bodies(
    count: int, *, documents: tuple[int, int] = (10, 60), doc_words: tuple[int, int] = (5, 60), seed: int = 0
) -> list[dict[str, Any]]:
    """Distinct rerank bodies of in-vocabulary text (one word ≈ one token of the tiny model)."""
    rng = random.Random(seed)
    return [
        {
            "model": "any",
            "query": words(rng.randint(3, 12), rng),
            "documents": [words(rng.randint(*doc_words), rng) for _ in range(rng.randint(*documents))],
        }
        for _ in range(count)
    ]


def scores_of(answer: dict[str, Any]) -> dict[int, float]:
    return {item["index"]: item["relevance_score"] for item in answer["results"]}


def same_scores(answer: dict[str, Any], expected: dict[int, float], *, tolerance: float = 1e-4) -> bool:
    """The answer ranks every document and scores each as the reference did (float32: batching never matters)."""
    got = scores_of(answer)
    if set(got) != set(expected):
        return False
    if any(not math.isfinite(score) or not 0.0 <= score <= 1.0 for score in got.values()):
        return False
    ordered = [item["relevance_score"] for item in answer["results"]]
    if ordered != sorted(ordered, reverse=True):
        return False
    return all(abs(got[index] - expected[index]) <= tolerance for index in expected)


def reference_scores(base_url: str, bodies: Iterable[dict[str, Any]], **headers: str) -> list[dict[int, float]]:
    """Each body's scores, asked one at a time on an idle server."""
    out = []
    with httpx.Client(base_url=base_url, timeout=60, headers=headers) as client:
        for body in bodies:
            response = client.post("/v1/rerank", json=body)
            response.raise_for_status()
            out.append(scores_of(response.json()))
    return out


# ------------------------------------------------------------------------------------------------- load


@dataclass
class Outcome:
    started: float  # monotonic seconds
    ended: float
    request_id: str
    status: int | None = None  # None: no HTTP answer (connection error)
    error: str | None = None  # exception class name for transport errors
    correct: bool | None = None  # for 200s: did the scores match the reference?
    retry_after: str | None = None
    envelope_ok: bool | None = None  # for errors: was it the service's error envelope?

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def statuses(self) -> Counter[int | str]:
        return Counter(o.status if o.status is not None else str(o.error) for o in self.outcomes)

    def ok(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.status == 200]

    def wrong(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.status == 200 and not outcome.correct]

    def failed(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.status is None]

    def latency_ms(self, quantile: float) -> float:
        latencies = sorted(outcome.latency for outcome in self.ok())
        if not latencies:
            return float("nan")
        return 1000 * latencies[min(len(latencies) - 1, int(quantile * len(latencies)))]

    def summary(self) -> str:
        rate = len(self.ok()) / self.duration if self.duration else 0.0
        return (
            f"{len(self.outcomes)} requests in {self.duration:.1f}s, statuses {dict(self.statuses())}, "
            f"{rate:.1f} ok/s, p50 {self.latency_ms(0.5):.0f} ms, p99 {self.latency_ms(0.99):.0f} ms, "
            f"wrong answers {len(self.wrong())}"
        )


class LoadGenerator:
    """``clients`` threads, each with its own keep-alive connection, posting bodies back to back.

    Runs until :meth:`stop` (or ``duration_s``); every request is recorded as an :class:`Outcome`. Each request
    carries its own ``X-Request-ID`` so it can be found in the server's log.
    """

    def __init__(
        self,
        base_url: str,
        bodies: list[dict[str, Any]],
        expected: list[dict[int, float]],
        *,
        clients: int,
        path: str = "/v1/rerank",
        headers: dict[str, str] | None = None,
        timeout: float = 60,
        pause_s: float = 0.0,
    ) -> None:
        self.base_url = base_url
        self.bodies = bodies
        self.expected = expected
        self.clients = clients
        self.path = path
        self.headers = headers or {}
        self.timeout = timeout
        self.pause_s = pause_s
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> LoadGenerator:
        self.result.started = time.monotonic()
        for number in range(self.clients):
            thread = threading.Thread(target=self._client, args=(number,), daemon=True, name=f"load-{number}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)
        self.result.ended = time.monotonic()
        return self.result

    def run_for(self, seconds: float) -> LoadResult:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def _client(self, number: int) -> None:
        rng = random.Random(number)
        client = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers)
        try:
            while not self._stop.is_set():
                choice = rng.randrange(len(self.bodies))
                outcome = self._one(client, choice)
                with self._lock:
                    self.result.outcomes.append(outcome)
                if outcome.status is None:
                    # The connection is gone: start a fresh client, as a pool would.
                    client.close()
                    client = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers)
                if self.pause_s:
                    time.sleep(self.pause_s)
        finally:
            client.close()

    def _one(self, client: httpx.Client, choice: int) -> Outcome:
        request_id = uuid.uuid4().hex
        outcome = Outcome(started=time.monotonic(), ended=0.0, request_id=request_id)
        try:
            response = client.post(self.path, json=self.bodies[choice], headers={"X-Request-ID": request_id})
        except CONNECTION_ERRORS as error:
            outcome.ended = time.monotonic()
            outcome.error = type(error).__name__
            return outcome
        outcome.ended = time.monotonic()
        outcome.status = response.status_code
        if response.status_code == 200:
            outcome.correct = same_scores(response.json(), self.expected[choice])
        else:
            outcome.retry_after = response.headers.get("retry-after")
            try:
                error = response.json()["error"]
                outcome.envelope_ok = error["code"] == response.status_code and bool(error["message"])
            except (ValueError, KeyError, TypeError):
                outcome.envelope_ok = False
        return outcome


Probe = tuple[str, int | str, float]  # path, HTTP status or error name, seconds


def leave_during_backlog(base_url: str, *, request_id: str = "leaver") -> tuple[float, float]:
    """A client leaves while its pairs wait: returns (pairs cancelled, pairs scored) meanwhile.

    Meant for a server that runs one pair per forward pass (RERANKER_MAX_BATCH_PAIRS=1): 4 × 400 background pairs
    make a backlog of about a second; then a client sends 150 pairs and gives up after 0.3 s. Its documents are
    longer than the backlog's, so sorted by length they would run last even in the same round. The background
    requests must all be answered with their reference scores.
    """
    background = make_bodies(4, documents=(400, 400), doc_words=(10, 20), seed=5)
    leaver = make_bodies(1, documents=(150, 150), doc_words=(100, 120), seed=6)[0]
    expected = reference_scores(base_url, background)
    before = scrape(base_url)
    with ThreadPoolExecutor(len(background)) as pool:
        futures = [pool.submit(httpx.post, f"{base_url}/v1/rerank", json=body, timeout=60) for body in background]
        wait_for(
            lambda: (
                metric(scrape(base_url), "reranker_documents_total") - metric(before, "reranker_documents_total")
                >= 1600
            ),
            timeout=30,
            interval=0.02,
            what="the backlog",
        )
        try:
            httpx.post(f"{base_url}/v1/rerank", json=leaver, timeout=0.3, headers={"X-Request-ID": request_id})
        except httpx.TimeoutException:
            pass
        else:
            raise AssertionError("the leaving client was answered within 0.3 s: there was no backlog to leave")
        answers = [future.result() for future in futures]
    assert all(a.status_code == 200 and same_scores(a.json(), e) for a, e in zip(answers, expected, strict=True))
    wait_for(lambda: metric(scrape(base_url), "reranker_queue_depth") == 0, timeout=10, what="an empty queue")
    after = scrape(base_url)
    cancelled = metric(after, "reranker_pairs_cancelled_total") - metric(before, "reranker_pairs_cancelled_total")
    scored = metric(after, "reranker_pairs_scored_total") - metric(before, "reranker_pairs_scored_total")
    return cancelled, scored


@contextlib.contextmanager
def probing_health(base_url: str, *, interval_s: float) -> Iterator[list[Probe]]:
    """Probe /health and /ready every ``interval_s`` in a thread while the block runs; yields the probes."""
    probes: list[Probe] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            for path in ("/health", "/ready"):
                started = time.monotonic()
                try:
                    status: int | str = httpx.get(f"{base_url}{path}", timeout=5).status_code
                except httpx.HTTPError as error:
                    status = type(error).__name__
                probes.append((path, status, time.monotonic() - started))
            time.sleep(interval_s)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        yield probes
    finally:
        stop.set()
        prober.join()


def sigterm_with_backlog(
    base_url: str,
    process: Any,
    bodies: list[dict[str, Any]],
    expected: list[dict[int, float]],
    *,
    accept_timeout: float,
    request_timeout: float,
) -> tuple[float, list[tuple[int, bool]], float]:
    """Send every body at once and, once the workers have accepted them all (parsed, counted, queued), send
    ``process`` SIGTERM. Returns the pairs queued at the signal, each request's (status, answer correct) and
    the monotonic time of the signal."""
    documents_before = metric(scrape(base_url), "reranker_documents_total")
    documents = sum(len(body["documents"]) for body in bodies)

    def one(index: int) -> tuple[int, bool]:
        response = httpx.post(f"{base_url}/v1/rerank", json=bodies[index], timeout=request_timeout)
        return response.status_code, response.status_code == 200 and same_scores(response.json(), expected[index])

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(one, index) for index in range(len(bodies))]
        wait_for(
            lambda: metric(scrape(base_url), "reranker_documents_total") - documents_before >= documents,
            timeout=accept_timeout,
            interval=0.02,
            what="all requests accepted",
        )
        queued = metric(scrape(base_url), "reranker_queue_depth")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        answers = [future.result() for future in futures]
    return queued, answers, signalled
