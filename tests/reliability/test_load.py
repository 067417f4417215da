"""Load: sustained concurrent load ends with zero errors and bounded memory; past capacity the service sheds
load with 429 + Retry-After, stays healthy, and serves again as soon as the load drops.

Short versions of ``scripts/soak.py`` (which runs minutes and prints the figures quoted in the README).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.reliability.harness import (
    LoadGenerator,
    make_bodies,
    metric,
    probing_health,
    reference_scores,
    rss_mib,
    same_scores,
    scrape,
)
from tests.utils import ServerProcess

pytestmark = pytest.mark.reliability

# A worker's RSS may grow this much between the end of a warm-up load and the end of the measured load, with
# glibc's heap retention turned off (below). With the default allocator, RSS also climbs by freed memory that
# glibc keeps (+28 to +240 MiB over minutes, returned by malloc_trim: not a leak; see the README), which
# would hide a real leak; with large blocks always mmapped, RSS is flat (+6 MiB in 3 minutes), so growth here is
# memory the service still holds.
RSS_GROWTH_BOUND_MIB = 24
NO_HEAP_RETENTION = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: blocks ≥ 128 KiB mmapped, unmapped when freed


def test_sustained_load_has_no_errors_no_wrong_answers_and_bounded_memory(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(workers=2, **NO_HEAP_RETENTION)
    bodies = make_bodies(16, seed=1)
    expected = reference_scores(server.base_url, bodies)
    pids = server.worker_pids()
    assert len(pids) == 2

    warm = LoadGenerator(server.base_url, bodies, expected, clients=6).run_for(6)
    assert warm.statuses() == Counter({200: len(warm.outcomes)}), warm.summary()
    baseline = {pid: rss_mib(pid) for pid in pids}

    result = LoadGenerator(server.base_url, bodies, expected, clients=6).run_for(15)
    after = {pid: rss_mib(pid) for pid in pids}
    print(f"\nsustained load: {result.summary()}; RSS MiB {baseline} -> {after}")

    assert len(result.outcomes) >= 200, result.summary()  # it really was load
    assert result.statuses() == Counter({200: len(result.outcomes)}), result.summary()
    assert not result.wrong(), result.summary()
    assert server.worker_pids() == pids  # no worker died or was recycled
    for pid in pids:
        assert after[pid] - baseline[pid] <= RSS_GROWTH_BOUND_MIB, (pid, baseline[pid], after[pid])

    metrics = scrape(server.base_url)
    assert metric(metrics, "reranker_queue_depth") == 0
    assert metric(metrics, "reranker_ready_workers") == 2
    served = len(warm.outcomes) + len(result.outcomes) + len(bodies)
    assert metric(metrics, "reranker_requests_total", route="/v1/rerank", status="200") == served


def test_past_capacity_it_sheds_with_429_and_retry_after_stays_healthy_and_recovers(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # Each worker queues at most 64 pairs; 16 clients sending 40 documents each ask for ~10 times that.
    server = server_factory(workers=2, RERANKER_MAX_QUEUE_PAIRS="64", RERANKER_MAX_BATCH_PAIRS="8")
    bodies = make_bodies(6, documents=(40, 40), seed=9)
    expected = reference_scores(server.base_url, bodies)

    with probing_health(server.base_url, interval_s=0.2) as probes:
        result = LoadGenerator(server.base_url, bodies, expected, clients=16).run_for(6)
    load_ended = time.monotonic()
    # As soon as the load drops, the next request is served.
    response = httpx.post(f"{server.base_url}/v1/rerank", json=bodies[0], timeout=10)
    recovered_in = time.monotonic() - load_ended
    print(
        f"\noverload: {result.summary()}; probes {Counter((p, s) for p, s, _ in probes)}; "
        f"first request after the load answered in {recovered_in * 1000:.0f} ms"
    )

    statuses = result.statuses()
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] > 0, "capacity was never reached: the test proves nothing"
    assert statuses[200] > 0
    assert not result.wrong()
    refused = [outcome for outcome in result.outcomes if outcome.status == 429]
    assert all(outcome.envelope_ok for outcome in refused)
    assert all(outcome.retry_after is not None and int(outcome.retry_after) >= 1 for outcome in refused)

    assert probes and all(status == 200 for _, status, _ in probes), Counter((p, s) for p, s, _ in probes)
    assert max(seconds for _, _, seconds in probes) < 2.0

    assert response.status_code == 200
    assert same_scores(response.json(), expected[0])
    assert recovered_in < 2.0
    metrics = scrape(server.base_url)
    assert metric(metrics, "reranker_rejected_total", reason="overloaded") == statuses[429]
    assert metric(metrics, "reranker_queue_depth") == 0
