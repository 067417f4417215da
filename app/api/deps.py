"""Request dependencies: the service, the settings and the API key check.

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
from app.service import RerankService


async def get_service(request: Request) -> RerankService:
    service: RerankService = request.app.state.service
    return service


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[RerankService, Depends(get_service)]
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
