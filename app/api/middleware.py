"""Pure ASGI middleware: request id, access log and metrics around every request; a body size limit.

Pure ASGI (not BaseHTTPMiddleware) so the app still sees the client's disconnect through ``receive``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.errors import error_body

access_logger = logging.getLogger("app.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Gives every request an id (honouring a sane ``X-Request-ID``), logs one line and counts it once."""

    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500  # if the app dies before answering, that is what the client sees

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            # FastAPI's own routes (/docs, /openapi.json) match without a "route" in the scope, only an endpoint;
            # a path nothing matched stays "unmatched" (one label, however many paths are probed).
            route_path = getattr(route, "path", None) or (scope["path"] if scope.get("endpoint") else "unmatched")
            model = state.get("model", "")  # set once the route's dependency resolved it
            metrics.REQUESTS.labels(route_path, scope["method"], str(status), model).inc()
            metrics.REQUEST_LATENCY.labels(route_path, model).observe(elapsed)
            if self.access_log and route_path not in {"/health", "/metrics"}:
                record = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route_path,
                    "model": model,
                    "path": scope["path"],
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 2),
                }
                # Counts only: document text is never logged.
                # tokenize_ms and score_ms (queue + forward passes) say where latency_ms went.
                for key in ("documents", "windows", "tokens", "dialect", "tokenize_ms", "score_ms"):
                    if key in state:
                        record[key] = state[key]
                access_logger.info(json.dumps(record))


class BodyLimitMiddleware:
    """Answers 413 for bodies over ``max_bytes`` before anything parses them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in {"GET", "HEAD", "OPTIONS"}:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        # Read the body here (it is needed whole anyway), counting, then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the client's disconnect, as the server would

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = error_body(
            413,
            "request_too_large",
            f"the request body is larger than {self.max_bytes} bytes (RERANKER_MAX_REQUEST_BYTES)",
            "body",
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None
