"""Speed never buys wrong answers: the service's default precision scores like float32.

On a CPU with native bf16 the default runs the matrix products in bf16 (compiled); on CUDA, float16. Either
way a score (sigmoid of the logit, in [0, 1]) must stay within 0.01 of the float32 score of the same pair, and
documents that float32 clearly separates must come out in the same order. Checked through the whole service
(encoder, batcher, slicing, compiled graph) against a float32 eager backend, on the tiny model with its head
scaled so its scores spread over about 0.12 (centred on 0.5).

Why that spread: a random encoder barely tells documents apart, so its rounding noise is a fixed ~4 % of
whatever spread its head gives the scores. At 0.12 the default precision's worst error (~0.005) sits at half
the tolerance, hundreds of document pairs are clearly separated, and the old default (bf16 weights, bf16
head: ~0.03) fails, as it should.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.engine.torch_backend import TorchBackend
from app.service import RerankService
from tests.model_factory import make_words

TOLERANCE = 0.01  # on scores in [0, 1]
SEPARATED = 2 * TOLERANCE  # a float32 gap beyond which two documents must never swap
LOGIT_STD = 0.1  # the spread the test model's head is given (module docstring)

QUERY = make_words(12, seed=7)


def corpus() -> list[str]:
    """Documents of every length from a few words to past the 512-token window (truncated)."""
    rng = np.random.default_rng(11)
    return [make_words(int(rng.integers(2, 700)), seed=500 + n) for n in range(48)]


def float32_logits(model_dir: Path) -> list[float]:
    settings = Settings(model_path=model_dir, dtype="float32", torch_compile="off", torch_threads=1)  # type: ignore[arg-type]
    reference = TorchBackend(settings)
    return reference.forward(reference.encoder.encode(QUERY, corpus()).pairs)


@pytest.fixture(scope="module")
def spread_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its head rescaled so the corpus' logits centre on 0 with a std of 0.1."""
    import torch
    from transformers import AutoModelForSequenceClassification

    target = tmp_path_factory.mktemp("models") / "tiny-spread"
    shutil.copytree(tiny_model_dir, target)
    logits = float32_logits(tiny_model_dir)
    mean, scale = float(np.mean(logits)), LOGIT_STD / float(np.std(logits))
    model = AutoModelForSequenceClassification.from_pretrained(target, local_files_only=True)
    with torch.no_grad():
        model.classifier.out_proj.bias.sub_(mean).mul_(scale)
        model.classifier.out_proj.weight.mul_(scale)
    model.save_pretrained(target, safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def float32_scores(spread_model_dir: Path) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(float32_logits(spread_model_dir), dtype=np.float64)))


@pytest.fixture(
    scope="module",
    params=[{}, {"dtype": "bfloat16", "torch_compile": "off"}],
    ids=["service-default", "bfloat16-eager"],
)
def service_scores(request: pytest.FixtureRequest, spread_model_dir: Path) -> np.ndarray:
    """The service's scores of the corpus, sent as three concurrent requests that share batches."""
    settings = Settings(model_path=spread_model_dir, torch_threads=1, max_batch_tokens=2048, **request.param)  # type: ignore[arg-type]
    documents = corpus()

    async def score() -> np.ndarray:
        service = RerankService(settings, lambda: TorchBackend(settings))
        await service.start()
        try:
            outcomes = await asyncio.gather(*(service.rerank(QUERY, documents[i::3]) for i in range(3)))
        finally:
            await service.stop()
        scores = np.empty(len(documents))
        for offset, outcome in enumerate(outcomes):
            scores[offset::3] = [document.relevance_score for document in outcome.documents]
        return scores

    return asyncio.run(score())


def test_scores_stay_within_tolerance_of_float32(service_scores: np.ndarray, float32_scores: np.ndarray) -> None:
    assert np.ptp(float32_scores) > 0.1, "the scores must spread for this test to mean anything"
    worst = float(np.abs(service_scores - float32_scores).max())
    assert worst <= TOLERANCE, f"max |score - float32 score| = {worst:.4f}"


def test_clearly_separated_documents_rank_identically(service_scores: np.ndarray, float32_scores: np.ndarray) -> None:
    # Every pair float32 separates keeps its order...
    n = len(float32_scores)
    separated = [(i, j) for i in range(n) for j in range(n) if float32_scores[i] - float32_scores[j] > SEPARATED]
    assert len(separated) >= 50, "too few clearly separated pairs to check"
    assert [(i, j) for i, j in separated if service_scores[i] <= service_scores[j]] == []
    # ...so a set of documents all clearly apart from each other is ranked exactly as float32 ranks it.
    apart: list[int] = []
    for document in np.argsort(-float32_scores):
        if not apart or float32_scores[apart[-1]] - float32_scores[document] > SEPARATED:
            apart.append(int(document))
    assert len(apart) >= 4
    assert sorted(apart, key=lambda d: -service_scores[d]) == apart
