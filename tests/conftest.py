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

# Test tiers (pyproject.toml's markers; `pytest -m unit` runs one). A module's own marks win; the rest come
# from where the module is and what it runs: unit = the fake engine or pure code (seconds), integration = the
# real loader and a model built offline, in-process.
TIERS = ("unit", "integration", "server", "reliability", "docker", "gpu")
UNIT_MODULES = {
    "test_api.py",
    "test_batcher.py",
    "test_settings.py",
    "test_cuda_graph_buckets.py",
    "test_cpus.py",
    "test_kubernetes.py",
    "test_torch_flavour_check.py",
}
_tier_seconds: dict[str, float] = {}


def tier_of(item: pytest.Item) -> str:
    for tier in ("docker", "gpu", "reliability", "server"):
        if item.get_closest_marker(tier):
            return tier
    parts = item.path.parts
    if "e2e" in parts:
        return "docker"
    if "reliability" in parts:
        return "reliability"
    return "unit" if item.path.name in UNIT_MODULES else "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(tier)
        item.stash[_TIER] = tier


_TIER = pytest.StashKey[str]()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    tier = report.user_properties and dict(report.user_properties).get("tier")
    if tier:
        _tier_seconds[str(tier)] = _tier_seconds.get(str(tier), 0.0) + report.duration


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    report.user_properties.append(("tier", item.stash.get(_TIER, "integration")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _tier_seconds:
        spent = ", ".join(f"{tier} {_tier_seconds[tier]:.0f}s" for tier in TIERS if tier in _tier_seconds)
        terminalreporter.write_line(f"time per tier (setup, call and teardown): {spent}")


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
