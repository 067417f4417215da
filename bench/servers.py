"""Starting the servers under test, and reading their processes' CPU time and memory from /proc.

The service is started exactly as the container and the end-to-end tests start it (``python -m app``, through
the shared ``tests.conftest.start_server``); the baseline is ``bench/baseline_server.py`` in one uvicorn process;
Infinity (``infinity_emb v2``, where installed) as its own documentation starts it, on the same model directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.utils import REPO_ROOT, ServerProcess, free_port, start_server, wait_until_ready

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def start_service(
    model_dir: Path, workdir: Path, *, device: str, workers: int, ready_timeout: float, settings: dict[str, str]
) -> ServerProcess:
    # Threads left to the service's own default (CPUs / workers), unlike the tests' one thread per worker.
    env = {"RERANKER_TORCH_THREADS": "0", "RERANKER_DEVICE": device, "RERANKER_ACCESS_LOG": "false", **settings}
    return start_server(model_dir, workdir, workers=workers, ready_timeout=ready_timeout, **env)


def start_infinity(
    executable: str, model_dir: Path, workdir: Path, *, device: str, dtype: str, ready_timeout: float
) -> ServerProcess:
    """Infinity's server (``infinity_emb v2``, its torch engine) on the benchmark's model, its routes under /v1 so
    that the same requests go to the same path. Its own defaults otherwise (batch size 32, dynamic batching)."""
    port = free_port()
    log_path = workdir / f"infinity-{port}.log"
    command = [
        executable,
        "v2",
        "--model-id",
        str(model_dir),
        "--engine",
        "torch",
        "--device",
        device,
        "--dtype",
        dtype,
        "--port",
        str(port),
        "--url-prefix",
        "/v1",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    return wait_until_ready(
        server,
        lambda: httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200,
        timeout=ready_timeout,
        name="Infinity",
    )


def start_baseline(model_dir: Path, workdir: Path, *, device: str, handler: str, ready_timeout: float) -> ServerProcess:
    port = free_port()
    log_path = workdir / f"baseline-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.baseline_server",
                "--model-path",
                str(model_dir),
                "--port",
                str(port),
                "--device",
                device,
                "--handler",
                handler,
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    return wait_until_ready(
        server,
        lambda: httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200,
        timeout=ready_timeout,
        name="baseline server",
    )


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue.extend(int(child) for child in children)
        except OSError:
            continue
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used since boot (all CPUs, idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the largest resident set of one process tree's members every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._pid, self._interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, *(rss_bytes(p) for p in process_tree(self._pid)))
            self._stop.wait(self._interval)
