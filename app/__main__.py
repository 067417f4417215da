"""``python -m app``: check the settings, prepare the metrics directory, then become gunicorn.

Exactly what the container runs. An invalid setting or a missing model directory stops here with one line,
before any worker starts.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from app.config import SettingsError, load_settings

GUNICORN_CONFIG = Path(__file__).resolve().parent.parent / "docker" / "gunicorn.conf.py"


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"reranker: {error}", file=sys.stderr)
        sys.exit(2)
    if not GUNICORN_CONFIG.is_file():
        print(f"reranker: gunicorn configuration {GUNICORN_CONFIG} is missing", file=sys.stderr)
        sys.exit(2)
    # Multiprocess metrics: the directory is set before any worker imports prometheus_client and starts
    # empty, so counters from an earlier run are not served as if they were this one's.
    metrics_dir = settings.prometheus_multiproc_dir
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # batch encodes run in our own threads
    argv = [sys.executable, "-m", "gunicorn", "--config", str(GUNICORN_CONFIG), "app.main:create_app()"]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
