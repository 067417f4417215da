"""The real server: ``python -m app`` (gunicorn, 2 uvicorn workers) on the tiny model, spoken to over HTTP with
every request shape in shared/RERANK_WIRE.md, and /metrics counting each request exactly once across workers.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.model_factory import make_words
from tests.utils import REPO_ROOT, ServerProcess, start_server

pytestmark = pytest.mark.server

QUERY = "What's the weather?"
DOCS = ["Is it sunny today?", make_words(40, seed=1), make_words(120, seed=2), "Hi, there!", "Ohh, my friend!"]

# (name, method, path, headers, body, dialect): each RAGFlow provider's exact request, then the other clients'.
FERN = {"X-Fern-Language": "Python", "X-Fern-SDK-Name": "cohere", "X-Fern-SDK-Version": "5.6.2"}
BEARER = {"Authorization": "Bearer x"}
# RAGFlow's NVIDIA provider (Python) posts this to .../reranking; for its Go server's .../ranking the same NVIDIA
# body is assumed (the paths come from the issue; the Go source was not read).
NVIDIA_BODY = {
    "model": "m",
    "query": {"text": QUERY},
    "passages": [{"text": d} for d in DOCS],
    "truncate": "END",
    "top_n": 5,
}
SHAPES: list[tuple[str, str, dict[str, str], dict[str, Any], str]] = [
    (
        "ragflow-openai-compatible-v0.24",
        "/v1/rerank",
        BEARER,
        {"model": "bge-reranker-base-local", "query": QUERY, "documents": DOCS, "top_n": len(DOCS)},
        "results",
    ),
    (
        "ragflow-openai-compatible-v0.13",
        "/rerank",
        {"Authorization": "Bearer "},
        {"model": "bge-reranker-base-local___OpenAI-API", "query": QUERY, "documents": DOCS, "top_n": len(DOCS)},
        "results",
    ),
    (
        "ragflow-localai",
        "/rerank",
        {},
        {"model": "m", "query": QUERY, "documents": DOCS, "top_n": len(DOCS)},
        "results",
    ),
    (
        "ragflow-base-url-with-rerank-v1",
        "/v1",
        BEARER,
        {"model": "m", "query": QUERY, "documents": DOCS, "top_n": len(DOCS)},
        "results",
    ),
    (
        "ragflow-base-url-with-rerank-root",
        "/",
        BEARER,
        {"model": "m", "query": QUERY, "documents": DOCS, "top_n": len(DOCS)},
        "results",
    ),
    (
        "ragflow-huggingface-tei",
        "/v1/rerank",
        {},
        {"query": QUERY, "texts": DOCS[:8], "raw_scores": False, "truncate": True},
        "tei",
    ),
    (
        "ragflow-xinference",
        "/v1/rerank",
        BEARER,
        {"model": "m", "query": QUERY, "documents": DOCS, "return_documents": "true", "return_len": "true"},
        "results",
    ),
    (
        "ragflow-vllm-cohere-sdk",
        "/v1/rerank",
        {**BEARER, **FERN},
        {"model": "m", "query": QUERY, "documents": DOCS, "top_n": 3, "return_documents": False},
        "results",
    ),
    (
        "ragflow-gpustack",
        "/v1/v1/rerank",
        BEARER,
        {"model": "m", "query": QUERY, "documents": DOCS, "top_n": 5},
        "results",
    ),
    (
        "ragflow-nvidia-v0.27",
        "/v1/reranking",
        BEARER,
        NVIDIA_BODY,
        "nvidia",
    ),
    (
        "ragflow-nvidia-v0.26",
        "/reranking",
        BEARER,
        NVIDIA_BODY,
        "nvidia",
    ),
    (
        "ragflow-nvidia-go-server",
        "/v1/ranking",
        BEARER,
        NVIDIA_BODY,
        "nvidia",
    ),
    (
        "ragflow-nvidia-go-server-no-v1",
        "/ranking",
        BEARER,
        NVIDIA_BODY,
        "nvidia",
    ),
    (
        "ragflow-siliconflow",
        "/v1/rerank",
        BEARER,
        {
            "model": "m",
            "query": QUERY,
            "documents": DOCS,
            "top_n": 5,
            "return_documents": False,
            "max_chunks_per_doc": 1024,
            "overlap_tokens": 80,
        },
        "results",
    ),
    ("ragflow-jina", "/v1/rerank", BEARER, {"model": "m", "query": QUERY, "documents": DOCS, "top_n": 5}, "results"),
    (
        "cohere-v1-objects",
        "/v1/rerank",
        BEARER,
        {
            "model": "m",
            "query": QUERY,
            "documents": [{"text": d} for d in DOCS],
            "top_n": 2,
            "return_documents": True,
            "max_chunks_per_doc": 10,
        },
        "results",
    ),
    (
        "cohere-v2",
        "/v2/rerank",
        BEARER,
        {"model": "m", "query": QUERY, "documents": DOCS, "top_n": 3, "max_tokens_per_doc": 4096},
        "results",
    ),
    (
        "jina-objects",
        "/v1/rerank",
        BEARER,
        {"model": "m", "query": QUERY, "documents": [{"text": d} for d in DOCS], "return_documents": True},
        "results",
    ),
    ("tei-native", "/rerank", {}, {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}, "tei"),
    ("vllm", "/v1/rerank", BEARER, {"model": "m", "query": QUERY, "documents": DOCS, "top_n": 0}, "results"),
    (
        "seed-curl-example",
        "/v1/rerank",
        {},
        {
            "model": "bge-reranker-base-local",
            "query": "What is a panda?",
            "documents": ["hi", "The giant panda is a bear species endemic to China."],
            "top_n": 2,
        },
        "seed",
    ),
]


def check_shape(dialect: str, body: dict[str, Any], data: Any, reference: dict[int, float]) -> None:
    count = len(body.get("documents") or body.get("texts") or body.get("passages") or [])
    top_n = body.get("top_n") or count
    if dialect == "tei":
        assert isinstance(data, list) and len(data) == count
        scores = [item["score"] for item in data]
        assert scores == sorted(scores, reverse=True)
        if not body.get("raw_scores"):
            assert all(0 <= s <= 1 for s in scores)
            for item in data:
                assert item["score"] == pytest.approx(reference[item["index"]], abs=1e-6)
        if body.get("return_text"):
            assert all(item["text"] == body["texts"][item["index"]] for item in data)
        return
    if dialect == "nvidia":
        rankings = data["rankings"]
        assert len(rankings) == min(top_n, count)
        logits = [r["logit"] for r in rankings]
        assert logits == sorted(logits, reverse=True)
        return
    results = data["results"]
    assert len(results) == min(top_n, count)
    assert sorted({r["index"] for r in results}) == sorted(r["index"] for r in results)  # no duplicates
    for result in results:
        assert isinstance(result["index"], int) and 0 <= result["index"] < count
        assert 0.0 <= result["relevance_score"] <= 1.0
        if dialect == "results" and body.get("query") == QUERY:
            assert result["relevance_score"] == pytest.approx(reference[result["index"]], abs=1e-6)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert data["usage"]["total_tokens"] > 0 and data["meta"]["tokens"]["input_tokens"] > 0
    if str(body.get("return_documents")).lower() == "true":
        texts = [d if isinstance(d, str) else d["text"] for d in body["documents"]]
        assert all(r["document"]["text"] == texts[r["index"]] for r in results)
    if dialect == "seed":
        assert data["object"] == "list"
        assert [d["index"] for d in data["data"]] == [r["index"] for r in results]
        assert data["data"][0]["document"] == body["documents"][data["data"][0]["index"]]


def rerank_counts(metrics_text: str) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    pattern = re.compile(
        r'^reranker_requests_total\{method="POST",model="bge-reranker-base-local",route="([^"]+)",status="(\d+)"\} '
        r"(\S+)$"
    )
    for line in metrics_text.splitlines():
        match = pattern.match(line)
        if match:
            counts[(match.group(1), match.group(2))] += int(float(match.group(3)))
    return counts


def test_every_wire_shape_and_metrics_count_each_request_once(live_server: ServerProcess) -> None:
    with live_server.client() as client:
        reference_body = {"query": QUERY, "documents": DOCS}
        reference = {
            r["index"]: r["relevance_score"] for r in client.post("/v1/rerank", json=reference_body).json()["results"]
        }
        before = rerank_counts(client.get("/metrics").text)

    host, port = live_server.base_url.removeprefix("http://").split(":")

    def send(shape: tuple[str, str, dict[str, str], dict[str, Any], str]) -> tuple[str, int, Any]:
        name, path, headers, body, _ = shape
        # http.client sends headers verbatim, as RAGFlow's requests does ("Bearer " with its trailing space);
        # a fresh connection per request, so both workers take a share.
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request(
                "POST",
                path,
                json.dumps(body).encode(),
                {**headers, "Content-Type": "application/json", "Connection": "close"},
            )
            response = connection.getresponse()
            return name, response.status, json.loads(response.read())
        finally:
            connection.close()

    rounds = 3
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(send, SHAPES * rounds))
    for (name, _path, _headers, body, dialect), (answered, status, data) in zip(SHAPES * rounds, answers, strict=True):
        assert answered == name
        assert status == 200, (name, data)
        check_shape(dialect, body, data, reference)

    with live_server.client() as client:
        after = rerank_counts(client.get("/metrics").text)
    expected = Counter((path, "200") for _, path, _, _, _ in SHAPES * rounds)
    assert after - before == expected
    # Both workers answered some of them: the counts above were merged across processes.
    pids = set(re.findall(r"app\.access \[(\d+)\].*\"route\": \"/v1/rerank\"", live_server.log()))
    assert len(pids) == 2, pids


def test_models_health_ready_metrics_and_docs(live_server: ServerProcess) -> None:
    with live_server.client() as client:
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "bge-reranker-base-local"
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json() == {"status": "ready"}
        assert client.get("/docs").status_code == 200
        assert client.get("/no-such-path").status_code == 404
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        for name in (
            "reranker_requests_total",
            "reranker_request_duration_seconds_bucket",
            "reranker_pairs_scored_total",
            "reranker_tokens_scored_total",
            "reranker_batch_size_bucket",
            "reranker_batch_tokens_bucket",
            "reranker_queue_depth",
            "reranker_inference_duration_seconds",
            "reranker_ready_workers",
            "reranker_request_tokenization_seconds_bucket",
            "reranker_request_queue_seconds_bucket",
            "reranker_request_inference_seconds_bucket",
        ):
            assert name in text, name
        assert "reranker_ready_workers 2.0" in text
        # FastAPI's own pages are counted under their path; unknown paths share one label
        assert 'route="/docs"' in text and 'route="unmatched"' in text and "no-such-path" not in text
        assert "reranker_workers 2.0" in text


def ragflow_model_list_url(base_url: str, provider: str) -> str:
    """Where RAGFlow's "add model" dialog lists models (rag/llm/model_meta.py, v0.27): the base class (OpenAI-API-
    Compatible and the others) cuts the base at "/v1"; Xinference and LocalAI append to the base as typed."""
    if provider in {"Xinference", "LocalAI"}:
        return base_url.rstrip("/") + "/v1/models"
    if "/v1" in base_url:
        return base_url.split("/v1")[0].rstrip("/") + "/v1/models"
    return base_url.rstrip("/") + "/v1/models"


@pytest.mark.parametrize("provider", ["OpenAI-API-Compatible", "Xinference", "LocalAI"])
@pytest.mark.parametrize("base_path", ["/v1", "", "/v1/"])
def test_ragflow_model_discovery(live_server: ServerProcess, provider: str, base_path: str) -> None:
    url = ragflow_model_list_url(live_server.base_url + base_path, provider)
    # aiohttp's GET with the header RAGFlow sets, whatever key the user typed
    answer = httpx.get(url, headers={"Authorization": "Bearer x"}, timeout=10)
    assert answer.status_code == 200, (url, answer.text)
    models = answer.json()["data"]
    # What its parsers read: the id (Xinference/LocalAI), and for discovery the type and length.
    assert [model["id"] for model in models if model.get("id")] == ["bge-reranker-base-local"]
    assert models[0]["model_type"] == "rerank"
    assert models[0]["max_model_len"] == 512
    assert models[0]["architecture"] == "XLMRobertaForSequenceClassification"


def ragflow_huggingface_models(base_url: str) -> list[dict[str, object]]:
    """RAGFlow's "add model" discovery for its HuggingFace provider (rag/llm/model_meta.py, class HuggingFace, at
    infiniflow/ragflow b1b8cd6): GET base.rstrip("/") + "/info" with no key, then its own parsing, as written."""
    answer = httpx.get(base_url.rstrip("/") + "/info", timeout=10)
    assert answer.status_code == 200, (base_url, answer.text)
    raw_model_list = answer.json()
    model_type = raw_model_list.get("model_type")
    if isinstance(model_type, dict):  # _infer_model_types_from_info, TEI format
        model_types = ["embedding"] if "embedding" in model_type else ["rerank"] if "rerank" in model_type else []
    elif isinstance(model_type, str):
        model_types = ["embedding"] if "embedding" in model_type.lower() else ["chat"]
    else:
        model_types = []
    model_id = raw_model_list.get("model_id")
    if not model_id or not model_types:
        return []
    max_tokens = raw_model_list.get("max_input_length") or raw_model_list.get("max_total_tokens") or 8192
    return [{"name": model_id, "model_types": model_types, "features": [], "max_tokens": max_tokens}]


@pytest.mark.parametrize("base_path", ["/v1", "/v1/", ""])
def test_ragflow_huggingface_discovery_at_every_recommended_base(live_server: ServerProcess, base_path: str) -> None:
    # The README recommends http://bge-reranker:9300/v1 for every provider; RAGFlow's HuggingFace provider then
    # asks /v1/info, and reranks at /v1/rerank.
    assert ragflow_huggingface_models(live_server.base_url + base_path) == [
        {"name": "bge-reranker-base-local", "model_types": ["rerank"], "features": [], "max_tokens": 512}
    ]


def test_tei_info_for_ragflow_huggingface_provider(live_server: ServerProcess) -> None:
    # RAGFlow's HuggingFace provider sends no Authorization header and looks for a "rerank" key in model_type.
    info = httpx.get(live_server.base_url + "/info", timeout=10).json()
    assert "rerank" in info["model_type"] and "reranker" in info["model_type"]  # RAGFlow's key, and TEI's own
    assert info["model_id"] == "bge-reranker-base-local"
    assert info["max_input_length"] == 512
    assert info["model_dtype"] in {"float32", "bfloat16", "float16"}


def test_first_request_after_start_is_fast(live_server: ServerProcess) -> None:
    # RAGFlow's model check has a 10 s limit; the model was warmed before the worker reported ready.
    response = httpx.post(
        live_server.base_url + "/v1/rerank",
        timeout=10,
        json={"model": "m", "query": "Hello~ RAGFlower!", "documents": ["Hi, there!", "Ohh, my friend!"]},
    )
    assert response.status_code == 200
    assert response.elapsed.total_seconds() < 2


def test_a_missing_model_directory_stops_start_up_with_one_clear_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "RERANKER_MODEL_PATH": str(tmp_path / "nowhere"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "app"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"reranker: invalid configuration: RERANKER_MODEL_PATH: model directory {tmp_path / 'nowhere'} does not "
        "exist (mount the model there or set RERANKER_MODEL_PATH)"
    ]


def test_an_invalid_setting_is_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "RERANKER_MODEL_PATH": str(tiny_model_dir),
        "RERANKER_DTYPE": "float8",
        "WEB_CONCURRENCY": "zero",
    }
    result = subprocess.run(
        [sys.executable, "-m", "app"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "RERANKER_DTYPE" in result.stderr and "WEB_CONCURRENCY" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_weights_fail_the_boot_with_the_path(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "corrupt-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeError) as failure:
        start_server(broken, tmp_path, workers=1, ready_timeout=90)
    message = str(failure.value)
    assert "exited with" in message  # gunicorn gave up instead of serving
    assert f"cannot load the model from {broken}" in message


def test_one_model_is_also_served_under_its_own_model_scoped_base(live_server: ServerProcess) -> None:
    # The single-model server is the registry of one: /models/{its name}/... works as a base URL too, and only
    # under its own name; an unscoped request may still name any model.
    base = live_server.base_url + "/models/bge-reranker-base-local"
    assert ragflow_huggingface_models(base)[0]["name"] == "bge-reranker-base-local"
    scoped = httpx.post(base + "/rerank", json={"query": QUERY, "texts": DOCS}, timeout=30)
    plain = httpx.post(
        live_server.base_url + "/rerank", json={"model": "any", "query": QUERY, "texts": DOCS}, timeout=30
    )
    assert scoped.status_code == plain.status_code == 200
    assert scoped.json() == plain.json()
    other = httpx.post(live_server.base_url + "/models/other/rerank", json={"query": QUERY, "texts": DOCS}, timeout=30)
    assert other.status_code == 404 and "bge-reranker-base-local" in other.json()["error"]["message"]
