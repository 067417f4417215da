#!/usr/bin/env python
"""Soak the real service: minutes of load, overload, worker kills, disconnects and a SIGTERM, with figures.

The long version of ``tests/reliability`` (whose tests take seconds each). It starts ``python -m app``
(gunicorn + uvicorn workers, exactly as the container runs it) on 127.0.0.1 only, on the tiny test model unless
``--model`` names another, and prints one line of figures per phase and a JSON summary at the end. The figures
in the README come from it.

    python -m scripts.soak                      # ~5 minutes: 3 min of load, then the fault phases
    python -m scripts.soak --load-minutes 10 --clients 8
    python -m scripts.soak --phases load,kill   # a subset

All load is bounded: ``--clients`` threads, each with one request in flight, for a fixed time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.model_factory import build_cross_encoder
from tests.reliability.harness import (
    LoadGenerator,
    make_bodies,
    metric,
    probing_health,
    reference_scores,
    rss_mib,
    same_scores,
    scrape,
    sigterm_with_backlog,
    wait_for,
)
from tests.utils import ServerProcess, start_server

PHASES = ("load", "overload", "kill", "disconnect", "vanish", "term")
BASE = {"RERANKER_DTYPE": "float32", "RERANKER_TORCH_THREADS": "1", "RERANKER_TORCH_COMPILE": "off"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.model = args.model or build_cross_encoder(work / "tiny-model", shape="tiny")
        self.figures: dict[str, Any] = {}
        self._servers = 0

    def server(self, *, workers: int | None = None, model: Path | None = None, **settings: str) -> ServerProcess:
        self._servers += 1
        folder = self.work / f"server-{self._servers}"
        folder.mkdir()
        env = {**BASE, **settings}
        if self.args.compile:
            env.pop("RERANKER_TORCH_COMPILE")  # the service's default
        return start_server(model or self.model, folder, workers=workers or self.args.workers, **env)

    # ------------------------------------------------------------------------------------------ phases

    def load(self) -> None:
        """Sustained load; worker RSS sampled from /proc every ``--sample-s`` seconds."""
        server = self.server()
        try:
            bodies = make_bodies(32, seed=1)
            expected = reference_scores(server.base_url, bodies)
            pids = server.worker_pids()
            samples: list[tuple[float, dict[int, float]]] = [(0.0, {pid: rss_mib(pid) for pid in pids})]
            duration = self.args.load_minutes * 60
            generator = LoadGenerator(server.base_url, bodies, expected, clients=self.args.clients).start()
            started = time.monotonic()
            while time.monotonic() - started < duration:
                time.sleep(min(self.args.sample_s, duration - (time.monotonic() - started)))
                elapsed = time.monotonic() - started
                sample = {pid: rss_mib(pid) for pid in pids}
                samples.append((elapsed, sample))
                done = len(generator.result.outcomes)
                log(f"load {elapsed:5.0f}s: {done} requests, RSS MiB " + ", ".join(f"{v:.0f}" for v in sample.values()))
            result = generator.stop()
            assert server.worker_pids() == pids, "a worker was replaced during the load"
            metrics = scrape(server.base_url)
            half = [s for t, s in samples if t >= duration / 2]
            growth_second_half = (
                {pid: (half[-1][pid] - half[0][pid]) / max(1e-9, (duration / 2) / 60) for pid in pids}
                if len(half) >= 2
                else {}
            )
            self.figures["load"] = {
                "clients": self.args.clients,
                "workers": self.args.workers,
                "seconds": round(result.duration, 1),
                "requests": len(result.outcomes),
                "statuses": dict(result.statuses()),
                "wrong_answers": len(result.wrong()),
                "ok_per_s": round(len(result.ok()) / result.duration, 1),
                "documents_per_s": round(metric(metrics, "reranker_documents_total") / result.duration, 0),
                "p50_ms": round(result.latency_ms(0.5)),
                "p99_ms": round(result.latency_ms(0.99)),
                "rss_mib_start": {pid: round(samples[0][1][pid]) for pid in pids},
                "rss_mib_peak": {pid: round(max(s[pid] for _, s in samples)) for pid in pids},
                "rss_mib_end": {pid: round(samples[-1][1][pid]) for pid in pids},
                "rss_growth_mib_per_min_second_half": {pid: round(v, 2) for pid, v in growth_second_half.items()},
                "queue_depth_after": metric(metrics, "reranker_queue_depth"),
            }
            log(f"load: {result.summary()}")
        finally:
            server.stop()

    def overload(self) -> None:
        """Far past capacity (tiny queue): 429 + Retry-After, health probes answered, instant recovery."""
        server = self.server(RERANKER_MAX_QUEUE_PAIRS="64", RERANKER_MAX_BATCH_PAIRS="8")
        try:
            bodies = make_bodies(6, documents=(40, 40), seed=9)
            expected = reference_scores(server.base_url, bodies)
            with probing_health(server.base_url, interval_s=0.25) as probes:
                result = LoadGenerator(server.base_url, bodies, expected, clients=4 * self.args.clients).run_for(
                    self.args.overload_s
                )
            ended = time.monotonic()
            response = httpx.post(f"{server.base_url}/v1/rerank", json=bodies[0], timeout=10)
            recovery_ms = (time.monotonic() - ended) * 1000
            refused = [o for o in result.outcomes if o.status == 429]
            self.figures["overload"] = {
                "clients": 4 * self.args.clients,
                "seconds": round(result.duration, 1),
                "statuses": dict(result.statuses()),
                "refused_share": round(len(refused) / max(1, len(result.outcomes)), 3),
                "refusals_with_retry_after": sum(1 for o in refused if o.retry_after),
                "wrong_answers": len(result.wrong()),
                "probes": {f"{p} {s}": n for (p, s), n in Counter((p, s) for p, s, _ in probes).items()},
                "probe_max_ms": round(1000 * max((d for *_, d in probes), default=0)),
                "first_request_after_load": response.status_code,
                "first_request_correct": response.status_code == 200 and same_scores(response.json(), expected[0]),
                "recovery_ms": round(recovery_ms),
            }
            log(f"overload: {result.summary()}")
        finally:
            server.stop()

    def kill(self) -> None:
        """kill -9 a worker under load, ``--kills`` times: gunicorn replaces it, nothing else fails."""
        server = self.server()
        try:
            bodies = make_bodies(16, seed=2)
            expected = reference_scores(server.base_url, bodies)
            generator = LoadGenerator(server.base_url, bodies, expected, clients=self.args.clients).start()
            kills = []
            try:
                for number in range(self.args.kills):
                    time.sleep(5)
                    victim = server.worker_pids()[number % self.args.workers]
                    failed_before = len(generator.result.failed())
                    killed_at = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    replaced = wait_for(
                        lambda victim=victim: (
                            victim not in server.worker_pids()
                            and len(server.worker_pids()) == self.args.workers
                            and metric(scrape(server.base_url), "reranker_ready_workers") == self.args.workers
                        ),
                        timeout=120,
                        interval=0.1,
                        what="a ready replacement worker",
                    )
                    kills.append({"pid": victim, "ready_again_s": round(replaced, 2), "at": killed_at})
                    time.sleep(1)
                    log(
                        f"kill {number + 1}: worker {victim} replaced and ready in {replaced:.1f}s; "
                        f"{len(generator.result.failed()) - failed_before} requests failed"
                    )
                time.sleep(5)
            finally:
                result = generator.stop()
            failed = result.failed()
            late = [o for o in failed if not any(o.started <= k["at"] + 0.5 and o.ended >= k["at"] for k in kills)]
            metrics = scrape(server.base_url)
            counted = metric(metrics, "reranker_requests_total", route="/v1/rerank", status="200")
            self.figures["kill"] = {
                "workers": self.args.workers,
                "kills": len(kills),
                "requests": len(result.outcomes),
                "statuses": dict(result.statuses()),
                "failed": len(failed),
                "failed_not_in_flight_at_a_kill": len(late),
                "wrong_answers": len(result.wrong()),
                "ready_again_s": [k["ready_again_s"] for k in kills],
                "ready_workers_after": metric(metrics, "reranker_ready_workers"),
                "counted_200_minus_received_200": counted - len(result.ok()) - len(bodies),
                "queue_depth_after": metric(metrics, "reranker_queue_depth"),
            }
            log(f"kill: {result.summary()}")
        finally:
            server.stop()

    def disconnect(self) -> None:
        """Clients that leave while their pairs are queued: the pairs are dropped, never scored."""
        server = self.server(workers=1, RERANKER_MAX_BATCH_PAIRS="1")
        try:
            background = make_bodies(4, documents=(400, 400), doc_words=(10, 20), seed=5)
            leaver = make_bodies(1, documents=(150, 150), doc_words=(100, 120), seed=6)[0]
            expected = reference_scores(server.base_url, background)
            rounds = []
            for _ in range(self.args.leavers):
                before = scrape(server.base_url)
                docs_before = metric(before, "reranker_documents_total")
                with ThreadPoolExecutor(len(background)) as pool:
                    futures = [
                        pool.submit(httpx.post, f"{server.base_url}/v1/rerank", json=body, timeout=120)
                        for body in background
                    ]
                    wait_for(
                        lambda start=docs_before: (
                            metric(scrape(server.base_url), "reranker_documents_total") - start >= 1600
                        ),
                        timeout=60,
                        interval=0.02,
                        what="the backlog",
                    )
                    with contextlib.suppress(httpx.TimeoutException):  # it leaves after 0.3 s, as meant
                        httpx.post(f"{server.base_url}/v1/rerank", json=leaver, timeout=0.3)
                    answers = [future.result() for future in futures]
                assert all(
                    a.status_code == 200 and same_scores(a.json(), e) for a, e in zip(answers, expected, strict=True)
                )
                time.sleep(0.3)
                after = scrape(server.base_url)
                rounds.append(
                    {
                        "cancelled": metric(after, "reranker_pairs_cancelled_total")
                        - metric(before, "reranker_pairs_cancelled_total"),
                        "scored": metric(after, "reranker_pairs_scored_total")
                        - metric(before, "reranker_pairs_scored_total"),
                    }
                )
            self.figures["disconnect"] = {
                "leavers": len(rounds),
                "pairs_per_leaver": 150,
                "pairs_cancelled": [r["cancelled"] for r in rounds],
                "pairs_scored_per_round": [r["scored"] for r in rounds],
                "background_pairs_per_round": 1600,
            }
            log(f"disconnect: {self.figures['disconnect']}")
        finally:
            server.stop()

    def vanish(self) -> None:
        """The model directory disappears at run time: /ready goes 503, answers stay right, it comes back."""
        model = Path(shutil.copytree(self.model, self.work / "vanishing-model"))
        server = self.server(model=model)
        try:
            bodies = make_bodies(2, seed=4)
            expected = reference_scores(server.base_url, bodies)
            model.rename(self.work / "vanished")
            not_ready = wait_for(
                lambda: all(httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 503 for _ in range(4)),
                timeout=30,
                what="/ready 503",
            )
            answers = [httpx.post(f"{server.base_url}/v1/rerank", json=bodies[0], timeout=10) for _ in range(20)]
            statuses = Counter(a.status_code for a in answers)
            wrong = sum(1 for a in answers if a.status_code == 200 and not same_scores(a.json(), expected[0]))
            (self.work / "vanished").rename(model)
            ready = wait_for(
                lambda: all(httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 200 for _ in range(4)),
                timeout=30,
                what="/ready 200",
            )
            self.figures["vanish"] = {
                "ready_503_after_s": round(not_ready, 2),
                "rerank_while_gone": dict(statuses),
                "wrong_answers": wrong,
                "ready_again_after_restore_s": round(ready, 2),
            }
            log(f"vanish: {self.figures['vanish']}")
        finally:
            server.stop()

    def term(self) -> None:
        """SIGTERM with a backlog of accepted requests: every one completes, the server exits in time."""
        graceful = 20
        server = self.server(RERANKER_MAX_BATCH_PAIRS="1", RERANKER_GRACEFUL_TIMEOUT=str(graceful))
        bodies = make_bodies(16, documents=(200, 200), doc_words=(20, 40), seed=3)
        expected = reference_scores(server.base_url, bodies)
        queued, answers, signalled = sigterm_with_backlog(
            server.base_url, server.process, bodies, expected, accept_timeout=60, request_timeout=120
        )
        code = server.process.wait(graceful + 30)
        exited_s = time.monotonic() - signalled
        self.figures["term"] = {
            "accepted_requests": len(bodies),
            "pairs_queued_at_sigterm": queued,
            "completed_200_correct": sum(1 for status, ok in answers if status == 200 and ok),
            "lost": sum(1 for status, ok in answers if not (status == 200 and ok)),
            "exit_code": code,
            "exit_s": round(exited_s, 2),
            "graceful_timeout_s": graceful,
        }
        log(f"term: {self.figures['term']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: build the tiny test model)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients of the load phases")
    parser.add_argument("--load-minutes", type=float, default=3.0)
    parser.add_argument("--sample-s", type=float, default=15.0, help="RSS sampling interval")
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--leavers", type=int, default=3)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="leave RERANKER_TORCH_COMPILE at the service's default (eager otherwise: faster starts)",
    )
    args = parser.parse_args()
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")

    with tempfile.TemporaryDirectory(prefix="reranker-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        started = time.monotonic()
        for phase in phases:
            log(f"--- {phase}")
            getattr(soak, phase)()
        soak.figures["total_s"] = round(time.monotonic() - started)
        soak.figures["cpus"] = os.cpu_count()
        print(json.dumps(soak.figures, indent=2, default=str))
        if args.json:
            args.json.write_text(json.dumps(soak.figures, indent=2, default=str))
    broken = broken_promises(soak.figures)
    for problem in broken:
        log(f"BROKEN: {problem}")
    sys.exit(1 if broken else 0)


def broken_promises(figures: dict[str, Any]) -> list[str]:
    """The promises of the README that these figures break (none, when all is well)."""
    problems = []
    for name in ("load", "overload", "kill", "vanish"):
        if figures.get(name, {}).get("wrong_answers"):
            problems.append(f"{name}: {figures[name]['wrong_answers']} wrong answers")
    load = figures.get("load")
    if load and set(load["statuses"]) != {200}:
        problems.append(f"load: statuses {load['statuses']}")
    overload = figures.get("overload")
    if overload and (
        set(overload["statuses"]) - {200, 429}
        or not overload["first_request_correct"]
        or any(not key.endswith(" 200") for key in overload["probes"])
    ):
        problems.append(f"overload: {overload}")
    kill = figures.get("kill")
    if kill and (
        kill["failed_not_in_flight_at_a_kill"]
        or set(kill["statuses"]) - {200, "RemoteProtocolError", "ReadError", "ConnectError", "WriteError"}
        or kill["ready_workers_after"] != kill.get("workers", 2)
    ):
        problems.append(f"kill: {kill}")
    disconnect = figures.get("disconnect")
    if disconnect and any(c != disconnect["pairs_per_leaver"] for c in disconnect["pairs_cancelled"]):
        problems.append(f"disconnect: {disconnect}")
    term = figures.get("term")
    if term and (term["lost"] or term["exit_code"] != 0 or term["exit_s"] > term["graceful_timeout_s"]):
        problems.append(f"term: {term}")
    return problems


if __name__ == "__main__":
    main()
