"""The rerank service: the one interface the HTTP layer depends on.

It owns a backend (loaded and warmed in :meth:`start`), the worker's dynamic batcher, and readiness. Requests
are encoded in a thread (tokenisation overlaps the forward pass running in the batcher's thread), their pairs
scored through the batcher, and window scores folded back into one score per document.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app import metrics
from app.batcher import DynamicBatcher
from app.config import LongDocuments, Settings
from app.engine.base import TRUNCATE, Backend, WindowPolicy
from app.errors import InvalidRequestError, NotReadyError, PayloadTooLargeError

logger = logging.getLogger(__name__)

HEALTH_CACHE_S = 2.0  # readiness probes within this window share one check (a tiny forward pass)


def sigmoid(logit: float) -> float:
    # Computed from the float32 logit in double precision: bf16/fp16 models never collapse to ties here.
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    exp = math.exp(logit)
    return exp / (1.0 + exp)


def _encode_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")


@dataclass(frozen=True, slots=True)
class DocumentScore:
    index: int
    logit: float
    relevance_score: float
    best_window: int  # which window of the document scored highest (0 when it had one)
    window_count: int
    truncated: bool  # some of its tokens were never scored


@dataclass(frozen=True, slots=True)
class RerankOutcome:
    documents: list[DocumentScore]  # in the request's order
    total_tokens: int  # every token of every scored pair, special tokens included


class RerankService:
    def __init__(self, settings: Settings, backend_factory: Callable[[], Backend]) -> None:
        self.settings = settings
        self._backend_factory = backend_factory
        self.backend: Backend | None = None
        self.batcher: DynamicBatcher | None = None
        self.state = "starting"  # starting → ready → draining; "failed" if loading failed
        self._encode_pool = _encode_pool()
        self._health_checked_at = -math.inf
        self._health_error: str | None = None
        self._health_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._health_error is None

    async def start(self) -> None:
        """Load and warm the model in a thread; raises (and the worker fails to boot) if it cannot."""
        started = time.perf_counter()
        # A fresh pool: stop() shut the previous one down, and an app may be started again in one process
        # (test clients run the lifespan once per client).
        self._encode_pool = _encode_pool()
        self._health_checked_at = -math.inf
        self._health_error = None
        try:
            backend = await asyncio.to_thread(self._backend_factory)
            await asyncio.to_thread(backend.warm_up)
        except Exception:
            self.state = "failed"
            raise
        self.backend = backend
        self.batcher = DynamicBatcher(
            backend.forward,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_batch_pairs=self.settings.max_batch_pairs,
            max_queue_pairs=self.settings.max_queue_pairs,
        )
        self.batcher.start()
        self.state = "ready"
        metrics.WORKERS_READY.set(1)
        logger.info("model ready in %.1fs (%s)", time.perf_counter() - started, backend.describe())

    async def stop(self) -> None:
        """Stop taking work and let queued pairs finish within the graceful timeout."""
        self.state = "draining"
        metrics.WORKERS_READY.set(0)
        if self.batcher is not None:
            await self.batcher.stop(timeout_s=self.settings.graceful_timeout)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)

    def window_policy(
        self,
        *,
        max_chunks_per_doc: int | None = None,
        overlap_tokens: int | None = None,
        max_tokens_per_doc: int | None = None,
        truncate_only: bool = False,
    ) -> WindowPolicy:
        """The long-document policy for one request: what it asked for, else the configured default."""
        settings = self.settings
        if truncate_only:
            return WindowPolicy(max_document_tokens=max_tokens_per_doc)
        chunking_asked = max_chunks_per_doc is not None or overlap_tokens is not None or max_tokens_per_doc is not None
        if not chunking_asked and settings.long_documents is LongDocuments.truncate:
            return TRUNCATE
        if max_chunks_per_doc is not None:
            max_windows = max_chunks_per_doc
        elif max_tokens_per_doc is not None:
            # Cohere v2 / vLLM: the first max_tokens_per_doc tokens count; cover them, within the request cap.
            max_windows = settings.max_windows_per_request
        else:
            max_windows = settings.default_max_chunks
        overlap = settings.default_overlap_tokens if overlap_tokens is None else overlap_tokens
        return WindowPolicy(max_windows=max_windows, overlap=overlap, max_document_tokens=max_tokens_per_doc)

    async def rerank(self, query: str, documents: Sequence[str], *, policy: WindowPolicy = TRUNCATE) -> RerankOutcome:
        if self.state != "ready" or self.backend is None or self.batcher is None:
            raise NotReadyError(f"the model is not ready ({self.state})")
        if not query.strip():
            raise InvalidRequestError("query must be a non-empty string", param="query")
        if not documents:
            return RerankOutcome([], 0)
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self._encode_pool, self.backend.encoder.encode, query, documents, policy)
        limit = self.settings.max_windows_per_request
        if len(encoded.pairs) > limit:
            metrics.REJECTED.labels("too_many_windows").inc()
            raise PayloadTooLargeError(
                f"this request needs {len(encoded.pairs)} scored windows; the limit is {limit} "
                "(RERANKER_MAX_WINDOWS_PER_REQUEST): send fewer documents or lower max_chunks_per_doc",
                param="documents",
            )
        logits = await self.batcher.score(encoded.pairs)
        results = []
        for index, (first, count) in enumerate(zip(encoded.first_pair, encoded.window_count, strict=True)):
            window_logits = logits[first : first + count]
            best = max(range(count), key=window_logits.__getitem__)
            logit = window_logits[best]
            results.append(DocumentScore(index, logit, sigmoid(logit), best, count, encoded.truncated[index]))
        return RerankOutcome(results, encoded.total_tokens)

    async def check_health(self) -> None:
        """Raise :class:`NotReadyError` unless the model is loaded, warmed and a tiny forward pass works."""
        if self.state != "ready" or self.backend is None:
            raise NotReadyError(f"the model is not ready ({self.state})")
        async with self._health_lock:
            if time.monotonic() - self._health_checked_at > HEALTH_CACHE_S:
                try:
                    await asyncio.to_thread(self.backend.check)
                    self._health_error = None
                except Exception as error:
                    self._health_error = f"{type(error).__name__}: {error}"
                    logger.error("readiness check failed: %s", self._health_error)
                self._health_checked_at = time.monotonic()
                metrics.WORKERS_READY.set(1 if self._health_error is None else 0)
        if self._health_error is not None:
            # The reason (paths, device errors) goes to the log only: /ready answers without an API key.
            raise NotReadyError("the model failed its health check; the server log says why")
