"""Bad input: property-based fuzzing of every route from the OpenAPI spec, and a hand-written catalogue of hostile
requests against a real ``python -m app`` server. Each gets its documented status (the README), and the
worker keeps serving correct scores afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.engine.fake import FakeBackend
from app.main import create_app
from tests.reliability.conftest import BASE_SETTINGS
from tests.reliability.harness import make_bodies, reference_scores, same_scores
from tests.utils import ServerProcess, fake_model_dir, start_server

pytestmark = pytest.mark.reliability

API_KEY = "rk-" + uuid.uuid4().hex  # a string that cannot appear in a log by accident
WRONG_KEY = "wrong-" + uuid.uuid4().hex
SENTINEL = "SENTINEL" + uuid.uuid4().hex  # document text that must never reach a log
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}

# ------------------------------------------------------------------------------------------- fuzzing

FUZZ_EXAMPLES = int(os.environ.get("RELIABILITY_FUZZ_EXAMPLES", "40"))
FUZZ_CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]
_fuzz_app = create_app(
    Settings(model_path=fake_model_dir(Path(tempfile.mkdtemp(prefix="fuzz-model-"))), api_key=API_KEY),
    backend_factory=lambda: FakeBackend(),
)
fuzz_schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app)
# Positive examples (valid per the spec) and negative ones (each breaking it somewhere).
fuzz_schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
fuzz_calls: list[int] = []


@fuzz_schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_fuzzing_every_route_finds_no_5xx_and_no_off_schema_response(case: Any) -> None:
    """No 5xx, every response (error envelopes included) matches the spec's schema, status and content type.

    Not checked: that schema-violating input is always refused. It is not, by design: pydantic's lax mode takes
    ``"5"`` for 5 and ``"true"`` for true, which the clients of shared/RERANK_WIRE.md rely on (Xinference).
    """
    fuzz_calls.append(1)
    case.call_and_validate(headers=AUTH, checks=FUZZ_CHECKS)


def test_fuzzing_also_covers_the_unauthenticated_path() -> None:
    """Every operation, without and with a wrong key: 401 envelopes, or 200 for the open operations."""
    from fastapi.testclient import TestClient

    if fuzz_calls:
        print(f"\nfuzzing sent {len(fuzz_calls)} requests to {len(fuzz_schema)} operations")
    with TestClient(_fuzz_app) as client:
        for path, methods in client.get("/openapi.json").json()["paths"].items():
            for method in methods:
                for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}):
                    # A model-scoped path with the served model's name (the open readiness would 404 another).
                    concrete = path.replace("{model_name}", _fuzz_app.state.models.names[0])
                    response = client.request(method.upper(), concrete, headers=headers, json={"query": "q"})
                    if path in {"/health", "/ready", "/metrics", "/models/{model_name}/ready"}:
                        assert response.status_code == 200, (method, path)
                    else:
                        assert response.status_code == 401, (method, path)
                        assert response.json()["error"]["type"] == "authentication_error"


# ------------------------------------------------------------------------------------------- the catalogue


@dataclass
class Case:
    name: str
    body: bytes | Any = b""  # bytes are sent as they are; anything else as JSON
    status: int = 200
    param: str | None = None
    contains: str = ""
    headers: dict[str, Any] = field(default_factory=lambda: dict(JSON_AUTH))
    path: str = "/v1/rerank"
    method: str = "POST"

    def content(self) -> bytes | Iterator[bytes]:
        if isinstance(self.body, bytes):
            return self.body
        if callable(self.body):
            return self.body()
        return json.dumps(self.body).encode()


def standard(**extra: Any) -> dict[str, Any]:
    return {"query": "kalo mine", "documents": [f"kalo mine {SENTINEL}", f"ruvo {SENTINEL}"], **extra}


def chunked_5mb() -> Iterator[bytes]:
    """5 MB with no Content-Length (chunked): the limit is counted while reading, not only declared."""
    yield b'{"query": "q", "documents": ["'
    for _ in range(50):
        yield b"a" * 100_000
    yield b'"]}'


CATALOGUE = [
    # Not JSON, or not an object
    Case("invalid JSON", b'{"query": "q", "documents": [', 400, "body", "not valid JSON"),
    Case("empty body", b"", 400, "body", "empty"),
    Case("JSON null", b"null", 422, "body", "JSON object"),
    Case("JSON array", b"[1, 2]", 422, "body", "JSON object"),
    Case("deeply nested JSON (100,000 levels)", b"[" * 100_000 + b"]" * 100_000, 400, "body"),
    Case(
        "deeply nested JSON inside a document",
        b'{"query": "q", "documents": [' + b"[" * 5_000 + b"]" * 5_000 + b"]}",
        400,
        "body",
    ),
    Case("invalid UTF-8", b'{"query": "\xff\xfe", "documents": ["a"]}', 400, "body"),
    Case("raw NUL byte inside a JSON string", b'{"query": "a\x00b", "documents": ["a"]}', 400, "body"),
    Case(
        "number with 5,000 digits", b'{"query": "q", "documents": ["a"], "top_n": 1' + b"0" * 5_000 + b"}", 400, "body"
    ),
    Case("NaN literal", b'{"query": "q", "documents": ["a"], "top_n": NaN}', 422, "top_n"),
    # Wrong types and nulls
    Case("query is a number", {"query": 42, "documents": ["a"]}, 422, "query", "string"),
    Case("query is null", {"query": None, "documents": ["a"]}, 422, "query"),
    Case("query is blank", {"query": "  ", "documents": ["a"]}, 422, "query", "non-empty"),
    Case("query is missing", {"documents": ["a"]}, 422, "query", "required"),
    Case("documents is null", {"query": "q", "documents": None}, 422, "documents", "required"),
    Case("documents is a string", {"query": "q", "documents": "abc"}, 422, "documents"),
    Case("a document is null", {"query": "q", "documents": ["a", None]}, 422, "documents[1]"),
    Case("a document is a number", {"query": "q", "documents": [1]}, 422, "documents[0]"),
    Case("a document object has no text", {"query": "q", "documents": [{"title": SENTINEL}]}, 422, "documents[0]"),
    Case(
        "rank_fields name a non-string",
        {"query": "q", "documents": [{"a": 1}], "rank_fields": ["a"]},
        422,
        "documents[0]",
    ),
    Case("TEI texts hold a number", {"query": "q", "texts": [1]}, 422, "texts[0]"),
    Case(
        "NVIDIA passages hold strings",
        {"query": {"text": "q"}, "passages": ["a"]},
        422,
        "passages[0]",
        path="/v1/reranking",
    ),
    Case("top_n is a word", standard(top_n="many"), 422, "top_n"),
    Case("top_n is a fraction", standard(top_n=1.5), 422, "top_n"),
    Case("top_n is negative", standard(top_n=-1), 422, "top_n", "greater than or equal to 0"),
    Case("top_n is 10**30 (all documents)", standard(top_n=10**30), 200),
    Case("max_chunks_per_doc is 0", standard(max_chunks_per_doc=0), 422, "max_chunks_per_doc"),
    Case("max_chunks_per_doc is 10**20", standard(max_chunks_per_doc=10**20), 200),
    Case("overlap_tokens is 10**20", standard(max_chunks_per_doc=3, overlap_tokens=10**20), 200),
    Case("return_documents is 'maybe'", standard(return_documents="maybe"), 422, "return_documents"),
    Case("unknown fields are ignored", standard(extra={"x": [1, 2]}, foo="bar"), 200),
    Case("duplicate keys (the last wins)", b'{"query": "a", "query": "kalo", "documents": ["kalo"]}', 200),
    # Text that is valid JSON but hostile
    Case("lone surrogate in the query", b'{"query": "\\ud800", "documents": ["a"]}', 422, "query", "surrogate"),
    Case(
        "lone surrogate in a document",
        b'{"query": "q", "documents": ["a", "x\\udfffy"]}',
        422,
        "documents[1]",
        "surrogate",
    ),
    Case("NUL characters (escaped)", {"query": "a\u0000b", "documents": ["\u0000", f"x\u0000y {SENTINEL}"]}, 200),
    Case(
        "mixed scripts, emoji, RTL and zero-width",
        {
            "query": "東京 café 🙂 Москва",
            "documents": ["naïve café 東京 🙂", "مرحبا שלום नमस्ते", "🙂" * 1_000, "\u202e\u200b\ufeff", SENTINEL],
        },
        200,
    ),
    Case("empty documents list", {"query": "q", "documents": []}, 200),
    # Sizes and limits
    Case("100,000 documents", {"query": "q", "documents": ["a"] * 100_000}, 413, "documents", "RERANKER_MAX_DOCUMENTS"),
    Case(
        "one 10 MB document", {"query": "q", "documents": ["a" * 10_000_000]}, 413, "body", "RERANKER_MAX_REQUEST_BYTES"
    ),
    Case("5 MB chunked, no Content-Length", chunked_5mb, 413, "body", "RERANKER_MAX_REQUEST_BYTES"),
    Case(
        "one 3 MB document (under the limit: truncated and scored)",
        {"query": "kalo", "documents": ["kalo " * 600_000]},
        200,
    ),
    Case(
        "too many windows",
        {"query": "q", "documents": ["kalo " * 20_000] * 10, "max_chunks_per_doc": 1_000},
        413,
        "documents",
        "RERANKER_MAX_WINDOWS_PER_REQUEST",
    ),
    # Content type
    Case(
        "Content-Type text/plain",
        standard(),
        415,
        "content-type",
        "application/json",
        headers={**AUTH, "Content-Type": "text/plain"},
    ),
    Case(
        "Content-Type form (curl -d)",
        standard(),
        415,
        "content-type",
        "application/json",
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    ),
    Case("no Content-Type", standard(), 415, "content-type", headers=dict(AUTH)),
    Case(
        "Content-Type application/json; charset=utf-8",
        standard(),
        200,
        headers={**AUTH, "Content-Type": "application/json; charset=utf-8"},
    ),
    # API key
    Case(
        "no Authorization header",
        standard(),
        401,
        "authorization",
        "missing API key",
        headers={"Content-Type": "application/json"},
    ),
    Case(
        "wrong key",
        standard(),
        401,
        "authorization",
        "invalid API key",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {WRONG_KEY}"},
    ),
    Case(
        "Bearer with no key",
        standard(),
        401,
        "authorization",
        headers={"Content-Type": "application/json", "Authorization": "Bearer"},
    ),
    Case(
        "Basic instead of Bearer",
        standard(),
        401,
        "authorization",
        headers={"Content-Type": "application/json", "Authorization": "Basic " + API_KEY},
    ),
    Case(
        "key with non-ASCII bytes",
        standard(),
        401,
        "authorization",
        headers={"Content-Type": "application/json", "Authorization": "Bearer é".encode("latin-1")},
    ),
    Case(
        "key in lower-case scheme",
        standard(),
        200,
        headers={"Content-Type": "application/json", "Authorization": f"bearer {API_KEY}"},
    ),
    # Routes and methods
    Case("GET on a rerank route", b"", 405, method="GET"),
    Case("unknown route", standard(), 404, path="/v1/nothing"),
    Case(
        "an X-Request-ID that is not sane is replaced",
        standard(),
        200,
        headers={**JSON_AUTH, "X-Request-ID": "x" * 500},
    ),
]


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server with an API key and debug logging (so even debug lines are searched for secrets)."""
    server = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("guarded"),
        workers=2,
        **BASE_SETTINGS,
        RERANKER_API_KEY=API_KEY,
        RERANKER_LOG_LEVEL="debug",
        RERANKER_MAX_WINDOWS_PER_REQUEST="256",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(guarded_server: ServerProcess) -> tuple[dict[str, Any], dict[int, float], list[int]]:
    body = make_bodies(1, seed=11)[0]
    return body, reference_scores(guarded_server.base_url, [body], **AUTH)[0], guarded_server.worker_pids()


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.name for case in CATALOGUE])
def test_catalogue_gets_the_documented_status_and_the_worker_keeps_serving(
    guarded_server: ServerProcess, reference: tuple[dict[str, Any], dict[int, float], list[int]], case: Case
) -> None:
    response = httpx.request(
        case.method, f"{guarded_server.base_url}{case.path}", headers=case.headers, content=case.content(), timeout=60
    )
    assert response.status_code == case.status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    if case.status >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == case.status
        assert "Traceback" not in response.text and SENTINEL not in response.text
        if case.param is not None:
            assert body["error"]["param"] == case.param
        assert case.contains.lower() in body["error"]["message"].lower()
        if case.status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")
    elif case.path == "/v1/rerank":
        answer = response.json()
        scores = [item["relevance_score"] for item in answer["results"]]
        assert all(0.0 <= score <= 1.0 for score in scores) and scores == sorted(scores, reverse=True)
        assert response.headers["x-request-id"] and len(response.headers["x-request-id"]) <= 128

    # Whatever came before, the same workers answer a normal request with the same scores.
    body, expected, pids = reference
    again = httpx.post(f"{guarded_server.base_url}/v1/rerank", json=body, headers=AUTH, timeout=30)
    assert again.status_code == 200 and same_scores(again.json(), expected)
    assert guarded_server.worker_pids() == pids, "a worker died or was replaced"


def test_neither_the_key_nor_document_text_reaches_the_log(guarded_server: ServerProcess) -> None:
    """At debug level, after good, bad and failing requests carrying both: the log holds neither."""
    client = guarded_server.client()
    client.post("/v1/rerank", json=standard(), headers=AUTH)
    client.post("/v1/rerank", json=standard(top_n="x"), headers=AUTH)  # a validation error
    client.post("/v1/rerank", json={"query": SENTINEL, "documents": [SENTINEL]}, headers=AUTH)
    client.post("/v1/rerank", json=standard(), headers={"Authorization": f"Bearer {WRONG_KEY}"})
    client.post("/v1/rerank", content=f'{{"query": "{SENTINEL}", "documents": ['.encode(), headers=JSON_AUTH)
    client.get("/v1/models", headers=AUTH)
    client.close()
    log = guarded_server.log()
    assert '"status": 401' in log and '"status": 422' in log  # the requests were logged ...
    assert API_KEY not in log  # ... without the key,
    assert WRONG_KEY not in log  # without a wrong guess,
    assert SENTINEL not in log  # and without any document or query text.
    # No request in the whole module was a server fault.
    assert "Traceback" not in log
    assert '"status": 500' not in log
