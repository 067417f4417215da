"""The rerank service: the one interface the HTTP layer depends on.

Requests are encoded in a thread (the tokenizer's Rust code releases the GIL), their pairs scored, and window
scores folded back into one score per document. Where the pairs are scored depends on the mode:

- inline: this worker owns a backend (loaded and warmed in :meth:`start`) and its dynamic batcher;
- engine processes (``engine_sockets`` given, see ``app/engine/process.py``): this worker holds only the pair
  encoder and sends encoded pairs, packed into numpy arrays in the same encode thread, to an engine process
  that batches them with every other worker's and runs the forward pass away from this process's GIL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app import metrics
from app.batcher import DynamicBatcher
from app.config import LongDocuments, Settings
from app.cpus import usable_cpus
from app.engine.base import TRUNCATE, Backend, EncodedRequest, PairEncoder, WindowPolicy
from app.engine.client import EngineClient
from app.engine.wire import PackedPairs, join_packed, pack_pairs
from app.errors import InvalidRequestError, NotReadyError, PayloadTooLargeError

logger = logging.getLogger(__name__)

HEALTH_CACHE_S = 2.0  # readiness probes within this window share one check (a tiny forward pass)
# With engine processes, a request's documents are tokenised in parts of at least this many, in parallel, on
# the encode threads that are free: an idle worker spreads one request over all of them (latency), a busy one
# gives each request one (no extra hand-offs when every thread already has work).
DOCUMENTS_PER_ENCODE_PART = 4


def encode_parts(documents: int, free_threads: int) -> list[slice]:
    """How a request of ``documents`` documents is cut for ``free_threads`` encode threads: parts of at least
    ``DOCUMENTS_PER_ENCODE_PART`` documents, at most one per free thread, in order."""
    parts = max(1, min(free_threads, documents // DOCUMENTS_PER_ENCODE_PART))
    size = -(-documents // parts)
    return [slice(start, start + size) for start in range(0, documents, size)]


def merge_encoded(parts: Sequence[EncodedRequest]) -> EncodedRequest:
    """One request's pairs from its parts, in order."""
    merged = EncodedRequest()
    for part in parts:
        merged.first_pair.extend(len(merged.pairs) + first for first in part.first_pair)
        merged.pairs.extend(part.pairs)
        merged.window_count.extend(part.window_count)
        merged.truncated.extend(part.truncated)
    return merged


def sigmoid(logit: float) -> float:
    # Computed from the float32 logit in double precision: bf16/fp16 models never collapse to ties here.
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    exp = math.exp(logit)
    return exp / (1.0 + exp)


def _encode_pool(threads: int = 2) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")


def encode_threads(*, with_engines: bool) -> int:
    """Tokenising threads per worker. Inline, two: the cores belong to the forward pass. With engine processes
    the host's cores do nothing else, and at GPU rates (a 64 x 256-token request is ~16k tokens, ~10-40 ms of
    one core) tokenising is what a worker spends its CPU on: one thread per core, in every worker, so that an
    idle worker spreads one request over all of them (an H100 host's cores tokenised a ``gpu64`` request in
    13.5 ms on 4 threads, 6.7 ms on 16). Busy workers do not pile up threads: ``encode_parts`` gives a request
    only the threads its worker has free."""
    if not with_engines:
        return 2
    return max(2, usable_cpus())


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
    # Where the request's time went, for the access log (the metrics have the same split):
    tokenize_s: float = 0.0  # tokenising (and packing) its pairs
    score_s: float = 0.0  # waiting for its scores: the batcher's queue, then the forward passes


class RerankService:
    def __init__(
        self,
        settings: Settings,
        backend_factory: Callable[[], Backend],
        *,
        engine_sockets: Sequence[Path] = (),
        encoder_factory: Callable[[], PairEncoder] | None = None,
    ) -> None:
        self.settings = settings  # this model's (Settings.for_model)
        self.name = settings.model_name  # the name clients send, and the metrics' model label
        self._backend_factory = backend_factory
        self._engine_sockets = list(engine_sockets)
        self._encoder_factory = encoder_factory
        self.backend: Backend | None = None  # inline only
        self.batcher: DynamicBatcher | None = None  # inline only
        self.engines: EngineClient | None = None  # with engine processes only
        self.encoder: PairEncoder | None = None
        self.state = "starting"  # starting → ready → draining; "failed" if loading failed
        self._encode_threads = 2
        self._encode_parts_running = 0  # parts handed to the encode threads and not yet done
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
        self._encode_threads = encode_threads(with_engines=bool(self._engine_sockets))
        self._encode_pool = _encode_pool(self._encode_threads)
        self._health_checked_at = -math.inf
        self._health_error = None
        if self._engine_sockets:
            await self._start_with_engines(started)
            return
        try:
            backend = await asyncio.to_thread(self._backend_factory)
            await asyncio.to_thread(backend.warm_up)
        except Exception:
            self.state = "failed"
            raise
        self.backend = backend
        self.encoder = backend.encoder
        self.batcher = DynamicBatcher(
            backend.forward,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_batch_pairs=self.settings.max_batch_pairs,
            max_queue_pairs=self.settings.max_queue_pairs,
            batch_tokens=backend.batch_tokens,
            model=self.name,
        )
        self.batcher.start()
        self.state = "ready"
        logger.info("model %s ready in %.1fs (%s)", self.name, time.perf_counter() - started, backend.describe())

    async def _start_with_engines(self, started: float) -> None:
        """Build the encoder (tokenizer only) and wait until the engine processes answer."""
        if self._encoder_factory is None:
            raise RuntimeError("engine processes need an encoder factory")
        try:
            encoder = await asyncio.to_thread(self._encoder_factory)
            engines = EngineClient(
                self._engine_sockets, encoder=encoder, max_queue_pairs=self.settings.max_queue_pairs, model=self.name
            )
            # The engines load and warm the model meanwhile: as long as the worker may stay silent.
            await engines.start(timeout_s=self.settings.worker_timeout)
        except Exception:
            self.state = "failed"
            raise
        self.encoder, self.engines = encoder, engines
        self.state = "ready"
        facts = [connection.facts.get("describe") for connection in engines.connections]
        logger.info(
            "model %s ready in %.1fs with %d engine process(es): %s",
            self.name,
            time.perf_counter() - started,
            len(facts),
            facts,
        )

    def model_facts(self) -> dict[str, str]:
        """What was loaded and how it runs (the backend's ``describe()``: architecture, labels, max length,
        dtype, device), for ``/v1/models`` and ``/info``; empty until the model is ready."""
        if self.backend is not None:
            return dict(self.backend.describe())
        if self.engines is not None and self.engines.connections:
            return dict(self.engines.connections[0].facts.get("describe") or {})
        return {}

    async def stop(self) -> None:
        """Stop taking work and let queued pairs finish within the graceful timeout."""
        self.state = "draining"
        if self.batcher is not None:
            await self.batcher.stop(timeout_s=self.settings.graceful_timeout)
        if self.engines is not None:
            # Draining: what this worker sent is answered (the engines outlive the workers) before it closes.
            deadline = time.monotonic() + self.settings.graceful_timeout
            while self.engines.pending_pairs and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await self.engines.stop()
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

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        chunking: Mapping[str, int | None] | None = None,
        truncate_only: bool = False,
        policy: WindowPolicy | None = None,
        instruction: str | None = None,
    ) -> RerankOutcome:
        """Score one request: ``chunking`` is what it asked for long documents (``window_policy``'s arguments;
        absent: the configured default), or ``policy`` says exactly; ``instruction`` replaces an LLM reranker's
        default instruction. The query is already validated."""
        if self.state != "ready" or self.encoder is None:
            raise NotReadyError(f"the model is not ready ({self.state})")
        if instruction is not None and not self.encoder.takes_instruction:
            raise InvalidRequestError(
                f"this model is scored by the {self.encoder.recipe} recipe, which takes no instruction: leave "
                "instruction out",
                param="instruction",
            )
        if policy is None:
            policy = self.window_policy(**(chunking or {}), truncate_only=truncate_only)
        if not documents:
            return RerankOutcome([], 0)
        started = time.perf_counter()
        if self.engines is not None:
            encoded, logits, tokenized = await self._encode_and_score(
                self.engines, query, documents, policy, instruction
            )
        elif self.batcher is not None:
            loop = asyncio.get_running_loop()
            encode = functools.partial(self.encoder.encode, query, documents, policy, instruction=instruction)
            encoded = await loop.run_in_executor(self._encode_pool, encode)
            tokenized = time.perf_counter()
            self._check_window_count(len(encoded.pairs))
            logits = await self.batcher.score(encoded.pairs)
        else:
            raise NotReadyError(f"the model is not ready ({self.state})")
        metrics.TOKENIZATION_SECONDS.labels(self.name).observe(tokenized - started)
        scored = time.perf_counter()
        results = []
        for index, (first, count) in enumerate(zip(encoded.first_pair, encoded.window_count, strict=True)):
            window_logits = logits[first : first + count]
            best = max(range(count), key=window_logits.__getitem__)
            logit = window_logits[best]
            results.append(DocumentScore(index, logit, sigmoid(logit), best, count, encoded.truncated[index]))
        return RerankOutcome(results, encoded.total_tokens, tokenize_s=tokenized - started, score_s=scored - tokenized)

    def _check_window_count(self, windows: int) -> None:
        limit = self.settings.max_windows_per_request
        if windows > limit:
            metrics.REJECTED.labels("too_many_windows", self.name).inc()
            raise PayloadTooLargeError(
                f"this request needs {windows} scored windows; the limit is {limit} "
                "(RERANKER_MAX_WINDOWS_PER_REQUEST): send fewer documents or lower max_chunks_per_doc",
                param="documents",
            )

    async def _encode_and_score(
        self,
        engines: EngineClient,
        query: str,
        documents: Sequence[str],
        policy: WindowPolicy,
        instruction: str | None = None,
    ) -> tuple[EncodedRequest, list[float], float]:
        """Tokenise and pack in the encode threads, off the event loop, and score on the engines: the pairs, their
        logits, and when tokenising ended.

        A large request is split into parts tokenised in parallel (the tokenizer releases the GIL): 64 documents
        of 256 tokens are ~16k tokens, tens of milliseconds of one core, more than the GPU's whole batch. A busy
        worker gives each request one part. The parts go to the engine as one request. Sent part by part as each
        was tokenised, they reached the GPU at nearly the same moment anyway and ran as more, smaller batches: on
        an H100, gpu64 at one client ran ~15-pair batches instead of a 56 and an 8, with p50 21.6 ms against 19.7,
        and 4 clients got 4,538 pairs/s against 6,108 (runs of ``bench.gpu`` on different days, packing changed
        between them too).
        """
        assert self.encoder is not None
        encoder, loop = self.encoder, asyncio.get_running_loop()
        parts = encode_parts(len(documents), self._encode_threads - self._encode_parts_running)
        self._encode_parts_running += len(parts)
        try:
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._encode_pool, self._encode_and_pack, encoder, query, documents[part], policy, instruction
                    )
                    for part in parts
                )
            )
        finally:
            self._encode_parts_running -= len(parts)
        tokenized = time.perf_counter()
        encoded = merge_encoded([part for part, _ in results])
        self._check_window_count(len(encoded.pairs))
        logits = await engines.score(join_packed([packed for _, packed in results]), len(encoded.pairs))
        return encoded, logits, tokenized

    @staticmethod
    def _encode_and_pack(
        encoder: PairEncoder,
        query: str,
        documents: Sequence[str],
        policy: WindowPolicy,
        instruction: str | None = None,
    ) -> tuple[EncodedRequest, PackedPairs]:
        encoded = encoder.encode(query, documents, policy, instruction=instruction)
        return encoded, pack_pairs(encoded.pairs)

    async def check_health(self) -> None:
        """Raise :class:`NotReadyError` unless the model is loaded, warmed and a tiny forward pass works."""
        if self.state != "ready" or (self.backend is None and self.engines is None):
            raise NotReadyError(f"the model is not ready ({self.state})")
        async with self._health_lock:
            if time.monotonic() - self._health_checked_at > HEALTH_CACHE_S:
                try:
                    if self.engines is not None:
                        self._health_error = await self.engines.check_health()
                    elif self.backend is not None:
                        await asyncio.to_thread(self.backend.check)
                        self._health_error = None
                except Exception as error:
                    self._health_error = f"{type(error).__name__}: {error}"
                if self._health_error is not None:
                    logger.error("readiness check failed: %s", self._health_error)
                self._health_checked_at = time.monotonic()
        if self._health_error is not None:
            # The reason (paths, device errors) goes to the log only: /ready answers without an API key.
            raise NotReadyError("the model failed its health check; the server log says why")
