"""Settings: defaults, environment names, and one clear line for an invalid value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import app.cpus
from app.config import (
    DType,
    LongDocuments,
    Settings,
    SettingsError,
    http_workers,
    load_settings,
    model_dir_problem,
)
from tests.utils import fake_model_dir


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return fake_model_dir(tmp_path / "model")


def test_defaults(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANKER_MODEL_PATH", str(model_dir))
    settings = load_settings()
    assert settings.model_name == "bge-reranker-base-local"
    assert (settings.host, settings.port, settings.max_length, settings.workers) == ("0.0.0.0", 9300, 512, None)
    assert settings.api_key is None and settings.dtype is DType.auto
    assert settings.long_documents is LongDocuments.truncate


@pytest.mark.parametrize(
    ("cpus", "engines", "expected"),
    [(2, False, 1), (64, False, 1), (2, True, 2), (16, True, 4), (24, True, 6), (64, True, 8)],
)
def test_unset_web_concurrency_means_one_worker_inline_and_one_per_four_cpus_beside_engines(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, cpus: int, engines: bool, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(app.cpus, "cgroup_cpu_limit", lambda: None)
    assert http_workers(Settings(model_path=model_dir), engines=engines) == expected
    # WEB_CONCURRENCY, when set, is what runs, wherever the model is.
    assert http_workers(Settings(model_path=model_dir, workers=3), engines=engines) == 3
    assert Settings(model_path=model_dir).worker_processes == 1  # outside a server: one process
    assert Settings(model_path=model_dir, workers=3).worker_processes == 3
    # A container's CPU quota counts, not the host's cores it may be scheduled on (docker run --cpus 6).
    monkeypatch.setattr(app.cpus, "cgroup_cpu_limit", lambda: 6.0)
    assert http_workers(Settings(model_path=model_dir), engines=True) == min(8, max(2, min(cpus, 6) // 4))


def test_environment_names(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANKER_MODEL_PATH", str(model_dir))
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    monkeypatch.setenv("RERANKER_DTYPE", "float16")
    monkeypatch.setenv("RERANKER_API_KEY", "")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/somewhere")
    settings = load_settings()
    assert settings.workers == 3 and settings.dtype is DType.float16
    assert settings.api_key is None  # an empty key means no key, not a key of ""
    assert settings.prometheus_multiproc_dir == Path("/tmp/somewhere")


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("RERANKER_PORT", "http", "RERANKER_PORT: Input should be a valid integer"),
        ("RERANKER_DEVICE", "tpu", "RERANKER_DEVICE: Input should be 'auto', 'cuda' or 'cpu'"),
        ("WEB_CONCURRENCY", "0", "WEB_CONCURRENCY: Input should be greater than or equal to 1"),
        ("RERANKER_MAX_BATCH_TOKENS", "100", "RERANKER_MAX_BATCH_TOKENS (100) must be at least RERANKER_MAX_LENGTH"),
        ("RERANKER_LOG_LEVEL", "loud", "RERANKER_LOG_LEVEL: must be one of"),
    ],
)
def test_an_invalid_value_is_one_line_naming_it(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv("RERANKER_MODEL_PATH", str(model_dir))
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_model_path_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RERANKER_MODEL_PATH", raising=False)
    with pytest.raises(SettingsError, match=r"set RERANKER_MODEL_PATH \(one model\) or RERANKER_MODELS"):
        load_settings()


def test_model_directory_problems_are_specific(tmp_path: Path) -> None:
    assert "does not exist" in str(model_dir_problem(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in str(model_dir_problem(tmp_path / "file"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in str(model_dir_problem(empty))
    (empty / "config.json").write_text("{}")
    assert "no weights" in str(model_dir_problem(empty))
    (empty / "model.safetensors").write_text("")
    assert "no tokenizer" in str(model_dir_problem(empty))
    (empty / "tokenizer.json").write_text("{}")
    assert model_dir_problem(empty) is None


def test_settings_can_be_built_in_code(model_dir: Path) -> None:
    settings = Settings(model_path=model_dir, workers=2, max_documents=10)
    assert settings.workers == 2 and settings.max_documents == 10


def test_effective_settings_name_every_variable_and_redact_the_key(tmp_path: Path) -> None:
    settings = Settings(model_path=fake_model_dir(tmp_path / "m"), api_key="s3cret-key", workers=3)  # type: ignore[arg-type]
    effective = settings.effective()
    assert effective["RERANKER_API_KEY"] == "**********"
    assert "s3cret-key" not in str(effective)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret-key"
    assert effective["WEB_CONCURRENCY"] == "3" and effective["PROMETHEUS_MULTIPROC_DIR"]
    assert len(effective) == len(Settings.model_fields)
