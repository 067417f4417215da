"""One error envelope, ``{"error": {"message", "type", "param", "code"}}``, and one table from errors to statuses.

4xx for what the client sent, 5xx only for the server's own faults; no traceback or raw exception text ever
reaches a client.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    AuthenticationError,
    EngineFailure,
    InvalidRequestError,
    MalformedBodyError,
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RerankError,
    UnsupportedMediaTypeError,
)

logger = logging.getLogger(__name__)


class ClientDisconnected(RerankError):
    """The client closed the connection before its answer was ready (nobody reads this response)."""


# The one mapping from the service's errors to HTTP: (status, envelope type).
ERROR_STATUS: dict[type[RerankError], tuple[int, str]] = {
    MalformedBodyError: (400, "invalid_request_error"),
    AuthenticationError: (401, "authentication_error"),
    ModelNotFoundError: (404, "not_found_error"),
    PayloadTooLargeError: (413, "request_too_large"),
    UnsupportedMediaTypeError: (415, "invalid_request_error"),
    InvalidRequestError: (422, "invalid_request_error"),
    OverloadedError: (429, "overloaded_error"),
    ClientDisconnected: (499, "client_closed_request"),
    EngineFailure: (500, "server_error"),
    NotReadyError: (503, "service_unavailable"),
}

_HTTP_TYPES = {404: "not_found_error", 405: "method_not_allowed", 415: "invalid_request_error"}


def error_payload(status: int, error_type: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_body(status: int, error_type: str, message: str, param: str | None = None) -> bytes:
    """The envelope as bytes, for pure ASGI middleware that answers before FastAPI runs."""
    return json.dumps(error_payload(status, error_type, message, param)).encode()


def error_response(error: RerankError) -> JSONResponse:
    status, error_type = ERROR_STATUS.get(type(error), (500, "server_error"))
    headers = {}
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = 'Bearer realm="reranker"'
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(error_payload(status, error_type, error.message, error.param), status, headers=headers)


def _location(loc: tuple[int | str, ...]) -> str:
    """``("body", "documents", 3)`` → ``documents[3]``; pydantic's union branch names are dropped."""
    text = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in {"str", "dict[str,any]", "TextObject", "bool", "int"} or "[" in str(part):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text


def validation_error(error: RequestValidationError) -> RerankError:
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        context = first.get("ctx")
        detail = context.get("error", "invalid JSON") if isinstance(context, dict) else "invalid JSON"
        return MalformedBodyError(f"the body is not valid JSON: {detail}", param="body")
    where = _location(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and not where:
        return MalformedBodyError("the body is empty: send a JSON object", param="body")
    if first.get("type") == "missing":
        return InvalidRequestError(f"{where} is required", param=where)
    if where in {"", "body"}:
        return InvalidRequestError(f"the body must be a JSON object: {first['msg']}", param="body")
    # A union reports one error per branch; for documents that reads best as one sentence.
    if where.startswith("documents[") and first.get("type") in {"string_type", "dict_type"}:
        return InvalidRequestError(f"{where} must be a string or an object with a text field", param=where)
    return InvalidRequestError(f"{where}: {first['msg']}", param=where)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RerankError)
    async def _rerank_error(request: Request, error: RerankError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        if isinstance(error.body, bytes | bytearray) and error.body:
            # FastAPI parses JSON only under a JSON Content-Type (a missing one included, against CSRF), so
            # the body arrived as raw bytes: say what to send instead of "must be a JSON object".
            content_type = (request.headers.get("content-type") or "none")[:100]
            return error_response(
                UnsupportedMediaTypeError(
                    f"send the body as JSON with Content-Type: application/json (got {content_type!r})",
                    param="content-type",
                )
            )
        return error_response(validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        status = error.status_code
        if status == 400:
            # FastAPI's "error parsing the body": bad encoding, JSON nested too deeply, and the like.
            return error_response(MalformedBodyError("the body could not be parsed as JSON", param="body"))
        error_type = _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        message = error.detail if isinstance(error.detail, str) else "request failed"
        if status == 404:
            message = f"no route {request.method} {request.url.path}; rerank is POST /v1/rerank"
        return JSONResponse(error_payload(status, error_type, message), status, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        request_id = request.scope.get("state", {}).get("request_id", "")
        logger.exception("unexpected error (request %s)", request_id)
        return JSONResponse(
            error_payload(500, "server_error", f"internal error; quote request id {request_id} when reporting it"),
            500,
        )
