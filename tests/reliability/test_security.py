"""Security, in process on the fake engine: the API key guards every route but the operational ones, is compared
in constant time and never logged; document text is never logged; bodies and document counts are bounded.

The same promises are checked on a real server's log in test_bad_input.py.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.engine.fake import FakeBackend

pytestmark = pytest.mark.reliability

KEY = "rk-" + uuid.uuid4().hex
SENTINEL = "SENTINEL" + uuid.uuid4().hex
# Open without a key: probes and FastAPI's own API description. Everything else needs it.
OPEN_PATHS = {
    "/health",
    "/ready",
    "/models/{model_name}/ready",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}


def flatten(routes: list[Any]) -> Iterator[Any]:
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI ≥ 0.130 wraps included routers
        if included is not None:
            yield from flatten(included.routes)
        else:
            yield route


def every_route(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, the hidden trailing-slash twins included."""
    routes = []
    for route in flatten(client.app.routes):  # type: ignore[attr-defined]
        methods = sorted(route.methods - {"HEAD"}) if isinstance(route, APIRoute) else ["GET"]
        routes.extend((method, route.path) for method in methods)
    return routes


def test_the_key_guards_every_route_but_the_open_ones(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key=KEY)
    routes = every_route(client)
    assert len([route for route in routes if route[1] not in OPEN_PATHS]) >= 19  # all dialects, both slashes
    body = {"query": "red apple", "documents": ["red apple pie"], "passages": [{"text": "red apple"}]}
    served = client.app.state.models.names[0]  # type: ignore[attr-defined]
    for method, route in routes:
        path = route.replace("{model_name}", served)  # the model-scoped routes, under the served model's name
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Bearer"}):
            response = client.request(method, path, headers=headers, json=body if method == "POST" else None)
            if route in OPEN_PATHS:
                assert response.status_code == 200, (method, path, headers)
            else:
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == 'Bearer realm="reranker"'
        if route not in OPEN_PATHS:
            good = client.request(
                method, path, headers={"Authorization": f"Bearer {KEY}"}, json=body if method == "POST" else None
            )
            assert good.status_code == 200, (method, path, good.text)


def test_metrics_can_be_put_behind_the_key(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_key=KEY, metrics_need_key=True)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


def test_the_key_is_compared_in_constant_time(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("app.api.deps.hmac.compare_digest", spy)
    client = make_client(api_key=KEY)
    assert client.get("/v1/models", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert compared == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_neither_key_nor_text_is_logged_even_when_a_request_fails(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    client = make_client(backend, api_key=KEY)
    caplog.set_level(logging.DEBUG)
    auth = {"Authorization": f"Bearer {KEY}"}
    documents = [f"red apple {SENTINEL}", SENTINEL]
    assert client.post("/v1/rerank", json={"query": SENTINEL, "documents": documents}, headers=auth).status_code == 200
    backend.fail_next_forward = True  # a server fault: logged with its traceback, but not with the request
    assert client.post("/v1/rerank", json={"query": SENTINEL, "documents": documents}, headers=auth).status_code == 500
    assert client.post("/v1/rerank", json={"query": 1, "documents": documents}, headers=auth).status_code == 422
    assert (
        client.post(
            "/v1/rerank",
            json={"query": SENTINEL, "documents": documents},
            headers={"Authorization": f"Bearer {SENTINEL}"},
        ).status_code
        == 401
    )
    logged = "\n".join(f"{record.getMessage()} {record.exc_text or ''}" for record in caplog.records)
    assert "forward pass of" in logged  # the fault was logged ...
    assert KEY not in logged and SENTINEL not in logged  # ... without the key or any text


def test_bodies_and_document_counts_are_bounded_with_413_naming_the_limit(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_request_bytes=65536, max_documents=10, max_windows_per_request=20)
    too_big = client.post("/v1/rerank", json={"query": "q", "documents": ["word " * 20_000]})
    assert too_big.status_code == 413 and "RERANKER_MAX_REQUEST_BYTES" in too_big.json()["error"]["message"]
    too_many = client.post("/v1/rerank", json={"query": "q", "documents": ["a"] * 11})
    assert too_many.status_code == 413 and "RERANKER_MAX_DOCUMENTS" in too_many.json()["error"]["message"]
    assert client.post("/v1/rerank", json={"query": "q", "documents": ["a"] * 10}).status_code == 200
    windows = client.post("/v1/rerank", json={"query": "q", "documents": ["w " * 5000] * 3, "max_chunks_per_doc": 50})
    assert windows.status_code == 413 and "RERANKER_MAX_WINDOWS_PER_REQUEST" in windows.json()["error"]["message"]
