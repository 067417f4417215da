"""``python -m app``: check the settings and the model, prepare the metrics directory, then become gunicorn.

Exactly what the container runs. Before any worker starts, a preflight reads the model directory the way the
service will: the files (readable by this uid?), ``config.json``, the tokenizer, and whether the service can pair
texts with it (``app.engine.model_dir.inspect_model_dir``). Anything wrong stops here with exactly one line
``reranker: <path, reason, fix>`` on stderr and exit status 2 (no traceback unless ``RERANKER_LOG_LEVEL=debug``),
instead of every worker failing with a traceback.

``python -m app --check`` runs the same checks and exits (0 = the model can be served).

``RERANKER_FAILURE_DELAY`` (seconds, default 0) makes a failed check wait that long before exiting. The container
sets it: a configuration error does not fix itself, and Docker restarts a container that exits within 10 s with a
back-off that starts at 0.1 s, so without the wait a broken model directory restarts a dozen times in five
minutes, each time printing the same line.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sys
import time
import traceback

from app.config import Device, EngineMode, Settings, SettingsError, http_workers, load_settings

# Inside the package, so an installed package (pip install ., the console script) finds it wherever it runs.
GUNICORN_CONFIG = "python:app.gunicorn_conf"
EXIT_CONFIG = 2


class PreflightError(Exception):
    """The model cannot be served; ``str()`` is one line naming the path, the reason and the fix."""


def preflight(settings: Settings) -> str:
    """Check every model directory, and on a CPU host that the models fit in its memory; return a one-line
    description of what will be served, or raise PreflightError."""
    from app.engine.model_dir import ModelLoadError, encoder_settings, inspect_model_dir

    served = settings.served_models()
    summaries = []
    for model in served:
        try:
            info = inspect_model_dir(model.path, **encoder_settings(settings))
        except ModelLoadError as error:
            raise PreflightError(f"model {model.name}: {error}" if len(served) > 1 else str(error)) from None
        summary = (
            f"model directory {model.path}: {info.architecture}, max_length {info.max_length}, "
            f"{info.tokenizer_class}, recipe {info.recipe.name} ({info.recipe_evidence})"
        )
        summaries.append(f"{model.name} = {summary}" if len(served) > 1 else summary)
    if not gpu_device_nodes() or settings.device is Device.cpu:
        # A GPU's free memory is measured by the engine process that holds the models, before it loads them.
        from app.engine.memory import MemoryRefusal, check_models_fit, cpu_copies

        workers = http_workers(settings, engines=settings.engine is EngineMode.process)
        try:
            check_models_fit(settings, where="start-up", device="cpu", copies=cpu_copies(settings, workers))
        except MemoryRefusal as error:
            raise PreflightError(str(error)) from None
    return "; ".join(summaries)


def gpu_device_nodes() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/nvidiactl"))


def _fail(message: str, *, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    # One line: a reason spread over several lines would be cut apart by log collectors.
    print(f"reranker: {' '.join(message.split())}", file=sys.stderr, flush=True)
    delay = os.environ.get("RERANKER_FAILURE_DELAY", "0")
    try:
        seconds = float(delay)
    except ValueError:
        seconds = 0.0
    if seconds > 0:
        # PID 1 in a container ignores signals it has no handler for: without this, `docker compose down` would
        # wait for the whole delay and then kill.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_CONFIG))
        signal.signal(signal.SIGINT, lambda *_: sys.exit(EXIT_CONFIG))
        time.sleep(seconds)
    sys.exit(EXIT_CONFIG)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    check_only = "--check" in args
    debug = os.environ.get("RERANKER_LOG_LEVEL", "").strip().lower() == "debug"
    try:
        settings = load_settings()
    except SettingsError as error:
        _fail(str(error), debug=debug)
        return
    try:
        summary = preflight(settings)
    except PreflightError as error:
        _fail(str(error), debug=debug)
        return
    except Exception as error:  # a check that crashed is still one line, with the traceback on request
        detail = " ".join(str(error).split())[:300]
        _fail(
            f"checking the model directories ({', '.join(str(model.path) for model in settings.served_models())}) "
            f"failed: {type(error).__name__}: {detail} "
            "(RERANKER_LOG_LEVEL=debug shows the traceback)",
            debug=debug,
        )
        return
    print(f"reranker: {summary}", flush=True)
    # What this start runs with, once (the master; the workers inherit it), the API key redacted.
    print(f"reranker: settings {json.dumps(settings.effective(), sort_keys=True)}", flush=True)
    if check_only:
        return
    # Multiprocess metrics: the directory is set before any worker imports prometheus_client and starts
    # empty, so counters from an earlier run are not served as if they were this one's.
    metrics_dir = settings.prometheus_multiproc_dir
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # batch encodes run in our own threads
    argv_ = [sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG, "app.main:create_app()"]
    os.execv(sys.executable, argv_)


if __name__ == "__main__":
    main()
