"""The first command on a fresh host, and a host whose model cannot be served, with the real image and Compose.

Fetch path: ``.env`` copied from ``.env.example`` with ``MODEL_DIR`` unset and ``HF_ENDPOINT`` pointing at a local
stand-in for the Hugging Face Hub (tests/fake_hub.py, on this machine, reached from the containers through the
Docker bridge), then the README's ``docker compose up -d --wait``: the model lands in the volume, the reranker
serves it read-only, a second ``up`` fetches nothing, a failed fetch fails ``up`` with one line and never starts
the reranker.

Broken model directory (bind-mount path): unreadable weights fail ``up --wait`` with the one line naming the path,
"permission denied" and the uid; the reranker started on its own holds the failure instead of restarting.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    COMPOSE_FILES,
    MODEL_DIR_FILE,
    PROJECT,
    SERVICE,
    WAIT_TIMEOUT_S,
    Stack,
    build_settings,
    compose_file_setting,
    free_port,
    run,
    world_readable_model,
    write_dotenv,
)
from tests.fake_hub import COMMIT, FakeHub, FakeHubServer

pytestmark = pytest.mark.docker

MODEL_ID = "BAAI/bge-reranker-base"
FETCH = "model-fetch"


def bridge_gateway() -> str:
    """This machine's address on Docker's default bridge: containers on any bridge network reach it there."""
    result = run(["docker", "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"])
    gateway = result.stdout.strip()
    if result.returncode == 0 and gateway and gateway != "<no value>":
        return gateway
    found = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True)
    for word in found.stdout.split():
        if "/" in word and word[0].isdigit():
            return word.split("/")[0]
    return "172.17.0.1"


def make_stack(
    workdir: Path, project: str, settings: dict[str, str], *, model_dir: Path, files: tuple[str, ...]
) -> Stack:
    port = free_port()
    env_file = write_dotenv(
        workdir,
        {
            "COMPOSE_FILE": compose_file_setting(*files),
            "COMPOSE_PROJECT_NAME": project,
            "RERANKER_BIND": "127.0.0.1",
            "RERANKER_HOST_PORT": str(port),
            "RERANKER_START_PERIOD": f"{WAIT_TIMEOUT_S}s",
            **build_settings(),
            **settings,
        },
    )
    return Stack(
        project=project,
        env_file=env_file,
        files=files,
        base_url=f"http://127.0.0.1:{port}",
        prometheus_url="",
        image="",
        model_dir=model_dir,
        workdir=workdir,
    )


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="reranker-e2e-paths-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_model(workdir: Path) -> Path:
    return world_readable_model(workdir / "model")


@pytest.fixture(scope="module")
def hub(tiny_model: Path) -> Iterator[tuple[FakeHub, str]]:
    fake = FakeHub()
    fake.add_repo(MODEL_ID, tiny_model)
    # On all addresses: the containers come in over the Docker bridge.
    with FakeHubServer(fake, host="0.0.0.0") as server:
        port = server.httpd.server_address[1]
        yield fake, f"http://{bridge_gateway()}:{port}"


@pytest.fixture(scope="module")
def fresh(built_image: str, hub: tuple[FakeHub, str], workdir: Path, tiny_model: Path) -> Iterator[Stack]:
    """A fresh host: nothing in .env but the build recipe, the CPU override and the hub's address."""
    _, endpoint = hub
    stack = make_stack(
        workdir / "fresh",
        f"{PROJECT}-fetch",
        {"HF_ENDPOINT": endpoint},
        model_dir=tiny_model,
        files=COMPOSE_FILES,
    )
    stack.down()  # leftovers of a crashed run, volume included: this host is fresh
    yield stack
    stack.down()


def test_first_up_fetches_the_model_into_the_volume_and_serves_it(
    fresh: Stack, hub: tuple[FakeHub, str], tiny_model: Path
) -> None:
    fake, _ = hub
    up = fresh.up()
    assert up.returncode == 0, up.stdout + up.stderr + fresh.logs()

    downloaded = sorted(path.rsplit("/", 1)[-1] for path, _ in fake.downloads())
    assert downloaded == sorted(path.name for path in tiny_model.iterdir())
    fetch_lines = fresh.service_logs(FETCH)
    assert any("verified and published" in line for line in fetch_lines), fetch_lines
    checked = "reranker: model directory /models/current: XLMRobertaForSequenceClassification"
    assert any(line.startswith(checked) for line in fetch_lines), fetch_lines
    assert fresh.inspect(FETCH)["State"]["ExitCode"] == 0  # type: ignore[index]
    assert fresh.inspect(FETCH)["Config"]["Healthcheck"]["Test"] == ["NONE"]  # type: ignore[index]

    reranker = fresh.inspect()
    assert reranker["State"]["Health"]["Status"] == "healthy"  # type: ignore[index]
    (mount,) = reranker["Mounts"]  # type: ignore[misc]
    assert (mount["Type"], mount["Destination"], mount["RW"]) == ("volume", "/models", False)
    assert "HF_HUB_OFFLINE=1" in reranker["Config"]["Env"]  # type: ignore[index]
    record = json.loads(fresh.compose("exec", "-T", SERVICE, "cat", "/models/current/.fetched.json", check=True).stdout)
    assert (record["model_id"], record["source"], record["commit"]) == (MODEL_ID, "huggingface", COMMIT)
    # The reranker cannot write the volume.
    assert fresh.compose("exec", "-T", SERVICE, "touch", "/models/current/x").returncode != 0

    response = httpx.post(
        f"{fresh.base_url}/v1/rerank",
        json={"model": "m", "query": "What's the weather?", "documents": ["Is it sunny today?", "Bananas"]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert sorted(item["index"] for item in response.json()["results"]) == [0, 1]


def test_second_up_does_not_fetch_again(fresh: Stack, hub: tuple[FakeHub, str]) -> None:
    fake, _ = hub
    requests_before = len(fake.requests)
    # As after a reboot or `docker compose down`: the reranker is recreated, the volume kept.
    fresh.compose("down", "--timeout", "30", check=True, timeout=120)
    up = fresh.up()
    assert up.returncode == 0, up.stdout + up.stderr + fresh.logs()
    assert len(fake.requests) == requests_before  # not one request to the hub
    assert any("already in the volume" in line for line in fresh.service_logs(FETCH))
    assert httpx.get(f"{fresh.base_url}/ready", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("setting", "exit_code", "needles"),
    [
        pytest.param(
            {"MODEL_ID": "BAAI/no-such-reranker"}, 3, ["BAAI/no-such-reranker not found", "MODEL_ID"], id="404"
        ),
        pytest.param({"HF_TOKEN": "hf_wrong"}, 3, ["HTTP 401", "HF_TOKEN"], id="bad-token"),
        pytest.param({"cut": "model.safetensors"}, 4, ["cannot download", "next run resumes"], id="interrupted"),
        pytest.param(
            {"MODEL_DIR": "/srv/models/bge-reranker-base"},
            2,
            ["MODEL_DIR=/srv/models/bge-reranker-base is set", "compose.model-dir.yaml"],
            id="model-dir-without-its-compose-file",
        ),
    ],
)
def test_a_failed_fetch_fails_up_with_one_line_and_never_starts_the_reranker(
    built_image: str,
    hub: tuple[FakeHub, str],
    workdir: Path,
    tiny_model: Path,
    setting: dict[str, str],
    exit_code: int,
    needles: list[str],
) -> None:
    fake, endpoint = hub
    settings = {"HF_ENDPOINT": endpoint, **{k: v for k, v in setting.items() if k != "cut"}}
    stack = make_stack(
        workdir / f"fail-{exit_code}-{len(setting)}-{next(iter(setting))}",
        f"{PROJECT}-fetchfail",
        settings,
        model_dir=tiny_model,
        files=COMPOSE_FILES,
    )
    if "HF_TOKEN" in setting:
        fake.token = "hf_right"
    if "cut" in setting:
        fake.cut_after[setting["cut"]] = 20_000  # every response for the weights breaks off
    try:
        stack.down()
        started = time.monotonic()
        up = stack.up(timeout=300)
        output = up.stdout + up.stderr
        assert up.returncode != 0, output
        assert FETCH in output and f"exit {exit_code}" in output, output
        assert time.monotonic() - started < 120
        lines = stack.service_logs(FETCH)
        assert len(lines) >= 1 and lines[-1].startswith("model-fetch: "), lines
        failures = [line for line in lines if not line.startswith("model-fetch: ") or "nothing to do" in line]
        assert failures == [], lines  # no traceback, no client chatter
        for needle in needles:
            assert needle in lines[-1], lines[-1]
        assert "Traceback" not in stack.logs()
        # The reranker was created but never started: no half-fetched model served, nothing to restart.
        state = stack.inspect()["State"]
        assert state["Status"] == "created" and stack.inspect()["RestartCount"] == 0, state  # type: ignore[index]
        listing = run(
            [
                "docker",
                "run",
                "--rm",
                "-v",
                f"{stack.project}_models:/models:ro",
                "--entrypoint",
                "ls",
                built_image,
                "-A",
                "/models",
            ],
            check=True,
        ).stdout.split()
        assert "current" not in listing and "snapshots" not in listing, listing
    finally:
        fake.token = None
        fake.cut_after.clear()
        stack.down()


# --- a model directory the service cannot read ----------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(built_image: str, workdir: Path, tiny_model: Path) -> Iterator[Stack]:
    """MODEL_DIR whose weights are mode 600, owned by root: the container's uid 10001 cannot read them."""
    model_dir = workdir / "unreadable-model"
    shutil.copytree(tiny_model, model_dir)
    model_dir.chmod(0o755)
    (model_dir / "model.safetensors").chmod(0o600)
    stack = make_stack(
        workdir / "broken",
        f"{PROJECT}-broken",
        {"MODEL_DIR": str(model_dir), "RERANKER_FAILURE_DELAY": "60"},
        model_dir=model_dir,
        files=(*COMPOSE_FILES, MODEL_DIR_FILE),
    )
    stack.down()
    yield stack
    stack.down()


EXPECTED = "permission denied reading model.safetensors"


def test_unreadable_weights_fail_up_with_the_one_line_reason(broken: Stack) -> None:
    started = time.monotonic()
    up = broken.up(timeout=300)
    output = up.stdout + up.stderr
    assert up.returncode != 0, output
    assert f'service "{FETCH}" didn\'t complete successfully: exit 2' in output, output
    assert time.monotonic() - started < 120
    (line,) = broken.service_logs(FETCH)  # one line, nothing else
    # The settings' own check catches it first ("invalid configuration: RERANKER_MODEL_PATH: ..."), naming the variable.
    assert line.startswith("reranker: ") and f"model directory /model: {EXPECTED}" in line, line
    assert "as uid 10001" in line and "(owner uid 0, mode 0600)" in line and "chmod" in line, line
    state = broken.inspect()["State"]
    assert state["Status"] == "created" and broken.inspect()["RestartCount"] == 0, state  # type: ignore[index]


def test_the_reranker_alone_holds_the_failure_instead_of_restarting(broken: Stack) -> None:
    """As when the directory breaks under a running stack: the reranker itself says why once, then waits
    (RERANKER_FAILURE_DELAY) instead of letting Docker restart it every few seconds."""
    up = broken.compose("up", "-d", "--no-deps", SERVICE, timeout=120)
    assert up.returncode == 0, up.stderr
    time.sleep(20)  # without the hold, Docker would have restarted it about 5 times by now (0.1, 0.2, ... s)
    info = broken.inspect()
    assert info["RestartCount"] == 0 and info["State"]["Status"] == "running", info["State"]  # type: ignore[index]
    lines = broken.service_logs(SERVICE)
    assert len(lines) == 1 and lines[0].startswith("reranker: ") and EXPECTED in lines[0], lines
    # The held container still stops at once (SIGTERM is handled while it waits).
    started = time.monotonic()
    broken.compose("stop", "--timeout", "30", SERVICE, check=True, timeout=60)
    assert time.monotonic() - started < 10
    assert broken.inspect()["State"]["ExitCode"] == 2  # type: ignore[index]


def test_two_models_fetched_by_one_up_and_served_side_by_side(
    built_image: str, hub: tuple[FakeHub, str], workdir: Path, tiny_model: Path
) -> None:
    """MODEL_ID lists two models by name: model-fetch fetches each into its own folder of the volume, the image's
    entry point serves them under those names, and each scores as its own CrossEncoder (float32)."""
    from tests.test_published_models import cross_encoder_scores

    fake, endpoint = hub
    minilm = world_readable_model(workdir / "minilm", family="ms-marco-MiniLM-L-6-v2")
    fake.add_repo("cross-encoder/ms-marco-MiniLM-L-6-v2", minilm)
    stack = make_stack(
        workdir / "two-models",
        f"{PROJECT}-two",
        {
            "HF_ENDPOINT": endpoint,
            "MODEL_ID": f"bge={MODEL_ID},minilm=cross-encoder/ms-marco-MiniLM-L-6-v2",
            "RERANKER_DTYPE": "float32",
        },
        model_dir=tiny_model,
        files=COMPOSE_FILES,
    )
    stack.down()
    try:
        up = stack.up()
        assert up.returncode == 0, up.stdout + up.stderr + stack.logs()
        fetch_lines = stack.service_logs(FETCH)
        assert sum("verified and published" in line for line in fetch_lines) == 2, fetch_lines
        checked = [line for line in fetch_lines if line.startswith("reranker: bge = model directory")]
        assert (
            checked and "minilm = model directory /models/minilm/current: BertForSequenceClassification" in checked[0]
        )

        models = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"]
        assert [model["id"] for model in models] == ["bge", "minilm"]
        query, documents = "What's the weather?", ["Is it sunny today?", "Bananas are yellow", "Rain is coming"]
        for name, directory in (("bge", tiny_model), ("minilm", minilm)):
            expected = cross_encoder_scores(directory, [(query, document) for document in documents])
            answer = httpx.post(
                f"{stack.base_url}/v1/rerank",
                json={"model": name, "query": query, "documents": documents},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            scores = {item["index"]: item["relevance_score"] for item in answer.json()["results"]}
            assert [scores[i] for i in range(len(documents))] == pytest.approx(list(expected), abs=2e-5)
            info = httpx.get(f"{stack.base_url}/models/{name}/info", timeout=10).json()
            assert info["model_id"] == name
        unknown = httpx.post(
            f"{stack.base_url}/v1/rerank", json={"model": "nope", "query": query, "documents": documents}, timeout=30
        )
        assert unknown.status_code == 404 and "bge, minilm" in unknown.json()["error"]["message"]
        metrics = httpx.get(f"{stack.base_url}/metrics", timeout=10).text
        assert 'reranker_pairs_scored_total{model="minilm"} 3.0' in metrics
    finally:
        stack.down()
