"""End-to-end tests of the container image and the Compose stack, against a real Docker engine.

One stack per session (see conftest.py): built by ``docker compose build``, started by the README's
``docker compose up -d --wait`` from a ``.env`` copied from ``.env.example`` (CPU override, a bind-mounted model
directory, the monitoring profile). The tests talk to it the way its users do: RAGFlow's request shapes on
the published port, another container on RAGFlow's network by service name, Prometheus through its HTTP API.
The last test takes the stack down and checks that nothing is left.

Run: ``bash scripts/docker-setup.sh && pytest tests/e2e -m docker`` (the suite runs the setup itself too).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.conftest import (
    COMPOSE_FILES,
    MODEL_DIR_FILE,
    PROJECT,
    RAGFLOW_NETWORK,
    REPO_ROOT,
    SERVICE,
    Stack,
    run,
)

pytestmark = pytest.mark.docker

DOCUMENTS = [
    "Paris is the capital and most populous city of France.",
    "The Eiffel Tower was completed in 1889.",
    "Bananas are rich in potassium.",
    "France borders Spain, Italy, Germany and Belgium.",
    "The Louvre is the world's most visited museum.",
]


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        yield http


def assert_rerank_results(body: dict[str, Any], *, documents: int, top_n: int | None = None) -> None:
    """What RAGFlow (and Cohere/Jina/vLLM clients) read: results[].index (int in range), relevance_score in [0, 1]."""
    results = body["results"]
    assert len(results) == (documents if top_n is None else min(top_n, documents))
    indices = [item["index"] for item in results]
    assert all(isinstance(index, int) and 0 <= index < documents for index in indices)
    assert len(set(indices)) == len(indices)
    scores = [item["relevance_score"] for item in results]
    assert all(isinstance(score, float) and 0.0 <= score <= 1.0 for score in scores)
    assert scores == sorted(scores, reverse=True)


def post_like_requests(base_url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
    """POST with http.client, as RAGFlow's ``requests`` does: it sends headers httpx refuses, e.g. "Bearer "."""
    parsed = urlsplit(base_url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# --- the stack is up and shaped as documented -------------------------------------------------------------------


def test_stack_is_healthy_and_ready(stack: Stack, client: httpx.Client) -> None:
    state = stack.inspect()["State"]
    assert state["Health"]["Status"] == "healthy", stack.logs()  # type: ignore[index]
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200


def test_image_is_non_root_offline_and_has_no_weights(stack: Stack) -> None:
    config = json.loads(run(["docker", "image", "inspect", stack.image], check=True).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert {"HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"} <= set(config["Env"])
    assert any("healthcheck.py" in part for part in config["Healthcheck"]["Test"])
    # No model weights and none of the build stage's wheels (docker/wheels) in the final image.
    find = "find / -xdev \\( -name '*.safetensors' -o -name 'pytorch_model.bin' -o -name 'torch-*.whl' \\) 2>/dev/null"
    found = run(["docker", "run", "--rm", "--entrypoint", "sh", stack.image, "-c", f"{find}; ls /tmp"], check=True)
    assert found.stdout.strip() == ""


def test_compose_configuration(stack: Stack) -> None:
    """The hardening and wiring compose.yaml promises, as Compose resolves it (GPU file alone, then CPU override
    with the bind-mounted model directory)."""
    gpu_only = ["docker", "compose", "--env-file", str(stack.env_file), "-f", "compose.yaml"]
    gpu = json.loads(run([*gpu_only, "config", "--format", "json"], check=True).stdout)
    service = gpu["services"][SERVICE]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert service["image"].endswith(":test")
    # Default path: the model comes from the one-shot fetch, through the "models" volume, read-only here.
    assert service["depends_on"]["model-fetch"]["condition"] == "service_completed_successfully"
    (volume,) = service["volumes"]
    assert (volume["type"], volume["source"], volume["target"], volume["read_only"]) == (
        "volume",
        "models",
        "/models",
        True,
    )
    assert service["environment"]["RERANKER_MODEL_PATH"] == "/models/current"
    assert service["environment"]["HF_HUB_OFFLINE"] == "1"
    fetch = gpu["services"]["model-fetch"]
    assert fetch["image"] == service["image"] and fetch["pull_policy"] == "never" and fetch["restart"] == "no"
    (volume,) = fetch["volumes"]
    assert (volume["source"], volume["target"]) == ("models", "/models") and not volume.get("read_only")
    assert fetch["environment"]["HF_HUB_OFFLINE"] == "0"
    assert fetch["environment"]["MODEL_ID"] == "BAAI/bge-reranker-base"
    assert "deploy" not in fetch  # no GPU for the fetch
    assert fetch["healthcheck"]["disable"] is True  # a long fetch must not turn "unhealthy" under `up --wait`
    assert fetch["read_only"] is True and fetch["cap_drop"] == ["ALL"]

    cpu = json.loads(stack.compose("config", "--format", "json", check=True).stdout)
    service = cpu["services"][SERVICE]
    assert "deploy" not in service or not service["deploy"].get("resources")
    assert service["environment"]["RERANKER_DEVICE"] == "cpu"
    assert service["environment"]["RERANKER_MODEL_PATH"] == "/model"
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["restart"] == "unless-stopped"
    assert service["stop_grace_period"] == "45s"
    assert any(mount.startswith("/tmp:") for mount in service["tmpfs"])
    assert service["logging"]["driver"] == "json-file" and "max-size" in service["logging"]["options"]
    (volume,) = service["volumes"]
    assert volume["type"] == "bind" and volume["target"] == "/model" and volume["read_only"] is True
    (port,) = service["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 9300
    assert cpu["networks"]["ragflow"]["name"] == RAGFLOW_NETWORK
    assert cpu["networks"]["ragflow"]["external"] is True
    assert not SERVICE.startswith("rerank")  # see RERANK_WIRE.md: RAGFlow looks for "/rerank" in the base URL
    # MODEL_DIR: nothing is fetched; the one-shot service only checks the directory, with no network at all.
    fetch = cpu["services"]["model-fetch"]
    assert fetch["command"] == ["python", "-m", "app", "--check"]
    assert fetch["network_mode"] == "none"
    assert fetch["volumes"] == service["volumes"]
    assert fetch["image"] == service["image"] == stack.image


def test_missing_model_dir_is_refused_by_compose(stack: Stack) -> None:
    """MODEL_DIR unset: compose names the variable. MODEL_DIR absent on disk: no container, no empty directory."""
    lines = [line for line in stack.env_file.read_text().splitlines() if not line.startswith("MODEL_DIR=")]
    unset = stack.workdir / "no-model.env"
    unset.write_text("\n".join(lines) + "\n")
    files = ["-f", "compose.yaml", "-f", MODEL_DIR_FILE]
    result = run(["docker", "compose", "--env-file", str(unset), *files, "config"])
    assert result.returncode != 0
    assert "MODEL_DIR" in result.stderr

    missing_dir = stack.workdir / "no-such-model"
    missing = stack.workdir / "missing-model.env"
    missing.write_text("\n".join([*lines, f"MODEL_DIR={missing_dir}"]) + "\n")
    project = ["docker", "compose", "-p", f"{stack.project}-missing", "--env-file", str(missing)]
    for name in (*COMPOSE_FILES, MODEL_DIR_FILE):
        project += ["-f", name]
    try:
        result = run([*project, "up", "-d", "--no-build", SERVICE], timeout=120)
        assert result.returncode != 0
        assert "does not exist" in result.stderr and str(missing_dir) in result.stderr, result.stderr
        assert not missing_dir.exists()
    finally:
        run([*project, "down", "--volumes", "--remove-orphans", "--timeout", "5"], timeout=120)


# --- RAGFlow and the other clients, on the published port ------------------------------------------------------


def test_seed_curl_example(client: httpx.Client) -> None:
    response = client.post(
        "/v1/rerank",
        json={
            "model": "bge-reranker-base-local",
            "query": "What is the capital of France?",
            "documents": DOCUMENTS,
            "top_n": 2,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert_rerank_results(body, documents=len(DOCUMENTS), top_n=2)
    assert [item["index"] for item in body["data"]] == [item["index"] for item in body["results"]]
    assert body["usage"]["total_tokens"] > 0


def test_ragflow_model_check_answers_well_inside_10s(client: httpx.Client) -> None:
    """What RAGFlow sends when a model is added: similarity("What's the weather?", ["Is it sunny today?"])."""
    started = time.monotonic()
    response = client.post(
        "/v1/rerank",
        json={
            "model": "bge-reranker-base-local",
            "query": "What's the weather?",
            "documents": ["Is it sunny today?"],
            "top_n": 1,
        },
        headers={"Authorization": "Bearer x"},
    )
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 5
    assert_rerank_results(response.json(), documents=1)


STANDARD = {
    "model": "bge-reranker-base-local",
    "query": "capital of France",
    "documents": DOCUMENTS,
    "top_n": len(DOCUMENTS),
}


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        pytest.param("/v1/rerank", STANDARD, {"Authorization": "Bearer x"}, id="openai-compatible-v0.24+"),
        pytest.param(
            "/rerank",
            {**STANDARD, "model": "bge-reranker-base-local___OpenAI-API"},
            {"Authorization": "Bearer "},
            id="openai-compatible-v0.13-v0.23-localai",
        ),
        pytest.param("/v1", STANDARD, {}, id="base-url-trap-v1"),
        pytest.param("/", STANDARD, {}, id="base-url-trap-root"),
        pytest.param("/v1/rerank/", STANDARD, {}, id="trailing-slash"),
        pytest.param("/v1/v1/rerank", STANDARD, {"Authorization": "Bearer x"}, id="gpustack"),
        pytest.param(
            "/v1/rerank",
            {
                "model": "bge",
                "query": "capital of France",
                "documents": DOCUMENTS,
                "return_documents": "true",
                "return_len": "true",
            },
            {},
            id="xinference-string-flags",
        ),
        pytest.param(
            "/v1/rerank",
            {
                "model": "rerank-english-v3.0",
                "query": "capital of France",
                "documents": DOCUMENTS,
                "top_n": 3,
                "return_documents": False,
            },
            {
                "Authorization": "Bearer x",
                "X-Fern-Language": "Python",
                "X-Fern-SDK-Name": "cohere",
                "X-Fern-SDK-Version": "5.6.2",
                "X-Client-Name": "ragflow",
            },
            id="cohere-sdk-x-fern",
        ),
        pytest.param(
            "/v1/rerank",
            {**STANDARD, "max_chunks_per_doc": 1024, "overlap_tokens": 80},
            {"Authorization": "Bearer x"},
            id="siliconflow",
        ),
    ],
)
def test_ragflow_request_shapes(stack: Stack, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    status, text = post_like_requests(stack.base_url, path, body, headers)
    assert status == 200, text
    payload = json.loads(text)
    assert_rerank_results(payload, documents=len(DOCUMENTS), top_n=body.get("top_n"))
    assert payload["usage"]["total_tokens"] > 0  # SILICONFLOW, Jina, ... count tokens from it
    assert payload["meta"]["tokens"]["input_tokens"] > 0  # Xinference before RAGFlow v0.16


def test_huggingface_tei_shape_returns_a_bare_list(client: httpx.Client) -> None:
    """RAGFlow's HuggingFace provider: 8 texts per request, no Authorization, a bare [{index, score}] back."""
    texts = (DOCUMENTS * 2)[:8]
    response = client.post(
        "/v1/rerank", json={"query": "capital of France", "texts": texts, "raw_scores": False, "truncate": True}
    )
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert isinstance(ranks, list) and len(ranks) == len(texts)
    assert sorted(item["index"] for item in ranks) == list(range(len(texts)))
    scores = [item["score"] for item in ranks]
    assert all(0.0 <= score <= 1.0 for score in scores) and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("path", ["/v1/reranking", "/reranking"])
def test_nvidia_shape(client: httpx.Client, path: str) -> None:
    response = client.post(
        path,
        json={
            "model": "nvidia/nv-rerankqa-mistral-4b-v3",
            "query": {"text": "capital of France"},
            "passages": [{"text": text} for text in DOCUMENTS],
            "truncate": "END",
            "top_n": 3,
        },
        headers={"Authorization": "Bearer x"},
    )
    assert response.status_code == 200, response.text
    rankings = response.json()["rankings"]
    assert len(rankings) == 3
    assert all(isinstance(item["index"], int) and 0 <= item["index"] < len(DOCUMENTS) for item in rankings)
    assert all(isinstance(item["logit"], float) for item in rankings)


def test_models_list(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    assert [model["id"] for model in response.json()["data"]] == ["bge-reranker-base-local"]


def test_ragflow_container_reaches_the_service_by_name(stack: Stack) -> None:
    """A container on RAGFlow's network (as RAGFlow's own is) calls http://bge-reranker:9300/v1/rerank."""
    script = (
        "import json, urllib.request\n"
        "body = json.dumps({'model': 'bge-reranker-base-local', 'query': \"What's the weather?\",\n"
        "                   'documents': ['Is it sunny today?', 'Bananas'], 'top_n': 2}).encode()\n"
        "request = urllib.request.Request('http://bge-reranker:9300/v1/rerank', data=body,\n"
        "    headers={'Content-Type': 'application/json', 'Authorization': 'Bearer x'})\n"
        "print(urllib.request.urlopen(request, timeout=30).read().decode())\n"
    )
    result = run(
        ["docker", "run", "--rm", "--network", RAGFLOW_NETWORK, stack.image, "python", "-c", script], timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert_rerank_results(json.loads(result.stdout), documents=2, top_n=2)


# --- metrics and Prometheus --------------------------------------------------------------------------------------


def test_metrics_on_the_published_port(client: httpx.Client) -> None:
    client.post("/v1/rerank", json=STANDARD)
    text = client.get("/metrics").text
    for name in (
        "reranker_requests_total",
        "reranker_request_duration_seconds_bucket",
        "reranker_batch_size_bucket",
        "reranker_queue_depth",
    ):
        assert name in text, name


def _prometheus(stack: Stack, path: str, **params: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.prometheus_url}{path}", params=params, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "success", body
    return body["data"]  # type: ignore[no-any-return]


def _poll(check: Any, timeout: float = 60, interval: float = 1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_prometheus_scrapes_the_service(stack: Stack, client: httpx.Client) -> None:
    client.post("/v1/rerank", json=STANDARD)

    def target_up() -> bool:
        targets = _prometheus(stack, "/api/v1/targets")["activeTargets"]
        return any(t["labels"]["job"] == "bge-reranker" and t["health"] == "up" for t in targets)

    assert _poll(target_up), _prometheus(stack, "/api/v1/targets")
    series = _poll(
        lambda: _prometheus(stack, "/api/v1/query", query='reranker_requests_total{route="/v1/rerank"}')["result"]
    )
    assert series, "no reranker_requests_total series in Prometheus"
    assert {item["metric"]["instance"] for item in series} == {"bge-reranker:9300"}


def test_grafana_dashboard_queries_run_on_prometheus(stack: Stack) -> None:
    """Every panel query of the shipped dashboard is valid PromQL on a real Prometheus, over real metric names."""
    dashboard = json.loads((REPO_ROOT / "docker" / "grafana" / "bge-reranker-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(expressions) >= 5
    joined = " ".join(expressions)
    for metric in (
        "reranker_requests_total",
        "reranker_request_duration_seconds_bucket",
        "reranker_batch_size_bucket",
        "reranker_queue_depth",
    ):
        assert metric in joined, metric
    for expr in expressions:
        # "$pod" and "$model" as the dashboard's "All" sends them: Compose's series have no pod label, and ".*"
        # matches them.
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace('"$job"', '"bge-reranker"')
            .replace('"$pod"', '".*"')
            .replace('"$model"', '".*"')
            .replace('"$model"', '".*"')
        )
        assert "$" not in concrete, concrete
        _prometheus(stack, "/api/v1/query", query=concrete)  # asserts status success


# --- container security -------------------------------------------------------------------------------------------


def test_runs_as_non_root(stack: Stack) -> None:
    result = stack.compose("exec", "-T", SERVICE, "id", "-u", check=True)
    assert result.stdout.strip() not in ("", "0")


def test_model_and_root_filesystem_are_read_only(stack: Stack) -> None:
    assert stack.compose("exec", "-T", SERVICE, "touch", "/model/written-by-test").returncode != 0
    assert stack.compose("exec", "-T", SERVICE, "touch", "/srv/written-by-test").returncode != 0
    assert not (stack.model_dir / "written-by-test").exists()
    assert stack.compose("exec", "-T", SERVICE, "touch", "/tmp/scratch").returncode == 0


def test_missing_model_fails_with_a_clear_message(stack: Stack, tmp_path: Path) -> None:
    result = run(["docker", "run", "--rm", "-e", "RERANKER_MODEL_PATH=/nonexistent", stack.image], timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "RERANKER_MODEL_PATH" in output and "/nonexistent" in output, output

    empty = tmp_path / "empty-model"
    empty.mkdir(mode=0o755)
    empty.chmod(0o755)
    result = run(["docker", "run", "--rm", "-v", f"{empty}:/model:ro", stack.image], timeout=120)
    assert result.returncode != 0
    assert "config.json" in result.stdout + result.stderr, result.stdout + result.stderr


# --- lifecycle ----------------------------------------------------------------------------------------------------


def test_graceful_stop_and_restart(stack: Stack, client: httpx.Client) -> None:
    """SIGTERM stops gunicorn cleanly well inside stop_grace_period; the service comes back healthy."""
    started = time.monotonic()
    stack.compose("stop", "--timeout", "45", SERVICE, check=True, timeout=120)
    assert time.monotonic() - started < 40
    assert stack.inspect()["State"]["ExitCode"] == 0, stack.logs()  # type: ignore[index]
    up = stack.compose("up", "-d", "--wait", "--wait-timeout", "180", "--no-deps", SERVICE, timeout=240)
    assert up.returncode == 0, up.stderr + stack.logs()
    response = client.post("/v1/rerank", json=STANDARD)
    assert response.status_code == 200, response.text


def test_down_leaves_nothing_running(stack: Stack) -> None:
    """Runs last in this module: afterwards the stack is gone (the fixture's teardown is then a no-op)."""
    stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "60", check=True, timeout=180)
    label = f"label=com.docker.compose.project={PROJECT}"
    assert run(["docker", "ps", "-aq", "--filter", label], check=True).stdout.strip() == ""
    assert run(["docker", "network", "ls", "-q", "--filter", label], check=True).stdout.strip() == ""
    assert run(["docker", "volume", "ls", "-q", "--filter", label], check=True).stdout.strip() == ""
