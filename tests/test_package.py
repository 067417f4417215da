"""``pip install .`` in a fresh virtual environment gives a package whose console script serves.

The environment is new and the install is a real ``pip install .`` (build backend, metadata, console script); its
third-party dependencies are made visible from the test environment through a ``.pth`` file rather than downloaded
again (torch alone is 700 MB), which pip accepts as satisfying the requirements. The server then runs from a
directory outside the repository, so everything it loads (the gunicorn configuration included) comes from the
installed package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.utils import REPO_ROOT, free_port, venv_seeing_this_python

pytestmark = pytest.mark.server


def test_pip_install_then_the_console_script_serves(tiny_model_dir: Path, tmp_path: Path) -> None:
    python, purelib = venv_seeing_this_python(tmp_path / "venv")  # test dependencies: this python's
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO_ROOT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    script = python.parent / "reranker"
    assert script.is_file()
    where = subprocess.run(
        [str(python), "-c", "import app; print(app.__file__)"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert where.startswith(str(purelib)), where  # the installed copy, not the checkout

    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        RERANKER_MODEL_PATH=str(tiny_model_dir),
        RERANKER_HOST="127.0.0.1",
        RERANKER_PORT=str(port),
        WEB_CONCURRENCY="1",
        RERANKER_TORCH_THREADS="1",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(script)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and server.poll() is None and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.3)
        assert ready, log.read_text(errors="replace")
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/rerank",
            timeout=30,
            json={"query": "What is a panda?", "documents": ["hi", "The giant panda is a bear."]},
        )
        assert answer.status_code == 200 and len(answer.json()["results"]) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, log.read_text(errors="replace")
