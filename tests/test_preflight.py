"""``python -m app``'s preflight: a model it cannot serve stops it with one line and exit 2, before gunicorn.

Run as the container runs it (a subprocess). The unreadable-weights case needs a uid other than the file's owner
and is checked in the container (tests/e2e), where the service runs as uid 10001.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_app(model_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")},
        "RERANKER_MODEL_PATH": str(model_path),
        "PYTHONPATH": str(REPO_ROOT),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "app", *args], env=environment, capture_output=True, text=True, timeout=120
    )


def the_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reranker: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def test_check_passes_on_a_servable_model(tiny_model_dir: Path) -> None:
    result = run_app(tiny_model_dir, "--check")
    assert result.returncode == 0, result.stderr
    assert str(tiny_model_dir) in result.stdout and "ForSequenceClassification" in result.stdout


def test_missing_directory_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_app(tmp_path / "nowhere")
    assert result.returncode == 2
    line = the_line(result)
    assert str(tmp_path / "nowhere") in line and "does not exist" in line


def test_not_a_reranker_is_one_line_naming_path_reason_and_fix(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "embedding-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["XLMRobertaModel"]  # an embedding model's head, not a classifier
    (model / "config.json").write_text(json.dumps(config))
    result = run_app(model)
    assert result.returncode == 2
    line = the_line(result)
    assert str(model) in line and "XLMRobertaModel" in line and "not a sequence classifier" in line


def test_broken_tokenizer_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "truncated-download"
    shutil.copytree(tiny_model_dir, model)
    data = (model / "tokenizer.json").read_bytes()
    (model / "tokenizer.json").write_bytes(data[: len(data) // 2])  # a download cut in half
    result = run_app(model)
    assert result.returncode == 2
    line = the_line(result)
    assert str(model) in line and "tokenizer" in line


def test_debug_log_level_adds_the_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "embedding-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["XLMRobertaModel"]
    (model / "config.json").write_text(json.dumps(config))
    result = run_app(model, RERANKER_LOG_LEVEL="debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("reranker: ")


def test_failure_delay_waits_and_sigterm_ends_it_at_once(tmp_path: Path) -> None:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")},
        "RERANKER_MODEL_PATH": str(tmp_path / "nowhere"),
        "RERANKER_FAILURE_DELAY": "60",
        "PYTHONPATH": str(REPO_ROOT),
    }
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "app"], env=environment, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # printed before the wait, so `docker logs` shows it at once
        assert line.startswith("reranker: ") and "does not exist" in line
        time.sleep(1)
        assert process.poll() is None  # still waiting: Docker will not restart it yet
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 2
    finally:
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_a_bad_failure_delay_does_not_hide_the_reason(tmp_path: Path, value: str) -> None:
    result = run_app(tmp_path / "nowhere", RERANKER_FAILURE_DELAY=value)
    assert result.returncode == 2
    assert "does not exist" in the_line(result)
