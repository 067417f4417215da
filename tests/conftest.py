"""Shared fixtures: the offline tiny model, settings, a fake-engine app, and a real ``python -m app`` server
(started by ``tests.utils.start_server``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.model_factory import build_cross_encoder

# The server launcher and friends live in tests/utils.py (the benchmark and the soak use them without pytest);
# imported here too for the test modules that take them from conftest.
from tests.utils import REPO_ROOT, ServerProcess, fake_model_dir, free_port, start_server, wait_until_ready

__all__ = ["REPO_ROOT", "ServerProcess", "fake_model_dir", "free_port", "start_server", "wait_until_ready"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight cross-encoder with a tokenizer trained on the spot (built once per session)."""
    return build_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-reranker", shape="tiny")


@pytest.fixture(scope="module")
def live_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``python -m app`` with 2 workers on the tiny model, shared by a test module."""
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("server"), workers=2)
    yield server
    server.stop()


@pytest.fixture
def fake_settings(tmp_path: Path) -> Callable[..., Any]:
    """Settings with a model directory that passes the checks; meant for the fake backend."""
    from app.config import Settings

    def make(**overrides: Any) -> Settings:
        return Settings(model_path=fake_model_dir(tmp_path / "fake-model"), **overrides)

    return make


@pytest.fixture
def make_client(fake_settings: Callable[..., Any]) -> Iterator[Callable[..., TestClient]]:
    """In-process apps on the fake backend (lifespan run), closed at the test's end."""
    from app.engine.fake import FakeBackend
    from app.main import create_app

    clients: list[TestClient] = []

    def make(backend: FakeBackend | None = None, **overrides: Any) -> TestClient:
        app = create_app(fake_settings(**overrides), backend_factory=lambda: backend or FakeBackend())
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
