"""The served models by name: the one place a request's model is resolved.

One model is a registry of one entry that answers to any name (the seed deployment accepted any ``model``, and
RAGFlow sends whatever name its user typed); several (``RERANKER_MODELS``) answer to their own names only. Each
model has its own :class:`RerankService`: its own encoder, batcher and token budget (or its own engine sockets),
so one model's burst queues behind itself, not in front of another model's requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from app import metrics
from app.errors import ModelNotFoundError, NotReadyError
from app.service import RerankService

logger = logging.getLogger(__name__)

# RAGFlow v0.13-v0.14's OpenAI-API-compatible provider sends "<name>___OpenAI-API" (RERANK_WIRE.md).
RAGFLOW_NAME_SUFFIX = "___"


class ModelStartError(RuntimeError):
    """A model could not be loaded; ``str()`` names the model and its directory."""


class ModelRegistry:
    def __init__(self, services: Sequence[RerankService], *, routes_by_model: bool) -> None:
        if not services:
            raise ValueError("a registry serves at least one model")
        self.services = list(services)
        self.routes_by_model = routes_by_model
        self._by_name = {service.name: service for service in services}

    @property
    def names(self) -> list[str]:
        return [service.name for service in self.services]

    def resolve(self, name: str | None) -> RerankService:
        """The service for a request that names ``name`` (its body's ``model``, or its model-scoped URL)."""
        if not self.routes_by_model:
            return self.services[0]
        if name:
            found = self._by_name.get(name) or self._by_name.get(name.split(RAGFLOW_NAME_SUFFIX)[0])
            if found is not None:
                return found
            said = f"model {name!r} is not served here"
        else:
            said = "this server serves several models and the request names none"
        raise ModelNotFoundError(
            f"{said}: send model as one of {', '.join(self.names)}, or use the base URL /models/{{name}}",
            param="model",
        )

    def scoped(self, name: str) -> RerankService:
        """The service a model-scoped URL (``/models/{name}/...``) names; with one model, only its own name."""
        found = self._by_name.get(name)
        if found is None:
            raise ModelNotFoundError(
                f"model {name!r} is not served here: the served models are {', '.join(self.names)}", param="model"
            )
        return found

    async def start(self) -> None:
        """Load and warm every model, one after another (two loads at once would only compete for the same
        disk, cores and memory); the first that fails stops the worker's start with its name and directory."""
        for service in self.services:
            try:
                await service.start()
            except Exception as error:
                if len(self.services) == 1:
                    raise
                raise ModelStartError(
                    f"model {service.name} ({service.settings.model_path}): {error or type(error).__name__}"
                ) from error
        metrics.WORKERS_READY.set(1)

    async def stop(self) -> None:
        """Drain every model at once: each finishes what it has queued within the graceful timeout."""
        metrics.WORKERS_READY.set(0)
        await asyncio.gather(*(service.stop() for service in self.services))

    async def check_health(self) -> None:
        """Raise :class:`NotReadyError` unless every model is ready (``/ready`` is 200 only then)."""
        outcomes = await asyncio.gather(*(service.check_health() for service in self.services), return_exceptions=True)
        failed = [
            (service.name, outcome)
            for service, outcome in zip(self.services, outcomes, strict=True)
            if isinstance(outcome, BaseException)
        ]
        metrics.WORKERS_READY.set(0 if failed else 1)
        if not failed:
            return
        first = failed[0][1]
        if not isinstance(first, NotReadyError):
            raise first
        if len(self.services) == 1:
            raise first
        raise NotReadyError(f"not every model is ready: {'; '.join(f'{name}: {error}' for name, error in failed)}")
