"""Prometheus metrics, correct across gunicorn workers.

Multiprocess mode is the documented one: ``PROMETHEUS_MULTIPROC_DIR`` is set (and wiped) by ``python -m app``
before any worker starts, each worker writes its own files there, gunicorn's ``child_exit`` marks dead workers,
and ``/metrics`` merges the files into a fresh registry on every scrape. Without the variable (unit tests,
a single process) the default registry is served instead.

Everything about a model's work carries a ``model`` label: the served name (``RERANKER_MODEL_NAME``, or each name
of ``RERANKER_MODELS``); "" for requests refused before a model was chosen (a bad body, an unknown name, /health).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

REQUESTS = Counter(
    "reranker_requests", "HTTP requests by route, status and model.", ["route", "method", "status", "model"]
)
REQUEST_LATENCY = Histogram(
    "reranker_request_duration_seconds", "HTTP request latency.", ["route", "model"], buckets=LATENCY_BUCKETS
)
DOCUMENTS = Counter("reranker_documents", "Documents received in rerank requests.", ["model"])
PAIRS_SCORED = Counter("reranker_pairs_scored", "Query-document pairs (windows) run through the model.", ["model"])
TOKENS_SCORED = Counter("reranker_tokens_scored", "Tokens in the pairs run through the model (no padding).", ["model"])
PAIRS_CANCELLED = Counter(
    "reranker_pairs_cancelled", "Pairs dropped from the queue before any forward pass: their client left.", ["model"]
)
BATCH_SIZE = Histogram("reranker_batch_size", "Pairs per forward pass.", ["model"], buckets=SIZE_BUCKETS)
BATCH_TOKENS = Histogram(
    "reranker_batch_tokens",
    "Tokens per forward pass as it runs: padded (pairs × longest pair, or the CUDA graph shape it is padded to) or "
    "packed (its pairs' tokens, to the graph's bucket).",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "reranker_inference_duration_seconds", "Time of one forward pass.", ["model"], buckets=LATENCY_BUCKETS
)
# Where a request's time goes, per request (TEI's te_request_{tokenization,queue,inference}_duration split):
TOKENIZATION_SECONDS = Histogram(
    "reranker_request_tokenization_seconds",
    "Tokenising a request's pairs (HTTP worker).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
REQUEST_QUEUE_SECONDS = Histogram(
    "reranker_request_queue_seconds",
    "From a request's pairs entering the batcher to its first forward pass.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
REQUEST_INFERENCE_SECONDS = Histogram(
    "reranker_request_inference_seconds",
    "From a request's first forward pass to its last pair's score.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "reranker_queue_depth",
    "Pairs waiting for a forward pass, over all live workers.",
    ["model"],
    multiprocess_mode="livesum",
)
WORKERS_READY = Gauge(
    "reranker_ready_workers", "Workers whose model is loaded, warmed and healthy.", multiprocess_mode="livesum"
)
WORKERS_UP = Gauge("reranker_workers", "Live worker processes.", multiprocess_mode="livesum")
ENGINES_READY = Gauge(
    "reranker_engines",
    "Engine processes loaded and serving (one per GPU; 0 when the model runs inline).",
    multiprocess_mode="livesum",
)
REJECTED = Counter("reranker_rejected", "Requests refused before scoring, by reason and model.", ["reason", "model"])


def render_metrics() -> tuple[bytes, str]:
    """The exposition text for one scrape, merged over all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
