"""Thin routes: parse the dialect, call the service, shape the dialect's answer.

Every path is served with and without a trailing slash (a POST redirect would lose clients). The paths come
from the clients' own source: see shared/RERANK_WIRE.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app import __version__
from app.api.deps import ApiKeyDep, ServiceDep, SettingsDep, require_api_key
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
    TextObject,
)
from app.errors import InvalidRequestError, PayloadTooLargeError
from app.metrics import DOCUMENTS, render_metrics
from app.service import DocumentScore, RerankOutcome

T = TypeVar("T")

# Standard rerank paths; the last three are where RAGFlow posts when its base URL contains "/rerank" or is
# doubled by GPUStack's provider.
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank", "/v1", "/", "/v1/v1/rerank")
# Paths that also carry the seed deployment's "data" list.
SEED_PATHS = {"/v1/rerank", "/rerank", "/v1", "/", "/v1/v1/rerank"}
# NVIDIA NIM's paths: RAGFlow's Python provider posts to .../reranking, its Go server to .../ranking.
NVIDIA_PATHS = ("/v1/reranking", "/reranking", "/v1/ranking", "/ranking")
# RAGFlow appends /v1/models to a base URL that may already end in /v1.
MODEL_PATHS = ("/v1/models", "/models", "/v1/v1/models")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope} for status in (400, 401, 413, 415, 422, 429, 500, 503)
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


def document_texts(body: RerankRequest) -> list[str]:
    """The documents' texts, whatever field and shape the dialect used."""
    if body.documents is not None:
        texts = []
        for position, document in enumerate(body.documents):
            if isinstance(document, str):
                texts.append(document)
                continue
            if body.rank_fields:
                values = [(field, document.get(field)) for field in body.rank_fields if field in document]
                if values and all(isinstance(value, str) for _, value in values):
                    texts.append("\n".join(f"{field}: {value}" for field, value in values))
                    continue
                raise InvalidRequestError(
                    f"documents[{position}] has no string field among rank_fields {body.rank_fields}",
                    param=f"documents[{position}]",
                )
            text = document.get("text")
            if not isinstance(text, str):
                raise InvalidRequestError(
                    f"documents[{position}] must be a string or an object with a text field",
                    param=f"documents[{position}]",
                )
            texts.append(text)
        return texts
    if body.texts is not None:
        return list(body.texts)
    if body.passages is not None:
        return [passage.text for passage in body.passages]
    raise InvalidRequestError("documents is required (a list of strings)", param="documents")


def require_unicode(text: str, param: str) -> None:
    """Refuse text that is not valid Unicode: a lone UTF-16 surrogate (JSON ``"\\ud800"``) parses into a Python
    string that no tokenizer or UTF-8 encoder accepts, so it would otherwise fail as a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        raise InvalidRequestError(
            f"{param} is not valid Unicode: unpaired surrogate \\u{code:04x} at character {error.start}",
            param=param,
        ) from None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, but cancel it — withdrawing its queued pairs — if the client goes away first."""
    work_task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(wait_for_disconnect())
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work_task.done():
        work_task.cancel()
        raise ClientDisconnected("the client closed the connection")
    return work_task.result()


def ranked(outcome: RerankOutcome, top_n: int | None) -> list[DocumentScore]:
    order = sorted(outcome.documents, key=lambda document: (-document.logit, document.index))
    return order[:top_n] if top_n else order


async def score_request(request: Request, body: RerankRequest, service: ServiceDep, settings: SettingsDep,
                        *, truncate_only: bool) -> tuple[list[str], RerankOutcome]:
    query = body.query.text if isinstance(body.query, TextObject) else body.query
    if not query.strip():
        raise InvalidRequestError("query must be a non-empty string", param="query")
    require_unicode(query, "query")
    texts = document_texts(body)
    if len(texts) > settings.max_documents:
        raise PayloadTooLargeError(
            f"{len(texts)} documents sent; the limit is {settings.max_documents} (RERANKER_MAX_DOCUMENTS)",
            param="documents",
        )
    for position, text in enumerate(texts):
        require_unicode(text, f"documents[{position}]")
    state = request.scope["state"]
    state["documents"] = len(texts)
    DOCUMENTS.inc(len(texts))
    policy = service.window_policy(
        max_chunks_per_doc=body.max_chunks_per_doc,
        overlap_tokens=body.overlap_tokens,
        max_tokens_per_doc=body.max_tokens_per_doc,
        truncate_only=truncate_only,
    )
    outcome = await unless_disconnected(request, service.rerank(query, texts, policy=policy))
    state["tokens"] = outcome.total_tokens
    state["windows"] = sum(document.window_count for document in outcome.documents)
    return texts, outcome


def usage(outcome: RerankOutcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.total_tokens, "total_tokens": outcome.total_tokens}


async def rerank(request: Request, body: RerankRequest, service: ServiceDep, settings: SettingsDep) -> Response:
    """Rerank documents by relevance to the query.

    Speaks Cohere v1/v2, Jina, vLLM, Xinference and RAGFlow's providers (``results``), and TEI when the body has
    ``texts`` (a bare list). Scores are sigmoid probabilities in [0, 1] unless ``raw_scores`` is true.
    """
    tei = body.texts is not None and body.documents is None
    request.scope["state"]["dialect"] = "tei" if tei else "standard"
    texts, outcome = await score_request(request, body, service, settings, truncate_only=False)

    def score_of(document: DocumentScore) -> float:
        return document.logit if body.raw_scores else document.relevance_score

    if tei:
        answer: list[dict[str, Any]] = []
        for document in ranked(outcome, None):
            item: dict[str, Any] = {"index": document.index, "score": score_of(document)}
            if body.return_text:
                item["text"] = texts[document.index]
            answer.append(item)
        return JSONResponse(answer)
    best = ranked(outcome, body.top_n)
    results = []
    for document in best:
        result: dict[str, Any] = {"index": document.index, "relevance_score": score_of(document)}
        if body.return_documents:
            result["document"] = {"text": texts[document.index]}
        if document.window_count > 1:
            result["chunk"] = {"index": document.best_window, "count": document.window_count}
        results.append(result)
    response: dict[str, Any] = {
        "id": request.scope["state"]["request_id"],
        "object": "list",
        "model": settings.model_name,
        "results": results,
        "usage": usage(outcome),
        "meta": {
            "api_version": {"version": "2"},
            "billed_units": {"search_units": 1},
            "tokens": {"input_tokens": outcome.total_tokens, "output_tokens": 0},
            "warnings": [],
        },
    }
    if (request.scope["route"].path.rstrip("/") or "/") in SEED_PATHS:
        response["data"] = [
            {"index": document.index, "score": score_of(document), "document": texts[document.index]}
            for document in best
        ]
    return JSONResponse(response)


async def rerank_nvidia(request: Request, body: RerankRequest, service: ServiceDep, settings: SettingsDep) -> Response:
    """NVIDIA NIM's reranking: ``{"query": {"text"}, "passages": [{"text"}]}`` → ``rankings[].logit``."""
    request.scope["state"]["dialect"] = "nvidia"
    _, outcome = await score_request(request, body, service, settings, truncate_only=True)
    rankings = [{"index": d.index, "logit": d.logit} for d in ranked(outcome, body.top_n)]
    return JSONResponse({"rankings": rankings, "usage": usage(outcome)})


def model_card(service: ServiceDep, settings: SettingsDep, started_at: int) -> ModelCard:
    """What is served: the id clients send, and what was loaded (service.model_facts: the backend's describe())."""
    facts = service.model_facts()
    labels = facts.get("num_labels")
    return ModelCard(
        id=settings.model_name,
        created=started_at,
        model_type="rerank",
        max_model_len=int(facts.get("max_length", settings.max_length)),
        architecture=facts.get("architecture"),
        num_labels=int(labels) if labels else None,
        dtype=facts.get("dtype"),
        device=facts.get("device"),
    )


async def list_models(service: ServiceDep, settings: SettingsDep, request: Request) -> ModelList:
    """The one served model (``model_type: rerank``; RAGFlow also classes an id containing "rerank" as one)."""
    return ModelList(data=[model_card(service, settings, request.app.state.started_at)])


for _path, _visible in _with_slash_variants(RERANK_PATHS):
    router.add_api_route(
        _path, rerank, methods=["POST"], include_in_schema=_visible, response_model=RerankResponse | list[TeiRank],
        responses=ERROR_RESPONSES, summary="Rerank documents", tags=["rerank"],
    )
for _path, _visible in _with_slash_variants(NVIDIA_PATHS):
    router.add_api_route(
        _path, rerank_nvidia, methods=["POST"], include_in_schema=_visible, response_model=NvidiaResponse,
        responses=ERROR_RESPONSES, summary="Rerank passages (NVIDIA)", tags=["rerank"],
    )
for _path, _visible in _with_slash_variants(MODEL_PATHS):
    router.add_api_route(_path, list_models, methods=["GET"], include_in_schema=_visible, response_model=ModelList,
                         summary="List the served model", tags=["models"])


@ops_router.get("/info", response_model=TeiInfo, tags=["models"])
async def info(service: ServiceDep, settings: SettingsDep, request: Request) -> TeiInfo:
    """TEI's model information, unauthenticated as TEI's is (RAGFlow's HuggingFace provider sends no key)."""
    card = model_card(service, settings, request.app.state.started_at)
    labels = {"0": "LABEL_0"} if card.num_labels != 2 else {"0": "LABEL_0", "1": "LABEL_1"}
    reranker = {"id2label": labels, "label2id": {name: int(index) for index, name in labels.items()}}
    return TeiInfo(
        model_id=settings.model_name,
        model_dtype=card.dtype or "unknown",
        model_type={"reranker": reranker, "rerank": reranker},
        max_concurrent_requests=settings.max_queue_pairs,
        max_input_length=card.max_model_len,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_requests=None,
        max_client_batch_size=settings.max_documents,
        tokenization_workers=2,
        version=__version__,
    )


@ops_router.get("/health", response_model=Health, tags=["operations"])
async def health() -> Health:
    """Liveness: the worker process answers. Does not touch the model."""
    return Health(status="ok")


@ops_router.get("/ready", response_model=Health, responses={503: {"model": ErrorEnvelope}}, tags=["operations"])
async def ready(service: ServiceDep) -> Health:
    """Readiness: 200 only when the model is loaded, warmed and a tiny forward pass works; else 503."""
    await service.check_health()
    return Health(status="ready")


@ops_router.get("/metrics", tags=["operations"], response_class=Response)
async def prometheus_metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus exposition text, merged over every gunicorn worker."""
    if settings.metrics_need_key:
        require_api_key(request, settings)
    payload, content_type = render_metrics()
    return Response(payload, media_type=content_type)
