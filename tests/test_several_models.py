"""Several models in one server (RERANKER_MODELS), for real: ``python -m app`` with two gunicorn workers serving
a bge-reranker-v2-m3 (XLM-RoBERTa, SentencePiece) and an ms-marco-MiniLM-L-6-v2 (BERT, WordPiece) built in their
published layouts. Each name scores exactly as its own ``CrossEncoder.predict`` (float32), whichever way the
request names it: the body's ``model`` or the model-scoped base URL ``/models/{name}`` that RAGFlow's providers
are given. Bad configurations stop start-up with one line naming the model and its directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.model_factory import build_cross_encoder, corpus_sentences
from tests.reliability.harness import metric
from tests.test_published_models import cross_encoder_scores
from tests.test_server import ragflow_huggingface_models, ragflow_model_list_url
from tests.utils import REPO_ROOT, ServerProcess, start_server

pytestmark = pytest.mark.server

M3, MINILM = "bge-reranker-v2-m3", "ms-marco-minilm"
QUERY = "which harbour was busy at dawn"
DOCUMENTS = corpus_sentences(6, seed=3)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two-models")
    return {
        M3: build_cross_encoder(root / "bge-reranker-v2-m3", family="bge-reranker-v2-m3", seed=1),
        MINILM: build_cross_encoder(root / "ms-marco-MiniLM-L-6-v2", family="ms-marco-MiniLM-L-6-v2", seed=2),
    }


def served(model_dirs: dict[str, Path]) -> str:
    return ",".join(f"{name}={path}" for name, path in model_dirs.items())


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, np.ndarray]:
    """Each model's scores for (QUERY, document) from sentence-transformers' own CrossEncoder (its sigmoid, as the
    service's relevance_score)."""
    return {
        name: cross_encoder_scores(path, [(QUERY, text) for text in DOCUMENTS]) for name, path in model_dirs.items()
    }


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(
        model_dirs[M3],  # RERANKER_MODEL_PATH, which RERANKER_MODELS overrides
        tmp_path_factory.mktemp("several-models-server"),
        workers=2,
        RERANKER_MODELS=served(model_dirs),
        RERANKER_DTYPE="float32",
        RERANKER_TORCH_COMPILE="off",
    )
    yield process
    process.stop()


def scores_of(results: list[dict[str, Any]]) -> np.ndarray:
    by_index = {item["index"]: item["relevance_score"] for item in results}
    return np.array([by_index[index] for index in range(len(DOCUMENTS))])


def test_each_name_scores_exactly_as_its_own_cross_encoder(
    server: ServerProcess, references: dict[str, np.ndarray]
) -> None:
    assert not np.allclose(references[M3], references[MINILM], atol=0.05)  # the two models really differ
    for name, expected in references.items():
        answer = httpx.post(
            server.base_url + "/v1/rerank",
            json={"model": name, "query": QUERY, "documents": DOCUMENTS},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == name
        np.testing.assert_allclose(scores_of(answer.json()["results"]), expected, atol=2e-5)


def test_an_unknown_or_missing_name_is_a_404_that_lists_the_served_names(server: ServerProcess) -> None:
    for body in (
        {"model": "bge-reranker-base", "query": QUERY, "documents": DOCUMENTS},
        {"query": "q", "documents": ["d"]},
    ):
        answer = httpx.post(server.base_url + "/v1/rerank", json=body, timeout=30)
        assert answer.status_code == 404, answer.text
        error = answer.json()["error"]
        assert error["param"] == "model" and error["type"] == "not_found_error" and error["code"] == 404
        assert f"{M3}, {MINILM}" in error["message"] and "/models/{name}" in error["message"]
    # The same for a model-scoped URL, and for the model-scoped readiness.
    for path in ("/models/nope/rerank", "/models/nope/ready"):
        answer = httpx.request(
            "POST" if path.endswith("rerank") else "GET", server.base_url + path, json={"query": "q", "texts": ["d"]}
        )
        assert answer.status_code == 404 and answer.json()["error"]["param"] == "model", answer.text
    # TEI's /info describes one model: with several, the unscoped one says which URLs do.
    answer = httpx.get(server.base_url + "/info", timeout=10)
    assert answer.status_code == 404 and "/models/{name}" in answer.json()["error"]["message"]


def test_ragflow_suffixed_name_reaches_its_model(server: ServerProcess, references: dict[str, np.ndarray]) -> None:
    # RAGFlow v0.13-v0.14's OpenAI-API-compatible provider sends "<name>___OpenAI-API".
    answer = httpx.post(
        server.base_url + "/rerank",
        json={"model": f"{MINILM}___OpenAI-API", "query": QUERY, "documents": DOCUMENTS, "top_n": len(DOCUMENTS)},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(scores_of(answer.json()["results"]), references[MINILM], atol=2e-5)


def test_models_list_every_model_and_a_scoped_base_lists_its_own(server: ServerProcess) -> None:
    models = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["model_type"], m["architecture"], m["recipe"]) for m in models] == [
        (M3, "rerank", "XLMRobertaForSequenceClassification", "cross-encoder"),
        (MINILM, "rerank", "BertForSequenceClassification", "cross-encoder"),
    ]
    assert all(model["max_model_len"] == 512 for model in models)
    scoped = httpx.get(server.base_url + f"/models/{MINILM}/v1/models", timeout=10).json()["data"]
    assert [model["id"] for model in scoped] == [MINILM]


def test_readiness_of_all_and_of_each(server: ServerProcess) -> None:
    assert httpx.get(server.base_url + "/ready", timeout=10).json() == {"status": "ready"}
    for name in (M3, MINILM):
        assert httpx.get(server.base_url + f"/models/{name}/ready", timeout=10).json() == {"status": "ready"}


@pytest.mark.parametrize("name", [M3, MINILM])
@pytest.mark.parametrize("base_suffix", ["", "/v1"])
def test_ragflow_huggingface_provider_at_a_model_scoped_base(
    server: ServerProcess, references: dict[str, np.ndarray], name: str, base_suffix: str
) -> None:
    base = f"{server.base_url}/models/{name}{base_suffix}"
    # Discovery as RAGFlow's model_meta.py does it (GET base + "/info"), then its rerank request as
    # rag/llm/rerank_model.py's HuggingfaceRerank sends it: 8 texts a request, no key, no model name.
    assert ragflow_huggingface_models(base) == [
        {"name": name, "model_types": ["rerank"], "features": [], "max_tokens": 512}
    ]
    answer = httpx.post(
        base.rstrip("/") + "/rerank",
        headers={"Content-Type": "application/json"},
        json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": False, "truncate": True},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    scores = {item["index"]: item["score"] for item in answer.json()}
    np.testing.assert_allclose([scores[i] for i in range(len(DOCUMENTS))], references[name], atol=2e-5)


@pytest.mark.parametrize("provider", ["OpenAI-API-Compatible", "Xinference"])
def test_ragflow_openai_compatible_provider_at_a_model_scoped_base(
    server: ServerProcess, references: dict[str, np.ndarray], provider: str
) -> None:
    base = f"{server.base_url}/models/{M3}/v1"
    listed = httpx.get(ragflow_model_list_url(base, provider), headers={"Authorization": "Bearer x"}, timeout=10)
    assert [model["id"] for model in listed.json()["data"]] == [M3]
    # OpenAI_APIRerank: urljoin(base + "/", "rerank"), the model name the user typed (the URL decides), top_n.
    answer = httpx.post(
        base + "/rerank",
        headers={"Authorization": "Bearer x"},
        json={"model": "whatever-the-user-typed", "query": QUERY, "documents": DOCUMENTS, "top_n": len(DOCUMENTS)},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(scores_of(answer.json()["results"]), references[M3], atol=2e-5)


def test_interleaved_requests_under_load_each_get_their_models_scores(
    server: ServerProcess, references: dict[str, np.ndarray]
) -> None:
    before = httpx.get(server.base_url + "/metrics", timeout=10).text
    plan = [M3, MINILM] * 24

    def send(name: str) -> tuple[str, np.ndarray]:
        answer = httpx.post(
            server.base_url + "/v1/rerank",
            json={"model": name, "query": QUERY, "documents": DOCUMENTS},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        return name, scores_of(answer.json()["results"])

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(send, plan))
    for name, logits in answers:
        np.testing.assert_allclose(logits, references[name], atol=2e-5)
    # Per-model metrics, merged over both workers: exactly what was sent to each model.
    after = httpx.get(server.base_url + "/metrics", timeout=10).text
    for name in (M3, MINILM):
        sent = plan.count(name)
        requests = metric(after, "reranker_requests_total", route="/v1/rerank", status="200", model=name) - metric(
            before, "reranker_requests_total", route="/v1/rerank", status="200", model=name
        )
        pairs = metric(after, "reranker_pairs_scored_total", model=name) - metric(
            before, "reranker_pairs_scored_total", model=name
        )
        documents = metric(after, "reranker_documents_total", model=name) - metric(
            before, "reranker_documents_total", model=name
        )
        assert (requests, pairs, documents) == (sent, sent * len(DOCUMENTS), sent * len(DOCUMENTS)), name
    assert 'reranker_queue_depth{model="' + M3 + '"}' in after
    assert metric(after, "reranker_ready_workers") == 2


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m app --check`` as the container's model-fetch service runs it."""
    environment = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        [sys.executable, "-m", "app", "--check"],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_the_check_names_every_model(model_dirs: dict[str, Path]) -> None:
    result = check({"RERANKER_MODELS": served(model_dirs)})
    assert result.returncode == 0, result.stderr
    summary = next(line for line in result.stdout.splitlines() if line.startswith("reranker: "))
    assert f"{M3} = model directory {model_dirs[M3]}: XLMRobertaForSequenceClassification" in summary
    assert f"{MINILM} = model directory {model_dirs[MINILM]}: BertForSequenceClassification" in summary


def test_bad_configurations_stop_start_up_with_one_line(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    m3, minilm = model_dirs[M3], model_dirs[MINILM]
    line = one_line(check({"RERANKER_MODELS": f"a={m3},a={minilm}"}))
    assert "RERANKER_MODELS" in line and "'a' is given twice" in line and str(minilm) in line
    line = one_line(check({"RERANKER_MODELS": f"BAAI/bge={m3}"}))
    assert "RERANKER_MODELS" in line and "'BAAI/bge'" in line and "no '/'" in line
    missing = tmp_path / "not-there"
    line = one_line(check({"RERANKER_MODELS": f"a={m3},b={missing}"}))
    assert f"model 'b' ({missing})" in line and "does not exist" in line
    # A directory the service cannot serve: an embedding model (no classification head).
    embedding = tmp_path / "embedding"
    embedding.mkdir()
    for source in minilm.iterdir():
        (embedding / source.name).write_bytes(source.read_bytes())
    config = json.loads((embedding / "config.json").read_text())
    config["architectures"] = ["BertModel"]
    (embedding / "config.json").write_text(json.dumps(config))
    line = one_line(check({"RERANKER_MODELS": f"a={m3},embed={embedding}"}))
    assert line.startswith("reranker: model embed: ") and str(embedding) in line


def test_a_set_that_does_not_fit_is_refused_naming_each_model_and_its_need(model_dirs: dict[str, Path]) -> None:
    line = one_line(check({"RERANKER_MODELS": served(model_dirs), "RERANKER_MEMORY_LIMIT_MB": "64"}))
    assert "do not fit on the cpu" in line and "RERANKER_MEMORY_LIMIT_MB=64" in line
    for name, path in model_dirs.items():
        assert re.search(rf"{name} \({re.escape(str(path))}\) [\d.]+ GiB = weights [\d.]+ GiB", line), line
    # Two inline workers hold two copies of each model: the estimate counts them.
    line = one_line(
        check({"RERANKER_MODELS": served(model_dirs), "RERANKER_MEMORY_LIMIT_MB": "64", "WEB_CONCURRENCY": "2"})
    )
    assert "2 copies (one per worker)" in line
    assert check({"RERANKER_MODELS": served(model_dirs), "RERANKER_MEMORY_LIMIT_MB": "4096"}).returncode == 0


def test_one_engine_process_serves_both_models(
    model_dirs: dict[str, Path], references: dict[str, np.ndarray], tmp_path: Path
) -> None:
    process = start_server(
        model_dirs[M3],
        tmp_path,
        workers=2,
        RERANKER_MODELS=served(model_dirs),
        RERANKER_ENGINE="process",
        RERANKER_DTYPE="float32",
        RERANKER_TORCH_COMPILE="off",
    )
    try:
        for name, expected in references.items():
            for path, body in (
                ("/v1/rerank", {"model": name, "query": QUERY, "documents": DOCUMENTS}),
                (f"/models/{name}/rerank", {"query": QUERY, "texts": DOCUMENTS}),
            ):
                answer = httpx.post(process.base_url + path, json=body, timeout=30)
                assert answer.status_code == 200, answer.text
                data = answer.json()
                scores = (
                    scores_of(data["results"])
                    if isinstance(data, dict)
                    else np.array([item["score"] for item in sorted(data, key=lambda item: item["index"])])
                )
                np.testing.assert_allclose(scores, expected, atol=2e-5)
        ready = re.findall(r"\[(\d+)\] engine ready on \S+ in [\d.]+s \(([\w.-]+):", process.log())
        assert sorted(name for _, name in ready) == sorted([M3, MINILM])
        assert len({pid for pid, _ in ready}) == 1  # one process (one CUDA context on a GPU) holds both
    finally:
        process.stop()


def test_the_grafana_dashboard_selects_models() -> None:
    """A "model" variable (every model by default, the served names as choices) filters every query of a metric
    that carries the label, and three panels split by model."""
    dashboard = json.loads((REPO_ROOT / "docker" / "grafana" / "bge-reranker-dashboard.json").read_text())
    variable = next(item for item in dashboard["templating"]["list"] if item["name"] == "model")
    assert variable["includeAll"] is True and variable["allValue"] == ".*"
    assert variable["definition"] == 'label_values(reranker_requests_total{job=~"$job", model!=""}, model)'
    per_process = ("reranker_ready_workers", "reranker_workers", "reranker_engines")  # gauges with no model label
    selectors = [
        (name, selector)
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name, selector in re.findall(r"(reranker_\w+)\{([^}]*)\}", target["expr"])
    ]
    labelled = [(name, selector) for name, selector in selectors if name not in per_process]
    assert len(labelled) >= 20
    for name, selector in labelled:
        assert 'model=~"$model"' in selector, (name, selector)
    by_model = [panel["title"] for panel in dashboard["panels"] if panel.get("title", "").endswith("by model")]
    assert by_model == ["Requests / s by model", "p50 latency by model", "Queue depth by model"]


def test_several_models_run_eagerly_on_the_cpu_and_compile_on_is_refused(model_dirs: dict[str, Path]) -> None:
    from app.config import Compile, Settings, SettingsError, load_settings

    two = Settings(models=served(model_dirs))
    assert [two.for_model(model).torch_compile for model in two.served_models()] == [Compile.off, Compile.off]
    one = Settings(models=f"{M3}={model_dirs[M3]}")
    assert one.for_model(one.served_models()[0]).torch_compile is Compile.auto  # alone, a model may compile
    env = {"RERANKER_MODELS": served(model_dirs), "RERANKER_TORCH_COMPILE": "on"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(SettingsError, match="RERANKER_TORCH_COMPILE=on cannot compile several models"):
            load_settings()


def test_the_memory_estimate_counts_the_parameters_transformers_loads(model_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification

    from app.config import Settings
    from app.engine.memory import check_models_fit, count_parameters

    for path in model_dirs.values():
        model = AutoModelForSequenceClassification.from_pretrained(path)
        assert count_parameters(path) == sum(parameter.numel() for parameter in model.parameters())
    needs = check_models_fit(Settings(models=served(model_dirs), device="cpu"), where="test", device="cpu")
    assert [need.name for need in needs] == [M3, MINILM]
    for need in needs:
        assert need.weight_bytes == 4 * need.parameters  # float32 weights on the CPU (bf16 autocast keeps them)
        assert need.activation_bytes > 0
