"""What tests, the benchmark and the soak share to run the real server: no pytest in here.

A real ``python -m app`` on a free loopback port (``start_server``), the wait until it is ready, and a directory
that passes the model-directory check for the fake backend. Models are built by ``tests.model_factory``. (vLLM
keeps its ``RemoteOpenAIServer`` in ``tests/utils.py`` the same way.)
"""

from __future__ import annotations

import os
import re
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A real ``python -m app`` (gunicorn + uvicorn workers) on a free loopback port."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)  # type: ignore[arg-type]

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    model_dir: Path, tmp_path: Path, *, workers: int | None = 2, ready_timeout: float = 120, **settings: str
) -> ServerProcess:
    """Start ``python -m app`` exactly as the container does and wait for /ready (``workers=None``: leave
    ``WEB_CONCURRENCY`` unset, and wait for every worker the server chose to start)."""
    port = free_port()
    env = {
        **{name: value for name, value in os.environ.items() if name not in ("WEB_CONCURRENCY", "RERANKER_WORKERS")},
        "RERANKER_MODEL_PATH": str(model_dir),
        "RERANKER_HOST": "127.0.0.1",
        "RERANKER_PORT": str(port),
        **({"WEB_CONCURRENCY": str(workers)} if workers is not None else {}),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "RERANKER_TORCH_THREADS": "1",
        **settings,
    }
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, env)

    def every_worker_ready() -> bool:
        if httpx.get(f"{server.base_url}/ready", timeout=2).status_code != 200:
            return False
        # every worker must be ready, not just the one that answered
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=2).text
        expected = workers if workers is not None else chosen_workers(server.log())
        return expected is not None and gauge(metrics, "reranker_ready_workers") == expected

    return wait_until_ready(server, every_worker_ready, timeout=ready_timeout, name="server")


def chosen_workers(log: str) -> int | None:
    """How many workers a server left to choose them said it starts (its master logs it once)."""
    found = re.search(r"(\d+) HTTP workers .*\(WEB_CONCURRENCY unset\)", log)
    return int(found.group(1)) if found else None


def gauge(metrics: str, name: str) -> float | None:
    """An unlabelled sample's value in a Prometheus text page (None when absent)."""
    for line in metrics.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def wait_until_ready(
    server: ServerProcess, is_ready: Callable[[], bool], *, timeout: float, name: str
) -> ServerProcess:
    """Poll ``is_ready`` until it holds; a server that exits or stays unready is killed, with its log raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.process.returncode}:\n{server.log()}")
        try:
            if is_ready():
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"{name} not ready after {timeout}s:\n{server.log()}")


def venv_seeing_this_python(path: Path, *, with_pip: bool = True) -> tuple[Path, Path]:
    """A virtual environment at ``path`` (kept if it exists) whose site-packages also add this interpreter's own
    site directories, after its own (a ``.pth`` file): its python and its site-packages directory."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(path)], check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    here = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    Path(purelib, "this-python-site-packages.pth").write_text(
        "".join(f"import site; site.addsitedir({directory!r})\n" for directory in here if os.path.isdir(directory))
    )
    return python, Path(purelib)


def fake_model_dir(path: Path) -> Path:
    """Files enough to pass the settings' model-directory check; the fake backend never reads them."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (path / name).write_text("{}")
    return path
