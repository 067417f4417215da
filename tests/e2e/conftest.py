"""Fixtures of the Docker end-to-end suite: a Docker engine, the image built by Compose, the running stack.

The stack is the real one, started the way the README says: ``.env`` copied from ``.env.example`` (plus this
run's settings appended) in a working directory, then ``docker compose up -d --wait`` there. ``COMPOSE_FILE`` in
that ``.env`` selects ``compose.yaml`` + ``compose.cpu.yaml`` (no GPU needed) and, for the bind-mounted model
directory, ``compose.model-dir.yaml``; ``COMPOSE_PROJECT_NAME`` keeps each stack apart; ``COMPOSE_PROFILES``
adds monitoring. The build uses a local base image, the CPU torch wheel from ``docker/wheels/`` and the host's CA
bundle as an extra CA certificate (``docker/certs/``). ``scripts/docker-setup.sh`` provides the engine and the
local images.

Docker missing: the suite skips, unless ``RERANKER_REQUIRE_DOCKER=1`` (CI), where it fails.
``RERANKER_DOCKER_SETUP=0`` stops the suite from running ``scripts/docker-setup.sh`` itself (which may install
docker.io and start dockerd when run as root).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT = "bge-reranker-e2e"
SERVICE = "bge-reranker"
IMAGE_NAME = "bge-reranker-e2e"
IMAGE_TAG = "test"
IMAGE = f"{IMAGE_NAME}:{IMAGE_TAG}-cpu"  # compose.cpu.yaml appends "-cpu"
COMPOSE_FILES = ("compose.yaml", "compose.cpu.yaml")
MODEL_DIR_FILE = "compose.model-dir.yaml"
RAGFLOW_NETWORK = "docker_ragflow"
BASE_IMAGE = os.environ.get("RERANKER_TEST_BASE_IMAGE", "reranker-test-base:bookworm")
PROMETHEUS_IMAGE = os.environ.get("RERANKER_TEST_PROMETHEUS_IMAGE", "reranker-test-prometheus:bookworm")
TORCH_VERSION = os.environ.get("RERANKER_TEST_TORCH_VERSION", "2.13.0") + "+cpu"
REQUIRE_DOCKER = os.environ.get("RERANKER_REQUIRE_DOCKER") == "1"
CA_BUNDLE_COPY = REPO_ROOT / "docker" / "certs" / "host-ca-bundle.crt"
WAIT_TIMEOUT_S = 300

# Wall-clock seconds of the expensive steps, printed at the end of the run.
TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("docker stack timings")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name:<28} {seconds:7.1f} s")


# Variables of this machine's shell that would change what Compose or the fetch does: the tests' .env decides.
_SCRUBBED_PREFIXES = ("COMPOSE_", "MODEL_", "HF_", "MODELSCOPE_", "RERANKER_")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}


def run(
    args: Sequence[str], *, timeout: float = 120, check: bool = False, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command (from the repository root unless ``cwd``) and capture its output; ``check`` fails the test
    with that output."""
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO_ROOT, env=_clean_env()
    )
    if check and result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{output}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unavailable(reason: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(f"RERANKER_REQUIRE_DOCKER=1 but Docker is unavailable: {reason}", pytrace=False)
    pytest.skip(f"Docker is unavailable: {reason}")


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine and the Compose v2 CLI, set up by scripts/docker-setup.sh when allowed."""
    if os.environ.get("RERANKER_DOCKER_SETUP", "1") != "0":
        started = time.monotonic()
        try:
            setup = run(["bash", "scripts/docker-setup.sh"], timeout=1200)
        except FileNotFoundError as error:  # no bash
            _unavailable(str(error))
        TIMINGS["setup (docker-setup.sh)"] = time.monotonic() - started
        output = f"{setup.stdout}\n{setup.stderr}".strip()
        if setup.returncode == 3:
            _unavailable(output.splitlines()[-1] if output else "scripts/docker-setup.sh found no engine")
        if setup.returncode != 0:
            pytest.fail(f"scripts/docker-setup.sh failed ({setup.returncode}):\n{output[-4000:]}", pytrace=False)
    if shutil.which("docker") is None:
        _unavailable("no docker CLI on PATH")
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        _unavailable(info.stderr.strip() or "docker info failed")
    if run(["docker", "compose", "version"], timeout=30).returncode != 0:
        _unavailable("the Compose v2 CLI (docker compose) is missing")


def write_dotenv(workdir: Path, settings: dict[str, str]) -> Path:
    """``cp .env.example .env`` in ``workdir``, then this run's settings appended (later lines win)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dotenv = workdir / ".env"
    example = (REPO_ROOT / ".env.example").read_text()
    dotenv.write_text(example + "\n# --- this test run ---\n" + "".join(f"{k}={v}\n" for k, v in settings.items()))
    return dotenv


def compose_file_setting(*names: str) -> str:
    """``COMPOSE_FILE`` for a .env outside the repository: absolute paths (the project directory stays the
    repository's, so the build context and ./docker/... resolve as for a user)."""
    return ":".join(str(REPO_ROOT / name) for name in names)


def build_settings() -> dict[str, str]:
    """The offline build recipe of docs/docker.md: local base image, torch wheel from docker/wheels, PyPI."""
    return {
        "RERANKER_IMAGE": IMAGE_NAME,
        "RERANKER_TAG": IMAGE_TAG,
        "BASE_IMAGE": BASE_IMAGE,
        "CPU_BASE_IMAGE": BASE_IMAGE,
        "CPU_TORCH_INDEX_URL": "https://pypi.org/simple",
        "TORCH_VERSION": TORCH_VERSION,
        "RAGFLOW_NETWORK": RAGFLOW_NETWORK,
    }


@dataclass
class Stack:
    """A Compose project run from its own working directory (whose .env selects files, project and profiles)."""

    project: str
    env_file: Path
    files: tuple[str, ...]
    base_url: str
    prometheus_url: str
    image: str
    model_dir: Path
    workdir: Path

    def compose_args(self, *args: str) -> list[str]:
        return ["docker", "compose", *args]

    def compose(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(self.compose_args(*args), timeout=timeout, check=check, cwd=self.workdir)

    def container_id(self, service: str = SERVICE) -> str:
        return self.compose("ps", "--all", "-q", service, check=True).stdout.strip()

    def inspect(self, service: str = SERVICE) -> dict[str, object]:
        out = run(["docker", "inspect", self.container_id(service)], check=True).stdout
        return json.loads(out)[0]  # type: ignore[no-any-return]

    def logs(self, *services: str) -> str:
        result = self.compose("logs", "--no-color", "--tail", "200", *services)
        return result.stdout + result.stderr

    def service_logs(self, service: str) -> list[str]:
        """The service's log lines without Compose's "<service>-1  | " prefix."""
        result = self.compose("logs", "--no-color", "--no-log-prefix", service, check=True)
        return [line for line in result.stdout.splitlines() if line.strip()]

    def up(self, timeout: float = WAIT_TIMEOUT_S + 60) -> subprocess.CompletedProcess[str]:
        """The README's start command, as written."""
        return self.compose("up", "-d", "--wait", timeout=timeout)

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=180)


def _copy_host_ca_bundle() -> None:
    """The host's CA bundle as an extra CA certificate of the build: PyPI is reached through it."""
    candidates = [os.environ.get(name) for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
    pip_cert = run(["pip", "config", "get", "global.cert"], timeout=30) if shutil.which("pip") else None
    if pip_cert is not None and pip_cert.returncode == 0:
        candidates.append(pip_cert.stdout.strip())
    candidates.append("/etc/ssl/certs/ca-certificates.crt")
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            data = Path(candidate).read_bytes()
            # Rewrite only on change: the file is part of the build context and its layer's cache key.
            if not CA_BUNDLE_COPY.is_file() or CA_BUNDLE_COPY.read_bytes() != data:
                CA_BUNDLE_COPY.write_bytes(data)
            return


def _ensure_network() -> bool:
    """RAGFlow's network, created if absent (RAGFlow is not running here). True when this run created it."""
    if run(["docker", "network", "inspect", RAGFLOW_NETWORK]).returncode == 0:
        return False
    run(["docker", "network", "create", RAGFLOW_NETWORK], check=True)
    return True


def _wait_scrape_ready(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus at {url} not ready after {timeout}s")


def world_readable_model(target: Path, *, family: str | None = None) -> Path:
    """A tiny model built offline, readable by the container's user (uid 10001) whatever the umask."""
    from tests.model_factory import DEFAULT_FAMILY, build_cross_encoder

    model_dir = build_cross_encoder(target, shape="tiny", family=family or DEFAULT_FAMILY)
    model_dir.chmod(0o755)
    for path in model_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model_dir


@pytest.fixture(scope="session")
def built_image(docker_engine: None) -> Iterator[str]:
    """``docker compose build`` once per session (the CPU image); RAGFlow's network exists. Yields the image."""
    suite_started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="reranker-e2e-build-"))
    _copy_host_ca_bundle()
    created_network = _ensure_network()
    write_dotenv(
        workdir,
        {"COMPOSE_FILE": compose_file_setting(*COMPOSE_FILES), "COMPOSE_PROJECT_NAME": PROJECT, **build_settings()},
    )

    def teardown() -> None:
        if created_network:
            run(["docker", "network", "rm", RAGFLOW_NETWORK])
        shutil.rmtree(workdir, ignore_errors=True)
        # The CPU torch wheel was put in docker/wheels for this build only: 190 MB in every later build context
        # from this checkout (a CUDA build leaves it out of its torch install; setup re-links it in a second).
        for wheel in (REPO_ROOT / "docker" / "wheels").glob("torch-*+cpu-*.whl"):
            wheel.unlink(missing_ok=True)
        TIMINGS["suite (total)"] = time.monotonic() - suite_started

    try:
        started = time.monotonic()
        build = run(["docker", "compose", "build"], timeout=1800, cwd=workdir)
        TIMINGS["compose build"] = time.monotonic() - started
        if build.returncode != 0:
            raise AssertionError(f"docker compose build failed:\n{(build.stdout + build.stderr)[-6000:]}")
    except BaseException:
        teardown()
        raise
    yield IMAGE
    teardown()


@pytest.fixture(scope="session")
def stack(built_image: str) -> Iterator[Stack]:
    """The README's start command on the bind-mount path (MODEL_DIR + compose.model-dir.yaml), with the CPU
    override and the monitoring profile; always torn down."""
    workdir = Path(tempfile.mkdtemp(prefix="reranker-e2e-"))
    model_dir = world_readable_model(workdir / "model")
    port, prometheus_port = free_port(), free_port()
    files = (*COMPOSE_FILES, MODEL_DIR_FILE)
    env_file = write_dotenv(
        workdir,
        {
            "COMPOSE_FILE": compose_file_setting(*files),
            "COMPOSE_PROJECT_NAME": PROJECT,
            "COMPOSE_PROFILES": "monitoring",
            "MODEL_DIR": str(model_dir),
            "RERANKER_BIND": "127.0.0.1",
            "RERANKER_HOST_PORT": str(port),
            "RERANKER_LOG_LEVEL": "info",
            "RERANKER_START_PERIOD": f"{WAIT_TIMEOUT_S}s",
            "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
            "PROMETHEUS_BIND": "127.0.0.1",
            "PROMETHEUS_HOST_PORT": str(prometheus_port),
            **build_settings(),
        },
    )
    result = Stack(
        project=PROJECT,
        env_file=env_file,
        files=files,
        base_url=f"http://127.0.0.1:{port}",
        prometheus_url=f"http://127.0.0.1:{prometheus_port}",
        image=built_image,
        model_dir=model_dir,
        workdir=workdir,
    )

    def teardown() -> None:
        result.down()
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        # A run that crashed earlier may have left its containers behind.
        result.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=180)
        started = time.monotonic()
        up = result.up()
        TIMINGS["compose up --wait (healthy)"] = time.monotonic() - started
        if up.returncode != 0:
            raise AssertionError(f"docker compose up --wait failed:\n{up.stdout}\n{up.stderr}\n{result.logs()}")
        _wait_scrape_ready(result.prometheus_url)
    except BaseException:
        teardown()
        raise
    yield result
    teardown()
