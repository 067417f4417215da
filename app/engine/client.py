"""An HTTP worker's side of the engine processes: one connection to each, requests spread over them.

The worker keeps today's per-worker promises itself: its queue bound (``RERANKER_MAX_QUEUE_PAIRS``: 413 for a
request that can never fit, 429 + Retry-After when full), and cancellation (a request whose client left sends a
CANCEL, so its pairs that have not run leave the engine's queue). A request goes whole to the engine with the
fewest of this worker's pairs outstanding, so several GPUs share the load.

An engine that dies (or is replaced) closes its connections: requests in flight on it get a 503 with
Retry-After (the client may simply retry), readiness fails until a connection is back, and the worker keeps
reconnecting in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app import metrics
from app.engine.base import PairEncoder
from app.engine.process import PROBE_DOCUMENT, PROBE_QUERY, failure_marker
from app.engine.wire import Frame, Kind, decode_scores, pack, read_frame
from app.errors import EngineFailure, NotReadyError, OverloadedError, PayloadTooLargeError

logger = logging.getLogger(__name__)

RECONNECT_INTERVAL_S = 0.2
HEALTH_TIMEOUT_S = 10.0


class EngineStartError(RuntimeError):
    """An engine process could not load the model; the message is its reason."""


class EngineConnection:
    """One worker's connection to one engine process."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Frame]] = {}
        self._next_id = 1
        self.outstanding_pairs = 0
        self.facts: dict[str, Any] = {}

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        self._reader, self._writer = reader, writer
        self._reader_task = asyncio.create_task(self._read_answers(reader), name=f"engine {self.socket_path.name}")
        hello = await self.request(Kind.HELLO)
        self.facts = json.loads(hello.body)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    async def request(self, kind: Kind, *, count: int = 0, body: bytes = b"") -> Frame:
        """Send one frame and wait for its answer. Cancelling the caller withdraws the request from the engine."""
        writer = self._writer
        if writer is None or writer.is_closing():
            raise NotReadyError("the model engine is not connected (restarting); retry shortly")
        request_id = self._next_id
        self._next_id += 1
        answer: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            writer.write(pack(kind, request_id, count, body))
            return await answer
        except asyncio.CancelledError:
            if kind is Kind.SCORE and not writer.is_closing():
                writer.write(pack(Kind.CANCEL, request_id))
            raise
        finally:
            self._waiting.pop(request_id, None)

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                answer = self._waiting.get(frame.request_id)
                if answer is not None and not answer.done():
                    answer.set_result(frame)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as error:
            logger.error("lost the engine at %s (%s); reconnecting", self.socket_path, type(error).__name__)
        finally:
            if self._writer is not None:
                self._writer.close()
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(NotReadyError("the model engine restarted; retry shortly"))


class EngineClient:
    """What the service calls in process mode: ``score`` and ``check_health``, over every engine."""

    def __init__(
        self, socket_paths: Sequence[Path], *, encoder: PairEncoder, max_queue_pairs: int, model: str = ""
    ) -> None:
        self.connections = [EngineConnection(path) for path in socket_paths]
        self.model = model  # the metrics' model label
        self.encoder = encoder
        self.max_queue_pairs = max_queue_pairs
        self._pending_pairs = 0
        self._keeper: asyncio.Task[None] | None = None

    @property
    def pending_pairs(self) -> int:
        return self._pending_pairs

    async def start(self, *, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``: the engines load and warm the model) until every engine answers."""
        deadline = time.monotonic() + timeout_s
        for connection in self.connections:
            await self._connect_when_up(connection, deadline)
        self._keeper = asyncio.create_task(self._keep_connected(), name="engine reconnects")

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        for connection in self.connections:
            await connection.close()

    async def _connect_when_up(self, connection: EngineConnection, deadline: float) -> None:
        marker = failure_marker(connection.socket_path)
        while True:
            if marker.is_file():
                raise EngineStartError(f"the model engine failed to start: {marker.read_text().strip()}")
            if connection.socket_path.exists():
                try:
                    await connection.connect()
                except (OSError, asyncio.IncompleteReadError, NotReadyError):
                    pass  # it is being replaced: try again
                else:
                    try:
                        self._check_same_encoding(connection)
                    except EngineStartError:
                        await connection.close()
                        raise
                    logger.info(
                        "connected to the engine at %s (pid %s)", connection.socket_path, connection.facts.get("pid")
                    )
                    return
            if time.monotonic() > deadline:
                raise EngineStartError(f"no model engine answered at {connection.socket_path} in time")
            await asyncio.sleep(RECONNECT_INTERVAL_S)

    def _check_same_encoding(self, connection: EngineConnection) -> None:
        """Refuse an engine whose model would read this worker's pairs differently (another model or tokenizer)."""
        ours = self.encoder.encode(PROBE_QUERY, [PROBE_DOCUMENT]).pairs[0]
        facts = connection.facts
        if list(ours.input_ids) != facts.get("probe_ids") or list(ours.type_ids) != facts.get("probe_types"):
            raise EngineStartError(
                f"the engine at {connection.socket_path} encodes pairs differently from this worker "
                f"(engine {facts.get('probe_ids')}, worker {list(ours.input_ids)}): refusing wrong scores"
            )
        if facts.get("max_length") != self.encoder.max_length:
            raise EngineStartError(
                f"the engine at {connection.socket_path} scores {facts.get('max_length')} tokens per pair, "
                f"this worker encodes {self.encoder.max_length}"
            )

    async def _keep_connected(self) -> None:
        reported: dict[Path, str] = {}  # the last problem logged per engine: once, not five times a second
        while True:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            for connection in self.connections:
                if connection.connected:
                    reported.pop(connection.socket_path, None)
                    continue
                try:
                    await self._connect_when_up(connection, time.monotonic())
                except EngineStartError as error:
                    if reported.get(connection.socket_path) != str(error):
                        logger.error("%s", error)
                        reported[connection.socket_path] = str(error)

    async def score(self, payload: bytes, count: int) -> list[float]:
        """Logits for ``count`` pairs packed by ``wire.encode_pairs``, in order."""
        if count > self.max_queue_pairs:
            raise PayloadTooLargeError(
                f"this request needs {count} scored pairs; a worker queues at most {self.max_queue_pairs} "
                "(RERANKER_MAX_QUEUE_PAIRS): send fewer documents",
                param="documents",
            )
        if self._pending_pairs + count > self.max_queue_pairs:
            metrics.REJECTED.labels("overloaded", self.model).inc()
            raise OverloadedError(
                f"this worker has {self._pending_pairs} pairs queued (limit {self.max_queue_pairs}); retry shortly"
            )
        live = [connection for connection in self.connections if connection.connected]
        if not live:
            raise NotReadyError("the model engine is not connected (restarting); retry shortly")
        connection = min(live, key=lambda c: c.outstanding_pairs)
        self._pending_pairs += count
        connection.outstanding_pairs += count
        try:
            answer = await connection.request(Kind.SCORE, count=count, body=payload)
        finally:
            self._pending_pairs -= count
            connection.outstanding_pairs -= count
        if answer.kind is Kind.SCORES:
            return decode_scores(answer.body, count)
        message = answer.body.decode(errors="replace")
        if answer.kind is Kind.FAILED:
            raise EngineFailure(message)
        if answer.kind is Kind.OVERLOADED:
            raise OverloadedError(message)
        raise NotReadyError(message)

    async def check_health(self) -> str | None:
        """None when at least one engine is connected and its model answers; else why not (for the log)."""
        problems = []
        for connection in self.connections:
            if not connection.connected:
                problems.append(f"engine at {connection.socket_path} is not connected")
                continue
            try:
                answer = await asyncio.wait_for(connection.request(Kind.HEALTH), HEALTH_TIMEOUT_S)
            except (NotReadyError, TimeoutError) as error:
                problems.append(f"engine at {connection.socket_path}: {type(error).__name__} {error}")
                continue
            if answer.kind is Kind.HEALTH_OK:
                return None
            problems.append(f"engine at {connection.socket_path}: {answer.body.decode(errors='replace')}")
        return "; ".join(problems)
