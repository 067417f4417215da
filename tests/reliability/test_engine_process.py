"""Engine processes (``RERANKER_ENGINE=process``): the same answers as inline with one model copy, a killed
engine fails readiness and is replaced, SIGTERM drains through the engine, a client that leaves takes its
pairs out of the engine's queue, a full worker queue is a 429, and the engine's metrics are merged in.

Real ``python -m app`` servers on the tiny model, the engine on the CPU (the GPU's default mode, forced here).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.cpus import usable_cpus
from tests.reliability.harness import (
    LoadGenerator,
    leave_during_backlog,
    make_bodies,
    metric,
    pid_alive,
    reference_scores,
    scrape,
    sigterm_with_backlog,
    wait_for,
)
from tests.utils import ServerProcess

pytestmark = pytest.mark.reliability

ENGINE = {"RERANKER_ENGINE": "process", "RERANKER_DEVICE": "cpu"}


def engine_pids(server: ServerProcess) -> list[int]:
    """The master's children that are engine processes (the others are HTTP workers)."""
    pids = []
    for pid in server.worker_pids():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"app.engine.process" in command:
            pids.append(pid)
    return pids


def http_worker_pids(server: ServerProcess) -> list[int]:
    engines = set(engine_pids(server))
    return [pid for pid in server.worker_pids() if pid not in engines]


def test_engine_mode_scores_as_inline_does_with_one_model_copy(server_factory: Callable[..., ServerProcess]) -> None:
    bodies = make_bodies(6, seed=21)
    # Large requests are tokenised in parts in parallel, chunked ones too: windows must land on their documents.
    bodies += [
        {**body, "max_chunks_per_doc": 3, "overlap_tokens": 8}
        for body in make_bodies(2, documents=(48, 48), doc_words=(20, 700), seed=26)
    ]
    inline = server_factory(workers=1, RERANKER_ENGINE="inline")
    expected = reference_scores(inline.base_url, bodies)
    server = server_factory(workers=3, **ENGINE)

    result = LoadGenerator(server.base_url, bodies, expected, clients=6).run_for(4)
    print(f"\nengine mode: {result.summary()}")
    assert result.statuses() == Counter({200: len(result.outcomes)}) and result.outcomes, server.log()[-3000:]
    assert not result.wrong()
    assert len(engine_pids(server)) == 1 and len(http_worker_pids(server)) == 3, server.worker_pids()
    # One model loaded, by the engine; the three workers hold the tokenizer only.
    engine_pid = engine_pids(server)[0]
    loads = [line for line in server.log().splitlines() if "app.engine.torch_backend" in line and " loaded " in line]
    assert len(loads) == 1 and f"[{engine_pid}]" in loads[0], loads
    metrics = scrape(server.base_url)
    assert metric(metrics, "reranker_ready_workers") == 3, metrics
    assert metric(metrics, "reranker_engines") == 1, metrics
    # The engine's batcher metrics reach /metrics: every pair a client got was scored there.
    assert metric(metrics, "reranker_pairs_scored_total") >= 10 * len(result.ok())  # every body has >= 10 documents
    assert metric(metrics, "reranker_batch_size_count") > 0
    assert metric(metrics, "reranker_queue_depth") == 0


def test_unset_web_concurrency_starts_workers_by_where_the_model_runs(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # Beside engine processes a worker only tokenises, and one cannot keep a GPU fed: one per 4 CPUs, 2 to 8.
    expected = min(8, max(2, usable_cpus() // 4))
    bodies = make_bodies(4, seed=27)
    inline = server_factory(workers=None, RERANKER_ENGINE="inline")
    reference = reference_scores(inline.base_url, bodies)
    assert len(inline.worker_pids()) == 1 and metric(scrape(inline.base_url), "reranker_ready_workers") == 1
    assert "1 HTTP workers each with its own model (WEB_CONCURRENCY unset)" in inline.log()

    server = server_factory(workers=None, **ENGINE)
    assert len(engine_pids(server)) == 1 and len(http_worker_pids(server)) == expected, server.worker_pids()
    assert f"{expected} HTTP workers feeding 1 engine process(es)" in server.log()
    metrics = scrape(server.base_url)
    assert metric(metrics, "reranker_ready_workers") == expected and metric(metrics, "reranker_engines") == 1
    result = LoadGenerator(server.base_url, bodies, reference, clients=2 * expected).run_for(2)
    assert result.statuses() == Counter({200: len(result.outcomes)}) and not result.wrong()


def test_a_killed_engine_fails_readiness_and_is_replaced(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(workers=2, **ENGINE)
    bodies = make_bodies(4, seed=22)
    expected = reference_scores(server.base_url, bodies)
    (victim,) = engine_pids(server)
    generator = LoadGenerator(server.base_url, bodies, expected, clients=4).start()
    try:
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 503,
            timeout=10,
            interval=0.05,
            what="/ready 503 once the engine is gone",
        )
        ready_in = wait_for(
            lambda: (
                engine_pids(server) not in ([], [victim])
                and httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 200
                and metric(scrape(server.base_url), "reranker_ready_workers") == 2
            ),
            timeout=60,
            what="a replacement engine, ready",
        )
        time.sleep(2)  # and it serves on
    finally:
        result = generator.stop()
    print(f"\nengine kill -9: {result.summary()}; ready again in {ready_in:.1f}s")

    assert not pid_alive(victim) and len(engine_pids(server)) == 1
    assert not result.wrong(), "a request got a wrong answer"
    assert set(result.statuses()) <= {200, 503}, result.statuses()  # never a 500 or a dropped connection
    refused = [o for o in result.outcomes if o.status == 503]
    assert all(o.envelope_ok and o.retry_after for o in refused)
    assert any(o.status == 200 and o.started > killed_at + ready_in for o in result.outcomes)
    assert len(http_worker_pids(server)) == 2  # the HTTP workers lived through it
    assert "died after" in server.log()
    metrics = scrape(server.base_url)
    assert metric(metrics, "reranker_queue_depth") == 0  # the dead engine's queue is not live
    assert metric(metrics, "reranker_engines") == 1  # the dead one no longer counts, its replacement does


def test_sigterm_drains_every_accepted_request_through_the_engine(
    server_factory: Callable[..., ServerProcess],
) -> None:
    graceful_timeout = 15
    server = server_factory(
        workers=2, RERANKER_MAX_BATCH_PAIRS="1", RERANKER_GRACEFUL_TIMEOUT=str(graceful_timeout), **ENGINE
    )
    bodies = make_bodies(12, documents=(200, 200), doc_words=(20, 40), seed=23)
    expected = reference_scores(server.base_url, bodies)
    (engine,) = engine_pids(server)
    queued, answers, signalled = sigterm_with_backlog(
        server.base_url, server.process, bodies, expected, accept_timeout=30, request_timeout=60
    )
    code = server.process.wait(graceful_timeout + 15)
    exited_in = time.monotonic() - signalled
    print(f"\nSIGTERM with {queued:.0f} pairs queued in the engine: exit {code} in {exited_in:.2f}s")

    assert queued > 0, "nothing was queued at SIGTERM: the test proves nothing"
    assert answers == [(200, True)] * len(bodies)
    assert code == 0 and exited_in < graceful_timeout + 5
    wait_for(lambda: not pid_alive(engine), timeout=10, what="the engine to stop with the server")


def test_a_client_that_leaves_takes_its_pairs_out_of_the_engine_queue(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(workers=1, RERANKER_MAX_BATCH_PAIRS="1", **ENGINE)
    cancelled, scored = leave_during_backlog(server.base_url)
    print(f"\nleaver through the engine: {cancelled:.0f} pairs cancelled, {scored:.0f} scored")
    assert cancelled == 150
    assert scored == 1600


def test_a_full_worker_queue_is_a_429_with_retry_after(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(workers=1, RERANKER_MAX_QUEUE_PAIRS="64", RERANKER_MAX_BATCH_PAIRS="8", **ENGINE)
    bodies = make_bodies(4, documents=(40, 40), seed=24)
    expected = reference_scores(server.base_url, bodies)
    result = LoadGenerator(server.base_url, bodies, expected, clients=8).run_for(4)
    statuses = result.statuses()
    assert set(statuses) <= {200, 429} and statuses[429] > 0 and statuses[200] > 0, statuses
    assert not result.wrong()
    refused = [o for o in result.outcomes if o.status == 429]
    assert all(o.envelope_ok and o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    too_big = httpx.post(
        f"{server.base_url}/v1/rerank", json=make_bodies(1, documents=(65, 65), seed=25)[0], timeout=10
    )
    assert too_big.status_code == 413 and "RERANKER_MAX_QUEUE_PAIRS" in too_big.json()["error"]["message"]
    assert metric(scrape(server.base_url), "reranker_rejected_total", reason="overloaded") == statuses[429]
