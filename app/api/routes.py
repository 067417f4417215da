"""Thin routes: the request normalises itself, the service scores it in one call, the schema shapes the answer.

Every path is served with and without a trailing slash (a POST redirect would lose clients), and again under
``/models/{name}``: a base URL per model for clients that send no model name. The paths come from the clients' own
source: see shared/RERANK_WIRE.md.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

from fastapi import APIRouter, Request, Response

from app import __version__
from app.api.deps import MODEL_SCOPE, ApiKeyDep, RegistryDep, ServiceDep, SettingsDep, require_api_key
from app.api.errors import ClientDisconnected
from app.api.schemas import (
    ErrorEnvelope,
    Health,
    ModelCard,
    ModelList,
    NvidiaResponse,
    RerankRequest,
    RerankResponse,
    TeiInfo,
    TeiRank,
)
from app.config import Settings
from app.metrics import DOCUMENTS, render_metrics
from app.service import RerankOutcome, RerankService

T = TypeVar("T")
P = ParamSpec("P")

# Standard rerank paths; the last three are where RAGFlow posts when its base URL contains "/rerank" or is
# doubled by GPUStack's provider.
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank", "/v1", "/", "/v1/v1/rerank")
# Paths that also carry the seed deployment's "data" list.
SEED_PATHS = {"/v1/rerank", "/rerank", "/v1", "/", "/v1/v1/rerank"}
# NVIDIA NIM's paths: RAGFlow's Python provider posts to .../reranking, its Go server to .../ranking.
NVIDIA_PATHS = ("/v1/reranking", "/reranking", "/v1/ranking", "/ranking")
# RAGFlow appends /v1/models to a base URL that may already end in /v1.
MODEL_PATHS = ("/v1/models", "/models", "/v1/v1/models")
# TEI's discovery: RAGFlow's HuggingFace provider asks base + "/info", and the README's base URL ends in /v1.
INFO_PATHS = ("/info", "/v1/info")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope} for status in (400, 401, 404, 413, 415, 422, 429, 500, 503)
}

router = APIRouter(dependencies=[ApiKeyDep])
ops_router = APIRouter()


def _with_slash_variants(paths: Iterable[str]) -> list[tuple[str, bool]]:
    """Each path, and its trailing-slash twin hidden from the docs."""
    out: list[tuple[str, bool]] = []
    for path in paths:
        out.append((path, True))
        if path != "/":
            out.append((path + "/", False))
    return out


def with_cancellation(handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run the route, but cancel it — withdrawing its queued pairs — if the client goes away first.

    The body has been read by then, so what the request's receive channel still yields is the disconnect.
    (vLLM's serving routes carry the same decorator.)
    """

    @functools.wraps(handler)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        request = kwargs["request"]
        assert isinstance(request, Request)
        work = asyncio.ensure_future(handler(*args, **kwargs))

        async def wait_for_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.create_task(wait_for_disconnect())
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not work.done():
            work.cancel()
            raise ClientDisconnected("the client closed the connection")
        return work.result()

    return run


async def score(
    request: Request,
    body: RerankRequest,
    service: RerankService,
    settings: Settings,
    *,
    dialect: str,
    truncate_only: bool = False,
) -> tuple[list[str], RerankOutcome]:
    """Normalise the body, score it in one service call, and note what the access log reports."""
    state = request.scope["state"]
    state["dialect"] = dialect
    query = body.query_text()
    instruction = body.instruction_text()
    texts = body.document_texts(max_documents=settings.max_documents)
    state["documents"] = len(texts)
    DOCUMENTS.labels(service.name).inc(len(texts))
    outcome = await service.rerank(
        query, texts, chunking=body.chunking(), truncate_only=truncate_only, instruction=instruction
    )
    state["tokens"] = outcome.total_tokens
    state["windows"] = sum(document.window_count for document in outcome.documents)
    state["tokenize_ms"] = round(outcome.tokenize_s * 1000, 2)
    state["score_ms"] = round(outcome.score_s * 1000, 2)
    return texts, outcome


@with_cancellation
async def rerank(
    request: Request, body: RerankRequest, service: ServiceDep, settings: SettingsDep
) -> RerankResponse | list[TeiRank]:
    """Rerank documents by relevance to the query.

    Speaks Cohere v1/v2, Jina, vLLM, Xinference and RAGFlow's providers (``results``), and TEI when the body has
    ``texts`` (a bare list). Scores are sigmoid probabilities in [0, 1] unless ``raw_scores`` is true.
    """
    if body.wants_tei_list:
        texts, outcome = await score(request, body, service, settings, dialect="tei")
        return TeiRank.ranked(outcome, body, texts)
    texts, outcome = await score(request, body, service, settings, dialect="standard")
    seed_data = (request.scope["route"].path.rstrip("/") or "/") in SEED_PATHS
    return RerankResponse.from_outcome(
        outcome,
        body,
        texts,
        request_id=request.scope["state"]["request_id"],
        model=service.name,
        seed_data=seed_data,
    )


@with_cancellation
async def rerank_nvidia(
    request: Request, body: RerankRequest, service: ServiceDep, settings: SettingsDep
) -> NvidiaResponse:
    """NVIDIA NIM's reranking: ``{"query": {"text"}, "passages": [{"text"}]}`` → ``rankings[].logit``."""
    _, outcome = await score(request, body, service, settings, dialect="nvidia", truncate_only=True)
    return NvidiaResponse.from_outcome(outcome, body)


def model_card(service: RerankService, started_at: int) -> ModelCard:
    """What is served under one name: the id clients send, and what was loaded (the backend's describe())."""
    facts = service.model_facts()
    labels = facts.get("num_labels")
    return ModelCard(
        id=service.name,
        created=started_at,
        model_type="rerank",
        max_model_len=int(facts.get("max_length", service.settings.max_length)),
        architecture=facts.get("architecture"),
        num_labels=int(labels) if labels else None,
        dtype=facts.get("dtype"),
        device=facts.get("device"),
        recipe=facts.get("recipe"),
        instruction=facts.get("instruction"),
    )


async def list_models(registry: RegistryDep, request: Request) -> ModelList:
    """Every served model (``model_type: rerank``; RAGFlow also classes an id containing "rerank" as one); under
    ``/models/{name}``, that model alone."""
    started_at = request.app.state.started_at
    scoped = request.path_params.get("model_name")
    services = [registry.scoped(scoped)] if scoped is not None else registry.services
    return ModelList(data=[model_card(service, started_at) for service in services])


async def info(service: ServiceDep, request: Request) -> TeiInfo:
    """TEI's model information, for RAGFlow's HuggingFace provider. Guarded like every model route: that
    provider sends no key, so it is used with RERANKER_API_KEY unset, for /info as for /rerank. With several
    models it names one: ``/models/{name}/info``."""
    settings = service.settings
    card = model_card(service, request.app.state.started_at)
    labels = {"0": "LABEL_0"} if card.num_labels != 2 else {"0": "LABEL_0", "1": "LABEL_1"}
    reranker = {"id2label": labels, "label2id": {name: int(index) for index, name in labels.items()}}
    return TeiInfo(
        model_id=service.name,
        model_dtype=card.dtype or "unknown",
        model_type={"reranker": reranker, "rerank": reranker},
        max_concurrent_requests=settings.max_queue_pairs,
        max_input_length=card.max_model_len,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_requests=None,
        max_client_batch_size=settings.max_documents,
        tokenization_workers=2,
        version=__version__,
        recipe=card.recipe,
    )


# The endpoints read the scope's model name in their dependency (get_service), not as an argument: declared here
# so that the OpenAPI document describes the path it is part of.
MODEL_NAME_PARAMETER: dict[str, Any] = {
    "parameters": [
        {
            "name": "model_name",
            "in": "path",
            "required": True,
            "description": "A served model's name (RERANKER_MODEL_NAME, or a name in RERANKER_MODELS).",
            "schema": {"type": "string"},
        }
    ]
}


def add_routes(
    target: APIRouter, paths: Sequence[str], endpoint: Callable[..., Any], *, method: str, **options: Any
) -> None:
    """``endpoint`` at each path and its trailing-slash twin, and again under ``/models/{name}`` (of which the
    OpenAPI document shows the first path only)."""
    for path, visible in _with_slash_variants(paths):
        target.add_api_route(path, endpoint, methods=[method], include_in_schema=visible, **options)
    scoped = [MODEL_SCOPE + ("" if path == "/" else path) for path in paths]
    for path, _ in _with_slash_variants(scoped):
        target.add_api_route(
            path,
            endpoint,
            methods=[method],
            include_in_schema=path == scoped[0],
            openapi_extra=MODEL_NAME_PARAMETER,
            **options,
        )


# Optional fields a dialect did not ask for (document, chunk, data, text) are left out, not sent as null.
add_routes(
    router,
    RERANK_PATHS,
    rerank,
    method="POST",
    response_model=RerankResponse | list[TeiRank],
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Rerank documents",
    tags=["rerank"],
)
add_routes(
    router,
    NVIDIA_PATHS,
    rerank_nvidia,
    method="POST",
    response_model=NvidiaResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Rerank passages (NVIDIA)",
    tags=["rerank"],
)
add_routes(
    router,
    MODEL_PATHS,
    list_models,
    method="GET",
    response_model=ModelList,
    responses=ERROR_RESPONSES,
    summary="List the served models",
    tags=["models"],
)
add_routes(
    router,
    INFO_PATHS,
    info,
    method="GET",
    response_model=TeiInfo,
    responses=ERROR_RESPONSES,
    summary="TEI's model information",
    tags=["models"],
)


@ops_router.get("/health", response_model=Health, tags=["operations"])
async def health() -> Health:
    """Liveness: the worker process answers. Does not touch the model."""
    return Health(status="ok")


@ops_router.get("/ready", response_model=Health, responses={503: {"model": ErrorEnvelope}}, tags=["operations"])
async def ready(registry: RegistryDep) -> Health:
    """Readiness: 200 only when every model is loaded, warmed and a tiny forward pass works; else 503."""
    await registry.check_health()
    return Health(status="ready")


@ops_router.get(
    MODEL_SCOPE + "/ready",
    response_model=Health,
    responses={404: {"model": ErrorEnvelope}, 503: {"model": ErrorEnvelope}},
    tags=["operations"],
    openapi_extra=MODEL_NAME_PARAMETER,
)
async def model_ready(service: ServiceDep) -> Health:
    """Readiness of one model: 200 when it is loaded, warmed and a tiny forward pass works."""
    await service.check_health()
    return Health(status="ready")


@ops_router.get("/metrics", tags=["operations"], response_class=Response)
async def prometheus_metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus exposition text, merged over every gunicorn worker."""
    if settings.metrics_need_key:
        await require_api_key(request, settings)
    payload, content_type = render_metrics()
    return Response(payload, media_type=content_type)
