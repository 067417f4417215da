"""The rolling upgrade of deploy/kubernetes, replayed on one machine: two replicas of the real server
(``python -m app``) behind a real load balancer (HAProxy, health-checking ``/ready`` as the Service's readiness
gate does), one replaced while clients keep sending requests, and not one request lost or answered wrongly.

The replacement follows the Deployment's order (maxSurge 1, maxUnavailable 0): a new replica is started and
only once ``/ready`` passes does it get traffic; then the old one's endpoint is removed (HAProxy's runtime API
puts it in maintenance, as the endpoints controller and kube-proxy do on pod deletion), the preStop sleep passes,
and only then does the old gunicorn get SIGTERM and drain. The sleep is the manifest's own, read from it.

HAProxy retries nothing here (``retries 0``, no redispatch): kube-proxy does not retry either, so a request sent
to a replica that had stopped accepting would be lost, and counted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.utils import REPO_ROOT, ServerProcess, free_port, start_server

pytestmark = pytest.mark.server

BACKEND = "replicas"
QUERY = "Where is the Eiffel tower?"
DOCUMENTS = [
    "The Eiffel tower is in Paris.",
    "Bananas are yellow.",
    "Paris is the capital of France.",
    "A tower of cards fell over.",
]
CLIENTS = 4
SCORE_TOLERANCE = 1e-3  # batches of other sizes pad differently: float32 rounding, nothing more


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(path, os.X_OK)), None
    )
    if found is None:
        reason = "HAProxy is not installed"
        if os.environ.get("RERANKER_REQUIRE_KUBERNETES_TOOLS") == "1":
            pytest.fail(f"{reason} and RERANKER_REQUIRE_KUBERNETES_TOOLS=1 (run scripts/kubernetes-tools.sh)")
        pytest.skip(f"{reason} (scripts/kubernetes-tools.sh installs it)")
    return found


def manifest_pre_stop_seconds() -> int:
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml").read_text())
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "bge-reranker"]
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def manifest_grace_period_seconds() -> int:
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml").read_text())
    return int(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


@dataclass
class Balancer:
    """HAProxy in front of named server slots, driven through its admin socket."""

    process: subprocess.Popen[bytes]
    url: str
    admin_socket: Path
    log_path: Path

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` per server of the backend: status (UP, DOWN, MAINT), hrsp_2xx, ..."""
        lines = [line for line in self.command("show stat").splitlines() if line]
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
        return {row["svname"]: row for row in rows if row["pxname"] == BACKEND and row["svname"] != "BACKEND"}

    def wait_for_status(self, server: str, status: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats()[server]["status"].startswith(status):
                return
            time.sleep(0.1)
        raise AssertionError(f"{server} not {status} after {timeout}s: {self.stats()[server]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_balancer(tmp_path: Path, slots: dict[str, int], serving: set[str]) -> Balancer:
    """HAProxy on a free port with one server line per slot (name: port); slots not in ``serving`` start in
    maintenance, like an endpoint that does not exist yet."""
    port = free_port()
    admin_socket = tmp_path / "haproxy.sock"
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{slot_port}{'' if name in serving else ' disabled'}"
        for name, slot_port in slots.items()
    )
    config = f"""
global
    stats socket {admin_socket} mode 600 level admin
    maxconn 512

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # Like kube-proxy: a request sent to a replica is that replica's to answer; nothing is retried elsewhere.
    retries 0
    option http-keep-alive

frontend rerank
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    # The readiness probe: /ready answers 200 only while the model is loaded and a forward pass works.
    option httpchk GET /ready
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 1
{servers}
"""
    config_path = tmp_path / "haproxy.cfg"
    config_path.write_text(config)
    log_path = tmp_path / "haproxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(config_path)], stdout=log, stderr=subprocess.STDOUT
        )
    balancer = Balancer(process, f"http://127.0.0.1:{port}", admin_socket, log_path)
    deadline = time.monotonic() + 15
    while not admin_socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"haproxy did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return balancer


@dataclass
class Load:
    """Clients sending the same rerank request through the balancer until stopped, each answer checked."""

    url: str
    expected: dict[int, float]
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for _ in range(CLIENTS):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(120)

    def sent(self) -> int:
        with self.lock:
            return sum(self.outcomes.values())

    def _client(self) -> None:
        body = {"model": "bge-reranker-base-local", "query": QUERY, "documents": DOCUMENTS}
        # One keep-alive connection per client, as RAGFlow's HTTP pool keeps: it outlives the replica swap.
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stopping.is_set():
                outcome, failure = "ok", None
                try:
                    response = client.post("/v1/rerank", json=body)
                    if response.status_code != 200:
                        outcome, failure = f"status {response.status_code}", response.text[:200]
                    else:
                        scores = {item["index"]: item["relevance_score"] for item in response.json()["results"]}
                        if scores.keys() != self.expected.keys() or any(
                            abs(scores[index] - score) > SCORE_TOLERANCE for index, score in self.expected.items()
                        ):
                            outcome, failure = "wrong scores", str(scores)
                except httpx.HTTPError as error:
                    outcome, failure = type(error).__name__, str(error)
                with self.lock:
                    self.outcomes[outcome] += 1
                    if failure is not None:
                        self.failures.append(f"{outcome}: {failure}")


def reference_scores(server: ServerProcess) -> dict[int, float]:
    with server.client() as client:
        response = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    return {item["index"]: item["relevance_score"] for item in response.json()["results"]}


def replica_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_a_rolling_upgrade_behind_a_real_balancer_loses_no_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    pre_stop_seconds = manifest_pre_stop_seconds()
    grace_seconds = manifest_grace_period_seconds()
    # One worker each: two cores run two replicas, a third during the surge, the balancer and the clients.
    replicas = {
        name: start_server(tiny_model_dir, replica_dir(tmp_path, name), workers=1) for name in ("old_a", "old_b")
    }
    new_replica: ServerProcess | None = None
    balancer: Balancer | None = None
    load: Load | None = None
    try:
        expected = reference_scores(replicas["old_a"])
        assert expected == pytest.approx(reference_scores(replicas["old_b"]), abs=SCORE_TOLERANCE)
        slots = {name: int(server.base_url.rsplit(":", 1)[1]) for name, server in replicas.items()}
        slots["new_a"] = free_port()  # the surge replica's endpoint, absent until it exists
        balancer = start_balancer(tmp_path, slots, serving={"old_a", "old_b"})
        balancer.wait_for_status("old_a", "UP")
        balancer.wait_for_status("old_b", "UP")

        load = Load(balancer.url, expected)
        load.start()
        time.sleep(3)
        assert load.sent() > 0

        # maxSurge 1: the new replica starts while both old ones serve, and gets traffic once /ready passes.
        new_replica = start_server(tiny_model_dir, replica_dir(tmp_path, "new_a"), workers=1)
        new_port = int(new_replica.base_url.rsplit(":", 1)[1])
        balancer.command(f"set server {BACKEND}/new_a addr 127.0.0.1 port {new_port}")
        balancer.command(f"set server {BACKEND}/new_a state ready")
        balancer.wait_for_status("new_a", "UP")

        # maxUnavailable 0: only now is an old replica deleted. Its endpoint goes first; preStop sleeps; then
        # SIGTERM, and gunicorn drains what it still has.
        old = replicas["old_a"]
        balancer.command(f"set server {BACKEND}/old_a state maint")
        time.sleep(pre_stop_seconds)
        # What it answered, requests in flight at the removal included: nothing is sent to it from here on.
        served_by_old_at_sigterm = int(balancer.stats()["old_a"]["hrsp_2xx"])
        terminated_at = time.monotonic()
        exit_code = old.stop(signal.SIGTERM, timeout=grace_seconds - pre_stop_seconds)
        drain_seconds = time.monotonic() - terminated_at
        assert exit_code == 0, old.log()[-3000:]
        assert drain_seconds < grace_seconds - pre_stop_seconds

        served_by_new_before_end = int(balancer.stats()["new_a"]["hrsp_2xx"])
        time.sleep(3)  # the load goes on over the two replicas left
        load.stop()

        stats = balancer.stats()
        sent = sum(load.outcomes.values())
        print(
            f"rolling upgrade: {sent} requests sent, {load.outcomes['ok']} answered 200 with the right scores; "
            f"old_a served {stats['old_a']['hrsp_2xx']}, old_b {stats['old_b']['hrsp_2xx']}, "
            f"new_a {stats['new_a']['hrsp_2xx']}; old_a drained and exited in {drain_seconds:.1f}s"
        )
        assert load.failures == [], load.failures[:10]
        assert load.outcomes == Counter({"ok": sent})
        assert sent >= 50, "too little load to show anything"
        # The swap happened under load: the old replica served before, the new one during and after.
        assert served_by_old_at_sigterm > 0
        assert served_by_new_before_end > 0
        assert int(stats["new_a"]["hrsp_2xx"]) > served_by_new_before_end
        assert int(stats["old_a"]["hrsp_2xx"]) == served_by_old_at_sigterm, "traffic after the endpoint's removal"
        total_served = sum(int(stats[name]["hrsp_2xx"]) for name in ("old_a", "old_b", "new_a"))
        assert total_served == sent
    finally:
        if load is not None:
            load.stop()
        if balancer is not None:
            balancer.stop()
        for server in [*replicas.values(), *([new_replica] if new_replica else [])]:
            server.stop()
