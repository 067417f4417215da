"""Fixtures of the reliability suite: real ``python -m app`` servers on the tiny model, and a fake-engine app.

Every module here sets ``pytestmark = pytest.mark.reliability`` (select with ``-m reliability``, skip with
``-m "not reliability"``). Servers run the tiny model in float32 so that an answer computed under load, in
whatever batch, must equal the answer computed alone: any difference is a wrong answer, not rounding.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.utils import ServerProcess, start_server

# Settings every reliability server shares: exact float32 scores, one torch thread per worker (2 cores), and
# eager mode: torch.compile adds ~20 s to every worker start, and these tests start (and replace) many workers.
# Compilation is the engine's business (tests/test_engine.py, bench/); the promises here hold either way.
BASE_SETTINGS = {"RERANKER_DTYPE": "float32", "RERANKER_TORCH_THREADS": "1", "RERANKER_TORCH_COMPILE": "off"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: load, fault, bad-input and security tests on real servers (a few minutes)"
    )


@pytest.fixture
def server_factory(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers for one test (stopped, SIGKILL if need be, at its end)."""
    servers: list[ServerProcess] = []

    def make(*, workers: int | None = 2, model_dir: Path | None = None, **settings: str) -> ServerProcess:
        folder = tmp_path / f"server-{len(servers)}"
        folder.mkdir()
        server = start_server(model_dir or tiny_model_dir, folder, workers=workers, **{**BASE_SETTINGS, **settings})
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(timeout=30)


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may move or delete."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model-copy"))
