"""gunicorn configuration, built from the service's settings (``python -m app`` passes it as
``--config python:app.gunicorn_conf``; the image runs exactly that).

The master only manages processes: nothing loads the model or touches CUDA in it (``preload_app`` off). With
engine processes (``RERANKER_ENGINE``; the default on a GPU) it starts one per device as a fresh interpreter
before forking the workers, replaces one that dies, and stops them after the workers have drained
(``app/engine/supervisor.py``); inline, each uvicorn worker loads its own model in the FastAPI lifespan.
"""

import os
from typing import Any

from prometheus_client import multiprocess

from app.config import http_workers, load_settings
from app.engine.supervisor import EngineSupervisor, plan_engines, start_engines

_settings = load_settings()
# Decided once, here in the master: where the model runs decides how many workers an unset WEB_CONCURRENCY
# means, and the workers and engines it starts read the resolved number from the environment they inherit.
_engine_specs = plan_engines(_settings)
_engines: EngineSupervisor | None = None
ENGINE_MODE_WORKER_NICENESS = 5

bind = [f"{_settings.host}:{_settings.port}"]
workers = http_workers(_settings, engines=bool(_engine_specs))
os.environ["WEB_CONCURRENCY"] = str(workers)
worker_class = "uvicorn_worker.UvicornWorker"
preload_app = False
# A worker is silent while it loads and warms its model: the timeout must cover that.
timeout = _settings.worker_timeout
# Below compose's stop_grace_period, so in-flight requests finish before Docker's SIGKILL.
graceful_timeout = _settings.graceful_timeout
keepalive = 75  # longer than the idle timeout of common clients' connection pools
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
accesslog = None  # the app writes its own structured access line
errorlog = "-"
loglevel = _settings.log_level
proc_name = "reranker"
control_socket_disable = True  # gunicorn 27 writes one under $HOME; the container's root filesystem is read-only
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "line": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"},
    },
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"},
    },
    "root": {"handlers": ["stderr"], "level": _settings.log_level.upper()},
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "level": _settings.log_level.upper(), "propagate": False},
        "gunicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
    },
}


# gunicorn's hooks (its objects are untyped): server is the Arbiter, worker the Worker.
def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges must stop counting (multiprocess "live*" modes).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_starting(server: Any) -> None:  # gunicorn hook: in the master, before the workers fork
    global _engines
    if _settings.workers is None:
        where = f"feeding {len(_engine_specs)} engine process(es)" if _engine_specs else "each with its own model"
        server.log.info("%d HTTP workers %s (WEB_CONCURRENCY unset)", workers, where)
    _engines = start_engines(_settings, _engine_specs)


def on_exit(server: Any) -> None:  # gunicorn hook: in the master, after the workers have stopped (drained)
    if _engines is not None:
        _engines.stop(timeout_s=_settings.graceful_timeout)


def post_fork(server: Any, worker: Any) -> None:  # gunicorn hook: in each new worker
    if _engines is not None:
        # The engines' forward threads must never wait for a core (a late kernel launch is idle device time);
        # under CPU contention HTTP workers yield to them. Raising niceness needs no privilege.
        os.nice(ENGINE_MODE_WORKER_NICENESS)
