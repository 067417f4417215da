"""The model fetcher (``python -m app.fetch``) for real: huggingface_hub's and modelscope's own clients against a
local stand-in for the hubs.

Each test runs the fetcher as the model-fetch container does (a subprocess with ``HF_ENDPOINT`` or
``MODELSCOPE_ENDPOINT`` pointing at tests/fake_hub.py) and checks what lands in the models directory, what went
over the wire, and the one line a failure prints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import model_dir_problem
from app.fetch import CURRENT, FETCHED_MARKER, wanted
from tests.fake_hub import COMMIT, FakeHub, FakeHubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "BAAI/bge-reranker-base"


@pytest.fixture
def hub(tiny_model_dir: Path) -> Iterator[tuple[FakeHub, str]]:
    fake = FakeHub()
    fake.add_repo(MODEL_ID, tiny_model_dir)
    with FakeHubServer(fake) as server:
        yield fake, server.url


def run_fetch(endpoint: str, root: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODEL"))},
        "HF_ENDPOINT": endpoint,
        "MODELSCOPE_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),  # no token or cache of this machine's user
        "HOME": str(tmp_path / "home"),
        "MODELSCOPE_CACHE": str(tmp_path / "modelscope-cache"),
        "MODELS_ROOT": str(root),
        "PYTHONPATH": str(REPO_ROOT),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "app.fetch"], env=environment, capture_output=True, text=True, timeout=120
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """A failure says why in exactly one line, without a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("model-fetch: ")
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


def test_fetch_lands_a_verified_model_and_a_second_run_does_not_download(
    hub: tuple[FakeHub, str], root: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    fake, url = hub
    result = run_fetch(url, root, tmp_path)
    assert result.returncode == 0, result.stderr

    current = root / CURRENT
    assert current.is_symlink() and not os.path.isabs(os.readlink(current))  # resolves wherever it is mounted
    for source in tiny_model_dir.iterdir():
        assert (current / source.name).read_bytes() == source.read_bytes(), source.name
    assert model_dir_problem(current) is None  # what the reranker's preflight accepts
    record = json.loads((current / FETCHED_MARKER).read_text())
    assert record["model_id"] == MODEL_ID and record["source"] == "huggingface" and record["commit"] == COMMIT
    assert not (current / ".cache").exists()  # the client's resume records are not part of the model
    assert len(fake.downloads()) == len(list(tiny_model_dir.iterdir()))

    requests_before = len(fake.requests)
    again = run_fetch(url, root, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already in the volume" in again.stdout
    assert len(fake.requests) == requests_before  # no download, not even a metadata call


def test_second_run_needs_no_network_at_all(hub: tuple[FakeHub, str], root: Path, tmp_path: Path) -> None:
    _, url = hub
    assert run_fetch(url, root, tmp_path).returncode == 0
    # The hub is gone (an air-gapped host after the first fetch): the volume's copy is enough.
    result = run_fetch("http://127.0.0.1:9", root, tmp_path)
    assert result.returncode == 0, result.stderr


def test_bad_token_is_one_line_and_non_zero(hub: tuple[FakeHub, str], root: Path, tmp_path: Path) -> None:
    fake, url = hub
    fake.token = "hf_right"
    result = run_fetch(url, root, tmp_path, HF_TOKEN="hf_wrong")
    assert result.returncode == 3
    line = one_line(result)
    assert "HTTP 401" in line and "HF_TOKEN" in line and url in line
    assert not (root / CURRENT).exists()
    # The client sent the token it was given: the 401 is the hub's answer to it.
    assert fake.requests[0][2].get("authorization") == "Bearer hf_wrong"

    fine = run_fetch(url, root, tmp_path, HF_TOKEN="hf_right")
    assert fine.returncode == 0, fine.stderr


def test_missing_model_is_one_line_and_non_zero(hub: tuple[FakeHub, str], root: Path, tmp_path: Path) -> None:
    _, url = hub
    result = run_fetch(url, root, tmp_path, MODEL_ID="BAAI/no-such-reranker")
    assert result.returncode == 3
    line = one_line(result)
    assert "BAAI/no-such-reranker not found" in line and "MODEL_ID" in line and "HTTP 404" in line
    assert not (root / CURRENT).exists()


def test_unreachable_hub_is_one_line_and_non_zero(root: Path, tmp_path: Path) -> None:
    result = run_fetch("http://127.0.0.1:9", root, tmp_path)  # nothing listens on the discard port
    assert result.returncode == 4
    line = one_line(result)
    assert "cannot download from http://127.0.0.1:9" in line and "HF_ENDPOINT" in line
    assert not (root / CURRENT).exists()


def test_a_dropped_transfer_is_resumed_with_a_range_request(root: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    # huggingface_hub writes what it received in 10 MiB chunks and resumes from there: a file over that size
    # shows the resume (a real bge-reranker-base weights file is 1.1 GB).
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, repo)
    large = os.urandom(11 * 1024 * 1024)
    (repo / "large.dat").write_bytes(large)
    fake = FakeHub()
    fake.add_repo(MODEL_ID, repo)
    fake.cut_after["large.dat"] = 10_600_000
    fake.cuts_left["large.dat"] = 1  # the first response breaks off, the next ones are whole
    with FakeHubServer(fake) as server:
        result = run_fetch(server.url, root, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (root / CURRENT / "large.dat").read_bytes() == large
    (_, first), (_, second) = fake.downloads("large.dat")
    assert "range" not in first
    assert second["range"] == f"bytes={10 * 1024 * 1024}-"  # the client asked for the rest only


def test_interrupted_fetch_is_never_published_and_the_next_run_fetches_only_what_is_missing(
    hub: tuple[FakeHub, str], root: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    fake, url = hub
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    # Every response for the weights breaks off after 20 kB: the client's own retries cannot finish the file
    # (a host that loses its connection for good, or `docker compose down` in the middle).
    fake.cut_after["model.safetensors"] = 20_000
    result = run_fetch(url, root, tmp_path)
    assert result.returncode == 4, result.stderr
    line = one_line(result)
    assert "model.safetensors" in line or "RemoteProtocolError" in line
    assert "next run resumes" in line
    # Nothing the reranker would accept: no "current", no snapshot; the partial copy lives only under .partial/.
    assert not (root / CURRENT).exists()
    assert not (root / "snapshots").exists() or not any((root / "snapshots").iterdir())
    staged = root / ".partial" / "huggingface--BAAI--bge-reranker-base"
    complete = {path.name for path in staged.iterdir() if path.is_file()}
    assert "model.safetensors" not in complete
    assert complete, "the files that did arrive are kept"

    del fake.cut_after["model.safetensors"]
    before = len(fake.downloads())
    resumed = run_fetch(url, root, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (root / CURRENT / "model.safetensors").read_bytes() == weights
    fetched_again = {path.rsplit("/", 1)[-1] for path, _ in fake.downloads()[before:]}
    assert "model.safetensors" in fetched_again
    assert not fetched_again & complete  # what the first run finished is not downloaded again


def test_a_file_that_fails_verification_is_not_published(hub: tuple[FakeHub, str], root: Path, tmp_path: Path) -> None:
    fake, url = hub
    # A mirror (or proxy) that alters the tokenizer but keeps its size: only the checksum can tell.
    tokenizer = fake.repos[MODEL_ID]["tokenizer.json"]
    listed = tokenizer.tree_entry()
    assert isinstance(listed["lfs"], dict)  # large enough to be an LFS file: the hub publishes its sha256
    fake.tree_override = {"tokenizer.json": {**listed, "lfs": {**listed["lfs"], "oid": "0" * 64}}}
    result = run_fetch(url, root, tmp_path)
    assert result.returncode == 5
    line = one_line(result)
    assert "tokenizer.json" in line and "failed verification" in line
    assert not (root / CURRENT).exists()

    fake.tree_override = {}
    fixed = run_fetch(url, root, tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert (root / CURRENT / "tokenizer.json").read_bytes() == tokenizer.data


def test_a_repository_that_is_not_a_model_is_refused(tmp_path: Path, root: Path) -> None:
    not_a_model = tmp_path / "dataset"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("just a readme\n")
    fake = FakeHub()
    fake.add_repo("someone/readme-only", not_a_model)
    with FakeHubServer(fake) as server:
        result = run_fetch(server.url, root, tmp_path, MODEL_ID="someone/readme-only")
    assert result.returncode == 5
    line = one_line(result)
    assert "not a model the service can load" in line and "config.json" in line
    assert not (root / CURRENT).exists()


def test_changing_model_id_fetches_the_new_one_and_drops_the_old(
    tmp_path: Path, root: Path, tiny_model_dir: Path
) -> None:
    fake = FakeHub()
    fake.add_repo(MODEL_ID, tiny_model_dir)
    fake.add_repo("BAAI/bge-reranker-v2-m3", tiny_model_dir)
    with FakeHubServer(fake) as server:
        assert run_fetch(server.url, root, tmp_path).returncode == 0
        result = run_fetch(server.url, root, tmp_path, MODEL_ID="BAAI/bge-reranker-v2-m3")
    assert result.returncode == 0, result.stderr
    assert json.loads((root / CURRENT / FETCHED_MARKER).read_text())["model_id"] == "BAAI/bge-reranker-v2-m3"
    assert [path.name for path in (root / "snapshots").iterdir()] == [os.readlink(root / CURRENT).split("/")[-1]]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MODEL_SOURCE": "github"}, "MODEL_SOURCE='github'"),
        ({"MODEL_ID": "bge-reranker-base"}, "MODEL_ID='bge-reranker-base'"),
    ],
)
def test_bad_settings_are_one_line_exit_2(root: Path, tmp_path: Path, env: dict[str, str], needle: str) -> None:
    result = run_fetch("http://127.0.0.1:9", root, tmp_path, **env)
    assert result.returncode == 2
    assert needle in one_line(result)


def test_model_dir_without_its_compose_file_is_refused(root: Path, tmp_path: Path) -> None:
    # MODEL_DIR set in .env but compose.model-dir.yaml not in COMPOSE_FILE: fetching would silently ignore it.
    result = run_fetch("http://127.0.0.1:9", root, tmp_path, MODEL_DIR="/srv/models/bge-reranker-base")
    assert result.returncode == 2
    line = one_line(result)
    assert "MODEL_DIR=/srv/models/bge-reranker-base is set" in line and "compose.model-dir.yaml" in line
    assert not any(root.iterdir())


def test_missing_models_directory_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_fetch("http://127.0.0.1:9", tmp_path / "not-mounted", tmp_path)
    assert result.returncode == 2
    assert "not-mounted does not exist" in one_line(result)


def test_only_the_files_the_service_needs_are_fetched() -> None:
    # The Hub's bge-reranker-base file list: the ONNX export and the pickled copy of the weights are skipped.
    listing = [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "onnx/model.onnx",
        "pytorch_model.bin",
        "sentencepiece.bpe.model",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert wanted(listing) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "sentencepiece.bpe.model",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # Without safetensors the pickled weights are the only ones: kept.
    assert "pytorch_model.bin" in wanted(["config.json", "pytorch_model.bin", "vocab.txt"])


# --- ModelScope -------------------------------------------------------------------------------------------------


def test_modelscope_fetch_lands_the_model_and_a_second_run_does_not_download(
    hub: tuple[FakeHub, str], root: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    fake, url = hub
    result = run_fetch(url, root, tmp_path, MODEL_SOURCE="modelscope")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bars or client logging
    for source in tiny_model_dir.iterdir():
        assert (root / CURRENT / source.name).read_bytes() == source.read_bytes(), source.name
    assert model_dir_problem(root / CURRENT) is None
    record = json.loads((root / CURRENT / FETCHED_MARKER).read_text())
    assert (record["source"], record["model_id"], record["revision"]) == ("modelscope", MODEL_ID, None)
    # ModelScope's own API, not the Hugging Face one.
    assert all(path.startswith("/api/v1/models/") or path.startswith("/api/v1/repos/") for _, path, _ in fake.requests)

    before = len(fake.requests)
    again = run_fetch(url, root, tmp_path, MODEL_SOURCE="modelscope")
    assert again.returncode == 0, again.stderr
    assert len(fake.requests) == before


def test_modelscope_missing_model_is_one_line(hub: tuple[FakeHub, str], root: Path, tmp_path: Path) -> None:
    _, url = hub
    result = run_fetch(url, root, tmp_path, MODEL_SOURCE="modelscope", MODEL_ID="BAAI/no-such-reranker")
    assert result.returncode == 3
    line = one_line(result)
    assert "BAAI/no-such-reranker not found on ModelScope" in line and "MODEL_ID" in line
    assert not (root / CURRENT).exists()


def test_modelscope_file_that_fails_its_checksum_is_not_published(
    hub: tuple[FakeHub, str], root: Path, tmp_path: Path
) -> None:
    fake, url = hub
    fake.modelscope_override = {"tokenizer.json": {"Sha256": "0" * 64}}  # the hub's record and the bytes differ
    result = run_fetch(url, root, tmp_path, MODEL_SOURCE="modelscope")
    assert result.returncode == 5
    line = one_line(result)
    assert "failed verification" in line and "tokenizer.json" in line
    assert not (root / CURRENT).exists()


def test_several_models_each_land_in_their_own_folder_and_are_served_by_name(
    hub: tuple[FakeHub, str], root: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    fake, url = hub
    fake.add_repo("cross-encoder/ms-marco-MiniLM-L-6-v2", tiny_model_dir)
    listed = "bge=BAAI/bge-reranker-base, minilm=cross-encoder/ms-marco-MiniLM-L-6-v2"
    result = run_fetch(url, root, tmp_path, MODEL_ID=listed)
    assert result.returncode == 0, result.stderr
    for name, model_id in (("bge", MODEL_ID), ("minilm", "cross-encoder/ms-marco-MiniLM-L-6-v2")):
        record = json.loads((root / name / CURRENT / FETCHED_MARKER).read_text())
        assert record["model_id"] == model_id
        assert (root / name / CURRENT / "config.json").is_file()
    assert not (root / CURRENT).exists()
    # What the image's entry point serves them as (RERANKER_MODELS), from the same layout.
    served = subprocess.run(
        [sys.executable, "-m", "app.fetch", "--print-served-models"],
        env={"MODEL_ID": listed, "MODELS_ROOT": str(root), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert served.stdout.strip() == f"bge={root / 'bge' / CURRENT},minilm={root / 'minilm' / CURRENT}"
    # A name given twice, or an entry without a name, is one line and exit status 2.
    for bad, needle in (
        (f"a={MODEL_ID},a={MODEL_ID}", "'a' is given twice"),
        (f"a={MODEL_ID},{MODEL_ID}", "name=org/model"),
    ):
        failed = run_fetch(url, root, tmp_path, MODEL_ID=bad)
        assert failed.returncode == 2 and needle in one_line(failed)
