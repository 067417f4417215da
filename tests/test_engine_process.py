"""The engine process on its own: the wire format, the supervisor's plan, and a real engine subprocess (on the
simulated device) driven through the worker's ``EngineClient`` — answers, cancellation, start-up failures."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

import app.cpus
from app.config import Settings
from app.engine.base import TRUNCATE, EncodedPair, PairEncoder, WindowPolicy
from app.engine.client import EngineClient, EngineStartError
from app.engine.model_dir import load_pair_encoder
from app.engine.process import failure_marker
from app.engine.simulated import SimulatedDevice
from app.engine.supervisor import ENGINE_SOCKETS_ENV, EngineSpec, plan_engines, visible_gpus
from app.engine.wire import decode_pairs, decode_scores, encode_pairs, encode_scores
from app.errors import OverloadedError, PayloadTooLargeError
from app.service import RerankService, encode_threads
from tests.utils import REPO_ROOT


class TestWire:
    def test_pairs_survive_the_trip_as_numpy_views(self) -> None:
        pairs = [
            EncodedPair([0, 5, 6, 2], [0, 0, 1, 1]),
            EncodedPair([0, 70_000, 2], [0, 0, 0]),
            EncodedPair([0] * 300, [1] * 300),
        ]
        body = encode_pairs(pairs)
        assert len(body) == 4 * 3 + 5 * (4 + 3 + 300)  # int32 lengths, int32 ids, int8 types
        back = decode_pairs(body, 3)
        assert [list(p.input_ids) for p in back] == [p.input_ids for p in pairs]
        assert [list(p.type_ids) for p in back] == [p.type_ids for p in pairs]
        assert [len(p) for p in back] == [4, 3, 300]

    def test_a_frame_of_the_wrong_size_is_refused(self) -> None:
        body = encode_pairs([EncodedPair([1, 2, 3], [0, 0, 0])])
        with pytest.raises(ValueError, match="does not hold"):
            decode_pairs(body + b"\0", 1)

    def test_scores_are_exact_float64(self) -> None:
        scores = [0.1, -3.25, 1e-7, 12345.678]
        assert decode_scores(encode_scores(scores), 4) == scores


class RecordingEngines:
    """Stands where the worker's EngineClient would: records each SCORE (its pairs) and answers each pair with
    the sum of its token ids, so a test can tell which logit belongs to which pair."""

    def __init__(self) -> None:
        self.max_queue_pairs = 8192
        self.calls: list[list[EncodedPair]] = []

    async def score(self, payload: bytes, count: int) -> list[float]:
        pairs = decode_pairs(payload, count)
        self.calls.append(pairs)
        return [float(sum(int(token) for token in pair.input_ids)) for pair in pairs]


class TestEncodeParts:
    """A worker tokenises a big request in parts on its free encode threads and sends one SCORE body."""

    def service(self, model_dir: Path, threads: int, **overrides: Any) -> RerankService:
        settings = Settings(model_path=model_dir, **overrides)  # type: ignore[arg-type]
        service = RerankService(settings, lambda: SimulatedDevice(settings), engine_sockets=[Path("unused.sock")])
        service.encoder = load_pair_encoder(settings)
        service._encode_threads = threads
        service._encode_pool = ThreadPoolExecutor(threads)
        return service

    def run(
        self, service: RerankService, engines: RecordingEngines, documents: list[str], policy: WindowPolicy
    ) -> tuple[Any, list[float], float]:
        return asyncio.run(service._encode_and_score(cast(EngineClient, engines), "query", documents, policy))

    def test_parts_merge_into_exactly_the_whole_request(self, tiny_model_dir: Path) -> None:
        service = self.service(tiny_model_dir, threads=4)
        assert service.encoder is not None
        # Long documents windowed: parts must offset each document's first window by the windows before it.
        documents = [" ".join(["harbour ship dawn"] * (3 + 40 * (n % 3))) for n in range(30)]
        policy = WindowPolicy(max_windows=3, overlap=4)
        whole = service.encoder.encode("query", documents, policy)
        assert len(whole.pairs) > len(documents)  # some documents have several windows
        engines = RecordingEngines()
        merged, logits, _ = self.run(service, engines, documents, policy)
        assert merged == whole
        assert len(engines.calls) == 1  # one body, the whole request's pairs
        assert [list(pair.input_ids) for pair in engines.calls[0]] == [pair.input_ids for pair in whole.pairs]
        assert logits == [float(sum(pair.input_ids)) for pair in whole.pairs]

    def test_an_idle_worker_spreads_a_request_and_a_busy_one_does_not(
        self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        service = self.service(tiny_model_dir, threads=4)
        assert service.encoder is not None
        sizes: list[int] = []
        encode_and_pack = RerankService._encode_and_pack

        def counted(
            encoder: PairEncoder, query: str, documents: Sequence[str], policy: WindowPolicy, instruction: str | None
        ) -> Any:
            sizes.append(len(documents))
            return encode_and_pack(encoder, query, documents, policy, instruction)

        monkeypatch.setattr(service, "_encode_and_pack", counted)
        documents = [f"document number {n}" for n in range(64)]
        whole = service.encoder.encode("query", documents, TRUNCATE)
        engines = RecordingEngines()
        merged, logits, _ = self.run(service, engines, documents, TRUNCATE)
        assert sizes == [16, 16, 16, 16]  # all four threads free
        assert [len(call) for call in engines.calls] == [64]  # one SCORE for the whole request
        assert merged == whole
        assert logits == [float(sum(pair.input_ids)) for pair in whole.pairs]  # in the request's order
        sizes.clear()
        service._encode_parts_running = 3  # three parts of other requests are being tokenised
        self.run(service, RecordingEngines(), documents, TRUNCATE)
        assert sizes == [64]
        assert service._encode_parts_running == 3  # its own parts counted out again
        sizes.clear()
        service._encode_parts_running = 0
        self.run(service, RecordingEngines(), documents[:6], TRUNCATE)
        assert sizes == [6]  # fewer than two parts' worth of documents: one part

    def test_every_worker_beside_engines_may_spread_a_request_over_every_core(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Not the cores divided by the workers: an idle worker's one request would then wait on 4 threads of a
        # 16-core host (13.5 ms on an H100 host) where 16 tokenise it in 6.7 ms. Inline, the cores are the model's.
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
        monkeypatch.setattr(app.cpus, "cgroup_cpu_limit", lambda: None)
        monkeypatch.setenv("WEB_CONCURRENCY", "4")
        assert encode_threads(with_engines=True) == 16
        assert encode_threads(with_engines=False) == 2
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert encode_threads(with_engines=True) == 2

    def test_a_request_past_the_window_limit_is_refused_before_it_is_scored(self, tiny_model_dir: Path) -> None:
        service = self.service(tiny_model_dir, threads=4, max_windows_per_request=20)
        engines = RecordingEngines()
        with pytest.raises(PayloadTooLargeError, match="needs 64 scored windows"):
            self.run(service, engines, [f"document number {n}" for n in range(64)], TRUNCATE)
        assert engines.calls == []


class TestPlan:
    def settings(self, tmp_path: Path, **overrides: object) -> Settings:
        from tests.utils import fake_model_dir

        return Settings(model_path=fake_model_dir(tmp_path / "model"), engine_socket_dir=tmp_path / "s", **overrides)  # type: ignore[arg-type]

    def test_visible_gpus_are_the_ones_torch_counts(self) -> None:
        import torch

        # Here (no NVIDIA devices) without starting torch to ask; on a GPU host, one id per device it may use.
        assert len(visible_gpus()) == torch.cuda.device_count()

    def test_cpu_defaults_to_inline_and_process_can_be_forced(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("app.engine.supervisor.visible_gpus", lambda: [])  # a host without GPUs
        assert plan_engines(self.settings(tmp_path)) == []
        assert plan_engines(self.settings(tmp_path, device="cpu")) == []
        assert plan_engines(self.settings(tmp_path, engine="process", device="cpu")) == [
            EngineSpec(0, tmp_path / "s" / "engine-0.sock")
        ]
        assert plan_engines(self.settings(tmp_path, engine="inline", backend="simulated")) == []
        assert len(plan_engines(self.settings(tmp_path, backend="simulated"))) == 1

    def test_one_engine_per_visible_gpu(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # No GPU here: what the probe would find on a host with CUDA_VISIBLE_DEVICES=2,5 is supplied.
        monkeypatch.setattr("app.engine.supervisor.visible_gpus", lambda: ["2", "5"])
        specs = plan_engines(self.settings(tmp_path))
        assert [(s.index, s.socket_path.name, s.env) for s in specs] == [
            (0, "engine-0.sock", {"CUDA_VISIBLE_DEVICES": "2"}),
            (1, "engine-1.sock", {"CUDA_VISIBLE_DEVICES": "5"}),
        ]
        assert plan_engines(self.settings(tmp_path, engine="inline")) == []


def start_engine(model_dir: Path, socket_path: Path, **settings: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RERANKER_MODEL_PATH": str(model_dir),
        "RERANKER_BACKEND": "simulated",
        "RERANKER_SIMULATED_TOKEN_US": "20",
        **settings,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop(ENGINE_SOCKETS_ENV, None)
    return subprocess.Popen(
        [sys.executable, "-m", "app.engine.process", "--socket", str(socket_path)], cwd=REPO_ROOT, env=env
    )


@pytest.fixture
def engine(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Path]:
    socket_path = tmp_path / "engine.sock"
    process = start_engine(tiny_model_dir, socket_path)
    yield socket_path
    process.terminate()
    assert process.wait(30) == 0  # SIGTERM: a clean stop
    assert not socket_path.exists()


async def test_a_worker_gets_the_devices_answers_and_can_withdraw_a_request(engine: Path, tiny_model_dir: Path) -> None:
    settings = Settings(model_path=tiny_model_dir, backend="simulated")  # type: ignore[arg-type]
    device = SimulatedDevice(settings)
    client = EngineClient([engine], encoder=device.encoder, max_queue_pairs=100)
    await client.start(timeout_s=60)
    try:
        requests = [
            device.encoder.encode(f"query {n}", [f"document {i} " * (n + i) for i in range(5)]).pairs for n in range(6)
        ]
        answers = await asyncio.gather(*(client.score(encode_pairs(pairs), len(pairs)) for pairs in requests))
        assert answers == [device.forward(pairs) for pairs in requests]
        assert await client.check_health() is None

        # A request withdrawn while another occupies the device is dropped by the engine.
        long_pairs = device.encoder.encode("busy", ["many words " * 30] * 40).pairs  # ~50 ms of device time
        busy = asyncio.create_task(client.score(encode_pairs(long_pairs), len(long_pairs)))
        await asyncio.sleep(0.01)
        leaving = asyncio.create_task(client.score(encode_pairs(requests[1]), 5))
        await asyncio.sleep(0.01)
        leaving.cancel()
        assert await busy == device.forward(long_pairs)
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert client.pending_pairs == 0

        with pytest.raises(PayloadTooLargeError):
            await client.score(encode_pairs(requests[0] * 21), 105)
        queued = [asyncio.create_task(client.score(encode_pairs(requests[5] * 10), 50)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            await client.score(encode_pairs(requests[0]), 5)
        await asyncio.gather(*queued)
    finally:
        await client.stop()


async def test_an_engine_that_cannot_load_says_why_to_the_waiting_worker(tmp_path: Path) -> None:
    from tests.utils import fake_model_dir

    broken = fake_model_dir(tmp_path / "broken")  # files present, but not a model anything can load
    socket_path = tmp_path / "engine.sock"
    process = start_engine(broken, socket_path)
    assert process.wait(60) == 1
    assert failure_marker(socket_path).is_file() and not socket_path.exists()
    client = EngineClient([socket_path], encoder=None, max_queue_pairs=10)  # type: ignore[arg-type]
    with pytest.raises(EngineStartError, match="the model engine failed to start: "):
        await client.start(timeout_s=5)


async def test_a_cpu_engine_uses_every_core_whatever_the_worker_count(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The engine is the one model process: its torch threads are not divided by WEB_CONCURRENCY, as inline
    workers' are (with two workers the engine ran on half the cores: 8 instead of 15 pairs/s, measured)."""
    socket_path = tmp_path / "engine.sock"
    process = start_engine(
        tiny_model_dir,
        socket_path,
        RERANKER_BACKEND="torch",
        RERANKER_DEVICE="cpu",
        RERANKER_TORCH_COMPILE="off",
        RERANKER_TORCH_THREADS="0",
        WEB_CONCURRENCY="2",
    )
    client = EngineClient(
        [socket_path], encoder=load_pair_encoder(Settings(model_path=tiny_model_dir)), max_queue_pairs=10
    )  # type: ignore[arg-type]
    try:
        await client.start(timeout_s=120)
        assert client.connections[0].facts["describe"]["threads"] == str(len(os.sched_getaffinity(0)))
    finally:
        await client.stop()
        process.terminate()
        assert process.wait(30) == 0
