"""The engine processes' supervisor, run by the gunicorn master (``app/gunicorn_conf.py``'s hooks).

It decides once, before any worker forks, whether the model runs in engine processes and how many (one per
visible GPU, ``CUDA_VISIBLE_DEVICES`` respected; one on the CPU or the simulated device), starts them as fresh
interpreters (``python -m app.engine.process``: nothing CUDA ever runs in the master, so forking workers stays
safe), names their sockets to the workers through the environment they inherit, and replaces an engine that
dies. On shutdown (after the workers have drained) it stops them.

No torch here: whether GPUs exist is asked of a short-lived subprocess, and only when NVIDIA devices exist.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.config import BackendKind, Device, EngineMode, Settings

logger = logging.getLogger(__name__)

ENGINE_SOCKETS_ENV = "RERANKER_ENGINE_SOCKETS"  # set by the master for its workers; not a user setting
WATCH_INTERVAL_S = 0.5
MAX_RESTART_DELAY_S = 30.0
STABLE_AFTER_S = 60.0  # an engine up this long restarts without delay next time


def engine_sockets_from_environment() -> list[Path]:
    return [Path(path) for path in os.environ.get(ENGINE_SOCKETS_ENV, "").split(os.pathsep) if path]


def model_socket(engine_socket: Path, model_index: int) -> Path:
    """Where an engine serves the ``model_index``-th served model: one process per device holds every model
    (one CUDA context), each on its own socket; the first model keeps the engine's own socket name."""
    if model_index == 0:
        return engine_socket
    return engine_socket.with_name(f"{engine_socket.stem}.model-{model_index}{engine_socket.suffix}")


@dataclass(frozen=True)
class EngineSpec:
    index: int
    socket_path: Path
    env: dict[str, str] = field(default_factory=dict)  # on top of the master's environment


def visible_gpus() -> list[str]:
    """The GPU ids this server may use (as ``CUDA_VISIBLE_DEVICES`` names them), without touching CUDA here."""
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/nvidiactl")):
        return []  # no NVIDIA driver devices: no GPU, and no need to start torch to ask
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        count = int(probe.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as error:
        logger.warning("could not count the GPUs (%s); running without engine processes", error)
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [item.strip() for item in listed.split(",") if item.strip()][:count]


def plan_engines(settings: Settings) -> list[EngineSpec]:
    """The engine processes to run (none: every worker runs the model inline)."""
    if settings.engine is EngineMode.inline:
        return []
    directory = settings.engine_sockets_path

    def single() -> list[EngineSpec]:
        return [EngineSpec(0, directory / "engine-0.sock")]

    if settings.backend is BackendKind.simulated:
        return single()  # it stands for one GPU
    if settings.device is Device.cpu:
        return single() if settings.engine is EngineMode.process else []
    gpus = visible_gpus()
    if gpus:
        return [
            EngineSpec(index, directory / f"engine-{index}.sock", {"CUDA_VISIBLE_DEVICES": gpu})
            for index, gpu in enumerate(gpus)
        ]
    # No GPU. Asked for CUDA: inline, so the loader's own message stops the boot as it always did.
    if settings.engine is EngineMode.process and settings.device is Device.auto:
        return single()
    return []


@dataclass
class _Running:
    spec: EngineSpec
    process: subprocess.Popen[bytes]
    started: float
    restart_delay: float = 1.0
    served: bool = False  # this engine slot has been up (its socket appeared) at least once


class EngineSupervisor:
    def __init__(self, specs: list[EngineSpec]) -> None:
        self.specs = specs
        self._running: dict[int, _Running] = {}
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        return [running.process.pid for running in self._running.values()]

    def start(self) -> None:
        from app.engine.process import failure_marker

        for spec in self.specs:
            spec.socket_path.parent.mkdir(parents=True, exist_ok=True)
            for stale in (spec.socket_path, failure_marker(spec.socket_path)):
                stale.unlink(missing_ok=True)
            self._running[spec.index] = _Running(spec, self._spawn(spec), time.monotonic())
        # Workers fork from the master after this and inherit it.
        os.environ[ENGINE_SOCKETS_ENV] = os.pathsep.join(str(spec.socket_path) for spec in self.specs)
        self._watcher = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._watcher.start()

    def _spawn(self, spec: EngineSpec) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.engine.process", "--socket", str(spec.socket_path)],
            env={**os.environ, **spec.env},
            # Its own session: a terminal's Ctrl-C reaches the master, which drains the workers first and
            # only then stops the engines they depend on.
            start_new_session=True,
        )
        logger.info(
            "started engine %d (pid %d) on %s %s",
            spec.index,
            process.pid,
            spec.socket_path,
            " ".join(f"{k}={v}" for k, v in spec.env.items()),
        )
        return process

    def _watch(self) -> None:
        from app.engine.process import failure_marker

        while not self._stopping.wait(WATCH_INTERVAL_S):
            for index, running in list(self._running.items()):
                # poll() is also how we learn of a death when gunicorn's own reaping got the exit status first.
                if running.process.poll() is None:
                    running.served = running.served or running.spec.socket_path.exists()
                    continue
                with self._lock:
                    if self._stopping.is_set():
                        return
                    mark_metrics_dead(running.process.pid)
                    spec = running.spec
                    if failure_marker(spec.socket_path).is_file() and not running.served:
                        # The first start could not load the model: the waiting workers fail to boot with its
                        # reason and the server stops. (A replacement that cannot load is retried, below: the
                        # model directory may come back, and the workers keep serving readiness 503s meanwhile.)
                        logger.error("engine %d could not load the model; not restarting it", index)
                        del self._running[index]
                        continue
                    lived = time.monotonic() - running.started
                    delay = 0.0 if lived > STABLE_AFTER_S else running.restart_delay
                    logger.error(
                        "engine %d (pid %d) died after %.0fs; starting a new one in %.0fs",
                        index,
                        running.process.pid,
                        lived,
                        delay,
                    )
                    spec.socket_path.unlink(missing_ok=True)
                if delay and self._stopping.wait(delay):
                    return
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._running[index] = _Running(
                        spec,
                        self._spawn(spec),
                        time.monotonic(),
                        min(MAX_RESTART_DELAY_S, max(1.0, delay * 2)),
                        served=True,
                    )
                    self.restarts += 1

    def stop(self, *, timeout_s: float) -> None:
        """SIGTERM every engine (they finish the batches they hold), SIGKILL what is left after ``timeout_s``."""
        with self._lock:
            self._stopping.set()
        for running in self._running.values():
            if running.process.poll() is None:
                running.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for running in self._running.values():
            try:
                running.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait()
            mark_metrics_dead(running.process.pid)
            running.spec.socket_path.unlink(missing_ok=True)
        if self._watcher is not None:
            self._watcher.join(timeout=2)


def mark_metrics_dead(pid: int) -> None:
    # A dead engine's queue-depth gauge must stop counting (multiprocess "live" modes); its counters stay.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def start_engines(settings: Settings, specs: list[EngineSpec]) -> EngineSupervisor | None:
    """Start the planned engines (``plan_engines``); none planned: the model runs inline in every worker."""
    if not specs:
        os.environ.pop(ENGINE_SOCKETS_ENV, None)
        logger.info("the model runs inline in every worker (RERANKER_ENGINE=%s)", settings.engine.value)
        return None
    supervisor = EngineSupervisor(specs)
    supervisor.start()
    return supervisor
