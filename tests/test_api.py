"""The HTTP layer on the fake backend: every dialect's request and response shape, and the error catalogue.

The fake backend scores by word overlap (logit = 4 × share of query words in the document − 2), so the right
ranking and scores are known in advance; everything else — routes, batcher, service, encoder — is real.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.engine.fake import FakeBackend


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def client(make_client: Any) -> TestClient:
    return make_client()


QUERY = "red apple pie"
DOCUMENTS = ["green pear", "red apple pie recipe", "apple", "red apple"]
# Shares of query words found: 0, 1, 1/3, 2/3 → ranking 1, 3, 2, 0
EXPECTED_ORDER = [1, 3, 2, 0]
EXPECTED_LOGIT = {0: -2.0, 1: 2.0, 2: 4 / 3 - 2, 3: 8 / 3 - 2}


def assert_error(response: Any, status: int, param: str | None = None, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    assert contains.lower() in error["message"].lower()
    return error


class TestStandardDialect:
    def test_openai_compatible_body_gets_results_sorted_with_sigmoid_scores(self, client: TestClient) -> None:
        body = {"model": "bge-reranker-base-local", "query": QUERY, "documents": DOCUMENTS, "top_n": 4}
        response = client.post("/v1/rerank", json=body)
        assert response.status_code == 200
        data = response.json()
        assert [r["index"] for r in data["results"]] == EXPECTED_ORDER
        for result in data["results"]:
            assert result["relevance_score"] == pytest.approx(sigmoid(EXPECTED_LOGIT[result["index"]]))
            assert 0 <= result["relevance_score"] <= 1
            assert "document" not in result
        assert data["model"] == "bge-reranker-base-local"
        assert data["id"] == response.headers["x-request-id"]
        # Tokens: fake tokens are words; pair = query(3) + doc words + 4 special tokens
        expected_tokens = sum(3 + len(doc.split()) + 4 for doc in DOCUMENTS)
        assert data["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}
        assert data["meta"]["tokens"] == {"input_tokens": expected_tokens, "output_tokens": 0}

    def test_seed_data_list_on_v1_rerank_only(self, client: TestClient) -> None:
        body = {"model": "x", "query": QUERY, "documents": DOCUMENTS, "top_n": 2}
        data = client.post("/v1/rerank", json=body).json()
        assert data["object"] == "list"
        assert data["data"] == [
            {"index": r["index"], "score": r["relevance_score"], "document": DOCUMENTS[r["index"]]}
            for r in data["results"]
        ]
        assert len(data["data"]) == 2
        assert "data" not in client.post("/v2/rerank", json=body).json()

    @pytest.mark.parametrize("top_n, expected", [(None, 4), (0, 4), (2, 2), (10_000, 4), (1, 1)])
    def test_top_n(self, client: TestClient, top_n: int | None, expected: int) -> None:
        body: dict[str, Any] = {"query": QUERY, "documents": DOCUMENTS}
        if top_n is not None:
            body["top_n"] = top_n
        results = client.post("/v1/rerank", json=body).json()["results"]
        assert [r["index"] for r in results] == EXPECTED_ORDER[:expected]

    def test_absent_top_n_key_and_null_are_all(self, client: TestClient) -> None:
        results = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": None}).json()
        assert len(results["results"]) == 4

    @pytest.mark.parametrize("flag", [True, "true", "True"])
    def test_return_documents_bool_or_xinference_string(self, client: TestClient, flag: Any) -> None:
        body = {"model": "m", "query": QUERY, "documents": DOCUMENTS, "return_documents": flag, "return_len": "true"}
        results = client.post("/v1/rerank", json=body).json()["results"]
        assert [r["document"]["text"] for r in results] == [DOCUMENTS[i] for i in EXPECTED_ORDER]

    @pytest.mark.parametrize("flag", [False, "false"])
    def test_return_documents_false(self, client: TestClient, flag: Any) -> None:
        body = {"query": QUERY, "documents": DOCUMENTS, "return_documents": flag}
        assert all("document" not in r for r in client.post("/v1/rerank", json=body).json()["results"])

    def test_documents_as_text_objects(self, client: TestClient) -> None:
        body = {"query": QUERY, "documents": [{"text": d, "id": n} for n, d in enumerate(DOCUMENTS)]}
        results = client.post("/v1/rerank", json=body).json()["results"]
        assert [r["index"] for r in results] == EXPECTED_ORDER

    def test_cohere_rank_fields(self, client: TestClient) -> None:
        documents = [{"title": "green pear", "body": "x"}, {"title": "red apple pie", "body": "y"}]
        body = {"query": QUERY, "documents": documents, "rank_fields": ["title"]}
        results = client.post("/v1/rerank", json=body).json()["results"]
        assert [r["index"] for r in results] == [1, 0]

    def test_raw_scores_are_logits(self, client: TestClient) -> None:
        body = {"query": QUERY, "documents": DOCUMENTS, "raw_scores": True}
        results = client.post("/v1/rerank", json=body).json()["results"]
        assert results[0]["relevance_score"] == pytest.approx(2.0)
        assert results[-1]["relevance_score"] == pytest.approx(-2.0)

    def test_unknown_fields_and_any_model_name_are_accepted(self, client: TestClient) -> None:
        body = {
            "model": "bge-reranker-base___OpenAI-API",
            "query": QUERY,
            "documents": DOCUMENTS,
            "max_chunks_per_doc": 1024,
            "overlap_tokens": 80,
            "something_new": {"a": [1]},
        }
        assert client.post("/v1/rerank", json=body).status_code == 200

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/rerank",
            "/v1/rerank/",
            "/rerank",
            "/rerank/",
            "/v2/rerank",
            "/v2/rerank/",
            "/v1",
            "/v1/",
            "/",
            "/v1/v1/rerank",
            "/v1/v1/rerank/",
        ],
    )
    def test_every_rerank_path_and_trailing_slash(self, client: TestClient, path: str) -> None:
        response = client.post(path, json={"query": QUERY, "documents": DOCUMENTS}, follow_redirects=False)
        assert response.status_code == 200
        assert [r["index"] for r in response.json()["results"]] == EXPECTED_ORDER

    def test_empty_documents_is_an_empty_answer(self, client: TestClient) -> None:
        data = client.post("/v1/rerank", json={"query": QUERY, "documents": []}).json()
        assert data["results"] == [] and data["usage"]["total_tokens"] == 0


class TestOtherDialects:
    def test_tei_bare_list_sorted_with_text(self, client: TestClient) -> None:
        body = {"query": QUERY, "texts": DOCUMENTS, "raw_scores": False, "truncate": True, "return_text": True}
        data = client.post("/rerank", json=body).json()
        assert isinstance(data, list)
        assert [item["index"] for item in data] == EXPECTED_ORDER
        assert [item["text"] for item in data] == [DOCUMENTS[i] for i in EXPECTED_ORDER]
        assert data[0]["score"] == pytest.approx(sigmoid(2.0))

    def test_tei_raw_scores_on_v1(self, client: TestClient) -> None:
        body = {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True, "truncate": True}
        data = client.post("/v1/rerank", json=body).json()
        assert [item["score"] for item in data] == pytest.approx([EXPECTED_LOGIT[i] for i in EXPECTED_ORDER])
        assert all("text" not in item for item in data)

    @pytest.mark.parametrize("path", ["/v1/reranking", "/reranking", "/v1/reranking/", "/v1/ranking", "/ranking"])
    def test_nvidia_rankings(self, client: TestClient, path: str) -> None:
        body = {
            "model": "nvidia/x",
            "query": {"text": QUERY},
            "passages": [{"text": d} for d in DOCUMENTS],
            "truncate": "END",
            "top_n": 3,
        }
        data = client.post(path, json=body).json()
        assert [r["index"] for r in data["rankings"]] == EXPECTED_ORDER[:3]
        assert data["rankings"][0]["logit"] == pytest.approx(2.0)

    @pytest.mark.parametrize("path", ["/v1/models", "/models", "/v1/models/", "/v1/v1/models"])
    def test_models(self, client: TestClient, path: str) -> None:
        data = client.get(path).json()
        assert data["object"] == "list"
        assert [m["id"] for m in data["data"]] == ["bge-reranker-base-local"]
        assert data["data"][0]["object"] == "model"
        assert (data["data"][0]["model_type"], data["data"][0]["max_model_len"]) == ("rerank", 512)
        assert (data["data"][0]["device"], data["data"][0]["dtype"]) == ("fake", "float32")

    def test_tei_info(self, make_client: Any) -> None:
        assert make_client(api_key="secret").get("/info").status_code == 401  # guarded like /v1/models
        info = make_client().get("/info").json()
        assert info["model_id"] == "bge-reranker-base-local"
        assert set(info["model_type"]) == {"reranker", "rerank"}
        assert info["model_type"]["rerank"]["id2label"] == {"0": "LABEL_0"}
        assert (info["max_input_length"], info["model_dtype"]) == (512, "float32")

    def test_health_ready_docs(self, client: TestClient) -> None:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json() == {"status": "ready"}
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/rerank", "/rerank", "/v2/rerank", "/v1/reranking", "/v1/models", "/ready"} <= set(paths)


class TestErrors:
    @pytest.mark.parametrize(
        "body, status, param, contains",
        [
            ('{"query": "q", "documents": [', 400, "body", "not valid JSON"),
            ("", 400, "body", "empty"),
            ("[1, 2]", 422, "body", "JSON object"),
            ('{"documents": ["a"]}', 422, "query", "query is required"),
            ('{"query": null, "documents": ["a"]}', 422, "query", ""),
            ('{"query": "", "documents": ["a"]}', 422, "query", "non-empty"),
            ('{"query": "   ", "documents": ["a"]}', 422, "query", "non-empty"),
            ('{"query": 42, "documents": ["a"]}', 422, "query", "string"),
            ('{"query": "q"}', 422, "documents", "documents is required"),
            ('{"query": "q", "documents": "a"}', 422, "documents", ""),
            ('{"query": "q", "documents": [1]}', 422, "documents[0]", "string or an object with a text field"),
            ('{"query": "q", "documents": ["a", null]}', 422, "documents[1]", ""),
            ('{"query": "q", "documents": ["a", {"title": "x"}]}', 422, "documents[1]", "text field"),
            ('{"query": "q", "documents": ["a"], "top_n": -1}', 422, "top_n", "greater than or equal to 0"),
            ('{"query": "q", "documents": ["a"], "top_n": "many"}', 422, "top_n", ""),
            ('{"query": "q", "documents": ["a"], "max_chunks_per_doc": 0}', 422, "max_chunks_per_doc", ""),
            ('{"query": "q", "documents": ["a"], "return_documents": "maybe"}', 422, "return_documents", ""),
            ("[" * 50_000 + "]" * 50_000, 400, "body", ""),
        ],
    )
    def test_bad_bodies_get_a_4xx_envelope(
        self, client: TestClient, body: str, status: int, param: str, contains: str
    ) -> None:
        response = client.post("/v1/rerank", content=body, headers={"content-type": "application/json"})
        assert_error(response, status, param, contains)

    def test_invalid_utf8_is_a_400(self, client: TestClient) -> None:
        response = client.post(
            "/v1/rerank",
            content=b'{"query": "\xff\xfe", "documents": ["a"]}',
            headers={"content-type": "application/json"},
        )
        assert_error(response, 400, "body")

    def test_too_many_documents_is_413_naming_the_limit(self, make_client: Any) -> None:
        client = make_client(max_documents=5)
        response = client.post("/v1/rerank", json={"query": "q", "documents": ["a"] * 6})
        assert_error(response, 413, "documents", "limit is 5")

    def test_too_large_body_is_413_naming_the_limit(self, make_client: Any) -> None:
        client = make_client(max_request_bytes=2048)
        response = client.post("/v1/rerank", json={"query": "q", "documents": ["word " * 1000]})
        assert_error(response, 413, "body", "2048 bytes")

    def test_unknown_route_and_method(self, client: TestClient) -> None:
        assert_error(client.get("/v1/nothing"), 404)
        assert_error(client.get("/v1/rerank"), 405)

    def test_overloaded_worker_answers_429_with_retry_after(self, make_client: Any) -> None:
        backend = FakeBackend(forward_delay_s=0.5)
        client = make_client(backend, max_queue_pairs=3)
        with ThreadPoolExecutor(max_workers=1) as pool:
            busy = pool.submit(client.post, "/v1/rerank", json={"query": "q", "documents": ["a"] * 3})
            time.sleep(0.2)  # the first request holds all 3 places of the queue
            response = client.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
            assert busy.result().status_code == 200
        assert_error(response, 429, None, "queued")
        assert int(response.headers["retry-after"]) >= 1
        # and it serves again once the queue has drained
        assert client.post("/v1/rerank", json={"query": "q", "documents": ["a"] * 3}).status_code == 200

    def test_a_request_larger_than_the_whole_queue_is_413_not_429(self, make_client: Any) -> None:
        client = make_client(max_queue_pairs=3)
        response = client.post("/v1/rerank", json={"query": "q", "documents": ["a"] * 4})
        assert_error(response, 413, "documents", "at most 3")
        assert "retry-after" not in response.headers

    def test_forward_failure_is_a_500_envelope_and_the_next_request_works(self, make_client: Any) -> None:
        backend = FakeBackend()
        client = make_client(backend)
        backend.fail_next_forward = True
        error = assert_error(client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}), 500)
        assert "simulated" not in error["message"]  # internal details stay in the log
        response = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
        assert [r["index"] for r in response.json()["results"]] == EXPECTED_ORDER

    def test_unhealthy_backend_fails_readiness_with_retry_after(self, make_client: Any) -> None:
        backend = FakeBackend()
        client = make_client(backend)
        backend.healthy = False
        import app.service as service_module

        service_module.HEALTH_CACHE_S, saved = 0.0, service_module.HEALTH_CACHE_S
        try:
            response = client.get("/ready")
        finally:
            service_module.HEALTH_CACHE_S = saved
        assert_error(response, 503, None, "health check")
        assert "retry-after" in response.headers
        assert client.get("/health").status_code == 200


class TestApiKey:
    def test_key_required_everywhere_but_health_ready_metrics(self, make_client: Any) -> None:
        client = make_client(api_key="s3cret")
        body = {"query": QUERY, "documents": DOCUMENTS}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer "},
            {"Authorization": "Basic s3cret"},
        ):
            response = client.post("/v1/rerank", json=body, headers=headers)
            assert_error(response, 401, "authorization")
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert_error(client.get("/v1/models"), 401)
        assert client.post("/v1/rerank", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert client.get("/metrics").status_code == 200

    def test_metrics_can_be_guarded_too(self, make_client: Any) -> None:
        client = make_client(api_key="s3cret", metrics_need_key=True)
        assert_error(client.get("/metrics"), 401)
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200

    @pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer x"}, {"Authorization": "Bearer "}])
    def test_without_a_key_any_header_is_accepted(self, client: TestClient, headers: dict[str, str]) -> None:
        assert (
            client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}, headers=headers).status_code == 200
        )


class TestRequestIdAndLogs:
    def test_request_id_is_honoured_and_returned(self, client: TestClient) -> None:
        response = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}, headers={"X-Request-ID": "abc-123"}
        )
        assert response.headers["x-request-id"] == "abc-123"
        assert response.json()["id"] == "abc-123"

    def test_a_hostile_request_id_is_replaced(self, client: TestClient) -> None:
        response = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces" * 20})
        assert len(response.headers["x-request-id"]) == 32

    def test_one_access_line_without_document_text(self, client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level("INFO", logger="app.access")
        client.post(
            "/v1/rerank",
            json={"query": "secret query words", "documents": ["confidential text"]},
            headers={"X-Request-ID": "log-check"},
        )
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "app.access"]
        assert len(lines) == 1
        line = lines[0]
        assert line["request_id"] == "log-check" and line["route"] == "/v1/rerank" and line["status"] == 200
        assert line["documents"] == 1 and line["tokens"] == 3 + 2 + 4 and line["latency_ms"] >= 0
        assert "confidential" not in caplog.text and "secret query" not in caplog.text

    def test_access_line_says_where_the_time_went(self, make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
        from app.engine.fake import FakeBackend

        client = make_client(FakeBackend(forward_delay_s=0.05))
        caplog.set_level("INFO", logger="app.access")
        assert client.post("/v1/rerank", json={"query": "a b", "documents": ["a", "b c"]}).status_code == 200
        line = next(json.loads(r.getMessage()) for r in caplog.records if r.name == "app.access")
        assert line["score_ms"] >= 50  # the queue and the (50 ms) forward pass
        assert 0 <= line["tokenize_ms"] < line["score_ms"]
        assert line["latency_ms"] >= line["tokenize_ms"] + line["score_ms"]


class TestLongDocuments:
    """With a 24-token window the fake model shows what chunking buys: the answer sits past the first window."""

    FILLER = " ".join(f"filler{i}" for i in range(40))
    LATE = f"{FILLER} red apple pie"  # the matching words are tokens 40-42, far past the first window

    def test_chunking_finds_a_late_passage_that_truncation_misses(self, make_client: Any) -> None:
        client = make_client(FakeBackend(max_length=24))
        documents = [self.LATE, "apple"]
        truncated = client.post("/v1/rerank", json={"query": QUERY, "documents": documents}).json()
        assert [r["index"] for r in truncated["results"]] == [1, 0]
        assert "chunk" not in truncated["results"][1]
        chunked = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": documents, "max_chunks_per_doc": 10, "overlap_tokens": 4}
        ).json()
        assert [r["index"] for r in chunked["results"]] == [0, 1]
        best = chunked["results"][0]
        assert best["relevance_score"] == pytest.approx(sigmoid(2.0))
        # room = 24 - 4 special - 3 query = 17, stride 13: windows start at 0, 13, 26 (the last holds 26..42)
        assert best["chunk"] == {"index": 2, "count": 3}
        # usage counts every scored window: 3 windows of the long document + "apple"
        window_tokens = [3 + 17 + 4, 3 + 17 + 4, 3 + (43 - 26) + 4]
        assert chunked["usage"]["total_tokens"] == sum(window_tokens) + (3 + 1 + 4)

    def test_chunking_can_be_the_default(self, make_client: Any) -> None:
        client = make_client(FakeBackend(max_length=24), long_documents="chunk")
        results = client.post("/v1/rerank", json={"query": QUERY, "documents": [self.LATE, "apple"]}).json()
        assert results["results"][0]["index"] == 0

    def test_max_tokens_per_doc_limits_what_is_scored(self, make_client: Any) -> None:
        client = make_client(FakeBackend(max_length=24))
        body = {"query": QUERY, "documents": [self.LATE, "apple"], "max_tokens_per_doc": 30}
        results = client.post("/v2/rerank", json=body).json()["results"]
        assert [r["index"] for r in results] == [1, 0]  # the answer lies past token 30: not scored
        body["max_tokens_per_doc"] = 4096
        assert client.post("/v2/rerank", json=body).json()["results"][0]["index"] == 0

    def test_short_documents_are_unchanged_by_chunking(self, client: TestClient) -> None:
        plain = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}).json()["results"]
        chunked = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "max_chunks_per_doc": 8, "overlap_tokens": 80}
        ).json()["results"]
        assert plain == chunked

    def test_too_many_windows_is_a_413(self, make_client: Any) -> None:
        client = make_client(FakeBackend(max_length=24), max_windows_per_request=5)
        body = {"query": QUERY, "documents": [self.LATE, self.LATE], "max_chunks_per_doc": 10}
        assert_error(client.post("/v1/rerank", json=body), 413, "documents", "limit is 5")
