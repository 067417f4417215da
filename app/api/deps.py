"""Request dependencies: the model's service, the registry, the settings and the API key check.

All ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop (and a GIL hand-off)
per dependency per request, for what is an attribute read. Measured with three of them on a 64-document
request: the thread pool's threads took a third of the worker's CPU samples.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.errors import AuthenticationError
from app.registry import ModelRegistry
from app.service import RerankService

# Every route is also served under this prefix: a base URL per model for clients that send no model name
# (RAGFlow's HuggingFace provider posts {query, texts} to {base}/rerank and discovers with GET {base}/info).
MODEL_SCOPE = "/models/{model_name}"


async def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.models
    return registry


async def get_service(request: Request) -> RerankService:
    """The model a request is for, resolved once: its URL's ``/models/{name}`` when it has one (the URL wins over
    the body), else the body's ``model`` (with several models served; one model takes any name)."""
    registry: ModelRegistry = request.app.state.models
    scoped = request.path_params.get("model_name")
    if scoped is not None:
        service = registry.scoped(scoped)
    else:
        service = registry.resolve(await _model_in_body(request) if registry.routes_by_model else None)
    request.scope["state"]["model"] = service.name  # the metrics' and the access log's model
    return service


async def _model_in_body(request: Request) -> str | None:
    """The body's ``model``. FastAPI has parsed the body before it solves dependencies (the parsed JSON is
    cached on the request), so this parses nothing again; a body that is not JSON never gets here (400)."""
    if request.method != "POST":
        return None
    try:
        body = await request.json()
    except ValueError:  # an empty body: its validation error (422) follows, naming what is missing
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[RerankService, Depends(get_service)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With RERANKER_API_KEY set, demand ``Authorization: Bearer <key>``; without it, accept anything.

    RAGFlow's HuggingFace provider sends no key at all, so leave the key unset for that provider.
    """
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("missing API key: send Authorization: Bearer <key>", param="authorization")
    # Constant-time comparison, so response timing does not reveal how much of a guess was right.
    if not hmac.compare_digest(token.strip().encode(), settings.api_key.get_secret_value().encode()):
        raise AuthenticationError("invalid API key", param="authorization")


ApiKeyDep = Depends(require_api_key)
