"""The real model path: the production loader on a tiny cross-encoder built offline.

Scores must equal sentence-transformers' ``CrossEncoder.predict`` on the same model, alone and when the pairs
are batched with other requests' pairs; long documents are chunked exactly.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.engine.base import WindowPolicy
from app.engine.torch_backend import ModelLoadError, TorchBackend
from app.service import RerankService
from tests.model_factory import make_words

QUERY = "kalo mine ruvo"


def settings_for(model_dir: Path, **overrides: object) -> Settings:
    return Settings(model_path=model_dir, dtype="float32", torch_threads=1, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> TorchBackend:
    return TorchBackend(settings_for(tiny_model_dir))


@pytest.fixture(scope="module")
def cross_encoder(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_model_dir), local_files_only=True, max_length=512, device="cpu")


@pytest.fixture
async def service(tiny_model_dir: Path) -> AsyncIterator[RerankService]:
    settings = settings_for(tiny_model_dir, max_batch_tokens=2048, max_batch_pairs=16)
    service = RerankService(settings, lambda: TorchBackend(settings))
    await service.start()
    yield service
    await service.stop()


def sigmoid(values: list[float]) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(values, dtype=np.float64)))


def documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [make_words(int(rng.integers(3, 300)), seed=seed * 1000 + n) for n in range(count)]


def test_scores_equal_cross_encoder_predict(backend: TorchBackend, cross_encoder) -> None:  # type: ignore[no-untyped-def]
    docs = [*documents(12, seed=1), "", "What's the weather?", "naïve café 東京 🙂 \x00 mixed"]
    request = backend.encoder.encode(QUERY, docs)
    ours = sigmoid(backend.forward(request.pairs))
    reference = cross_encoder.predict([(QUERY, doc) for doc in docs])
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # the pairs really are the tokenizer's own pair encoding (HF drops an empty second text: skip that one)
    tokenizer = cross_encoder.tokenizer
    for doc, pair in zip(docs, request.pairs, strict=True):
        if doc:
            assert pair.input_ids == tokenizer(QUERY, doc)["input_ids"]


def test_each_pair_alone_equals_the_batch(backend: TorchBackend) -> None:
    docs = documents(10, seed=2)
    pairs = backend.encoder.encode(QUERY, docs).pairs
    batched = backend.forward(pairs)
    alone = [backend.forward([p])[0] for p in pairs]
    # float32 rounding of a padded vs an unpadded pass; the fixture's head multiplies it by ~30 (logits ~±7)
    np.testing.assert_allclose(batched, alone, atol=1e-4)


async def test_concurrent_mixed_requests_score_as_if_alone(service: RerankService, cross_encoder) -> None:  # type: ignore[no-untyped-def]
    requests = [(f"{QUERY} {make_words(n, seed=n)}", documents(3 + n % 7, seed=10 + n)) for n in range(12)]
    outcomes = await asyncio.gather(*(service.rerank(q, docs) for q, docs in requests))
    for (query, docs), outcome in zip(requests, outcomes, strict=True):
        reference = cross_encoder.predict([(query, doc) for doc in docs])
        ours = [d.relevance_score for d in outcome.documents]
        np.testing.assert_allclose(ours, reference, atol=1e-5)
        assert [d.index for d in outcome.documents] == list(range(len(docs)))
    # and they were really pooled: fewer forward passes than requests
    assert service.batcher is not None


async def test_truncation_keeps_the_start_and_chunking_finds_a_late_passage(
    service: RerankService, backend: TorchBackend
) -> None:
    encoder = backend.encoder
    filler = make_words(900, seed=77)  # ~900 tokens: far past one 512-token window
    passage = make_words(60, seed=78)
    document = f"{filler} {passage}"
    doc_ids = encoder._tokenize([document])[0]
    query_ids = encoder._tokenize([QUERY])[0]
    policy = WindowPolicy(max_windows=8, overlap=80)

    chunked = await service.rerank(QUERY, [document], policy=policy)
    truncated = await service.rerank(QUERY, [document])

    # The windows, computed directly: exact boundaries, each scored alone.
    room = encoder.max_length - encoder.template.special_count - len(query_ids)
    stride = room - 80
    starts = list(range(0, len(doc_ids), stride))
    starts = starts[: next(i for i, s in enumerate(starts) if s + room >= len(doc_ids)) + 1]
    direct = [backend.forward([encoder.template.build(query_ids, doc_ids[s : s + room])])[0] for s in starts]
    result = chunked.documents[0]
    assert result.window_count == len(starts) >= 3
    assert result.logit == pytest.approx(max(direct), abs=1e-5)
    assert result.best_window == int(np.argmax(direct))
    assert not result.truncated
    # Truncation scores the first window only, and says a part was never seen.
    assert truncated.documents[0].logit == pytest.approx(direct[0], abs=1e-5)
    assert truncated.documents[0].truncated
    # The passage (the last window) is seen only by chunking.
    last_window_text_ids = doc_ids[starts[-1] : starts[-1] + room]
    assert encoder._tokenize([passage])[0][-10:] == last_window_text_ids[-10:]
    # usage counts every scored token
    assert chunked.total_tokens == sum(len(query_ids) + len(doc_ids[s : s + room]) + 4 for s in starts)


async def test_short_documents_score_the_same_with_chunking_on(service: RerankService) -> None:
    docs = documents(6, seed=5)
    plain = await service.rerank(QUERY, docs)
    chunked = await service.rerank(QUERY, docs, policy=WindowPolicy(max_windows=8, overlap=80))
    assert [d.logit for d in plain.documents] == pytest.approx([d.logit for d in chunked.documents], abs=1e-6)
    assert all(d.window_count == 1 for d in chunked.documents)


async def test_window_cap_is_a_413(tiny_model_dir: Path) -> None:
    from app.errors import PayloadTooLargeError

    settings = settings_for(tiny_model_dir, max_windows_per_request=5)
    service = RerankService(settings, lambda: TorchBackend(settings))
    await service.start()
    try:
        with pytest.raises(PayloadTooLargeError, match="limit is 5"):
            await service.rerank(QUERY, [make_words(4000, seed=1)], policy=WindowPolicy(max_windows=50))
    finally:
        await service.stop()


def test_bf16_logits_are_computed_in_float32(tiny_model_dir: Path) -> None:
    backend = TorchBackend(Settings(model_path=tiny_model_dir, dtype="bfloat16", torch_threads=1))  # type: ignore[arg-type]
    scores = backend.forward(backend.encoder.encode(QUERY, documents(4, seed=3)).pairs)
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)


class TestLoaderErrors:
    def test_missing_directory_names_the_path(self, tmp_path: Path, tiny_model_dir: Path) -> None:
        settings = settings_for(tiny_model_dir)
        moved = tmp_path / "gone"
        object.__setattr__(settings, "model_path", moved)
        with pytest.raises(ModelLoadError, match=f"{moved}.*does not exist"):
            TorchBackend(settings)

    def test_broken_config_names_the_path(self, tmp_path: Path, tiny_model_dir: Path) -> None:
        broken = tmp_path / "broken"
        shutil.copytree(tiny_model_dir, broken)
        (broken / "config.json").write_text("{not json")
        with pytest.raises(ModelLoadError, match=f"model directory {broken}: config.json cannot be read.*fix:"):
            TorchBackend(settings_for(broken))

    def test_corrupt_weights_name_the_path(self, tmp_path: Path, tiny_model_dir: Path) -> None:
        broken = tmp_path / "corrupt"
        shutil.copytree(tiny_model_dir, broken)
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
        with pytest.raises(ModelLoadError, match=f"cannot load the model from {broken}"):
            TorchBackend(settings_for(broken))

    def test_too_many_labels_is_refused(self, tmp_path: Path, tiny_model_dir: Path) -> None:
        odd = tmp_path / "three-labels"
        shutil.copytree(tiny_model_dir, odd)
        config = json.loads((odd / "config.json").read_text())
        config["id2label"] = {"0": "a", "1": "b", "2": "c"}
        config["label2id"] = {"a": 0, "b": 1, "c": 2}
        (odd / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError):
            TorchBackend(settings_for(odd))

    def test_health_check_fails_when_the_directory_vanishes(self, tmp_path: Path, tiny_model_dir: Path) -> None:
        copy = tmp_path / "model"
        shutil.copytree(tiny_model_dir, copy)
        backend = TorchBackend(settings_for(copy))
        backend.check()
        shutil.rmtree(copy)
        with pytest.raises(RuntimeError, match="does not exist"):
            backend.check()
