"""Faults: a worker killed under load, SIGTERM under load, clients that leave, a model directory that vanishes,
and a device error in the middle of a forward pass. Nothing is lost that was not on the process that died, and
no fault ever produces a wrong answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.engine.fake import FakeBackend
from app.main import create_app
from tests.reliability.harness import (
    LoadGenerator,
    leave_during_backlog,
    make_bodies,
    metric,
    reference_scores,
    same_scores,
    scrape,
    sigterm_with_backlog,
    wait_for,
)
from tests.utils import ServerProcess

pytestmark = pytest.mark.reliability


def rerank_200s(metrics: str) -> float:
    return metric(metrics, "reranker_requests_total", route="/v1/rerank", status="200")


def test_kill_9_of_one_worker_under_load_fails_only_its_own_requests(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(workers=2)
    bodies = make_bodies(8, seed=2)
    expected = reference_scores(server.base_url, bodies)
    generator = LoadGenerator(server.base_url, bodies, expected, clients=6).start()
    try:
        time.sleep(3)
        pids = server.worker_pids()
        victim, survivor = pids
        counted_before = rerank_200s(scrape(server.base_url))
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        ready_in = wait_for(
            lambda: (
                victim not in server.worker_pids()
                and len(server.worker_pids()) == 2
                and metric(scrape(server.base_url), "reranker_ready_workers") == 2
            ),
            timeout=60,
            what="a ready replacement worker",
        )
        time.sleep(3)  # and it serves on
    finally:
        result = generator.stop()
    print(f"\nkill -9: {result.summary()}; replacement ready in {ready_in:.1f}s")

    assert survivor in server.worker_pids()  # the other worker was never touched
    assert not result.wrong(), "a request got a wrong answer"
    failed = result.failed()
    # Only what was on the killed worker fails: each client had one request in flight, so at most one each,
    # all in flight at the moment of the kill, all as connection errors (never an HTTP error or a bad answer).
    assert len(failed) <= 6, result.summary()
    assert all(o.started <= killed_at + 0.5 and o.ended >= killed_at for o in failed), [
        (o.started - killed_at, o.ended - killed_at) for o in failed
    ]
    assert set(result.statuses()) - {200} <= {"RemoteProtocolError", "ReadError", "WriteError", "ConnectError"}
    served_after = [o for o in result.ok() if o.started > killed_at + ready_in]
    assert served_after, "nothing was served after the replacement came up"
    # A failed request was never answered by anyone: it appears in no worker's access log.
    log = server.log()
    assert not [o.request_id for o in failed if o.request_id in log]

    assert httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 200
    metrics = scrape(server.base_url)
    assert metric(metrics, "reranker_ready_workers") == 2
    assert metric(metrics, "reranker_workers") == 2
    assert metric(metrics, "reranker_queue_depth") == 0  # the dead worker's queue is not counted as live
    # The dead worker's counters survive it: every 200 a client received is counted exactly once.
    counted = rerank_200s(metrics)
    assert counted >= counted_before
    assert counted == len(result.ok()) + len(bodies)


def test_sigterm_under_load_completes_every_accepted_request_and_exits_in_time(
    server_factory: Callable[..., ServerProcess],
) -> None:
    graceful_timeout = 15
    server = server_factory(workers=2, RERANKER_MAX_BATCH_PAIRS="1", RERANKER_GRACEFUL_TIMEOUT=str(graceful_timeout))
    bodies = make_bodies(12, documents=(200, 200), doc_words=(20, 40), seed=3)
    expected = reference_scores(server.base_url, bodies)
    queued, answers, signalled = sigterm_with_backlog(
        server.base_url, server.process, bodies, expected, accept_timeout=30, request_timeout=60
    )
    code = server.process.wait(graceful_timeout + 15)
    exited_in = time.monotonic() - signalled
    print(f"\nSIGTERM with {queued:.0f} pairs queued: answers {answers}; exit {code} in {exited_in:.2f}s")

    assert queued > 0, "nothing was queued at SIGTERM: the test proves nothing"
    assert answers == [(200, True)] * len(bodies)
    assert code == 0
    assert exited_in < graceful_timeout
    assert "Shutting down: Master" in server.log()


def test_a_client_that_leaves_takes_its_queued_pairs_with_it(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(workers=1, RERANKER_MAX_BATCH_PAIRS="1")  # one pair per forward pass: a backlog
    cancelled, scored = leave_during_backlog(server.base_url, request_id="leaver-1")
    print(f"\nleaver: {cancelled:.0f} pairs cancelled, {scored:.0f} scored")
    assert cancelled == 150  # every pair of the leaver left the queue ...
    assert scored == 1600  # ... and not one forward pass was spent on it
    assert '"request_id": "leaver-1"' in server.log() and '"status": 499' in server.log()


def test_a_vanished_model_directory_fails_readiness_not_answers(
    server_factory: Callable[..., ServerProcess], model_copy: Path
) -> None:
    server = server_factory(workers=2, model_dir=model_copy)
    bodies = make_bodies(2, seed=4)
    expected = reference_scores(server.base_url, bodies)
    moved = model_copy.with_name("moved-away")
    model_copy.rename(moved)
    try:
        # Readiness is cached 2 s per worker, and a worker updates reranker_ready_workers when a probe reaches
        # it: keep probing (the kernel spreads new connections over both workers) until both have said 503.
        wait_for(lambda: probe_ready(server, 503), timeout=20, what="/ready 503 on every worker")
        response = httpx.get(f"{server.base_url}/ready", timeout=5)
        error = response.json()["error"]
        assert response.status_code == 503 and error["code"] == 503 and "health check" in error["message"]
        assert str(moved.parent) not in error["message"]  # no paths to unauthenticated callers...
        assert "does not exist" in server.log()  # ...the reason is in the log
        assert int(response.headers["retry-after"]) >= 1
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200  # alive, not ready
        # The weights already in memory still give the right answers: readiness fails, answers never go wrong.
        for _ in range(10):
            answer = httpx.post(f"{server.base_url}/v1/rerank", json=bodies[0], timeout=10)
            assert answer.status_code in {200, 503}
            if answer.status_code == 200:
                assert same_scores(answer.json(), expected[0])
    finally:
        moved.rename(model_copy)
    wait_for(lambda: probe_ready(server, 200), timeout=20, what="/ready 200 on every worker again")


def probe_ready(server: ServerProcess, status: int) -> bool:
    """One /ready probe answered ``status`` and the merged gauge says every worker agrees."""
    if httpx.get(f"{server.base_url}/ready", timeout=5).status_code != status:
        return False
    ready_workers = metric(scrape(server.base_url), "reranker_ready_workers")
    return ready_workers == (2 if status == 200 else 0)


def test_a_device_error_fails_only_the_request_in_that_forward_pass(fake_settings: Callable[..., Any]) -> None:
    """In process, on the fake engine: one pair per forward pass, four concurrent one-document requests."""
    backend = FakeBackend(forward_delay_s=0.02)
    app = create_app(fake_settings(max_batch_pairs=1), backend_factory=lambda: backend)
    body = {"query": "red apple", "documents": ["red apple pie"]}

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                backend.fail_next_forward = True
                first = await asyncio.gather(*(client.post("/v1/rerank", json=body) for _ in range(4)))
                after = [await client.post("/v1/rerank", json=body), await client.get("/ready")]
                return [*first, *after]

    responses = asyncio.run(scenario())
    statuses = sorted(response.status_code for response in responses[:4])
    assert statuses == [200, 200, 200, 500]
    failed = next(response for response in responses[:4] if response.status_code == 500)
    error = failed.json()["error"]
    assert error == {"message": error["message"], "type": "server_error", "param": None, "code": 500}
    assert "simulated" not in error["message"] and "Traceback" not in failed.text  # no raw exception text
    for response in responses[:4]:
        if response.status_code == 200:
            assert response.json()["results"][0]["relevance_score"] == pytest.approx(1 / (1 + 2.718281828459045**-2))
    assert responses[4].status_code == 200  # and the service keeps serving
    assert responses[5].status_code == 200


def test_the_app_serves_again_after_its_lifespan_is_run_a_second_time(fake_settings: Callable[..., Any]) -> None:
    """Test clients (and schemathesis) run an app's lifespan once per client: stop() must not break start()."""
    app = create_app(fake_settings(), backend_factory=FakeBackend)
    body = {"query": "red apple", "documents": ["red apple pie", "green pear"]}

    async def one_lifespan() -> int:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return (await client.post("/v1/rerank", json=body)).status_code

    assert asyncio.run(one_lifespan()) == 200
    assert asyncio.run(one_lifespan()) == 200  # was a 500: the encode pool had been shut down for good
