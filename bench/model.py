"""The benchmark's model: bge-reranker-base's exact architecture with random weights, built once and cached.

Random weights cost exactly what the real ones cost, so speed figures carry over. Their scores do not look
like a trained reranker's, though: a random encoder barely tells documents apart, so every logit lands near
the same value and every ranking is a near-tie. To make the accuracy figures mean something, the classifier's
output projection is aimed (in float32, before anything is measured) at the direction in which the pooled
first-token vectors of varied pairs differ most, and scaled so the logits spread with a standard deviation of 2,
about what a trained bge-reranker produces. That changes no shape and no cost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from tests.model_factory import build_cross_encoder, make_words

logger = logging.getLogger(__name__)

SHAPE = "bge-reranker-base"
READY_MARK = ".bench-model-v1"  # written last: a half-built directory is rebuilt
LOGIT_STD = 2.0


def ensure_model(cache_dir: Path) -> Path:
    def build(target: Path) -> None:
        build_cross_encoder(target, shape=SHAPE)
        _aim_head(target)

    return built_once(cache_dir / SHAPE, build, "random weights, head aimed for spread logits")


def built_once(target: Path, build: Callable[[Path], object], description: str) -> Path:
    """``target``, built by ``build`` unless an earlier run completed it: the benchmarks' models cost minutes to
    build and are cached between runs (``description`` goes into the ready mark, written last)."""
    if (target / READY_MARK).is_file():
        return target
    logger.info("building %s in %s (once)", description, target)
    build(target)
    (target / READY_MARK).write_text(description + "\n")
    return target


def _aim_head(model_dir: Path, pairs: int = 48) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.float32
    ).eval()
    queries = [make_words(12, seed=10_000 + i) for i in range(pairs)]
    documents = [make_words(40 + 9 * i, seed=20_000 + i) for i in range(pairs)]
    pooled = []
    with torch.inference_mode():
        for start in range(0, pairs, 8):
            batch = tokenizer(
                queries[start : start + 8],
                documents[start : start + 8],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            first = model.roberta(**batch).last_hidden_state[:, 0]
            pooled.append(torch.tanh(model.classifier.dense(first)))  # the head's input to out_proj
    features = torch.cat(pooled)
    centred = features - features.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    projected = features @ direction
    scale = LOGIT_STD / float(projected.std())
    with torch.no_grad():
        model.classifier.out_proj.weight.copy_(direction.unsqueeze(0) * scale)
        model.classifier.out_proj.bias.fill_(-float(projected.mean()) * scale)  # logits centred on 0
    model.save_pretrained(model_dir, safe_serialization=True)
    for path in model_dir.iterdir():
        path.chmod(0o644)
