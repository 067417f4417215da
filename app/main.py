"""The FastAPI application. gunicorn loads it with ``app.main:create_app()`` in every worker.

The lifespan owns the model side, for every served model in turn (``app/registry.py``): inline, the model is
loaded and warmed after gunicorn forks (nothing CUDA in the master); with engine processes (started by the
master's supervisor, which names their sockets in the environment; each model has its own socket on every
engine), the worker builds the model's pair encoder and waits until the engines answer. On shutdown the worker
stops taking work and finishes what is queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__, metrics
from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.api.routes import ops_router, router
from app.config import Settings, get_settings
from app.engine.base import Backend, PairEncoder
from app.engine.supervisor import engine_sockets_from_environment, model_socket
from app.registry import ModelRegistry
from app.service import RerankService

logger = logging.getLogger(__name__)


def configured_backend_factory(settings: Settings) -> Callable[[], Backend]:
    def load() -> Backend:
        from app.engine.loader import load_backend  # torch is imported there only when used

        return load_backend(settings)

    return load


def worker_encoder_factory(settings: Settings) -> Callable[[], PairEncoder]:
    def load() -> PairEncoder:
        from app.engine.model_dir import load_pair_encoder  # the tokenizer only: no weights in a worker

        return load_pair_encoder(settings)

    return load


def create_app(settings: Settings | None = None, *, backend_factory: Callable[[], Backend] | None = None) -> FastAPI:
    """The app serving every configured model. ``backend_factory`` (tests) stands in for one model's loader."""
    settings = settings or get_settings()
    # A backend handed in (tests) always runs inline; otherwise the master's choice, made once for all workers.
    engine_sockets = [] if backend_factory is not None else engine_sockets_from_environment()
    services = []
    for index, served in enumerate(settings.served_models()):
        model_settings = settings.for_model(served)
        services.append(
            RerankService(
                model_settings,
                backend_factory or configured_backend_factory(model_settings),
                engine_sockets=[model_socket(socket, index) for socket in engine_sockets],
                encoder_factory=worker_encoder_factory(model_settings),
            )
        )
    registry = ModelRegistry(services, routes_by_model=settings.routes_by_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.WORKERS_UP.set(1)
        metrics.WORKERS_READY.set(0)
        await registry.start()
        try:
            yield
        finally:
            await registry.stop()
            metrics.WORKERS_UP.set(0)

    app = FastAPI(
        title="Reranker",
        version=__version__,
        summary="Cross-encoder reranking for RAG stacks, in every client's dialect.",
        lifespan=lifespan,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.models = registry
    app.state.started_at = int(time.time())
    install_error_handlers(app)
    app.include_router(ops_router)
    app.include_router(router)
    # Added last = outermost: the request id, log line and metrics cover the 413s of the body limit too.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestContextMiddleware, access_log=settings.access_log)
    return app
