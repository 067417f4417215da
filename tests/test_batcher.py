"""The dynamic batcher and the pair encoder, on the fake backend (no torch)."""

from __future__ import annotations

import asyncio

import pytest

from app.batcher import DynamicBatcher, plan_batches
from app.engine.base import EncodedPair, WindowPolicy
from app.engine.fake import FAKE_TEMPLATE, FakeBackend, fake_tokenize
from app.errors import OverloadedError


def pair(length: int) -> EncodedPair:
    return EncodedPair(list(range(length)), [0] * length)


def make_batcher(backend: FakeBackend, **limits: int) -> DynamicBatcher:
    options = {"max_batch_tokens": 1000, "max_batch_pairs": 64, "max_queue_pairs": 10_000, **limits}
    return DynamicBatcher(backend.forward, **options)


class TestPlanBatches:
    def test_sorted_by_length_and_within_the_token_budget(self) -> None:
        lengths = [50, 10, 40, 20, 30, 10]
        batches = plan_batches(lengths, max_batch_tokens=60, max_batch_pairs=10)
        flat = [p for batch in batches for p in batch]
        assert sorted(flat) == list(range(len(lengths)))
        assert [lengths[p] for p in flat] == sorted(lengths)
        for batch in batches:
            assert len(batch) * max(lengths[p] for p in batch) <= 60
        assert batches == [[1, 5, 3], [4], [2], [0]]

    def test_pair_cap(self) -> None:
        assert [len(b) for b in plan_batches([5] * 10, max_batch_tokens=10_000, max_batch_pairs=4)] == [4, 4, 2]

    def test_a_pair_longer_than_the_budget_still_runs_alone(self) -> None:
        assert plan_batches([500, 5], max_batch_tokens=100, max_batch_pairs=8) == [[1], [0]]

    def test_batches_are_sized_by_the_shape_the_backend_runs_them_in(self) -> None:
        """With fixed shapes (CUDA graphs' buckets: here rows to a multiple of 8, columns of 16), a batch costs
        its bucket: 9 pairs of 100 tokens are 16 x 112 padded tokens, past a budget of 1000; 8 are 896."""

        def bucket(pairs: int, longest: int) -> tuple[int, int]:
            return -(-pairs // 8) * 8, -(-longest // 16) * 16

        def bucket_tokens(pairs: int, longest: int, total: int) -> int:
            rows, columns = bucket(pairs, longest)
            return rows * columns

        lengths = [100] * 20
        assert [len(b) for b in plan_batches(lengths, max_batch_tokens=1000, max_batch_pairs=64)] == [10, 10]
        planned = plan_batches(lengths, max_batch_tokens=1000, max_batch_pairs=64, batch_tokens=bucket_tokens)
        assert [len(b) for b in planned] == [8, 8, 4]
        for batch in planned:
            rows, columns = bucket(len(batch), max(lengths[p] for p in batch))
            assert rows * columns <= 1000
        # A pair whose bucket alone is past the budget still runs, alone.
        assert plan_batches([990, 5], max_batch_tokens=1000, max_batch_pairs=8, batch_tokens=bucket_tokens) == [
            [1],
            [0],
        ]

    def test_packed_batches_cost_their_tokens_not_their_padding(self) -> None:
        """A packed backend counts a batch as its pairs' own tokens (``total``): short pairs beside a long one
        cost only themselves, so many more share a batch than padded to the longest."""
        lengths = [10] * 90 + [500]
        calls: list[tuple[int, int, int]] = []

        def packed(pairs: int, longest: int, total: int) -> int:
            calls.append((pairs, longest, total))
            return total

        planned = plan_batches(lengths, max_batch_tokens=1400, max_batch_pairs=256, batch_tokens=packed)
        assert [len(b) for b in planned] == [91]  # 900 + 500 tokens; padded, 91 x 500 would be 32 batches
        assert calls[-1] == (91, 500, 1400)  # the batch so far, this pair included
        assert len(plan_batches(lengths, max_batch_tokens=1400, max_batch_pairs=256)) == 2


class TestDynamicBatcher:
    async def test_pools_pairs_from_concurrent_requests_into_one_forward(self) -> None:
        backend = FakeBackend(forward_delay_s=0.05)
        batcher = make_batcher(backend)
        batcher.start()
        # The first request occupies the model; the next three queue up and share one forward pass.
        first = asyncio.create_task(batcher.score([pair(8)]))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher.score([pair(n), pair(n + 1)])) for n in (5, 9, 13)]
        await asyncio.gather(first, *rest)
        await batcher.stop(timeout_s=1)
        assert backend.batches == [[8], [5, 6, 9, 10, 13, 14]]

    async def test_results_come_back_to_the_right_request_in_order(self) -> None:
        backend = FakeBackend()
        batcher = make_batcher(backend, max_batch_tokens=64)
        batcher.start()
        encoder = backend.encoder
        requests = [encoder.encode(f"q{n} shared", ["shared word " * n, f"q{n}", "none"]) for n in range(1, 6)]
        results = await asyncio.gather(*(batcher.score(r.pairs) for r in requests))
        alone = [backend.forward(r.pairs) for r in requests]
        await batcher.stop(timeout_s=1)
        assert results == alone
        for batch in backend.batches[: -len(requests)]:
            assert len(batch) * max(batch) <= 64

    async def test_a_cancelled_request_costs_no_forward_pass(self) -> None:
        backend = FakeBackend(forward_delay_s=0.1)
        batcher = make_batcher(backend)
        batcher.start()
        busy = asyncio.create_task(batcher.score([pair(4)]))
        await asyncio.sleep(0.02)  # the model is busy with `busy`
        leaving = asyncio.create_task(batcher.score([pair(30), pair(31)]))
        staying = asyncio.create_task(batcher.score([pair(7)]))
        await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.gather(busy, staying)
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await batcher.stop(timeout_s=1)
        assert backend.batches == [[4], [7]]
        assert batcher.pending_pairs == 0

    async def test_a_full_queue_refuses_with_overloaded(self) -> None:
        backend = FakeBackend(forward_delay_s=0.05)
        batcher = make_batcher(backend, max_queue_pairs=4)
        batcher.start()
        first = asyncio.create_task(batcher.score([pair(3)] * 3))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            await batcher.score([pair(3)] * 2)
        await first
        assert await batcher.score([pair(3)] * 4)  # room again once the queue drained
        await batcher.stop(timeout_s=1)

    async def test_stop_finishes_queued_work(self) -> None:
        backend = FakeBackend(forward_delay_s=0.05)
        batcher = make_batcher(backend, max_batch_pairs=1)
        batcher.start()
        tasks = [asyncio.create_task(batcher.score([pair(5)])) for _ in range(4)]
        await asyncio.sleep(0.01)
        await batcher.stop(timeout_s=5)
        assert [len(await t) for t in tasks] == [1, 1, 1, 1]


class TestPairEncoder:
    def encoder(self, max_length: int = 24, share: float = 0.5) -> FakeBackend:
        return FakeBackend(max_length=max_length, max_query_share=share)

    def test_a_short_pair_is_kept_whole_with_the_template(self) -> None:
        backend = self.encoder()
        request = backend.encoder.encode("a b", ["c d e"])
        (q_a, q_b), (d_c, d_d, d_e) = fake_tokenize(["a b"])[0], fake_tokenize(["c d e"])[0]
        assert request.pairs[0].input_ids == [0, q_a, q_b, 2, 2, d_c, d_d, d_e, 2]
        assert request.truncated == [False] and request.window_count == [1]

    def test_truncation_cuts_the_document_first(self) -> None:
        backend = self.encoder(max_length=24)  # 20 tokens of text beside the 4 special ones
        query = " ".join(f"q{i}" for i in range(6))
        document = " ".join(f"d{i}" for i in range(30))
        request = backend.encoder.encode(query, [document])
        assert len(request.pairs[0]) == 24
        ids = request.pairs[0].input_ids
        assert ids[1:7] == fake_tokenize([query])[0]  # the whole query is kept
        assert ids[9:-1] == fake_tokenize([document])[0][:14]
        assert request.truncated == [True]

    def test_a_long_query_is_cut_to_its_share(self) -> None:
        backend = self.encoder(max_length=24, share=0.5)
        query = " ".join(f"q{i}" for i in range(40))
        request = backend.encoder.encode(query, [" ".join(f"d{i}" for i in range(40))])
        ids = request.pairs[0].input_ids
        assert ids[1:11] == fake_tokenize([query])[0][:10]  # half of the 20 text tokens
        assert len(ids) == 24

    def test_windows_have_exact_boundaries_and_overlap(self) -> None:
        backend = self.encoder(max_length=24)
        doc_ids = fake_tokenize([" ".join(f"d{i}" for i in range(40))])[0]
        # query "q" takes 1 token: room = 24 - 4 - 1 = 19; overlap 5 → stride 14: windows start 0, 14, 28
        windows, truncated = backend.encoder.windows([7], doc_ids, WindowPolicy(max_windows=10, overlap=5))
        assert [w for _, w in windows] == [doc_ids[0:19], doc_ids[14:33], doc_ids[28:40]]
        assert not truncated
        windows, truncated = backend.encoder.windows([7], doc_ids, WindowPolicy(max_windows=2, overlap=5))
        assert [w for _, w in windows] == [doc_ids[0:19], doc_ids[14:33]] and truncated

    def test_overlap_is_capped_at_half_a_window(self) -> None:
        backend = self.encoder(max_length=24)
        doc_ids = list(range(100, 140))
        windows, _ = backend.encoder.windows([7], doc_ids, WindowPolicy(max_windows=10, overlap=1000))
        starts = [doc_ids.index(w[0]) for _, w in windows]
        assert starts == [0, 10, 20, 30]  # room 19, overlap capped at 9 → stride 10

    def test_max_document_tokens_cuts_before_windowing(self) -> None:
        backend = self.encoder(max_length=24)
        document = " ".join(f"d{i}" for i in range(40))
        request = backend.encoder.encode("q", [document], WindowPolicy(max_windows=10, max_document_tokens=25))
        assert request.window_count == [2]
        assert FAKE_TEMPLATE.special_count == 4


async def test_a_forward_raising_stopiteration_fails_the_batch_instead_of_hanging() -> None:
    def broken_forward(pairs: object) -> list[float]:
        raise StopIteration

    batcher = DynamicBatcher(broken_forward, max_batch_tokens=100, max_batch_pairs=8, max_queue_pairs=100)
    batcher.start()
    from app.errors import EngineFailure

    with pytest.raises(EngineFailure):
        await asyncio.wait_for(batcher.score([pair(3)]), timeout=5)
    await batcher.stop(timeout_s=1)
