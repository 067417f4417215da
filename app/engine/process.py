"""The engine process: one per device, holding every served model, each with its dynamic batcher and forward
thread, each on its own socket (``supervisor.model_socket``).

    python -m app.engine.process --socket /tmp/reranker-engines-9300/engine-0.sock

HTTP workers parse, validate and tokenise; they send encoded pairs here (``wire.py``) and get logits back. Here
nothing competes with the forward thread for the GIL but a small event loop that moves frames, so kernel
launches are not held up by JSON parsing or response building, and one model copy serves every worker.

Started by the gunicorn master's supervisor (``supervisor.py``) as a fresh interpreter: nothing CUDA is ever
initialised in the master. The socket appears only once the model is loaded and warmed (it is bound under a
temporary name and renamed), so a worker that can connect talks to a ready engine. If loading fails, the reason
is written beside the socket (``<socket>.failed``) for the waiting workers to report, and the process exits 1.
It exits when told (SIGTERM: after the batches it holds) or when its parent, the master, is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from app import metrics
from app.batcher import DynamicBatcher
from app.config import Settings, SettingsError, load_settings
from app.engine.base import Backend
from app.engine.loader import load_backend
from app.engine.memory import MemoryRefusal, check_models_fit, runs_on_cuda
from app.engine.supervisor import model_socket
from app.engine.wire import Frame, Kind, decode_pairs, encode_scores, pack, pack_json, read_frame
from app.errors import EngineFailure, NotReadyError, OverloadedError, PayloadTooLargeError

logger = logging.getLogger("app.engine.process")

HEALTH_CACHE_S = 1.0  # every worker probes; they share one check per second
PROBE_QUERY, PROBE_DOCUMENT = "which harbour was busy", "The harbour was busy with ships at dawn."


def forget(requests: dict[int, asyncio.Task[None]], request_id: int, _: object) -> None:
    requests.pop(request_id, None)


def failure_marker(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".failed")


class Engine:
    def __init__(self, backend: Backend, batcher: DynamicBatcher) -> None:
        self.backend = backend
        self.batcher = batcher
        self._health_checked_at = -math.inf
        self._health_error: str | None = None
        self._health_lock = asyncio.Lock()
        self.connections: set[asyncio.StreamWriter] = set()

    def facts(self) -> dict[str, Any]:
        probe = self.backend.encoder.encode(PROBE_QUERY, [PROBE_DOCUMENT]).pairs[0]
        return {
            "pid": os.getpid(),
            "describe": self.backend.describe(),
            "max_length": self.backend.encoder.max_length,
            "probe_ids": [int(token) for token in probe.input_ids],
            "probe_types": [int(t) for t in probe.type_ids],
        }

    async def health(self) -> str | None:
        async with self._health_lock:
            if time.monotonic() - self._health_checked_at > HEALTH_CACHE_S:
                try:
                    await asyncio.to_thread(self.backend.check)
                    self._health_error = None
                except Exception as error:
                    self._health_error = f"{type(error).__name__}: {error}"
                    logger.error("engine health check failed: %s", self._health_error)
                self._health_checked_at = time.monotonic()
            return self._health_error

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP worker's connection: many requests in flight, answered as they finish, in any order."""
        self.connections.add(writer)
        requests: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                frame = await read_frame(reader)
                if frame.kind is Kind.SCORE:
                    task = asyncio.create_task(self._score(frame, writer))
                    requests[frame.request_id] = task
                    task.add_done_callback(partial(forget, requests, frame.request_id))
                elif frame.kind is Kind.CANCEL:
                    if (pending := requests.get(frame.request_id)) is not None:
                        pending.cancel()  # its pairs that have not run leave the queue
                elif frame.kind is Kind.HEALTH:
                    health = asyncio.create_task(self._answer_health(frame, writer))
                    requests[-frame.request_id] = health  # held (and cancelled with the connection)
                    health.add_done_callback(partial(forget, requests, -frame.request_id))
                elif frame.kind is Kind.HELLO:
                    writer.write(pack_json(Kind.HELLO_OK, frame.request_id, self.facts()))
                else:
                    raise ValueError(f"unexpected frame {frame.kind.name} from a worker")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker went away (stopped, recycled or killed)
        except Exception:
            logger.exception("closing a worker connection after a protocol error")
        finally:
            for task in list(requests.values()):
                task.cancel()  # its requests have nobody to answer to: their pairs leave the queue
            writer.close()
            self.connections.discard(writer)

    async def _score(self, frame: Frame, writer: asyncio.StreamWriter) -> None:
        pairs = decode_pairs(frame.body, frame.count)
        try:
            logits = await self.batcher.score(pairs)
        except EngineFailure as error:
            reply = pack(Kind.FAILED, frame.request_id, body=error.message.encode())
        except NotReadyError as error:
            reply = pack(Kind.NOT_READY, frame.request_id, body=error.message.encode())
        except (OverloadedError, PayloadTooLargeError) as error:
            reply = pack(Kind.OVERLOADED, frame.request_id, body=error.message.encode())
        else:
            reply = pack(Kind.SCORES, frame.request_id, len(logits), encode_scores(logits))
        if not writer.is_closing():
            writer.write(reply)

    async def _answer_health(self, frame: Frame, writer: asyncio.StreamWriter) -> None:
        error = await self.health()
        reply = (
            pack(Kind.HEALTH_OK, frame.request_id)
            if error is None
            else pack(Kind.HEALTH_FAILED, frame.request_id, body=error.encode())
        )
        if not writer.is_closing():
            writer.write(reply)


async def serve(socket_path: Path) -> int:
    settings = load_settings()
    served = settings.served_models()
    sockets = [model_socket(socket_path, index) for index in range(len(served))]
    markers = [failure_marker(path) for path in sockets]
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*sockets, *markers):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    engines: list[Engine] = []
    try:
        # Every model in this one process (one CUDA context per device), loaded one after another. On a GPU the
        # set is refused here, before any weight is read, if it cannot fit its free memory (app/engine/memory.py);
        # the host's memory was checked by the preflight (python -m app) before any process started.
        if runs_on_cuda(settings):
            check_models_fit(settings, where="engine", device="cuda")
        for model in served:
            model_settings = settings.for_model(model)
            engines.append(await start_engine(model_settings, workers=settings.worker_processes))
    except Exception as error:
        message = str(error) or type(error).__name__
        if len(served) > 1 and not isinstance(error, MemoryRefusal):
            model = served[len(engines)]
            message = f"model {model.name} ({model.path}): {message}"
        logger.error("engine failed to start: %s", message)
        for marker in markers:
            marker.write_text(message)
        return 1
    servers, stagings = [], []
    for engine, path in zip(engines, sockets, strict=True):
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        servers.append(await asyncio.start_unix_server(engine.serve_connection, path=str(staging)))
        stagings.append(staging)
    # Connectable only now, every model loaded and warmed; the first model's socket (the one the supervisor
    # watches) last.
    for staging, path in reversed(list(zip(stagings, sockets, strict=True))):
        os.replace(staging, path)
    metrics.ENGINES_READY.set(1)
    for engine, path in zip(engines, sockets, strict=True):
        logger.info(
            "engine ready on %s in %.1fs (%s: %s)",
            path,
            time.perf_counter() - started,
            engine.batcher.model,
            engine.backend.describe(),
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        # The master may die without stopping us (SIGKILL): an engine must not outlive its server.
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        logger.warning("engine's parent process is gone; stopping")
        stop.set()

    watcher = asyncio.create_task(watch_parent())
    await stop.wait()
    watcher.cancel()
    for path in sockets:
        path.unlink(missing_ok=True)
    metrics.ENGINES_READY.set(0)
    for server in servers:
        server.close()
    # Workers have drained before the master stops its engines; what is still queued gets its answers.
    await asyncio.gather(*(engine.batcher.stop(timeout_s=settings.graceful_timeout) for engine in engines))
    for engine in engines:
        for connection in list(engine.connections):
            connection.close()  # each connection's reader ends, cancelling what it still had in flight
    for server in servers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=1)
    logger.info("engine on %s stopped", socket_path)
    return 0


async def start_engine(settings: Settings, *, workers: int) -> Engine:
    """Load and warm one model (``settings`` are that model's) with its own batcher."""
    # This device's only copy of the model: on a CPU its torch threads are every core, not one worker's share.
    backend = await asyncio.to_thread(partial(load_backend, settings, model_copies=1))
    await asyncio.to_thread(backend.warm_up)
    # Workers bound their own queues (429s are theirs); this bound only guards against a runaway peer.
    batcher = DynamicBatcher(
        backend.forward,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_pairs=settings.max_batch_pairs,
        max_queue_pairs=settings.max_queue_pairs * workers,
        batch_tokens=backend.batch_tokens,
        model=settings.model_name,
    )
    batcher.start()
    return Engine(backend, batcher)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.engine.process", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket path to serve on")
    args = parser.parse_args(argv)
    try:
        level = load_settings().log_level.upper()
    except SettingsError as error:
        print(f"reranker engine: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    return asyncio.run(serve(args.socket))


if __name__ == "__main__":
    sys.exit(main())
